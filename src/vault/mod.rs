//! Everything that touches key material.
//!
//! ```text
//! AWS KMS key (never leaves KMS)
//!   |-- wraps --> token key  (HMAC-SHA256; one active version)   -> token.rs: Tokenizer
//!   |-- wraps --> data keys  (AES-256-GCM-SIV; many versions)    -> seal.rs:  Sealer
//! ```
//!
//! - [`kms`]: the [`KeyWrapper`](kms::KeyWrapper) trait and its AWS KMS implementation.
//! - [`erasure`]: erased users, by the tokens of their ids, for the ingester to honour.
//! - [`key_table`]: the key table (`vault_keys`): every statement on it, its door and its locks,
//!   and what a key's state ([`KeyState`](key_table::KeyState)) and [`Purpose`] can be;
//!   [`key_use`](key_table::key_use) is its lock that writers hold shared while they write
//!   under a key and a rotation takes exclusively to retire it (`ingest` and `lifecycle` both
//!   take it).
//! - [`keyring`]: keys created, unwrapped and re-wrapped through KMS, stored in the key table.
//! - [`key_cache`]: keys opened once each, by id, for a reveal, a verification or a rotation.
//! - [`retention`]: retention windows: the KMS key behind a login month's data keys.
//! - [`token`]: deterministic per-field tokens.
//! - [`seal`]: authenticated encryption bound to a value's place.
//! - [`place`]: the places values are sealed for (a login's fields, a quarantined body).
//! - [`handed_out`]: sealed values as the doors hand them out, opened at their place and checked
//!   against their token (the key commitment), with typed integrity errors.
//!
//! Plaintext keys exist only as [`SecretKey`] (boxed, zeroized on drop, redacted in `Debug`).

pub mod erasure;
pub mod handed_out;
pub mod key_cache;
pub mod key_table;
pub mod keyring;
pub mod kms;
pub mod place;
pub mod retention;
pub mod seal;
pub mod token;

// A key's purpose is in every KMS encryption context: it belongs to the vault's surface, not
// only to the key table's.
pub use key_table::Purpose;

use std::collections::HashMap;
use std::fmt;

use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};
use zeroize::Zeroize;

/// Length of every symmetric key pii-vault handles.
pub const KEY_LEN: usize = 32;

/// A 256-bit plaintext key: heap-allocated once, zeroized on drop, never printed.
pub struct SecretKey(SecretBox<[u8; KEY_LEN]>);

impl SecretKey {
    /// Copies `bytes` into a fresh secret and wipes the source, so the caller's buffer (for
    /// example a KMS response) does not outlive the copy.
    pub fn take_from(bytes: &mut [u8]) -> Result<Self, InvalidKeyLength> {
        let result = if bytes.len() == KEY_LEN {
            let mut key = SecretBox::new(Box::new([0u8; KEY_LEN]));
            key.expose_secret_mut().copy_from_slice(bytes);
            Ok(Self(key))
        } else {
            Err(InvalidKeyLength(bytes.len()))
        };
        bytes.zeroize();
        result
    }

    pub(crate) fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a key must be {KEY_LEN} bytes, got {0}")]
pub struct InvalidKeyLength(pub usize);

/// The primary key of a row in `vault_keys`; doubles as the key's version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct KeyId(pub i64);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The KMS encryption context of a wrapped key: its purpose and its id. KMS authenticates it, so
/// a wrapped key copied onto another row (another id or purpose) no longer unwraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncryptionContext {
    pub purpose: Purpose,
    pub key_id: KeyId,
}

impl EncryptionContext {
    pub const PURPOSE: &'static str = "purpose";
    pub const KEY_ID: &'static str = "key_id";

    pub fn to_map(self) -> HashMap<String, String> {
        HashMap::from([
            (Self::PURPOSE.to_owned(), self.purpose.as_str().to_owned()),
            (Self::KEY_ID.to_owned(), self.key_id.to_string()),
        ])
    }
}

/// A key as KMS wrapped it: safe to store, useless without KMS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub ciphertext: Vec<u8>,
    /// The ARN of the KMS key that wrapped it (KMS reports it; we store it for `rewrap`).
    pub kms_key_id: String,
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A key whose bytes are all `byte`: enough to tell keys apart in unit tests.
    pub fn key(byte: u8) -> SecretKey {
        SecretKey::take_from(&mut [byte; KEY_LEN]).unwrap()
    }

    /// A key given in hex, as the format vectors write keys.
    pub fn key_from_hex(hex: &str) -> SecretKey {
        SecretKey::take_from(&mut unhex(hex)).unwrap()
    }

    /// One file of `tests/data/vectors/`: golden vectors written by `scripts/format-vectors.py`
    /// (an implementation of `docs/FORMAT.md` that shares no code with this crate), or fixtures
    /// written once by an earlier version of this crate.
    pub fn vectors(name: &str) -> serde_json::Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/vectors")
            .join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
    }

    /// The string at `field` of a vector (panics, naming the field, if it is not one).
    pub fn text<'v>(vector: &'v serde_json::Value, field: &str) -> &'v str {
        vector[field]
            .as_str()
            .unwrap_or_else(|| panic!("vector field `{field}` is not a string: {vector}"))
    }

    /// The integer at `field` of a vector.
    pub fn int(vector: &serde_json::Value, field: &str) -> i64 {
        vector[field]
            .as_i64()
            .unwrap_or_else(|| panic!("vector field `{field}` is not an i64: {vector}"))
    }

    /// The bytes written in hex at `field` of a vector.
    pub fn bytes(vector: &serde_json::Value, field: &str) -> Vec<u8> {
        unhex(text(vector, field))
    }

    pub fn unhex(text: &str) -> Vec<u8> {
        hex::decode(text).unwrap_or_else(|e| panic!("{text:?} is not hex: {e}"))
    }

    pub fn hex(bytes: &[u8]) -> String {
        hex::encode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_from_wipes_the_source_and_checks_length() {
        let mut source = [7u8; KEY_LEN];
        let key = SecretKey::take_from(&mut source).unwrap();
        assert_eq!(source, [0u8; KEY_LEN]);
        assert_eq!(key.expose(), &[7u8; KEY_LEN]);
        let mut short = [7u8; 16];
        assert_eq!(
            SecretKey::take_from(&mut short).unwrap_err(),
            InvalidKeyLength(16)
        );
        assert_eq!(short, [0u8; 16]);
    }

    #[test]
    fn debug_of_a_key_is_redacted() {
        let printed = format!("{:?}", testing::key(0xab));
        assert_eq!(printed, "SecretKey(<redacted>)");
    }

    #[test]
    fn encryption_context_names_purpose_and_id() {
        let map = EncryptionContext {
            purpose: Purpose::Data,
            key_id: KeyId(42),
        }
        .to_map();
        assert_eq!(map["purpose"], "data");
        assert_eq!(map["key_id"], "42");
        assert_eq!(map.len(), 2);
    }

    /// docs/FORMAT.md §2: the context is exactly `{"purpose": ..., "key_id": <decimal text>}`.
    #[test]
    fn encryption_contexts_match_the_format_vectors() {
        let vectors = testing::vectors("kms.json");
        let contexts = vectors["contexts"].as_array().unwrap();
        for case in contexts {
            let purpose = testing::text(case, "purpose");
            let purpose =
                Purpose::parse(purpose).unwrap_or_else(|| panic!("unknown purpose {purpose}"));
            let map = EncryptionContext {
                purpose,
                key_id: KeyId(testing::int(case, "key_id")),
            }
            .to_map();
            let expected: HashMap<String, String> =
                serde_json::from_value(case["encryption_context"].clone()).unwrap();
            assert_eq!(map, expected, "{case}");
        }
        assert_eq!(contexts.len(), 4);
    }
}
