//! The pipeline's stages: pollers receive, the batcher validates, tokenizes and seals,
//! writers commit each batch and acknowledge exactly what committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::PgPool;
use time::{Date, OffsetDateTime};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::batch::{self, Batch};
use super::keys::Keys;
use super::settings::Settings;
use super::source::{Message, MessageSource, Receipt, SourceError};
use super::stats::{Stats, add};
use super::writer::{self, WriteError};
use crate::retry::{Backoff, Policy, retry};
use crate::telemetry::readiness::Condition;
use crate::telemetry::{self, retried};
use crate::vault::kms::KeyWrapper;
use crate::vault::retention::{Placement, Windows};

/// Whether the test-only failpoint `name` is set in `PII_VAULT_FAILPOINT` (read once). Tests
/// use it to crash a real ingest process exactly inside a window that timing cannot hit.
fn failpoint_set(name: &str) -> bool {
    static FAILPOINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAILPOINT
        .get_or_init(|| std::env::var("PII_VAULT_FAILPOINT").ok())
        .as_deref()
        == Some(name)
}

/// Receives until shutdown or, in `drain`, until the source is empty; fails only in `drain`,
/// on a fault that cannot pass.
pub(super) async fn poll<S: MessageSource>(
    source: Arc<S>,
    messages: mpsc::Sender<Message>,
    drain: bool,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(), SourceError> {
    loop {
        // Every fault is retried (a configuration error too: it may be fixed meanwhile),
        // except, in `drain`, one that cannot pass: then there is nothing to wait for.
        let received = retry(
            Policy::forever().until(&shutdown),
            |error: &SourceError| !drain || error.transient,
            |error, delay| {
                telemetry::retry(retried::RECEIVE);
                if error.transient {
                    tracing::warn!(%error, retry_in = ?delay, "receive failed; retrying");
                } else {
                    tracing::error!(%error, retry_in = ?delay, "receive failed; retrying");
                }
            },
            || async {
                tokio::select! {
                    _ = shutdown.cancelled() => Ok(None),
                    received = source.receive() => received.map(Some),
                }
            },
        )
        .await;
        match received {
            Ok(None) => return Ok(()),
            Ok(Some(batch)) if batch.is_empty() => {
                if drain {
                    return Ok(());
                }
            }
            Ok(Some(batch)) => {
                add(&stats.received, telemetry::RECEIVED, batch.len() as u64);
                for message in batch {
                    // Fails only when the batcher is gone, i.e. the pipeline is stopping; the
                    // message was not acknowledged and will be redelivered.
                    if messages.send(message).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Err(error) if drain && !error.transient => {
                // Nothing to wait for (a file that cannot be read): stop, and fail the run.
                tracing::error!(%error, "message source failed");
                return Err(error);
            }
            // Any other fault is retried: it ended the retries only because shutdown came.
            Err(_) => return Ok(()),
        }
    }
}

pub(super) async fn make_batches<W: KeyWrapper>(
    mut messages: mpsc::Receiver<Message>,
    batches: mpsc::Sender<Batch>,
    keys: &mut Keys<W>,
    settings: &Settings,
    undated_day: Option<Date>,
    stats: &Stats,
    shutdown: &CancellationToken,
) {
    let mut pending = Vec::with_capacity(settings.batch_size);
    let mut backoff = Backoff::default();
    loop {
        // Wait for the first message of a batch, then fill it until it is full or old enough.
        let Some(first) = messages.recv().await else {
            return;
        };
        let deadline = tokio::time::Instant::now() + settings.flush_interval;
        pending.push(first);
        while pending.len() < settings.batch_size {
            match tokio::time::timeout_at(deadline, messages.recv()).await {
                Ok(Some(message)) => pending.push(message),
                Ok(None) | Err(_) => break,
            }
        }
        keys.follow_changes(settings, shutdown).await;
        // One batch per retention window the messages fall in (nearly always one).
        let batches_of_window = by_window(std::mem::take(&mut pending), &keys.windows, undated_day);
        for (placement, messages) in batches_of_window {
            let window = match placement {
                Placed::Window(starts) => keys.windows.get(starts).cloned(),
                Placed::Expired | Placed::Unwindowed => None,
            };
            let window = window.as_ref();
            // At most two values per message (a login's ip and device id).
            let values = 2 * messages.len() as u64;
            let Some(at) = keys.room_for(window, values, settings).await else {
                // Not sealed, so not written and not acknowledged: a queue hands them out again
                // after their visibility timeout; a file's run reports them as not written.
                metrics::counter!(telemetry::SEALING_REFUSED).increment(messages.len() as u64);
                add(
                    &stats.left_on_queue,
                    telemetry::LEFT_ON_QUEUE,
                    messages.len() as u64,
                );
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            };
            backoff.reset();
            let mut batch = batch::build(
                messages,
                &keys.tokenizer,
                &keys.data_keys[at].sealer,
                &keys.erased,
                placement == Placed::Expired,
            );
            if let Some(day) = undated_day {
                batch.date_undated_logins(day);
            }
            keys.data_keys[at].sealed +=
                2 * batch.logins.len() as u64 + batch.quarantined.len() as u64;
            if batches.send(batch).await.is_err() {
                return;
            }
        }
    }
}

/// Where a group of messages goes: a window by its first day, or a [`Placement`] without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    Window(Date),
    Expired,
    Unwindowed,
}

/// Groups messages by the retention window of their login date (the send date, as the row
/// will have it), keeping their order within each group.
/// Messages without a send time are placed by `undated_day` (their source's), or today.
fn by_window(
    messages: Vec<Message>,
    windows: &Windows,
    undated_day: Option<Date>,
) -> Vec<(Placed, Vec<Message>)> {
    let undated = undated_day.unwrap_or_else(|| OffsetDateTime::now_utc().date());
    let mut groups: Vec<(Placed, Vec<Message>)> = Vec::new();
    // Consecutive messages nearly always share a date: look the window up once per date.
    let mut last: Option<(Date, Placed)> = None;
    for message in messages {
        let date = message.sent_at.map_or(undated, |sent| sent.date());
        let placed = match last {
            Some((seen, placed)) if seen == date => placed,
            _ => {
                let placed = match windows.placement(date) {
                    Placement::Window(window) => Placed::Window(window.starts),
                    Placement::Expired => Placed::Expired,
                    Placement::Unwindowed => Placed::Unwindowed,
                };
                last = Some((date, placed));
                placed
            }
        };
        match groups.iter_mut().find(|(p, _)| *p == placed) {
            Some((_, group)) => group.push(message),
            None => groups.push((placed, vec![message])),
        }
    }
    groups
}

pub(super) async fn write_batches<S: MessageSource>(
    batches: Arc<Mutex<mpsc::Receiver<Batch>>>,
    source: Arc<S>,
    pool: PgPool,
    stats: Arc<Stats>,
    keys_retired: Arc<AtomicBool>,
    storage: Arc<Condition>,
) {
    loop {
        // Hold the lock only while taking a batch, so the writers share one queue.
        let next = batches.lock().await.recv().await;
        let Some(batch) = next else { return };
        let writing = Writing {
            pool: &pool,
            stats: &stats,
            keys_retired: &keys_retired,
            storage: &storage,
        };
        write_and_acknowledge(batch, source.as_ref(), writing).await;
    }
}

/// What every writer shares.
#[derive(Clone, Copy)]
struct Writing<'w> {
    pool: &'w PgPool,
    stats: &'w Stats,
    keys_retired: &'w AtomicBool,
    /// Set while a login's month has no partition, for `/readyz`.
    storage: &'w Condition,
}

/// Writes a batch (retrying faults, splitting it to isolate a bad message) and acknowledges
/// exactly the messages that committed.
async fn write_and_acknowledge<S: MessageSource>(batch: Batch, source: &S, writing: Writing<'_>) {
    let Writing {
        pool,
        stats,
        keys_retired,
        storage,
    } = writing;
    let mut work = vec![batch];
    while let Some(batch) = work.pop() {
        match write_with_retry(pool, &batch, stats).await {
            Ok(written) => {
                storage.clear();
                add(&stats.stored, telemetry::STORED, written.stored);
                add(
                    &stats.quarantined,
                    telemetry::QUARANTINED,
                    written.quarantined,
                );
                // A message delivered twice within the batch was folded into one row: its
                // extra deliveries are duplicates too, so the counts add up to `received`.
                let receipts = batch.receipts();
                let folded = receipts.len() - batch.len();
                add(
                    &stats.duplicates,
                    telemetry::DUPLICATES,
                    written.duplicates + folded as u64,
                );
                metrics::histogram!(telemetry::BATCH_SIZE).record(batch.len() as f64);
                let mut latency = None;
                for delivery in batch.deliveries() {
                    let elapsed = delivery.first_read.elapsed();
                    stats.read_to_commit.record(elapsed);
                    latency = latency.max(Some(elapsed));
                }
                tracing::debug!(
                    messages = batch.len(),
                    stored = written.stored,
                    quarantined = written.quarantined,
                    duplicates = written.duplicates,
                    read_to_commit = ?latency.unwrap_or_default(),
                    "batch committed"
                );
                if failpoint_set("exit-after-commit") {
                    // The crash window between COMMIT and DeleteMessageBatch (tests only).
                    tracing::warn!("failpoint exit-after-commit: aborting before the delete");
                    std::process::abort();
                }
                acknowledge(source, receipts, stats).await;
            }
            Err(refused @ (WriteError::KeyRetired | WriteError::ErasuresChanged)) => {
                // Sealed under a key a rotation has just retired, or made before an erasure:
                // the messages stay on the queue and come back to be made again.
                tracing::warn!(
                    messages = batch.len(),
                    "batch refused ({refused}); it will be redelivered"
                );
                keys_retired.store(true, Ordering::Relaxed);
                add(
                    &stats.left_on_queue,
                    telemetry::LEFT_ON_QUEUE,
                    batch.len() as u64,
                );
            }
            Err(WriteError::NoPartition { month }) if batch.all_of_month(&month) => {
                // Splitting the batch would not help: each of its logins is refused alike.
                let why = WriteError::NoPartition { month }.to_string();
                tracing::error!(
                    messages = batch.len(),
                    "{why}; the messages stay on the queue"
                );
                storage.set(why);
                add(
                    &stats.left_on_queue,
                    telemetry::LEFT_ON_QUEUE,
                    batch.len() as u64,
                );
            }
            Err(error) if batch.len() > 1 => {
                tracing::warn!(error = %error, messages = batch.len(), "batch failed; splitting it to isolate the cause");
                let (front, back) = batch.split();
                work.push(back);
                work.push(front);
            }
            Err(error) => {
                let message_id = batch
                    .logins
                    .first()
                    .map(|r| r.message_id.as_str())
                    .or_else(|| batch.quarantined.first().map(|r| r.message_id.as_str()))
                    .unwrap_or_default();
                tracing::error!(
                    error = %error,
                    message_id,
                    "message cannot be written; left on the queue (the redrive policy moves it to the dead-letter queue)"
                );
                add(
                    &stats.left_on_queue,
                    telemetry::LEFT_ON_QUEUE,
                    batch.len() as u64,
                );
            }
        }
    }
}

/// Retries transient database faults with back-off for as long as they last.
async fn write_with_retry(
    pool: &PgPool,
    batch: &Batch,
    stats: &Stats,
) -> Result<writer::Written, WriteError> {
    retry(
        Policy::forever(),
        |error: &WriteError| {
            matches!(error, WriteError::Database(error) if crate::db::is_transient(error))
        },
        |error, delay| {
            stats.write_retries.fetch_add(1, Ordering::Relaxed);
            telemetry::retry(retried::DATABASE_WRITE);
            tracing::warn!(%error, retry_in = ?delay, "database write failed; retrying");
        },
        || async {
            loop {
                // Not a fault: written again at once, the batch skips what the other stored.
                match writer::write(pool, batch).await {
                    Err(WriteError::Raced) => tracing::debug!(
                        "a message of the batch was stored by another writer; writing the rest"
                    ),
                    result => return result,
                }
            }
        },
    )
    .await
}

/// Deletes committed messages, retrying a few times: a message whose delete is lost is
/// redelivered later and recognized as already stored.
async fn acknowledge<S: MessageSource>(source: &S, receipts: Vec<Receipt>, stats: &Stats) {
    let acknowledged = retry(
        Policy::at_most(5),
        |error: &SourceError| error.transient,
        |error, delay| {
            telemetry::retry(retried::ACKNOWLEDGE);
            tracing::warn!(%error, retry_in = ?delay, "acknowledge failed; retrying");
        },
        || source.acknowledge(receipts.clone()),
    )
    .await;
    match acknowledged {
        Ok(outcome) => add(
            &stats.acknowledged,
            telemetry::DELETED,
            outcome.deleted as u64,
        ),
        Err(error) => {
            tracing::error!(%error, messages = receipts.len(), "acknowledge failed; the messages will be redelivered and skipped as duplicates");
        }
    }
}
