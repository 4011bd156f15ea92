//! Opened keys by id: each data or token key is unwrapped once (one KMS call), however many
//! values it opens. Unmask fills it with the keys a door hands out; verification and rotation
//! with keys read from the key table.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use super::keyring::{Keyring, KeyringError};
use super::kms::KeyWrapper;
use super::seal::{SealFormat, Sealer};
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
    /// Data key `id`, unwrapped once: from the bytes (and format) a door handed out with the
    /// rows, or else through the key door.
    pub async fn sealer<W: KeyWrapper>(
        &mut self,
        keyring: &Keyring<W>,
        id: KeyId,
        handed_out: Option<(&WrappedKey, SealFormat)>,
    ) -> Result<&Sealer, KeyringError> {
        Ok(match self.sealers.entry(id) {
            Entry::Occupied(slot) => slot.into_mut(),
            Entry::Vacant(slot) => slot.insert(match handed_out {
                Some((wrapped, format)) => keyring.sealer_from(id, wrapped, format).await?,
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

    /// A login's token key and data key, each through the key door and unwrapped once.
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

    use super::*;
    use crate::vault::kms::memory::MemoryKms;
    use crate::vault::place::login_place;
    use crate::vault::token::Field;
    use crate::vault::{Purpose, SecretKey};

    fn keyring() -> (Keyring<MemoryKms>, Arc<MemoryKms>) {
        let kms = Arc::new(MemoryKms::new());
        (kms.keyring_without_database(), kms)
    }

    async fn made(kms: &MemoryKms, purpose: Purpose, id: i64) -> (SecretKey, WrappedKey) {
        kms.wrapped_key(purpose, KeyId(id)).await
    }

    #[tokio::test]
    async fn each_key_is_unwrapped_once_by_id() {
        let (keyring, kms) = keyring();
        let (data_key, wrapped_data_key) = made(&kms, Purpose::Data, 2).await;
        let (token_key, wrapped_token_key) = made(&kms, Purpose::Token, 1).await;
        let mut keys = KeyCache::default();
        assert!(keys.opened_sealer(KeyId(2)).is_none());
        for _ in 0..3 {
            keys.sealer(
                &keyring,
                KeyId(2),
                Some((&wrapped_data_key, SealFormat::V2)),
            )
            .await
            .unwrap();
            keys.tokenizer(&keyring, KeyId(1), Some(&wrapped_token_key))
                .await
                .unwrap();
        }
        assert_eq!(kms.calls("Decrypt"), 2);

        // What the cache holds is the key KMS unwrapped, under its id.
        let place = login_place(Field::Ip, "m-1", "u-1");
        let sealed = Sealer::new(KeyId(2), &data_key, SealFormat::V2).seal(&place, b"10.0.0.1");
        let sealer = keys.opened_sealer(KeyId(2)).unwrap();
        assert_eq!(sealer.key_id(), KeyId(2));
        assert_eq!(
            sealer.open(&place, &sealed).unwrap().as_slice(),
            b"10.0.0.1"
        );
        let tokenizer = keys.opened_tokenizer(KeyId(1)).unwrap();
        assert_eq!(
            tokenizer.device_id("d"),
            Tokenizer::new(KeyId(1), &token_key).device_id("d")
        );
        assert!(keys.opened_tokenizer(KeyId(2)).is_none());
    }

    #[tokio::test]
    async fn a_key_that_does_not_unwrap_is_not_kept() {
        let (keyring, kms) = keyring();
        // Key 4's wrapped bytes handed out as key 3's: KMS refuses the other context.
        let (_, wrapped_for_4) = made(&kms, Purpose::Data, 4).await;
        let mut keys = KeyCache::default();
        for _ in 0..2 {
            let error = keys
                .sealer(&keyring, KeyId(3), Some((&wrapped_for_4, SealFormat::V2)))
                .await
                .unwrap_err();
            assert!(
                matches!(error, KeyringError::Kms { id: KeyId(3), ref source } if !source.is_transient()),
                "{error:?}"
            );
        }
        assert!(keys.opened_sealer(KeyId(3)).is_none());
        assert_eq!(kms.calls("Decrypt"), 2, "asked again");

        // A token key handed out as a data key: refused the same way.
        let (_, wrapped_token_key) = made(&kms, Purpose::Token, 3).await;
        let error = keys
            .sealer(
                &keyring,
                KeyId(3),
                Some((&wrapped_token_key, SealFormat::V2)),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(error, KeyringError::Kms { id: KeyId(3), .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_throttled_unwrap_is_transient_and_the_next_one_is_kept() {
        let (keyring, kms) = keyring();
        let (_, wrapped) = made(&kms, Purpose::Data, 5).await;
        let mut keys = KeyCache::default();
        kms.throttle_next("Decrypt", 1);
        let error = keys
            .sealer(&keyring, KeyId(5), Some((&wrapped, SealFormat::V2)))
            .await
            .unwrap_err();
        assert!(error.is_transient(), "{error:?}");
        assert!(keys.opened_sealer(KeyId(5)).is_none());
        keys.sealer(&keyring, KeyId(5), Some((&wrapped, SealFormat::V2)))
            .await
            .unwrap();
        assert!(keys.opened_sealer(KeyId(5)).is_some());
        assert_eq!(kms.calls("Decrypt"), 2);
    }
}
