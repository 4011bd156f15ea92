//! `/readyz`: can this process do its work right now? It checks, concurrently and each within
//! [`CHECK_TIMEOUT`], that the database answers, that the queue answers, and that the keys are
//! there (an active token key, and a usable KMS key to wrap new data keys).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::ingest::sqs::SqsQueue;
use crate::vault::keyring::Keyring;
use crate::vault::kms::AwsKms;

/// A condition the pipeline itself reports, e.g. "sealing stopped: the data key is over its
/// limit and KMS gives no new one": not ready while it is set.
#[derive(Debug, Default)]
pub struct Condition(std::sync::Mutex<Option<String>>);

impl Condition {
    pub fn set(&self, why: String) {
        *self.0.lock().expect("not poisoned") = Some(why);
    }

    pub fn clear(&self) {
        *self.0.lock().expect("not poisoned") = None;
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().expect("not poisoned").clone()
    }
}

/// Longest one check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// What `/readyz` checks.
pub struct Readiness {
    pub pool: PgPool,
    /// The queue; `None` when reading a file.
    pub queue: Option<Arc<SqsQueue>>,
    pub keyring: Keyring<AwsKms>,
    /// Whether the pipeline can seal (see [`Condition`]).
    pub sealing: Arc<Condition>,
    /// Cancelled once shutdown has begun: the process is finishing, not taking new work.
    pub shutdown: CancellationToken,
}

/// The outcome of each check, in a fixed order.
#[derive(Debug)]
pub struct Report {
    pub checks: Vec<(&'static str, Result<(), String>)>,
}

impl Report {
    pub fn is_ready(&self) -> bool {
        self.checks.iter().all(|(_, outcome)| outcome.is_ok())
    }
}

/// One line per check: `database: ok`, or `keys: <why not>`.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, outcome) in &self.checks {
            match outcome {
                Ok(()) => writeln!(f, "{name}: ok")?,
                Err(why) => writeln!(f, "{name}: {}", why.replace('\n', " "))?,
            }
        }
        Ok(())
    }
}

impl Readiness {
    pub async fn check(&self) -> Report {
        let database = within(async {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        });
        let queue = within(async {
            match &self.queue {
                Some(queue) => queue.check().await.map_err(|e| e.message),
                None => Ok(()),
            }
        });
        let keys = within(async { self.keyring.check_ready().await.map_err(|e| e.to_string()) });
        let (database, queue, keys) = tokio::join!(database, queue, keys);
        let mut checks = vec![("database", database)];
        if self.queue.is_some() {
            checks.push(("queue", queue));
        }
        checks.push(("keys", keys));
        checks.push(("sealing", self.sealing.get().map_or(Ok(()), Err)));
        if self.shutdown.is_cancelled() {
            checks.push(("process", Err("shutting down".into())));
        }
        Report { checks }
    }
}

async fn within(check: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())))
}
