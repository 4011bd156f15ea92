//! Key rotation, online: while ingesters write, every stored row stays readable at every
//! moment, and an interrupted rotation (even kill -9) is finished by running it again.
//!
//! A rotation moves keys through `active -> retiring -> retired (-> destroyed)`
//! ([`KeyState`](crate::vault::key_table::KeyState)):
//! 1. the keys to replace are marked retiring; running ingesters notice within their
//!    `--key-check-seconds` and move to new keys (a retiring key still opens what it sealed);
//! 2. rows under retiring keys are rewritten under the new key in batches, one transaction each,
//!    walking the primary key, so every row is under the old key or the new one, never neither
//!    (`walk`, `rewrite`);
//! 3. after a grace period, a last pass catches rows that slow ingesters wrote meanwhile, and a
//!    key that no row references is retired under its exclusive key-use lock (an ingester
//!    holds that lock shared from before its inserts until it commits, and checks the key's
//!    state once it holds it, so no row can land under a retired key; see
//!    `vault::key_table::key_use`);
//! 4. `--destroy-retired` drops retired keys' wrapped bytes for good.
//!
//! Re-running a rotation first finishes any unfinished one (keys still retiring).

use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::LifecycleError;
use super::rewrite::{DataKeys, Scope, Targets, TokenKeys};
use super::walk::{Rotation, Tally, until_retired};
use crate::progress::Progress;
use crate::vault::key_cache::KeyCache;
use crate::vault::key_table;
use crate::vault::keyring::Keyring;
use crate::vault::kms::KeyWrapper;
use crate::vault::{KeyId, Purpose};

/// How a rotation runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rows per transaction.
    pub batch_size: i64,
    /// Time given to running ingesters to move off retiring keys before the last pass (at
    /// least their `--key-check-seconds`).
    pub grace: Duration,
    /// Drop the wrapped bytes of retired keys at the end.
    pub destroy_retired: bool,
    /// Values one new data key may seal; re-sealing starts another one past it.
    pub data_key_max_records: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            batch_size: 1_000,
            grace: Duration::from_secs(15),
            destroy_retired: false,
            data_key_max_records: 10_000_000,
        }
    }
}

/// What a rotation did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// False when there was nothing to rotate (and nothing unfinished).
    pub started_or_resumed: bool,
    pub rows_rewritten: u64,
    /// Working time: from the first page to the last, the grace wait left out.
    pub seconds: f64,
    /// The grace wait for running ingesters (none if the first pass outlasted the grace
    /// period).
    pub waited_seconds: f64,
    pub retired: Vec<KeyId>,
    pub destroyed: u64,
    /// The keys rows were moved to, in order (re-sealing starts a new data key every
    /// `data_key_max_records` values).
    pub new_keys: Vec<KeyId>,
}

impl Report {
    /// Rows per second of working time (the grace wait is not the rotation's speed).
    pub fn rows_per_second(&self) -> f64 {
        crate::progress::per_second(self.rows_rewritten, Duration::from_secs_f64(self.seconds))
    }
}

/// Replaces the keys of `purpose` under every stored row, and retires the old ones:
/// - [`Purpose::Data`]: every data key; all sealed values (logins and quarantined bodies) are
///   re-sealed under a new one;
/// - [`Purpose::Token`]: the token key; every stored token is recomputed from the opened
///   original under a new token key. Rows record their token key version throughout
///   (`user_logins.token_key_id`), so a query can tell old tokens from new ones meanwhile.
pub async fn replace_keys<W: KeyWrapper>(
    purpose: Purpose,
    pool: &PgPool,
    keyring: &Keyring<W>,
    options: &Options,
    progress: &dyn Progress,
) -> Result<Report, LifecycleError> {
    match purpose {
        Purpose::Data => {
            let start = async { Ok(key_table::start_data_rotation(pool).await?) };
            let retiring = Retiring::resume_or_start(pool, options, purpose, start).await?;
            if retiring.keys.is_empty() {
                // No data key was active: there is nothing to replace.
                return Ok(Report::default());
            }
            let rotation = DataKeys {
                scope: retiring.scope(keyring),
                keys: KeyCache::default(),
                targets: Targets::new(pool, options.data_key_max_records).await?,
            };
            let rows = "SELECT (SELECT count(*) FROM login_vault WHERE data_key_id = ANY($1))
                             + (SELECT count(*) FROM quarantine WHERE data_key_id = ANY($1))";
            let new_keys = |rotation: DataKeys<W>| rotation.targets.made;
            let phase = "re-encrypting";
            retiring
                .walk(phase, rows, progress, rotation, new_keys)
                .await
        }
        Purpose::Token => {
            // Fails if no token key is active (`rotate-keys init` makes the first one).
            let start = async {
                keyring.rotate_token_key().await?;
                Ok(key_table::retiring(pool, Purpose::Token).await?)
            };
            let retiring = Retiring::resume_or_start(pool, options, purpose, start).await?;
            let target = keyring.active_tokenizer().await?;
            let new_key = target.key_id();
            let rotation = TokenKeys {
                scope: retiring.scope(keyring),
                keys: KeyCache::default(),
                target,
            };
            let rows = "SELECT count(*) FROM user_logins WHERE token_key_id = ANY($1)";
            let new_keys = |_| vec![new_key];
            let phase = "re-tokenizing";
            retiring
                .walk(phase, rows, progress, rotation, new_keys)
                .await
        }
    }
}

/// A rotation of `purpose` keys under way: the keys it retires, and until when running
/// ingesters may still write under them.
struct Retiring<'a> {
    pool: &'a PgPool,
    options: &'a Options,
    purpose: Purpose,
    keys: Vec<i64>,
    grace_ends: Instant,
}

impl<'a> Retiring<'a> {
    /// The keys of `purpose` an unfinished rotation left `retiring`, so that it is finished
    /// first; or else those `start` marks `retiring` now.
    async fn resume_or_start(
        pool: &'a PgPool,
        options: &'a Options,
        purpose: Purpose,
        start: impl Future<Output = Result<Vec<i64>, LifecycleError>>,
    ) -> Result<Self, LifecycleError> {
        let mut keys = key_table::retiring(pool, purpose).await?;
        if keys.is_empty() {
            keys = start.await?;
        } else {
            tracing::info!(keys = ?keys, "resuming an unfinished {purpose} key rotation");
        }
        Ok(Self {
            pool,
            options,
            purpose,
            keys,
            grace_ends: Instant::now() + options.grace,
        })
    }

    fn scope<'s, W>(&'s self, keyring: &'s Keyring<W>) -> Scope<'s, W> {
        Scope {
            pool: self.pool,
            keyring,
            retiring: &self.keys,
            batch_size: self.options.batch_size,
        }
    }

    /// Walks `rotation` until the keys are retired, telling `progress` how far `phase` is
    /// through the rows under them (counted by `rows`, `$1` the keys), then drops the retired
    /// keys' bytes if asked. The report names the keys rows were moved to (`new_keys`).
    async fn walk<R: Rotation>(
        &self,
        phase: &str,
        rows: &str,
        progress: &dyn Progress,
        mut rotation: R,
        new_keys: impl FnOnce(R) -> Vec<KeyId>,
    ) -> Result<Report, LifecycleError> {
        let total: i64 = sqlx::query_scalar(rows)
            .bind(&self.keys)
            .fetch_one(self.pool)
            .await?;
        let mut tally = Tally::new(phase, total as u64, progress);
        let retired = until_retired(&mut rotation, self.grace_ends, &mut tally).await?;
        let walked = tally.finish();
        let destroyed = if self.options.destroy_retired {
            key_table::destroy_retired(self.pool, self.purpose).await?
        } else {
            0
        };
        Ok(Report {
            started_or_resumed: true,
            rows_rewritten: walked.rows,
            seconds: walked.working.as_secs_f64(),
            waited_seconds: walked.waited.as_secs_f64(),
            retired,
            destroyed,
            new_keys: new_keys(rotation),
        })
    }
}
