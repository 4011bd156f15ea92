//! The queue `ingest` reads, as configured ([`SqsConfig`]) and as opened ([`SqsQueue`]):
//! through whichever protocol its endpoint speaks.

use super::json::{self, SqsSource};
use super::probe::ProtocolChoice;
use super::query::{QueryClient, QuerySqsSource};
use super::{PollSettings, Protocol};
use crate::ingest::source::{
    Acknowledged, HealthFuture, Message, MessageSource, OpenError, Receipt, SourceError,
    SourceHealth,
};
use crate::telemetry::observed::QueueDepth;

/// The queue to read, and how.
#[derive(Debug, Clone)]
pub struct SqsConfig {
    /// The queue's name or URL.
    pub queue: String,
    pub protocol: ProtocolChoice,
    pub poll: PollSettings,
}

impl SqsConfig {
    /// The queue, found in the protocol its endpoint speaks (asked once, for
    /// [`ProtocolChoice::Auto`]).
    pub async fn open(self, aws: &aws_config::SdkConfig) -> Result<SqsQueue, OpenError> {
        let protocol = self
            .protocol
            .resolve(aws, &self.queue)
            .await
            .map_err(|e| OpenError::new("choosing the SQS protocol", e))?;
        let finding = |e| OpenError::new("finding the queue", e);
        Ok(match protocol {
            Protocol::Json => {
                let client = aws_sdk_sqs::Client::new(aws);
                let queue_url = json::resolve_queue_url(&client, &self.queue)
                    .await
                    .map_err(finding)?;
                SqsQueue::Json(SqsSource::new(client, queue_url, self.poll))
            }
            Protocol::Query => {
                let client = QueryClient::new(aws);
                let queue_url = client.get_queue_url(&self.queue).await.map_err(finding)?;
                SqsQueue::Query(QuerySqsSource::new(client, queue_url, self.poll))
            }
        })
    }
}

/// The queue `ingest` reads, through whichever protocol its endpoint speaks
/// (`--sqs-protocol`): one type for the pipeline and the readiness check.
#[derive(Debug, Clone)]
pub enum SqsQueue {
    /// The AWS SDK, JSON protocol: AWS and LocalStack 3.0 and later.
    Json(SqsSource),
    /// The Query protocol: emulators older than LocalStack 3.0.
    Query(QuerySqsSource),
}

impl SourceHealth for SqsQueue {
    fn check(&self) -> HealthFuture<'_, ()> {
        match self {
            SqsQueue::Json(source) => source.check(),
            SqsQueue::Query(source) => source.check(),
        }
    }

    fn depth(&self) -> HealthFuture<'_, QueueDepth> {
        match self {
            SqsQueue::Json(source) => source.depth(),
            SqsQueue::Query(source) => source.depth(),
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
