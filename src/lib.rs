//! pii-vault ingests login events from AWS SQS into PostgreSQL while keeping the personal
//! fields (`device_id`, `ip`) protected: each is stored as a deterministic HMAC-SHA256 token, so
//! analysts can still see duplicates, and as an AES-256-GCM-SIV ciphertext under a data key that
//! AWS KMS wraps, so a compliance officer can recover it.
//!
//! # Map of the crate
//!
//! - [`event`]: a message body becomes a validated [`event::LoginEvent`] or a quarantine reason.
//! - [`vault`]: everything that touches key material: tokens, sealing, KMS, the key table,
//!   erased users (by token) and retention windows (a KMS key per month). Unit tests run it on
//!   an in-memory KMS (`vault/kms/memory.rs`).
//!   - [`vault::key_table`]: the key table, `vault_keys`: every statement on it, its door and
//!     its locks ([`vault::key_table::key_use`], the lock writers and rotations share), and
//!     what a key's state and purpose can be; [`vault::keyring`] makes and unwraps its keys
//!     through KMS.
//!   - [`vault::place`]: where values are sealed (the table and field names in the associated
//!     data); [`vault::handed_out`]: sealed values as the doors hand them out, opened and checked
//!     against their token, with typed integrity errors; [`vault::key_cache`]: keys unwrapped
//!     once each, shared by [`unmask`] and [`lifecycle`].
//! - [`ingest`]: the pipeline: receive, batch, tokenize and seal, write, acknowledge.
//!   [`ingest::run`] wires its stages (`stages.rs`: pollers, batcher, writers, acknowledging)
//!   to the keys it follows through rotations, erasures and expiries (`keys.rs`), with
//!   [`ingest::Settings`] and a run's [`ingest::Summary`] (`settings.rs`, `stats.rs`).
//!   - [`ingest::source`]: where messages come from: the message-source trait, and
//!     [`ingest::source::SourceHealth`], what `/readyz` and `/metrics` ask of a source;
//!     [`ingest::source::config`] opens the configured source, whatever its kind (the one
//!     place that names every kind). The kinds: [`ingest::source::file`] (a line a message)
//!     and [`ingest::source::sqs`] (what both SQS protocols share), with `sqs/json.rs` (the
//!     AWS SDK, JSON protocol), `sqs/query/` (the older Query protocol, for old emulators:
//!     client, source, form, answers), `sqs/probe.rs` (which one an endpoint speaks) and
//!     `sqs/original.rs` (a message replayed out of the dead-letter queue: its first id and
//!     send time).
//!   - [`ingest::batch`]: messages to rows; [`ingest::writer`]: rows to PostgreSQL.
//!   - [`ingest::readiness`]: the checks `ingest` hands to `/readyz` (database, the source's
//!     own check, keys, sealing).
//! - [`unmask`]: audited recovery of original values through the database's door functions
//!   (the texts handed to them as enums in `unmask/door_terms.rs`), and `verify_all` (every
//!   stored value opened and checked, revealing nothing);
//!   [`audit`]: verifying the server-made, hash-chained trail and its signed checkpoints, and
//!   [`audit::witness`], the checkpoints' copy in an S3 bucket under Object Lock.
//! - [`lifecycle`]: what the key admin runs (`rotate-keys`): online key rotation
//!   (`lifecycle/rotation.rs`), its paged walk (`walk.rs`, no database: unit-tested in memory)
//!   and its pages through the key admin's doors (`rewrite.rs`), re-wrapping under another KMS
//!   key (`rewrap.rs`), erasure (`erasure.rs`), and retention windows and their expiry
//!   (`retention.rs`).
//! - [`progress`]: how far a long operation is (a rotation and its grace wait, an expiry, a
//!   verification, a file being ingested), told to the caller's [`progress::Progress`]; the
//!   library draws and prints nothing. Rates there count working time, waits left out; the
//!   binaries draw a bar on a terminal (`src/bin/common/progress.rs`) or log a line every few
//!   seconds ([`progress::LogLines`]).
//! - [`db`]: connecting, embedded migrations, schema check, which faults are transient.
//! - [`sql_text`]: the one pattern (`sql_text!`) of the enums of fixed texts handed to SQL, each
//!   defined beside its use (key states and purposes in [`vault::key_table`], reveal purposes
//!   and outcomes in `unmask/door_terms.rs`, door operations, window states), each with the
//!   `ALL` that `tests/integration/sql_lists.rs` holds to the database's own list.
//! - [`retry`]: back-off for faults that pass, and [`retry::retry`], the one loop that retries
//!   them.
//! - [`telemetry`]: Prometheus metrics, `/healthz` and `/readyz` for operators. It runs the
//!   readiness checks it is given and depends on nothing else in the crate (but
//!   [`BUILD_COMMIT`]); [`telemetry::observed`](mod@telemetry::observed) is what the process
//!   sees around it (queue depth, message and key ages), set by the SQS sources and `ingest`'s
//!   poller, and
//!   [`telemetry::process`] its `/proc` figures;
//!   [`telemetry::LatencyHistogram`] is the one read-to-commit histogram, read by a run's
//!   [`ingest::Summary`] and rendered on `/metrics`.
//! - [`synth`]: synthetic messages for the load generator, tests and benchmarks.
//! - `testing` (the `testing` feature, on for tests and benches only): the test kit, a
//!   scratch database per test (`testing::Scratch`) and the in-memory KMS.
//! - [`aws_http`]: SigV4-signed HTTP for what the crate speaks without an SDK client (SQS
//!   Query, the audit witness bucket on S3), and the XML of their answers; used by
//!   [`ingest::source::sqs::query`] and [`audit::witness`], built on nothing else in the crate.
//! - [`cli`]: what the binaries share: common flags (global: accepted after a subcommand),
//!   logging, AWS configuration, `--format json`, one-line errors and one exit-code table
//!   ([`cli::Failure`]); [`aws_error`]: an AWS SDK failure in one line that says what to do.
//!
//! The binaries (`src/bin/`) are thin: `ingest` (the daemon), `unmask` (audited recovery),
//! `rotate-keys` (key and schema administration) and `loadgen` (puts test messages on a queue).
//! Each parses its arguments, checks them into a `Config` (a bad one is a one-line error, exit
//! code 2) and runs it; a failure's exit code comes from [`cli::Failure::of`].

#![forbid(unsafe_code)]

/// The commit this build was made from (git's short hash; `unknown` outside a checkout).
pub const BUILD_COMMIT: &str = env!("PII_VAULT_COMMIT");

/// What `--version` prints after a binary's name: the version and the commit.
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PII_VAULT_COMMIT"),
    ")"
);

pub mod audit;
pub mod aws_error;
pub mod aws_http;
pub mod cli;
pub mod db;
pub mod event;
pub mod ingest;
pub mod lifecycle;
pub mod progress;
pub mod retry;
pub mod sql_text;
pub mod synth;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod unmask;
pub mod vault;
