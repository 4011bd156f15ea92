//! Turning received messages into rows: validate, tokenize, seal.
//!
//! Everything here is CPU work of a few microseconds per message; the personal fields leave
//! this module only as tokens and sealed bytes.

use std::collections::HashMap;
use std::time::Instant;

use time::{Date, OffsetDateTime};

use super::source::{Message, Receipt};
use crate::event::{self, InClear, LoginEvent, user_id_named_in};
use crate::vault::KeyId;
use crate::vault::erasure::ErasedUsers;
use crate::vault::place::{login_place, quarantine_place};
use crate::vault::seal::Sealer;
use crate::vault::token::{Field, Token, Tokenizer};

/// A valid login, ready for `user_logins` and `login_vault`.
#[derive(Debug)]
pub struct LoginRow {
    pub message_id: String,
    /// The columns analysts read, as the event gave them.
    pub in_clear: InClear,
    pub create_date: LoginDate,
    /// `None` for a login of a user erased after it was sent: stored without them.
    pub personal: Option<PersonalFields>,
    pub deliveries: Deliveries,
}

/// A login's `create_date`, which also picks its month's partition (migration 0017).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginDate {
    /// The day the queue received it (SQS's SentTimestamp): every redelivery repeats it.
    Sent(Date),
    /// For a source without send times (a file): the day the source was first ingested
    /// (migration 0021), which every replay repeats ([`Batch::date_undated_logins`]); until
    /// then, and for a source that has no key, the day it is ingested.
    Ingested(Date),
}

impl LoginDate {
    pub fn day(self) -> Date {
        match self {
            LoginDate::Sent(day) | LoginDate::Ingested(day) => day,
        }
    }
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
    pub body: QuarantinedBody,
    pub sent_at: Option<OffsetDateTime>,
    pub deliveries: Deliveries,
}

/// What a quarantine row keeps of the body.
#[derive(Debug)]
pub enum QuarantinedBody {
    Sealed {
        sealed: Vec<u8>,
        /// The token of the user id the body names, if it is JSON with a string `user_id`:
        /// how an erasure finds it without opening it.
        user_token: Option<Token>,
    },
    /// Nothing: the body's person is gone (migration 0013's `body_withheld`).
    Withheld(Withheld),
}

/// Why a quarantined body is not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withheld {
    /// It names a user erased after it was sent.
    UserErased,
    /// It was sent in a retention window that has expired.
    WindowExpired,
}

impl Withheld {
    /// `quarantine.body_withheld`.
    pub fn as_str(self) -> &'static str {
        match self {
            Withheld::UserErased => "user-erased",
            Withheld::WindowExpired => "window-expired",
        }
    }
}

impl QuarantinedBody {
    pub fn sealed(&self) -> Option<&[u8]> {
        match self {
            QuarantinedBody::Sealed { sealed, .. } => Some(sealed),
            QuarantinedBody::Withheld(_) => None,
        }
    }

    pub fn user_token(&self) -> Option<&Token> {
        match self {
            QuarantinedBody::Sealed { user_token, .. } => user_token.as_ref(),
            QuarantinedBody::Withheld(_) => None,
        }
    }

    pub fn withheld(&self) -> Option<Withheld> {
        match self {
            QuarantinedBody::Sealed { .. } => None,
            QuarantinedBody::Withheld(why) => Some(*why),
        }
    }
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
    /// Dates the logins without a send time `day`: their source's first day.
    pub fn date_undated_logins(&mut self, day: Date) {
        for login in &mut self.logins {
            if let LoginDate::Ingested(_) = login.create_date {
                login.create_date = LoginDate::Ingested(day);
            }
        }
    }

    /// Messages (not deliveries) in the batch.
    pub fn len(&self) -> usize {
        self.logins.len() + self.quarantined.len()
    }

    /// Whether the batch holds logins dated in `month` (`YYYY-MM`) and nothing else.
    pub fn all_of_month(&self, month: &str) -> bool {
        self.quarantined.is_empty()
            && self
                .logins
                .iter()
                .all(|row| row.create_date.day().to_string().starts_with(month))
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

/// The quarantine reason of a valid login sent in a retention window that has expired.
pub const LATE_FOR_ITS_WINDOW: &str =
    "sent in a retention window that has expired: the login is not stored";

/// Validates, tokenizes and seals `messages` into one batch.
///
/// A message delivered twice becomes one row carrying both receipts; a message that fails
/// validation becomes a quarantine row with its body sealed; a login of a user erased after
/// it was sent keeps no personal field, and a rejected body that names such a user is
/// withheld. Every message sent in a retention window that has expired (`window_expired`)
/// becomes a quarantine row with its body withheld: a valid login with the reason
/// [`LATE_FOR_ITS_WINDOW`], a rejected one with its rejection. The batch carries the newest
/// erasure record `erased` knows: the writer commits it only while no newer one exists.
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
            Ok(login) if !window_expired => {
                let personal = !erased.erased(&login.in_clear.user_id, message.sent_at);
                let row = login_row(&message.id, message.sent_at, login, tokenizer, sealer);
                let row = LoginRow {
                    personal: row.personal.filter(|_| personal),
                    ..row
                };
                batch.logins.push(LoginRow { deliveries, ..row });
                Ok(batch.logins.len() - 1)
            }
            parsed => {
                // A login of an expired window has no month to go to (its partitions were
                // dropped with it): its arrival is recorded, and nothing of it is kept.
                let (reason, body) = match parsed {
                    Ok(_) => (
                        LATE_FOR_ITS_WINDOW.to_owned(),
                        QuarantinedBody::Withheld(Withheld::WindowExpired),
                    ),
                    Err(rejection) => (
                        rejection.to_string(),
                        rejected_body(
                            &message.id,
                            &message.body,
                            message.sent_at,
                            tokenizer,
                            sealer,
                            erased,
                            window_expired,
                        ),
                    ),
                };
                batch.quarantined.push(QuarantineRow {
                    body,
                    body_bytes: i32::try_from(message.body.len()).unwrap_or(i32::MAX),
                    reason,
                    sent_at: message.sent_at,
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

/// What a quarantine row keeps of a rejected body: nothing if it names a user erased after it
/// was sent or was sent in an expired window, else the body sealed, with the token of the user
/// id it names.
fn rejected_body(
    message_id: &str,
    body: &[u8],
    sent_at: Option<OffsetDateTime>,
    tokenizer: &Tokenizer,
    sealer: &Sealer,
    erased: &ErasedUsers,
    window_expired: bool,
) -> QuarantinedBody {
    let named = user_id_named_in(body);
    let withheld = if named
        .as_deref()
        .is_some_and(|user| erased.erased(user, sent_at))
    {
        Some(Withheld::UserErased)
    } else if window_expired {
        Some(Withheld::WindowExpired)
    } else {
        None
    };
    match withheld {
        Some(why) => QuarantinedBody::Withheld(why),
        None => QuarantinedBody::Sealed {
            sealed: sealer.seal(&quarantine_place(message_id), body),
            user_token: named.map(|user| tokenizer.user_id(&user)),
        },
    }
}

/// A valid login's row: its personal fields tokenized and sealed (bound to the message and
/// the user), the rest as the event gave it.
fn login_row(
    message_id: &str,
    sent_at: Option<OffsetDateTime>,
    login: LoginEvent<'_>,
    tokenizer: &Tokenizer,
    sealer: &Sealer,
) -> LoginRow {
    let user_id = &login.in_clear.user_id;
    let personal = PersonalFields {
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
    };
    LoginRow {
        message_id: message_id.to_owned(),
        in_clear: login.in_clear,
        create_date: match sent_at {
            Some(sent_at) => LoginDate::Sent(sent_at.date()),
            None => LoginDate::Ingested(OffsetDateTime::now_utc().date()),
        },
        personal: Some(personal),
        deliveries: Deliveries {
            receipts: Vec::new(),
            first_read: Instant::now(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::seal::{Place, SealFormat, associated_data};
    use crate::vault::testing::{self, bytes, hex, int, key, key_from_hex, text};

    fn message(id: &str, body: &str, receipt: &str) -> Message {
        message_bytes(id, body.as_bytes(), receipt)
    }

    fn message_bytes(id: &str, body: &[u8], receipt: &str) -> Message {
        Message {
            id: id.to_owned(),
            body: body.to_vec(),
            sent_at: Some(OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()),
            receipt: Receipt(receipt.to_owned()),
            read_at: Instant::now(),
        }
    }

    const VALID: &str = r#"{"user_id": "u-1", "app_version": "0.96", "device_type": "ios", "ip": "10.0.0.1", "locale": null, "device_id": "593-47-5928"}"#;

    /// `build` for no erased user and a window that has not expired.
    fn build_plain(messages: Vec<Message>, tokenizer: &Tokenizer, sealer: &Sealer) -> Batch {
        build(messages, tokenizer, sealer, &ErasedUsers::default(), false)
    }

    fn keys() -> (Tokenizer, Sealer) {
        (
            Tokenizer::new(KeyId(1), &key(1)),
            Sealer::new(KeyId(2), &key(2), SealFormat::CURRENT),
        )
    }

    #[test]
    fn debug_output_of_what_holds_values_tokens_or_keys_reveals_none_of_them() {
        let (tokenizer, sealer) = keys();
        let named = r#"{"user_id": "u-9", "ip": "10.0.0.9", "device_id": "900-99-9999", "x": 1}"#;
        let batch = build_plain(
            vec![message("m-1", VALID, "r-1"), message("m-2", named, "r-2")],
            &tokenizer,
            &sealer,
        );
        let personal = batch.logins[0].personal.as_ref().unwrap();
        let tokens = [
            personal.masked_ip.to_string(),
            personal.masked_device_id.to_string(),
            tokenizer.user_id("u-9").to_string(),
        ];
        let event = event::parse(VALID.as_bytes()).unwrap();
        let printed = [
            format!("{batch:?}"),
            format!("{event:?}"),
            format!("{tokenizer:?} {sealer:?} {:?}", key(1)),
            format!("{:?}", message("m-2", named, "r-2")),
        ]
        .join("\n");
        for secret in ["10.0.0.1", "593-47-5928", "10.0.0.9", "900-99-9999"]
            .into_iter()
            .map(str::to_owned)
            .chain(tokens)
            .chain([hex(&[1u8; 32]), hex(&[2u8; 32])])
        {
            assert!(!printed.contains(&secret), "{secret} in {printed}");
        }
        assert!(
            printed.contains("m-1") && printed.contains("<redacted>"),
            "{printed}"
        );
    }

    #[test]
    fn builds_rows_that_open_at_their_place() {
        let (tokenizer, sealer) = keys();
        let batch = build_plain(vec![message("m-1", VALID, "r-1")], &tokenizer, &sealer);
        assert_eq!((batch.logins.len(), batch.quarantined.len()), (1, 0));
        let row = &batch.logins[0];
        assert_eq!(row.create_date.day().to_string(), "2023-11-14");
        assert_eq!(
            (
                row.in_clear.app_version.encoded,
                row.in_clear.app_version.text.as_str()
            ),
            (96_000, "0.96")
        );
        assert_eq!(row.in_clear.locale, None);
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
        let batch = build_plain(vec![message("m-1", bad, "r-1")], &tokenizer, &sealer);
        assert!(batch.logins.is_empty());
        let row = &batch.quarantined[0];
        assert_eq!(row.reason, "unexpected field `foo`");
        assert_eq!(row.body_bytes, bad.len() as i32);
        let sealed = row.body.sealed().expect("a sealed body");
        assert!(!sealed.windows(4).any(|w| w == b"oops"));
        let body = sealer.open(&quarantine_place("m-1"), sealed).unwrap();
        assert_eq!(body.as_slice(), bad.as_bytes());
        assert_eq!(row.body.user_token(), None, "the body names no user");
        let named = r#"{"user_id": "u-9", "ip": 1}"#;
        let batch = build_plain(vec![message("m-2", named, "r-2")], &tokenizer, &sealer);
        assert_eq!(
            batch.quarantined[0].body.user_token(),
            Some(&tokenizer.user_id("u-9"))
        );
    }

    #[test]
    fn a_late_login_keeps_no_personal_field_if_its_user_was_erased_and_nothing_if_its_window_expired()
     {
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
        assert_eq!(
            batch.logins[0].in_clear.user_id, "u-1",
            "the analytic row stays"
        );
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
        assert!(expired.logins.is_empty(), "its window has expired");
        let row = &expired.quarantined[0];
        assert_eq!(
            (
                row.reason.as_str(),
                row.body.withheld(),
                row.message_id.as_str()
            ),
            (LATE_FOR_ITS_WINDOW, Some(Withheld::WindowExpired), "m-1")
        );
    }

    #[test]
    fn a_rejected_body_of_an_erased_user_or_an_expired_window_is_withheld_and_names_no_one() {
        let (tokenizer, sealer) = keys();
        let sent = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let erased = ErasedUsers::with(tokenizer.clone(), "u-1", sent + time::Duration::seconds(1));
        let bodies = [
            r#"{"user_id": "u-1", "ip": "10.0.0.1", "x": 5}"#,
            r#"{"user_id": "u-2", "ip": "10.0.0.2", "x": 5}"#,
            r#"{"ip": "10.0.0.3", "x": 5}"#,
        ];
        let messages = |ids: &str| {
            bodies
                .iter()
                .enumerate()
                .map(|(i, body)| message(&format!("{ids}-{i}"), body, "r"))
                .collect()
        };
        let batch = build(messages("m"), &tokenizer, &sealer, &erased, false);
        let [of_erased, of_other, of_nobody] = &batch.quarantined[..] else {
            panic!("three quarantine rows");
        };
        assert_eq!(of_erased.body.withheld(), Some(Withheld::UserErased));
        assert_eq!(of_erased.body.sealed(), None);
        assert_eq!(of_erased.body.user_token(), None);
        assert_eq!(of_erased.reason, "unexpected field `x`");
        assert_eq!(of_erased.body_bytes as usize, bodies[0].len());
        assert_eq!(of_erased.sent_at, Some(sent));
        assert_eq!(
            of_other.body.user_token(),
            Some(&tokenizer.user_id("u-2")),
            "another user's body is kept"
        );
        assert!(of_nobody.body.sealed().is_some());
        assert_eq!(
            batch.erasures_seen, 1,
            "the writer commits it only while no newer"
        );

        // Sent after the erasure: new data, kept.
        let before = ErasedUsers::with(tokenizer.clone(), "u-1", sent - time::Duration::seconds(1));
        let batch = build(messages("m"), &tokenizer, &sealer, &before, false);
        assert_eq!(
            batch.quarantined[0].body.user_token(),
            Some(&tokenizer.user_id("u-1"))
        );
        // Its window has expired: nothing kept, whoever it names.
        let expired = build(
            messages("m"),
            &tokenizer,
            &sealer,
            &ErasedUsers::default(),
            true,
        );
        assert!(
            expired
                .quarantined
                .iter()
                .all(|row| row.body.withheld() == Some(Withheld::WindowExpired))
        );
        let printed = format!("{:?}", batch.quarantined);
        assert!(!printed.contains("10.0.0.1"), "{printed}");
    }

    #[test]
    fn a_redelivered_message_is_one_row_with_both_receipts() {
        let (tokenizer, sealer) = keys();
        let batch = build_plain(
            vec![
                message("m-1", VALID, "r-1"),
                message("m-2", "nope", "r-2"),
                message("m-1", VALID, "r-3"),
                message("m-2", "nope", "r-4"),
            ],
            &tokenizer,
            &sealer,
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
        let batch = build_plain(messages, &tokenizer, &sealer);
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

    fn place_of(vector: &serde_json::Value) -> Place<'_> {
        Place {
            table: text(vector, "table"),
            field: text(vector, "field"),
            message_id: text(vector, "message_id"),
            user_id: text(vector, "user_id"),
        }
    }

    /// docs/FORMAT.md §5, against `tests/data/vectors/ingest.json` (made by
    /// `scripts/format-vectors.py`): bodies through [`build`], the real ingest transform. A
    /// login's sealed ip and device id are the decoded JSON strings as received, its tokens
    /// are over their canonical forms, and a quarantined body is sealed byte for byte; each at
    /// the place and under the associated data the spec gives. The Python-made sealed values
    /// open at the same places.
    #[test]
    fn ingest_matches_the_format_vectors() {
        let vectors = testing::vectors("ingest.json");
        let (tokenizer, sealer) = keys_in(&vectors);
        let expected = vectors["messages"].as_array().unwrap();
        let messages = expected
            .iter()
            .map(|m| message_bytes(text(m, "message_id"), &bytes(m, "body_hex"), "r"))
            .collect();
        let batch = build_plain(messages, &tokenizer, &sealer);
        let (mut logins, mut quarantined) = (batch.logins.iter(), batch.quarantined.iter());
        for m in expected {
            let message_id = text(m, "message_id");
            match text(m, "outcome") {
                "login" => {
                    let row = logins.next().expect("a login row");
                    assert_eq!(row.message_id, message_id);
                    assert_eq!(row.in_clear.user_id, text(m, "user_id"));
                    assert_eq!(
                        row.in_clear.user_id.as_bytes(),
                        bytes(m, "user_id_utf8_hex")
                    );
                    let version = &m["app_version"];
                    assert_eq!(row.in_clear.app_version.text, text(version, "text"));
                    assert_eq!(
                        i64::from(row.in_clear.app_version.encoded),
                        int(version, "encoded")
                    );
                    let personal = row.personal.as_ref().expect("a login keeps its fields");
                    for (field, token, sealed) in [
                        (Field::Ip, &personal.masked_ip, &personal.sealed_ip),
                        (
                            Field::DeviceId,
                            &personal.masked_device_id,
                            &personal.sealed_device_id,
                        ),
                    ] {
                        let v = &m[field.name()];
                        let place = login_place(field, message_id, &row.in_clear.user_id);
                        assert_eq!(place, place_of(&v["place"]));
                        assert_eq!(
                            hex(&associated_data(sealer.format(), &place, sealer.key_id())),
                            text(v, "associated_data")
                        );
                        let plaintext = text(v, "plaintext").as_bytes();
                        assert_eq!(plaintext, bytes(v, "plaintext_utf8_hex"));
                        assert_eq!(sealer.open(&place, sealed).unwrap().as_slice(), plaintext);
                        let python_made = bytes(v, "sealed");
                        assert_eq!(
                            sealer.open(&place, &python_made).unwrap().as_slice(),
                            plaintext
                        );
                        assert_eq!(token.as_str(), text(v, "token"), "{message_id} {field:?}");
                    }
                }
                "quarantine" => {
                    let row = quarantined.next().expect("a quarantine row");
                    assert_eq!(row.message_id, message_id);
                    let body = bytes(m, "body_hex");
                    assert_eq!(row.body_bytes as usize, body.len());
                    let place = quarantine_place(message_id);
                    assert_eq!(place, place_of(&m["body_place"]));
                    assert_eq!(
                        hex(&associated_data(sealer.format(), &place, sealer.key_id())),
                        text(m, "body_associated_data")
                    );
                    let sealed = row.body.sealed().expect("a sealed body");
                    assert_eq!(sealer.open(&place, sealed).unwrap().as_slice(), body);
                    let python_made = bytes(m, "sealed_body");
                    assert_eq!(sealer.open(&place, &python_made).unwrap().as_slice(), body);
                }
                other => panic!("unknown outcome {other}"),
            }
        }
        assert!(logins.next().is_none() && quarantined.next().is_none());
        assert_eq!((batch.logins.len(), batch.quarantined.len()), (2, 3));

        let versions = vectors["app_versions"].as_array().unwrap();
        for version in versions {
            let text = text(version, "text");
            let parsed = event::AppVersion::parse(text.into()).ok();
            let encoded = parsed.map(|v| i64::from(v.encoded));
            assert_eq!(encoded, version["encoded"].as_i64(), "app_version {text:?}");
        }
        assert_eq!(versions.len(), 26);
    }

    /// The token key and data key a vector or fixture file names (format 1, as `ingest.json`
    /// and the 0.1.0 fixture were sealed).
    fn keys_in(file: &serde_json::Value) -> (Tokenizer, Sealer) {
        let key = |id: &str, bytes: &str| (KeyId(int(file, id)), key_from_hex(text(file, bytes)));
        let (token_id, token_key) = key("token_key_id", "token_key");
        let (data_id, data_key) = key("data_key_id", "data_key");
        (
            Tokenizer::new(token_id, &token_key),
            Sealer::new(data_id, &data_key, SealFormat::V1),
        )
    }

    const FIXTURE_SEALED: &str = "fixture-sealed-0.1.0.json";

    /// Values sealed by pii-vault 0.1.0 (`build`, random nonces) keep opening at their places
    /// and matching their tokens: a change of the format would orphan every stored row.
    #[test]
    fn values_sealed_by_0_1_0_still_open() {
        let fixture = testing::vectors(FIXTURE_SEALED);
        let (tokenizer, sealer) = keys_in(&fixture);
        let logins = fixture["logins"].as_array().unwrap();
        for login in logins {
            let (message_id, user_id) = (text(login, "message_id"), text(login, "user_id"));
            for field in [Field::Ip, Field::DeviceId] {
                let name = field.name();
                let place = login_place(field, message_id, user_id);
                let opened = sealer
                    .open(&place, &bytes(login, &format!("sealed_{name}")))
                    .unwrap_or_else(|_| panic!("{message_id} {name} no longer opens"));
                assert_eq!(opened.as_slice(), text(login, name).as_bytes());
                let token = tokenizer.token_of(field, text(login, name)).unwrap();
                assert_eq!(token.as_str(), text(login, &format!("masked_{name}")));
            }
        }
        let quarantined = fixture["quarantined"].as_array().unwrap();
        for row in quarantined {
            let message_id = text(row, "message_id");
            let opened = sealer
                .open(&quarantine_place(message_id), &bytes(row, "sealed_body"))
                .unwrap_or_else(|_| panic!("{message_id} body no longer opens"));
            assert_eq!(opened.as_slice(), bytes(row, "body_hex"));
        }
        assert_eq!((logins.len(), quarantined.len()), (3, 1));
    }

    /// Writes the fixture above, once (run with `--ignored`; it refuses to overwrite, since
    /// the point of the file is that it was written by an earlier version).
    #[test]
    #[ignore = "writes tests/data/vectors/fixture-sealed-*.json once"]
    fn write_fixture_sealed() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/vectors")
            .join(FIXTURE_SEALED);
        assert!(
            !path.exists(),
            "{} exists: it is never rewritten",
            path.display()
        );
        let token_key: Vec<u8> = (0x40..0x60).collect();
        let data_key: Vec<u8> = (0xc0..0xe0).collect();
        let (token_key_id, data_key_id) = (3, 4);
        let tokenizer = Tokenizer::new(KeyId(token_key_id), &key_from_hex(&hex(&token_key)));
        let sealer = Sealer::new(
            KeyId(data_key_id),
            &key_from_hex(&hex(&data_key)),
            SealFormat::V1,
        );
        let bodies: [(&str, &[u8]); 4] = [
            (
                "0f6b1e0a-0001-4c55-9f31-0e8d2a7b9c10",
                br#"{"user_id": "u-1001", "app_version": "2.3.0", "device_type": "android", "ip": "203.0.113.7", "locale": "RU", "device_id": "593-47-5928"}"#,
            ),
            (
                "0f6b1e0a-0002-4c55-9f31-0e8d2a7b9c10",
                "{\"user_id\": \"Zo\u{eb}-\\u03a9\", \"app_version\": \"0.96\", \"device_type\": \"ios\", \"ip\": \"2001:DB8:0:0::1\", \"locale\": null, \"device_id\": \"\\u3000 Ger\u{e4}t 42 \"}".as_bytes(),
            ),
            (
                "sample_data.jsonl:2",
                br#"{"user_id": "u-7", "app_version": "3.7", "device_type": "web", "ip": "::ffff:10.1.2.3", "locale": "de", "device_id": "dev-7"}"#,
            ),
            (
                "sample_data.jsonl:13",
                br#"{"foo": "oops_wrong_msg_type", "bar": "123"}"#,
            ),
        ];
        let messages = bodies
            .iter()
            .map(|(id, body)| message_bytes(id, body, "r"))
            .collect();
        let batch = build_plain(messages, &tokenizer, &sealer);
        let by_id: HashMap<&str, &[u8]> = bodies.iter().copied().collect();
        let logins: Vec<serde_json::Value> = batch
            .logins
            .iter()
            .map(|row| {
                let body = by_id[row.message_id.as_str()];
                let event = event::parse(body).unwrap();
                let personal = row.personal.as_ref().unwrap();
                serde_json::json!({
                    "message_id": row.message_id,
                    "body_hex": hex(body),
                    "user_id": row.in_clear.user_id,
                    "ip": event.ip,
                    "device_id": event.device_id,
                    "masked_ip": personal.masked_ip.as_str(),
                    "masked_device_id": personal.masked_device_id.as_str(),
                    "sealed_ip": hex(&personal.sealed_ip),
                    "sealed_device_id": hex(&personal.sealed_device_id),
                })
            })
            .collect();
        let quarantined: Vec<serde_json::Value> = batch
            .quarantined
            .iter()
            .map(|row| {
                serde_json::json!({
                    "message_id": row.message_id,
                    "body_hex": hex(by_id[row.message_id.as_str()]),
                    "reason": row.reason,
                    "sealed_body": hex(row.body.sealed().unwrap()),
                })
            })
            .collect();
        let fixture = serde_json::json!({
            "about": "values sealed and tokenized by pii-vault 0.1.0 through ingest::batch::build (random nonces); they must keep opening and matching",
            "spec": "docs/FORMAT.md, §3 Tokens, §4 Sealed values, §5 What ingest stores",
            "written_by": concat!("pii-vault ", env!("CARGO_PKG_VERSION"), ", ingest::batch::tests::write_fixture_sealed"),
            "token_key_id": token_key_id,
            "token_key": hex(&token_key),
            "data_key_id": data_key_id,
            "data_key": hex(&data_key),
            "logins": logins,
            "quarantined": quarantined,
        });
        let text = serde_json::to_string_pretty(&fixture).unwrap() + "\n";
        std::fs::write(&path, text).unwrap();
    }
}
