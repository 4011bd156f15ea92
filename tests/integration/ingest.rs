//! Ingest end to end over the wire: SQS and KMS in the emulator, the real PostgreSQL; and the
//! SQS Query protocol, over the emulator and against a pre-3.0 emulator's recorded answers.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{self, TestEnv, sample_bodies};
use pii_vault::ingest::source::sqs::json::SqsSource;
use pii_vault::ingest::source::sqs::probe::probe;
use pii_vault::ingest::source::sqs::query::{QueryClient, QuerySqsSource};
use pii_vault::ingest::source::sqs::{PollSettings, Protocol};
use pii_vault::ingest::source::{
    Acknowledged, Message, MessageSource, Receipt, SourceError, SourceHealth,
};
use pii_vault::synth::Generator;
use pii_vault::vault::KeyId;
use pii_vault::vault::place::login_place;
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

    let source = KeepSentTimes::new(SqsSource::new(
        env.sqs.clone(),
        env.queue_url.clone(),
        PollSettings {
            wait_time_seconds: 1,
            visibility_timeout_seconds: None,
        },
    ));
    let summary = env.drain_from(source.clone()).await;
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

    // create_date: the UTC date of each message's SentTimestamp, as SQS reported it.
    source.assert_create_dates(&env).await;

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
        "SELECT coalesce(l.message_id_text, l.message_id::text) AS message_id, l.user_id, l.masked_ip, l.masked_device_id, l.token_key_id,
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

// The SQS Query protocol (`--sqs-protocol query`): over LocalStack's Query endpoint, and
// against the answers of an emulator older than LocalStack 3.0, replayed from loopback.

/// Keeps each message's SentTimestamp, to compare with its row's `create_date`.
struct KeepSentTimes<S> {
    source: S,
    sent: Mutex<HashMap<String, time::OffsetDateTime>>,
}

impl<S: MessageSource> KeepSentTimes<S> {
    fn new(source: S) -> Arc<Self> {
        Arc::new(Self {
            source,
            sent: Mutex::default(),
        })
    }

    /// Every stored login's `create_date` is the UTC date its message was sent.
    async fn assert_create_dates(&self, env: &TestEnv) {
        let rows: Vec<(String, time::Date)> =
            sqlx::query_as("SELECT message_id::text, create_date FROM user_logins")
                .fetch_all(&env.pool)
                .await
                .unwrap();
        assert!(!rows.is_empty());
        let sent = self.sent.lock().unwrap().clone();
        for (message_id, create_date) in rows {
            let sent_at = sent[&message_id];
            assert_eq!(sent_at.offset(), time::UtcOffset::UTC);
            assert_eq!(create_date, sent_at.date(), "{message_id}");
        }
    }
}

impl<S: MessageSource> MessageSource for KeepSentTimes<S> {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        let messages = self.source.receive().await?;
        let mut sent = self.sent.lock().unwrap();
        for message in &messages {
            sent.insert(message.id.clone(), message.sent_at.expect("SentTimestamp"));
        }
        Ok(messages)
    }
    async fn acknowledge(&self, receipts: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        self.source.acknowledge(receipts).await
    }
}

#[tokio::test]
async fn over_the_query_protocol_the_sample_gives_99_rows_1_quarantine_and_an_empty_queue() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let client = QueryClient::new(&common::aws_config().await);
    for chunk in sample_bodies().chunks(10) {
        let sent = client.send_batch(&env.queue_url, chunk).await.unwrap();
        assert_eq!(sent, chunk.len());
    }
    let source = KeepSentTimes::new(QuerySqsSource::new(
        client,
        env.queue_url.clone(),
        PollSettings {
            wait_time_seconds: 1,
            visibility_timeout_seconds: None,
        },
    ));
    let summary = env.drain_from(source.clone()).await;
    assert_eq!((summary.stored, summary.quarantined), (99, 1), "{summary}");
    assert_eq!(summary.received, 100 + summary.duplicates);
    assert_eq!(summary.acknowledged, summary.received);
    assert_eq!(env.count("user_logins").await, 99);
    assert_eq!(env.count("quarantine").await, 1);
    assert_eq!(env.messages_on_queue().await, 0);

    // create_date: the UTC date of each message's SentTimestamp, read from the XML.
    source.assert_create_dates(&env).await;
    env.cleanup().await;
}

#[tokio::test]
async fn over_the_query_protocol_bodies_arrive_byte_for_byte() {
    let env = TestEnv::new(30).await;
    let client = QueryClient::new(&common::aws_config().await);
    let bodies = [
        r#"{"a": "<&>\"'", "b": "é ü 漢字 🙂"}"#.to_owned(),
        "  leading and trailing whitespace\t".to_owned(),
        "two\r\nlines\rand a lone CR; ]]> and &amp; literally".to_owned(),
    ];
    assert_eq!(client.send_batch(&env.queue_url, &bodies).await.unwrap(), 3);
    let source = QuerySqsSource::new(
        client,
        env.queue_url.clone(),
        PollSettings {
            wait_time_seconds: 1,
            visibility_timeout_seconds: None,
        },
    );
    let mut received = Vec::new();
    for _ in 0..10 {
        let messages = source.receive().await.unwrap();
        let receipts = messages.iter().map(|m| m.receipt.clone()).collect();
        received.extend(messages.into_iter().map(|m| m.body));
        source.acknowledge(receipts).await.unwrap();
        if received.len() >= bodies.len() {
            break;
        }
    }
    received.sort();
    let mut expected: Vec<Vec<u8>> = bodies.iter().map(|b| b.clone().into_bytes()).collect();
    expected.sort();
    assert_eq!(received, expected);

    // The readiness check, and LocalStack's Query answer for a missing queue.
    source.check().await.unwrap();
    let missing = QuerySqsSource::new(
        QueryClient::new(&common::aws_config().await),
        format!("{}-missing", env.queue_url),
        PollSettings::default(),
    );
    let error = missing.check().await.unwrap_err();
    assert!(!error.transient, "{}", error.message);
    assert!(
        error.message.contains("NonExistentQueue") || error.message.contains("QueueDoesNotExist"),
        "{}",
        error.message
    );
    env.cleanup().await;
}

fn recorded(name: &str) -> String {
    let path = format!("{}/tests/data/sqs-query/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A request the recorded emulator received.
#[derive(Debug, Clone)]
struct SeenRequest {
    path: String,
    /// Header names in lower case.
    headers: HashMap<String, String>,
    /// The decoded form fields (none for a JSON-protocol request).
    form: HashMap<String, String>,
}

type Script = HashMap<String, VecDeque<(u16, String)>>;

/// An emulator older than LocalStack 3.0 in miniature, on a loopback port: every request gets
/// the next answer scripted for its `Action` (`json` for a JSON-protocol request), written as
/// plain HTTP/1.1, and is kept for the test to inspect.
struct RecordedEmulator {
    endpoint: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    script: Arc<Mutex<Script>>,
    accept: tokio::task::JoinHandle<()>,
}

impl RecordedEmulator {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<SeenRequest>>> = Arc::default();
        let script: Arc<Mutex<Script>> = Arc::default();
        let (seen_by_server, script_of_server) = (seen.clone(), script.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer_one(
                    stream,
                    seen_by_server.clone(),
                    script_of_server.clone(),
                ));
            }
        });
        Self {
            endpoint,
            seen,
            script,
            accept,
        }
    }

    /// Queues an answer to the next request for `action`.
    fn answer(&self, action: &str, status: u16, body: String) {
        self.script
            .lock()
            .unwrap()
            .entry(action.to_owned())
            .or_default()
            .push_back((status, body));
    }

    fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for RecordedEmulator {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Reads one request, answers it, and closes the connection.
async fn answer_one(
    mut stream: tokio::net::TcpStream,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    script: Arc<Mutex<Script>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap_or_default()
        .to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let json = headers.contains_key("x-amz-target");
    let form = if json {
        HashMap::new()
    } else {
        decode_form(&body)
    };
    let action = if json {
        "json".to_owned()
    } else {
        form.get("Action").cloned().unwrap_or_default()
    };
    seen.lock().unwrap().push(SeenRequest {
        path,
        headers,
        form,
    });
    let (status, answer) = script
        .lock()
        .unwrap()
        .get_mut(&action)
        .and_then(VecDeque::pop_front)
        .unwrap_or((500, String::new()));
    let response = format!(
        "HTTP/1.1 {status} Recorded\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn decode_form(body: &[u8]) -> HashMap<String, String> {
    let decode = |text: &str| {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                byte => out.push(byte),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

/// The form fields `fields` are all in `request`, with these values.
fn assert_form(request: &SeenRequest, fields: &[(&str, &str)]) {
    for (key, value) in fields {
        assert_eq!(
            request.form.get(*key).map(String::as_str),
            Some(*value),
            "{key} in {:?}",
            request.form
        );
    }
}

/// Signed with SigV4 for SQS in the test's region, with the test's access key.
fn assert_signed(request: &SeenRequest) {
    let authorization = &request.headers["authorization"];
    assert!(
        authorization.starts_with("AWS4-HMAC-SHA256 Credential=test/"),
        "{authorization}"
    );
    assert!(
        authorization.contains("/us-east-1/sqs/aws4_request"),
        "{authorization}"
    );
    assert!(
        authorization.contains("SignedHeaders=content-type;host;x-amz-date"),
        "{authorization}"
    );
    assert!(authorization.contains("Signature="), "{authorization}");
    assert!(request.headers.contains_key("x-amz-date"));
    assert!(
        request.headers["content-type"].starts_with("application/x-www-form-urlencoded"),
        "{:?}",
        request.headers
    );
}

#[tokio::test]
async fn a_pre_3_0_emulator_is_read_through_the_query_source() {
    let emulator = RecordedEmulator::start().await;
    let aws = common::aws_config_at(&emulator.endpoint).await;
    let client = QueryClient::new(&aws);
    let samples = sample_bodies();

    // auto: a JSON-protocol request gets an XML complaint, so the endpoint speaks Query.
    emulator.answer("json", 400, recorded("error-json-request.xml"));
    assert_eq!(probe(&aws, "login-queue").await.unwrap(), Protocol::Query);

    // GetQueueUrl goes to the endpoint.
    emulator.answer("GetQueueUrl", 200, recorded("get-queue-url.xml"));
    assert_eq!(
        client.get_queue_url("login-queue").await.unwrap(),
        "http://localhost:4566/000000000000/login-queue"
    );
    // A missing queue: not transient, said in one line, and not retried.
    emulator.answer("GetQueueUrl", 400, recorded("error-nonexistent-queue.xml"));
    let missing = client.get_queue_url("no-such-queue").await.unwrap_err();
    assert!(!missing.transient);
    assert_eq!(
        missing.message,
        "GetQueueUrl no-such-queue: AWS.SimpleQueueService.NonExistentQueue (HTTP 400) \
         The specified queue does not exist for this wsdl version."
    );
    let seen = emulator.seen();
    assert_eq!(seen.len(), 3, "the missing queue was asked for once");
    assert_eq!(seen[1].path, "/");
    assert_signed(&seen[1]);
    assert_form(
        &seen[1],
        &[
            ("Action", "GetQueueUrl"),
            ("Version", "2012-11-05"),
            ("QueueName", "login-queue"),
        ],
    );

    // A throttled receive is retried, and the answer read: ids, receipts, exact bodies (the
    // XML escapes them as `&#34;`), and SentTimestamp in UTC.
    let queue_url = format!("{}/000000000000/login-queue", emulator.endpoint);
    let source = QuerySqsSource::new(
        client.clone(),
        queue_url.clone(),
        PollSettings {
            wait_time_seconds: 2,
            visibility_timeout_seconds: Some(45),
        },
    );
    emulator.answer("ReceiveMessage", 503, recorded("error-throttled.xml"));
    emulator.answer("ReceiveMessage", 200, recorded("receive-message.xml"));
    let messages = source.receive().await.unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].id, "4b0e1f5c-7e3a-4d58-9a8f-0c6f1b2d3e41");
    assert_eq!(messages[0].body, samples[0].as_bytes());
    assert_eq!(messages[1].body, samples[12].as_bytes());
    assert!(messages[0].receipt.0.starts_with("hzzzvqcmgbzwjzwb"));
    assert_eq!(
        messages[0].sent_at,
        Some(time::OffsetDateTime::from_unix_timestamp_nanos(1_595_263_429_431_000_000).unwrap())
    );
    let late = messages[1].sent_at.unwrap();
    assert_eq!(
        (late.date().to_string(), late.offset()),
        ("2020-07-20".to_owned(), time::UtcOffset::UTC)
    );
    let seen = emulator.seen();
    assert_eq!(seen.len(), 5, "the throttled receive was tried again");
    for receive in &seen[3..5] {
        // To the configured endpoint, naming the queue in the form, as the AWS CLI does.
        assert_eq!(receive.path, "/");
        assert_signed(receive);
        assert_form(
            receive,
            &[
                ("Action", "ReceiveMessage"),
                ("Version", "2012-11-05"),
                ("QueueUrl", &queue_url),
                ("MaxNumberOfMessages", "10"),
                ("WaitTimeSeconds", "2"),
                ("VisibilityTimeout", "45"),
                ("AttributeName.1", "SentTimestamp"),
                // What a replay out of the dead-letter queue carries.
                ("MessageAttributeName.1", "PiiVaultOriginalSentTimestamp"),
                ("MessageAttributeName.2", "PiiVaultOriginalMessageId"),
            ],
        );
    }

    // DeleteMessageBatch: one deleted, one refused, counted as the JSON adapter counts them.
    emulator.answer(
        "DeleteMessageBatch",
        200,
        recorded("delete-message-batch.xml"),
    );
    let outcome = source
        .acknowledge(messages.iter().map(|m| m.receipt.clone()).collect())
        .await
        .unwrap();
    assert_eq!(outcome, Acknowledged { deleted: 1 });
    let delete = emulator.seen().pop().unwrap();
    assert_signed(&delete);
    assert_form(
        &delete,
        &[
            ("Action", "DeleteMessageBatch"),
            ("DeleteMessageBatchRequestEntry.1.Id", "0"),
            (
                "DeleteMessageBatchRequestEntry.1.ReceiptHandle",
                &messages[0].receipt.0,
            ),
            ("DeleteMessageBatchRequestEntry.2.Id", "1"),
            (
                "DeleteMessageBatchRequestEntry.2.ReceiptHandle",
                &messages[1].receipt.0,
            ),
        ],
    );

    // Throttled on every attempt: a transient error, after as many attempts as the SDK makes.
    let before = emulator.seen().len();
    for _ in 0..5 {
        emulator.answer("ReceiveMessage", 503, recorded("error-throttled.xml"));
    }
    let throttled = source.receive().await.unwrap_err();
    assert!(throttled.transient);
    assert!(
        throttled
            .message
            .starts_with("ReceiveMessage: RequestThrottled (HTTP 503)"),
        "{}",
        throttled.message
    );
    assert_eq!(emulator.seen().len() - before, 5);

    // An answer cut short inside a body: an error that names a position, never the body.
    let whole = recorded("receive-message.xml");
    let cut = whole[..whole.find("199.172").unwrap() + 7].to_owned();
    emulator.answer("ReceiveMessage", 200, cut);
    let broken = source.receive().await.unwrap_err();
    assert!(!broken.message.contains("199.172"), "{}", broken.message);
    assert!(
        broken.message.starts_with("ReceiveMessage: HTTP 200: "),
        "{}",
        broken.message
    );

    // SendMessageBatch (loadgen): every body goes as it is.
    emulator.answer("SendMessageBatch", 200, recorded("send-message-batch.xml"));
    let bodies = [samples[0].clone(), samples[12].clone()];
    assert_eq!(client.send_batch(&queue_url, &bodies).await.unwrap(), 2);
    let send = emulator.seen().pop().unwrap();
    assert_signed(&send);
    assert_form(
        &send,
        &[
            ("Action", "SendMessageBatch"),
            ("QueueUrl", &queue_url),
            ("SendMessageBatchRequestEntry.1.Id", "0"),
            ("SendMessageBatchRequestEntry.1.MessageBody", &samples[0]),
            ("SendMessageBatchRequestEntry.2.Id", "1"),
            ("SendMessageBatchRequestEntry.2.MessageBody", &samples[12]),
        ],
    );
}

/// Migration 0008 keys each login by 16 bytes of its message id. Logins stored before it, with
/// ids that are not UUIDs (a file line's `<path>:<line>`), keep the id they were sealed with:
/// they still open, and the same file replayed after the upgrade adds nothing.
#[tokio::test]
async fn logins_stored_before_the_16_byte_message_key_still_open_and_still_deduplicate() {
    let env = TestEnv::unmigrated().await;
    let role_admin = env.migrate_before(8).await;
    let (tokenizer, sealer) = common::keys_before_0011(&env).await;

    // The sample file's logins as the writer before 0008 stored them: text message ids.
    let lines: Vec<String> = std::fs::read_to_string(common::SAMPLE_JSONL)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let ids = (1..=lines.len()).map(|n| format!("legacy:{n}"));
    let batch = batch_of(ids.zip(&lines), &tokenizer, &sealer);
    assert_eq!(batch.logins.len(), 99);
    for row in &batch.logins {
        let personal = row.personal.as_ref().unwrap();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO user_logins (user_id, device_type, masked_ip, masked_device_id, locale,
                                      app_version, create_date, message_id, token_key_id,
                                      app_version_text)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
        )
        .bind(&row.in_clear.user_id)
        .bind(&row.in_clear.device_type)
        .bind(personal.masked_ip.as_str())
        .bind(personal.masked_device_id.as_str())
        .bind(row.in_clear.locale.as_deref())
        .bind(row.in_clear.app_version.encoded)
        .bind(row.create_date.day())
        .bind(&row.message_id)
        .bind(tokenizer.key_id())
        .bind(&row.in_clear.app_version.text)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO login_vault VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(sealer.key_id())
            .bind(&personal.sealed_ip)
            .bind(&personal.sealed_device_id)
            .execute(&env.pool)
            .await
            .unwrap();
    }

    pii_vault::db::migrate(&env.pool, Some(&role_admin))
        .await
        .unwrap();
    let (kept_text, keyed_by_hash): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE message_id_text LIKE 'legacy:%'),
                count(*) FILTER (WHERE message_id = message_key(message_id_text))
         FROM user_logins",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((kept_text, keyed_by_hash), (99, 99));
    let keyadmin = env.pool_as("keyadmin").await;
    let verified = pii_vault::unmask::verify_all(&keyadmin, &env.keyring_on(&keyadmin))
        .await
        .expect("every login stored before 0008 still opens");
    assert_eq!(verified.logins, 99);
    keyadmin.close().await;

    let replay =
        pii_vault::ingest::source::file::FileSource::open(common::SAMPLE_JSONL, Some("legacy"))
            .unwrap();
    let summary = env.drain_from(Arc::new(replay)).await;
    assert_eq!((summary.stored, summary.duplicates), (0, 99), "{summary}");
    assert_eq!(env.count("user_logins").await, 99);
    env.cleanup().await;
}

/// Two replicas writing the same message (a redelivery racing its first delivery): the one
/// that loses is told so by the unique index while it copies, and writing its batch again
/// stores the rest of it, the raced message once.
#[tokio::test]
async fn a_writer_that_loses_a_race_for_a_message_stores_the_rest_when_written_again() {
    use pii_vault::ingest::writer::{self, WriteError};
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let keyring = env.keyring();
    let tokenizer = keyring.active_tokenizer().await.unwrap();
    let sealer = keyring.new_sealer().await.unwrap();
    let ids = [
        "0b1e4c8e-3f7a-4c55-9d0e-6a0f5c1e2d3b",
        "7c9d2f10-88aa-4e0b-b1c2-d3e4f5a6b7c8",
    ];
    let bodies = sample_bodies();
    let batch = batch_of(
        ids.map(str::to_owned).iter().cloned().zip(&bodies),
        &tokenizer,
        &sealer,
    );
    assert_eq!(batch.logins.len(), 2);

    // The rival has the second message in the index, uncommitted.
    let mut rival = env.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO user_logins (user_id, device_type, app_version, create_date, message_id,
                                  token_key_id, app_version_text)
         VALUES ('rival', 'ios', 1, current_date, $1::uuid, $2, '1')",
    )
    .bind(ids[1])
    .bind(tokenizer.key_id())
    .execute(&mut *rival)
    .await
    .unwrap();
    let pool = env.pool.clone();
    let writing = tokio::spawn(async move {
        let result = writer::write(&pool, &batch).await;
        (result, batch)
    });
    common::until_waiting_on_a_lock(
        &env,
        "the writer waiting on the rival's entry",
        "COPY user_logins%",
    )
    .await;
    rival.commit().await.unwrap();
    let (result, batch) = writing.await.unwrap();
    assert!(matches!(result, Err(WriteError::Raced)), "{result:?}");
    assert_eq!(
        env.count("user_logins").await,
        1,
        "nothing of the raced batch"
    );

    let again = writer::write(&env.pool, &batch).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (1, 1));
    let owners: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM user_logins ORDER BY message_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(owners.len(), 2);
    assert!(owners.contains(&"rival".to_owned()));
    env.cleanup().await;
}

/// `(id, body)` pairs as a source would hand them out, made into one batch as ingest makes it.
fn batch_of<'a>(
    messages: impl Iterator<Item = (String, &'a String)>,
    tokenizer: &pii_vault::vault::token::Tokenizer,
    sealer: &pii_vault::vault::seal::Sealer,
) -> pii_vault::ingest::batch::Batch {
    let messages = messages
        .map(|(id, body)| Message {
            id,
            body: body.clone().into_bytes(),
            sent_at: None,
            receipt: Receipt(String::new()),
            read_at: std::time::Instant::now(),
        })
        .collect();
    let erased = pii_vault::vault::erasure::ErasedUsers::default();
    pii_vault::ingest::batch::build(messages, tokenizer, sealer, &erased, false)
}

/// Every query the README promises is served by an index in every month it reaches, after
/// migration 0008 slimmed them and 0017 split the tables by month: unmask by user and by
/// token, idempotency on the message key (pruned to its months by the writer's own look-up,
/// also as a generic plan; since 0022 by each month's own key), the rotation walk by id, a
/// login's vault row, and the proof that a data key seals nothing.
#[tokio::test]
async fn every_promised_query_is_served_by_an_index_in_every_month() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let file =
        pii_vault::ingest::source::file::FileSource::open(common::SAMPLE_JSONL, None).unwrap();
    let summary = env.drain_from(Arc::new(file)).await;
    assert_eq!(summary.stored, 99, "{summary}");
    // Logins in a second month, so that every query meets two partitions of each table.
    let earlier = time::Date::from_calendar_date(2025, time::Month::June, 15)
        .unwrap()
        .with_hms(12, 0, 0)
        .unwrap()
        .assume_utc();
    env.add_month(earlier.date()).await;
    let summary = env
        .drain_from(common::VecSource::sent_at(&sample_bodies()[..10], earlier))
        .await;
    assert!(summary.stored >= 9, "{summary}");
    let months_with_logins: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT date_trunc('month', create_date)) FROM user_logins",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(months_with_logins, 2);
    let partitions = |table: &str| {
        let table = table.to_owned();
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_partition_tree($1::regclass) WHERE isleaf",
            )
            .bind(table)
            .fetch_one(&pool)
            .await
            .unwrap() as usize
        }
    };
    let (login_months, vault_months) = (
        partitions("user_logins").await,
        partitions("login_vault").await,
    );
    assert!(
        login_months >= 5 && vault_months == login_months,
        "{login_months} {vault_months}"
    );
    // (query, the parent index each partition's scan must use, partitions it must reach)
    let queries = [
        (
            "SELECT id FROM user_logins WHERE user_id = 'u'",
            "user_logins_user_id",
            login_months,
        ),
        (
            "SELECT id FROM user_logins WHERE masked_ip = 'x'",
            "user_logins_masked_ip",
            login_months,
        ),
        (
            "SELECT id FROM user_logins WHERE masked_device_id = 'x'",
            "user_logins_masked_device_id",
            login_months,
        ),
        (
            "EXECUTE stored_keys_of_months('{0b1e4c8e-3f7a-4c55-9d0e-6a0f5c1e2d3b}',
                                           '2025-06-01', '2025-07-01')",
            "user_logins_message_id_key",
            1,
        ),
        (
            "SELECT message_id FROM user_logins
             WHERE message_id = ANY ('{0b1e4c8e-3f7a-4c55-9d0e-6a0f5c1e2d3b}'::uuid[])",
            "user_logins_message_id_key",
            login_months,
        ),
        (
            "SELECT id FROM user_logins WHERE id > 10 ORDER BY id LIMIT 5",
            "user_logins_pkey",
            login_months,
        ),
        (
            "SELECT sealed_ip FROM login_vault WHERE login_id = 7",
            "login_vault_pkey",
            vault_months,
        ),
        (
            "SELECT 1 FROM login_vault WHERE data_key_id = 2",
            "login_vault_data_key_id",
            vault_months,
        ),
    ];
    let mut connection = env.pool.acquire().await.unwrap();
    // Whether an index can serve the query, not whether a few rows are worth it.
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *connection)
        .await
        .unwrap();
    // The writer's look-up as a generic plan, which an ingester's prepared statement may
    // become: its months are pruned when it starts, by the values it is given.
    sqlx::raw_sql(&format!(
        "SET plan_cache_mode = force_generic_plan;
         PREPARE stored_keys_of_months (text[], date, date) AS {}",
        pii_vault::ingest::writer::STORED_KEYS_OF_MONTHS
    ))
    .execute(&mut *connection)
    .await
    .unwrap();
    for (query, index, reached) in queries {
        let plan: serde_json::Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {query}"))
            .fetch_one(&mut *connection)
            .await
            .unwrap();
        let mut scans = Vec::new();
        relation_scans(&plan, &mut scans);
        assert!(
            scans.iter().all(|(node, _)| node != "Seq Scan"),
            "{query}: {plan}"
        );
        // A parent's index by its name; a month's own key (0022) by its name without the month.
        let roots: Vec<String> = sqlx::query_scalar(
            "SELECT coalesce(pg_partition_root(i::regclass)::text,
                             regexp_replace(i, '_[0-9]{4}_[0-9]{2}_', '_'))
             FROM unnest($1::text[]) AS i",
        )
        .bind(
            scans
                .iter()
                .filter(|(_, index)| !index.is_empty())
                .map(|(_, index)| index.clone())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *connection)
        .await
        .unwrap();
        assert_eq!(roots.len(), reached, "{query}: {plan}");
        assert!(roots.iter().all(|root| root == index), "{query}: {roots:?}");
    }
    drop(connection);
    env.cleanup().await;
}

/// Each node of `plan` that scans a table or an index: its type and the index ("" for none).
fn relation_scans(plan: &serde_json::Value, scans: &mut Vec<(String, String)>) {
    match plan {
        serde_json::Value::Array(items) => {
            items.iter().for_each(|item| relation_scans(item, scans))
        }
        serde_json::Value::Object(node) => {
            if node.contains_key("Relation Name") || node.contains_key("Index Name") {
                let text = |key: &str| {
                    node.get(key)
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_owned()
                };
                scans.push((text("Node Type"), text("Index Name")));
            }
            node.values().for_each(|value| relation_scans(value, scans));
        }
        _ => {}
    }
}
