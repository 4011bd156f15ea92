//! Exponential back-off with jitter, for faults that pass (database restarts, KMS throttling,
//! network blips), and [`retry`], the one loop that retries an operation with it.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Delays of 100 ms doubling up to 10 s, each drawn from its upper half so that replicas that
/// failed together do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            next: first,
            max,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        // Jitter needs no cryptographic randomness; the std hasher's per-instance keys do.
        let unit = (RandomState::new().hash_one(()) % 1_000) as u32;
        ceiling / 2 + ceiling / 2 * unit / 1_000
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// How long [`retry`] goes on and how it waits between attempts.
#[derive(Debug, Clone, Default)]
pub struct Policy<'a> {
    backoff: Backoff,
    /// Most attempts in all, the first included; `None`: for as long as the faults last.
    attempts: Option<u32>,
    /// Once cancelled, no further attempt is made.
    shutdown: Option<&'a CancellationToken>,
}

impl<'a> Policy<'a> {
    /// Retries for as long as the faults last, waiting [`Backoff::default`] delays.
    pub fn forever() -> Self {
        Self::default()
    }

    /// Makes at most `attempts` attempts in all (at least one), then gives up with the last
    /// error.
    pub fn at_most(attempts: u32) -> Self {
        Self {
            attempts: Some(attempts),
            ..Self::default()
        }
    }

    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Gives up with the last error once `shutdown` is cancelled: no retry is begun after
    /// it, and a wait under way is cut short.
    pub fn until(mut self, shutdown: &'a CancellationToken) -> Self {
        self.shutdown = Some(shutdown);
        self
    }
}

/// Runs `op` until it succeeds, fails with an error that `is_transient` says is not worth
/// retrying, has had the attempts `policy` allows, or (with [`Policy::until`]) shutdown is
/// requested; returns its last result. Before each wait, `on_retry` is given the error and
/// the delay, for the caller's log line and retry metric.
pub async fn retry<T, E, Op, Fut>(
    policy: Policy<'_>,
    is_transient: impl Fn(&E) -> bool,
    mut on_retry: impl FnMut(&E, Duration),
    mut op: Op,
) -> Result<T, E>
where
    Op: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let Policy {
        mut backoff,
        attempts,
        shutdown,
    } = policy;
    let mut attempt = 1;
    loop {
        let error = match op().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let stopping = shutdown.is_some_and(CancellationToken::is_cancelled);
        let exhausted = attempts.is_some_and(|most| attempt >= most);
        if stopping || exhausted || !is_transient(&error) {
            return Err(error);
        }
        attempt += 1;
        let delay = backoff.next_delay();
        on_retry(&error, delay);
        match shutdown {
            Some(shutdown) => tokio::select! {
                _ = shutdown.cancelled() => return Err(error),
                _ = tokio::time::sleep(delay) => {}
            },
            None => tokio::time::sleep(delay).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn grows_to_the_cap_and_stays_within_bounds() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        for delay in &delays[4..] {
            assert!(*delay >= Duration::from_millis(500) && *delay <= Duration::from_secs(1));
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    /// A fault that passes or not, and the attempt it happened at.
    #[derive(Debug, PartialEq, Eq)]
    struct Fault {
        transient: bool,
        attempt: u32,
    }

    fn tiny() -> Backoff {
        Backoff::new(Duration::from_millis(1), Duration::from_millis(1))
    }

    fn quick() -> Policy<'static> {
        Policy::forever().backoff(tiny())
    }

    fn at_most(attempts: u32) -> Policy<'static> {
        Policy::at_most(attempts).backoff(tiny())
    }

    /// Runs `retry` over an operation failing with `faults` in turn, then succeeding with the
    /// attempt number; returns the outcome, the attempts made and the retries announced.
    async fn run(policy: Policy<'_>, faults: &[bool]) -> (Result<u32, Fault>, u32, u32) {
        let (attempts, retries) = (Cell::new(0), Cell::new(0));
        let outcome = retry(
            policy,
            |fault: &Fault| fault.transient,
            |fault, delay| {
                assert_eq!(
                    fault.attempt,
                    attempts.get(),
                    "told of the last attempt's fault"
                );
                assert!(delay > Duration::ZERO);
                retries.set(retries.get() + 1);
            },
            || {
                attempts.set(attempts.get() + 1);
                let attempt = attempts.get();
                let fault = faults.get(attempt as usize - 1).copied();
                async move {
                    match fault {
                        Some(transient) => Err(Fault { transient, attempt }),
                        None => Ok(attempt),
                    }
                }
            },
        )
        .await;
        (outcome, attempts.get(), retries.get())
    }

    #[tokio::test]
    async fn success_at_once_is_one_attempt() {
        assert_eq!(run(quick(), &[]).await, (Ok(1), 1, 0));
    }

    #[tokio::test]
    async fn transient_faults_are_retried_for_as_long_as_they_last() {
        assert_eq!(run(quick(), &[true; 7]).await, (Ok(8), 8, 7));
    }

    #[tokio::test]
    async fn a_fault_that_does_not_pass_is_returned_at_once() {
        let fault = Fault {
            transient: false,
            attempt: 3,
        };
        assert_eq!(
            run(quick(), &[true, true, false, true]).await,
            (Err(fault), 3, 2)
        );
    }

    #[tokio::test]
    async fn gives_up_after_the_attempts_allowed() {
        let fault = Fault {
            transient: true,
            attempt: 5,
        };
        assert_eq!(run(at_most(5), &[true; 9]).await, (Err(fault), 5, 4));
        // Success on the last attempt allowed still counts.
        assert_eq!(run(at_most(5), &[true; 4]).await, (Ok(5), 5, 4));
        // One attempt: never a retry.
        assert!(matches!(run(at_most(1), &[true]).await, (Err(_), 1, 0)));
    }

    #[tokio::test]
    async fn no_retry_once_shutdown_is_requested() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let outcome = run(quick().until(&shutdown), &[true; 3]).await;
        assert!(matches!(outcome, (Err(Fault { attempt: 1, .. }), 1, 0)));
    }

    #[tokio::test]
    async fn shutdown_cuts_a_wait_short() {
        let shutdown = CancellationToken::new();
        let policy = Policy::forever()
            .backoff(Backoff::new(
                Duration::from_secs(3600),
                Duration::from_secs(3600),
            ))
            .until(&shutdown);
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            shutdown.cancel();
        };
        let ((outcome, attempts, retries), ()) = tokio::join!(run(policy, &[true; 3]), cancel);
        assert!(matches!(outcome, Err(Fault { attempt: 1, .. })));
        assert_eq!((attempts, retries), (1, 1));
    }
}
