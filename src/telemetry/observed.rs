//! What a process observes about the world around it, for `/metrics`: the queue's depth, the
//! age of the messages it receives, the age of its keys and when the audit was last
//! checkpointed. Whoever looks sets them here ([`observed`]); each scrape renders them, ages
//! computed at that moment.
//!
//! Process-wide, as the `metrics` recorder is: the message sources report every receive here
//! whether or not anything is served (without `--metrics-addr` nobody reads it).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::exposition::{Family, Kind};

/// The process's observations.
pub fn observed() -> &'static Observed {
    static OBSERVED: Observed = Observed::new();
    &OBSERVED
}

/// A depth older than this is no longer shown: the poller has been failing (the queue's
/// `/readyz` check says why), and a stale depth would look like a steady one.
pub const QUEUE_DEPTH_STALE: Duration = Duration::from_secs(90);

/// SQS's approximate counts of the queue's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Waiting to be received (`ApproximateNumberOfMessages`).
    pub visible: u64,
    /// Received by a consumer and neither deleted nor back yet
    /// (`ApproximateNumberOfMessagesNotVisible`).
    pub in_flight: u64,
}

/// The key purposes whose age is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPurpose {
    Token,
    Data,
}

impl KeyPurpose {
    fn label(self) -> &'static str {
        match self {
            KeyPurpose::Token => "token",
            KeyPurpose::Data => "data",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum LastReceive {
    Never,
    /// The most recent receive found the queue empty.
    Empty,
    /// When the oldest message of the most recent receive was sent, seconds after the epoch.
    OldestSent(f64),
}

#[derive(Debug)]
pub struct Observed {
    queue: Mutex<Option<(QueueDepth, Instant)>>,
    last_receive: Mutex<LastReceive>,
    /// Creation times of the keys in use, seconds after the epoch: token, data.
    key_created: Mutex<[Option<f64>; 2]>,
    audit_checkpoint: Mutex<Option<f64>>,
}

impl Observed {
    const fn new() -> Self {
        Self {
            queue: Mutex::new(None),
            last_receive: Mutex::new(LastReceive::Never),
            key_created: Mutex::new([None, None]),
            audit_checkpoint: Mutex::new(None),
        }
    }

    pub fn set_queue_depth(&self, depth: QueueDepth) {
        *lock(&self.queue) = Some((depth, Instant::now()));
    }

    /// A receive returned messages, the oldest sent at `sent_ms` (SQS's `SentTimestamp`,
    /// milliseconds after the epoch); `None`: it returned none.
    pub fn received(&self, oldest_sent_ms: Option<u64>) {
        *lock(&self.last_receive) = match oldest_sent_ms {
            Some(ms) => LastReceive::OldestSent(ms as f64 / 1e3),
            None => LastReceive::Empty,
        };
    }

    /// When the key of `purpose` in use was created (seconds after the epoch), or `None`
    /// while there is none.
    pub fn set_key_created(&self, purpose: KeyPurpose, created: Option<f64>) {
        lock(&self.key_created)[purpose as usize] = created;
    }

    /// When the newest audit checkpoint was signed (seconds after the epoch), if any.
    pub fn set_audit_checkpoint(&self, signed_at: Option<f64>) {
        *lock(&self.audit_checkpoint) = signed_at;
    }

    /// Appends what is known, as of `now` (seconds after the epoch); what is not known yet is
    /// left out rather than shown as zero.
    pub fn write_prometheus(&self, out: &mut String, now: f64) {
        let depth = lock(&self.queue).filter(|(_, at)| at.elapsed() < QUEUE_DEPTH_STALE);
        let mut family = Family::new(
            super::QUEUE_MESSAGES,
            Kind::Gauge,
            "Messages on the queue by state (SQS's approximate counts, polled).",
        );
        if let Some((depth, _)) = depth {
            family = family
                .sample(&[("state", "visible")], depth.visible as f64)
                .sample(&[("state", "in_flight")], depth.in_flight as f64);
        }
        family.write(out);

        let oldest_age = match *lock(&self.last_receive) {
            LastReceive::Never => None,
            LastReceive::Empty => Some(0.0),
            LastReceive::OldestSent(sent) => Some((now - sent).max(0.0)),
        };
        write_one(
            out,
            super::OLDEST_MESSAGE_AGE,
            "Age of the oldest message of the most recent receive (0 if it found none).",
            oldest_age,
        );

        let created = *lock(&self.key_created);
        let mut family = Family::new(
            super::KEY_AGE,
            Kind::Gauge,
            "Age of the keys in use: the active token key and this process's newest data key.",
        );
        for purpose in [KeyPurpose::Token, KeyPurpose::Data] {
            if let Some(created) = created[purpose as usize] {
                family = family.sample(&[("purpose", purpose.label())], (now - created).max(0.0));
            }
        }
        family.write(out);

        write_one(
            out,
            super::AUDIT_LAST_CHECKPOINT,
            "When the newest audit checkpoint was signed (the signer verifies the chain first).",
            *lock(&self.audit_checkpoint),
        );
    }
}

fn write_one(out: &mut String, name: &str, help: &str, value: Option<f64>) {
    let mut family = Family::new(name, Kind::Gauge, help);
    if let Some(value) = value {
        family = family.sample(&[], value);
    }
    family.write(out);
}

/// A panic while holding one of these locks leaves plain data behind: carry on with it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(observed: &Observed, now: f64) -> String {
        let mut out = String::new();
        observed.write_prometheus(&mut out, now);
        out
    }

    #[test]
    fn nothing_known_is_nothing_shown() {
        assert_eq!(rendered(&Observed::new(), 1e9), "");
    }

    #[test]
    fn ages_are_taken_at_the_scrape_and_an_empty_receive_is_zero() {
        let observed = Observed::new();
        observed.set_queue_depth(QueueDepth {
            visible: 7,
            in_flight: 3,
        });
        observed.received(Some(1_000_000_000_500));
        observed.set_key_created(KeyPurpose::Token, Some(999_000_000.0));
        observed.set_audit_checkpoint(Some(999_999_000.0));
        let text = rendered(&observed, 1_000_000_010.5);
        for line in [
            "pii_vault_queue_messages{state=\"visible\"} 7",
            "pii_vault_queue_messages{state=\"in_flight\"} 3",
            "pii_vault_oldest_message_age_seconds 10",
            "pii_vault_key_age_seconds{purpose=\"token\"} 1000010.5",
            "pii_vault_audit_last_checkpoint_timestamp_seconds 999999000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("purpose=\"data\""), "no data key yet");

        observed.received(None);
        observed.set_key_created(KeyPurpose::Data, Some(1_000_000_000.0));
        let text = rendered(&observed, 1_000_000_060.0);
        assert!(text.contains("\npii_vault_oldest_message_age_seconds 0\n"));
        assert!(text.contains("\npii_vault_key_age_seconds{purpose=\"data\"} 60\n"));
        // A clock behind the sender's shows zero, not a negative age.
        observed.received(Some(2_000_000_000_000));
        let text = rendered(&observed, 1_000_000_060.0);
        assert!(text.contains("\npii_vault_oldest_message_age_seconds 0\n"));
    }
}
