//! Deterministic tokens: equal values give equal tokens, so analysts can count duplicates
//! without seeing the values.
//!
//! `token = hex(HMAC-SHA256(field_key, canonical value))`, where each field has its own key,
//! `field_key = HKDF-SHA256(salt = none, ikm = token key, info = "pii-vault/token/v1/<field>",
//! L = 32)` (docs/FORMAT.md §3, pinned by `tests/data/vectors/tokens.json`). Separate keys
//! (rather than a field prefix inside the MAC input) mean an ip and a device id with the same
//! text never share a token, and a leak of one field's key does not expose the other.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::place::erased_user_place;
use super::seal::{OpenError, SealFormat, Sealer};
use super::{KEY_LEN, KeyId, SecretKey};
use crate::event::{canonical_device_id, canonical_ip};

type HmacSha256 = Hmac<Sha256>;

/// Length of a token in hex characters.
pub const TOKEN_LEN: usize = 64;

/// A personal field that is tokenized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Ip,
    DeviceId,
}

impl Field {
    pub fn name(self) -> &'static str {
        match self {
            Field::Ip => "ip",
            Field::DeviceId => "device_id",
        }
    }

    fn hkdf_info(self) -> &'static [u8] {
        match self {
            Field::Ip => b"pii-vault/token/v1/ip",
            Field::DeviceId => b"pii-vault/token/v1/device_id",
        }
    }
}

/// A token: 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token([u8; TOKEN_LEN]);

impl Token {
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written into a token.
        std::str::from_utf8(&self.0).expect("hex is ASCII")
    }

    /// Compares with a stored token in constant time (the token is the key commitment that
    /// `unmask` checks after opening a value).
    pub fn matches(&self, stored: &str) -> bool {
        stored.len() == TOKEN_LEN && bool::from(self.0.ct_eq(stored.as_bytes()))
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// A token is a stable pseudonym, personal data in its own right: Debug output (logs, panics)
// shows only that one is there. Display writes it, for the rows that store it.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Computes tokens under one version of the token key.
///
/// Holds HMAC states already keyed per field, so a token costs two SHA-256 compressions instead
/// of four. (Those states are derived from the key but are not the key; the key itself and the
/// derived field keys are wiped as soon as the states exist.)
#[derive(Clone)]
pub struct Tokenizer {
    key_id: KeyId,
    ip: HmacSha256,
    device_id: HmacSha256,
    user_id: HmacSha256,
    /// Seals an erased user's id in their erasure record, so that a rotation can carry the
    /// record to the next token key (docs/FORMAT.md §9).
    erased_user: Arc<Sealer>,
}

/// HKDF info of the key behind user-id tokens: those name an erased user in `erasures` and
/// a quarantined body's user, never a column analysts see.
const USER_ID_INFO: &[u8] = b"pii-vault/token/v1/user_id";

/// HKDF info of the key that seals erased users' ids in their erasure records.
const ERASED_USER_INFO: &[u8] = b"pii-vault/erasure/v1/user_id";

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    pub fn new(key_id: KeyId, token_key: &SecretKey) -> Self {
        let hkdf = token_key_hkdf(token_key.expose());
        let keyed = |info: &[u8]| {
            let field_key = field_key(&hkdf, info);
            HmacSha256::new_from_slice(field_key.as_ref()).expect("HMAC takes any key length")
        };
        let mut sealing_key = field_key(&hkdf, ERASED_USER_INFO);
        let sealing_key =
            SecretKey::take_from(sealing_key.as_mut()).expect("HKDF gave a 32-byte key");
        Self {
            key_id,
            ip: keyed(Field::Ip.hkdf_info()),
            device_id: keyed(Field::DeviceId.hkdf_info()),
            user_id: keyed(USER_ID_INFO),
            erased_user: Arc::new(Sealer::new(key_id, &sealing_key, SealFormat::V2)),
        }
    }

    /// The version of the token key these tokens are made with (stored with every row).
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    pub fn ip(&self, ip: IpAddr) -> Token {
        // Longest canonical text: a full IPv6 address, 39 characters.
        let mut text = [0u8; 64];
        let len = {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut text[..]);
            write!(cursor, "{}", canonical_ip(ip)).expect("an ip fits in 64 bytes");
            cursor.position() as usize
        };
        mac(&self.ip, &text[..len])
    }

    pub fn device_id(&self, device_id: &str) -> Token {
        mac(&self.device_id, canonical_device_id(device_id).as_bytes())
    }

    /// The token of a user id, exactly as received (no canonical form: user ids are opaque).
    pub fn user_id(&self, user_id: &str) -> Token {
        mac(&self.user_id, user_id.as_bytes())
    }

    /// An erased user's erasure record under this key: the token of their id, and the id
    /// sealed at a place bound to that token.
    pub fn erased_user(&self, user_id: &str) -> (Token, Vec<u8>) {
        let token = self.user_id(user_id);
        let sealed = self
            .erased_user
            .seal(&erased_user_place(token.as_str()), user_id.as_bytes());
        (token, sealed)
    }

    /// Opens the user id of an erasure record made by [`Tokenizer::erased_user`] under this
    /// key, and checks that it is the one its token names.
    pub fn open_erased_user(&self, token: &str, sealed: &[u8]) -> Result<String, OpenError> {
        let opened = self.erased_user.open(&erased_user_place(token), sealed)?;
        let user_id = String::from_utf8(opened.to_vec()).map_err(|_| OpenError)?;
        if self.user_id(&user_id).matches(token) {
            Ok(user_id)
        } else {
            Err(OpenError)
        }
    }

    /// The token of a field given its original text, as `unmask` recomputes it. `None` if an ip
    /// does not parse (it always does for stored values, which were validated).
    pub fn token_of(&self, field: Field, original: &str) -> Option<Token> {
        match field {
            Field::Ip => original.parse().ok().map(|ip| self.ip(ip)),
            Field::DeviceId => Some(self.device_id(original)),
        }
    }
}

/// HKDF-SHA256 extracted from the token key with no salt (RFC 5869: a salt of HashLen zero
/// bytes).
fn token_key_hkdf(token_key: &[u8]) -> Hkdf<Sha256> {
    Hkdf::<Sha256>::new(None, token_key)
}

/// A field's HMAC key: 32 bytes expanded with the field's info string.
fn field_key(hkdf: &Hkdf<Sha256>, info: &[u8]) -> Zeroizing<[u8; KEY_LEN]> {
    let mut field_key = Zeroizing::new([0u8; KEY_LEN]);
    hkdf.expand(info, field_key.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    field_key
}

fn mac(keyed: &HmacSha256, message: &[u8]) -> Token {
    let mut mac = keyed.clone();
    mac.update(message);
    let digest = mac.finalize().into_bytes();
    let mut token = [0u8; TOKEN_LEN];
    hex::encode_to_slice(digest, &mut token).expect("a 32-byte MAC is 64 hex digits");
    Token(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{canonical_device_id, canonical_ip};
    use crate::vault::testing::{self, bytes, hex, int, key, key_from_hex, text, unhex};
    use sha2::Digest;

    fn tokenizer(byte: u8) -> Tokenizer {
        Tokenizer::new(KeyId(1), &key(byte))
    }

    #[test]
    fn equal_values_give_equal_tokens_across_instances() {
        let a = tokenizer(1);
        let b = tokenizer(1);
        assert_eq!(a.device_id("593-47-5928"), b.device_id("593-47-5928"));
        assert_eq!(
            a.ip("10.0.0.1".parse().unwrap()),
            b.ip("10.0.0.1".parse().unwrap())
        );
        assert_ne!(a.device_id("593-47-5928"), a.device_id("593-47-5929"));
    }

    #[test]
    fn tokens_are_lowercase_hex_of_64_characters() {
        let token = tokenizer(1).device_id("x");
        assert_eq!(token.as_str().len(), 64);
        assert!(
            token
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn canonical_forms_share_a_token() {
        let t = tokenizer(1);
        assert_eq!(t.device_id(" 593-47-5928\t"), t.device_id("593-47-5928"));
        let v6 = |s: &str| t.ip(s.parse().unwrap());
        assert_eq!(v6("2001:DB8:0:0:0:0:0:1"), v6("2001:db8::1"));
        assert_eq!(v6("::ffff:10.0.0.1"), v6("10.0.0.1"));
    }

    #[test]
    fn fields_are_domain_separated() {
        // "1.2.3.4" is a valid ip and a possible device id: the tokens must still differ.
        let t = tokenizer(1);
        assert_ne!(t.ip("1.2.3.4".parse().unwrap()), t.device_id("1.2.3.4"));
    }

    #[test]
    fn different_keys_give_different_tokens() {
        assert_ne!(tokenizer(1).device_id("x"), tokenizer(2).device_id("x"));
    }

    #[test]
    fn a_token_is_not_the_plain_sha256_of_the_value() {
        let value = "593-47-5928";
        let plain = sha2::Sha256::digest(value.as_bytes());
        let mut plain_hex = [0u8; 64];
        hex::encode_to_slice(plain, &mut plain_hex).unwrap();
        assert_ne!(tokenizer(1).device_id(value).0, plain_hex);
    }

    #[test]
    fn matches_compares_exactly() {
        let t = tokenizer(1).device_id("x");
        assert!(t.matches(t.as_str()));
        let mut other = t.as_str().to_owned();
        other.replace_range(0..1, if other.starts_with('0') { "1" } else { "0" });
        assert!(!t.matches(&other));
        assert!(!t.matches(&t.as_str()[..63]));
    }

    #[test]
    fn token_of_recomputes_from_the_original_text() {
        let t = tokenizer(3);
        assert_eq!(
            t.token_of(Field::Ip, "10.0.0.1"),
            Some(t.ip("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(t.token_of(Field::DeviceId, "d"), Some(t.device_id("d")));
        assert_eq!(t.token_of(Field::Ip, "not an ip"), None);
    }

    /// RFC 4231 test cases 1, 2, 3, 4, 6 and 7 (case 5 truncates the output): the HMAC-SHA256
    /// the tokens are built on.
    #[test]
    fn an_erased_user_opens_under_its_key_and_token_only() {
        let (a, b) = (tokenizer(1), tokenizer(2));
        let (token, sealed) = a.erased_user("u-1");
        assert_eq!(token, a.user_id("u-1"));
        assert_eq!(a.open_erased_user(token.as_str(), &sealed).unwrap(), "u-1");
        assert!(!sealed.windows(3).any(|w| w == b"u-1"), "the id is sealed");
        assert_eq!(b.open_erased_user(token.as_str(), &sealed), Err(OpenError));
        let other = a.user_id("u-2");
        assert_eq!(
            a.open_erased_user(other.as_str(), &sealed),
            Err(OpenError),
            "a sealed id moved to another record does not open"
        );
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(a.open_erased_user(token.as_str(), &altered), Err(OpenError));
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        let cases: [(Vec<u8>, Vec<u8>, &str); 6] = [
            (
                vec![0x0b; 20],
                b"Hi There".to_vec(),
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?".to_vec(),
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                vec![0xaa; 20],
                vec![0xdd; 50],
                "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
            ),
            (
                (1u8..=25).collect(),
                vec![0xcd; 50],
                "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
            ),
            (
                vec![0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
            (
                vec![0xaa; 131],
                b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.".to_vec(),
                "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
            ),
        ];
        for (key, data, expected) in cases {
            let keyed = HmacSha256::new_from_slice(&key).unwrap();
            assert_eq!(mac(&keyed, &data).as_str(), expected);
        }
    }

    /// docs/FORMAT.md §3, against `tests/data/vectors/tokens.json` (made by
    /// `scripts/format-vectors.py`): the salt-less extract and each field's key.
    #[test]
    fn field_keys_match_the_format_vectors() {
        let vectors = testing::vectors("tokens.json");
        let hkdf_vectors = &vectors["hkdf"];
        let token_key = bytes(&vectors, "token_key");
        let (prk, _) = Hkdf::<Sha256>::extract(None, &token_key);
        assert_eq!(hex(&prk), text(hkdf_vectors, "prk"));
        assert_eq!(int(hkdf_vectors, "length"), KEY_LEN as i64);
        let hkdf = token_key_hkdf(&token_key);
        for case in hkdf_vectors["fields"].as_array().unwrap() {
            let field = match text(case, "field") {
                "ip" => Field::Ip,
                "device_id" => Field::DeviceId,
                other => panic!("unknown field {other}"),
            };
            assert_eq!(field.hkdf_info(), text(case, "info").as_bytes());
            assert_eq!(field.hkdf_info(), bytes(case, "info_hex"));
            assert_eq!(
                hex(field_key(&hkdf, field.hkdf_info()).as_ref()),
                text(case, "field_key")
            );
        }
    }

    /// docs/FORMAT.md §3: tokens through [`Tokenizer::new`] for the vectors' key, the canonical
    /// text of each input, and the ip texts the parser refuses.
    #[test]
    fn tokens_match_the_format_vectors() {
        let vectors = testing::vectors("tokens.json");
        let tokenizer = Tokenizer::new(
            KeyId(int(&vectors, "token_key_id")),
            &key_from_hex(text(&vectors, "token_key")),
        );
        let cases = vectors["cases"].as_array().unwrap();
        for case in cases {
            let input = text(case, "input");
            assert_eq!(input.as_bytes(), bytes(case, "input_utf8_hex"));
            let expected = text(case, "token");
            let (canonical, token) = match text(case, "field") {
                "ip" => {
                    let ip: IpAddr = input.parse().unwrap();
                    assert_eq!(tokenizer.token_of(Field::Ip, input), Some(tokenizer.ip(ip)));
                    (canonical_ip(ip).to_string(), tokenizer.ip(ip))
                }
                "device_id" => {
                    let token = tokenizer.device_id(input);
                    assert_eq!(tokenizer.token_of(Field::DeviceId, input), Some(token));
                    (canonical_device_id(input).to_owned(), token)
                }
                other => panic!("unknown field {other}"),
            };
            assert_eq!(canonical, text(case, "canonical"), "{input:?}");
            assert_eq!(token.as_str(), expected, "{input:?}");
            assert!(token.matches(expected));
        }
        assert_eq!(cases.len(), 30);
        for rejected in vectors["ip_rejected"].as_array().unwrap() {
            let rejected = rejected.as_str().unwrap();
            assert_eq!(
                tokenizer.token_of(Field::Ip, rejected),
                None,
                "{rejected:?}"
            );
        }
    }

    /// RFC 5869 appendix A, test cases 1 to 3 (HKDF-SHA256), through the `hkdf` crate's
    /// `Hkdf<Sha256>` as the Tokenizer uses it. Case 3 has no salt, like the token key: it goes
    /// through the Tokenizer's own extract, and shows that no salt, an empty salt and 32 zero
    /// bytes are one and the same.
    #[test]
    fn hkdf_sha256_matches_rfc_5869() {
        type Case = (Vec<u8>, Vec<u8>, Vec<u8>, &'static str, &'static str);
        // (ikm, salt, info, prk, okm)
        let cases: [Case; 3] = [
            (
                vec![0x0b; 22],
                (0x00..=0x0c).collect(),
                (0xf0..=0xf9).collect(),
                "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
                "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf\
                 34007208d5b887185865",
            ),
            (
                (0x00..=0x4f).collect(),
                (0x60..=0xaf).collect(),
                (0xb0..=0xff).collect(),
                "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
                "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c\
                 59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71\
                 cc30c58179ec3e87c14c01d5c1f3434f1d87",
            ),
            (
                vec![0x0b; 22],
                Vec::new(),
                Vec::new(),
                "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
                "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d\
                 9d201395faa4b61a96c8",
            ),
        ];
        for (ikm, salt, info, prk, okm) in cases {
            let expected = unhex(okm);
            let (extracted, hkdf) = Hkdf::<Sha256>::extract(Some(&salt), &ikm);
            assert_eq!(hex(&extracted), prk);
            let mut out = vec![0u8; expected.len()];
            hkdf.expand(&info, &mut out).unwrap();
            assert_eq!(out, expected);
            if salt.is_empty() {
                let mut unsalted = vec![0u8; expected.len()];
                token_key_hkdf(&ikm).expand(&info, &mut unsalted).unwrap();
                assert_eq!(unsalted, expected);
                let (zeros, _) = Hkdf::<Sha256>::extract(Some(&[0u8; 32]), &ikm);
                assert_eq!(hex(&zeros), prk);
            }
        }
    }
}
