//! The login event: parse a message body, validate it, normalize it.
//!
//! A body either becomes a [`LoginEvent`] or is rejected with a [`Rejection`] whose text says
//! precisely what is wrong **without quoting the body**: rejection reasons are stored in clear in
//! the quarantine table and appear in logs, while the body itself may hold personal data.
//!
//! A field of the body is added in this module in three places: its name in `FIELDS`
//! (`json.rs`), its check in `validate` below, and its place in [`LoginEvent`] (in [`InClear`]
//! when analysts see it, as `user_logins` stores it). Storing it is then one line in the
//! writer's column list (`ingest/writer.rs`) and a migration.

mod app_version;
mod json;

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

pub use app_version::AppVersion;
use json::{RawBody, RawValue, read_body};

/// SQS refuses bodies over 256 KiB; we refuse them from any source so a file replay behaves the
/// same as the queue.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Column limits of `user_logins` (characters, as PostgreSQL's varchar counts them).
pub const MAX_USER_ID_CHARS: usize = 128;
pub const MAX_DEVICE_TYPE_CHARS: usize = 32;
pub const MAX_LOCALE_CHARS: usize = 32;
/// Not a column of its own (the value is sealed), but a bound keeps hostile input small.
pub const MAX_DEVICE_ID_CHARS: usize = 128;
/// Long enough for any `X.Y.Z` that fits the integer encoding.
pub const MAX_APP_VERSION_CHARS: usize = 32;

/// A validated login: what is stored in clear, and the personal fields, borrowed from the
/// message body, which leave the ingest pipeline only as tokens and sealed bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginEvent<'a> {
    pub in_clear: InClear,
    /// The ip exactly as received (what `unmask` gives back).
    pub ip: Cow<'a, str>,
    /// The parsed ip; its canonical text is what the token is computed over.
    pub ip_addr: IpAddr,
    /// The device id exactly as received (what `unmask` gives back).
    pub device_id: Cow<'a, str>,
}

/// What `user_logins` keeps of a login in clear, for analysts: everything but the personal
/// fields. Owned, because it outlives the message body in the batch it is written with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InClear {
    pub user_id: String,
    pub device_type: String,
    pub locale: Option<String>,
    pub app_version: AppVersion,
}

// Hand-written so that a stray `{:?}` can never print the personal fields.
impl fmt::Debug for LoginEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginEvent")
            .field("in_clear", &self.in_clear)
            .field("ip", &"<redacted>")
            .field("device_id", &"<redacted>")
            .finish()
    }
}

/// The canonical form of a device id: surrounding whitespace is not part of the identity.
pub fn canonical_device_id(device_id: &str) -> &str {
    device_id.trim()
}

/// The canonical form of an ip: parsed and printed back, with IPv4-mapped IPv6 addresses
/// (`::ffff:1.2.3.4`) folded to IPv4 so that one host has one token.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Why a message was quarantined. The text never contains any part of the body's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("body is {0} bytes, over the 256 KiB limit")]
    TooLarge(usize),
    #[error("body is not valid UTF-8 (at byte {0})")]
    NotUtf8(usize),
    /// The text comes from serde_json's syntax errors, which name a position, never content.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("body is JSON {0}, not an object")]
    NotObject(&'static str),
    #[error("field `{0}` is missing")]
    MissingField(&'static str),
    #[error("field `{0}` appears more than once")]
    DuplicateField(&'static str),
    #[error("unexpected field {0}")]
    UnknownField(FieldName),
    #[error("field `{field}` must be {expected}, found {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("field `{field}` is {chars} characters, over the limit of {max}")]
    TooLong {
        field: &'static str,
        chars: usize,
        max: usize,
    },
    #[error("field `{0}` is empty")]
    Empty(&'static str),
    #[error("field `{0}` contains a control character")]
    ControlCharacter(&'static str),
    #[error("field `ip` is not an IPv4 or IPv6 address")]
    InvalidIp,
    #[error("field `app_version` is not a version like 2.3.0, 0.96 or 3.7: {0}")]
    InvalidAppVersion(&'static str),
}

/// An unexpected key, named only when it looks like an identifier: keys are attacker-chosen
/// text and could themselves carry personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldName(Option<String>);

impl FieldName {
    fn new(name: &str) -> Self {
        let looks_like_identifier = !name.is_empty()
            && name.len() <= 32
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        Self(looks_like_identifier.then(|| name.to_owned()))
    }
}

impl fmt::Display for FieldName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(name) => write!(f, "`{name}`"),
            None => f.write_str("(name withheld: not a plain identifier)"),
        }
    }
}

/// Parses and validates one message body.
pub fn parse(body: &[u8]) -> Result<LoginEvent<'_>, Rejection> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Rejection::TooLarge(body.len()));
    }
    let text = std::str::from_utf8(body).map_err(|e| Rejection::NotUtf8(e.valid_up_to()))?;
    validate(read_body(text)?)
}

/// The body's fields checked, in a fixed order (the first problem found is the reason given).
fn validate(mut body: RawBody<'_>) -> Result<LoginEvent<'_>, Rejection> {
    let user_id = required_string("user_id", body.take("user_id"))?;
    let user_id = bounded("user_id", user_id, MAX_USER_ID_CHARS)?;
    let device_type = required_string("device_type", body.take("device_type"))?;
    let device_type = bounded("device_type", device_type, MAX_DEVICE_TYPE_CHARS)?;
    let ip = required_string("ip", body.take("ip"))?;
    let ip_addr: IpAddr = ip.parse().map_err(|_| Rejection::InvalidIp)?;
    let device_id = required_string("device_id", body.take("device_id"))?;
    let device_id = bounded("device_id", device_id, MAX_DEVICE_ID_CHARS)?;
    if canonical_device_id(&device_id).is_empty() {
        return Err(Rejection::Empty("device_id"));
    }
    let locale = match body.take("locale") {
        None => return Err(Rejection::MissingField("locale")),
        Some(RawValue::Other("null")) => None,
        Some(RawValue::Other(found)) => {
            return Err(Rejection::WrongType {
                field: "locale",
                expected: "a string or null",
                found,
            });
        }
        Some(RawValue::String(text)) => Some(within_limits("locale", text, MAX_LOCALE_CHARS)?),
    };
    let app_version = required_string("app_version", body.take("app_version"))?;
    let app_version = within_limits("app_version", app_version, MAX_APP_VERSION_CHARS)?;
    let app_version = AppVersion::parse(app_version)?;
    Ok(LoginEvent {
        in_clear: InClear {
            user_id: user_id.into_owned(),
            device_type: device_type.into_owned(),
            locale: locale.map(Cow::into_owned),
            app_version,
        },
        ip,
        ip_addr,
        device_id,
    })
}

fn required_string<'a>(
    field: &'static str,
    value: Option<RawValue<'a>>,
) -> Result<Cow<'a, str>, Rejection> {
    match value {
        None => Err(Rejection::MissingField(field)),
        Some(RawValue::String(text)) => Ok(text),
        Some(RawValue::Other(found)) => Err(Rejection::WrongType {
            field,
            expected: "a string",
            found,
        }),
    }
}

/// A required text column: non-empty, within its length, no control characters (PostgreSQL
/// rejects NUL in text, and the others have no business in an identifier).
fn bounded<'a>(
    field: &'static str,
    text: Cow<'a, str>,
    max: usize,
) -> Result<Cow<'a, str>, Rejection> {
    if text.is_empty() {
        return Err(Rejection::Empty(field));
    }
    within_limits(field, text, max)
}

fn within_limits<'a>(
    field: &'static str,
    text: Cow<'a, str>,
    max: usize,
) -> Result<Cow<'a, str>, Rejection> {
    // Byte length bounds the character count from above, so most values skip the count.
    if text.len() > max {
        let chars = text.chars().count();
        if chars > max {
            return Err(Rejection::TooLong { field, chars, max });
        }
    }
    if text.chars().any(char::is_control) {
        return Err(Rejection::ControlCharacter(field));
    }
    Ok(text)
}

/// The user id a message body names, if it is a JSON object with a string `user_id`, even
/// when the rest of it is invalid: how a quarantined message is linked to its user (for an
/// erasure), at ingest and when a rotation moves that link to a new token key.
pub fn user_id_named_in(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        user_id: String,
    }
    serde_json::from_slice::<Named>(body)
        .ok()
        .map(|named| named.user_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../tests/data/sample_data.jsonl");

    fn valid(body: &str) -> LoginEvent<'_> {
        parse(body.as_bytes()).expect("valid body")
    }

    fn rejected(body: &str) -> Rejection {
        parse(body.as_bytes()).expect_err("rejected body")
    }

    fn body_with(field: &str, value: &str) -> String {
        let mut fields = vec![
            ("user_id", r#""u-1""#),
            ("app_version", r#""2.3.0""#),
            ("device_type", r#""android""#),
            ("ip", r#""10.1.2.3""#),
            ("locale", r#""RU""#),
            ("device_id", r#""593-47-5928""#),
        ];
        for (name, v) in &mut fields {
            if *name == field {
                *v = value;
            }
        }
        let inner: Vec<String> = fields
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(n, v)| format!("\"{n}\": {v}"))
            .collect();
        format!("{{{}}}", inner.join(", "))
    }

    #[test]
    fn sample_has_99_valid_bodies_and_the_known_malformed_one() {
        let mut valid_count = 0;
        let mut null_locales = 0;
        for (line, body) in SAMPLE.lines().enumerate() {
            match parse(body.as_bytes()) {
                Ok(event) => {
                    valid_count += 1;
                    null_locales += usize::from(event.in_clear.locale.is_none());
                }
                Err(rejection) => {
                    assert_eq!(line, 12, "only line 13 is malformed");
                    assert_eq!(
                        rejection,
                        Rejection::UnknownField(FieldName(Some("foo".into())))
                    );
                }
            }
        }
        assert_eq!(valid_count, 99);
        assert_eq!(null_locales, 29);
    }

    #[test]
    fn parses_each_app_version_shape_of_the_sample() {
        assert_eq!(
            valid(&body_with("app_version", r#""2.3.0""#))
                .in_clear
                .app_version
                .encoded,
            2_003_000
        );
        assert_eq!(
            valid(&body_with("app_version", r#""0.96""#))
                .in_clear
                .app_version
                .encoded,
            96_000
        );
        assert_eq!(
            valid(&body_with("app_version", r#""3.7""#))
                .in_clear
                .app_version
                .encoded,
            3_007_000
        );
        let body = body_with("app_version", r#""6.02""#);
        let event = valid(&body);
        assert_eq!(event.in_clear.app_version.encoded, 6_002_000);
        assert_eq!(event.in_clear.app_version.text, "6.02");
    }

    #[test]
    fn null_locale_is_none_not_text() {
        assert_eq!(valid(&body_with("locale", "null")).in_clear.locale, None);
        assert_eq!(
            valid(&body_with("locale", r#""None""#))
                .in_clear
                .locale
                .as_deref(),
            Some("None")
        );
    }

    #[test]
    fn ip_is_parsed_and_canonicalized() {
        let body = body_with("ip", r#""2001:DB8:0:0::1""#);
        let event = valid(&body);
        assert_eq!(event.ip, "2001:DB8:0:0::1", "the original text is kept");
        assert_eq!(canonical_ip(event.ip_addr).to_string(), "2001:db8::1");
        let body = body_with("ip", r#""::ffff:10.1.2.3""#);
        let mapped = valid(&body);
        assert_eq!(canonical_ip(mapped.ip_addr).to_string(), "10.1.2.3");
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let body = body_with("user_id", r#""u\u002d1""#);
        let event = valid(&body);
        assert_eq!(event.in_clear.user_id, "u-1");
    }

    #[test]
    fn every_rejection_reason() {
        use Rejection::*;
        let cases: Vec<(String, Rejection)> = vec![
            ("not json".into(), NotJson(String::new())),
            ("{\"user_id\": ".into(), NotJson(String::new())),
            (
                body_with("ip", r#""1.2.3.4""#) + " trailing",
                NotJson(String::new()),
            ),
            ("[1, 2]".into(), NotObject("an array")),
            ("\"text\"".into(), NotObject("a string")),
            ("42".into(), NotObject("a number")),
            ("true".into(), NotObject("a boolean")),
            ("null".into(), NotObject("null")),
            (
                r#"{"foo": "oops_wrong_msg_type", "bar": "123"}"#.into(),
                UnknownField(FieldName(Some("foo".into()))),
            ),
            (body_with("user_id", ""), MissingField("user_id")),
            (body_with("locale", ""), MissingField("locale")),
            (
                body_with("ip", r#""1.2.3.4", "ip": "5.6.7.8""#),
                DuplicateField("ip"),
            ),
            (
                body_with("ip", "17"),
                WrongType {
                    field: "ip",
                    expected: "a string",
                    found: "a number",
                },
            ),
            (
                body_with("device_id", "null"),
                WrongType {
                    field: "device_id",
                    expected: "a string",
                    found: "null",
                },
            ),
            (
                body_with("locale", "[\"RU\"]"),
                WrongType {
                    field: "locale",
                    expected: "a string or null",
                    found: "an array",
                },
            ),
            (
                body_with("user_id", r#"{"id": 1}"#),
                WrongType {
                    field: "user_id",
                    expected: "a string",
                    found: "an object",
                },
            ),
            (
                body_with("user_id", &format!("\"{}\"", "é".repeat(129))),
                TooLong {
                    field: "user_id",
                    chars: 129,
                    max: 128,
                },
            ),
            (
                body_with("device_type", &format!("\"{}\"", "x".repeat(33))),
                TooLong {
                    field: "device_type",
                    chars: 33,
                    max: 32,
                },
            ),
            (
                body_with("locale", &format!("\"{}\"", "x".repeat(33))),
                TooLong {
                    field: "locale",
                    chars: 33,
                    max: 32,
                },
            ),
            (body_with("user_id", r#""""#), Empty("user_id")),
            (body_with("device_id", r#""   ""#), Empty("device_id")),
            (
                body_with("user_id", r#""u\u0000""#),
                ControlCharacter("user_id"),
            ),
            (body_with("ip", r#""999.1.1.1""#), InvalidIp),
            (body_with("ip", r#""1.2.3.4 ""#), InvalidIp),
            (
                body_with("app_version", r#""1.2.3.4""#),
                InvalidAppVersion("more than three components"),
            ),
        ];
        for (body, expected) in cases {
            let got = rejected(&body);
            match (&expected, &got) {
                (NotJson(_), NotJson(_)) => {}
                _ => assert_eq!(got, expected, "body {body:?}"),
            }
        }
    }

    #[test]
    fn invalid_utf8_and_oversized_bodies_are_rejected() {
        let mut body = body_with("user_id", r#""u-1""#).into_bytes();
        body[12] = 0xff;
        assert_eq!(parse(&body), Err(Rejection::NotUtf8(12)));
        let huge = format!("{{\"user_id\": \"{}\"}}", "x".repeat(MAX_BODY_BYTES));
        assert!(matches!(
            parse(huge.as_bytes()),
            Err(Rejection::TooLarge(_))
        ));
        assert!(matches!(
            rejected(r#"{"user_id": "\ud800"}"#),
            Rejection::NotJson(_)
        ));
    }

    #[test]
    fn reasons_never_quote_values() {
        let secret = "203.0.113.77";
        let bodies = [
            format!("{{\"{secret}\": 1}}"),
            body_with("ip", &format!("\"{secret}x\"")),
            body_with("ip", &format!("[\"{secret}\"]")),
            format!("[\"{secret}\"]"),
            format!("{{\"ip\": \"{secret}\""),
        ];
        for body in bodies {
            let reason = rejected(&body).to_string();
            assert!(!reason.contains(secret), "{reason}");
        }
    }

    #[test]
    fn debug_output_redacts_personal_fields() {
        let body = body_with("device_id", r#""secret-device""#);
        let printed = format!("{:?}", valid(&body));
        assert!(!printed.contains("secret-device") && !printed.contains("10.1.2.3"));
    }
}
