//! Keys created, unwrapped and re-wrapped through a [`KeyWrapper`], stored in the key table
//! ([`super::key_table`], `vault_keys`).
//!
//! A key's id is reserved from the table's sequence *before* KMS is called, because the id is
//! part of the encryption context KMS binds into the wrapped key. The wrapped key is committed
//! before the plaintext key is first used, so nothing is ever sealed under a key that could be
//! lost.
//!
//! No login reads the wrapped bytes from the table: a stored key comes out through the audited
//! door `vault_key_request` / `vault_key_hand_out` (migration 0011), which allows the ingester
//! token keys only and the key admin any key, and appends an audit row naming the keys first.

use std::sync::Arc;

use sqlx::PgPool;

use super::key_table::{self, NewKey, StoredKey};
use super::kms::{KeyWrapper, KmsError};
use super::retention::Window;
use super::seal::{SealFormat, Sealer, UnknownFormat};
use super::token::Tokenizer;
use super::{EncryptionContext, KeyId, Purpose, WrappedKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("no active token key: run `rotate-keys init` first")]
    NoTokenKey,
    #[error("key {0} does not exist")]
    NotFound(KeyId),
    #[error("key {id} is a {found} key, not a {expected} key")]
    WrongPurpose {
        id: KeyId,
        expected: Purpose,
        found: Purpose,
    },
    #[error("key {0} was destroyed: what it protected can no longer be opened")]
    Destroyed(KeyId),
    #[error("key {id}: {source}")]
    Kms {
        id: KeyId,
        #[source]
        source: KmsError,
    },
    #[error("the KMS key that wraps new keys: {0}")]
    WrappingKey(#[source] KmsError),
    #[error("key {id}: {source}")]
    Format {
        id: KeyId,
        #[source]
        source: UnknownFormat,
    },
    #[error("key table: {0}")]
    Database(#[from] sqlx::Error),
}

impl KeyringError {
    /// Worth retrying later: KMS throttled or unreachable, or the database connection failed.
    pub fn is_transient(&self) -> bool {
        match self {
            KeyringError::Kms { source, .. } | KeyringError::WrappingKey(source) => {
                source.is_transient()
            }
            KeyringError::Database(error) => crate::db::is_transient(error),
            _ => false,
        }
    }
}

/// Whether `rotate-keys init` created the token key or found one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKeyInit {
    Created(KeyId),
    AlreadyActive(KeyId),
}

/// The key table and the KMS that wraps its keys.
pub struct Keyring<W> {
    pool: PgPool,
    wrapper: Arc<W>,
    kms_key_id: String,
    created_by: String,
}

impl<W> std::fmt::Debug for Keyring<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("kms_key_id", &self.kms_key_id)
            .field("created_by", &self.created_by)
            .finish_non_exhaustive()
    }
}

impl<W: KeyWrapper> Keyring<W> {
    /// `kms_key_id` wraps new keys (an id, ARN or alias); `created_by` names this process in the
    /// keys it creates.
    pub fn new(pool: PgPool, wrapper: Arc<W>, kms_key_id: &str, created_by: &str) -> Self {
        Self {
            pool,
            wrapper,
            kms_key_id: kms_key_id.to_owned(),
            created_by: created_by.to_owned(),
        }
    }

    pub fn wrapper(&self) -> &W {
        &self.wrapper
    }

    /// The KMS key new keys are wrapped under, as configured (an id, ARN or alias).
    pub fn kms_key_id(&self) -> &str {
        &self.kms_key_id
    }

    /// Creates the first token key, unless one is already active.
    pub async fn init_token_key(&self) -> Result<TokenKeyInit, KeyringError> {
        if let Some(id) = self.active_token_key_id().await? {
            return Ok(TokenKeyInit::AlreadyActive(id));
        }
        match self.create_key(Purpose::Token).await {
            Ok((id, _)) => Ok(TokenKeyInit::Created(id)),
            // Another `init` won the race (the partial unique index allows one active key).
            Err(KeyringError::Database(sqlx::Error::Database(e))) if e.is_unique_violation() => {
                let id = self
                    .active_token_key_id()
                    .await?
                    .ok_or(KeyringError::NoTokenKey)?;
                Ok(TokenKeyInit::AlreadyActive(id))
            }
            Err(other) => Err(other),
        }
    }

    async fn active_token_key_id(&self) -> Result<Option<KeyId>, KeyringError> {
        Ok(key_table::active_token_key(&self.pool).await?)
    }

    /// The tokenizer of the active token key (one KMS Decrypt).
    pub async fn active_tokenizer(&self) -> Result<Tokenizer, KeyringError> {
        let id = self
            .active_token_key_id()
            .await?
            .ok_or(KeyringError::NoTokenKey)?;
        self.tokenizer(id).await
    }

    /// The tokenizer of a given token key version (one KMS Decrypt).
    pub async fn tokenizer(&self, id: KeyId) -> Result<Tokenizer, KeyringError> {
        let key = self.unwrap(id, Purpose::Token).await?;
        Ok(Tokenizer::new(id, &key))
    }

    /// A fresh data key for this process's writes (one KMS GenerateDataKey), stored before use.
    pub async fn new_sealer(&self) -> Result<Sealer, KeyringError> {
        self.new_sealer_in(None).await
    }

    /// A fresh data key for the logins of `window`, wrapped under the window's KMS key (or
    /// the default one without a window), stored before use.
    pub async fn new_sealer_in(&self, window: Option<&Window>) -> Result<Sealer, KeyringError> {
        let kms_key_id = window.map_or(self.kms_key_id.as_str(), |w| w.kms_key_id.as_str());
        let (id, key, wrapped) = self.generate(Purpose::Data, kms_key_id).await?;
        let mut connection = self.pool.acquire().await?;
        let starts = window.map(|w| w.starts);
        self.insert(&mut connection, id, Purpose::Data, &wrapped, starts)
            .await?;
        Ok(Sealer::new(id, &key, SealFormat::CURRENT))
    }

    /// An existing data key (one audited hand-out, one KMS Decrypt), to open what it sealed.
    pub async fn sealer(&self, id: KeyId) -> Result<Sealer, KeyringError> {
        let stored = self.stored(id).await?;
        let key = self.unwrap_stored(id, Purpose::Data, &stored).await?;
        Ok(Sealer::new(id, &key, format_of(&stored, id)?))
    }

    /// The tokenizer of a token key handed out by a door function (one KMS Decrypt).
    pub async fn tokenizer_from(
        &self,
        id: KeyId,
        wrapped: &WrappedKey,
    ) -> Result<Tokenizer, KeyringError> {
        let key = self.unwrap_handed_out(id, Purpose::Token, wrapped).await?;
        Ok(Tokenizer::new(id, &key))
    }

    /// The sealer of a data key of `format` handed out by a door function (one KMS Decrypt).
    pub async fn sealer_from(
        &self,
        id: KeyId,
        wrapped: &WrappedKey,
        format: SealFormat,
    ) -> Result<Sealer, KeyringError> {
        let key = self.unwrap_handed_out(id, Purpose::Data, wrapped).await?;
        Ok(Sealer::new(id, &key, format))
    }

    /// Starts a token key rotation: a new token key becomes the active one and the current one
    /// becomes `retiring` (it still checks the tokens made with it), in one transaction.
    pub async fn rotate_token_key(&self) -> Result<KeyId, KeyringError> {
        let (id, key, wrapped) = self.generate(Purpose::Token, &self.kms_key_id).await?;
        drop(key); // the new key is unwrapped again by whoever uses it
        let mut tx = self.pool.begin().await?;
        let retiring = key_table::start_token_rotation(&mut tx).await?;
        if retiring == 0 {
            return Err(KeyringError::NoTokenKey);
        }
        self.insert(&mut tx, id, Purpose::Token, &wrapped, None)
            .await?;
        tx.commit().await?;
        tracing::info!(key_id = %id, "token key rotation started");
        Ok(id)
    }

    /// Whether new writes can start: an active token key exists and the KMS key that wraps
    /// new keys is usable (one KMS DescribeKey).
    pub async fn check_ready(&self) -> Result<(), KeyringError> {
        self.active_token_key_id()
            .await?
            .ok_or(KeyringError::NoTokenKey)?;
        self.wrapper
            .check_key(&self.kms_key_id)
            .await
            .map(drop)
            .map_err(KeyringError::WrappingKey)
    }

    /// Which of `ids` are `active`, the only state new writes should use.
    pub async fn active(&self, ids: &[KeyId]) -> Result<Vec<KeyId>, KeyringError> {
        Ok(key_table::active_among(&self.pool, ids).await?)
    }

    /// Re-wraps key `id` under `new_kms_key_id` (KMS ReEncrypt); returns the new KMS key ARN.
    pub async fn rewrap(&self, id: KeyId, new_kms_key_id: &str) -> Result<String, KeyringError> {
        let stored = self.stored(id).await?;
        let wrapped = wrapped_of(&stored, id)?;
        let context = EncryptionContext {
            purpose: stored.purpose,
            key_id: id,
        };
        let rewrapped = self
            .wrapper
            .rewrap_key(&wrapped, context, new_kms_key_id)
            .await
            .map_err(|source| KeyringError::Kms { id, source })?;
        key_table::set_wrapped(&self.pool, id, &rewrapped).await?;
        Ok(rewrapped.kms_key_id)
    }

    /// Reserves an id and has KMS generate and wrap a key for it.
    async fn generate(
        &self,
        purpose: Purpose,
        kms_key_id: &str,
    ) -> Result<(KeyId, super::SecretKey, WrappedKey), KeyringError> {
        let id = key_table::reserve_id(&self.pool).await?;
        let context = EncryptionContext {
            purpose,
            key_id: id,
        };
        let (key, wrapped) = self
            .wrapper
            .generate_key(kms_key_id, context)
            .await
            .map_err(|source| KeyringError::Kms { id, source })?;
        Ok((id, key, wrapped))
    }

    async fn insert(
        &self,
        connection: &mut sqlx::PgConnection,
        id: KeyId,
        purpose: Purpose,
        wrapped: &WrappedKey,
        window_starts: Option<time::Date>,
    ) -> Result<(), KeyringError> {
        let key = NewKey {
            id,
            purpose,
            wrapped,
            created_by: &self.created_by,
            window_starts,
            format: match purpose {
                Purpose::Data => SealFormat::CURRENT.stored(),
                Purpose::Token => 1,
            },
        };
        key_table::insert(connection, &key).await?;
        tracing::info!(key_id = %id, %purpose, kms_key = %wrapped.kms_key_id, "created key");
        Ok(())
    }

    async fn create_key(
        &self,
        purpose: Purpose,
    ) -> Result<(KeyId, super::SecretKey), KeyringError> {
        let (id, key, wrapped) = self.generate(purpose, &self.kms_key_id).await?;
        let mut connection = self.pool.acquire().await?;
        self.insert(&mut connection, id, purpose, &wrapped, None)
            .await?;
        Ok((id, key))
    }

    /// A stored key as the key door hands it out: one audit row, then the key.
    async fn stored(&self, id: KeyId) -> Result<StoredKey, KeyringError> {
        key_table::hand_out(&self.pool, id, &self.created_by)
            .await?
            .ok_or(KeyringError::NotFound(id))
    }

    async fn unwrap(&self, id: KeyId, purpose: Purpose) -> Result<super::SecretKey, KeyringError> {
        let stored = self.stored(id).await?;
        self.unwrap_stored(id, purpose, &stored).await
    }

    /// Unwraps a stored key, refusing (before KMS is asked) one made for another purpose.
    async fn unwrap_stored(
        &self,
        id: KeyId,
        purpose: Purpose,
        stored: &StoredKey,
    ) -> Result<super::SecretKey, KeyringError> {
        if stored.purpose != purpose {
            return Err(KeyringError::WrongPurpose {
                id,
                expected: purpose,
                found: stored.purpose,
            });
        }
        self.unwrap_handed_out(id, purpose, &wrapped_of(stored, id)?)
            .await
    }

    async fn unwrap_handed_out(
        &self,
        id: KeyId,
        purpose: Purpose,
        wrapped: &WrappedKey,
    ) -> Result<super::SecretKey, KeyringError> {
        self.wrapper
            .unwrap_key(
                wrapped,
                EncryptionContext {
                    purpose,
                    key_id: id,
                },
            )
            .await
            .map_err(|source| KeyringError::Kms { id, source })
    }
}

fn format_of(stored: &StoredKey, id: KeyId) -> Result<SealFormat, KeyringError> {
    SealFormat::from_stored(stored.format).map_err(|source| KeyringError::Format { id, source })
}

fn wrapped_of(stored: &StoredKey, id: KeyId) -> Result<WrappedKey, KeyringError> {
    Ok(WrappedKey {
        ciphertext: stored
            .wrapped_key
            .clone()
            .ok_or(KeyringError::Destroyed(id))?,
        kms_key_id: stored.kms_key_id.clone(),
    })
}
