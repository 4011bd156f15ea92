//! Following key rotations: the token key and data keys the batcher seals with (one data key
//! per retention window), moved off as soon as a rotation retires them, and the erasures and
//! retention windows that decide what is sealed under which.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use sqlx::PgPool;
use time::Date;
use tokio_util::sync::CancellationToken;

use super::settings::Settings;
use crate::retry::{Policy, retry};
use crate::telemetry::{self, retried};
use crate::vault::KeyId;
use crate::vault::erasure::ErasedUsers;
use crate::vault::keyring::{Keyring, KeyringError};
use crate::vault::kms::KeyWrapper;
use crate::vault::retention::{Placement, Window, Windows};
use crate::vault::seal::Sealer;
use crate::vault::token::Tokenizer;

/// Retries `attempt` while it fails transiently, unless shutdown is requested.
pub(super) async fn with_retry<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Result<T, KeyringError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, KeyringError>>,
{
    retry(
        Policy::forever().until(shutdown),
        KeyringError::is_transient,
        |error, delay| {
            telemetry::retry(retried::KEYS);
            tracing::warn!(error = %error, retry_in = ?delay, "{what} failed; retrying");
        },
        attempt,
    )
    .await
}

/// The batcher's keys: the token key, and this process's data keys, one per retention window
/// it seals for, with their usage.
pub(super) struct Keys<W> {
    pub(super) tokenizer: Tokenizer,
    pub(super) data_keys: Vec<DataKey>,
    /// Retention windows: which KMS key a login month's data keys are wrapped under.
    pub(super) windows: Windows,
    /// When the keys' states were last checked against the key table.
    checked: Instant,
    /// Set by a writer whose batch was refused because a key was retired or a user erased.
    retired: Arc<AtomicBool>,
    keyring: Arc<Keyring<W>>,
    /// Users erased so far, whose older logins keep no personal field.
    pub(super) erased: ErasedUsers,
    pool: PgPool,
}

/// A data key this process seals with, for one retention window (`None`: months without).
pub(super) struct DataKey {
    window: Option<Date>,
    pub(super) sealer: Sealer,
    pub(super) sealed: u64,
    created: Instant,
}

impl<W: KeyWrapper> Keys<W> {
    /// Loads the active token key, the retention windows and the erasure records, retrying
    /// transient faults until `shutdown`. `retired` is the flag a writer sets when a batch was
    /// refused for a retired key or a new erasure.
    pub(super) async fn load(
        keyring: Arc<Keyring<W>>,
        pool: PgPool,
        retired: Arc<AtomicBool>,
        shutdown: &CancellationToken,
    ) -> Result<Self, KeyringError> {
        let tokenizer = with_retry("loading the token key", shutdown, || {
            keyring.active_tokenizer()
        })
        .await?;
        let windows = with_retry("loading retention windows", shutdown, || async {
            Ok(Windows::load(&pool).await?)
        })
        .await?;
        let erased = with_retry("loading erasure records", shutdown, || {
            ErasedUsers::load(&pool, &keyring)
        })
        .await?;
        Ok(Self {
            tokenizer,
            data_keys: Vec::new(),
            windows,
            checked: Instant::now(),
            retired,
            keyring,
            erased,
            pool,
        })
    }

    /// Follows rotations, erasures and retention: every `key_check_interval` (or at once when
    /// a writer saw a retired key or a new erasure), moves off a token key that is no longer
    /// active, drops data keys that are not (a new one is made when next needed), and learns
    /// of users erased and windows expiring meanwhile.
    pub(super) async fn follow_changes(
        &mut self,
        settings: &Settings,
        shutdown: &CancellationToken,
    ) {
        let told = self.retired.swap(false, Ordering::Relaxed);
        if !told && self.checked.elapsed() < settings.key_check_interval {
            return;
        }
        self.follow_erasures(shutdown).await;
        let pool = &self.pool;
        match with_retry("loading retention windows", shutdown, || async {
            Ok(Windows::load(pool).await?)
        })
        .await
        {
            Ok(windows) => self.windows = windows,
            Err(error) => tracing::error!(%error, "cannot load retention windows"),
        }
        let keyring = self.keyring.clone();
        let token_key = self.tokenizer.key_id();
        let ids: Vec<KeyId> = std::iter::once(token_key)
            .chain(self.data_keys.iter().map(|k| k.sealer.key_id()))
            .collect();
        let active =
            match with_retry("checking key states", shutdown, || keyring.active(&ids)).await {
                Ok(active) => active,
                Err(error) => {
                    tracing::error!(%error, "cannot check key states; keeping the current keys");
                    return;
                }
            };
        self.checked = Instant::now();
        if !active.contains(&token_key) {
            match with_retry("loading the token key", shutdown, || {
                keyring.active_tokenizer()
            })
            .await
            {
                Ok(tokenizer) => {
                    tracing::info!(old = %token_key, new = %tokenizer.key_id(), "token key rotated");
                    self.tokenizer = tokenizer;
                }
                Err(error) => tracing::error!(%error, "cannot load the new token key"),
            }
        }
        let windows = &self.windows;
        self.data_keys.retain(|key| {
            let usable = active.contains(&key.sealer.key_id())
                && key.window.is_none_or(|starts| {
                    matches!(windows.placement(starts), Placement::Window(_))
                });
            if !usable {
                tracing::info!(data_key = %key.sealer.key_id(), "data key rotated or its window expiring; moving off it");
            }
            usable
        });
    }

    async fn follow_erasures(&mut self, shutdown: &CancellationToken) {
        let (pool, keyring) = (&self.pool, &self.keyring);
        let outdated = with_retry("checking erasure records", shutdown, || async {
            Ok(self.erased.outdated(pool).await?)
        })
        .await;
        if !matches!(outdated, Ok(false)) {
            match with_retry("loading erasure records", shutdown, || {
                ErasedUsers::load(pool, keyring)
            })
            .await
            {
                Ok(erased) => self.erased = erased,
                // Batches made with the old set are refused by the writers, never committed.
                Err(error) => tracing::error!(%error, "cannot load erasure records"),
            }
        }
    }

    /// The data key for `values` more values of `window`'s logins: the current one if it has
    /// room and is young enough, or a new one from KMS. A key is never taken past its limits:
    /// without a new one, nothing is sealed (and `/readyz` says so) until KMS answers again.
    pub(super) async fn room_for(
        &mut self,
        window: Option<&Window>,
        values: u64,
        settings: &Settings,
    ) -> Option<usize> {
        let starts = window.map(|w| w.starts);
        let current = self.data_keys.iter().position(|k| k.window == starts);
        if let Some(at) = current {
            let key = &self.data_keys[at];
            let over = key.sealed + values > settings.data_key_max_records
                || key.created.elapsed() >= settings.data_key_max_age;
            if !over {
                return Some(at);
            }
        }
        // One attempt per batch: the messages wait on the queue, not in this process.
        match self.keyring.new_sealer_in(window).await {
            Ok(sealer) => {
                tracing::info!(new = %sealer.key_id(), window = ?starts, "new data key");
                settings.sealing.clear();
                let key = DataKey {
                    window: starts,
                    sealer,
                    sealed: 0,
                    created: Instant::now(),
                };
                match current {
                    Some(at) => {
                        self.data_keys[at] = key;
                        Some(at)
                    }
                    None => {
                        self.data_keys.push(key);
                        Some(self.data_keys.len() - 1)
                    }
                }
            }
            Err(error) => {
                let why = format!(
                    "sealing stopped: no data key with room for window {starts:?} and KMS gave no new one ({error})"
                );
                tracing::error!("{why}; messages stay on the queue");
                settings.sealing.set(why);
                None
            }
        }
    }
}
