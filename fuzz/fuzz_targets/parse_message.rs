//! `event::parse` on arbitrary bytes: never panics; what it accepts is within every limit and
//! its app_version encodes to the documented formula.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pii_vault::event::{self, MAX_APP_VERSION_CHARS, MAX_USER_ID_CHARS};

fuzz_target!(|body: &[u8]| {
    let Ok(event::LoginEvent { in_clear: login, .. }) = event::parse(body) else {
        return;
    };
    assert!(body.len() <= event::MAX_BODY_BYTES);
    assert!(!login.user_id.is_empty() && login.user_id.chars().count() <= MAX_USER_ID_CHARS);
    assert!(login.app_version.text.chars().count() <= MAX_APP_VERSION_CHARS);
    let parts: Vec<i64> = login
        .app_version
        .text
        .split('.')
        .map(|p| p.parse().expect("accepted parts are decimal"))
        .collect();
    let part = |i: usize| parts.get(i).copied().unwrap_or(0);
    assert_eq!(
        i64::from(login.app_version.encoded),
        part(0) * 1_000_000 + part(1) * 1_000 + part(2)
    );
    // The reason text never quotes the body: checked on rejections by tests/integration/hostile.rs.
});
