//! Ingest end to end over the wire: SQS and KMS in the emulator, the real PostgreSQL.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::{TestEnv, sample_bodies};
use pii_vault::ingest::batch::login_place;
use pii_vault::ingest::source::{Acknowledged, Message, MessageSource, Receipt, SourceError};
use pii_vault::ingest::sqs::{PollSettings, SqsSource};
use pii_vault::synth::Generator;
use pii_vault::vault::KeyId;
use pii_vault::vault::token::Field;

#[derive(sqlx::FromRow)]
struct StoredLogin {
    message_id: String,
    user_id: String,
    masked_ip: String,
    masked_device_id: String,
    token_key_id: i64,
    data_key_id: i64,
    sealed_ip: Vec<u8>,
    sealed_device_id: Vec<u8>,
}

#[tokio::test]
async fn sample_queue_gives_99_rows_1_quarantine_and_an_empty_queue() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let bodies = sample_bodies();
    env.send(&bodies).await;

    let summary = env.drain().await;
    assert_eq!((summary.stored, summary.quarantined), (99, 1));
    // At least once: the emulator may hand one message to two concurrent polls.
    assert_eq!(summary.received, 100 + summary.duplicates);
    assert_eq!(summary.acknowledged, summary.received);
    assert_eq!(env.count("user_logins").await, 99);
    assert_eq!(env.count("login_vault").await, 99);
    assert_eq!(env.count("quarantine").await, 1);
    assert_eq!(env.messages_on_queue().await, 0);

    let reason: String = sqlx::query_scalar("SELECT reason FROM quarantine")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(reason, "unexpected field `foo`");

    // locale: NULL where the message had null, never the text 'None'.
    let null_locales: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE locale IS NULL")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(null_locales, 29);
    let none_text: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE locale IN ('None', 'null', '')")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(none_text, 0);

    // app_version: the three shapes, encoded and kept as text.
    let versions: HashMap<String, i32> =
        sqlx::query_as("SELECT app_version_text, app_version FROM user_logins")
            .fetch_all(&env.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(versions["2.3.0"], 2_003_000);
    assert_eq!(versions["0.96"], 96_000);
    assert_eq!(versions["3.7"], 3_007_000);

    // create_date: the UTC date the messages were sent, i.e. today.
    let dates: Vec<time::Date> = sqlx::query_scalar("SELECT DISTINCT create_date FROM user_logins")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    let today = time::OffsetDateTime::now_utc().date();
    assert!(
        dates.iter().all(|d| (*d - today).whole_days().abs() <= 1),
        "{dates:?}"
    );

    // Nothing personal in clear, and every sealed value opens to the original at its place.
    let originals: HashMap<String, (String, String)> = bodies
        .iter()
        .filter_map(|b| serde_json::from_str::<serde_json::Value>(b).ok())
        .filter(|v| v.get("user_id").is_some())
        .map(|v| {
            (
                v["user_id"].as_str().unwrap().to_owned(),
                (
                    v["ip"].as_str().unwrap().to_owned(),
                    v["device_id"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    let rows: Vec<StoredLogin> = sqlx::query_as(
        "SELECT l.message_id, l.user_id, l.masked_ip, l.masked_device_id, l.token_key_id,
                v.data_key_id, v.sealed_ip, v.sealed_device_id
         FROM user_logins l JOIN login_vault v ON v.login_id = l.id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let keyring = env.keyring();
    let tokenizer = keyring
        .tokenizer(KeyId(rows[0].token_key_id))
        .await
        .unwrap();
    let sealer = keyring.sealer(KeyId(rows[0].data_key_id)).await.unwrap();
    for row in &rows {
        assert_eq!(
            (row.token_key_id, row.data_key_id),
            (rows[0].token_key_id, rows[0].data_key_id),
            "one key each"
        );
        let (ip, device_id) = &originals[&row.user_id];
        assert_ne!(&row.masked_ip, ip);
        assert_eq!(row.masked_ip.len(), 64);
        assert_eq!(row.masked_ip, tokenizer.ip(ip.parse().unwrap()).as_str());
        assert_eq!(
            row.masked_device_id,
            tokenizer.device_id(device_id).as_str()
        );
        let place = |field| login_place(field, &row.message_id, &row.user_id);
        let opened_ip = sealer
            .open(&place(Field::Ip), &row.sealed_ip)
            .expect("ip opens");
        assert_eq!(opened_ip.as_slice(), ip.as_bytes());
        let opened_device = sealer
            .open(&place(Field::DeviceId), &row.sealed_device_id)
            .expect("device id opens");
        assert_eq!(opened_device.as_slice(), device_id.as_bytes());
    }
    // One Decrypt of the token key, one GenerateDataKey at start, the two opens just above:
    // KMS is called per key, never per record.
    assert_eq!(env.kms.calls(), 1 + 1 + 1 + 2);
    env.cleanup().await;
}

#[tokio::test]
async fn equal_values_share_a_token_and_different_values_do_not() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let body = |user: &str, ip: &str, device: &str| {
        format!(
            r#"{{"user_id": "{user}", "app_version": "1.0", "device_type": "ios", "ip": "{ip}", "locale": "FR", "device_id": "{device}"}}"#
        )
    };
    env.send(&[
        body("u-1", "10.0.0.1", "111-11-1111"),
        body("u-2", "10.0.0.1", "111-11-1111"),
        body("u-3", "10.0.0.2", "222-22-2222"),
        // The same address in another spelling is the same address.
        body("u-4", "::ffff:10.0.0.2", "333-33-3333"),
    ])
    .await;
    env.drain().await;
    let tokens: HashMap<String, (String, String)> = sqlx::query_as::<_, (String, String, String)>(
        "SELECT user_id, masked_ip, masked_device_id FROM user_logins",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(u, ip, device)| (u, (ip, device)))
    .collect();
    assert_eq!(tokens.len(), 4);
    assert_eq!(tokens["u-1"], tokens["u-2"]);
    assert_ne!(tokens["u-1"].0, tokens["u-3"].0);
    assert_ne!(tokens["u-1"].1, tokens["u-3"].1);
    assert_eq!(tokens["u-3"].0, tokens["u-4"].0);
    assert_ne!(tokens["u-3"].1, tokens["u-4"].1);
    env.cleanup().await;
}

#[tokio::test]
async fn synthetic_duplicates_are_counted_exactly() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let mut generator = Generator::new(42, 0.3, 0.05);
    let messages: Vec<_> = (0..300).map(|_| generator.next_message()).collect();
    let bodies: Vec<String> = messages.iter().map(|m| m.body.clone()).collect();
    env.send(&bodies).await;
    env.drain().await;

    let valid: Vec<serde_json::Value> = messages
        .iter()
        .filter(|m| !m.malformed)
        .map(|m| serde_json::from_str(&m.body).unwrap())
        .collect();
    let distinct_devices: BTreeSet<&str> = valid
        .iter()
        .map(|v| v["device_id"].as_str().unwrap())
        .collect();
    let distinct_ips: BTreeSet<&str> = valid.iter().map(|v| v["ip"].as_str().unwrap()).collect();
    let (rows, device_tokens, ip_tokens): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT masked_device_id), count(DISTINCT masked_ip) FROM user_logins",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows as usize, valid.len());
    assert!(distinct_devices.len() < valid.len(), "the data has repeats");
    assert_eq!(device_tokens as usize, distinct_devices.len());
    assert_eq!(ip_tokens as usize, distinct_ips.len());
    assert_eq!(
        env.count("quarantine").await as usize,
        messages.len() - valid.len()
    );
    env.cleanup().await;
}

/// The SQS source with deletes switched off: every message comes back after its visibility
/// timeout, as if the process had died between commit and delete.
struct NeverAcknowledge(SqsSource);

impl MessageSource for NeverAcknowledge {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        self.0.receive().await
    }
    async fn acknowledge(&self, _: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        Ok(Acknowledged::default())
    }
}

#[tokio::test]
async fn a_redelivered_message_adds_nothing_and_a_rerun_leaves_the_same_table() {
    // Long enough that nothing comes back while a run is still working on it.
    let visibility = 5;
    let env = TestEnv::new(visibility).await;
    env.init_token_key().await;
    let bodies = &sample_bodies()[..30];
    env.send(bodies).await;
    let poll = PollSettings {
        wait_time_seconds: 1,
        visibility_timeout_seconds: None,
    };
    let first = env
        .drain_from(Arc::new(NeverAcknowledge(SqsSource::new(
            env.sqs.clone(),
            env.queue_url.clone(),
            poll,
        ))))
        .await;
    assert_eq!((first.stored, first.quarantined), (29, 1));
    let snapshot = "SELECT string_agg(concat_ws('|', user_id, device_type, masked_ip, masked_device_id,
                        locale, app_version, create_date, message_id, token_key_id, app_version_text),
                    ',' ORDER BY message_id) FROM user_logins";
    let before: String = sqlx::query_scalar(snapshot)
        .fetch_one(&env.pool)
        .await
        .unwrap();

    tokio::time::sleep(Duration::from_secs(visibility as u64 + 1)).await;
    assert_eq!(env.messages_on_queue().await, 30, "nothing was deleted");
    let second = env.drain().await;
    assert_eq!((second.stored, second.quarantined), (0, 0));
    assert!(second.received >= 30);
    assert_eq!(second.duplicates, second.received);
    assert_eq!(second.acknowledged, second.received);
    let after: String = sqlx::query_scalar(snapshot)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(before, after);
    assert_eq!(env.count("user_logins").await, 29);
    assert_eq!(env.count("quarantine").await, 1);
    assert_eq!(env.messages_on_queue().await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_whose_commit_fails_is_not_deleted_and_is_stored_once_later() {
    let visibility = 5;
    let env = TestEnv::new(visibility).await;
    env.init_token_key().await;
    // A constraint trigger checked at COMMIT: the transaction fails at the very last step.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.user_id = 'poison' THEN RAISE EXCEPTION 'refused at commit'; END IF;
           RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER refuse_poison AFTER INSERT ON user_logins
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let mut bodies = sample_bodies()[..30].to_vec();
    bodies[20] = r#"{"user_id": "poison", "app_version": "1.0", "device_type": "ios", "ip": "10.9.9.9", "locale": null, "device_id": "999-99-9999"}"#.to_owned();
    env.send(&bodies).await;

    let first = env.drain().await;
    assert_eq!(first.left_on_queue, 1);
    assert_eq!(
        first.stored, 28,
        "the rest of the batch committed once the poison was isolated"
    );
    // (Deletes are counted per SQS answer; a retried DeleteMessageBatch may count one twice.)
    assert!(first.acknowledged >= 29, "{first}");
    assert_eq!(env.count("user_logins").await, 28);
    assert_eq!(
        env.messages_on_queue().await,
        1,
        "the failed message was not deleted"
    );

    sqlx::raw_sql("DROP TRIGGER refuse_poison ON user_logins")
        .execute(&env.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(visibility as u64 + 1)).await;
    let second = env.drain().await;
    assert_eq!(second.stored, 1);
    let poison: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE user_id = 'poison'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(poison, 1);
    assert_eq!(env.count("user_logins").await, 29);
    assert_eq!(env.messages_on_queue().await, 0);
    env.cleanup().await;
}
