//! The integration tests, as one test binary: each file beside this one is a module (as they were
//! eight binaries, each linking the AWS SDK, sqlx and the crate again, the link alone took
//! minutes). Every test still gets its own database, queue and KMS key (`common::TestEnv`), and
//! nothing here sets process-wide state (environment, tracing subscriber, metrics recorder): the
//! binaries under test run as child processes, so the modules share one process safely.
//!
//! One module: `cargo test --test integration rotate::` (a filter on the module path).

mod common;

mod alerts;
mod api_calls;
mod cli;
mod compose;
mod deploy;
mod doors;
mod erasure;
mod exit_codes;
mod faults;
mod formats;
mod hostile;
mod ingest;
mod keys;
mod late;
mod library;
mod lifecycle;
mod months;
mod progress;
mod retention;
mod rotate;
mod schema;
mod sql_lists;
mod telemetry;
mod unmask;
