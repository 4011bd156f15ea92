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

pub mod batch;
pub mod file;
pub mod readiness;
pub mod source;
pub mod sqs;
pub mod sqs_query;
pub mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use time::{Date, OffsetDateTime};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::retry::Backoff;
use crate::telemetry::readiness::Condition;
use crate::telemetry::{self, retried};
use crate::vault::KeyId;
use crate::vault::erasure::ErasedUsers;
use crate::vault::keyring::{Keyring, KeyringError};
use crate::vault::kms::KeyWrapper;
use crate::vault::retention::{Placement, Window, Windows};
use crate::vault::seal::Sealer;
use crate::vault::token::Tokenizer;
use batch::Batch;
use source::{Message, MessageSource, Receipt};
use writer::WriteError;

/// How the pipeline runs. Every field has a flag in `ingest` (see its `--help`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Concurrent receive loops.
    pub pollers: usize,
    /// Concurrent writer connections.
    pub writers: usize,
    /// Most messages in one transaction.
    pub batch_size: usize,
    /// Longest a received message waits for its batch to fill.
    pub flush_interval: Duration,
    /// Stop once a receive comes back empty, instead of waiting for a shutdown signal.
    pub drain: bool,
    /// Seal at most this many values under one data key before making a new one (at least
    /// two per message of a full batch). A key over its record or age limit seals nothing
    /// more: without a new key from KMS, messages stay on the queue.
    pub data_key_max_records: u64,
    /// Use one data key at most this long.
    pub data_key_max_age: Duration,
    /// How often to check that the token key and data key in use are still active, so that a
    /// rotation (`rotate-keys`) is followed within this bound.
    pub key_check_interval: Duration,
    /// Set while sealing is stopped, for `/readyz`.
    pub sealing: Arc<Condition>,
}

impl Settings {
    /// For a file (`ingest --from-file`): every line is there to be read, so batches fill at
    /// once; bigger ones and one more writer keep PostgreSQL busy (README.md, "Performance").
    pub fn for_file() -> Self {
        Self {
            writers: 4,
            batch_size: 4_000,
            ..Self::default()
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            pollers: 4,
            writers: 2,
            batch_size: 500,
            flush_interval: Duration::from_millis(100),
            drain: false,
            data_key_max_records: 10_000_000,
            data_key_max_age: Duration::from_secs(24 * 3600),
            key_check_interval: Duration::from_secs(5),
            sealing: Arc::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("loading keys: {0}")]
    Keys(#[from] KeyringError),
    #[error("message source failed: {0}")]
    Source(#[from] source::SourceError),
}

/// Counters of one run.
#[derive(Debug, Default)]
pub struct Stats {
    received: AtomicU64,
    stored: AtomicU64,
    quarantined: AtomicU64,
    duplicates: AtomicU64,
    acknowledged: AtomicU64,
    /// Messages whose batch could not be written: left on the queue to be redelivered.
    left_on_queue: AtomicU64,
    write_retries: AtomicU64,
    /// Read-to-commit latency of every stored or quarantined message.
    latency: LatencyHistogram,
    /// Why a source that cannot recover (a file that failed to read) stopped, in `--drain`.
    source_failure: std::sync::Mutex<Option<source::SourceError>>,
}

/// Latencies in buckets a quarter of a power of two wide (about 19% apart), from 1 µs up.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; 128],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        let micros = latency.as_micros().max(1) as f64;
        let bucket = ((micros.log2() * 4.0) as usize).min(self.buckets.len() - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The upper bound of the bucket holding quantile `q` (0 to 1), or zero with no samples.
    pub fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_nanos((2f64.powf((bucket + 1) as f64 / 4.0) * 1e3) as u64);
            }
        }
        Duration::MAX
    }
}

/// A snapshot of [`Stats`]. Once a run has ended,
/// `received == stored + quarantined + duplicates + left_on_queue`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Deliveries read from the source (a redelivered message counts each time).
    pub received: u64,
    /// New rows in `user_logins`.
    pub stored: u64,
    /// New rows in `quarantine`.
    pub quarantined: u64,
    /// Deliveries of messages already stored or quarantined.
    pub duplicates: u64,
    /// Deliveries deleted from the source after their batch committed.
    pub acknowledged: u64,
    /// Messages whose batch could not be written: left to be redelivered.
    pub left_on_queue: u64,
    /// Database writes retried after a transient fault.
    pub write_retries: u64,
    /// Read-to-commit latency quantiles (to about 19%).
    pub p50: Duration,
    pub p99: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received={} stored={} quarantined={} duplicates={} acknowledged={} left_on_queue={} write_retries={} p50_ms={:.1} p99_ms={:.1}",
            self.received,
            self.stored,
            self.quarantined,
            self.duplicates,
            self.acknowledged,
            self.left_on_queue,
            self.write_retries,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
        )
    }
}

impl Stats {
    pub fn summary(&self) -> Summary {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Summary {
            received: get(&self.received),
            stored: get(&self.stored),
            quarantined: get(&self.quarantined),
            duplicates: get(&self.duplicates),
            acknowledged: get(&self.acknowledged),
            left_on_queue: get(&self.left_on_queue),
            write_retries: get(&self.write_retries),
            p50: self.latency.quantile(0.5),
            p99: self.latency.quantile(0.99),
        }
    }
}

/// Counts `n` in this run's [`Stats`] and in the process's metrics.
fn add(counter: &AtomicU64, metric: &'static str, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
    metrics::counter!(metric).increment(n);
}

/// Runs the pipeline until `shutdown` is cancelled or, with `drain`, the source runs dry.
pub async fn run<S: MessageSource, W: KeyWrapper>(
    source: Arc<S>,
    pool: PgPool,
    keyring: Keyring<W>,
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<Summary, IngestError> {
    let stats = Arc::new(Stats::default());
    let keyring = Arc::new(keyring);
    let tokenizer = with_retry("loading the token key", &shutdown, || {
        keyring.active_tokenizer()
    })
    .await?;
    let windows = with_retry("loading retention windows", &shutdown, || async {
        Ok(Windows::load(&pool).await?)
    })
    .await?;
    let erased = with_retry("loading erasure records", &shutdown, || {
        ErasedUsers::load(&pool, &keyring)
    })
    .await?;
    tracing::info!(
        token_key = %tokenizer.key_id(),
        pollers = settings.pollers,
        writers = settings.writers,
        batch_size = settings.batch_size,
        "ingest started"
    );

    let tasks = TaskTracker::new();
    let (message_tx, message_rx) = mpsc::channel::<Message>(settings.batch_size * 2);
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(settings.writers.max(1));
    let batch_rx = Arc::new(Mutex::new(batch_rx));

    for _ in 0..settings.pollers.max(1) {
        tasks.spawn(poll(
            source.clone(),
            message_tx.clone(),
            settings.drain,
            shutdown.clone(),
            stats.clone(),
        ));
    }
    drop(message_tx);

    let keys_retired = Arc::new(AtomicBool::new(false));
    let mut keys = Keys {
        tokenizer,
        data_keys: Vec::new(),
        windows,
        checked: Instant::now(),
        retired: keys_retired.clone(),
        keyring: keyring.clone(),
        erased,
        pool: pool.clone(),
    };
    let batcher_settings = settings.clone();
    let batcher_shutdown = shutdown.clone();
    tasks.spawn(async move {
        make_batches(
            message_rx,
            batch_tx,
            &mut keys,
            &batcher_settings,
            &batcher_shutdown,
        )
        .await
    });

    for _ in 0..settings.writers.max(1) {
        tasks.spawn(write_batches(
            batch_rx.clone(),
            source.clone(),
            pool.clone(),
            stats.clone(),
            keys_retired.clone(),
        ));
    }
    tasks.close();
    tasks.wait().await;
    if let Some(failure) = stats.source_failure.lock().expect("not poisoned").take() {
        return Err(IngestError::Source(failure));
    }
    let summary = stats.summary();
    tracing::info!(%summary, "ingest finished");
    Ok(summary)
}

/// Whether the test-only failpoint `name` is set in `PII_VAULT_FAILPOINT` (read once). Tests
/// use it to crash a real ingest process exactly inside a window that timing cannot hit.
fn failpoint_set(name: &str) -> bool {
    static FAILPOINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAILPOINT
        .get_or_init(|| std::env::var("PII_VAULT_FAILPOINT").ok())
        .as_deref()
        == Some(name)
}

/// Retries `attempt` while it fails transiently, unless shutdown is requested.
async fn with_retry<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Result<T, KeyringError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, KeyringError>>,
{
    let mut backoff = Backoff::default();
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_transient() && !shutdown.is_cancelled() => {
                let delay = backoff.next_delay();
                telemetry::retry(retried::KEYS);
                tracing::warn!(error = %error, retry_in = ?delay, "{what} failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(error),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => return Err(error),
        }
    }
}

async fn poll<S: MessageSource>(
    source: Arc<S>,
    messages: mpsc::Sender<Message>,
    drain: bool,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) {
    let mut backoff = Backoff::default();
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            received = source.receive() => received,
        };
        match received {
            Ok(batch) if batch.is_empty() => {
                backoff.reset();
                if drain {
                    return;
                }
            }
            Ok(batch) => {
                backoff.reset();
                add(&stats.received, telemetry::RECEIVED, batch.len() as u64);
                for message in batch {
                    // Fails only when the batcher is gone, i.e. the pipeline is stopping; the
                    // message was not acknowledged and will be redelivered.
                    if messages.send(message).await.is_err() {
                        return;
                    }
                }
            }
            Err(error) if drain && !error.transient => {
                // Nothing to wait for (a file that cannot be read): stop, and fail the run.
                tracing::error!(%error, "message source failed");
                *stats.source_failure.lock().expect("not poisoned") = Some(error);
                return;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                telemetry::retry(retried::RECEIVE);
                if error.transient {
                    tracing::warn!(%error, retry_in = ?delay, "receive failed; retrying");
                } else {
                    tracing::error!(%error, retry_in = ?delay, "receive failed; retrying");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The batcher's keys: the token key, and this process's data keys, one per retention window
/// it seals for, with their usage.
struct Keys<W> {
    tokenizer: Tokenizer,
    data_keys: Vec<DataKey>,
    /// Retention windows: which KMS key a login month's data keys are wrapped under.
    windows: Windows,
    /// When the keys' states were last checked against the key table.
    checked: Instant,
    /// Set by a writer whose batch was refused because a key was retired or a user erased.
    retired: Arc<AtomicBool>,
    keyring: Arc<Keyring<W>>,
    /// Users erased so far, whose older logins keep no personal field.
    erased: ErasedUsers,
    pool: PgPool,
}

/// A data key this process seals with, for one retention window (`None`: months without).
struct DataKey {
    window: Option<Date>,
    sealer: Sealer,
    sealed: u64,
    created: Instant,
}

impl<W: KeyWrapper> Keys<W> {
    /// Follows rotations, erasures and retention: every `key_check_interval` (or at once when
    /// a writer saw a retired key or a new erasure), moves off a token key that is no longer
    /// active, drops data keys that are not (a new one is made when next needed), and learns
    /// of users erased and windows expiring meanwhile.
    async fn follow_rotations(&mut self, settings: &Settings, shutdown: &CancellationToken) {
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
    async fn room_for(
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

async fn make_batches<W: KeyWrapper>(
    mut messages: mpsc::Receiver<Message>,
    batches: mpsc::Sender<Batch>,
    keys: &mut Keys<W>,
    settings: &Settings,
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
        keys.follow_rotations(settings, shutdown).await;
        // One batch per retention window the messages fall in (nearly always one).
        for (placement, messages) in by_window(std::mem::take(&mut pending), &keys.windows) {
            let window = match placement {
                Placed::Window(starts) => keys.windows.get(starts).cloned(),
                Placed::Expired | Placed::Unwindowed => None,
            };
            let window = window.as_ref();
            // At most two values per message (a login's ip and device id).
            let values = 2 * messages.len() as u64;
            let Some(at) = keys.room_for(window, values, settings).await else {
                metrics::counter!(telemetry::SEALING_REFUSED).increment(messages.len() as u64);
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            };
            backoff.reset();
            let batch = batch::build(
                messages,
                &keys.tokenizer,
                &keys.data_keys[at].sealer,
                &keys.erased,
                placement == Placed::Expired,
            );
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
fn by_window(messages: Vec<Message>, windows: &Windows) -> Vec<(Placed, Vec<Message>)> {
    let today = OffsetDateTime::now_utc().date();
    let mut groups: Vec<(Placed, Vec<Message>)> = Vec::new();
    // Consecutive messages nearly always share a date: look the window up once per date.
    let mut last: Option<(Date, Placed)> = None;
    for message in messages {
        let date = message.sent_at.map_or(today, |sent| sent.date());
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

async fn write_batches<S: MessageSource>(
    batches: Arc<Mutex<mpsc::Receiver<Batch>>>,
    source: Arc<S>,
    pool: PgPool,
    stats: Arc<Stats>,
    keys_retired: Arc<AtomicBool>,
) {
    loop {
        // Hold the lock only while taking a batch, so the writers share one queue.
        let next = batches.lock().await.recv().await;
        let Some(batch) = next else { return };
        write_and_acknowledge(batch, source.as_ref(), &pool, &stats, &keys_retired).await;
    }
}

/// Writes a batch (retrying faults, splitting it to isolate a bad message) and acknowledges
/// exactly the messages that committed.
async fn write_and_acknowledge<S: MessageSource>(
    batch: Batch,
    source: &S,
    pool: &PgPool,
    stats: &Stats,
    keys_retired: &AtomicBool,
) {
    let mut work = vec![batch];
    while let Some(batch) = work.pop() {
        match write_with_retry(pool, &batch, stats).await {
            Ok(written) => {
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
                let read_to_commit = metrics::histogram!(telemetry::READ_TO_COMMIT);
                let mut latency = None;
                for delivery in batch.deliveries() {
                    let elapsed = delivery.first_read.elapsed();
                    stats.latency.record(elapsed);
                    read_to_commit.record(elapsed);
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
    let mut backoff = Backoff::default();
    loop {
        match writer::write(pool, batch).await {
            Err(WriteError::Database(error)) if crate::db::is_transient(&error) => {
                let delay = backoff.next_delay();
                stats.write_retries.fetch_add(1, Ordering::Relaxed);
                telemetry::retry(retried::DATABASE_WRITE);
                tracing::warn!(%error, retry_in = ?delay, "database write failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(WriteError::Raced) => {
                tracing::debug!(
                    "a message of the batch was stored by another writer; writing the rest"
                );
            }
            result => return result,
        }
    }
}

/// Deletes committed messages, retrying a few times: a message whose delete is lost is
/// redelivered later and recognized as already stored.
async fn acknowledge<S: MessageSource>(source: &S, receipts: Vec<Receipt>, stats: &Stats) {
    let mut backoff = Backoff::default();
    for attempt in 1..=5 {
        match source.acknowledge(receipts.clone()).await {
            Ok(outcome) => {
                add(
                    &stats.acknowledged,
                    telemetry::DELETED,
                    outcome.deleted as u64,
                );
                return;
            }
            Err(error) if error.transient && attempt < 5 => {
                let delay = backoff.next_delay();
                telemetry::retry(retried::ACKNOWLEDGE);
                tracing::warn!(%error, retry_in = ?delay, "acknowledge failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(error) => {
                tracing::error!(%error, messages = receipts.len(), "acknowledge failed; the messages will be redelivered and skipped as duplicates");
                return;
            }
        }
    }
}
