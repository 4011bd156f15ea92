//! Erased users, as an ingester must know them: the tokens of their user ids (never the ids),
//! each with the time of the erasure, under the token keys the records were made with.
//!
//! A login whose user was erased *after* the login was sent (a message in flight or in the
//! dead-letter queue during the erasure) is stored without its personal fields: no tokens, no
//! sealed values. A login sent after the erasure is new data and is stored as usual.

use std::collections::HashMap;

use sqlx::PgPool;
use time::OffsetDateTime;

use super::keyring::{Keyring, KeyringError};
use super::kms::{KeyWrapper, KmsError};
use super::place::witnessed_erasure_place;
use super::seal::{SealFormat, Sealer};
use super::token::Tokenizer;
use super::{EncryptionContext, KeyId, Purpose, WrappedKey};

/// The erasure gate (`erasure_gate`, migration 0009): an erasure updates its one row, each
/// ingester batch holds it shared. A row lock, which only the vault's roles can take (an
/// advisory lock could be held by any login, stalling every batch).
pub mod erasure_lock {
    /// Held by a writer from before its inserts until it commits; returns the newest erasure
    /// record, read under the gate.
    pub const HOLD_SHARED: &str = "SELECT vault_hold_erasures()";
    /// The newest erasure record, as loaded with the records; `vault_hold_erasures` reads the
    /// same under the gate, and a batch made before it must not commit.
    pub const NEWEST: &str = "SELECT coalesce(max(id), 0) FROM erasures";
}

/// The erasure records known to this process.
#[derive(Default)]
pub struct ErasedUsers {
    /// The newest record loaded (0: none).
    newest: i64,
    /// Per token key: its tokenizer, and when each token's user was (last) erased.
    by_key: Vec<(Tokenizer, HashMap<String, OffsetDateTime>)>,
}

impl std::fmt::Debug for ErasedUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErasedUsers")
            .field("newest", &self.newest)
            .field("keys", &self.by_key.len())
            .finish_non_exhaustive()
    }
}

impl ErasedUsers {
    /// Every erasure record, with each token key they name unwrapped once.
    pub async fn load<W: KeyWrapper>(
        pool: &PgPool,
        keyring: &Keyring<W>,
    ) -> Result<Self, KeyringError> {
        let records: Vec<(i64, i64, String, OffsetDateTime)> = sqlx::query_as(
            "SELECT id, token_key_id, user_token, erased_at FROM erasures ORDER BY id",
        )
        .fetch_all(pool)
        .await?;
        let mut erased = Self::default();
        let mut destroyed = Vec::new();
        for (id, key, token, at) in records {
            erased.newest = erased.newest.max(id);
            if destroyed.contains(&key) {
                continue;
            }
            let slot = match erased
                .by_key
                .iter()
                .position(|(t, _)| t.key_id() == KeyId(key))
            {
                Some(slot) => slot,
                None => match keyring.tokenizer(KeyId(key)).await {
                    Ok(tokenizer) => {
                        erased.by_key.push((tokenizer, HashMap::new()));
                        erased.by_key.len() - 1
                    }
                    // Only a database from before migration 0014 destroys a key its erasure
                    // records name (the trigger of 0014 refuses it now). Those records can
                    // match no token any more; stopping ingest would not bring them back.
                    Err(KeyringError::Destroyed(id)) => {
                        tracing::warn!(token_key = %id, "erasure records name a destroyed token key; they match nothing");
                        destroyed.push(key);
                        continue;
                    }
                    Err(error) => return Err(error),
                },
            };
            let when = erased.by_key[slot].1.entry(token).or_insert(at);
            *when = (*when).max(at);
        }
        Ok(erased)
    }

    /// Whether the newest record in the table is newer than what this set knows.
    pub async fn outdated(&self, pool: &PgPool) -> Result<bool, sqlx::Error> {
        let newest: i64 = sqlx::query_scalar(erasure_lock::NEWEST)
            .fetch_one(pool)
            .await?;
        Ok(newest > self.newest)
    }

    /// The newest record this set knows: a batch made with it may commit only while no newer
    /// one exists.
    pub fn newest(&self) -> i64 {
        self.newest
    }

    /// Whether `user_id`'s personal fields must be dropped from a login sent at `sent_at`
    /// (unknown: treated as sent before any erasure).
    pub fn erased(&self, user_id: &str, sent_at: Option<OffsetDateTime>) -> bool {
        self.by_key.iter().any(|(tokenizer, tokens)| {
            tokens
                .get(tokenizer.user_id(user_id).as_str())
                .is_some_and(|erased_at| sent_at.is_none_or(|sent| sent < *erased_at))
        })
    }

    #[cfg(test)]
    pub(crate) fn with(tokenizer: Tokenizer, user_id: &str, at: OffsetDateTime) -> Self {
        let token = tokenizer.user_id(user_id).to_string();
        Self {
            newest: 1,
            by_key: vec![(tokenizer, HashMap::from([(token, at)]))],
        }
    }
}

/// The key id in the encryption context of a witnessed erasure's data key: no stored key has
/// it (ids start at 1), so it can be told apart in KMS's logs.
pub const WITNESS_KEY_ID: KeyId = KeyId(0);

/// An erasure as the witness store keeps it, outside the database (docs/FORMAT.md §9): when it
/// was made, whether tokens were kept, and the user id sealed under a data key of its own,
/// wrapped by KMS. No user id in clear; opening one takes KMS, as a backup's keys do, so a
/// restored database can be made to forget again (`rotate-keys reapply-erasures`).
#[derive(Clone, PartialEq, Eq)]
pub struct WitnessedErasure {
    pub erased_at: OffsetDateTime,
    pub tokens_kept: bool,
    wrapped: WrappedKey,
    sealed_user_id: Vec<u8>,
}

impl std::fmt::Debug for WitnessedErasure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessedErasure")
            .field("erased_at", &self.erased_at)
            .finish_non_exhaustive()
    }
}

/// A witnessed erasure that does not open: altered, or not one of ours.
#[derive(Debug, thiserror::Error)]
pub enum WitnessedErasureError {
    #[error("{0}")]
    Kms(#[from] KmsError),
    #[error("witnessed erasure {0} does not open (altered, or not written by pii-vault)")]
    Unreadable(String),
}

const WITNESS_FORMAT: &str = "pii-vault/erasure-witness/v1";

impl WitnessedErasure {
    /// The object name of the erasure made at `erased_at`: one per erasure, and the same for
    /// an erasure re-applied after a restore (it keeps its time).
    pub fn name_of(erased_at: OffsetDateTime) -> String {
        let micros = erased_at.unix_timestamp_nanos() / 1_000;
        format!("erasures/{micros:020}.json")
    }

    pub fn name(&self) -> String {
        Self::name_of(self.erased_at)
    }

    fn context() -> EncryptionContext {
        EncryptionContext {
            purpose: Purpose::Data,
            key_id: WITNESS_KEY_ID,
        }
    }

    /// Seals `user_id` under a fresh data key wrapped under `kms_key_id` (one KMS call).
    pub async fn seal<W: KeyWrapper>(
        wrapper: &W,
        kms_key_id: &str,
        user_id: &str,
        erased_at: OffsetDateTime,
        tokens_kept: bool,
    ) -> Result<Self, KmsError> {
        let (key, wrapped) = wrapper.generate_key(kms_key_id, Self::context()).await?;
        let sealer = Sealer::new(WITNESS_KEY_ID, &key, SealFormat::V2);
        let name = Self::name_of(erased_at);
        let sealed_user_id = sealer.seal(&witnessed_erasure_place(&name), user_id.as_bytes());
        Ok(Self {
            erased_at,
            tokens_kept,
            wrapped,
            sealed_user_id,
        })
    }

    /// The erased user's id (one KMS call).
    pub async fn open<W: KeyWrapper>(&self, wrapper: &W) -> Result<String, WitnessedErasureError> {
        let key = wrapper.unwrap_key(&self.wrapped, Self::context()).await?;
        let sealer = Sealer::new(WITNESS_KEY_ID, &key, SealFormat::V2);
        let name = self.name();
        let unreadable = || WitnessedErasureError::Unreadable(name.clone());
        let opened = sealer
            .open(&witnessed_erasure_place(&name), &self.sealed_user_id)
            .map_err(|_| unreadable())?;
        String::from_utf8(opened.to_vec()).map_err(|_| unreadable())
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&serde_json::json!({
            "format": WITNESS_FORMAT,
            "erased_at_unix_micros": (self.erased_at.unix_timestamp_nanos() / 1_000) as i64,
            "tokens_kept": self.tokens_kept,
            "kms_key_id": self.wrapped.kms_key_id,
            "wrapped_key": hex::encode(&self.wrapped.ciphertext),
            "sealed_user_id": hex::encode(&self.sealed_user_id),
        }))
        .expect("a JSON value serializes")
    }

    /// Reads an object written by [`WitnessedErasure::to_json`]; `None` if it is not one.
    pub fn from_json(bytes: &[u8]) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        if value["format"] != WITNESS_FORMAT {
            return None;
        }
        let micros = value["erased_at_unix_micros"].as_i64()?;
        let erased_at =
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).ok()?;
        Some(Self {
            erased_at,
            tokens_kept: value["tokens_kept"].as_bool()?,
            wrapped: WrappedKey {
                ciphertext: hex::decode(value["wrapped_key"].as_str()?).ok()?,
                kms_key_id: value["kms_key_id"].as_str()?.to_owned(),
            },
            sealed_user_id: hex::decode(value["sealed_user_id"].as_str()?).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::testing::key;

    #[test]
    fn only_logins_sent_before_the_erasure_are_dropped() {
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let erased = ErasedUsers::with(Tokenizer::new(KeyId(1), &key(1)), "u-1", at);
        let before = at - time::Duration::seconds(1);
        let after = at + time::Duration::seconds(1);
        assert!(erased.erased("u-1", Some(before)));
        assert!(
            erased.erased("u-1", None),
            "an unknown send time counts as before"
        );
        assert!(
            !erased.erased("u-1", Some(after)),
            "a later login is new data"
        );
        assert!(!erased.erased("u-2", Some(before)));
        assert!(!erased.erased("u-1 ", Some(before)), "user ids are exact");
        assert!(!ErasedUsers::default().erased("u-1", Some(before)));
    }

    #[tokio::test]
    async fn a_witnessed_erasure_keeps_no_id_in_clear_and_opens_only_as_written() {
        use crate::vault::kms::memory::{MemoryKms, TEST_KMS_KEY};
        let kms = MemoryKms::new();
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_800_000_000_123_456_000).unwrap();
        let witnessed = WitnessedErasure::seal(&kms, TEST_KMS_KEY, "user-42", at, false)
            .await
            .unwrap();
        assert_eq!(witnessed.name(), "erasures/00001800000000123456.json");
        let json = witnessed.to_json();
        assert!(!String::from_utf8_lossy(&json).contains("user-42"));
        let read = WitnessedErasure::from_json(&json).unwrap();
        assert_eq!(read, witnessed);
        assert_eq!(read.open(&kms).await.unwrap(), "user-42");
        // Moved to another erasure's time (another object), it no longer opens.
        let mut moved = read.clone();
        moved.erased_at += time::Duration::microseconds(1);
        assert!(matches!(
            moved.open(&kms).await,
            Err(WitnessedErasureError::Unreadable(_))
        ));
        assert!(WitnessedErasure::from_json(b"{}").is_none());
    }
}
