//! Late messages of an erased person, over real SQS and PostgreSQL: an invalid message sent
//! before the erasure and delivered after it keeps no body; a dead letter replayed after the
//! erasure (`ingest replay-dead-letters`) carries its first send time and id, so ingest stores
//! it without its user's personal fields, dates it as first sent, and does not store it twice.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName};

use crate::common::{self, TestEnv, login, stderr, stdout, what_remains_of};
use pii_vault::ingest::source::sqs::PollSettings;
use pii_vault::ingest::source::sqs::json::SqsSource;
use pii_vault::ingest::source::sqs::original::{ORIGINAL_MESSAGE_ID, ORIGINAL_SENT_TIMESTAMP};
use pii_vault::ingest::source::sqs::query::{QueryClient, QuerySqsSource};
use pii_vault::ingest::source::{Acknowledged, Message, MessageSource, Receipt, SourceError};
use pii_vault::ingest::{batch, writer};
use pii_vault::unmask;
use pii_vault::vault::erasure::ErasedUsers;

const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");
const INGEST: &str = env!("CARGO_BIN_EXE_ingest");

/// A rejected body naming `user`, `ip` and `device_id` (an unexpected field `extra`).
fn rejected(user: &str, ip: &str, device_id: &str) -> String {
    format!(r#"{{"user_id": "{user}", "ip": "{ip}", "device_id": "{device_id}", "extra": 1}}"#)
}

async fn run(
    env: &TestEnv,
    program: &'static str,
    user: &str,
    args: &[&str],
) -> std::process::Output {
    let mut command = std::process::Command::new(program);
    command.args(args).envs(env.binary_env());
    if !user.is_empty() {
        command.env("DATABASE_URL", env.url_as(user));
    }
    tokio::task::spawn_blocking(move || common::output_of(&mut command))
        .await
        .unwrap()
}

async fn erase(env: &TestEnv, user: &str) {
    let erased = run(
        env,
        ROTATE_KEYS,
        "keyadmin",
        &["erase", "--user-id", user, "--reason", "ticket 9"],
    )
    .await;
    assert!(erased.status.success(), "{}", stderr(&erased));
}

/// A quarantine row as stored: (reason, body_bytes, sealed body kept, data key, user token,
/// token key, body_withheld, sent_at known).
type Quarantined = (
    String,
    i32,
    bool,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    bool,
);

async fn quarantined(env: &TestEnv) -> Vec<Quarantined> {
    sqlx::query_as(
        "SELECT reason, body_bytes, sealed_body IS NOT NULL, data_key_id, user_token,
                token_key_id, body_withheld, sent_at IS NOT NULL
         FROM quarantine ORDER BY body_bytes",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_invalid_message_of_a_user_erased_after_it_was_sent_keeps_no_body() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[login("u-1", "10.9.9.0", "d-0")]).await;
    let of_erased = rejected("u-1", "10.9.9.1", "secret-device-1");
    let of_other = rejected("u-2", "10.9.9.2", "dev-2");
    // Sent before the erasure, still on the queue while it runs.
    env.send(&[
        of_erased.clone(),
        of_other.clone(),
        login("u-1", "10.9.9.3", "d-3"),
    ])
    .await;
    erase(&env, "u-1").await;
    env.drain_until_empty(Duration::from_secs(60)).await;

    let rows = quarantined(&env).await;
    let reason = "unexpected field `extra`".to_owned();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows[1],
        (
            reason.clone(),
            of_erased.len() as i32,
            false,
            None,
            None,
            None,
            Some("user-erased".to_owned()),
            true
        ),
        "recorded, with nothing of its body and nothing that names its user"
    );
    let (_, bytes, kept, data_key, token, token_key, withheld, _) = &rows[0];
    assert_eq!(
        (bytes, kept, withheld),
        (&(of_other.len() as i32), &true, &None)
    );
    assert!(data_key.is_some() && token.is_some() && token_key.is_some());
    assert_eq!(what_remains_of(&env, "u-1").await, (2, 0, 0));

    // Nothing withheld is handed out: the key admin's verify opens the other body only, and a
    // data-key rotation re-seals around the withheld row.
    let keyadmin = env.pool_as("keyadmin").await;
    let verified = unmask::verify_all(&keyadmin, &env.keyring_on(&keyadmin))
        .await
        .unwrap();
    assert_eq!((verified.logins, verified.bodies), (2, 1));
    let rotated = run(
        &env,
        ROTATE_KEYS,
        "keyadmin",
        &["data-key", "--grace-seconds", "0"],
    )
    .await;
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    assert_eq!(quarantined(&env).await[1].6.as_deref(), Some("user-erased"));
    let withheld: Option<String> =
        sqlx::query_scalar("SELECT body_withheld FROM quarantine WHERE body_withheld IS NOT NULL")
            .fetch_one(&keyadmin)
            .await
            .unwrap();
    assert_eq!(
        withheld.as_deref(),
        Some("user-erased"),
        "the runbook's look-up"
    );

    // The database holds the shape: no body comes back to a withheld row, even by the owner.
    for tamper in [
        "UPDATE quarantine SET sealed_body = '\\x01' WHERE body_withheld IS NOT NULL",
        "UPDATE quarantine SET body_withheld = NULL WHERE body_withheld IS NOT NULL",
        "UPDATE quarantine SET user_token = 'x', token_key_id = 1 WHERE body_withheld IS NOT NULL",
        "UPDATE quarantine SET body_withheld = 'user-erased' WHERE body_withheld IS NULL",
        "UPDATE quarantine SET body_withheld = 'no reason' WHERE body_withheld IS NOT NULL",
    ] {
        let refused = sqlx::query(tamper).execute(&env.pool).await.unwrap_err();
        let code = refused.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("23514"), "{tamper}: {refused}");
    }
    keyadmin.close().await;
    env.cleanup().await;
}

/// The database's rule, for an ingester that does not know it (an older release during an
/// upgrade): a body inserted with the token of a user erased after it was sent is withheld.
#[tokio::test]
async fn the_database_withholds_a_body_an_ingester_would_keep_for_an_erased_user() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[login("u-1", "10.0.0.1", "d-1")]).await;
    erase(&env, "u-1").await;
    let (token_key, token): (i64, String) =
        sqlx::query_as("SELECT token_key_id, user_token FROM erasures")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let data_key: i64 = sqlx::query_scalar("SELECT id FROM vault_keys WHERE purpose = 'data'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let ingester = env.pool_as("ingester").await;
    for (message_id, sent) in [
        ("m-before", "-1 hour"),
        ("m-after", "1 hour"),
        ("m-unknown", ""),
    ] {
        sqlx::query(
            "INSERT INTO quarantine (message_id, reason, body_bytes, sealed_body, sent_at,
                                     user_token, token_key_id, data_key_id)
             VALUES ($1, 'r', 3, '\\x010203',
                     now() + nullif($2, '')::interval, $3, $4, $5)",
        )
        .bind(message_id)
        .bind(sent)
        .bind(&token)
        .bind(token_key)
        .bind(data_key)
        .execute(&ingester)
        .await
        .unwrap();
    }
    let rows: Vec<(String, Option<String>, bool, bool)> = sqlx::query_as(
        "SELECT message_id, body_withheld, sealed_body IS NULL, user_token IS NULL
         FROM quarantine ORDER BY message_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let withheld = (Some("user-erased".to_owned()), true, true);
    assert_eq!(
        rows,
        [
            ("m-after".to_owned(), None, false, false),
            (
                "m-before".to_owned(),
                withheld.0.clone(),
                withheld.1,
                withheld.2
            ),
            ("m-unknown".to_owned(), withheld.0, withheld.1, withheld.2),
        ],
        "sent after the erasure: new data, kept"
    );
    ingester.close().await;
    env.cleanup().await;
}

/// The batch decides with the erasures it knows; the writer commits it only under the erasure
/// gate with no newer erasure, so a body sealed before an erasure is never stored after it.
#[tokio::test]
async fn a_quarantined_body_sealed_before_an_erasure_is_refused_and_withheld_when_made_again() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[login("u-1", "10.0.0.1", "d-1")]).await;
    let keyring = env.keyring();
    let tokenizer = keyring.active_tokenizer().await.unwrap();
    let sealer = keyring.new_sealer().await.unwrap();
    // Sent before the erasure, made into a batch on both sides of it.
    let sent = time::OffsetDateTime::now_utc();
    let message = || Message {
        id: "m-late".to_owned(),
        body: rejected("u-1", "10.0.0.9", "d-9").into_bytes(),
        sent_at: Some(sent),
        receipt: Receipt("r".to_owned()),
        read_at: Instant::now(),
    };
    let known = ErasedUsers::load(&env.pool, &keyring).await.unwrap();
    let made_before = batch::build(vec![message()], &tokenizer, &sealer, &known, false);
    assert!(made_before.quarantined[0].body.sealed().is_some());
    erase(&env, "u-1").await;
    let outcome = writer::write(&env.pool, &made_before).await;
    assert!(
        matches!(outcome, Err(writer::WriteError::ErasuresChanged)),
        "{outcome:?}"
    );
    assert_eq!(env.count("quarantine").await, 0);
    let known = ErasedUsers::load(&env.pool, &keyring).await.unwrap();
    let made_after = batch::build(vec![message()], &tokenizer, &sealer, &known, false);
    let written = writer::write(&env.pool, &made_after).await.unwrap();
    assert_eq!(written.quarantined, 1);
    assert_eq!(quarantined(&env).await[0].6.as_deref(), Some("user-erased"));
    env.cleanup().await;
}

// Dead letters and their replay.

/// A dead-letter queue for the test's queue.
struct DeadLetters {
    url: String,
    arn: String,
}

impl DeadLetters {
    /// A new queue, named by the test queue's redrive policy after `max_receive_count`.
    async fn attach(env: &TestEnv, max_receive_count: u32) -> Self {
        let url = env
            .sqs
            .create_queue()
            .queue_name(format!("test-dlq-{}", common::unique_suffix()))
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let arn = queue_attribute(env, &url, QueueAttributeName::QueueArn).await;
        let letters = Self { url, arn };
        letters.redrive(env, max_receive_count).await;
        letters
    }

    async fn redrive(&self, env: &TestEnv, max_receive_count: u32) {
        let policy = serde_json::json!({
            "deadLetterTargetArn": self.arn,
            "maxReceiveCount": max_receive_count.to_string(),
        });
        env.sqs
            .set_queue_attributes()
            .queue_url(&env.queue_url)
            .attributes(QueueAttributeName::RedrivePolicy, policy.to_string())
            .send()
            .await
            .unwrap();
    }

    /// Sends `body` straight to the dead-letter queue with `attributes` (name, type, value);
    /// its message id.
    async fn send(&self, env: &TestEnv, body: &str, attributes: &[(&str, &str, &str)]) -> String {
        let mut request = env
            .sqs
            .send_message()
            .queue_url(&self.url)
            .message_body(body);
        for (name, data_type, value) in attributes {
            request = request.message_attributes(*name, attribute(data_type, value));
        }
        request.send().await.unwrap().message_id.unwrap()
    }

    /// Messages in the dead-letter queue (visible, in flight).
    async fn counts(&self, env: &TestEnv) -> (u64, u64) {
        let count = |name| queue_attribute(env, &self.url, name);
        (
            count(QueueAttributeName::ApproximateNumberOfMessages)
                .await
                .parse()
                .unwrap(),
            count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                .await
                .parse()
                .unwrap(),
        )
    }

    /// Receives from the test's queue without deleting, until every message on it has been
    /// moved here by the redrive policy; each message's id by body.
    async fn park(&self, env: &TestEnv, messages: usize) -> HashMap<String, String> {
        let mut ids = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.counts(env).await.0 < messages as u64 || env.messages_on_queue().await > 0 {
            assert!(Instant::now() < deadline, "messages did not reach the DLQ");
            let received = env
                .sqs
                .receive_message()
                .queue_url(&env.queue_url)
                .max_number_of_messages(10)
                .visibility_timeout(1)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap();
            for message in received.messages.unwrap_or_default() {
                ids.insert(message.body.unwrap(), message.message_id.unwrap());
            }
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        ids
    }

    async fn replay(&self, env: &TestEnv, args: &[&str]) -> std::process::Output {
        let mut all = vec!["replay-dead-letters", "--dead-letter-queue-url", &self.url];
        all.extend_from_slice(args);
        run(env, INGEST, "", &all).await
    }

    async fn cleanup(self, env: &TestEnv) {
        let _ = env.sqs.delete_queue().queue_url(&self.url).send().await;
    }
}

fn attribute(data_type: &str, value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type(data_type)
        .string_value(value)
        .build()
        .unwrap()
}

async fn queue_attribute(env: &TestEnv, url: &str, name: QueueAttributeName) -> String {
    env.sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(name.clone())
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()
        .remove(&name)
        .unwrap()
}

/// (message id, create_date, has tokens) of every login, by message id.
async fn logins_by_id(env: &TestEnv) -> HashMap<String, (time::Date, bool)> {
    let rows: Vec<(String, time::Date, bool)> = sqlx::query_as(
        "SELECT message_id::text, create_date, masked_ip IS NOT NULL FROM user_logins",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, date, tokens)| (id, (date, tokens)))
        .collect()
}

fn query_source(client: QueryClient, env: &TestEnv) -> std::sync::Arc<QuerySqsSource> {
    std::sync::Arc::new(QuerySqsSource::new(
        client,
        env.queue_url.clone(),
        PollSettings {
            wait_time_seconds: 1,
            visibility_timeout_seconds: None,
        },
    ))
}

#[tokio::test]
async fn a_dead_letter_replayed_after_an_erasure_brings_back_nothing_of_its_user() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[login("u-1", "10.1.1.0", "dev-u1")])
        .await;
    let letters = DeadLetters::attach(&env, 1).await;
    let bodies = [
        login("u-1", "10.1.1.1", "dev-u1"),
        login("u-2", "10.1.1.2", "dev-u2"),
        rejected("u-1", "10.1.1.3", "dev-u1-again"),
    ];
    env.send(&bodies).await;
    let first_ids = letters.park(&env, 3).await;
    assert_eq!(first_ids.len(), 3);
    erase(&env, "u-1").await;
    // The pipeline would now fail them again: give the replay's copies room.
    letters.redrive(&env, 5).await;

    let replayed = letters.replay(&env, &[]).await;
    assert!(replayed.status.success(), "{}", stderr(&replayed));
    assert_eq!(
        stdout(&replayed).trim(),
        "received=3 moved=3 sent_not_deleted=0 released=0"
    );
    assert_eq!(letters.counts(&env).await, (0, 0));
    assert_eq!(env.messages_on_queue().await, 3);

    // Their SentTimestamp on the login queue is after the erasure; their first one is not.
    env.drain_until_empty(Duration::from_secs(60)).await;
    assert_eq!(what_remains_of(&env, "u-1").await, (2, 0, 0));
    assert_eq!(what_remains_of(&env, "u-2").await, (1, 2, 1));
    assert_eq!(quarantined(&env).await[0].6.as_deref(), Some("user-erased"));
    // Keyed by their first ids, dated by their first sending.
    let stored = logins_by_id(&env).await;
    for body in &bodies[..2] {
        assert!(stored.contains_key(&first_ids[body]), "{stored:?}");
    }
    let quarantined_id: String = sqlx::query_scalar("SELECT message_id FROM quarantine")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(quarantined_id, first_ids[&bodies[2]]);
    letters.cleanup(&env).await;
    env.cleanup().await;
}

/// A source that never deletes: the row commits, the message stays (its delete "lost").
struct NeverDeletes(SqsSource);

impl MessageSource for NeverDeletes {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        self.0.receive().await
    }
    async fn acknowledge(&self, _: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        Ok(Acknowledged::default())
    }
}

#[tokio::test]
async fn a_message_stored_before_it_became_a_dead_letter_is_not_stored_again_by_a_replay() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let letters = DeadLetters::attach(&env, 1).await;
    env.send(&[login("u-5", "10.5.5.5", "dev-5")]).await;
    let source = SqsSource::new(
        env.sqs.clone(),
        env.queue_url.clone(),
        PollSettings {
            wait_time_seconds: 1,
            visibility_timeout_seconds: Some(1),
        },
    );
    let summary = env
        .drain_from(std::sync::Arc::new(NeverDeletes(source)))
        .await;
    assert_eq!(summary.stored, 1, "{summary}");
    letters.park(&env, 1).await;
    letters.redrive(&env, 5).await;

    let replayed = letters.replay(&env, &["--max-messages", "5"]).await;
    assert!(replayed.status.success(), "{}", stderr(&replayed));
    let summary = env.drain().await;
    assert_eq!((summary.stored, summary.duplicates), (0, 1), "{summary}");
    assert_eq!(env.count("user_logins").await, 1);
    assert_eq!(env.messages_on_queue().await, 0);
    letters.cleanup(&env).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_replay_keeps_the_first_send_date_over_both_protocols_and_a_forged_one_only_ages() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let letters = DeadLetters::attach(&env, 5).await;
    let first_sent = time::OffsetDateTime::from_unix_timestamp(1_709_294_400).unwrap();
    assert_eq!(first_sent.date().to_string(), "2024-03-01");
    env.add_month(first_sent.date()).await;
    let millis = (first_sent.unix_timestamp() * 1000).to_string();
    let today = time::OffsetDateTime::now_utc().date();

    // Replayed once before and dead again: the earlier time and the first id stay with it.
    // Read by the JSON adapter, then by the Query one.
    let query = QueryClient::new(&common::aws_config().await);
    let mut first_ids = Vec::new();
    for (n, json) in [(1, true), (2, false)] {
        let first_id = format!("0f6b1e0a-000{n}-4c55-9f31-0e8d2a7b9c10");
        letters
            .send(
                &env,
                &login(&format!("u-{n}"), "10.2.2.2", "dev"),
                &[
                    (ORIGINAL_SENT_TIMESTAMP, "Number", &millis),
                    (ORIGINAL_MESSAGE_ID, "String", &first_id),
                ],
            )
            .await;
        let replayed = letters.replay(&env, &[]).await;
        assert!(replayed.status.success(), "{}", stderr(&replayed));
        assert_eq!(
            stdout(&replayed).trim(),
            "received=1 moved=1 sent_not_deleted=0 released=0"
        );
        let summary = if json {
            env.drain().await
        } else {
            env.drain_from(query_source(query.clone(), &env)).await
        };
        assert_eq!(summary.stored, 1, "{summary}");
        first_ids.push(first_id);
    }
    let stored = logins_by_id(&env).await;
    for first_id in &first_ids {
        assert_eq!(stored[first_id], (first_sent.date(), true), "{stored:?}");
    }

    // A forged time on the login queue: later than SentTimestamp changes nothing, earlier
    // ages the message (here: before an erasure), unreadable is before every erasure.
    env.ingest_bodies(&[login("u-9", "10.9.0.1", "dev")]).await;
    erase(&env, "u-9").await;
    let send = |value: Option<(&'static str, String)>| {
        let mut request = env
            .sqs
            .send_message()
            .queue_url(&env.queue_url)
            .message_body(login("u-9", "10.9.0.2", "dev"));
        if let Some((data_type, value)) = value {
            request =
                request.message_attributes(ORIGINAL_SENT_TIMESTAMP, attribute(data_type, &value));
        }
        async move { request.send().await.unwrap().message_id.unwrap() }
    };
    let later = send(Some(("Number", "4102444800000".to_owned()))).await;
    let earlier = send(Some(("Number", millis.clone()))).await;
    let unreadable = send(Some(("String", "10.9.0.2".to_owned()))).await;
    let plain = send(None).await;
    let summary = env.drain_from(query_source(query, &env)).await;
    assert_eq!(summary.stored, 4, "{summary}");
    let stored = logins_by_id(&env).await;
    assert_eq!(
        stored[&later],
        (today, true),
        "never younger than SentTimestamp"
    );
    assert_eq!(
        stored[&earlier],
        (first_sent.date(), false),
        "older: erased"
    );
    assert_eq!(stored[&unreadable], (today, false), "unknown: erased");
    assert_eq!(stored[&plain], (today, true));
    letters.cleanup(&env).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_replay_moves_only_what_the_queue_accepted_and_only_back_to_its_source() {
    let env = TestEnv::new(30).await;
    let letters = DeadLetters::attach(&env, 5).await;
    env.sqs
        .set_queue_attributes()
        .queue_url(&env.queue_url)
        .attributes(QueueAttributeName::MaximumMessageSize, "1024")
        .send()
        .await
        .unwrap();
    let small = login("u-1", "10.3.3.3", "dev-small");
    let big = format!(
        r#"{{"user_id": "u-1", "ip": "10.3.3.4", "pad": "{}"}}"#,
        "x".repeat(2000)
    );
    letters.send(&env, &small, &[]).await;
    letters.send(&env, &big, &[]).await;

    // A queue that is not the dead-letter queue's source, or the pair swapped: nothing moves.
    let swapped = run(
        &env,
        INGEST,
        "",
        &[
            "replay-dead-letters",
            "--dead-letter-queue-url",
            &env.queue_url,
            "--queue-url",
            &letters.url,
        ],
    )
    .await;
    assert_eq!(swapped.status.code(), Some(1), "{}", stderr(&swapped));
    assert!(
        stderr(&swapped).contains("nothing was moved"),
        "{}",
        stderr(&swapped)
    );
    assert_eq!(letters.counts(&env).await, (2, 0));

    let replayed = letters.replay(&env, &[]).await;
    assert_eq!(replayed.status.code(), Some(1), "{}", stderr(&replayed));
    let said = stderr(&replayed);
    assert!(said.contains("the queue refused a message"), "{said}");
    assert!(!said.contains("10.3.3") && !said.contains("xxxx"), "{said}");
    // The refused one, and whatever was not sent after it, are back in the dead-letter queue
    // at once; nothing is in two places or in none.
    let on_queue = env.messages_on_queue().await;
    let (visible, in_flight) = letters.counts(&env).await;
    assert_eq!((on_queue + visible, in_flight), (2, 0));
    assert!(visible >= 1);
    let received = env
        .sqs
        .receive_message()
        .queue_url(&env.queue_url)
        .max_number_of_messages(10)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    assert!(
        received
            .iter()
            .all(|m| m.body.as_deref() == Some(small.as_str()))
    );
    letters.cleanup(&env).await;
    env.cleanup().await;
}
