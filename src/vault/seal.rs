//! Sealing: AES-256-GCM-SIV under a data key, bound to the value's place.
//!
//! A sealed value is `nonce (12 bytes) || ciphertext || tag (16 bytes)`. The nonce is random,
//! from a userspace CSPRNG seeded by the OS. GCM-SIV stays safe even if one ever repeats (it
//! then only reveals that two plaintexts at the same place were equal), and RFC 8452 allows
//! 2^32 random-nonce messages per key, far above how long a data key lives.
//!
//! The associated data names the place the ciphertext belongs to ([`Place`]), encoded
//! canonically: each part as a big-endian u32 length followed by its bytes, so no two different
//! places encode alike (`"a|b" + "c"` differs from `"a" + "b|c"`). A ciphertext copied to another
//! row, user, field or key id then fails to open instead of revealing the wrong person's data.
//!
//! Byte for byte: docs/FORMAT.md §4, pinned by `tests/data/vectors/seal.json` and by values
//! sealed by earlier versions (`fixture-sealed-*.json`).

use std::fmt;

use aes_gcm_siv::aead::{AeadInPlace, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use zeroize::Zeroizing;

use super::{KeyId, SecretKey};

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed value adds to its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Version tag of the associated-data layout; bump it if the layout changes.
const AD_VERSION: &[u8] = b"pii-vault/seal/v1";

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
    cipher: Aes256GcmSiv,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Opening failed: wrong key, wrong place, or altered bytes. Deliberately says no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sealed value failed authentication (altered, moved, or under another key)")]
pub struct OpenError;

impl Sealer {
    pub fn new(key_id: KeyId, data_key: &SecretKey) -> Self {
        Self {
            key_id,
            cipher: Aes256GcmSiv::new(data_key.expose().into()),
        }
    }

    pub fn key_id(&self) -> KeyId {
        self.key_id
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
        self.seal_framed(nonce, &associated_data(place, self.key_id), plaintext)
    }

    /// `nonce || ciphertext || tag` under raw associated data (RFC 8452 vectors enter here).
    fn seal_framed(&self, nonce: &Nonce, associated_data: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut sealed = Vec::with_capacity(plaintext.len() + OVERHEAD);
        sealed.extend_from_slice(nonce);
        sealed.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_in_place_detached(nonce, associated_data, &mut sealed[NONCE_LEN..])
            .expect("plaintext is far below the AES-GCM-SIV length limit");
        sealed.extend_from_slice(&tag);
        sealed
    }

    /// Opens a sealed value. On failure nothing of the plaintext survives: the working buffer
    /// is zeroized on drop.
    pub fn open(&self, place: &Place<'_>, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        self.open_framed(&associated_data(place, self.key_id), sealed)
    }

    /// Opens `nonce || ciphertext || tag` under raw associated data.
    fn open_framed(
        &self,
        associated_data: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() < OVERHEAD {
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

/// The canonical associated data of a place under a key.
pub fn associated_data(place: &Place<'_>, key_id: KeyId) -> Vec<u8> {
    let key_id = key_id.0.to_be_bytes();
    let parts: [&[u8]; 6] = [
        AD_VERSION,
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

    fn sealer(byte: u8, id: i64) -> Sealer {
        Sealer::new(KeyId(id), &key(byte))
    }

    #[test]
    fn round_trip() {
        let s = sealer(1, 1);
        let sealed = s.seal(&PLACE, b"10.0.0.1");
        assert_eq!(sealed.len(), 8 + OVERHEAD);
        assert_eq!(s.open(&PLACE, &sealed).unwrap().as_slice(), b"10.0.0.1");
    }

    #[test]
    fn nonces_are_fresh_so_equal_plaintexts_seal_differently() {
        let s = sealer(1, 1);
        assert_ne!(s.seal(&PLACE, b"x"), s.seal(&PLACE, b"x"));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let s = sealer(1, 1);
        let sealed = s.seal(&PLACE, b"593-47-5928");
        for bit in 0..sealed.len() * 8 {
            let mut tampered = sealed.clone();
            tampered[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(s.open(&PLACE, &tampered), Err(OpenError), "bit {bit}");
        }
        assert_eq!(s.open(&PLACE, &sealed[..OVERHEAD - 1]), Err(OpenError));
    }

    #[test]
    fn a_value_moved_to_another_place_does_not_open() {
        let s = sealer(1, 1);
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
        let sealed = sealer(1, 1).seal(&PLACE, b"10.0.0.1");
        assert_eq!(sealer(2, 1).open(&PLACE, &sealed), Err(OpenError));
        assert_eq!(sealer(1, 2).open(&PLACE, &sealed), Err(OpenError));
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
            assert_ne!(
                associated_data(&place(a), KeyId(1)),
                associated_data(&place(b), KeyId(1)),
                "{a:?} and {b:?}"
            );
        }
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

            let sealer = Sealer::new(KeyId(1), &key_from_hex(key));
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

    /// docs/FORMAT.md §4, against `tests/data/vectors/seal.json` (made by
    /// `scripts/format-vectors.py`): the associated data of each place, the sealed bytes for a
    /// fixed nonce through the real seal path, and the Python-made value opening through
    /// [`Sealer::open`].
    #[test]
    fn sealed_values_match_the_format_vectors() {
        let vectors = testing::vectors("seal.json");
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
            let sealer = Sealer::new(key_id, &key_from_hex(data_key));
            let plaintext = bytes(case, "plaintext_hex");
            assert_eq!(
                associated_data(&place, key_id),
                bytes(case, "associated_data"),
                "{place:?}"
            );
            let nonce = bytes(case, "nonce");
            let sealed = sealer.seal_with_nonce(Nonce::from_slice(&nonce), &place, &plaintext);
            assert_eq!(sealed, bytes(case, "sealed"), "{place:?}");
            assert_eq!(sealed.len(), plaintext.len() + OVERHEAD);
            let opened = sealer.open(&place, &bytes(case, "sealed")).unwrap();
            assert_eq!(opened.as_slice(), plaintext, "{place:?}");
            if let Some(text) = case["plaintext"].as_str() {
                assert_eq!(opened.as_slice(), text.as_bytes());
            }
        }
        assert_eq!(cases.len(), 5);
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
                    let sealer = Sealer::new(KeyId(1), &SecretKey::take_from(&mut key).unwrap());
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
