//! The checks behind `ingest`'s `/readyz` ([`crate::telemetry::readiness`] runs and reports
//! them): the database answers, the queue answers, the keys are there (an active token key,
//! and a usable KMS key to wrap new data keys), and sealing has not stopped.

use std::sync::Arc;

use sqlx::PgPool;

use super::source::sqs::queue::SqsQueue;
use crate::telemetry::readiness::{Check, CheckFuture, Condition};
use crate::vault::keyring::Keyring;
use crate::vault::kms::KeyWrapper;

/// `ingest`'s checks, in the order `/readyz` reports them: `database`, `queue` (only when
/// reading a queue, not a file), `keys`, `sealing`.
pub fn checks<W: KeyWrapper>(
    pool: PgPool,
    queue: Option<Arc<SqsQueue>>,
    keyring: Keyring<W>,
    sealing: Arc<Condition>,
) -> Vec<Box<dyn Check>> {
    let mut checks: Vec<Box<dyn Check>> = vec![Box::new(Database(pool))];
    if let Some(queue) = queue {
        checks.push(Box::new(Queue(queue)));
    }
    checks.push(Box::new(Keys(keyring)));
    checks.push(Box::new(Sealing(sealing)));
    checks
}

/// `SELECT 1` answers.
struct Database(PgPool);

impl Check for Database {
    fn name(&self) -> &'static str {
        "database"
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async {
            sqlx::query("SELECT 1")
                .execute(&self.0)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}

/// The queue answers GetQueueAttributes.
struct Queue(Arc<SqsQueue>);

impl Check for Queue {
    fn name(&self) -> &'static str {
        "queue"
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async { self.0.check().await.map_err(|e| e.message) })
    }
}

/// A token key is active and the KMS key that wraps new keys is enabled (DescribeKey).
struct Keys<W: KeyWrapper>(Keyring<W>);

impl<W: KeyWrapper> Check for Keys<W> {
    fn name(&self) -> &'static str {
        "keys"
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async { self.0.check_ready().await.map_err(|e| e.to_string()) })
    }
}

/// The pipeline has not stopped sealing (see [`Condition`]).
struct Sealing(Arc<Condition>);

impl Check for Sealing {
    fn name(&self) -> &'static str {
        "sealing"
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async { self.0.get().map_or(Ok(()), Err) })
    }
}
