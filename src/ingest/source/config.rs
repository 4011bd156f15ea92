//! Which source `ingest` reads, as configured ([`SourceConfig`]), and the source it opens
//! ([`Source`]): the one place that names every kind of source.
//!
//! The binary parses its flags into a [`SourceConfig`] and calls [`SourceConfig::open`]; the
//! pipeline reads the [`Source`] through [`MessageSource`], and readiness and telemetry ask
//! [`Source::health`], whatever its kind. Another kind of source (Kafka, Kinesis) is a module
//! beside `file` and `sqs`, a variant in both enums here, and an arm in each match below.

use std::sync::Arc;

use super::file::FileSource;
use super::sqs::json::{self, SqsSource};
use super::sqs::probe::ProtocolChoice;
use super::sqs::query::{QueryClient, QuerySqsSource};
use super::sqs::{PollSettings, Protocol};
use super::{
    Acknowledged, Message, MessageKey, MessageSource, OpenError, Receipt, SourceError, SourceHealth,
};

/// Where messages come from, as configured.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// An SQS queue: `ingest`'s daemon.
    Sqs(SqsConfig),
    /// A file of one message per line, read once (a backfill or replay).
    File {
        /// The file, `-` for stdin.
        path: String,
        /// What makes line ids stable across runs (default: the file's absolute path).
        source_id: Option<String>,
    },
}

/// The queue to read, and how.
#[derive(Debug, Clone)]
pub struct SqsConfig {
    /// The queue's name or URL.
    pub queue: String,
    pub protocol: ProtocolChoice,
    pub poll: PollSettings,
}

impl SourceConfig {
    /// The source, opened: the file opened, or the queue found in the protocol its endpoint
    /// speaks (asked once, for [`ProtocolChoice::Auto`]).
    pub async fn open(self, aws: &aws_config::SdkConfig) -> Result<Source, OpenError> {
        match self {
            SourceConfig::Sqs(sqs) => sqs.open(aws).await,
            SourceConfig::File { path, source_id } => {
                match FileSource::open(&path, source_id.as_deref()) {
                    Ok(file) => Ok(Source::File(Arc::new(file))),
                    Err(e) => Err(OpenError::new(format!("opening {path}"), e)),
                }
            }
        }
    }
}

impl SqsConfig {
    async fn open(self, aws: &aws_config::SdkConfig) -> Result<Source, OpenError> {
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
                Source::SqsJson(Arc::new(SqsSource::new(client, queue_url, self.poll)))
            }
            Protocol::Query => {
                let client = QueryClient::new(aws);
                let queue_url = client.get_queue_url(&self.queue).await.map_err(finding)?;
                Source::SqsQuery(Arc::new(QuerySqsSource::new(client, queue_url, self.poll)))
            }
        })
    }
}

/// An opened source: one type for the pipeline, readiness and telemetry.
pub enum Source {
    /// An SQS queue through the AWS SDK (the JSON protocol): AWS, LocalStack 3.0 and later.
    SqsJson(Arc<SqsSource>),
    /// An SQS queue over the Query protocol: emulators older than LocalStack 3.0.
    SqsQuery(Arc<QuerySqsSource>),
    File(Arc<FileSource>),
}

impl Source {
    /// What `/readyz` checks and `/metrics` polls of this source; `None` for a file, which is
    /// read or failed, with nothing to ask.
    pub fn health(&self) -> Option<Arc<dyn SourceHealth>> {
        match self {
            Source::SqsJson(queue) => Some(queue.clone()),
            Source::SqsQuery(queue) => Some(queue.clone()),
            Source::File(_) => None,
        }
    }
}

impl MessageSource for Source {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        match self {
            Source::SqsJson(queue) => queue.receive().await,
            Source::SqsQuery(queue) => queue.receive().await,
            Source::File(file) => file.receive().await,
        }
    }

    async fn acknowledge(&self, receipts: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        match self {
            Source::SqsJson(queue) => queue.acknowledge(receipts).await,
            Source::SqsQuery(queue) => queue.acknowledge(receipts).await,
            Source::File(file) => file.acknowledge(receipts).await,
        }
    }

    fn undated_source_key(&self) -> Option<MessageKey> {
        match self {
            Source::SqsJson(_) | Source::SqsQuery(_) => None,
            Source::File(file) => file.undated_source_key(),
        }
    }
}
