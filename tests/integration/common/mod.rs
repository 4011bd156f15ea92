//! Shared set-up of the integration tests: each test gets its own freshly migrated database
//! (`pii_vault::testing::Scratch`), its own queue, its own KMS keys and its own audit witness
//! bucket, on the real PostgreSQL server and the AWS emulator, so tests run in parallel without
//! seeing each other.
//!
//! A missing service is a loud failure naming the command that starts it: `scripts/services up`
//! (which `make test` runs first).

pub mod aws_policy;
pub mod recording_proxy;

use std::collections::HashMap;
use std::ops::Deref;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::config::Credentials;
use aws_sdk_sqs::types::QueueAttributeName;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use pii_vault::audit::witness::WitnessBucket;
use pii_vault::db;
use pii_vault::ingest::source::sqs::PollSettings;
use pii_vault::ingest::source::sqs::json::SqsSource;
use pii_vault::ingest::source::{Acknowledged, Message, MessageSource, Receipt, SourceError};
use pii_vault::ingest::{self, Settings, Summary};
pub use pii_vault::testing::{
    Scratch, base_database_url, role_admin, role_admin_url, unique_suffix,
};
use pii_vault::vault::keyring::Keyring;
use pii_vault::vault::kms::AwsKms;

pub const SAMPLE_JSONL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/sample_data.jsonl");

pub fn aws_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".to_owned())
}

/// Every attribute of the queue at `url`.
pub async fn queue_attributes(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
) -> HashMap<QueueAttributeName, String> {
    sqs.get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .expect("GetQueueAttributes")
        .attributes
        .unwrap_or_default()
}

pub async fn aws_config() -> aws_config::SdkConfig {
    aws_config_at(&aws_endpoint()).await
}

/// Creates the KMS key `request` describes in the emulator; its ARN.
async fn arn_of(
    request: aws_sdk_kms::operation::create_key::builders::CreateKeyFluentBuilder,
) -> String {
    request
        .send()
        .await
        .expect("creating a KMS key in the emulator")
        .key_metadata
        .expect("key metadata")
        .arn
        .expect("key arn")
}

/// One test's world: a database (its [`Scratch`], which it derefs to), a queue and a KMS key
/// of its own.
pub struct TestEnv {
    pub db: Scratch,
    pub sqs: aws_sdk_sqs::Client,
    pub kms: Arc<AwsKms>,
    pub queue_url: String,
    pub kms_key_id: String,
    /// The KMS asymmetric key (ECC_NIST_P256) that signs audit checkpoints.
    pub audit_signing_key_id: String,
    /// The S3 bucket (Object Lock, COMPLIANCE) that witnesses audit checkpoints. Its objects
    /// stay locked for a day, so it outlives the test (the emulator keeps it in memory).
    pub audit_witness_bucket: String,
}

/// Days a test's witnessed checkpoints stay locked.
pub const WITNESS_RETAIN_DAYS: u32 = 1;

impl TestEnv {
    /// A fresh migrated database, a queue whose messages become visible again after
    /// `visibility_timeout` seconds, and a KMS key.
    pub async fn new(visibility_timeout: u32) -> Self {
        Self::create(visibility_timeout, true).await
    }

    /// Like [`TestEnv::new`] with an empty database, as before `rotate-keys init`.
    pub async fn unmigrated() -> Self {
        Self::create(30, false).await
    }

    async fn create(visibility_timeout: u32, migrate: bool) -> Self {
        let db = if migrate {
            Scratch::new().await
        } else {
            Scratch::empty().await
        };
        let suffix = unique_suffix();
        let config = aws_config().await;
        let sqs = aws_sdk_sqs::Client::new(&config);
        let queue_url = sqs
            .create_queue()
            .queue_name(format!("test-{suffix}"))
            .attributes(QueueAttributeName::VisibilityTimeout, visibility_timeout.to_string())
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the AWS emulator is not reachable at {} ({}); start it with `scripts/services up`",
                    aws_endpoint(),
                    aws_sdk_sqs::error::DisplayErrorContext(e)
                )
            })
            .queue_url
            .expect("queue url");
        let kms_client = aws_sdk_kms::Client::new(&config);
        let kms_key_id = arn_of(kms_client.create_key().description("pii-vault test key")).await;
        let audit_signing_key_id = arn_of(
            kms_client
                .create_key()
                .description("pii-vault test audit signing key")
                .key_spec(aws_sdk_kms::types::KeySpec::EccNistP256)
                .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify),
        )
        .await;
        let audit_witness_bucket = format!("pii-vault-test-{suffix}");
        WitnessBucket::new(&config, &audit_witness_bucket, WITNESS_RETAIN_DAYS)
            .create()
            .await
            .unwrap_or_else(|e| panic!("creating the audit witness bucket: {e}"));
        Self {
            db,
            sqs,
            kms: Arc::new(AwsKms::new(kms_client)),
            queue_url,
            kms_key_id,
            audit_signing_key_id,
            audit_witness_bucket,
        }
    }

    /// This test's audit witness bucket.
    pub async fn witness(&self) -> WitnessBucket {
        WitnessBucket::new(
            &aws_config().await,
            &self.audit_witness_bucket,
            WITNESS_RETAIN_DAYS,
        )
    }

    /// A keyring reading keys as `pool`'s user.
    pub fn keyring_on(&self, pool: &PgPool) -> Keyring<AwsKms> {
        Keyring::new(pool.clone(), self.kms.clone(), &self.kms_key_id, "tests")
    }

    pub fn keyring(&self) -> Keyring<AwsKms> {
        Keyring::new(
            self.pool.clone(),
            self.kms.clone(),
            &self.kms_key_id,
            "tests",
        )
    }

    /// Runs, on an [`TestEnv::unmigrated`] database, the migrations before `version`: the
    /// schema a release before it left. `pii_vault::db::migrate` then runs the rest.
    pub async fn migrate_before(&self, version: i64) -> PgPool {
        let before = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(
                pii_vault::db::MIGRATOR
                    .iter()
                    .filter(|m| m.version < version)
                    .cloned()
                    .collect(),
            ),
            ignore_missing: false,
            locking: true,
            no_tx: false,
        };
        let role_admin = role_admin().await;
        pii_vault::db::migrate_with(&before, &self.pool, Some(&role_admin))
            .await
            .unwrap();
        role_admin
    }

    /// Adds the partitions of `day`'s month, as `rotate-keys partitions` would for a month
    /// ahead: a login is stored only in its month's partitions (migration 0017).
    pub async fn add_month(&self, day: time::Date) {
        pii_vault::lifecycle::add_month(&self.pool, day)
            .await
            .expect("vault_add_month");
    }

    /// `rotate-keys init`, in-process.
    pub async fn init_token_key(&self) {
        self.keyring()
            .init_token_key()
            .await
            .expect("creating the token key");
    }

    pub async fn send(&self, bodies: &[String]) {
        for chunk in bodies.chunks(10) {
            pii_vault::ingest::source::sqs::json::send_batch(&self.sqs, &self.queue_url, chunk)
                .await
                .expect("SendMessageBatch");
        }
    }

    pub fn source(&self, settings: PollSettings) -> Arc<SqsSource> {
        Arc::new(SqsSource::new(
            self.sqs.clone(),
            self.queue_url.clone(),
            settings,
        ))
    }

    /// Runs the pipeline over the queue until it is empty.
    pub async fn drain(&self) -> Summary {
        let source = self.source(PollSettings {
            wait_time_seconds: 1,
            visibility_timeout_seconds: None,
        });
        self.drain_from(source).await
    }

    pub async fn drain_from<S: ingest::source::MessageSource>(&self, source: Arc<S>) -> Summary {
        self.drain_with(source, Duration::from_secs(5)).await
    }

    /// Like [`TestEnv::drain_from`], checking for key rotations every `key_check_interval`.
    pub async fn drain_with<S: ingest::source::MessageSource>(
        &self,
        source: Arc<S>,
        key_check_interval: Duration,
    ) -> Summary {
        let settings = Settings {
            drain: true,
            flush_interval: Duration::from_millis(20),
            key_check_interval,
            ..Settings::default()
        };
        tokio::time::timeout(
            Duration::from_secs(120),
            ingest::run(
                source,
                self.pool.clone(),
                self.keyring(),
                settings,
                Arc::default(),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("ingest --drain finishes")
        .expect("ingest runs")
    }

    /// Drains the queue again and again until it holds nothing, visible or in flight (a
    /// process that died mid-receive leaves messages invisible until their visibility timeout
    /// passes). Fails the test if the queue is not empty within `limit`.
    pub async fn drain_until_empty(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            self.drain().await;
            let left = self.messages_on_queue().await;
            if left == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{left} messages still on the queue after {limit:?} of draining"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Visible plus in-flight messages.
    pub async fn messages_on_queue(&self) -> u64 {
        let (visible, in_flight) = self.queue_counts().await;
        visible + in_flight
    }

    /// (visible, in flight: received by someone and neither deleted nor timed out yet).
    pub async fn queue_counts(&self) -> (u64, u64) {
        let attributes = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .expect("GetQueueAttributes")
            .attributes
            .unwrap_or_default();
        let get = |name: QueueAttributeName| -> u64 {
            attributes
                .get(&name)
                .map(|v| v.parse().unwrap())
                .unwrap_or(0)
        };
        (
            get(QueueAttributeName::ApproximateNumberOfMessages),
            get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        )
    }

    /// Values sealed under each data key: two per login, one per quarantined body.
    pub async fn values_per_data_key(&self) -> Vec<(i64, i64)> {
        sqlx::query_as(
            "SELECT key, sum(n)::int8 FROM (
                 SELECT data_key_id AS key, 2 * count(*) AS n FROM login_vault GROUP BY 1
                 UNION ALL SELECT data_key_id, count(*) FROM quarantine GROUP BY 1) AS used
             GROUP BY key ORDER BY key",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// A new symmetric KMS key in the emulator; its ARN.
    pub async fn new_kms_key(&self, description: &str) -> String {
        arn_of(self.kms.client().create_key().description(description)).await
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Environment for running the binaries against this test's world.
    pub fn binary_env(&self) -> HashMap<&'static str, String> {
        HashMap::from([
            ("DATABASE_URL", self.database_url.clone()),
            ("ROLE_ADMIN_DATABASE_URL", role_admin_url()),
            ("KMS_KEY_ID", self.kms_key_id.clone()),
            ("AUDIT_SIGNING_KEY_ID", self.audit_signing_key_id.clone()),
            ("AUDIT_WITNESS_BUCKET", self.audit_witness_bucket.clone()),
            ("AUDIT_WITNESS_RETAIN_DAYS", WITNESS_RETAIN_DAYS.to_string()),
            ("QUEUE", self.queue_url.clone()),
            ("AWS_ENDPOINT_URL", aws_endpoint()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", "test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ])
    }

    pub fn run_binary(&self, path: &str, args: &[&str]) -> Output {
        output_of(Command::new(path).args(args).envs(self.binary_env()))
    }

    /// This test's database URL, reached through a local port (a [`Proxy`]'s).
    pub fn database_url_through(&self, port: u16) -> String {
        self.database_url
            .replacen(&format!(":{}/", database_port()), &format!(":{port}/"), 1)
    }

    /// Runs a binary logged in to the database as `user`.
    pub fn run_binary_as(&self, user: &str, path: &str, args: &[&str]) -> Output {
        output_of(
            Command::new(path)
                .args(args)
                .envs(self.binary_env())
                .env("DATABASE_URL", self.url_as(user)),
        )
    }

    /// Ingests `bodies` through the real pipeline, read from memory instead of SQS.
    pub async fn ingest_bodies(&self, bodies: &[String]) -> Summary {
        self.drain_from(VecSource::new(bodies)).await
    }

    /// Drops the test database (left in place when a test fails, for inspection) and the
    /// queue.
    pub async fn cleanup(self) {
        self.db.drop().await;
        let _ = self
            .sqs
            .delete_queue()
            .queue_url(&self.queue_url)
            .send()
            .await;
    }
}

impl Deref for TestEnv {
    type Target = Scratch;

    fn deref(&self) -> &Scratch {
        &self.db
    }
}

/// A message source over bodies in memory, sent now, with ids unique within the test process.
pub struct VecSource {
    pending: std::sync::Mutex<std::collections::VecDeque<Message>>,
    /// Pause before each receive, to stretch ingestion over time.
    delay: Duration,
}

static NEXT_MESSAGE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl VecSource {
    pub fn new(bodies: &[String]) -> Arc<Self> {
        let bodies: Vec<Vec<u8>> = bodies.iter().map(|b| b.clone().into_bytes()).collect();
        Self::from_bytes(&bodies)
    }

    /// Bodies that need not be text (a file source can deliver any bytes).
    pub fn from_bytes(bodies: &[Vec<u8>]) -> Arc<Self> {
        let now = time::OffsetDateTime::now_utc();
        let pending = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| Message {
                id: format!(
                    "m-{}",
                    NEXT_MESSAGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ),
                body: body.clone(),
                sent_at: Some(now),
                receipt: Receipt(format!("r-{i}")),
                read_at: Instant::now(),
            })
            .collect();
        Arc::new(Self {
            pending: std::sync::Mutex::new(pending),
            delay: Duration::ZERO,
        })
    }

    /// Bodies sent at `sent_at` (their login date is its UTC date).
    pub fn sent_at(bodies: &[String], sent_at: time::OffsetDateTime) -> Arc<Self> {
        let source = Arc::into_inner(Self::new(bodies)).expect("just made");
        let pending = source
            .pending
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|message| Message {
                sent_at: Some(sent_at),
                ..message
            })
            .collect();
        Arc::new(Self {
            pending: std::sync::Mutex::new(pending),
            ..source
        })
    }

    /// These messages, as they are (ids, send times).
    pub fn of_messages(messages: Vec<Message>) -> Arc<Self> {
        Arc::new(Self {
            pending: std::sync::Mutex::new(messages.into()),
            delay: Duration::ZERO,
        })
    }

    /// Delivers ten messages every `delay`.
    pub fn slow(bodies: &[String], delay: Duration) -> Arc<Self> {
        let source = Arc::into_inner(Self::new(bodies)).expect("just made");
        Arc::new(Self { delay, ..source })
    }
}

impl MessageSource for VecSource {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        tokio::time::sleep(self.delay).await;
        let mut pending = self.pending.lock().unwrap();
        let n = pending.len().min(10);
        Ok(pending.drain(..n).collect())
    }

    async fn acknowledge(&self, receipts: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        Ok(Acknowledged {
            deleted: receipts.len(),
        })
    }
}

/// Three logins: u-1 twice (two devices), u-2 once sharing u-1's first device; stored by the
/// ingest pipeline in a world of their own.
pub async fn three_logins() -> TestEnv {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let summary = env
        .ingest_bodies(&[
            login("u-1", "10.0.0.1", "111-11-1111"),
            login("u-1", "10.0.0.2", "222-22-2222"),
            login("u-2", "10.0.0.3", "111-11-1111"),
        ])
        .await;
    assert_eq!(summary.stored, 3);
    env
}

/// As a login without roles (`conn`), takes everything it can that the vault once waited on:
/// every advisory lock the vault used (erasure, audit, one per key in `key_ids`), held for
/// the session, then an open transaction that knocked on the reveal door; held until
/// `ROLLBACK` on `conn`.
pub async fn hold_what_a_login_can(conn: &mut sqlx::PgConnection, key_ids: &[i64]) {
    sqlx::query("SELECT pg_advisory_lock(1886086522, 0), pg_advisory_lock(8100121361964690548)")
        .execute(&mut *conn)
        .await
        .unwrap();
    for id in key_ids {
        sqlx::query("SELECT pg_advisory_lock(1886086521, $1::int4)")
            .bind(*id as i32)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    sqlx::query("SELECT vault_reveal_request('user_id', 'u-1', 'legal-request', 'hold', 'x')")
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// A token key and a data key as versions before migration 0011 made them: read straight from
/// the key table, and the data key sealing format 1.
pub async fn keys_before_0011(
    env: &TestEnv,
) -> (
    pii_vault::vault::token::Tokenizer,
    pii_vault::vault::seal::Sealer,
) {
    use pii_vault::vault::kms::KeyWrapper;
    use pii_vault::vault::seal::{SealFormat, Sealer};
    use pii_vault::vault::token::Tokenizer;
    use pii_vault::vault::{EncryptionContext, KeyId, Purpose};
    let mut keys = Vec::new();
    for purpose in [Purpose::Token, Purpose::Data] {
        let id = KeyId(
            sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('vault_keys', 'id'))")
                .fetch_one(&env.pool)
                .await
                .unwrap(),
        );
        let context = EncryptionContext {
            purpose,
            key_id: id,
        };
        let (key, wrapped) = env
            .kms
            .generate_key(&env.kms_key_id, context)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO vault_keys (id, purpose, kms_key_id, wrapped_key, created_by)
             VALUES ($1, $2, $3, $4, 'tests')",
        )
        .bind(id)
        .bind(purpose.as_str())
        .bind(&wrapped.kms_key_id)
        .bind(&wrapped.ciphertext)
        .execute(&env.pool)
        .await
        .unwrap();
        keys.push((id, key));
    }
    (
        Tokenizer::new(keys[0].0, &keys[0].1),
        Sealer::new(keys[1].0, &keys[1].1, SealFormat::V1),
    )
}

/// `count` generated login bodies (30% repeated values), the same for the same `seed`.
pub fn logins(count: usize, seed: u64) -> Vec<String> {
    let mut generator = pii_vault::synth::Generator::new(seed, 0.3, 0.0);
    (0..count).map(|_| generator.next_message().body).collect()
}

/// Runs rotate-keys as the key admin (a thread, so an ingester can run meanwhile).
pub async fn rotate_keys(env: &TestEnv, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rotate-keys"));
    command
        .args(args)
        .envs(env.binary_env())
        .env("DATABASE_URL", env.url_as("keyadmin"));
    tokio::task::spawn_blocking(move || output_of(&mut command))
        .await
        .unwrap()
}

/// (logins, with tokens, with sealed values) of a user.
pub async fn what_remains_of(env: &TestEnv, user: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(l.masked_ip) + count(l.masked_device_id), count(v.login_id)
         FROM user_logins l LEFT JOIN login_vault v ON v.login_id = l.id WHERE l.user_id = $1",
    )
    .bind(user)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// A login body.
pub fn login(user: &str, ip: &str, device_id: &str) -> String {
    format!(
        r#"{{"user_id": "{user}", "app_version": "1.0", "device_type": "ios", "ip": "{ip}", "locale": null, "device_id": "{device_id}"}}"#
    )
}

pub fn sample_bodies() -> Vec<String> {
    std::fs::read_to_string(SAMPLE_JSONL)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A TCP proxy on loopback whose link can be cut and restored, to make a real server
/// unreachable for a while without touching it (other tests share it).
pub struct Proxy {
    pub port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (cut_flag, link_list) = (cut.clone(), links.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if cut_flag.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound); // connection refused, in effect
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                link_list.lock().unwrap().push(link.abort_handle());
            }
        });
        Self {
            port,
            cut,
            links,
            accept,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// AWS configuration pointing at `endpoint` (e.g. a [`Proxy`] in front of the emulator).
pub async fn aws_config_at(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "pii-vault-tests",
        ))
        .load()
        .await
}

/// Polls `condition` every 100 ms for up to `limit`; true if it held in time.
pub async fn eventually<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    condition().await
}

/// Sends SIGTERM to a process.
pub fn terminate_pid(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
}

fn port_of(url: &str, default: u16) -> u16 {
    let authority = url.split("://").nth(1).unwrap_or(url);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let host_port = authority.split('/').next().unwrap_or(authority);
    host_port
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(default)
}

/// The port of the test PostgreSQL server.
pub fn database_port() -> u16 {
    port_of(&base_database_url(), 5432)
}

/// The port of the AWS emulator.
pub fn aws_port() -> u16 {
    port_of(&aws_endpoint(), 80)
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over a plain TCP connection: the status code and the body, or `None` while
/// nothing listens (or nothing answers within 10 s).
pub async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(10), get_now(port, path))
        .await
        .ok()?
}

async fn get_now(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The value of one series (`name` or `name{labels}`) in a Prometheus text exposition.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// How long a binary run to its end may take before the test fails.
pub const BINARY_LIMIT: Duration = Duration::from_secs(180);

/// A process started by a test: its output drained as it comes (a full pipe would stall it),
/// its end waited for with a deadline (a hung binary fails the test instead of hanging it).
pub struct Running {
    child: std::process::Child,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
}

/// What a process reported when it ended.
pub struct Ended {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl From<Ended> for Output {
    fn from(ended: Ended) -> Self {
        Output {
            status: ended.status,
            stdout: ended.stdout.into_bytes(),
            stderr: ended.stderr.into_bytes(),
        }
    }
}

impl Running {
    pub fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting the binary");
        let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let _ = pipe.read_to_end(&mut all);
                all
            })
        };
        let stdout = drain(Box::new(child.stdout.take().unwrap()));
        let stderr = drain(Box::new(child.stderr.take().unwrap()));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to flush, commit or delete.
    pub fn kill(mut self) -> Ended {
        self.child.kill().expect("SIGKILL");
        self.wait(Duration::from_secs(30))
    }

    /// Waits for it to exit (after SIGTERM, or by itself), failing the test after `limit`.
    pub fn wait(mut self, limit: Duration) -> Ended {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("pid {} did not exit within {limit:?}", self.child.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
        Ended {
            status,
            stdout: text(self.stdout.join().unwrap()),
            stderr: text(self.stderr.join().unwrap()),
        }
    }
}

/// Runs `command` to its end within [`BINARY_LIMIT`], its output drained as it comes.
pub fn output_of(command: &mut Command) -> Output {
    Running::spawn(command).wait(BINARY_LIMIT).into()
}

/// An `ingest` process against a test's world, with its metrics served on a port of its own
/// so a test can see what it holds.
pub struct Replica {
    process: Running,
    pub metrics_port: u16,
}

impl Replica {
    pub fn spawn(env: &TestEnv, path: &str, args: &[&str]) -> Self {
        let metrics_port = free_port();
        let process = Running::spawn(
            Command::new(path)
                .args(args)
                .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
                .envs(env.binary_env()),
        );
        Self {
            process,
            metrics_port,
        }
    }

    /// A counter from its /metrics (0 before the first record), or `None` if it does not
    /// answer.
    pub async fn counter(&self, name: &str) -> Option<f64> {
        let (status, body) = get(self.metrics_port, "/metrics").await?;
        (status == 200).then(|| sample(&body, name).unwrap_or(0.0))
    }

    /// Deliveries it has received but not yet deleted: work a crash now would leave undone.
    pub async fn holding(&self) -> u64 {
        let received = self.counter(pii_vault::telemetry::RECEIVED).await;
        let deleted = self.counter(pii_vault::telemetry::DELETED).await;
        match (received, deleted) {
            (Some(received), Some(deleted)) => (received - deleted).max(0.0) as u64,
            _ => 0,
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn kill(self) -> Ended {
        self.process.kill()
    }

    pub fn wait(self, limit: Duration) -> Ended {
        self.process.wait(limit)
    }
}

/// Waits (up to 10 s) until one session of `env`'s database waits on a lock while running a
/// statement like `statement` (a LIKE pattern): proof that it reached the lock, not just ran.
pub async fn until_waiting_on_a_lock(env: &TestEnv, what: &str, statement: &str) {
    within(Duration::from_secs(10), what, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'
                AND query LIKE $1",
        )
        .bind(statement)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        waiting == 1
    })
    .await;
}

/// Waits (up to 10 s) until a session of `env`'s database logged in as `user` waits for a
/// lock another session holds. Unlike [`until_waiting_on_a_lock`] it needs no right to read
/// other users' statements: `pg_blocking_pids` and the user names are open to every login.
pub async fn until_blocked(env: &TestEnv, user: &str, what: &str) {
    within(Duration::from_secs(10), what, || async {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                             WHERE datname = current_database() AND usename = $1
                               AND cardinality(pg_blocking_pids(pid)) > 0)",
        )
        .bind(user)
        .fetch_one(&env.pool)
        .await
        .unwrap()
    })
    .await;
}

/// Asserts that `condition` holds within `limit`, naming `what` otherwise.
pub async fn within<F, Fut>(limit: Duration, what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        eventually(limit, condition).await,
        "{what}: not within {limit:?}"
    );
}

/// A benchmark's numeric flag (`--name N`), or `default`.
#[allow(dead_code)] // for benches/*.rs, which include this module
pub fn bench_arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// A TCP proxy in front of PostgreSQL that drops the connection just after forwarding a
/// `COMMIT`, the first `times` times: the server may have committed, the client cannot know
/// (the hardest window for exactly-once).
pub struct CommitCutter {
    pub port: u16,
    cuts: Arc<std::sync::atomic::AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl CommitCutter {
    pub async fn start(target_port: u16, times: u64) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cuts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = cuts.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let (mut client_read, mut client_write) = inbound.into_split();
                    let (mut server_read, mut server_write) = outbound.into_split();
                    let answers = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    });
                    let mut buffer = vec![0u8; 64 * 1024];
                    while let Ok(n) = client_read.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        let commit = buffer[..n].windows(6).any(|w| w == b"COMMIT");
                        let take = || {
                            counter
                                .fetch_update(
                                    std::sync::atomic::Ordering::SeqCst,
                                    std::sync::atomic::Ordering::SeqCst,
                                    |done| (done < times).then_some(done + 1),
                                )
                                .is_ok()
                        };
                        if commit && take() {
                            // No answer reaches the client from here on; the server gets the
                            // COMMIT, acts on it, and the connection drops.
                            answers.abort();
                            let _ = server_write.write_all(&buffer[..n]).await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            return;
                        }
                        if server_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                    answers.abort();
                });
            }
        });
        Self { port, cuts, accept }
    }

    /// COMMITs whose answer was lost so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CommitCutter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A PostgreSQL client program (`pg_dump`, `pg_restore`): the one on PATH, else the newest
/// under /usr/lib/postgresql (Debian puts the versioned ones there).
pub fn pg_tool(name: &str) -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    let versioned = || {
        let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|version| version.path().join("bin").join(name))
            .filter(|candidate| candidate.is_file())
            .collect();
        found.sort();
        found.pop()
    };
    on_path.or_else(versioned).unwrap_or_else(|| {
        panic!("{name} not found: install PostgreSQL's client programs (`scripts/services up`)")
    })
}

impl TestEnv {
    /// A custom-format `pg_dump` of this test's database, taken as its owner.
    pub fn dump(&self) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("{}-{}.dump", self.database_name, unique_suffix()));
        let dumped = output_of(Command::new(pg_tool("pg_dump")).args([
            "--format=custom",
            "--file",
            path.to_str().expect("a UTF-8 temp path"),
            "--dbname",
            &self.database_url,
        ]));
        assert!(dumped.status.success(), "pg_dump: {}", stderr(&dumped));
        path
    }

    /// A fresh database restored from `dump` as the runbook restores a backup: created by the
    /// owner, restored by it inside a migration window (it owns the door functions for the
    /// time), with CREATE on the schema lent to the door role and taken back after.
    pub async fn restore(&self, dump: &std::path::Path) -> Scratch {
        let restored = Scratch::empty().await;
        let url = restored.database_url.clone();
        let owner = db::connect(&url, 1).await.unwrap();
        let role_admin = role_admin().await;
        let window = db::MigrationWindow::open(&role_admin, &owner)
            .await
            .unwrap();
        sqlx::query("GRANT CREATE ON SCHEMA public TO pii_vault_door")
            .execute(&owner)
            .await
            .unwrap();
        let pg_restore = output_of(Command::new(pg_tool("pg_restore")).args([
            "--exit-on-error",
            "--single-transaction",
            "--dbname",
            &url,
            dump.to_str().expect("a UTF-8 temp path"),
        ]));
        sqlx::query("REVOKE CREATE ON SCHEMA public FROM pii_vault_door")
            .execute(&owner)
            .await
            .unwrap();
        window.close().await.unwrap();
        owner.close().await;
        role_admin.close().await;
        assert!(
            pg_restore.status.success(),
            "pg_restore: {}",
            stderr(&pg_restore)
        );
        restored
    }
}
