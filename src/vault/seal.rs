//! Sealing: AES-256-GCM-SIV under a data key, bound to the value's place.
//!
//! Two formats, chosen by the data key (`vault_keys.format`, [`SealFormat`]):
//! - **Format 2** (every key made since migration 0011): `commitment (32 bytes) || nonce (12) ||
//!   ciphertext || tag (16)`. HKDF-SHA256 derives from the data key the key that seals and a
//!   key commitment every value carries; a value opens only under the one key whose commitment
//!   it carries (finding two keys with one commitment is a SHA-256 collision). So opening needs
//!   no token key, and a compliance officer never holds one.
//! - **Format 1**: `nonce || ciphertext || tag` under the data key itself. AES-GCM-SIV is not
//!   key-committing; the value's token was its commitment ([`super::handed_out`]). Such values
//!   still open, and a data-key rotation moves them to format 2.
//!
//! The nonce is random, from a userspace CSPRNG seeded by the OS. GCM-SIV stays safe even if one
//! ever repeats (it then only reveals that two plaintexts at the same place were equal), and
//! RFC 8452 allows 2^32 random-nonce messages per key, far above how long a data key lives.
//!
//! The associated data names the place the ciphertext belongs to ([`Place`]), encoded
//! canonically: each part as a big-endian u32 length followed by its bytes, so no two different
//! places encode alike (`"a|b" + "c"` differs from `"a" + "b|c"`). A ciphertext copied to another
//! row, user, field or key id then fails to open instead of revealing the wrong person's data.
//! Its first part names the format, so a value never opens as the other format.
//!
//! Byte for byte: docs/FORMAT.md §4, pinned by `tests/data/vectors/seal.json` (format 1),
//! `seal-v2.json` (format 2) and by values sealed by earlier versions (`fixture-sealed-*.json`).

use std::fmt;

use aes_gcm_siv::aead::{AeadInPlace, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{KEY_LEN, KeyId, SecretKey};

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes of a format 2 value's key commitment.
pub const COMMITMENT_LEN: usize = 32;
/// Bytes a format 1 sealed value adds to its plaintext.
pub const OVERHEAD_V1: usize = NONCE_LEN + TAG_LEN;
/// Bytes a sealed value of the current format adds to its plaintext.
pub const OVERHEAD: usize = COMMITMENT_LEN + NONCE_LEN + TAG_LEN;

/// The sealing format a data key serves, as `vault_keys.format` stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SealFormat {
    /// The data key seals directly; the value's token is its key commitment.
    V1,
    /// Derived seal key, and a key commitment in every value.
    V2,
}

impl SealFormat {
    /// The format new data keys are made in.
    pub const CURRENT: SealFormat = SealFormat::V2;

    pub fn stored(self) -> i16 {
        match self {
            SealFormat::V1 => 1,
            SealFormat::V2 => 2,
        }
    }

    pub fn from_stored(format: i16) -> Result<Self, UnknownFormat> {
        match format {
            1 => Ok(SealFormat::V1),
            2 => Ok(SealFormat::V2),
            other => Err(UnknownFormat(other)),
        }
    }

    /// Whether a value carries its own key commitment (else its token must be checked).
    pub fn is_key_committing(self) -> bool {
        self == SealFormat::V2
    }

    fn ad_version(self) -> &'static [u8] {
        match self {
            SealFormat::V1 => b"pii-vault/seal/v1",
            SealFormat::V2 => b"pii-vault/seal/v2",
        }
    }
}

/// A key row names a format this version does not know (a newer pii-vault wrote it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sealing format {0} is unknown to this version of pii-vault")]
pub struct UnknownFormat(pub i16);

/// Where a sealed value lives: every part goes into the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place<'a> {
    /// The table whose row the value belongs to (`user_logins` or `quarantine`).
    pub table: &'a str,
    /// The field (`ip`, `device_id`, or `body` for a quarantined message).
    pub field: &'a str,
    /// The message id of the row: unique per row.
    pub message_id: &'a str,
    /// The user the value belongs to (empty for a quarantined body, whose user is unknown).
    pub user_id: &'a str,
}

/// Seals and opens under one data key.
pub struct Sealer {
    key_id: KeyId,
    format: SealFormat,
    cipher: Aes256GcmSiv,
    /// Format 2: what every value of this key starts with. Not secret.
    commitment: Option<[u8; COMMITMENT_LEN]>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.key_id)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Opening failed: wrong key, wrong place, or altered bytes. Deliberately says no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sealed value failed authentication (altered, moved, or under another key)")]
pub struct OpenError;

impl Sealer {
    pub fn new(key_id: KeyId, data_key: &SecretKey, format: SealFormat) -> Self {
        match format {
            SealFormat::V1 => Self {
                key_id,
                format,
                cipher: Aes256GcmSiv::new(data_key.expose().into()),
                commitment: None,
            },
            SealFormat::V2 => {
                let derived = Hkdf::<Sha256>::new(None, data_key.expose());
                let mut seal_key = Zeroizing::new([0u8; KEY_LEN]);
                let mut commitment = [0u8; COMMITMENT_LEN];
                derived
                    .expand(SEAL_KEY_INFO_V2, seal_key.as_mut_slice())
                    .and_then(|()| derived.expand(COMMITMENT_INFO_V2, &mut commitment))
                    .expect("32 bytes are far below HKDF-SHA256's output limit");
                Self {
                    key_id,
                    format,
                    cipher: Aes256GcmSiv::new((&*seal_key).into()),
                    commitment: Some(commitment),
                }
            }
        }
    }

    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    pub fn format(&self) -> SealFormat {
        self.format
    }

    pub fn seal(&self, place: &Place<'_>, plaintext: &[u8]) -> Vec<u8> {
        // The thread's ChaCha12 generator, seeded and periodically reseeded from the OS: a
        // nonce need only be unpredictable and unlikely to repeat, not a system call each.
        let mut nonce = Nonce::default();
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        self.seal_with_nonce(&nonce, place, plaintext)
    }

    /// The path of every sealed value; [`Sealer::seal`] gives it a fresh random nonce, and only
    /// the known-answer tests give it a fixed one.
    fn seal_with_nonce(&self, nonce: &Nonce, place: &Place<'_>, plaintext: &[u8]) -> Vec<u8> {
        let associated_data = associated_data(self.format, place, self.key_id);
        self.seal_framed(nonce, &associated_data, plaintext)
    }

    /// `[commitment ||] nonce || ciphertext || tag` under raw associated data (RFC 8452
    /// vectors enter here, with a format 1 sealer).
    fn seal_framed(&self, nonce: &Nonce, associated_data: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let commitment = self.commitment.as_ref().map_or(&[][..], |c| &c[..]);
        let mut sealed = Vec::with_capacity(commitment.len() + plaintext.len() + OVERHEAD_V1);
        sealed.extend_from_slice(commitment);
        sealed.extend_from_slice(nonce);
        sealed.extend_from_slice(plaintext);
        let start = commitment.len() + NONCE_LEN;
        let tag = self
            .cipher
            .encrypt_in_place_detached(nonce, associated_data, &mut sealed[start..])
            .expect("plaintext is far below the AES-GCM-SIV length limit");
        sealed.extend_from_slice(&tag);
        sealed
    }

    /// Opens a sealed value. On failure nothing of the plaintext survives: the working buffer
    /// is zeroized on drop.
    pub fn open(&self, place: &Place<'_>, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        self.open_framed(&associated_data(self.format, place, self.key_id), sealed)
    }

    /// Opens `nonce || ciphertext || tag` under raw associated data.
    fn open_framed(
        &self,
        associated_data: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let sealed = match &self.commitment {
            None => sealed,
            Some(commitment) => {
                // Checked first, in constant time: under another key the value is refused
                // before the cipher runs.
                let (carried, rest) = sealed.split_at_checked(COMMITMENT_LEN).ok_or(OpenError)?;
                if !bool::from(carried.ct_eq(commitment)) {
                    return Err(OpenError);
                }
                rest
            }
        };
        if sealed.len() < OVERHEAD_V1 {
            return Err(OpenError);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut plaintext = Zeroizing::new(ciphertext.to_vec());
        self.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                associated_data,
                plaintext.as_mut_slice(),
                Tag::from_slice(tag),
            )
            .map_err(|_| OpenError)?;
        Ok(plaintext)
    }
}

const SEAL_KEY_INFO_V2: &[u8] = b"pii-vault/seal/v2/key";
const COMMITMENT_INFO_V2: &[u8] = b"pii-vault/seal/v2/commitment";

/// The canonical associated data of a place under a key, in a format.
pub fn associated_data(format: SealFormat, place: &Place<'_>, key_id: KeyId) -> Vec<u8> {
    let key_id = key_id.0.to_be_bytes();
    let parts: [&[u8]; 6] = [
        format.ad_version(),
        place.table.as_bytes(),
        place.field.as_bytes(),
        place.message_id.as_bytes(),
        place.user_id.as_bytes(),
        &key_id,
    ];
    let mut ad = Vec::with_capacity(parts.iter().map(|p| 4 + p.len()).sum());
    for part in parts {
        let len = u32::try_from(part.len()).expect("parts are bounded by the 256 KiB body limit");
        ad.extend_from_slice(&len.to_be_bytes());
        ad.extend_from_slice(part);
    }
    ad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::testing::{self, bytes, int, key, key_from_hex, text, unhex};

    const PLACE: Place<'static> = Place {
        table: "user_logins",
        field: "ip",
        message_id: "m-1",
        user_id: "u-1",
    };

    const FORMATS: [SealFormat; 2] = [SealFormat::V1, SealFormat::V2];

    fn sealer(format: SealFormat, byte: u8, id: i64) -> Sealer {
        Sealer::new(KeyId(id), &key(byte), format)
    }

    fn overhead(format: SealFormat) -> usize {
        match format {
            SealFormat::V1 => OVERHEAD_V1,
            SealFormat::V2 => OVERHEAD,
        }
    }

    #[test]
    fn round_trip() {
        for format in FORMATS {
            let s = sealer(format, 1, 1);
            let sealed = s.seal(&PLACE, b"10.0.0.1");
            assert_eq!(sealed.len(), 8 + overhead(format));
            assert_eq!(s.open(&PLACE, &sealed).unwrap().as_slice(), b"10.0.0.1");
        }
        assert_eq!(SealFormat::CURRENT, SealFormat::V2);
        for stored in [1, 2] {
            assert_eq!(SealFormat::from_stored(stored).unwrap().stored(), stored);
        }
        assert_eq!(SealFormat::from_stored(3), Err(UnknownFormat(3)));
    }

    #[test]
    fn nonces_are_fresh_so_equal_plaintexts_seal_differently() {
        for format in FORMATS {
            let s = sealer(format, 1, 1);
            assert_ne!(s.seal(&PLACE, b"x"), s.seal(&PLACE, b"x"));
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        for format in FORMATS {
            let s = sealer(format, 1, 1);
            let sealed = s.seal(&PLACE, b"593-47-5928");
            for bit in 0..sealed.len() * 8 {
                let mut tampered = sealed.clone();
                tampered[bit / 8] ^= 1 << (bit % 8);
                assert_eq!(
                    s.open(&PLACE, &tampered),
                    Err(OpenError),
                    "{format:?} bit {bit}"
                );
            }
            let shortest = overhead(format);
            assert_eq!(s.open(&PLACE, &sealed[..shortest - 1]), Err(OpenError));
            assert_eq!(s.open(&PLACE, &[]), Err(OpenError));
        }
    }

    /// Format 2's promise: a value opens under exactly the key whose commitment it carries,
    /// and a value of one format never opens as the other (the formats name themselves in the
    /// associated data, and format 2 seals under a derived key).
    #[test]
    fn a_value_commits_to_its_key_and_format() {
        let v2 = sealer(SealFormat::V2, 1, 1);
        let sealed = v2.seal(&PLACE, b"10.0.0.1");
        assert_eq!(&sealed[..COMMITMENT_LEN], v2.commitment.as_ref().unwrap());
        assert_ne!(v2.commitment, sealer(SealFormat::V2, 2, 1).commitment);
        assert_eq!(
            v2.commitment,
            sealer(SealFormat::V2, 1, 9).commitment,
            "the commitment is the key's, whatever its id"
        );

        let v1 = sealer(SealFormat::V1, 1, 1);
        assert_eq!(v1.open(&PLACE, &sealed[COMMITMENT_LEN..]), Err(OpenError));
        assert_eq!(v1.open(&PLACE, &sealed), Err(OpenError));
        let old = v1.seal(&PLACE, b"10.0.0.1");
        let dressed_up = [&v2.commitment.unwrap()[..], &old].concat();
        assert_eq!(v2.open(&PLACE, &dressed_up), Err(OpenError));
        assert_eq!(v2.open(&PLACE, &old), Err(OpenError));
    }

    #[test]
    fn a_value_moved_to_another_place_does_not_open() {
        for format in FORMATS {
            a_value_moved_elsewhere_does_not_open(format);
        }
    }

    fn a_value_moved_elsewhere_does_not_open(format: SealFormat) {
        let s = sealer(format, 1, 1);
        let sealed = s.seal(&PLACE, b"10.0.0.1");
        let elsewhere = [
            Place {
                field: "device_id",
                ..PLACE
            },
            Place {
                user_id: "u-2",
                ..PLACE
            },
            Place {
                message_id: "m-2",
                ..PLACE
            },
            Place {
                table: "quarantine",
                ..PLACE
            },
        ];
        for place in elsewhere {
            assert_eq!(s.open(&place, &sealed), Err(OpenError), "{place:?}");
        }
    }

    #[test]
    fn a_value_under_another_key_or_key_id_does_not_open() {
        for format in FORMATS {
            let sealed = sealer(format, 1, 1).seal(&PLACE, b"10.0.0.1");
            assert_eq!(sealer(format, 2, 1).open(&PLACE, &sealed), Err(OpenError));
            assert_eq!(sealer(format, 1, 2).open(&PLACE, &sealed), Err(OpenError));
        }
    }

    #[test]
    fn associated_data_is_unambiguous() {
        // (message_id, user_id) of two places each, whose fields would run together alike if
        // they were joined with a separator or with nothing.
        let look_alikes = [(("a|b", "c"), ("a", "b|c")), (("ab", ""), ("a", "b"))];
        let place = |(message_id, user_id)| Place {
            message_id,
            user_id,
            ..PLACE
        };
        for (a, b) in look_alikes {
            for format in FORMATS {
                assert_ne!(
                    associated_data(format, &place(a), KeyId(1)),
                    associated_data(format, &place(b), KeyId(1)),
                    "{a:?} and {b:?}"
                );
            }
        }
        assert_ne!(
            associated_data(SealFormat::V1, &PLACE, KeyId(1)),
            associated_data(SealFormat::V2, &PLACE, KeyId(1))
        );
    }

    /// RFC 8452 appendix C.2 (AEAD_AES_256_GCM_SIV): a selection covering empty input, AAD, and
    /// lengths that are not a multiple of the block size, written out here from the RFC (all of
    /// appendix C also runs through the Sealer in `every_wycheproof_aes_gcm_siv_vector_...`).
    /// Each goes through the cipher type the Sealer holds, and through the Sealer's own framing
    /// (`nonce || ciphertext || tag`) with the RFC's associated data in place of a place's.
    #[test]
    fn aes_256_gcm_siv_matches_rfc_8452() {
        let one = "0100000000000000000000000000000000000000000000000000000000000000";
        let three = "030000000000000000000000";
        // (key, nonce, plaintext, aad, ciphertext || tag)
        let cases = [
            (one, three, "", "", "07f5f4169bbf55a8400cd47ea6fd400f"),
            (
                one,
                three,
                "0100000000000000",
                "",
                "c2ef328e5c71c83b843122130f7364b761e0b97427e3df28",
            ),
            (
                one,
                three,
                "01000000000000000000000000000000",
                "",
                "85a01b63025ba19b7fd3ddfc033b3e76c9eac6fa700942702e90862383c6c366",
            ),
            (
                one,
                three,
                "0200000000000000",
                "01",
                "1de22967237a813291213f267e3b452f02d01ae33e4ec854",
            ),
            (
                one,
                three,
                "02000000",
                "010000000000000000000000",
                "22b3f4cd1835e517741dfddccfa07fa4661b74cf",
            ),
            (
                one,
                three,
                "0300000000000000000000000000000004000000",
                "010000000000000000000000000000000200",
                "43dd0163cdb48f9fe3212bf61b201976067f342bb879ad976d8242acc188ab59cabfe307",
            ),
            (
                "e66021d5eb8e4f4066d4adb9c33560e4f46e44bb3da0015c94f7088736864200",
                "e0eaf5284d884a0e77d31646",
                "",
                "",
                "169fbb2fbf389a995f6390af22228a62",
            ),
            (
                "bae8e37fc83441b16034566b7a806c46bb91c3c5aedb64a6c590bc84d1a5e269",
                "e4b47801afc0577e34699b9e",
                "671fdd",
                "4fbdc66f14",
                "0eaccb93da9bb81333aee0c785b240d319719d",
            ),
        ];
        for (key, nonce, plaintext, aad, expected) in cases {
            let cipher = Aes256GcmSiv::new_from_slice(&unhex(key)).unwrap();
            let nonce = unhex(nonce);
            let mut buffer = unhex(plaintext);
            let tag = cipher
                .encrypt_in_place_detached(Nonce::from_slice(&nonce), &unhex(aad), &mut buffer)
                .unwrap();
            buffer.extend_from_slice(&tag);
            assert_eq!(buffer, unhex(expected), "plaintext {plaintext}");

            let sealer = Sealer::new(KeyId(1), &key_from_hex(key), SealFormat::V1);
            let framed = [nonce.clone(), unhex(expected)].concat();
            let nonce = Nonce::from_slice(&nonce);
            assert_eq!(
                sealer.seal_framed(nonce, &unhex(aad), &unhex(plaintext)),
                framed
            );
            assert_eq!(
                sealer.open_framed(&unhex(aad), &framed).unwrap().as_slice(),
                unhex(plaintext)
            );
        }
    }

    /// docs/FORMAT.md §4, against `tests/data/vectors/seal.json` and `seal-v2.json` (made by
    /// `scripts/format-vectors.py`): the associated data of each place, the sealed bytes for a
    /// fixed nonce through the real seal path, and the Python-made value opening through
    /// [`Sealer::open`]; for format 2 also the commitments of the key and of another key.
    #[test]
    fn sealed_values_match_the_format_vectors() {
        sealed_values_match("seal.json", SealFormat::V1);
        sealed_values_match("seal-v2.json", SealFormat::V2);
        let vectors = testing::vectors("seal-v2.json");
        for (key, commitment) in [
            ("data_key", "commitment"),
            ("other_key", "other_key_commitment"),
        ] {
            let sealer = Sealer::new(KeyId(2), &key_from_hex(text(&vectors, key)), SealFormat::V2);
            assert_eq!(
                sealer.commitment.unwrap().to_vec(),
                bytes(&vectors, commitment)
            );
        }
    }

    fn sealed_values_match(file: &str, format: SealFormat) {
        let vectors = testing::vectors(file);
        let data_key = text(&vectors, "data_key");
        let cases = vectors["cases"].as_array().unwrap();
        for case in cases {
            let p = &case["place"];
            let place = Place {
                table: text(p, "table"),
                field: text(p, "field"),
                message_id: text(p, "message_id"),
                user_id: text(p, "user_id"),
            };
            let key_id = KeyId(int(case, "key_id"));
            let sealer = Sealer::new(key_id, &key_from_hex(data_key), format);
            let plaintext = bytes(case, "plaintext_hex");
            assert_eq!(
                associated_data(format, &place, key_id),
                bytes(case, "associated_data"),
                "{place:?}"
            );
            let nonce = bytes(case, "nonce");
            let sealed = sealer.seal_with_nonce(Nonce::from_slice(&nonce), &place, &plaintext);
            assert_eq!(sealed, bytes(case, "sealed"), "{place:?}");
            assert_eq!(sealed.len(), plaintext.len() + overhead(format));
            let opened = sealer.open(&place, &bytes(case, "sealed")).unwrap();
            assert_eq!(opened.as_slice(), plaintext, "{place:?}");
        }
        assert_eq!(cases.len(), 5, "{file}");
    }

    /// Every AES-GCM-SIV vector of Project Wycheproof: 256-bit keys through
    /// [`Aes256GcmSiv`], the cipher the Sealer holds, 128-bit keys through its sibling
    /// `Aes128GcmSiv`. Valid vectors must encrypt to their ciphertext and tag and decrypt
    /// back; invalid ones (altered tags) must not decrypt. The RFC 8452 vectors among them
    /// (appendix C.2 and C.3) also go through the Sealer's own framing.
    #[test]
    fn every_wycheproof_aes_gcm_siv_vector_passes() {
        use aes_gcm_siv::Aes128GcmSiv;
        use wycheproof::TestResult;
        use wycheproof::aead::{TestName, TestSet};

        fn check<C: KeyInit + AeadInPlace>(test: &wycheproof::aead::Test) {
            let cipher = C::new_from_slice(&test.key).unwrap();
            let nonce = aes_gcm_siv::aead::Nonce::<C>::from_slice(&test.nonce);
            let tag = aes_gcm_siv::aead::Tag::<C>::from_slice(&test.tag);
            let mut opened = test.ct.to_vec();
            let decrypted = cipher.decrypt_in_place_detached(nonce, &test.aad, &mut opened, tag);
            match test.result {
                TestResult::Valid | TestResult::Acceptable => {
                    assert!(decrypted.is_ok(), "tcId {} must decrypt", test.tc_id);
                    assert_eq!(opened, *test.pt, "tcId {}", test.tc_id);
                    let mut sealed = test.pt.to_vec();
                    let computed = cipher
                        .encrypt_in_place_detached(nonce, &test.aad, &mut sealed)
                        .unwrap();
                    assert_eq!(sealed, *test.ct, "tcId {}", test.tc_id);
                    assert_eq!(computed.as_slice(), &*test.tag, "tcId {}", test.tc_id);
                }
                TestResult::Invalid => {
                    assert!(decrypted.is_err(), "tcId {} must not decrypt", test.tc_id);
                }
            }
        }

        let set = TestSet::load(TestName::AesGcmSiv).unwrap();
        let (mut ran_256, mut ran_128, mut through_sealer) = (0, 0, 0);
        for group in &set.test_groups {
            assert_eq!((group.nonce_size, group.tag_size), (96, 128));
            for test in &group.tests {
                match group.key_size {
                    256 => {
                        check::<Aes256GcmSiv>(test);
                        ran_256 += 1;
                    }
                    128 => {
                        check::<Aes128GcmSiv>(test);
                        ran_128 += 1;
                    }
                    other => panic!("unexpected AES-GCM-SIV key size {other}"),
                }
                if group.key_size == 256 && test.comment == "RFC 8452" {
                    let mut key = test.key.to_vec();
                    let key = SecretKey::take_from(&mut key).unwrap();
                    let sealer = Sealer::new(KeyId(1), &key, SealFormat::V1);
                    let framed = [&test.nonce[..], &test.ct[..], &test.tag[..]].concat();
                    let nonce = Nonce::from_slice(&test.nonce);
                    assert_eq!(sealer.seal_framed(nonce, &test.aad, &test.pt), framed);
                    let opened = sealer.open_framed(&test.aad, &framed).unwrap();
                    assert_eq!(opened.as_slice(), &*test.pt);
                    through_sealer += 1;
                }
            }
        }
        assert_eq!(set.number_of_tests, 202);
        assert_eq!((ran_256, ran_128), (103, 99));
        assert_eq!(through_sealer, 26, "RFC 8452 C.2 (24) and C.3 (2)");
    }
}
