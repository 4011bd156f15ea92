//! Which source `ingest` reads, as configured ([`SourceConfig`]), and the source it opens
//! ([`Source`]): the one place that names every kind of source.
//!
//! The binary parses its flags into a [`SourceConfig`] and calls [`SourceConfig::open`]; the
//! pipeline reads the [`Source`] through [`MessageSource`], and readiness and telemetry ask
//! [`Source::health`], whatever its kind. Another kind of source (Kafka, Kinesis) is a module
//! beside `file` and `sqs`, a variant in both enums here, and an arm in each match below.

use std::sync::Arc;

use super::file::FileSource;
use super::sqs::queue::{SqsConfig, SqsQueue};
use super::{Acknowledged, Message, MessageSource, OpenError, Receipt, SourceError, SourceHealth};

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

impl SourceConfig {
    /// The source, opened: the file opened, or the queue found in the protocol its endpoint
    /// speaks.
    pub async fn open(self, aws: &aws_config::SdkConfig) -> Result<Source, OpenError> {
        match self {
            SourceConfig::Sqs(sqs) => Ok(Source::Sqs(Arc::new(sqs.open(aws).await?))),
            SourceConfig::File { path, source_id } => {
                match FileSource::open(&path, source_id.as_deref()) {
                    Ok(file) => Ok(Source::File(Arc::new(file))),
                    Err(e) => Err(OpenError::new(format!("opening {path}"), e)),
                }
            }
        }
    }
}

/// An opened source.
pub enum Source {
    Sqs(Arc<SqsQueue>),
    File(Arc<FileSource>),
}

impl Source {
    /// What `/readyz` checks and `/metrics` polls of this source; `None` for a file, which is
    /// read or failed, with nothing to ask.
    pub fn health(&self) -> Option<Arc<dyn SourceHealth>> {
        match self {
            Source::Sqs(queue) => Some(queue.clone()),
            Source::File(_) => None,
        }
    }
}

impl MessageSource for Source {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        match self {
            Source::Sqs(queue) => queue.receive().await,
            Source::File(file) => file.receive().await,
        }
    }

    async fn acknowledge(&self, receipts: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        match self {
            Source::Sqs(queue) => queue.acknowledge(receipts).await,
            Source::File(file) => file.acknowledge(receipts).await,
        }
    }
}
