//! The walk over the rows under a rotation's retiring keys, a page at a time through the key
//! admin's doors, and its progress (told to the caller, never printed).

use std::time::Instant;

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Transaction};

use super::admin::{destroy_retired, retire_unused};
use super::{Options, Progress, Report, RotateError};
use crate::vault::KeyId;
use crate::vault::keyring::Keyring;
use crate::vault::kms::KeyWrapper;

/// Rows rewritten so far out of the total, told to the caller's [`Progress`] after every page.
pub(super) struct Tally<'a> {
    total: u64,
    done: u64,
    started: Instant,
    progress: &'a dyn Progress,
}

impl<'a> Tally<'a> {
    pub(super) fn new(total: u64, progress: &'a dyn Progress) -> Self {
        Self {
            total,
            done: 0,
            started: Instant::now(),
            progress,
        }
    }

    pub(super) fn advance(&mut self, rows: u64) {
        self.done += rows;
        self.progress.advance(self.done, self.total);
    }

    /// The rows done and when the walk started, once the caller is told it is over.
    fn finish(self) -> (u64, Instant) {
        self.progress.finish(self.done, self.total);
        (self.done, self.started)
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
        tally: Tally<'_>,
        retired: Vec<KeyId>,
        new_keys: Vec<KeyId>,
    ) -> Result<Report, RotateError> {
        let (rows_rewritten, started) = tally.finish();
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
