//! Wrapped keys in PostgreSQL (`vault_keys`), created and unwrapped through a [`KeyWrapper`].
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
        found: String,
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
        let id = sqlx::query_scalar(
            "SELECT id FROM vault_keys WHERE purpose = 'token' AND state = 'active'",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(id.map(KeyId))
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
        Ok(Sealer::new(id, &key, stored.format(id)?))
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
        let retiring = sqlx::query(
            "UPDATE vault_keys SET state = 'retiring' WHERE purpose = 'token' AND state = 'active'",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
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
        let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
        let active: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM vault_keys WHERE id = ANY($1) AND state = 'active'")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?;
        Ok(active.into_iter().map(KeyId).collect())
    }

    /// Re-wraps key `id` under `new_kms_key_id` (KMS ReEncrypt); returns the new KMS key ARN.
    pub async fn rewrap(&self, id: KeyId, new_kms_key_id: &str) -> Result<String, KeyringError> {
        let stored = self.stored(id).await?;
        let wrapped = stored.wrapped(id)?;
        let context = EncryptionContext {
            purpose: stored.purpose(id)?,
            key_id: id,
        };
        let rewrapped = self
            .wrapper
            .rewrap_key(&wrapped, context, new_kms_key_id)
            .await
            .map_err(|source| KeyringError::Kms { id, source })?;
        sqlx::query("UPDATE vault_keys SET wrapped_key = $2, kms_key_id = $3 WHERE id = $1")
            .bind(id)
            .bind(&rewrapped.ciphertext)
            .bind(&rewrapped.kms_key_id)
            .execute(&self.pool)
            .await?;
        Ok(rewrapped.kms_key_id)
    }

    /// Reserves an id and has KMS generate and wrap a key for it.
    async fn generate(
        &self,
        purpose: Purpose,
        kms_key_id: &str,
    ) -> Result<(KeyId, super::SecretKey, WrappedKey), KeyringError> {
        let id = KeyId(
            sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('vault_keys', 'id'))")
                .fetch_one(&self.pool)
                .await?,
        );
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
        sqlx::query(
            "INSERT INTO vault_keys (id, purpose, kms_key_id, wrapped_key, created_by, window_starts,
                                     format)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(purpose.as_str())
        .bind(&wrapped.kms_key_id)
        .bind(&wrapped.ciphertext)
        .bind(&self.created_by)
        .bind(window_starts)
        .bind(match purpose {
            Purpose::Data => SealFormat::CURRENT.stored(),
            Purpose::Token => 1,
        })
        .execute(connection)
        .await?;
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
        // Step one commits on its own (the pool's autocommit) before step two hands out.
        let request: i64 = sqlx::query_scalar("SELECT vault_key_request($1, $2)")
            .bind([id.0])
            .bind(&self.created_by)
            .fetch_one(&self.pool)
            .await?;
        sqlx::query_as(
            "SELECT purpose, format, kms_key_id, wrapped_key FROM vault_key_hand_out($1)",
        )
        .bind(request)
        .fetch_optional(&self.pool)
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
        let found = stored.purpose(id)?;
        if found != purpose {
            return Err(KeyringError::WrongPurpose {
                id,
                expected: purpose,
                found: found.as_str().to_owned(),
            });
        }
        self.unwrap_handed_out(id, purpose, &stored.wrapped(id)?)
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

/// A row of `vault_keys` as the key door hands it out.
#[derive(sqlx::FromRow)]
struct StoredKey {
    purpose: String,
    format: i16,
    kms_key_id: String,
    wrapped_key: Option<Vec<u8>>,
}

impl StoredKey {
    fn purpose(&self, id: KeyId) -> Result<Purpose, KeyringError> {
        match self.purpose.as_str() {
            "token" => Ok(Purpose::Token),
            "data" => Ok(Purpose::Data),
            other => Err(KeyringError::WrongPurpose {
                id,
                expected: Purpose::Data,
                found: other.to_owned(),
            }),
        }
    }

    fn format(&self, id: KeyId) -> Result<SealFormat, KeyringError> {
        SealFormat::from_stored(self.format).map_err(|source| KeyringError::Format { id, source })
    }

    fn wrapped(&self, id: KeyId) -> Result<WrappedKey, KeyringError> {
        Ok(WrappedKey {
            ciphertext: self
                .wrapped_key
                .clone()
                .ok_or(KeyringError::Destroyed(id))?,
            kms_key_id: self.kms_key_id.clone(),
        })
    }
}
