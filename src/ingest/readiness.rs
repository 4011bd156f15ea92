//! The checks behind `ingest`'s `/readyz` ([`crate::telemetry::readiness`] runs and reports
//! them): the database answers, the source answers (any source with a health check:
//! [`SourceHealth`]), the keys are there (an active token key, and a usable KMS key to wrap new
//! data keys), sealing has not stopped, and logins have partitions to go to.

use std::sync::Arc;

use sqlx::PgPool;

use super::source::SourceHealth;
use crate::telemetry::readiness::{Check, CheckFuture, Condition};
use crate::vault::keyring::Keyring;
use crate::vault::kms::KeyWrapper;

/// `ingest`'s checks, in the order `/readyz` reports them: `database`, `queue` (only for a
/// source with a health check, a queue and not a file: `Source::health`), `keys`, `sealing`,
/// `storage`.
pub fn checks<W: KeyWrapper>(
    pool: PgPool,
    queue: Option<Arc<dyn SourceHealth>>,
    keyring: Keyring<W>,
    sealing: Arc<Condition>,
    storage: Arc<Condition>,
) -> Vec<Box<dyn Check>> {
    let mut checks: Vec<Box<dyn Check>> = vec![Box::new(Database(pool.clone()))];
    if let Some(queue) = queue {
        checks.push(Box::new(Queue(queue)));
    }
    checks.push(Box::new(Keys(keyring)));
    checks.push(Box::new(Sealing(sealing)));
    checks.push(Box::new(Storage {
        pool,
        refused: storage,
    }));
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

/// The source answers its own health check (SQS: GetQueueAttributes).
struct Queue(Arc<dyn SourceHealth>);

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

/// Today's logins have a month to go to (migration 0017's partitions), and no batch has been
/// refused for a month without one since the last batch stored.
struct Storage {
    pool: PgPool,
    refused: Arc<Condition>,
}

impl Check for Storage {
    fn name(&self) -> &'static str {
        "storage"
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async {
            if let Some(why) = self.refused.get() {
                return Err(why);
            }
            let today: Option<String> = sqlx::query_scalar(
                "SELECT to_char(current_date, 'YYYY-MM') WHERE NOT vault_month_ready(current_date)",
            )
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| e.to_string())?;
            match today {
                None => Ok(()),
                Some(month) => Err(format!(
                    "no partition for logins of {month}: `rotate-keys partitions --ahead N` adds months"
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::ingest::source::{HealthFuture, SourceError};
    use crate::telemetry::observed::QueueDepth;
    use crate::telemetry::readiness::Readiness;
    use crate::vault::kms::memory::{MemoryKms, TEST_KMS_KEY};
    use tokio_util::sync::CancellationToken;

    /// A source in memory that answers, or says why it does not.
    #[derive(Default)]
    struct InMemory {
        refusal: Mutex<Option<String>>,
    }

    impl SourceHealth for InMemory {
        fn check(&self) -> HealthFuture<'_, ()> {
            let refusal = self.refusal.lock().unwrap().clone();
            Box::pin(async move {
                match refusal {
                    None => Ok(()),
                    Some(message) => Err(SourceError {
                        message,
                        transient: false,
                    }),
                }
            })
        }

        fn depth(&self) -> HealthFuture<'_, QueueDepth> {
            Box::pin(async {
                Ok(QueueDepth {
                    visible: 0,
                    in_flight: 0,
                })
            })
        }
    }

    /// Checks over a database that is never reached: only their names and the source's check
    /// are run here.
    fn checks_with(source: Option<Arc<dyn SourceHealth>>) -> Vec<Box<dyn Check>> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        let keyring = Keyring::new(
            pool.clone(),
            Arc::new(MemoryKms::new()),
            TEST_KMS_KEY,
            "test",
        );
        checks(pool, source, keyring, Arc::default(), Arc::default())
    }

    fn names(checks: &[Box<dyn Check>]) -> Vec<&'static str> {
        checks.iter().map(|check| check.name()).collect()
    }

    #[tokio::test]
    async fn the_queue_check_is_the_sources_own_and_says_why_not() {
        let source = Arc::new(InMemory::default());
        let mut all = checks_with(Some(source.clone()));
        assert_eq!(
            names(&all),
            ["database", "queue", "keys", "sealing", "storage"]
        );

        let queue = all.remove(1);
        let readiness = Readiness::new(vec![queue], CancellationToken::new());
        assert_eq!(readiness.check().await.to_string(), "queue: ok\n");
        *source.refusal.lock().unwrap() = Some("GetQueueAttributes: QueueDoesNotExist".into());
        let report = readiness.check().await;
        assert!(!report.is_ready());
        assert_eq!(
            report.to_string(),
            "queue: GetQueueAttributes: QueueDoesNotExist\n"
        );
    }

    #[tokio::test]
    async fn a_source_without_a_health_check_has_no_queue_line() {
        assert_eq!(
            names(&checks_with(None)),
            ["database", "keys", "sealing", "storage"]
        );
    }
}
