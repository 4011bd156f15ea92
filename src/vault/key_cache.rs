//! Opened keys by id: each data or token key is unwrapped once (one KMS call), however many
//! values it opens. Unmask fills it with the keys a door hands out; verification and rotation
//! with keys read from the key table.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use super::keyring::{Keyring, KeyringError};
use super::kms::KeyWrapper;
use super::seal::Sealer;
use super::token::Tokenizer;
use super::{KeyId, WrappedKey};

/// Keys unwrapped so far, by [`KeyId`]. Holds plaintext keys (inside [`Sealer`] and
/// [`Tokenizer`]) for as long as it lives: keep it to one request or one rotation.
#[derive(Debug, Default)]
pub struct KeyCache {
    sealers: BTreeMap<KeyId, Sealer>,
    tokenizers: BTreeMap<KeyId, Tokenizer>,
}

impl KeyCache {
    /// Data key `id`, unwrapped once: from the bytes a door handed out, or else read from the
    /// key table (the key admin may read it).
    pub async fn sealer<W: KeyWrapper>(
        &mut self,
        keyring: &Keyring<W>,
        id: KeyId,
        handed_out: Option<&WrappedKey>,
    ) -> Result<&Sealer, KeyringError> {
        Ok(match self.sealers.entry(id) {
            Entry::Occupied(slot) => slot.into_mut(),
            Entry::Vacant(slot) => slot.insert(match handed_out {
                Some(wrapped) => keyring.sealer_from(id, wrapped).await?,
                None => keyring.sealer(id).await?,
            }),
        })
    }

    /// Token key `id`, unwrapped once, like [`KeyCache::sealer`].
    pub async fn tokenizer<W: KeyWrapper>(
        &mut self,
        keyring: &Keyring<W>,
        id: KeyId,
        handed_out: Option<&WrappedKey>,
    ) -> Result<&Tokenizer, KeyringError> {
        Ok(match self.tokenizers.entry(id) {
            Entry::Occupied(slot) => slot.into_mut(),
            Entry::Vacant(slot) => slot.insert(match handed_out {
                Some(wrapped) => keyring.tokenizer_from(id, wrapped).await?,
                None => keyring.tokenizer(id).await?,
            }),
        })
    }

    /// A login's token key and data key, each read from the key table and unwrapped once.
    pub async fn login_keys<W: KeyWrapper>(
        &mut self,
        keyring: &Keyring<W>,
        token_key: KeyId,
        data_key: KeyId,
    ) -> Result<(&Tokenizer, &Sealer), KeyringError> {
        self.tokenizer(keyring, token_key, None).await?;
        self.sealer(keyring, data_key, None).await?;
        Ok((&self.tokenizers[&token_key], &self.sealers[&data_key]))
    }

    /// Data key `id` if it was unwrapped already.
    pub fn opened_sealer(&self, id: KeyId) -> Option<&Sealer> {
        self.sealers.get(&id)
    }

    /// Token key `id` if it was unwrapped already.
    pub fn opened_tokenizer(&self, id: KeyId) -> Option<&Tokenizer> {
        self.tokenizers.get(&id)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::vault::kms::KmsError;
    use crate::vault::place::login_place;
    use crate::vault::testing::key;
    use crate::vault::token::Field;
    use crate::vault::{EncryptionContext, KEY_LEN, SecretKey};

    /// Wraps nothing: a "wrapped" key is the key id it was made for, then the key's bytes.
    /// Unwrapping counts its calls and refuses another key id, as KMS refuses another context.
    #[derive(Default)]
    struct Counting {
        unwraps: AtomicUsize,
    }

    fn wrapped(id: i64, byte: u8) -> WrappedKey {
        WrappedKey {
            ciphertext: [&id.to_be_bytes()[..], &[byte; KEY_LEN]].concat(),
            kms_key_id: "arn:test".into(),
        }
    }

    impl KeyWrapper for Counting {
        async fn generate_key(
            &self,
            _: &str,
            _: EncryptionContext,
        ) -> Result<(SecretKey, WrappedKey), KmsError> {
            unimplemented!("the cache creates no keys")
        }

        async fn unwrap_key(
            &self,
            wrapped: &WrappedKey,
            context: EncryptionContext,
        ) -> Result<SecretKey, KmsError> {
            self.unwraps.fetch_add(1, Ordering::SeqCst);
            let (id, key) = wrapped.ciphertext.split_at(8);
            if id != context.key_id.0.to_be_bytes() {
                return Err(KmsError::Refused {
                    operation: "Decrypt",
                    code: "InvalidCiphertextException".into(),
                    message: "another encryption context".into(),
                });
            }
            Ok(SecretKey::take_from(&mut key.to_vec()).unwrap())
        }

        async fn rewrap_key(
            &self,
            _: &WrappedKey,
            _: EncryptionContext,
            _: &str,
        ) -> Result<WrappedKey, KmsError> {
            unimplemented!("the cache rewraps nothing")
        }

        async fn check_key(&self, _: &str) -> Result<(), KmsError> {
            unimplemented!("the cache checks no KMS key")
        }

        async fn schedule_deletion(&self, _: &str) -> Result<(), KmsError> {
            unimplemented!("the cache deletes no KMS key")
        }
    }

    /// A keyring whose database is never reached: handed-out keys need only the wrapper.
    fn keyring() -> (Keyring<Counting>, Arc<Counting>) {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://unused@127.0.0.1:1/unused")
            .unwrap();
        let wrapper = Arc::new(Counting::default());
        (
            Keyring::new(pool, wrapper.clone(), "alias/test", "test"),
            wrapper,
        )
    }

    #[tokio::test]
    async fn each_key_is_unwrapped_once_by_id() {
        let (keyring, wrapper) = keyring();
        let mut keys = KeyCache::default();
        assert!(keys.opened_sealer(KeyId(2)).is_none());
        for _ in 0..3 {
            keys.sealer(&keyring, KeyId(2), Some(&wrapped(2, 2)))
                .await
                .unwrap();
            keys.tokenizer(&keyring, KeyId(1), Some(&wrapped(1, 1)))
                .await
                .unwrap();
        }
        assert_eq!(wrapper.unwraps.load(Ordering::SeqCst), 2);

        // What the cache holds is the key it unwrapped, under its id.
        let place = login_place(Field::Ip, "m-1", "u-1");
        let sealed = Sealer::new(KeyId(2), &key(2)).seal(&place, b"10.0.0.1");
        let sealer = keys.opened_sealer(KeyId(2)).unwrap();
        assert_eq!(sealer.key_id(), KeyId(2));
        assert_eq!(
            sealer.open(&place, &sealed).unwrap().as_slice(),
            b"10.0.0.1"
        );
        let tokenizer = keys.opened_tokenizer(KeyId(1)).unwrap();
        assert_eq!(
            tokenizer.device_id("d"),
            Tokenizer::new(KeyId(1), &key(1)).device_id("d")
        );
        assert!(keys.opened_tokenizer(KeyId(2)).is_none());
    }

    #[tokio::test]
    async fn a_key_that_does_not_unwrap_is_not_kept() {
        let (keyring, wrapper) = keyring();
        let mut keys = KeyCache::default();
        for _ in 0..2 {
            let error = keys
                .sealer(&keyring, KeyId(3), Some(&wrapped(4, 4)))
                .await
                .unwrap_err();
            assert!(
                matches!(error, KeyringError::Kms { id: KeyId(3), .. }),
                "{error:?}"
            );
        }
        assert!(keys.opened_sealer(KeyId(3)).is_none());
        assert_eq!(wrapper.unwraps.load(Ordering::SeqCst), 2, "asked again");
    }
}
