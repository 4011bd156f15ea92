//! What `ingest` tells an operator: Prometheus metrics, liveness and readiness.
//!
//! The pipeline records through the [`metrics`] facade under the names below. Without a
//! recorder (no `--metrics-addr`) every record is a no-op; with one, [`install`] renders them
//! in the Prometheus text format and [`server`] serves them at `/metrics`, beside `/healthz`
//! and `/readyz` ([`readiness`]). The exceptions are read when scraped, not recorded:
//! [`READ_TO_COMMIT`] (a run keeps it in its own [`LatencyHistogram`], whose quantiles are the
//! run's summary), [`READY`] (the last readiness outcome), what the process
//! [`observed`](mod@observed) (queue depth, message and key ages, the audit's last checkpoint)
//! and the [`process`] metrics.
//!
//! Names follow Prometheus's conventions (a unit suffix, `_total` on counters); dashboards and
//! the alert rules in `deploy/` query them, and a test holds both to what `/metrics` serves.
//! No metric carries personal data or key material: labels are fixed names.

mod exposition;
pub mod latency;
pub mod observed;
pub mod process;
pub mod readiness;
pub mod server;

pub use latency::LatencyHistogram;
pub use observed::observed;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Deliveries read from the source (a redelivered message counts each time).
pub const RECEIVED: &str = "pii_vault_messages_received_total";
/// New rows in `user_logins`.
pub const STORED: &str = "pii_vault_logins_stored_total";
/// New rows in `quarantine`.
pub const QUARANTINED: &str = "pii_vault_messages_quarantined_total";
/// Deliveries of messages already stored or quarantined, skipped.
pub const DUPLICATES: &str = "pii_vault_duplicates_skipped_total";
/// Deliveries deleted from the queue after their batch committed.
pub const DELETED: &str = "pii_vault_messages_deleted_total";
/// Messages left on the queue because their batch could not be sealed or written.
pub const LEFT_ON_QUEUE: &str = "pii_vault_messages_left_on_queue_total";
/// Messages not sealed because the data key was over its limit and KMS gave no new one; they
/// stay on the queue and come back.
pub const SEALING_REFUSED: &str = "pii_vault_messages_sealing_refused_total";
/// Operations retried after a transient fault, by `operation`.
pub const RETRIES: &str = "pii_vault_retries_total";
/// Requests to AWS KMS, by `operation` (the KMS API name).
pub const KMS_CALLS: &str = "pii_vault_kms_calls_total";
/// Messages per committed batch.
pub const BATCH_SIZE: &str = "pii_vault_batch_size";
/// Seconds from reading a message to committing its row: a [`LatencyHistogram`], not a
/// `metrics` histogram.
pub const READ_TO_COMMIT: &str = "pii_vault_read_to_commit_seconds";
/// The `# HELP` text of [`READ_TO_COMMIT`].
pub const READ_TO_COMMIT_HELP: &str = "Seconds from reading a message to committing its row.";
/// 1, labelled with the `version`, `commit` ([`crate::BUILD_COMMIT`]) and `binary` serving.
pub const BUILD_INFO: &str = "pii_vault_build_info";
/// 1 if the last readiness check (`/readyz`, or the endpoint's own every
/// [`server::READINESS_INTERVAL`]) passed, else 0.
pub const READY: &str = "pii_vault_ready";
/// Messages on the queue by `state` (`visible`, `in_flight`), polled with GetQueueAttributes.
pub const QUEUE_MESSAGES: &str = "pii_vault_queue_messages";
/// Now minus the SentTimestamp of the oldest message of the most recent receive; 0 when that
/// receive found the queue empty. CloudWatch's `ApproximateAgeOfOldestMessage` is the queue's.
pub const OLDEST_MESSAGE_AGE: &str = "pii_vault_oldest_message_age_seconds";
/// Age of the keys in use by `purpose`: `token` (the active one), `data` (this process's
/// newest).
pub const KEY_AGE: &str = "pii_vault_key_age_seconds";
/// When the newest audit checkpoint was signed, seconds after the epoch.
pub const AUDIT_LAST_CHECKPOINT: &str = "pii_vault_audit_last_checkpoint_timestamp_seconds";

/// The `operation` label values of [`RETRIES`].
pub mod retried {
    pub const DATABASE_WRITE: &str = "database_write";
    pub const RECEIVE: &str = "receive";
    pub const ACKNOWLEDGE: &str = "acknowledge";
    pub const KEYS: &str = "keys";
    pub const ALL: [&str; 4] = [DATABASE_WRITE, RECEIVE, ACKNOWLEDGE, KEYS];
}

const BATCH_SIZE_BUCKETS: [f64; 11] = [
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10_000.0, 20_000.0,
];

#[derive(Debug, thiserror::Error)]
#[error("installing the metrics recorder: {0}")]
pub struct InstallError(String);

/// Installs the process-wide Prometheus recorder (once per process) and describes every
/// metric, so each appears in `/metrics` with its help text from the first scrape. `binary`
/// names the program in [`BUILD_INFO`].
pub fn install(binary: &'static str) -> Result<PrometheusHandle, InstallError> {
    let fail = |error: &dyn std::fmt::Display| InstallError(error.to_string());
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &BATCH_SIZE_BUCKETS)
        .map_err(|e| fail(&e))?
        .install_recorder()
        .map_err(|e| fail(&e))?;
    describe();
    metrics::gauge!(
        BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => crate::BUILD_COMMIT,
        "binary" => binary,
    )
    .set(1.0);
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        BUILD_INFO,
        "1, labelled with the version, commit and binary that serve these metrics."
    );
    describe_counter!(
        RECEIVED,
        Unit::Count,
        "Deliveries read from the source, redeliveries included."
    );
    describe_counter!(STORED, Unit::Count, "New rows in user_logins.");
    describe_counter!(
        QUARANTINED,
        Unit::Count,
        "New rows in quarantine (messages that failed validation)."
    );
    describe_counter!(
        DUPLICATES,
        Unit::Count,
        "Deliveries of messages already stored or quarantined, skipped."
    );
    describe_counter!(
        DELETED,
        Unit::Count,
        "Deliveries deleted from the queue after their batch committed."
    );
    describe_counter!(
        LEFT_ON_QUEUE,
        Unit::Count,
        "Messages left on the queue because their batch could not be sealed or written."
    );
    describe_counter!(
        SEALING_REFUSED,
        Unit::Count,
        "Messages not sealed because the data key was over its limit and KMS gave no new one."
    );
    describe_counter!(
        RETRIES,
        Unit::Count,
        "Operations retried after a transient fault, by operation."
    );
    describe_counter!(
        KMS_CALLS,
        Unit::Count,
        "Requests to AWS KMS, by API operation."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Messages per committed batch.");
    // Zero-valued series from the start, so a rate() over a fresh process is defined.
    for name in [
        RECEIVED,
        STORED,
        QUARANTINED,
        DUPLICATES,
        DELETED,
        LEFT_ON_QUEUE,
        SEALING_REFUSED,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for operation in retried::ALL {
        metrics::counter!(RETRIES, "operation" => operation).absolute(0);
    }
}

/// Counts one retry of `operation` (one of [`retried`]).
pub fn retry(operation: &'static str) {
    metrics::counter!(RETRIES, "operation" => operation).increment(1);
}
