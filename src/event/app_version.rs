//! `app_version`: the text as received and its order-preserving integer encoding.

use std::borrow::Cow;

use super::Rejection;

/// `app_version` in its three observed shapes (`X.Y.Z`, `X.YY`, `X.Y`), kept as received and
/// encoded into the brief's integer column.
///
/// The contract (docs/FORMAT.md "app_version"): one to three `.`-separated parts of 1 to 4
/// ASCII digits, missing parts 0, minor and patch at most 999; accepted exactly when
/// `major * 1_000_000 + minor * 1_000 + patch <= i32::MAX` (so `2147.483.647` is the largest).
/// Texts that differ only by leading zeros or by trailing zero parts encode alike (`1.2`,
/// `1.02`, `01.2.0` and `1.002.000` are all 1002000; `1.20` is 1020000): the text is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppVersion {
    pub text: String,
    /// `major * 1_000_000 + minor * 1_000 + patch`: order-preserving and collision-free because
    /// minor and patch are below 1000.
    pub encoded: i32,
}

impl AppVersion {
    pub fn parse(text: Cow<'_, str>) -> Result<Self, Rejection> {
        let encoded = encode_app_version(&text)?;
        Ok(Self {
            text: text.into_owned(),
            encoded,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

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
                    proptest::prop_assert_eq!(version.text.as_str(), text.as_str());
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
                proptest::prop_assert_eq!(version.text.as_str(), padded.as_str());
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
}
