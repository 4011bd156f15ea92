//! Turning received messages into rows: validate, tokenize, seal.
//!
//! Everything here is CPU work of a few microseconds per message; the personal fields leave
//! this module only as tokens and sealed bytes.

use std::collections::HashMap;
use std::time::Instant;

use time::{Date, OffsetDateTime};

use super::source::{Message, Receipt};
use crate::event::{self, LoginEvent};
use crate::vault::KeyId;
use crate::vault::erasure::ErasedUsers;
use crate::vault::seal::{Place, Sealer};
use crate::vault::token::{Field, Token, Tokenizer};

/// The table whose rows the sealed personal fields belong to (part of the associated data).
pub const LOGINS_TABLE: &str = "user_logins";
/// The table whose rows sealed bodies belong to (part of the associated data).
pub const QUARANTINE_TABLE: &str = "quarantine";
pub const BODY_FIELD: &str = "body";

/// A valid login, ready for `user_logins` and `login_vault`.
#[derive(Debug)]
pub struct LoginRow {
    pub message_id: String,
    pub user_id: String,
    pub device_type: String,
    pub locale: Option<String>,
    pub app_version: i32,
    pub app_version_text: String,
    pub create_date: Date,
    /// `None` for a login of a user erased after it was sent: stored without them.
    pub personal: Option<PersonalFields>,
    pub deliveries: Deliveries,
}

/// A login's personal fields as stored: tokens for analysts, sealed originals for the vault.
#[derive(Debug)]
pub struct PersonalFields {
    pub masked_ip: Token,
    pub masked_device_id: Token,
    pub sealed_ip: Vec<u8>,
    pub sealed_device_id: Vec<u8>,
}

/// A message that failed validation, ready for `quarantine`.
#[derive(Debug)]
pub struct QuarantineRow {
    pub message_id: String,
    pub reason: String,
    pub body_bytes: i32,
    pub sealed_body: Vec<u8>,
    pub sent_at: Option<OffsetDateTime>,
    /// The token of the user id the body names, if it is JSON with a string `user_id`: how
    /// an erasure finds it without opening it.
    pub user_token: Option<Token>,
    pub deliveries: Deliveries,
}

/// The deliveries of one message in a batch (more than one when SQS redelivered it while the
/// first copy was still in flight): all are acknowledged once the row commits.
#[derive(Debug)]
pub struct Deliveries {
    pub receipts: Vec<Receipt>,
    pub first_read: Instant,
}

/// One transaction's worth of rows.
#[derive(Debug)]
pub struct Batch {
    pub token_key_id: KeyId,
    pub data_key_id: KeyId,
    /// The newest erasure record the batch was made with; it may commit only while no newer
    /// one exists.
    pub erasures_seen: i64,
    pub logins: Vec<LoginRow>,
    pub quarantined: Vec<QuarantineRow>,
}

impl Batch {
    /// Messages (not deliveries) in the batch.
    pub fn len(&self) -> usize {
        self.logins.len() + self.quarantined.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn deliveries(&self) -> impl Iterator<Item = &Deliveries> {
        self.logins
            .iter()
            .map(|r| &r.deliveries)
            .chain(self.quarantined.iter().map(|r| &r.deliveries))
    }

    pub fn receipts(&self) -> Vec<Receipt> {
        self.deliveries()
            .flat_map(|d| d.receipts.iter().cloned())
            .collect()
    }

    /// Splits into two smaller batches, to isolate a message that makes the whole transaction
    /// fail. Each half has at least one message when the batch has two or more.
    pub fn split(mut self) -> (Batch, Batch) {
        let half = self.len() / 2;
        let (logins, quarantined) = if half <= self.logins.len() {
            (
                self.logins.split_off(half),
                std::mem::take(&mut self.quarantined),
            )
        } else {
            let keep = half - self.logins.len();
            (Vec::new(), self.quarantined.split_off(keep))
        };
        let back = Batch {
            token_key_id: self.token_key_id,
            data_key_id: self.data_key_id,
            erasures_seen: self.erasures_seen,
            logins,
            quarantined,
        };
        (self, back)
    }
}

/// Validates, tokenizes and seals `messages` into one batch.
///
/// A message delivered twice becomes one row carrying both receipts; a message that fails
/// validation becomes a quarantine row with its body sealed; a login of a user erased after
/// it was sent, or of a retention window that has expired (`window_expired`), keeps no
/// personal field.
pub fn build(
    messages: Vec<Message>,
    tokenizer: &Tokenizer,
    sealer: &Sealer,
    erased: &ErasedUsers,
    window_expired: bool,
) -> Batch {
    let mut batch = Batch {
        token_key_id: tokenizer.key_id(),
        data_key_id: sealer.key_id(),
        erasures_seen: erased.newest(),
        logins: Vec::with_capacity(messages.len()),
        quarantined: Vec::new(),
    };
    // Where each message id went: Ok(index into logins) or Err(index into quarantined).
    let mut seen: HashMap<String, Result<usize, usize>> = HashMap::with_capacity(messages.len());
    for message in messages {
        if let Some(slot) = seen.get(&message.id) {
            let deliveries = match *slot {
                Ok(i) => &mut batch.logins[i].deliveries,
                Err(i) => &mut batch.quarantined[i].deliveries,
            };
            deliveries.receipts.push(message.receipt);
            continue;
        }
        let deliveries = Deliveries {
            receipts: vec![message.receipt],
            first_read: message.read_at,
        };
        let slot = match event::parse(&message.body) {
            Ok(login) => {
                let personal = !window_expired && !erased.erased(&login.user_id, message.sent_at);
                let row = login_row(&message.id, message.sent_at, &login, tokenizer, sealer);
                let row = LoginRow {
                    personal: row.personal.filter(|_| personal),
                    ..row
                };
                batch.logins.push(LoginRow { deliveries, ..row });
                Ok(batch.logins.len() - 1)
            }
            Err(rejection) => {
                batch.quarantined.push(QuarantineRow {
                    sealed_body: sealer.seal(&quarantine_place(&message.id), &message.body),
                    body_bytes: i32::try_from(message.body.len()).unwrap_or(i32::MAX),
                    reason: rejection.to_string(),
                    sent_at: message.sent_at,
                    user_token: user_id_in(&message.body).map(|user| tokenizer.user_id(&user)),
                    message_id: message.id.clone(),
                    deliveries,
                });
                Err(batch.quarantined.len() - 1)
            }
        };
        seen.insert(message.id, slot);
    }
    batch
}

/// The user id a rejected body names, if it is a JSON object with a string `user_id`.
fn user_id_in(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        user_id: String,
    }
    serde_json::from_slice::<Named>(body)
        .ok()
        .map(|named| named.user_id)
}

/// Where a login's personal field is sealed.
pub fn login_place<'a>(field: Field, message_id: &'a str, user_id: &'a str) -> Place<'a> {
    Place {
        table: LOGINS_TABLE,
        field: field.name(),
        message_id,
        user_id,
    }
}

/// Where a quarantined body is sealed (its user is unknown).
pub fn quarantine_place(message_id: &str) -> Place<'_> {
    Place {
        table: QUARANTINE_TABLE,
        field: BODY_FIELD,
        message_id,
        user_id: "",
    }
}

fn login_row(
    message_id: &str,
    sent_at: Option<OffsetDateTime>,
    login: &LoginEvent<'_>,
    tokenizer: &Tokenizer,
    sealer: &Sealer,
) -> LoginRow {
    let user_id = &login.user_id;
    LoginRow {
        message_id: message_id.to_owned(),
        user_id: user_id.to_string(),
        device_type: login.device_type.to_string(),
        locale: login.locale.as_ref().map(|l| l.to_string()),
        app_version: login.app_version.encoded,
        app_version_text: login.app_version.text.to_string(),
        // A source without send times (a file) dates rows by when they were ingested.
        create_date: sent_at.unwrap_or_else(OffsetDateTime::now_utc).date(),
        personal: Some(PersonalFields {
            masked_ip: tokenizer.ip(login.ip_addr),
            masked_device_id: tokenizer.device_id(&login.device_id),
            sealed_ip: sealer.seal(
                &login_place(Field::Ip, message_id, user_id),
                login.ip.as_bytes(),
            ),
            sealed_device_id: sealer.seal(
                &login_place(Field::DeviceId, message_id, user_id),
                login.device_id.as_bytes(),
            ),
        }),
        deliveries: Deliveries {
            receipts: Vec::new(),
            first_read: Instant::now(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::testing::key;

    fn message(id: &str, body: &str, receipt: &str) -> Message {
        Message {
            id: id.to_owned(),
            body: body.as_bytes().to_vec(),
            sent_at: Some(OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()),
            receipt: Receipt(receipt.to_owned()),
            read_at: Instant::now(),
        }
    }

    const VALID: &str = r#"{"user_id": "u-1", "app_version": "0.96", "device_type": "ios", "ip": "10.0.0.1", "locale": null, "device_id": "593-47-5928"}"#;

    fn keys() -> (Tokenizer, Sealer) {
        (
            Tokenizer::new(KeyId(1), &key(1)),
            Sealer::new(KeyId(2), &key(2)),
        )
    }

    #[test]
    fn builds_rows_that_open_at_their_place() {
        let (tokenizer, sealer) = keys();
        let batch = build(
            vec![message("m-1", VALID, "r-1")],
            &tokenizer,
            &sealer,
            &ErasedUsers::default(),
            false,
        );
        assert_eq!((batch.logins.len(), batch.quarantined.len()), (1, 0));
        let row = &batch.logins[0];
        assert_eq!(row.create_date.to_string(), "2023-11-14");
        assert_eq!(
            (row.app_version, row.app_version_text.as_str()),
            (96_000, "0.96")
        );
        assert_eq!(row.locale, None);
        let personal = row.personal.as_ref().unwrap();
        assert_eq!(
            personal.masked_device_id,
            tokenizer.device_id("593-47-5928")
        );
        let ip = sealer
            .open(&login_place(Field::Ip, "m-1", "u-1"), &personal.sealed_ip)
            .unwrap();
        assert_eq!(ip.as_slice(), b"10.0.0.1");
        let device = sealer
            .open(
                &login_place(Field::DeviceId, "m-1", "u-1"),
                &personal.sealed_device_id,
            )
            .unwrap();
        assert_eq!(device.as_slice(), b"593-47-5928");
        assert_eq!(batch.token_key_id, KeyId(1));
        assert_eq!(batch.data_key_id, KeyId(2));
    }

    #[test]
    fn quarantines_with_a_reason_and_a_sealed_body() {
        let (tokenizer, sealer) = keys();
        let bad = r#"{"foo": "oops_wrong_msg_type", "bar": "123"}"#;
        let batch = build(
            vec![message("m-1", bad, "r-1")],
            &tokenizer,
            &sealer,
            &ErasedUsers::default(),
            false,
        );
        assert!(batch.logins.is_empty());
        let row = &batch.quarantined[0];
        assert_eq!(row.reason, "unexpected field `foo`");
        assert_eq!(row.body_bytes, bad.len() as i32);
        assert!(!row.sealed_body.windows(4).any(|w| w == b"oops"));
        let body = sealer
            .open(&quarantine_place("m-1"), &row.sealed_body)
            .unwrap();
        assert_eq!(body.as_slice(), bad.as_bytes());
        assert_eq!(row.user_token, None, "the body names no user");
        let named = r#"{"user_id": "u-9", "ip": 1}"#;
        let batch = build(
            vec![message("m-2", named, "r-2")],
            &tokenizer,
            &sealer,
            &ErasedUsers::default(),
            false,
        );
        assert_eq!(
            batch.quarantined[0].user_token,
            Some(tokenizer.user_id("u-9"))
        );
    }

    #[test]
    fn a_login_of_a_user_erased_after_it_was_sent_keeps_no_personal_field() {
        let (tokenizer, sealer) = keys();
        let sent = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let erased = ErasedUsers::with(tokenizer.clone(), "u-1", sent + time::Duration::seconds(1));
        let other = VALID.replace("u-1", "u-2");
        let batch = build(
            vec![message("m-1", VALID, "r-1"), message("m-2", &other, "r-2")],
            &tokenizer,
            &sealer,
            &erased,
            false,
        );
        assert!(batch.logins[0].personal.is_none());
        assert_eq!(batch.logins[0].user_id, "u-1", "the analytic row stays");
        assert!(batch.logins[1].personal.is_some());
        assert_eq!(batch.erasures_seen, 1);
        let later = ErasedUsers::with(tokenizer.clone(), "u-1", sent - time::Duration::seconds(1));
        let batch = build(
            vec![message("m-1", VALID, "r-1")],
            &tokenizer,
            &sealer,
            &later,
            false,
        );
        assert!(
            batch.logins[0].personal.is_some(),
            "sent after the erasure: new data"
        );
        let expired = build(
            vec![message("m-1", VALID, "r-1")],
            &tokenizer,
            &sealer,
            &ErasedUsers::default(),
            true,
        );
        assert!(
            expired.logins[0].personal.is_none(),
            "its window has expired"
        );
    }

    #[test]
    fn a_redelivered_message_is_one_row_with_both_receipts() {
        let (tokenizer, sealer) = keys();
        let batch = build(
            vec![
                message("m-1", VALID, "r-1"),
                message("m-2", "nope", "r-2"),
                message("m-1", VALID, "r-3"),
                message("m-2", "nope", "r-4"),
            ],
            &tokenizer,
            &sealer,
            &ErasedUsers::default(),
            false,
        );
        assert_eq!((batch.logins.len(), batch.quarantined.len()), (1, 1));
        let receipts: Vec<String> = batch.receipts().into_iter().map(|r| r.0).collect();
        assert_eq!(receipts, ["r-1", "r-3", "r-2", "r-4"]);
    }

    #[test]
    fn split_keeps_every_row_and_its_receipts() {
        let (tokenizer, sealer) = keys();
        let messages = (0..5)
            .map(|i| {
                let body = if i % 2 == 0 { VALID } else { "nope" };
                message(&format!("m-{i}"), body, &format!("r-{i}"))
            })
            .collect();
        let batch = build(
            messages,
            &tokenizer,
            &sealer,
            &ErasedUsers::default(),
            false,
        );
        assert_eq!((batch.logins.len(), batch.quarantined.len()), (3, 2));
        let (front, back) = batch.split();
        assert_eq!((front.len(), back.len()), (2, 3));
        let mut receipts: Vec<String> = front
            .receipts()
            .into_iter()
            .chain(back.receipts())
            .map(|r| r.0)
            .collect();
        receipts.sort();
        assert_eq!(receipts, ["r-0", "r-1", "r-2", "r-3", "r-4"]);
        let (a, b) = back.split();
        assert_eq!((a.len(), b.len()), (1, 2));
    }
}
