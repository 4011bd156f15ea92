//! Which protocol to speak to SQS: the one configured, or the one the endpoint answers in
//! ([`ProtocolChoice::Auto`], `--sqs-protocol auto`), found with one JSON-protocol request
//! through the AWS SDK, whose answer tells JSON from Query.

use std::time::Duration;

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};

use super::{Protocol, is_url};
use crate::ingest::source::SourceError;

/// Longest the one request may take, as long as a Query request beyond its long-poll wait.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol to speak, as configured (`--sqs-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtocolChoice {
    /// AWS JSON, through the AWS SDK: AWS, LocalStack 3.0 and later.
    Json,
    /// Form requests and XML answers: LocalStack before 3.0, older ElasticMQ.
    Query,
    /// Ask the endpoint once (a JSON GetQueueUrl), log which it speaks, and use that.
    Auto,
}

impl ProtocolChoice {
    /// The protocol to use for `queue` (name or URL): the one asked for, or with `Auto` the one
    /// the endpoint answers in.
    pub async fn resolve(
        self,
        aws: &aws_config::SdkConfig,
        queue: &str,
    ) -> Result<Protocol, SourceError> {
        match self {
            ProtocolChoice::Json => Ok(Protocol::Json),
            ProtocolChoice::Query => Ok(Protocol::Query),
            ProtocolChoice::Auto => {
                let protocol = probe(aws, queue).await?;
                tracing::info!(
                    %protocol,
                    "--sqs-protocol auto: the SQS endpoint speaks the {protocol} protocol; using it"
                );
                Ok(protocol)
            }
        }
    }
}

/// Which protocol the SQS endpoint of `aws` speaks, found with one JSON-protocol GetQueueUrl
/// for `queue` (a name, or a URL whose last segment is the name), not retried: JSON if the
/// answer is JSON, success or error (a missing queue is reported later, in that protocol);
/// Query if it is anything else or a JSON complaint that the operation is unknown.
pub async fn probe(aws: &aws_config::SdkConfig, queue: &str) -> Result<Protocol, SourceError> {
    use aws_sdk_sqs::config::retry::RetryConfig;
    use aws_sdk_sqs::config::timeout::TimeoutConfig;

    let name = if is_url(queue) {
        queue
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(queue)
    } else {
        queue
    };
    let config = aws_sdk_sqs::config::Builder::from(aws)
        .retry_config(RetryConfig::disabled())
        .timeout_config(TimeoutConfig::builder().operation_timeout(TIMEOUT).build())
        .build();
    let client = aws_sdk_sqs::Client::from_conf(config);
    let answered = match client.get_queue_url().queue_name(name).send().await {
        Ok(output) => {
            return Ok(if output.queue_url.is_some() {
                Protocol::Json
            } else {
                Protocol::Query
            });
        }
        Err(SdkError::ServiceError(error)) => {
            speaks_json(error.raw().body().bytes(), error.err().code())
        }
        Err(SdkError::ResponseError(error)) => speaks_json(error.raw().body().bytes(), None),
        Err(error) => {
            return Err(SourceError {
                message: format!(
                    "probing which SQS protocol the endpoint speaks: {}",
                    crate::aws_error::one_line(&error)
                ),
                transient: true,
            });
        }
    };
    Ok(if answered {
        Protocol::Json
    } else {
        Protocol::Query
    })
}

/// Whether an error answer to a JSON-protocol request shows the server speaks JSON.
fn speaks_json(body: Option<&[u8]>, code: Option<&str>) -> bool {
    let json = body.is_some_and(|b| b.trim_ascii_start().starts_with(b"{"));
    let unknown_operation = code.is_some_and(|c| {
        [
            "UnknownOperation",
            "InvalidAction",
            "MissingAction",
            "SerializationException",
        ]
        .iter()
        .any(|unknown| c.contains(unknown))
    });
    json && !unknown_operation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_answer_means_json_unless_it_does_not_know_the_operation() {
        assert!(speaks_json(
            Some(b" {\"__type\": \"QueueDoesNotExist\"}"),
            Some("QueueDoesNotExist")
        ));
        assert!(!speaks_json(
            Some(b"{\"__type\": \"UnknownOperationException\"}"),
            Some("UnknownOperationException")
        ));
        assert!(!speaks_json(Some(b"<ErrorResponse/>"), None));
        assert!(!speaks_json(None, None));
    }
}
