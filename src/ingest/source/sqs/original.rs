//! What a message replayed out of the dead-letter queue says about its first sending.
//!
//! A replay (`ingest replay-dead-letters`, [`crate::ingest::replay`]) receives a message from the
//! dead-letter queue and sends it again: SQS gives the copy a new `MessageId` and a new
//! `SentTimestamp`. Were the pipeline to date and key the copy by those, a message sent before
//! an erasure and replayed after it would be stored with its user's personal fields, and a
//! message stored before it reached the dead-letter queue (its delete lost) would be stored
//! twice. So the replay sets two message attributes, which both SQS adapters read:
//!
//! * [`ORIGINAL_SENT_TIMESTAMP`] (`Number`, milliseconds since the epoch, as SQS's own
//!   `SentTimestamp`): when the message was first sent. The pipeline dates the message by the
//!   earlier of it and `SentTimestamp`, so an attribute a producer forges can only make its
//!   message older: subject to more erasures, never fewer. One that cannot be read makes the
//!   send time unknown, which counts as before every erasure (and dates the row by ingestion).
//! * [`ORIGINAL_MESSAGE_ID`] (`String`): the message's first `MessageId`, a UUID, which keys
//!   the row. One that is not a UUID in canonical form is ignored.
//!
//! Neither warning quotes the attribute's value: a producer could put anything there.

use time::OffsetDateTime;

/// The message attribute holding a replayed message's first send time.
pub const ORIGINAL_SENT_TIMESTAMP: &str = "PiiVaultOriginalSentTimestamp";
/// The message attribute holding a replayed message's first `MessageId`.
pub const ORIGINAL_MESSAGE_ID: &str = "PiiVaultOriginalMessageId";

/// Milliseconds since the epoch, as SQS writes `SentTimestamp`: ASCII digits only, at most 15
/// of them (past the year 30000), else `None`.
pub fn parse_millis(text: &str) -> Option<OffsetDateTime> {
    if text.is_empty() || text.len() > 15 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let millis: i128 = text.parse().ok()?;
    OffsetDateTime::from_unix_timestamp_nanos(millis * 1_000_000).ok()
}

/// Milliseconds since the epoch, as [`ORIGINAL_SENT_TIMESTAMP`] carries them.
pub fn to_millis(at: OffsetDateTime) -> String {
    (at.unix_timestamp_nanos() / 1_000_000).to_string()
}

/// Whether `id` can be a message's first `MessageId`: SQS's are UUIDs in canonical form.
pub fn is_message_id(id: &str) -> bool {
    crate::ingest::source::MessageKey::parse_canonical(id).is_some()
}

/// What a received message says about when and as what it was first sent.
#[derive(Debug, Clone, Copy)]
pub struct Claimed<'a> {
    /// SQS's `MessageId` of this delivery.
    pub message_id: &'a str,
    /// SQS's `SentTimestamp` of this delivery, as received.
    pub sent_timestamp: Option<&'a str>,
    /// [`ORIGINAL_SENT_TIMESTAMP`], if set.
    pub original_sent_timestamp: Option<&'a str>,
    /// [`ORIGINAL_MESSAGE_ID`], if set.
    pub original_message_id: Option<&'a str>,
}

/// The id and send time the pipeline keys, dates and erases a message by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub message_id: String,
    /// `None`: unknown, which counts as sent before every erasure.
    pub sent_at: Option<OffsetDateTime>,
}

impl Claimed<'_> {
    /// The message's origin: its first id and the earlier of the two send times, each
    /// attribute that cannot be read said in a warning (naming the message, not the value).
    pub fn origin(&self) -> Origin {
        let sent = self.sent_timestamp.and_then(parse_millis);
        let sent_at = match self.original_sent_timestamp {
            None => sent,
            Some(text) => match parse_millis(text) {
                Some(original) => Some(sent.map_or(original, |sent| sent.min(original))),
                None => {
                    tracing::warn!(
                        message_id = self.message_id,
                        attribute = ORIGINAL_SENT_TIMESTAMP,
                        bytes = text.len(),
                        "a message attribute is not milliseconds since the epoch; the message \
                         counts as sent before every erasure and is dated by its ingestion"
                    );
                    None
                }
            },
        };
        let message_id = match self.original_message_id {
            Some(id) if is_message_id(id) => id,
            Some(id) => {
                tracing::warn!(
                    message_id = self.message_id,
                    attribute = ORIGINAL_MESSAGE_ID,
                    bytes = id.len(),
                    "a message attribute is not a message id; the message is keyed by its own"
                );
                self.message_id
            }
            None => self.message_id,
        };
        Origin {
            message_id: message_id.to_owned(),
            sent_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5fea7756-0ea4-451a-a703-a558b933e274";
    const FIRST: &str = "0f6b1e0a-0001-4c55-9f31-0e8d2a7b9c10";

    fn claimed<'a>(
        sent: Option<&'a str>,
        original: Option<&'a str>,
        id: Option<&'a str>,
    ) -> Claimed<'a> {
        Claimed {
            message_id: ID,
            sent_timestamp: sent,
            original_sent_timestamp: original,
            original_message_id: id,
        }
    }

    fn at(millis: i64) -> Option<OffsetDateTime> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).ok()
    }

    #[test]
    fn a_replay_is_dated_by_the_earlier_time_so_a_forged_attribute_only_makes_it_older() {
        let sqs = "1700000000000";
        let plain = claimed(Some(sqs), None, None).origin();
        assert_eq!(plain.sent_at, at(1_700_000_000_000));
        assert_eq!(plain.message_id, ID);
        let replayed = claimed(Some(sqs), Some("1600000000123"), Some(FIRST)).origin();
        assert_eq!(replayed.sent_at, at(1_600_000_000_123));
        assert_eq!(replayed.message_id, FIRST);
        let later = claimed(Some(sqs), Some("1800000000000"), None).origin();
        assert_eq!(later.sent_at, at(1_700_000_000_000), "never younger");
        let no_sqs_time = claimed(None, Some("1600000000000"), None).origin();
        assert_eq!(no_sqs_time.sent_at, at(1_600_000_000_000));
    }

    #[test]
    fn an_unreadable_time_is_unknown_and_an_unreadable_id_is_ignored() {
        for bad in [
            "",
            "-1",
            "+1600000000000",
            "1.6e12",
            " 1600000000000",
            "1600000000000 ",
            "٣٣",
            "9999999999999999",
            "10.0.0.1",
        ] {
            let origin = claimed(Some("1700000000000"), Some(bad), None).origin();
            assert_eq!(origin.sent_at, None, "{bad:?}");
        }
        for bad in ["", "m-1", &ID.to_uppercase(), &format!("{ID} "), "10.0.0.1"] {
            let origin = claimed(Some("1700000000000"), None, Some(bad)).origin();
            assert_eq!(origin.message_id, ID, "{bad:?}");
        }
        assert_eq!(parse_millis("0"), at(0));
        assert_eq!(to_millis(at(1_600_000_000_123).unwrap()), "1600000000123");
    }
}
