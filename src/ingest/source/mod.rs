//! Where messages come from: the [`MessageSource`] trait the pipeline reads through, and
//! [`SourceHealth`], what operators ask of a source besides its messages.
//!
//! The contract is SQS's: a received message stays invisible for a while and comes back unless
//! it is acknowledged (deleted). The pipeline acknowledges a message only after its row (or its
//! quarantine entry) has committed, so a crash at any point loses nothing.
//!
//! The sources: [`file`](mod@file) (a backfill or replay, one message per line) and [`sqs`]
//! (the queue, in either of SQS's protocols). [`config`] is the one place that names them all:
//! a [`config::SourceConfig`] (what the binary's flags say) opens a [`config::Source`], which
//! the pipeline reads and whose health readiness and telemetry ask through [`SourceHealth`],
//! whatever its kind. Another kind of source (Kafka, Kinesis) is a module here and a variant in
//! `config.rs`; nothing in the pipeline, the binary's wiring, readiness or telemetry changes.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use time::OffsetDateTime;

use crate::telemetry::observed::QueueDepth;

pub mod config;
pub mod file;
pub mod sqs;

/// One received message.
pub struct Message {
    /// Stable across redeliveries (the SQS MessageId, or the first one a replay out of the
    /// dead-letter queue carried: [`sqs::original`]): the idempotency key of the row.
    pub id: String,
    pub body: Vec<u8>,
    /// When the producer sent it (SQS SentTimestamp, or the earlier first send time a replay
    /// carried); gives the row's `create_date` and decides which erasures apply. `None`:
    /// unknown, which counts as sent before every erasure.
    pub sent_at: Option<OffsetDateTime>,
    /// What acknowledging this delivery takes (the SQS receipt handle).
    pub receipt: Receipt,
    /// When this process read it, for read-to-commit latency.
    pub read_at: Instant,
}

// The body may hold personal data: never print it.
impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("body_bytes", &self.body.len())
            .field("sent_at", &self.sent_at)
            .finish_non_exhaustive()
    }
}

/// The 16 bytes a message is stored under (`user_logins.message_id`, a uuid; migration 0008),
/// so that the idempotency index holds 16 bytes per login whatever the id's length.
///
/// An id that is a UUID in canonical text form (lowercase, hyphenated: SQS's, and a file
/// line's) is its own key; any other id is keyed by the first 16 bytes of its SHA-256, and
/// its text is stored beside the key. SQL's `message_key(id)` computes the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageKey(pub [u8; 16]);

impl MessageKey {
    pub fn of(id: &str) -> MessageKey {
        Self::parse_canonical(id).unwrap_or_else(|| {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(id.as_bytes());
            MessageKey(digest[..16].try_into().expect("SHA-256 is 32 bytes"))
        })
    }

    /// The key of a UUID in canonical text form, `None` for any other text.
    pub fn parse_canonical(id: &str) -> Option<MessageKey> {
        let text = id.as_bytes();
        let hyphens_in_place =
            text.len() == 36 && [8, 13, 18, 23].iter().all(|&at| text[at] == b'-');
        if !hyphens_in_place || text.iter().any(u8::is_ascii_uppercase) {
            return None;
        }
        let digits: Vec<u8> = text.iter().copied().filter(|&b| b != b'-').collect();
        let mut key = [0; 16];
        hex::decode_to_slice(digits, &mut key).ok()?;
        Some(MessageKey(key))
    }

    /// The key's canonical UUID text, as PostgreSQL prints a uuid.
    pub fn to_text(self) -> String {
        let digits = hex::encode(self.0);
        let group = |range: std::ops::Range<usize>| &digits[range];
        [
            group(0..8),
            group(8..12),
            group(12..16),
            group(16..20),
            group(20..32),
        ]
        .join("-")
    }
}

/// An opaque acknowledgement handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt(pub String);

/// A failure to receive or acknowledge.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    pub message: String,
    /// Worth retrying (network, throttling, service fault) rather than a configuration error.
    pub transient: bool,
}

/// What an acknowledgement achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Acknowledged {
    /// Messages deleted. The others were refused one by one (e.g. a receipt that expired
    /// because the message was redelivered meanwhile): each source logs why, and the message
    /// comes back to be recognized as already stored.
    pub deleted: usize,
}

pub trait MessageSource: Send + Sync + 'static {
    /// The next messages, at most a handful; an empty result means none arrived while waiting.
    fn receive(&self) -> impl Future<Output = Result<Vec<Message>, SourceError>> + Send;

    /// Removes delivered messages for good.
    fn acknowledge(
        &self,
        receipts: Vec<Receipt>,
    ) -> impl Future<Output = Result<Acknowledged, SourceError>> + Send;

    /// For a source whose messages carry no send time (a file): the key it is known by in
    /// every run, under which the database keeps the day it was first ingested, the day its
    /// logins are dated (migration 0021). `None` for a source with send times.
    fn undated_source_key(&self) -> Option<MessageKey> {
        None
    }
}

/// A source that could not be opened: what was being done (`opening <path>`, `finding the
/// queue`...), and why it failed.
#[derive(Debug, thiserror::Error)]
#[error("{doing}")]
pub struct OpenError {
    pub doing: String,
    #[source]
    pub cause: Box<dyn std::error::Error + Send + Sync>,
}

impl OpenError {
    pub fn new(
        doing: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            doing: doing.into(),
            cause: Box::new(cause),
        }
    }
}

/// The future a [`SourceHealth`] method returns: boxed, so that readiness and telemetry hold
/// any source's health as one `dyn SourceHealth`.
pub type HealthFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SourceError>> + Send + 'a>>;

/// What operators ask of a source besides its messages, while `ingest` serves `/readyz` and
/// `/metrics`. A source with nothing to ask (a file, read or not) has none
/// ([`config::Source::health`]).
pub trait SourceHealth: Send + Sync {
    /// Succeeds when the source answers: `/readyz`'s `queue` check.
    fn check(&self) -> HealthFuture<'_, ()>;

    /// How many messages wait in the source and how many are in flight:
    /// `pii_vault_queue_messages`.
    fn depth(&self) -> HealthFuture<'_, QueueDepth>;
}

#[cfg(test)]
mod tests {
    use super::MessageKey;

    #[test]
    fn a_canonical_uuid_is_its_own_key_and_prints_back() {
        let id = "5fea7756-0ea4-451a-a703-a558b933e274";
        let key = MessageKey::of(id);
        assert_eq!(key.0[0], 0x5f);
        assert_eq!(key.0[15], 0x74);
        assert_eq!(key.to_text(), id);
        assert_eq!(MessageKey::parse_canonical(id), Some(key));
    }

    #[test]
    fn any_other_id_is_keyed_by_its_sha256() {
        // SQL: SELECT message_key('/data/logins.jsonl:7') (migration 0008).
        let key = MessageKey::of("/data/logins.jsonl:7");
        assert_eq!(key.to_text(), "e3fc73d0-8454-ee4a-93c3-86426444e72b");
        for other in [
            "5FEA7756-0EA4-451A-A703-A558B933E274",
            "5fea7756-0ea4-451a-a703-a558b933e27",
            "5fea7756+0ea4-451a-a703-a558b933e274",
            "5fea7756-0ea4-451a-a703-a558b933e27g",
            "",
        ] {
            assert_eq!(MessageKey::parse_canonical(other), None, "{other}");
            assert_ne!(MessageKey::of(other).to_text(), other);
        }
    }
}
