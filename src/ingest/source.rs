//! Where messages come from: the [`MessageSource`] trait the pipeline reads through.
//!
//! The contract is SQS's: a received message stays invisible for a while and comes back unless
//! it is acknowledged (deleted). The pipeline acknowledges a message only after its row (or its
//! quarantine entry) has committed, so a crash at any point loses nothing.

use std::future::Future;
use std::time::Instant;

use time::OffsetDateTime;

/// One received message.
pub struct Message {
    /// Stable across redeliveries (the SQS MessageId): the idempotency key of the row.
    pub id: String,
    pub body: Vec<u8>,
    /// When the producer sent it (SQS SentTimestamp); gives the row's `create_date`.
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
    pub deleted: usize,
    /// Refused individually (e.g. a receipt that expired because the message was redelivered
    /// meanwhile); the message comes back and is recognized as already stored.
    pub refused: usize,
}

pub trait MessageSource: Send + Sync + 'static {
    /// The next messages, at most a handful; an empty result means none arrived while waiting.
    fn receive(&self) -> impl Future<Output = Result<Vec<Message>, SourceError>> + Send;

    /// Removes delivered messages for good.
    fn acknowledge(
        &self,
        receipts: Vec<Receipt>,
    ) -> impl Future<Output = Result<Acknowledged, SourceError>> + Send;
}
