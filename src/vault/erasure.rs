//! Erased users, as an ingester must know them: the tokens of their user ids (never the ids),
//! each with the time of the erasure, under the token keys the records were made with.
//!
//! A login whose user was erased *after* the login was sent (a message in flight or in the
//! dead-letter queue during the erasure) is stored without its personal fields: no tokens, no
//! sealed values. A login sent after the erasure is new data and is stored as usual.

use std::collections::HashMap;

use sqlx::PgPool;
use time::OffsetDateTime;

use super::KeyId;
use super::keyring::{Keyring, KeyringError};
use super::kms::KeyWrapper;
use super::token::Tokenizer;

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
        for (id, key, token, at) in records {
            erased.newest = erased.newest.max(id);
            let slot = match erased
                .by_key
                .iter()
                .position(|(t, _)| t.key_id() == KeyId(key))
            {
                Some(slot) => slot,
                None => {
                    erased
                        .by_key
                        .push((keyring.tokenizer(KeyId(key)).await?, HashMap::new()));
                    erased.by_key.len() - 1
                }
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
}
