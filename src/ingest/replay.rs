//! `ingest replay-dead-letters`: moves messages from the dead-letter queue back to the login
//! queue, each carrying its first send time and its first id ([`super::source::sqs::original`]).
//!
//! Each round receives up to ten messages from the dead-letter queue (hidden from other
//! readers for the visibility timeout), sends each to the login queue with the two message
//! attributes, then deletes from the dead-letter queue exactly the messages SQS accepted. So
//! nothing leaves the dead-letter queue before its copy is on the login queue. When the login
//! queue refuses a message, that message and the rest of its round are made visible again in
//! the dead-letter queue at once, and the run stops, saying why. A message sent whose delete
//! was refused is sent again by a later run: it carries its first id, so ingest skips it.
//!
//! Before the first receive, the login queue's redrive policy must name the dead-letter queue:
//! a swapped pair of arguments, or a queue that is not the dead-letter queue's source, moves
//! nothing. Standard queues only: a FIFO queue needs a message group, which this does not set.
//!
//! The carried send time is the earlier of the attribute the message already has (it was
//! replayed before and failed again) and its `SentTimestamp` in the dead-letter queue (which
//! SQS keeps from the first sending on a standard queue). A message whose attribute cannot be
//! read carries [`UNKNOWN_TIME`], which ingest reads as an unknown send time: before every
//! erasure. No log line quotes a body or an attribute's value.

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
};

use super::source::SourceError;
use super::source::sqs::SQS_BATCH_LIMIT;
use super::source::sqs::json::{attribute, sent_timestamp, source_error};
use super::source::sqs::original::{self, ORIGINAL_MESSAGE_ID, ORIGINAL_SENT_TIMESTAMP};

/// What a replayed message carries when its send time cannot be known: not a number, so
/// ingest reads it as unknown, which counts as sent before every erasure.
pub const UNKNOWN_TIME: &str = "unknown";

/// How much to move, and how.
#[derive(Debug, Clone, Copy)]
pub struct ReplaySettings {
    /// Most messages to receive from the dead-letter queue in this run.
    pub max_messages: u64,
    /// Seconds a received message stays hidden in the dead-letter queue while it is moved.
    pub visibility_timeout_seconds: i32,
    /// Long-poll wait: the run ends when a receive waits this long and gets nothing.
    pub wait_time_seconds: i32,
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Received from the dead-letter queue.
    pub received: u64,
    /// Sent to the login queue and deleted from the dead-letter queue.
    pub moved: u64,
    /// Sent, but the dead-letter queue refused their delete: a later run sends them again,
    /// and ingest skips the copies (they carry their first id).
    pub sent_not_deleted: u64,
    /// Made visible again in the dead-letter queue, unsent, after the login queue refused one.
    pub released: u64,
}

impl std::fmt::Display for Replayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received={} moved={} sent_not_deleted={} released={}",
            self.received, self.moved, self.sent_not_deleted, self.released
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Sqs(#[from] SourceError),
    #[error("--dead-letter-queue-url and --queue-url name the same queue")]
    SameQueue,
    #[error(
        "the queue's redrive policy names {named}, not {dead_letter_queue}: it is not that \
         dead-letter queue's source queue, so nothing was moved"
    )]
    NotItsDeadLetterQueue {
        named: String,
        dead_letter_queue: String,
    },
    #[error(
        "the queue refused a message ({why}); it and the {released} not sent after it stay in \
         the dead-letter queue ({so_far})"
    )]
    Refused {
        why: String,
        released: u64,
        so_far: Replayed,
    },
    #[error("deleting moved messages from the dead-letter queue failed ({why}); ({so_far})")]
    DeleteFailed { why: String, so_far: Replayed },
}

/// Moves up to `settings.max_messages` messages from `dead_letter_queue_url` to `queue_url`,
/// logging progress after each round.
pub async fn replay_dead_letters(
    client: &aws_sdk_sqs::Client,
    dead_letter_queue_url: &str,
    queue_url: &str,
    settings: ReplaySettings,
) -> Result<Replayed, ReplayError> {
    if dead_letter_queue_url.trim_end_matches('/') == queue_url.trim_end_matches('/') {
        return Err(ReplayError::SameQueue);
    }
    let waiting = check_pairing(client, dead_letter_queue_url, queue_url).await?;
    tracing::info!(
        waiting,
        max_messages = settings.max_messages,
        "replaying the dead-letter queue"
    );
    let mut done = Replayed::default();
    while done.received < settings.max_messages {
        let room = (settings.max_messages - done.received).min(SQS_BATCH_LIMIT as u64);
        let messages = client
            .receive_message()
            .queue_url(dead_letter_queue_url)
            .max_number_of_messages(room as i32)
            .wait_time_seconds(settings.wait_time_seconds)
            .visibility_timeout(settings.visibility_timeout_seconds)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names(ORIGINAL_SENT_TIMESTAMP)
            .message_attribute_names(ORIGINAL_MESSAGE_ID)
            .send()
            .await
            .map_err(|e| source_error("ReceiveMessage (dead-letter queue)", e))?
            .messages
            .unwrap_or_default();
        if messages.is_empty() {
            break;
        }
        done.received += messages.len() as u64;
        move_round(
            client,
            dead_letter_queue_url,
            queue_url,
            &messages,
            &mut done,
        )
        .await?;
        tracing::info!(
            moved = done.moved,
            received = done.received,
            waiting,
            "replay progress"
        );
    }
    Ok(done)
}

/// Checks that `queue_url`'s redrive policy names `dead_letter_queue_url`; returns about how
/// many messages wait in the dead-letter queue.
async fn check_pairing(
    client: &aws_sdk_sqs::Client,
    dead_letter_queue_url: &str,
    queue_url: &str,
) -> Result<u64, ReplayError> {
    let dead_letters = client
        .get_queue_attributes()
        .queue_url(dead_letter_queue_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await
        .map_err(|e| source_error("GetQueueAttributes (dead-letter queue)", e))?
        .attributes
        .unwrap_or_default();
    let queue = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .map_err(|e| source_error("GetQueueAttributes (queue)", e))?
        .attributes
        .unwrap_or_default();
    let arn = dead_letters
        .get(&QueueAttributeName::QueueArn)
        .cloned()
        .unwrap_or_default();
    let named = queue
        .get(&QueueAttributeName::RedrivePolicy)
        .and_then(|policy| serde_json::from_str::<serde_json::Value>(policy).ok())
        .and_then(|policy| policy["deadLetterTargetArn"].as_str().map(str::to_owned));
    if named.as_deref() != Some(arn.as_str()) {
        return Err(ReplayError::NotItsDeadLetterQueue {
            named: named.unwrap_or_else(|| "no dead-letter queue".to_owned()),
            dead_letter_queue: arn,
        });
    }
    Ok(dead_letters
        .get(&QueueAttributeName::ApproximateNumberOfMessages)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

/// The two attributes a message replayed from the dead-letter queue carries.
fn carried(message: &aws_sdk_sqs::types::Message) -> (String, String) {
    let dead_letter_id = message.message_id.as_deref().unwrap_or_default();
    let sent = sent_timestamp(message).and_then(original::parse_millis);
    let time = match attribute(message, ORIGINAL_SENT_TIMESTAMP) {
        Some(text) => match original::parse_millis(text) {
            Some(first) => Some(original::to_millis(sent.map_or(first, |s| s.min(first)))),
            None => {
                tracing::warn!(
                    message_id = dead_letter_id,
                    attribute = ORIGINAL_SENT_TIMESTAMP,
                    "a message attribute is not milliseconds since the epoch; the replay \
                     carries an unknown send time (before every erasure)"
                );
                None
            }
        },
        None => sent.map(original::to_millis),
    };
    let id = match attribute(message, ORIGINAL_MESSAGE_ID) {
        Some(id) if original::is_message_id(id) => id,
        Some(_) => {
            tracing::warn!(
                message_id = dead_letter_id,
                attribute = ORIGINAL_MESSAGE_ID,
                "a message attribute is not a message id; the replay carries the message's own"
            );
            dead_letter_id
        }
        None => dead_letter_id,
    };
    (
        time.unwrap_or_else(|| UNKNOWN_TIME.to_owned()),
        id.to_owned(),
    )
}

fn attribute_value(data_type: &str, value: String) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type(data_type)
        .string_value(value)
        .build()
        .expect("data type is set")
}

/// Sends one round's messages, then deletes what was sent and releases what was not.
async fn move_round(
    client: &aws_sdk_sqs::Client,
    dead_letter_queue_url: &str,
    queue_url: &str,
    messages: &[aws_sdk_sqs::types::Message],
    done: &mut Replayed,
) -> Result<(), ReplayError> {
    let mut sent = Vec::with_capacity(messages.len());
    let mut refused = None;
    for (i, message) in messages.iter().enumerate() {
        let (time, id) = carried(message);
        let time_type = if time == UNKNOWN_TIME {
            "String"
        } else {
            "Number"
        };
        let outcome = client
            .send_message()
            .queue_url(queue_url)
            .message_body(message.body.as_deref().unwrap_or_default())
            .message_attributes(ORIGINAL_SENT_TIMESTAMP, attribute_value(time_type, time))
            .message_attributes(ORIGINAL_MESSAGE_ID, attribute_value("String", id))
            .send()
            .await;
        match outcome {
            Ok(_) => sent.push(message),
            Err(error) => {
                refused = Some((i, source_error("SendMessage", error).message));
                break;
            }
        }
    }
    let deleted = delete(client, dead_letter_queue_url, &sent).await;
    if let Some((first_unsent, why)) = refused {
        let unsent = &messages[first_unsent..];
        done.released += release(client, dead_letter_queue_url, unsent).await;
        match deleted {
            Ok(deleted) => {
                done.moved += deleted;
                done.sent_not_deleted += sent.len() as u64 - deleted;
            }
            Err(_) => done.sent_not_deleted += sent.len() as u64,
        }
        return Err(ReplayError::Refused {
            why,
            released: unsent.len() as u64 - 1,
            so_far: *done,
        });
    }
    match deleted {
        Ok(deleted) => {
            done.moved += deleted;
            done.sent_not_deleted += sent.len() as u64 - deleted;
            Ok(())
        }
        Err(error) => {
            done.sent_not_deleted += sent.len() as u64;
            Err(ReplayError::DeleteFailed {
                why: error.message,
                so_far: *done,
            })
        }
    }
}

/// Deletes `messages` from the dead-letter queue; how many SQS deleted (each refusal logged).
async fn delete(
    client: &aws_sdk_sqs::Client,
    dead_letter_queue_url: &str,
    messages: &[&aws_sdk_sqs::types::Message],
) -> Result<u64, SourceError> {
    if messages.is_empty() {
        return Ok(0);
    }
    let entries = messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(message.receipt_handle.as_deref().unwrap_or_default())
                .build()
                .expect("id and receipt handle are set")
        })
        .collect();
    let output = client
        .delete_message_batch()
        .queue_url(dead_letter_queue_url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(|e| source_error("DeleteMessageBatch (dead-letter queue)", e))?;
    for failed in &output.failed {
        let message_id = failed
            .id
            .parse::<usize>()
            .ok()
            .and_then(|i| messages.get(i)?.message_id.as_deref());
        tracing::warn!(
            message_id,
            code = failed.code,
            "sent, but the dead-letter queue refused its delete: a later run sends it again \
             and ingest skips the copy"
        );
    }
    Ok(output.successful.len() as u64)
}

/// Makes `messages` visible again in the dead-letter queue; how many SQS took back.
async fn release(
    client: &aws_sdk_sqs::Client,
    dead_letter_queue_url: &str,
    messages: &[aws_sdk_sqs::types::Message],
) -> u64 {
    let entries = messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(message.receipt_handle.as_deref().unwrap_or_default())
                .visibility_timeout(0)
                .build()
                .expect("id and receipt handle are set")
        })
        .collect();
    match client
        .change_message_visibility_batch()
        .queue_url(dead_letter_queue_url)
        .set_entries(Some(entries))
        .send()
        .await
    {
        Ok(output) => output.successful.len() as u64,
        Err(error) => {
            let error = source_error("ChangeMessageVisibilityBatch (dead-letter queue)", error);
            tracing::warn!(%error, "the unsent messages reappear after their visibility timeout");
            0
        }
    }
}
