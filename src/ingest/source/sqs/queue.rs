//! The queue `ingest` reads, through whichever protocol its endpoint speaks.

use super::json::SqsSource;
use super::query::QuerySqsSource;
use crate::ingest::source::{Acknowledged, Message, MessageSource, Receipt, SourceError};
use crate::telemetry::observed::QueueDepth;

/// The queue `ingest` reads, through whichever protocol its endpoint speaks
/// (`--sqs-protocol`): one type for the pipeline and the readiness check.
#[derive(Debug, Clone)]
pub enum SqsQueue {
    /// The AWS SDK, JSON protocol: AWS and LocalStack 3.0 and later.
    Json(SqsSource),
    /// The Query protocol: emulators older than LocalStack 3.0.
    Query(QuerySqsSource),
}

impl SqsQueue {
    /// Succeeds when the queue answers: the readiness check.
    pub async fn check(&self) -> Result<(), SourceError> {
        match self {
            SqsQueue::Json(source) => source.check().await,
            SqsQueue::Query(source) => source.check().await,
        }
    }

    /// The queue's approximate message counts: `pii_vault_queue_messages`.
    pub async fn depth(&self) -> Result<QueueDepth, SourceError> {
        match self {
            SqsQueue::Json(source) => source.depth().await,
            SqsQueue::Query(source) => source.depth().await,
        }
    }
}

impl MessageSource for SqsQueue {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        match self {
            SqsQueue::Json(source) => source.receive().await,
            SqsQueue::Query(source) => source.receive().await,
        }
    }

    async fn acknowledge(&self, receipts: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        match self {
            SqsQueue::Json(source) => source.acknowledge(receipts).await,
            SqsQueue::Query(source) => source.acknowledge(receipts).await,
        }
    }
}
