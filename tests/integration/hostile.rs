//! Hostile input: the corpus in tests/data/hostile/ plus generated cases and property tests.
//! Nothing panics, every bad message is quarantined with a reason, none reaches user_logins.

use std::path::PathBuf;

use crate::common::{self, TestEnv, login};
use pii_vault::event::{self, MAX_BODY_BYTES};
use proptest::prelude::*;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hostile");
    let mut cases: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    // Too big to keep as files.
    let big = |field: &str, len: usize| {
        format!(
            r#"{{"user_id": "{}", "app_version": "1.0", "device_type": "ios", "ip": "10.0.0.1", "locale": null, "device_id": "{}"}}"#,
            if field == "user_id" { "u".repeat(len) } else { "u-1".to_owned() },
            if field == "device_id" { "d".repeat(len) } else { "1".to_owned() },
        )
        .into_bytes()
    };
    cases.push(("huge user_id (200 KB)".into(), big("user_id", 200_000)));
    cases.push(("huge device_id (200 KB)".into(), big("device_id", 200_000)));
    cases.push(("body one byte over 256 KiB".into(), {
        let mut body = big("device_id", 10);
        body.resize(MAX_BODY_BYTES + 1, b' ');
        body
    }));
    cases.sort();
    assert!(cases.len() >= 35, "the corpus is in place");
    cases
}

#[test]
fn every_corpus_message_is_rejected_with_a_reason_that_quotes_nothing() {
    for (name, body) in corpus() {
        let rejection = event::parse(&body).expect_err(&name);
        let reason = rejection.to_string();
        assert!(!reason.is_empty(), "{name}");
        for secret in [
            "10.0.0.1",
            "593-47-5928",
            "DROP TABLE",
            "someone@example.com",
            "10.6.6.6",
        ] {
            assert!(!reason.contains(secret), "{name}: {reason}");
        }
    }
}

#[tokio::test]
async fn the_corpus_through_the_pipeline_is_all_quarantined() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let bodies: Vec<Vec<u8>> = corpus().into_iter().map(|(_, body)| body).collect();
    let summary = env.drain_from(common::VecSource::from_bytes(&bodies)).await;
    assert_eq!(summary.quarantined as usize, bodies.len());
    assert_eq!(summary.stored, 0);
    assert_eq!(env.count("user_logins").await, 0);
    let reasons: i64 = sqlx::query_scalar("SELECT count(DISTINCT reason) FROM quarantine")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(
        reasons >= 15,
        "precise reasons, not one catch-all: {reasons}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn sql_metacharacters_in_free_text_are_stored_verbatim() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let user = "o'brien\"; DROP TABLE user_logins; --";
    let escaped = user.replace('"', "\\\"");
    env.ingest_bodies(&[login(&escaped, "10.0.0.1", "1")]).await;
    let stored: String = sqlx::query_scalar("SELECT user_id FROM user_logins")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(stored, user);
    env.cleanup().await;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = event::parse(&body);
    }

    #[test]
    fn arbitrary_text_fields_are_accepted_exactly_when_valid(
        user_id in "\\PC{0,140}",
        device_type in "[a-z]{0,40}",
        device_id in "[ -~]{0,20}",
        major in 0u32..3000, minor in 0u32..1200,
    ) {
        let body = serde_json::json!({
            "user_id": user_id, "app_version": format!("{major}.{minor}"),
            "device_type": device_type, "ip": "10.0.0.1", "locale": null, "device_id": device_id,
        }).to_string();
        let expected_valid = !user_id.is_empty() && user_id.chars().count() <= 128
            && !user_id.chars().any(char::is_control)
            && !device_type.is_empty() && device_type.len() <= 32
            && !device_id.trim().is_empty()
            && minor <= 999
            && u64::from(major) * 1_000_000 + u64::from(minor) * 1_000 <= i32::MAX as u64;
        match event::parse(body.as_bytes()) {
            Ok(login) => {
                prop_assert!(expected_valid, "accepted {body}");
                prop_assert_eq!(login.in_clear.user_id.as_str(), user_id.as_str());
                prop_assert_eq!(login.device_id.as_ref(), device_id.as_str());
                prop_assert_eq!(login.in_clear.app_version.encoded as u32, major * 1_000_000 + minor * 1_000);
            }
            Err(rejection) => {
                prop_assert!(!expected_valid, "rejected {body}: {rejection}");
            }
        }
    }

    #[test]
    fn mangled_valid_bodies_never_panic(cut in 0usize..200, byte in any::<u8>()) {
        let mut body = login("u-1", "10.0.0.1", "593-47-5928").into_bytes();
        let at = cut % body.len();
        body[at] = byte;
        let _ = event::parse(&body);
        body.truncate(at);
        let _ = event::parse(&body);
    }
}
