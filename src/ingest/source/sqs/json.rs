//! The SQS adapter over the AWS SDK (the JSON protocol): long-poll receive and batched delete,
//! and the SDK calls `loadgen` and the dead-letter replay share (GetQueueUrl, SendMessageBatch,
//! an SDK error as a [`SourceError`]).

use std::time::Instant;

use super::original::{Claimed, ORIGINAL_MESSAGE_ID, ORIGINAL_SENT_TIMESTAMP};
use super::{PollSettings, SQS_BATCH_LIMIT, is_permanent, is_url, observe_receive, queue_depth};
use crate::ingest::source::{
    Acknowledged, HealthFuture, Message, MessageSource, Receipt, SourceError, SourceHealth,
};
use crate::telemetry::observed::QueueDepth;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};

#[derive(Debug, Clone)]
pub struct SqsSource {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    settings: PollSettings,
}

impl SqsSource {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: String, settings: PollSettings) -> Self {
        Self {
            client,
            queue_url,
            settings,
        }
    }
}

impl SourceHealth for SqsSource {
    /// Succeeds when the queue answers (GetQueueAttributes): the readiness check.
    fn check(&self) -> HealthFuture<'_, ()> {
        Box::pin(async move {
            self.client
                .get_queue_attributes()
                .queue_url(&self.queue_url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .map(drop)
                .map_err(|e| source_error("GetQueueAttributes", e))
        })
    }

    /// The queue's approximate message counts (GetQueueAttributes).
    fn depth(&self) -> HealthFuture<'_, QueueDepth> {
        Box::pin(async move {
            let output = self
                .client
                .get_queue_attributes()
                .queue_url(&self.queue_url)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                .send()
                .await
                .map_err(|e| source_error("GetQueueAttributes", e))?;
            let attributes = output.attributes.unwrap_or_default();
            let count =
                |name: QueueAttributeName| attributes.get(&name).map(String::as_str).unwrap_or("");
            queue_depth(
                count(QueueAttributeName::ApproximateNumberOfMessages),
                count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            )
        })
    }
}

/// The queue URL for `queue`, which is either a URL already or a queue name.
pub async fn resolve_queue_url(
    client: &aws_sdk_sqs::Client,
    queue: &str,
) -> Result<String, SourceError> {
    if is_url(queue) {
        return Ok(queue.to_owned());
    }
    let output = client
        .get_queue_url()
        .queue_name(queue)
        .send()
        .await
        .map_err(|e| source_error(&format!("GetQueueUrl {queue}"), e))?;
    output.queue_url.ok_or_else(|| SourceError {
        message: format!("GetQueueUrl {queue}: no URL in the response"),
        transient: false,
    })
}

pub fn source_error<E, R>(operation: &str, error: SdkError<E, R>) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let transient = match &error {
        SdkError::ServiceError(service) => !is_permanent(service.err().code().unwrap_or_default()),
        _ => true,
    };
    SourceError {
        message: format!("{operation}: {}", crate::aws_error::one_line(&error)),
        transient,
    }
}

/// Sends up to [`SQS_BATCH_LIMIT`] bodies in one SendMessageBatch; fails if SQS refuses any.
pub async fn send_batch(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    bodies: &[String],
) -> Result<usize, SourceError> {
    let entries = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(body)
                .build()
                .expect("id and body are set")
        })
        .collect();
    let output = client
        .send_message_batch()
        .queue_url(queue_url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(|e| source_error("SendMessageBatch", e))?;
    if let Some(failed) = output.failed.first() {
        return Err(SourceError {
            message: format!(
                "SQS refused {} message(s) of a batch: {} {}",
                output.failed.len(),
                failed.code,
                failed.message.as_deref().unwrap_or("")
            ),
            transient: !failed.sender_fault,
        });
    }
    Ok(output.successful.len())
}

/// A message attribute's string value (`String` and `Number` attributes carry one).
pub(crate) fn attribute<'a>(
    message: &'a aws_sdk_sqs::types::Message,
    name: &str,
) -> Option<&'a str> {
    message
        .message_attributes
        .as_ref()?
        .get(name)?
        .string_value
        .as_deref()
}

/// SQS's `SentTimestamp` of a message, as received.
pub(crate) fn sent_timestamp(message: &aws_sdk_sqs::types::Message) -> Option<&str> {
    message
        .attributes
        .as_ref()?
        .get(&MessageSystemAttributeName::SentTimestamp)
        .map(String::as_str)
}

impl MessageSource for SqsSource {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        let output = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(SQS_BATCH_LIMIT as i32)
            .wait_time_seconds(self.settings.wait_time_seconds)
            .set_visibility_timeout(self.settings.visibility_timeout_seconds)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names(ORIGINAL_SENT_TIMESTAMP)
            .message_attribute_names(ORIGINAL_MESSAGE_ID)
            .send()
            .await
            .map_err(|e| source_error("ReceiveMessage", e))?;
        let read_at = Instant::now();
        observe_receive(
            output
                .messages
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(sent_timestamp),
        );
        let mut messages = Vec::new();
        for mut message in output.messages.unwrap_or_default() {
            let (Some(id), Some(receipt)) = (&message.message_id, message.receipt_handle.take())
            else {
                tracing::warn!("SQS returned a message without id or receipt handle; skipped");
                continue;
            };
            let origin = Claimed {
                message_id: id,
                sent_timestamp: sent_timestamp(&message),
                original_sent_timestamp: attribute(&message, ORIGINAL_SENT_TIMESTAMP),
                original_message_id: attribute(&message, ORIGINAL_MESSAGE_ID),
            }
            .origin();
            messages.push(Message {
                id: origin.message_id,
                body: message.body.take().unwrap_or_default().into_bytes(),
                sent_at: origin.sent_at,
                receipt: Receipt(receipt),
                read_at,
            });
        }
        Ok(messages)
    }

    async fn acknowledge(&self, receipts: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        let mut outcome = Acknowledged::default();
        for chunk in receipts.chunks(SQS_BATCH_LIMIT) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, receipt)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(&receipt.0)
                        .build()
                        .expect("id and receipt handle are set")
                })
                .collect();
            let output = self
                .client
                .delete_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| source_error("DeleteMessageBatch", e))?;
            outcome.deleted += output.successful.len();
            for failed in &output.failed {
                tracing::warn!(
                    code = failed.code,
                    message = failed.message.as_deref().unwrap_or(""),
                    "SQS refused to delete a message; it will be redelivered and recognized as stored"
                );
            }
        }
        Ok(outcome)
    }
}
