//! What `ingest` polls while it serves `/metrics`, for [`telemetry::observed`]: the queue's
//! depth, when the keys it uses were created, and when the audit was last checkpointed.
//!
//! Everything here is what the ingester may already read: its source's depth (through
//! `SourceHealth`; SQS: GetQueueAttributes on its queue), the key table's `created_at` (never
//! the wrapped bytes), and the audit's newest checkpoint time through
//! `audit_last_checkpoint_at()` (migration 0016). A poll that fails is logged once
//! until one succeeds again; a failing queue poll hides the depth after a while
//! (`observed::QUEUE_DEPTH_STALE`), and `/readyz` says what is wrong.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pii_vault::ingest::source::SourceHealth;
use pii_vault::telemetry::observed::KeyPurpose;
use pii_vault::telemetry::{observed, process};
use pii_vault::vault::key_table;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Often enough for a depth to follow a backlog; SQS's counts lag by about a minute anyway.
pub const INTERVAL: Duration = Duration::from_secs(15);

/// A data key is this process's if it was made after the process started, give or take this
/// much of clock skew between this host and the database (a restarted container keeps its
/// host name and pid, so `created_by` alone could name a predecessor's key).
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Polls until `stop`. `created_by` is the name the process's keyring writes into the data
/// keys it makes.
pub async fn run(
    queue: Option<Arc<dyn SourceHealth>>,
    pool: PgPool,
    created_by: String,
    stop: CancellationToken,
) {
    let started = process::start_time().unwrap_or_else(SystemTime::now);
    let since = started.checked_sub(CLOCK_SKEW).unwrap_or(started);
    let since = seconds(since);
    let mut failing = Failing::default();
    loop {
        if let Some(queue) = &queue {
            let depth = queue.depth().await;
            if let Ok(depth) = &depth {
                observed().set_queue_depth(*depth);
            }
            failing.note("queue depth", depth.map(drop).map_err(|e| e.message));
        }
        let keys = key_table::creation_times(&pool, &created_by, since).await;
        if let Ok((token, data)) = keys {
            observed().set_key_created(KeyPurpose::Token, token);
            observed().set_key_created(KeyPurpose::Data, data);
        }
        failing.note("key ages", keys.map(drop).map_err(|e| e.to_string()));
        let checkpoint = sqlx::query_scalar::<_, Option<f64>>(
            "SELECT extract(epoch FROM audit_last_checkpoint_at())::float8",
        )
        .fetch_one(&pool)
        .await;
        if let Ok(signed_at) = checkpoint {
            observed().set_audit_checkpoint(signed_at);
        }
        failing.note(
            "audit checkpoint time",
            checkpoint.map(drop).map_err(|e| e.to_string()),
        );
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

fn seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// Which polls are failing, so each failure is logged when it starts and when it ends, not
/// every [`INTERVAL`].
#[derive(Default)]
struct Failing(Vec<&'static str>);

impl Failing {
    fn note(&mut self, what: &'static str, outcome: Result<(), String>) {
        let was = self.0.contains(&what);
        match outcome {
            Err(error) if !was => {
                tracing::warn!(%error, "metrics: polling the {what} failed; retrying every {}s", INTERVAL.as_secs());
                self.0.push(what);
            }
            Ok(()) if was => {
                tracing::info!("metrics: polling the {what} works again");
                self.0.retain(|w| *w != what);
            }
            _ => {}
        }
    }
}
