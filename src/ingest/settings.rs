//! How the pipeline runs: [`Settings`], with the defaults for a queue and for a file.

use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::readiness::Condition;

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
    /// Set while a login's month has no partition to store it in, for `/readyz`.
    pub storage: Arc<Condition>,
}

impl Settings {
    /// For a file (`ingest --from-file`): every line is there to be read, so batches fill at
    /// once; bigger ones and more writers keep PostgreSQL busy (README.md, "Performance").
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
            storage: Arc::default(),
        }
    }
}
