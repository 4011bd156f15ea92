//! The walk over the rows under a rotation's retiring keys, a page at a time through the key
//! admin's doors, and its progress.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Transaction};

use super::admin::{destroy_retired, retire_unused};
use super::{Options, Report, RotateError};
use crate::vault::KeyId;
use crate::vault::keyring::Keyring;
use crate::vault::kms::KeyWrapper;

/// Rows done out of a total, shown on a terminal or logged every few seconds.
pub(super) struct Progress {
    label: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    last_shown: Instant,
    terminal: bool,
}

impl Progress {
    pub(super) fn new(label: &'static str, total: u64) -> Self {
        Self {
            label,
            total,
            done: 0,
            started: Instant::now(),
            last_shown: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    pub(super) fn advance(&mut self, rows: u64) {
        self.done += rows;
        let every = if self.terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if self.last_shown.elapsed() >= every {
            self.show();
        }
    }

    fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn show(&mut self) {
        self.last_shown = Instant::now();
        let (label, done, total, rate) = (self.label, self.done, self.total, self.rate());
        if self.terminal {
            eprint!("\r{label}: {done}/{total} rows ({rate:.0} rows/s)   ");
        } else {
            tracing::info!(done, total, rows_per_second = rate as u64, "{label}");
        }
    }

    fn finish(mut self) {
        self.show();
        if self.terminal {
            eprintln!();
        }
    }
}

/// One rotation's walk over the rows under its retiring keys: in primary-key order, a page of
/// `batch_size` rows at a time, each handed out by the key admin's door (which audits it and
/// locks the page, `SKIP LOCKED`: rows an ingester is still writing are caught by a later
/// pass) and rewritten in a transaction of its own.
pub(super) struct Walk<'a, W> {
    pub(super) pool: &'a PgPool,
    pub(super) keyring: &'a Keyring<W>,
    pub(super) retiring: &'a [i64],
    pub(super) options: &'a Options,
    /// Until then, running ingesters may still be writing under the retiring keys.
    pub(super) grace_ends: Instant,
}

impl<W: KeyWrapper> Walk<'_, W> {
    /// The page after `*after` and its open transaction, or `None` at the end; moves `*after`
    /// to the page's last id. `select` binds `$1` = after, `$2` = the page size, `$3` = the
    /// retiring keys.
    pub(super) async fn page<R>(
        &self,
        select: &str,
        after: &mut i64,
        id_of: fn(&R) -> i64,
    ) -> Result<Option<(Transaction<'static, Postgres>, Vec<R>)>, RotateError>
    where
        R: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
    {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<R> = sqlx::query_as(select)
            .bind(*after)
            .bind(self.options.batch_size)
            .bind(self.retiring)
            .fetch_all(&mut *tx)
            .await?;
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        *after = id_of(last);
        Ok(Some((tx, rows)))
    }

    /// After a pass: `None` while the grace period lasts (its rest is slept, then one more pass
    /// is due), then the retired keys once no row uses them (`None` if an ingester wrote a row
    /// under them meanwhile: another pass).
    pub(super) async fn retire_if_unused(
        &self,
        unused_sql: &str,
    ) -> Result<Option<Vec<KeyId>>, RotateError> {
        let now = Instant::now();
        if now < self.grace_ends {
            tokio::time::sleep(self.grace_ends - now).await;
            return Ok(None);
        }
        retire_unused(self.pool, self.retiring, unused_sql).await
    }

    /// The report of a finished rotation of `purpose` keys, once the retired keys' bytes are
    /// dropped if asked.
    pub(super) async fn finish(
        &self,
        purpose: &str,
        progress: Progress,
        retired: Vec<KeyId>,
        new_keys: Vec<KeyId>,
    ) -> Result<Report, RotateError> {
        let (rows_rewritten, started) = (progress.done, progress.started);
        progress.finish();
        let destroyed = destroy_retired(self.pool, purpose, self.options.destroy_retired).await?;
        Ok(Report {
            started_or_resumed: true,
            rows_rewritten,
            seconds: started.elapsed().as_secs_f64(),
            retired,
            destroyed,
            new_keys,
        })
    }
}
