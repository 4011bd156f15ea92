//! The pipeline's message source over the Query protocol: ReceiveMessage and
//! DeleteMessageBatch, and GetQueueAttributes for the readiness check and the queue's depth.

use std::time::{Duration, Instant};

use super::answer::{message_attribute, system_attribute};
use super::client::{QueryClient, REQUEST_MARGIN};
use super::form::Form;
use crate::ingest::source::sqs::original::{Claimed, ORIGINAL_MESSAGE_ID, ORIGINAL_SENT_TIMESTAMP};
use crate::ingest::source::sqs::{PollSettings, SQS_BATCH_LIMIT, observe_receive, queue_depth};
use crate::ingest::source::{
    Acknowledged, HealthFuture, Message, MessageSource, Receipt, SourceError, SourceHealth,
};
use crate::telemetry::observed::QueueDepth;

/// The pipeline's message source over the Query protocol.
#[derive(Debug, Clone)]
pub struct QuerySqsSource {
    client: QueryClient,
    queue_url: String,
    settings: PollSettings,
}

impl QuerySqsSource {
    pub fn new(client: QueryClient, queue_url: String, settings: PollSettings) -> Self {
        Self {
            client,
            queue_url,
            settings,
        }
    }
}

impl SourceHealth for QuerySqsSource {
    /// Succeeds when the queue answers (GetQueueAttributes): the readiness check.
    fn check(&self) -> HealthFuture<'_, ()> {
        Box::pin(async move {
            let mut form = Form::for_queue("GetQueueAttributes", &self.queue_url);
            form.add("AttributeName.1", "QueueArn");
            let target = self.client.target(&self.queue_url);
            self.client
                .call("GetQueueAttributes", target, form, REQUEST_MARGIN)
                .await
                .map(drop)
        })
    }

    /// The queue's approximate message counts (GetQueueAttributes).
    fn depth(&self) -> HealthFuture<'_, QueueDepth> {
        Box::pin(async move {
            const VISIBLE: &str = "ApproximateNumberOfMessages";
            const IN_FLIGHT: &str = "ApproximateNumberOfMessagesNotVisible";
            let mut form = Form::for_queue("GetQueueAttributes", &self.queue_url);
            form.add("AttributeName.1", VISIBLE);
            form.add("AttributeName.2", IN_FLIGHT);
            let target = self.client.target(&self.queue_url);
            let answer = self
                .client
                .call("GetQueueAttributes", target, form, REQUEST_MARGIN)
                .await?;
            let result = answer.child("GetQueueAttributesResult");
            let count = |name: &str| {
                result
                    .and_then(|r| system_attribute(r, name))
                    .unwrap_or_default()
            };
            queue_depth(count(VISIBLE), count(IN_FLIGHT))
        })
    }
}

impl MessageSource for QuerySqsSource {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        let mut form = Form::for_queue("ReceiveMessage", &self.queue_url);
        form.add("MaxNumberOfMessages", &SQS_BATCH_LIMIT.to_string());
        form.add(
            "WaitTimeSeconds",
            &self.settings.wait_time_seconds.to_string(),
        );
        if let Some(seconds) = self.settings.visibility_timeout_seconds {
            form.add("VisibilityTimeout", &seconds.to_string());
        }
        // The name every version of the Query API knows (MessageSystemAttributeName came later).
        form.add("AttributeName.1", "SentTimestamp");
        // What a replay out of the dead-letter queue carries (`super::original`).
        form.add("MessageAttributeName.1", ORIGINAL_SENT_TIMESTAMP);
        form.add("MessageAttributeName.2", ORIGINAL_MESSAGE_ID);
        let wait = Duration::from_secs(self.settings.wait_time_seconds.max(0) as u64);
        let answer = self
            .client
            .call(
                "ReceiveMessage",
                self.client.target(&self.queue_url),
                form,
                wait + REQUEST_MARGIN,
            )
            .await?;
        let read_at = Instant::now();
        let mut messages = Vec::new();
        let Some(result) = answer.child("ReceiveMessageResult") else {
            observe_receive([]);
            return Ok(messages);
        };
        observe_receive(
            result
                .children("Message")
                .map(|message| system_attribute(message, "SentTimestamp")),
        );
        for message in result.children("Message") {
            let id = message.child_text("MessageId");
            let receipt = message.child_text("ReceiptHandle");
            if id.is_empty() || receipt.is_empty() {
                tracing::warn!("SQS returned a message without id or receipt handle; skipped");
                continue;
            }
            let origin = Claimed {
                message_id: id,
                sent_timestamp: system_attribute(message, "SentTimestamp"),
                original_sent_timestamp: message_attribute(message, ORIGINAL_SENT_TIMESTAMP),
                original_message_id: message_attribute(message, ORIGINAL_MESSAGE_ID),
            }
            .origin();
            messages.push(Message {
                id: origin.message_id,
                // Exactly as sent: whitespace is part of the body.
                body: message
                    .child("Body")
                    .map(|b| b.text.clone().into_bytes())
                    .unwrap_or_default(),
                sent_at: origin.sent_at,
                receipt: Receipt(receipt.to_owned()),
                read_at,
            });
        }
        Ok(messages)
    }

    async fn acknowledge(&self, receipts: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        let mut outcome = Acknowledged::default();
        for chunk in receipts.chunks(SQS_BATCH_LIMIT) {
            let mut form = Form::for_queue("DeleteMessageBatch", &self.queue_url);
            for (i, receipt) in chunk.iter().enumerate() {
                let n = i + 1;
                form.add(
                    &format!("DeleteMessageBatchRequestEntry.{n}.Id"),
                    &i.to_string(),
                );
                form.add(
                    &format!("DeleteMessageBatchRequestEntry.{n}.ReceiptHandle"),
                    &receipt.0,
                );
            }
            let answer = self
                .client
                .call(
                    "DeleteMessageBatch",
                    self.client.target(&self.queue_url),
                    form,
                    REQUEST_MARGIN,
                )
                .await?;
            let Some(result) = answer.child("DeleteMessageBatchResult") else {
                continue;
            };
            outcome.deleted += result.children("DeleteMessageBatchResultEntry").count();
            for failed in result.children("BatchResultErrorEntry") {
                tracing::warn!(
                    code = failed.child_text("Code"),
                    message = failed.child_text("Message"),
                    "SQS refused to delete a message; it will be redelivered and recognized as stored"
                );
            }
        }
        Ok(outcome)
    }
}
