//! The ingest pipeline.
//!
//! ```text
//! pollers (N) --messages--> batcher --batches--> writers (W) --> acknowledge
//!  receive        bounded    validate, tokenize,  bounded   one transaction     delete exactly
//!                 channel    seal (CPU, µs)       channel   per batch           what committed
//! ```
//!
//! Bounded channels carry back-pressure: a slow database slows the writers, which slows the
//! batcher, which stops the pollers from receiving, so memory stays flat whatever the backlog.
//!
//! A message is acknowledged only after its row or quarantine entry has committed. A database
//! fault is retried with back-off for as long as it lasts; a batch that fails for another
//! reason is split until the message at fault is alone, and that message is left on the queue
//! (SQS's redrive policy moves it to the dead-letter queue after a few attempts).
//!
//! Shutdown (the `shutdown` token): the pollers stop receiving, everything already received is
//! written and acknowledged, and [`run`] returns. Whatever was not committed simply comes back
//! after its visibility timeout.
//!
//! Where each job lives: [`Settings`] in `settings.rs`; the stages (pollers, batcher, writers
//! and acknowledging) in `stages.rs`; following key rotations, erasures and retention windows
//! in `keys.rs`; the counters of a run and its [`Summary`] in `stats.rs`. Every fault that passes
//! is retried by the one loop of [`crate::retry::retry`].

pub mod batch;
pub mod readiness;
pub mod replay;
pub mod source;
pub mod writer;

mod keys;
mod settings;
mod stages;
mod stats;

pub use settings::Settings;
pub use stats::{Stats, Summary};

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::vault::keyring::{Keyring, KeyringError};
use crate::vault::kms::KeyWrapper;
use batch::Batch;
use keys::Keys;
use source::{Message, MessageSource};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("loading keys: {0}")]
    Keys(#[from] KeyringError),
    #[error("message source failed: {0}")]
    Source(#[from] source::SourceError),
    #[error("looking up the day the file's lines are dated: {0}")]
    SourceDay(#[source] KeyringError),
}

/// Runs the pipeline until `shutdown` is cancelled or, with `drain`, the source runs dry,
/// counting into `stats` (a fresh `Arc::default()` unless the caller watches it, e.g. to serve
/// [`Stats::read_to_commit`] at `/metrics`) and returning their final [`Summary`].
pub async fn run<S: MessageSource, W: KeyWrapper>(
    source: Arc<S>,
    pool: PgPool,
    keyring: Keyring<W>,
    settings: Settings,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<Summary, IngestError> {
    // Retried as the batcher's other start-up state is (`Keys::load`).
    let undated_day = match source.undated_source_key() {
        Some(key) => Some(
            keys::with_retry("recording the file's first day", &shutdown, || async {
                Ok(writer::first_day(&pool, key).await?)
            })
            .await
            .map_err(IngestError::SourceDay)?,
        ),
        None => None,
    };
    let keys_retired = Arc::new(AtomicBool::new(false));
    let mut keys = Keys::load(
        Arc::new(keyring),
        pool.clone(),
        keys_retired.clone(),
        &shutdown,
    )
    .await?;
    tracing::info!(
        token_key = %keys.tokenizer.key_id(),
        pollers = settings.pollers,
        writers = settings.writers,
        batch_size = settings.batch_size,
        "ingest started"
    );

    let tasks = TaskTracker::new();
    let (message_tx, message_rx) = mpsc::channel::<Message>(settings.batch_size * 2);
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(settings.writers.max(1));
    let batch_rx = Arc::new(Mutex::new(batch_rx));

    let pollers: Vec<_> = (0..settings.pollers.max(1))
        .map(|_| {
            tasks.spawn(stages::poll(
                source.clone(),
                message_tx.clone(),
                settings.drain,
                shutdown.clone(),
                stats.clone(),
            ))
        })
        .collect();
    drop(message_tx);

    let batcher_settings = settings.clone();
    let batcher_shutdown = shutdown.clone();
    let batcher_stats = stats.clone();
    tasks.spawn(async move {
        stages::make_batches(
            message_rx,
            batch_tx,
            &mut keys,
            &batcher_settings,
            undated_day,
            &batcher_stats,
            &batcher_shutdown,
        )
        .await
    });

    for _ in 0..settings.writers.max(1) {
        tasks.spawn(stages::write_batches(
            batch_rx.clone(),
            source.clone(),
            pool.clone(),
            stats.clone(),
            keys_retired.clone(),
            settings.storage.clone(),
        ));
    }
    tasks.close();
    tasks.wait().await;
    // A source that cannot recover (a file that failed to read, in `drain`) fails the run,
    // once everything received before has been written.
    for poller in pollers {
        if let Ok(Err(failure)) = poller.await {
            return Err(IngestError::Source(failure));
        }
    }
    let summary = stats.summary();
    tracing::info!(%summary, "ingest finished");
    Ok(summary)
}
