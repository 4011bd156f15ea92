//! `/readyz`: can this process do its work right now? It runs the [`Check`]s it was given
//! (the database answers, the queue answers, the keys are there...), concurrently and each
//! within [`CHECK_TIMEOUT`], and is not ready once shutdown has begun.
//!
//! The checks are injected: telemetry knows how to run and report them, not what they look
//! at, so it depends on neither the pipeline nor the vault (`ingest::readiness` builds
//! `ingest`'s).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// What a check found: `Err` says why the process is not ready, in one line.
pub type Outcome = Result<(), String>;

/// The future a [`Check`] returns.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// One thing `/readyz` looks at.
pub trait Check: Send + Sync {
    /// The name the report gives its line, e.g. `database`.
    fn name(&self) -> &'static str;
    /// Whether it is fine now; given at most [`CHECK_TIMEOUT`].
    fn check(&self) -> CheckFuture<'_>;
}

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
    /// Run concurrently, reported in this order.
    checks: Vec<Box<dyn Check>>,
    /// Cancelled once shutdown has begun: the process is finishing, not taking new work.
    shutdown: CancellationToken,
    /// When the checks last finished, and whether they all passed: `pii_vault_ready`.
    last: std::sync::Mutex<Option<(std::time::Instant, bool)>>,
}

/// The outcome of each check, in a fixed order.
#[derive(Debug)]
pub struct Report {
    pub checks: Vec<(&'static str, Outcome)>,
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
    pub fn new(checks: Vec<Box<dyn Check>>, shutdown: CancellationToken) -> Self {
        Self {
            checks,
            shutdown,
            last: std::sync::Mutex::default(),
        }
    }

    /// Whether the last check passed and how long ago it finished; `None` before the first.
    pub fn last(&self) -> Option<(bool, Duration)> {
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.map(|(at, ready)| (ready, at.elapsed()))
    }

    pub async fn check(&self) -> Report {
        let outcomes = join_all(
            self.checks
                .iter()
                .map(|check| Box::pin(within(check.check())) as CheckFuture<'_>)
                .collect(),
        )
        .await;
        let mut checks: Vec<_> = self.checks.iter().map(|c| c.name()).zip(outcomes).collect();
        if self.shutdown.is_cancelled() {
            checks.push(("process", Err("shutting down".into())));
        }
        let report = Report { checks };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((std::time::Instant::now(), report.is_ready()));
        report
    }
}

async fn within(check: impl Future<Output = Outcome>) -> Outcome {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())))
}

/// Polls every future until all are done; their outputs in the futures' order.
async fn join_all(mut futures: Vec<CheckFuture<'_>>) -> Vec<Outcome> {
    let mut outcomes: Vec<Option<Outcome>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, outcome) in futures.iter_mut().zip(&mut outcomes) {
            if outcome.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(done) => *outcome = Some(done),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outcomes
        .into_iter()
        .map(|outcome| outcome.expect("every future finished"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str, Outcome, Duration);

    impl Check for Fixed {
        fn name(&self) -> &'static str {
            self.0
        }
        fn check(&self) -> CheckFuture<'_> {
            Box::pin(async {
                tokio::time::sleep(self.2).await;
                self.1.clone()
            })
        }
    }

    #[tokio::test]
    async fn reports_every_check_in_order_with_timeouts_and_shutdown() {
        let shutdown = CancellationToken::new();
        let readiness = Readiness::new(
            vec![
                Box::new(Fixed("slow", Ok(()), Duration::from_secs(2))),
                Box::new(Fixed("hung", Ok(()), Duration::from_secs(60))),
                Box::new(Fixed("broken", Err("no\nway".into()), Duration::ZERO)),
            ],
            shutdown.clone(),
        );
        let started = std::time::Instant::now();
        let report = readiness.check().await;
        // Concurrently (2 s and 3 s in turn would be 5 s), the hung one cut at the timeout.
        let took = started.elapsed();
        assert!(
            took >= CHECK_TIMEOUT && took < Duration::from_millis(4500),
            "{took:?}"
        );
        assert!(!report.is_ready());
        assert!(matches!(readiness.last(), Some((false, ago)) if ago < Duration::from_secs(1)));
        assert_eq!(
            report.to_string(),
            "slow: ok\nhung: no answer within 3s\nbroken: no way\n"
        );
        let ready = Readiness::new(vec![], shutdown.clone());
        assert_eq!(ready.last(), None);
        assert!(ready.check().await.is_ready());
        assert!(matches!(ready.last(), Some((true, _))));
        shutdown.cancel();
        let report = Readiness::new(vec![], shutdown).check().await;
        assert_eq!(report.to_string(), "process: shutting down\n");
    }
}
