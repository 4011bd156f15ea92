//! An in-memory [`KeyWrapper`] for tests and benches (the `testing` feature): the rules of KMS
//! that the vault relies on, without the emulator.
//!
//! What it keeps of KMS, because the code under test depends on it: a wrapped key unwraps only
//! under the encryption context it was wrapped with, and only while its KMS key is enabled (AWS
//! and LocalStack refuse a disabled key or one pending deletion); ReEncrypt keeps the context;
//! a call can fail as KMS throttling does. What it leaves out: key policies, grants, aliases
//! beyond one name per key, and the 7-day deletion window (a scheduled key is simply unusable).
//!
//! A wrapped key is a nonce and an AES-256-GCM-SIV ciphertext of the data key, under the KMS
//! key's own secret, with the encryption context as associated data.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

use super::{KeyWrapper, KmsError};
use crate::vault::keyring::Keyring;
use crate::vault::{EncryptionContext, KEY_LEN, KeyId, Purpose, SecretKey, WrappedKey};

const NONCE_LEN: usize = 12;

/// The name of the KMS key [`MemoryKms::new`] starts with.
pub const TEST_KMS_KEY: &str = "alias/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Enabled,
    Disabled,
    PendingDeletion,
}

struct KmsKey {
    arn: String,
    secret: Zeroizing<[u8; KEY_LEN]>,
    state: State,
}

/// KMS keys by name (alias) and by ARN, each with its secret and state.
pub struct MemoryKms {
    keys: Mutex<Vec<(String, KmsKey)>>,
    /// Requests still to be throttled, by operation.
    throttled: Mutex<HashMap<String, u32>>,
    calls: Mutex<HashMap<&'static str, usize>>,
}

impl Default for MemoryKms {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryKms {
    /// A KMS with one enabled key, [`TEST_KMS_KEY`].
    pub fn new() -> Self {
        let kms = Self {
            keys: Mutex::new(Vec::new()),
            throttled: Mutex::new(HashMap::new()),
            calls: Mutex::new(HashMap::new()),
        };
        kms.create_key(TEST_KMS_KEY);
        kms
    }

    /// Creates an enabled KMS key called `name`; returns its ARN.
    pub fn create_key(&self, name: &str) -> String {
        let mut keys = self.keys.lock().unwrap();
        let arn = format!("arn:memory:kms:key/{}", keys.len() + 1);
        let mut secret = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(secret.as_mut());
        keys.push((
            name.to_owned(),
            KmsKey {
                arn: arn.clone(),
                secret,
                state: State::Enabled,
            },
        ));
        arn
    }

    /// Disables KMS key `name_or_arn`: from now on KMS refuses to use it.
    pub fn disable(&self, name_or_arn: &str) {
        self.set_state(name_or_arn, State::Disabled);
    }

    /// Enables KMS key `name_or_arn` again.
    pub fn enable(&self, name_or_arn: &str) {
        self.set_state(name_or_arn, State::Enabled);
    }

    /// The next `calls` requests of `operation` fail with `ThrottlingException`, as KMS
    /// answers over its request quota.
    pub fn throttle_next(&self, operation: &str, calls: u32) {
        self.throttled
            .lock()
            .unwrap()
            .insert(operation.to_owned(), calls);
    }

    /// Requests of `operation` (`GenerateDataKey`, `Decrypt`, ...) made so far, throttled ones
    /// included.
    pub fn calls(&self, operation: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .get(operation)
            .copied()
            .unwrap_or(0)
    }

    /// A key made by KMS for `purpose` and `key_id`, in plaintext and wrapped, as the key table
    /// would hold it (or a door hand it out).
    pub async fn wrapped_key(&self, purpose: Purpose, key_id: KeyId) -> (SecretKey, WrappedKey) {
        let context = EncryptionContext { purpose, key_id };
        self.generate_key(TEST_KMS_KEY, context).await.unwrap()
    }

    /// A keyring on this KMS whose database is never reached: enough for keys handed out by a
    /// door, which need only KMS.
    pub fn keyring_without_database(self: &Arc<Self>) -> Keyring<MemoryKms> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://unused@127.0.0.1:1/unused")
            .unwrap();
        Keyring::new(pool, self.clone(), TEST_KMS_KEY, "test")
    }

    fn set_state(&self, name_or_arn: &str, state: State) {
        let mut keys = self.keys.lock().unwrap();
        let key =
            find(&mut keys, name_or_arn).unwrap_or_else(|| panic!("no KMS key {name_or_arn}"));
        key.state = state;
    }

    /// Counts the request, then fails it if it is throttled.
    fn request(&self, operation: &'static str) -> Result<(), KmsError> {
        *self.calls.lock().unwrap().entry(operation).or_default() += 1;
        match self.throttled.lock().unwrap().get_mut(operation) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Err(KmsError::Unavailable(format!(
                    "{operation}: ThrottlingException: Rate exceeded"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Runs `use_key` with the ARN and cipher of KMS key `name_or_arn`, if it exists and is
    /// enabled.
    fn with_key<T>(
        &self,
        operation: &'static str,
        name_or_arn: &str,
        use_key: impl FnOnce(&str, &Aes256GcmSiv) -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let refused = |code: &str, message: String| KmsError::Refused {
            operation,
            code: code.to_owned(),
            message,
        };
        let mut keys = self.keys.lock().unwrap();
        let Some(key) = find(&mut keys, name_or_arn) else {
            return Err(refused(
                "NotFoundException",
                format!("{name_or_arn} not found"),
            ));
        };
        match key.state {
            State::Enabled => use_key(&key.arn, &Aes256GcmSiv::new(key.secret.as_ref().into())),
            State::Disabled => Err(refused(
                "DisabledException",
                format!("{} is disabled", key.arn),
            )),
            State::PendingDeletion => Err(refused(
                "KMSInvalidStateException",
                format!("{} is pending deletion", key.arn),
            )),
        }
    }

    fn wrap(
        &self,
        operation: &'static str,
        name_or_arn: &str,
        context: EncryptionContext,
        key: &SecretKey,
    ) -> Result<WrappedKey, KmsError> {
        self.with_key(operation, name_or_arn, |arn, cipher| {
            let mut nonce = [0u8; NONCE_LEN];
            rand::rng().fill_bytes(&mut nonce);
            let sealed = cipher
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: key.expose(),
                        aad: &associated_data(context),
                    },
                )
                .expect("AES-GCM-SIV seals any 32 bytes");
            Ok(WrappedKey {
                ciphertext: [&nonce[..], &sealed].concat(),
                kms_key_id: arn.to_owned(),
            })
        })
    }

    fn unwrap(
        &self,
        operation: &'static str,
        wrapped: &WrappedKey,
        context: EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        self.with_key(operation, &wrapped.kms_key_id, |_, cipher| {
            let invalid = || KmsError::Refused {
                operation,
                code: "InvalidCiphertextException".to_owned(),
                message: "the ciphertext or its encryption context is not valid".to_owned(),
            };
            if wrapped.ciphertext.len() < NONCE_LEN {
                return Err(invalid());
            }
            let (nonce, sealed) = wrapped.ciphertext.split_at(NONCE_LEN);
            let mut plaintext = cipher
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: &associated_data(context),
                    },
                )
                .map_err(|_| invalid())?;
            SecretKey::take_from(&mut plaintext).map_err(|_| invalid())
        })
    }
}

/// The KMS key called or identified by `name_or_arn`, as KMS accepts either.
fn find<'k>(keys: &'k mut [(String, KmsKey)], name_or_arn: &str) -> Option<&'k mut KmsKey> {
    keys.iter_mut()
        .find(|(name, key)| name == name_or_arn || key.arn == name_or_arn)
        .map(|(_, key)| key)
}

/// The encryption context as KMS binds it: every pair, in a fixed order.
fn associated_data(context: EncryptionContext) -> Vec<u8> {
    let mut pairs: Vec<_> = context.to_map().into_iter().collect();
    pairs.sort();
    serde_json::to_vec(&pairs).expect("strings serialize")
}

impl KeyWrapper for MemoryKms {
    async fn generate_key(
        &self,
        kms_key_id: &str,
        context: EncryptionContext,
    ) -> Result<(SecretKey, WrappedKey), KmsError> {
        self.request("GenerateDataKey")?;
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(bytes.as_mut());
        let key = SecretKey::take_from(bytes.as_mut()).expect("32 bytes");
        let wrapped = self.wrap("GenerateDataKey", kms_key_id, context, &key)?;
        Ok((key, wrapped))
    }

    async fn unwrap_key(
        &self,
        wrapped: &WrappedKey,
        context: EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        self.request("Decrypt")?;
        self.unwrap("Decrypt", wrapped, context)
    }

    async fn rewrap_key(
        &self,
        wrapped: &WrappedKey,
        context: EncryptionContext,
        new_kms_key_id: &str,
    ) -> Result<WrappedKey, KmsError> {
        self.request("ReEncrypt")?;
        let key = self.unwrap("ReEncrypt", wrapped, context)?;
        self.wrap("ReEncrypt", new_kms_key_id, context, &key)
    }

    async fn check_key(&self, kms_key_id: &str) -> Result<String, KmsError> {
        self.request("DescribeKey")?;
        self.with_key("DescribeKey", kms_key_id, |arn, _| Ok(arn.to_owned()))
            .map_err(|error| match error {
                KmsError::Refused { code, message, .. } if code != "NotFoundException" => {
                    KmsError::Refused {
                        operation: "DescribeKey",
                        code: "KeyNotEnabled".to_owned(),
                        message,
                    }
                }
                other => other,
            })
    }

    async fn schedule_deletion(&self, kms_key_id: &str) -> Result<(), KmsError> {
        self.request("ScheduleKeyDeletion")?;
        let mut keys = self.keys.lock().unwrap();
        let key = find(&mut keys, kms_key_id).ok_or_else(|| KmsError::Refused {
            operation: "ScheduleKeyDeletion",
            code: "NotFoundException".to_owned(),
            message: format!("{kms_key_id} not found"),
        })?;
        key.state = State::PendingDeletion;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(purpose: Purpose, id: i64) -> EncryptionContext {
        EncryptionContext {
            purpose,
            key_id: KeyId(id),
        }
    }

    fn code(error: KmsError) -> String {
        match error {
            KmsError::Refused { code, .. } => code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_wrapped_key_unwraps_only_under_its_own_context() {
        let kms = MemoryKms::new();
        let data_7 = context(Purpose::Data, 7);
        let (key, wrapped) = kms.generate_key(TEST_KMS_KEY, data_7).await.unwrap();
        assert!(wrapped.kms_key_id.starts_with("arn:memory:kms:key/"));
        assert!(
            !wrapped
                .ciphertext
                .windows(KEY_LEN)
                .any(|w| w == key.expose())
        );

        let unwrapped = kms.unwrap_key(&wrapped, data_7).await.unwrap();
        assert_eq!(unwrapped.expose(), key.expose());
        for other in [context(Purpose::Data, 8), context(Purpose::Token, 7)] {
            let error = kms.unwrap_key(&wrapped, other).await.unwrap_err();
            assert_eq!(code(error), "InvalidCiphertextException");
        }
        let mut altered = wrapped.clone();
        *altered.ciphertext.last_mut().unwrap() ^= 1;
        let error = kms.unwrap_key(&altered, data_7).await.unwrap_err();
        assert_eq!(code(error), "InvalidCiphertextException");
        assert_eq!(kms.calls("Decrypt"), 4);
    }

    #[tokio::test]
    async fn a_disabled_or_deleted_kms_key_is_refused() {
        let kms = MemoryKms::new();
        let data_1 = context(Purpose::Data, 1);
        let (_, wrapped) = kms.generate_key(TEST_KMS_KEY, data_1).await.unwrap();

        kms.disable(TEST_KMS_KEY);
        let error = kms.unwrap_key(&wrapped, data_1).await.unwrap_err();
        assert!(!error.is_transient());
        assert_eq!(code(error), "DisabledException");
        assert_eq!(
            code(kms.check_key(TEST_KMS_KEY).await.unwrap_err()),
            "KeyNotEnabled"
        );

        kms.enable(&wrapped.kms_key_id);
        kms.check_key(TEST_KMS_KEY).await.unwrap();
        kms.unwrap_key(&wrapped, data_1).await.unwrap();

        kms.schedule_deletion(TEST_KMS_KEY).await.unwrap();
        let error = kms.unwrap_key(&wrapped, data_1).await.unwrap_err();
        assert_eq!(code(error), "KMSInvalidStateException");
        let error = kms.check_key("alias/none").await.unwrap_err();
        assert_eq!(code(error), "NotFoundException");
    }

    #[tokio::test]
    async fn rewrapping_moves_a_key_and_keeps_its_context() {
        let kms = MemoryKms::new();
        let new_arn = kms.create_key("alias/next");
        let token_3 = context(Purpose::Token, 3);
        let (key, wrapped) = kms.generate_key(TEST_KMS_KEY, token_3).await.unwrap();

        let rewrapped = kms
            .rewrap_key(&wrapped, token_3, "alias/next")
            .await
            .unwrap();
        assert_eq!(rewrapped.kms_key_id, new_arn);
        kms.disable(TEST_KMS_KEY);
        let unwrapped = kms.unwrap_key(&rewrapped, token_3).await.unwrap();
        assert_eq!(unwrapped.expose(), key.expose());
        let error = kms
            .unwrap_key(&rewrapped, context(Purpose::Token, 4))
            .await
            .unwrap_err();
        assert_eq!(code(error), "InvalidCiphertextException");
    }

    #[tokio::test]
    async fn throttled_requests_fail_transiently_then_pass() {
        let kms = MemoryKms::new();
        kms.throttle_next("GenerateDataKey", 2);
        for _ in 0..2 {
            let error = kms
                .generate_key(TEST_KMS_KEY, context(Purpose::Data, 1))
                .await
                .unwrap_err();
            assert!(error.is_transient(), "{error:?}");
        }
        kms.generate_key(TEST_KMS_KEY, context(Purpose::Data, 1))
            .await
            .unwrap();
        assert_eq!(kms.calls("GenerateDataKey"), 3);
    }
}
