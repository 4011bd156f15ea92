//! SQS as a message source, in either of its protocols, and what the two share.
//!
//! [`json`] reads the queue through the AWS SDK (the JSON protocol: AWS, LocalStack 3.0 and
//! later); [`query`] through form requests and XML answers (the Query protocol, for emulators
//! older than LocalStack 3.0); [`probe`] tells which one an endpoint speaks (the configuration,
//! [`super::config::SqsConfig`], opens the queue in it). Both adapters read what a message
//! replayed out of the dead-letter queue says of its first sending ([`original`]).
//!
//! This module holds only what both protocols share (how to poll, the batch limit, which
//! errors retrying cannot cure, what a receive and the queue's depth tell telemetry); the
//! adapters depend on it and never on each other.

use std::fmt;

use super::SourceError;
use crate::telemetry::observed::{QueueDepth, observed};

pub mod json;
pub mod original;
pub mod probe;
pub mod query;

/// SQS returns at most 10 messages per receive and deletes at most 10 per batch.
pub const SQS_BATCH_LIMIT: usize = 10;

/// How to poll the queue.
#[derive(Debug, Clone, Copy)]
pub struct PollSettings {
    /// Long-poll wait, 0 to 20 s: a receive returns as soon as a message arrives.
    pub wait_time_seconds: i32,
    /// Overrides the queue's visibility timeout for received messages, if set.
    pub visibility_timeout_seconds: Option<i32>,
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            wait_time_seconds: 20,
            visibility_timeout_seconds: None,
        }
    }
}

/// Which protocol an SQS endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// AWS JSON 1.0 (`X-Amz-Target: AmazonSQS.ReceiveMessage`): AWS, LocalStack 3.0 and later.
    Json,
    /// Form requests and XML answers: LocalStack before 3.0, older ElasticMQ.
    Query,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Json => "json",
            Protocol::Query => "query",
        })
    }
}

/// Whether `queue` names its queue by URL rather than by name.
pub(crate) fn is_url(queue: &str) -> bool {
    queue.starts_with("http://") || queue.starts_with("https://")
}

/// The depth SQS answered, from its two counts as text (either protocol sends numbers as text).
pub(crate) fn queue_depth(visible: &str, in_flight: &str) -> Result<QueueDepth, SourceError> {
    let parse = |name: &str, text: &str| {
        text.trim().parse::<u64>().map_err(|_| SourceError {
            message: format!("GetQueueAttributes: {name} is {text:?}, not a count"),
            transient: false,
        })
    };
    Ok(QueueDepth {
        visible: parse("ApproximateNumberOfMessages", visible)?,
        in_flight: parse("ApproximateNumberOfMessagesNotVisible", in_flight)?,
    })
}

/// Tells telemetry what a receive found: the `SentTimestamp` of each message received, or
/// nothing for an empty receive (`pii_vault_oldest_message_age_seconds`). SQS's own send time
/// is meant, not the first one a replayed message carries: the age is the time on this queue.
pub(crate) fn observe_receive<'a>(sent_timestamps: impl IntoIterator<Item = Option<&'a str>>) {
    let mut received = false;
    let mut oldest: Option<u64> = None;
    for sent in sent_timestamps {
        received = true;
        if let Some(ms) = sent.and_then(|text| text.parse::<u64>().ok()) {
            oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
        }
    }
    match (received, oldest) {
        (false, _) => observed().received(None),
        (true, Some(ms)) => observed().received(Some(ms)),
        // Messages without a send time say nothing about the queue's age.
        (true, None) => {}
    }
}

/// Error codes that retrying will not cure: the queue is missing, the credentials or the
/// signature are refused, a parameter is wrong. Either protocol answers with these names.
pub(crate) fn is_permanent(code: &str) -> bool {
    [
        "NonExistentQueue",
        "QueueDoesNotExist",
        "AccessDenied",
        "InvalidParameter",
        "InvalidAddress",
        "InvalidClientTokenId",
        "UnrecognizedClient",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "AuthFailure",
        "InvalidAction",
        "MissingParameter",
    ]
    .iter()
    .any(|permanent| code.contains(permanent))
}
