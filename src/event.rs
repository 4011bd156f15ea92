//! The login event: parse a message body, validate it, normalize it.
//!
//! A body either becomes a [`LoginEvent`] or is rejected with a [`Rejection`] whose text says
//! precisely what is wrong **without quoting the body**: rejection reasons are stored in clear in
//! the quarantine table and appear in logs, while the body itself may hold personal data.
//!
//! The parser is a hand-written serde visitor rather than a derived `Deserialize` because the
//! derived one quotes offending values in its errors (`invalid type: string "10.0.0.1"`), accepts
//! duplicate keys silently for maps, and cannot tell "null" from "missing" the way we need.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::net::IpAddr;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

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

/// A validated login, borrowing its strings from the message body.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginEvent<'a> {
    pub user_id: Cow<'a, str>,
    pub device_type: Cow<'a, str>,
    /// The ip exactly as received (what `unmask` gives back).
    pub ip: Cow<'a, str>,
    /// The parsed ip; its canonical text is what the token is computed over.
    pub ip_addr: IpAddr,
    /// The device id exactly as received (what `unmask` gives back).
    pub device_id: Cow<'a, str>,
    pub locale: Option<Cow<'a, str>>,
    pub app_version: AppVersion<'a>,
}

// Hand-written so that a stray `{:?}` can never print the personal fields.
impl fmt::Debug for LoginEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginEvent")
            .field("user_id", &self.user_id)
            .field("device_type", &self.device_type)
            .field("ip", &"<redacted>")
            .field("device_id", &"<redacted>")
            .field("locale", &self.locale)
            .field("app_version", &self.app_version)
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

/// `app_version` in its three observed shapes (`X.Y.Z`, `X.YY`, `X.Y`), kept as received and
/// encoded into the brief's integer column.
///
/// The contract (docs/FORMAT.md "app_version"): one to three `.`-separated parts of 1 to 4
/// ASCII digits, missing parts 0, minor and patch at most 999; accepted exactly when
/// `major * 1_000_000 + minor * 1_000 + patch <= i32::MAX` (so `2147.483.647` is the largest).
/// Texts that differ only by leading zeros or by trailing zero parts encode alike (`1.2`,
/// `1.02`, `01.2.0` and `1.002.000` are all 1002000; `1.20` is 1020000): the text is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppVersion<'a> {
    pub text: Cow<'a, str>,
    /// `major * 1_000_000 + minor * 1_000 + patch`: order-preserving and collision-free because
    /// minor and patch are below 1000.
    pub encoded: i32,
}

impl<'a> AppVersion<'a> {
    pub fn parse(text: Cow<'a, str>) -> Result<Self, Rejection> {
        let encoded = encode_app_version(&text)?;
        Ok(Self { text, encoded })
    }
}

fn encode_app_version(text: &str) -> Result<i32, Rejection> {
    let bad = |why: &'static str| Rejection::InvalidAppVersion(why);
    if text.is_empty() {
        return Err(bad("empty"));
    }
    let mut parts = [0u32; 3];
    for (index, part) in text.split('.').enumerate() {
        let slot = parts
            .get_mut(index)
            .ok_or(bad("more than three components"))?;
        if part.is_empty() || part.len() > 4 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("components must be 1 to 4 decimal digits"));
        }
        *slot = part.parse().map_err(|_| bad("not a number"))?;
    }
    let [major, minor, patch] = parts;
    if minor > 999 || patch > 999 {
        return Err(bad("minor and patch must be at most 999"));
    }
    // Four digits each, so at most 9_999_999_999 + 999_999: exact in u64. The version is
    // refused exactly when its encoding does not fit PostgreSQL's `integer` (i32).
    let encoded = u64::from(major) * 1_000_000 + u64::from(minor) * 1_000 + u64::from(patch);
    i32::try_from(encoded).map_err(|_| bad("too large: its encoding exceeds 2147483647"))
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
    let mut deserializer = serde_json::Deserializer::from_str(text);
    // The visitor leaves its structured reason here: serde's error type only carries text.
    let rejection = Cell::new(None);
    let raw = deserializer
        .deserialize_any(BodyVisitor {
            rejection: &rejection,
        })
        .map_err(|error| {
            rejection
                .take()
                .unwrap_or_else(|| Rejection::NotJson(error.to_string()))
        })?;
    deserializer
        .end()
        .map_err(|e| Rejection::NotJson(e.to_string()))?;
    raw.validate()
}

/// The body's top-level object, each field as found, before validation.
#[derive(Default)]
struct RawBody<'a> {
    user_id: Option<RawValue<'a>>,
    app_version: Option<RawValue<'a>>,
    device_type: Option<RawValue<'a>>,
    ip: Option<RawValue<'a>>,
    locale: Option<RawValue<'a>>,
    device_id: Option<RawValue<'a>>,
}

/// A field's JSON value, with only strings kept: anything else is a type error, and we name its
/// kind without looking inside.
enum RawValue<'a> {
    String(Cow<'a, str>),
    Other(&'static str),
}

impl<'a> RawBody<'a> {
    fn validate(self) -> Result<LoginEvent<'a>, Rejection> {
        let user_id = required_string("user_id", self.user_id)?;
        let user_id = bounded("user_id", user_id, MAX_USER_ID_CHARS)?;
        let device_type = required_string("device_type", self.device_type)?;
        let device_type = bounded("device_type", device_type, MAX_DEVICE_TYPE_CHARS)?;
        let ip = required_string("ip", self.ip)?;
        let ip_addr: IpAddr = ip.parse().map_err(|_| Rejection::InvalidIp)?;
        let device_id = required_string("device_id", self.device_id)?;
        let device_id = bounded("device_id", device_id, MAX_DEVICE_ID_CHARS)?;
        if canonical_device_id(&device_id).is_empty() {
            return Err(Rejection::Empty("device_id"));
        }
        let locale = match self.locale {
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
        let app_version = required_string("app_version", self.app_version)?;
        let app_version = within_limits("app_version", app_version, MAX_APP_VERSION_CHARS)?;
        let app_version = AppVersion::parse(app_version)?;
        Ok(LoginEvent {
            user_id,
            device_type,
            ip,
            ip_addr,
            device_id,
            locale,
            app_version,
        })
    }
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

// --- serde plumbing -------------------------------------------------------------------------

const FIELDS: [&str; 6] = [
    "user_id",
    "app_version",
    "device_type",
    "ip",
    "locale",
    "device_id",
];

fn field_name(name: &str) -> Option<&'static str> {
    FIELDS.into_iter().find(|field| *field == name)
}

struct BodyVisitor<'r> {
    rejection: &'r Cell<Option<Rejection>>,
}

impl BodyVisitor<'_> {
    fn reject<E: de::Error>(&self, rejection: Rejection) -> E {
        let error = E::custom(&rejection);
        self.rejection.set(Some(rejection));
        error
    }
}

impl<'de> Visitor<'de> for BodyVisitor<'_> {
    type Value = RawBody<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawBody<'de>, A::Error> {
        let mut body = RawBody::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let slot = match key.as_ref() {
                "user_id" => &mut body.user_id,
                "app_version" => &mut body.app_version,
                "device_type" => &mut body.device_type,
                "ip" => &mut body.ip,
                "locale" => &mut body.locale,
                "device_id" => &mut body.device_id,
                other => {
                    return Err(self.reject(Rejection::UnknownField(FieldName::new(other))));
                }
            };
            if slot.is_some() {
                let field = field_name(&key).expect("matched above");
                return Err(self.reject(Rejection::DuplicateField(field)));
            }
            *slot = Some(map.next_value::<RawValue<'de>>()?);
        }
        Ok(body)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<RawBody<'de>, A::Error> {
        Err(self.reject(Rejection::NotObject("an array")))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("a string")))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("a number")))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("a number")))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("a number")))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("a boolean")))
    }
    fn visit_unit<E: de::Error>(self) -> Result<RawBody<'de>, E> {
        Err(self.reject(Rejection::NotObject("null")))
    }
}

impl<'de> de::Deserialize<'de> for RawValue<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawValueVisitor)
    }
}

struct RawValueVisitor;

impl<'de> Visitor<'de> for RawValueVisitor {
    type Value = RawValue<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<RawValue<'de>, E> {
        Ok(RawValue::String(Cow::Borrowed(text)))
    }
    // Strings with escapes arrive owned.
    fn visit_str<E: de::Error>(self, text: &str) -> Result<RawValue<'de>, E> {
        Ok(RawValue::String(Cow::Owned(text.to_owned())))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<RawValue<'de>, E> {
        Ok(RawValue::String(Cow::Owned(text)))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<RawValue<'de>, E> {
        Ok(RawValue::Other("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawValue<'de>, E> {
        Ok(RawValue::Other("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawValue<'de>, E> {
        Ok(RawValue::Other("a number"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<RawValue<'de>, E> {
        Ok(RawValue::Other("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<RawValue<'de>, E> {
        Ok(RawValue::Other("null"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawValue<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RawValue::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawValue<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(RawValue::Other("an object"))
    }
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

    const SAMPLE: &str = include_str!("../tests/data/sample_data.jsonl");

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
                    null_locales += usize::from(event.locale.is_none());
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
                .app_version
                .encoded,
            2_003_000
        );
        assert_eq!(
            valid(&body_with("app_version", r#""0.96""#))
                .app_version
                .encoded,
            96_000
        );
        assert_eq!(
            valid(&body_with("app_version", r#""3.7""#))
                .app_version
                .encoded,
            3_007_000
        );
        let body = body_with("app_version", r#""6.02""#);
        let event = valid(&body);
        assert_eq!(event.app_version.encoded, 6_002_000);
        assert_eq!(event.app_version.text, "6.02");
    }

    #[test]
    fn app_version_encoding_equates_zero_padding_and_preserves_order() {
        let enc = |t: &str| encode_app_version(t).unwrap();
        assert_eq!(enc("2.00"), enc("2.0"));
        assert_eq!(enc("2.00"), enc("2"));
        assert_eq!(enc("2.0.0"), enc("2"));
        let ordered = [
            "0.0.1", "0.2.6", "0.96", "0.96.1", "1", "2.2.8", "2.3.0", "2.10", "10.0",
        ];
        for pair in ordered.windows(2) {
            assert!(enc(pair[0]) < enc(pair[1]), "{} < {}", pair[0], pair[1]);
        }
        assert_eq!(enc("2146.999.999"), 2_146_999_999);
        // Every version whose encoding fits i32 is accepted, up to i32::MAX itself.
        assert_eq!(enc("2147"), 2_147_000_000);
        assert_eq!(enc("2147.483.647"), i32::MAX);
        assert_eq!(enc("2147.483"), 2_147_483_000);
    }

    #[test]
    fn app_version_rejects_what_would_collide_or_overflow() {
        for bad in [
            "",
            ".",
            "1.",
            ".1",
            "1.2.3.4",
            "1.1000",
            "1.2.1000",
            "2147.483.648",
            "2147.484",
            "2148",
            "9999.999.999",
            "02147",
            "v1.2",
            "1,2",
            "1.-2",
            " 1.2",
            "+1",
            "12345",
        ] {
            assert!(
                matches!(
                    encode_app_version(bad),
                    Err(Rejection::InvalidAppVersion(_))
                ),
                "{bad:?} should be rejected"
            );
        }
    }

    /// The components of a canonical version and the value the contract gives them.
    fn components() -> impl proptest::strategy::Strategy<Value = (u32, u32, u32)> {
        use proptest::prelude::*;
        // Majors near the i32 edge are drawn as often as small ones.
        let major = prop_oneof![0u32..=9999, 2140u32..=2150];
        (major, 0u32..1000, 0u32..1000)
    }

    fn formula(major: u32, minor: u32, patch: u32) -> i64 {
        i64::from(major) * 1_000_000 + i64::from(minor) * 1_000 + i64::from(patch)
    }

    proptest::proptest! {
        /// The exact contract: `M.m.p` (minor, patch < 1000, parts of up to 4 digits) is
        /// accepted iff the formula fits i32, encodes to the formula, and keeps its text.
        #[test]
        fn app_version_is_accepted_exactly_when_its_encoding_fits((major, minor, patch) in components()) {
            let text = format!("{major}.{minor}.{patch}");
            let expected = formula(major, minor, patch);
            match AppVersion::parse(Cow::Borrowed(&text)) {
                Ok(version) => {
                    proptest::prop_assert!(expected <= i64::from(i32::MAX));
                    proptest::prop_assert_eq!(i64::from(version.encoded), expected);
                    proptest::prop_assert_eq!(version.text.as_ref(), text.as_str());
                }
                Err(_) => proptest::prop_assert!(expected > i64::from(i32::MAX), "{text} refused"),
            }
        }

        /// Order-preserving (hence injective) over canonical versions.
        #[test]
        fn app_version_encoding_preserves_order(a in components(), b in components()) {
            let enc = |(x, y, z): (u32, u32, u32)| encode_app_version(&format!("{x}.{y}.{z}")).ok();
            if let (Some(ea), Some(eb)) = (enc(a), enc(b)) {
                proptest::prop_assert_eq!(a.cmp(&b), ea.cmp(&eb), "{:?} vs {:?}", a, b);
            }
        }

        /// The forms that encode alike: leading zeros (within 4 digits) and omitted or
        /// zero trailing parts. The kept text tells them apart.
        #[test]
        fn padded_and_shortened_forms_encode_alike(
            (major, minor, patch) in components(),
            pads in (0usize..4, 0usize..4, 0usize..4),
        ) {
            let canonical = format!("{major}.{minor}.{patch}");
            let pad = |n: u32, extra: usize| {
                let digits = n.to_string();
                let extra = extra.min(4 - digits.len());
                format!("{}{digits}", "0".repeat(extra))
            };
            let padded = format!("{}.{}.{}", pad(major, pads.0), pad(minor, pads.1), pad(patch, pads.2));
            let want = encode_app_version(&canonical).ok();
            proptest::prop_assert_eq!(encode_app_version(&padded).ok(), want);
            if patch == 0 {
                proptest::prop_assert_eq!(encode_app_version(&format!("{major}.{minor}")).ok(), want);
                if minor == 0 {
                    proptest::prop_assert_eq!(encode_app_version(&major.to_string()).ok(), want);
                }
            }
            if let Ok(version) = AppVersion::parse(Cow::Borrowed(&padded)) {
                proptest::prop_assert_eq!(version.text.as_ref(), padded.as_str());
            }
        }
    }

    #[test]
    fn one_two_and_one_oh_two_encode_alike_and_keep_their_text() {
        let one_two = AppVersion::parse(Cow::Borrowed("1.2")).unwrap();
        let one_oh_two = AppVersion::parse(Cow::Borrowed("1.02")).unwrap();
        assert_eq!(one_two.encoded, 1_002_000);
        assert_eq!(one_oh_two.encoded, 1_002_000);
        assert_eq!(
            (one_two.text.as_ref(), one_oh_two.text.as_ref()),
            ("1.2", "1.02")
        );
        assert_eq!(encode_app_version("1.20").unwrap(), 1_020_000);
    }

    #[test]
    fn null_locale_is_none_not_text() {
        assert_eq!(valid(&body_with("locale", "null")).locale, None);
        assert_eq!(
            valid(&body_with("locale", r#""None""#)).locale.as_deref(),
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
        assert_eq!(event.user_id, "u-1");
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
