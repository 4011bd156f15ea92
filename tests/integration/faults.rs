//! Faults over the real wire: nothing lost, nothing stored twice, nothing acknowledged that was
//! not stored, and no personal value or key byte in the logs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::QueueAttributeName;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use crate::common::{
    self, Proxy, Replica, TestEnv, eventually, get, sample_bodies, stderr, stdout, terminate_pid,
    within,
};
// Base64 (standard alphabet, padded), to look for keys in the forms a log might print them.
use pii_vault::aws_http::base64;
use pii_vault::ingest::source::MessageSource;
use pii_vault::ingest::source::sqs::PollSettings;
use pii_vault::ingest::source::sqs::json::SqsSource;
use pii_vault::ingest::{self, Settings, Summary};
use pii_vault::synth::Generator;
use pii_vault::vault::keyring::Keyring;
use pii_vault::vault::kms::AwsKms;

const INGEST: &str = env!("CARGO_BIN_EXE_ingest");
const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");
const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");

fn settings() -> Settings {
    Settings {
        flush_interval: Duration::from_millis(20),
        ..Settings::default()
    }
}

fn poll() -> PollSettings {
    PollSettings {
        wait_time_seconds: 1,
        visibility_timeout_seconds: None,
    }
}

/// `count` generated bodies and how many of them are malformed.
fn generated(count: usize, seed: u64) -> (Vec<String>, usize) {
    let mut generator = Generator::new(seed, 0.2, 0.05);
    let messages: Vec<_> = (0..count).map(|_| generator.next_message()).collect();
    let malformed = messages.iter().filter(|m| m.malformed).count();
    (messages.into_iter().map(|m| m.body).collect(), malformed)
}

/// Every message exactly once, counted from the database: generated user ids are unique, so
/// a login missing is lost and a user stored twice is duplicated (under two message ids).
async fn assert_exactly_once(env: &TestEnv, valid: usize, malformed: usize) {
    let (rows, ids, users): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT message_id), count(DISTINCT user_id) FROM user_logins",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let (lost, duplicated) = (valid as i64 - users, rows - users);
    println!("sent {valid} valid and {malformed} malformed; lost {lost}, duplicated {duplicated}");
    assert_eq!((lost, duplicated), (0, 0), "lost and duplicated logins");
    assert_eq!(ids, rows, "one row per message id");
    assert_eq!(env.count("quarantine").await as usize, malformed);
    assert_eq!(env.count("login_vault").await, rows);
}

/// Ingest flags for the process tests: small batches, short polls, metrics on.
const REPLICA_ARGS: [&str; 6] = [
    "--flush-ms",
    "20",
    "--batch-size",
    "50",
    "--wait-seconds",
    "1",
];

/// Kills `replica` while it holds received, undeleted work, and proves it did: its own
/// metrics said so just before, and the queue shows messages in flight just after.
async fn kill_while_holding(env: &TestEnv, replica: Replica) -> u64 {
    let held = std::cell::Cell::new(0);
    within(
        Duration::from_secs(30),
        "the replica holds received work",
        || async {
            held.set(replica.holding().await);
            held.get() > 0
        },
    )
    .await;
    let held = held.get();
    let ended = replica.kill();
    assert!(!ended.status.success(), "it was killed, not finished");
    let (_, in_flight) = env.queue_counts().await;
    assert!(
        in_flight > 0,
        "the kill left received messages in flight (held {held} just before)"
    );
    held
}

/// Ingests the sample across a cut of `proxy`, through which the ingester (`source`, `pool`,
/// `keyring`) reaches `server`: 10 messages stored before the cut; 30 more sent during it, and
/// none of them stored while it lasts (and `while_cut` holds); all 39 valid ones of the 40
/// stored once the link is restored. Returns the run's summary, after a shutdown.
async fn ingest_across_a_cut<S: MessageSource>(
    env: &TestEnv,
    proxy: &Proxy,
    server: &str,
    source: Arc<S>,
    pool: PgPool,
    keyring: Keyring<AwsKms>,
    while_cut: impl Future<Output = ()>,
) -> Summary {
    let bodies = sample_bodies();
    env.send(&bodies[..10]).await;
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(ingest::run(
        source,
        pool,
        keyring,
        settings(),
        Arc::default(),
        shutdown.clone(),
    ));
    assert!(
        eventually(Duration::from_secs(30), || async {
            env.count("user_logins").await == 10
        })
        .await
    );
    // Acknowledging follows the commit: the first 10 must be off the queue before the cut, or
    // a slow delete would count as a message the cut left there.
    assert!(
        eventually(Duration::from_secs(30), || async {
            env.messages_on_queue().await == 0
        })
        .await,
        "the 10 stored before the cut are acknowledged"
    );

    proxy.cut();
    env.send(&bodies[10..40]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.count("user_logins").await,
        10,
        "nothing is stored while {server} is away"
    );
    while_cut.await;

    proxy.restore();
    let restored = Instant::now();
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.count("user_logins").await == 39
        })
        .await
    );
    println!(
        "recovered {:?} after {server} came back",
        restored.elapsed()
    );
    shutdown.cancel();
    run.await.unwrap().unwrap()
}

#[tokio::test]
async fn postgres_unreachable_for_a_while_is_retried_and_nothing_is_acknowledged_meanwhile() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let proxy = Proxy::start(common::database_port()).await;
    let proxied = env.database_url_through(proxy.port);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(&proxied)
        .unwrap();
    let keyring = Keyring::new(pool.clone(), env.kms.clone(), &env.kms_key_id, "tests");
    let nothing_deleted = async {
        assert_eq!(env.messages_on_queue().await, 30, "so nothing was deleted");
    };
    let source = env.source(poll());
    let summary = ingest_across_a_cut(
        &env,
        &proxy,
        "PostgreSQL",
        source,
        pool,
        keyring,
        nothing_deleted,
    )
    .await;
    assert!(summary.write_retries > 0, "{summary}");
    assert_eq!((summary.stored, summary.quarantined), (39, 1));
    assert_eq!(env.messages_on_queue().await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn the_emulator_unreachable_for_a_while_is_retried_and_catches_up() {
    let env = TestEnv::new(5).await;
    env.init_token_key().await;
    let proxy = Proxy::start(common::aws_port()).await;
    let config = common::aws_config_at(&format!("http://127.0.0.1:{}", proxy.port)).await;
    let source = Arc::new(SqsSource::new(
        aws_sdk_sqs::Client::new(&config),
        env.queue_url.clone(),
        poll(),
    ));
    let kms = Arc::new(AwsKms::from_conf(&config));
    let keyring = Keyring::new(env.pool.clone(), kms, &env.kms_key_id, "tests");
    let pool = env.pool.clone();
    let no_more_checks = std::future::ready(());
    ingest_across_a_cut(
        &env,
        &proxy,
        "the emulator",
        source,
        pool,
        keyring,
        no_more_checks,
    )
    .await;
    // A delete lost during the cut brings its message back; it is recognized as stored.
    tokio::time::sleep(Duration::from_secs(6)).await;
    env.drain_until_empty(Duration::from_secs(60)).await;
    assert_eq!(env.count("user_logins").await, 39);
    assert_eq!(env.count("quarantine").await, 1);
    assert_eq!(env.messages_on_queue().await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn kill_9_mid_stream_three_times_then_restart_stores_every_message_exactly_once() {
    let env = TestEnv::new(3).await;
    env.init_token_key().await;
    let (bodies, malformed) = generated(5_000, 9);
    env.send(&bodies).await;
    for round in 1..=3 {
        let before = env.count("user_logins").await;
        let replica = Replica::spawn(&env, INGEST, &REPLICA_ARGS);
        within(
            Duration::from_secs(60),
            "the replica stores logins",
            || async { env.count("user_logins").await >= before + 200 },
        )
        .await;
        let held = kill_while_holding(&env, replica).await;
        println!("kill -9 round {round}: the replica held {held} received deliveries");
    }
    let stored = env.count("user_logins").await as usize;
    assert!(
        stored < bodies.len(),
        "the kills came mid-stream ({stored} stored)"
    );
    env.drain_until_empty(Duration::from_secs(120)).await;
    assert_exactly_once(&env, bodies.len() - malformed, malformed).await;
    env.cleanup().await;
}

#[tokio::test]
async fn three_replicas_one_killed_keep_the_table_exact() {
    let env = TestEnv::new(3).await;
    env.init_token_key().await;
    let (bodies, malformed) = generated(10_000, 11);
    env.send(&bodies).await;
    let mut replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::spawn(&env, INGEST, &REPLICA_ARGS))
        .collect();
    within(
        Duration::from_secs(60),
        "the replicas store logins",
        || async { env.count("user_logins").await > 1_000 },
    )
    .await;
    let held = kill_while_holding(&env, replicas.remove(0)).await;
    println!("killed one of three replicas holding {held} received deliveries");
    within(
        Duration::from_secs(180),
        "the surviving replicas take over the killed one's messages",
        || async {
            (env.count("user_logins").await + env.count("quarantine").await) as usize
                == bodies.len()
        },
    )
    .await;
    for replica in replicas {
        terminate_pid(replica.pid());
        let ended = replica.wait(Duration::from_secs(30));
        assert!(
            ended.status.success(),
            "a replica stops cleanly on SIGTERM: {}",
            ended.stderr
        );
    }
    assert_eq!(env.messages_on_queue().await, 0);
    assert_exactly_once(&env, bodies.len() - malformed, malformed).await;
    env.cleanup().await;
}

#[tokio::test]
async fn sigterm_mid_stream_commits_what_was_received_and_exits_0() {
    let env = TestEnv::new(3).await;
    env.init_token_key().await;
    let (bodies, malformed) = generated(3_000, 13);
    env.send(&bodies).await;
    let replica = Replica::spawn(&env, INGEST, &REPLICA_ARGS);
    let held = std::cell::Cell::new(0);
    within(
        Duration::from_secs(60),
        "the replica holds received work",
        || async {
            held.set(replica.holding().await);
            held.get() > 0 && env.count("user_logins").await > 100
        },
    )
    .await;
    let held = held.get();
    let (visible, _) = env.queue_counts().await;
    assert!(
        visible >= 2_000,
        "SIGTERM with {visible} messages still to come"
    );
    terminate_pid(replica.pid());
    let asked = Instant::now();
    let ended = replica.wait(Duration::from_secs(30));
    println!(
        "stopped {:?} after SIGTERM, holding {held} deliveries",
        asked.elapsed()
    );
    assert!(ended.status.success(), "{}", ended.stderr);
    let field = |name: &str| -> u64 {
        ended
            .stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in {}", ended.stdout))
            .parse()
            .unwrap()
    };
    assert_eq!(
        field("acknowledged"),
        field("received"),
        "everything received was committed and deleted: {}",
        ended.stdout
    );
    assert_eq!(env.count("user_logins").await as u64, field("stored"));
    env.drain_until_empty(Duration::from_secs(120)).await;
    assert_exactly_once(&env, bodies.len() - malformed, malformed).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_message_that_keeps_failing_goes_to_the_dead_letter_queue() {
    let env = TestEnv::new(1).await;
    env.init_token_key().await;
    let dlq_url = env
        .sqs
        .create_queue()
        .queue_name(format!("test-dlq-{}", common::unique_suffix()))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let dlq_arn = env
        .sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    env.sqs
        .set_queue_attributes()
        .queue_url(&env.queue_url)
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn": "{dlq_arn}", "maxReceiveCount": "2"}}"#),
        )
        .send()
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'refused'; END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON user_logins
           FOR EACH ROW WHEN (NEW.user_id = 'poison') EXECUTE FUNCTION refuse_poison();",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let mut bodies = sample_bodies()[..10].to_vec();
    bodies.push(common::login("poison", "10.0.0.9", "9"));
    env.send(&bodies).await;

    let shutdown = CancellationToken::new();
    let run = tokio::spawn(ingest::run(
        env.source(poll()),
        env.pool.clone(),
        env.keyring(),
        settings(),
        Arc::default(),
        shutdown.clone(),
    ));
    let dead_lettered = eventually(Duration::from_secs(30), || async {
        let received = env
            .sqs
            .receive_message()
            .queue_url(&dlq_url)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        received
            .messages
            .unwrap_or_default()
            .iter()
            .any(|m| m.body().is_some_and(|b| b.contains("\"poison\"")))
    })
    .await;
    shutdown.cancel();
    let summary = run.await.unwrap().unwrap();
    assert!(
        dead_lettered,
        "the poison message reached the dead-letter queue"
    );
    assert!(
        summary.left_on_queue >= 2,
        "each failure is counted: {summary}"
    );
    // (No check that the main queue is empty: with a 1 s visibility timeout, a good message
    // still in flight at shutdown would count, though it is stored.)
    assert_eq!(env.count("user_logins").await, 10);
    env.cleanup().await;
}

/// Every form a personal value could take in a log: quoted, escaped, bare, canonical, and
/// its bytes in hex and base64.
fn forms_of(value: &str) -> Vec<String> {
    let mut forms = vec![
        format!("\"{value}\""),
        format!("\\\"{value}\\\""),
        value.to_owned(),
        value.trim().to_owned(),
        hex::encode(value),
        base64(value.as_bytes()),
    ];
    if let Ok(ip) = value.parse::<std::net::IpAddr>() {
        forms.push(ip.to_string());
    }
    forms
}

#[tokio::test]
async fn the_most_verbose_logs_of_every_binary_hold_no_personal_value_and_no_key_byte() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let mut bodies = sample_bodies();
    // Hostile and quarantined paths, with values of their own to look for.
    let hostile = [
        r#"{"user_id": "leak-1", "ip": "203.0.113.77", "device_id": "leak-device-0001", "surplus": 1}"#,
        r#"{"user_id": "leak-2", "ip": "999.1.1.1", "device_id": "leak-device-0002", "app_version": "1", "device_type": "ios", "locale": null}"#,
        r#"{"user_id": "leak-3", "ip": "2001:db8:0:0::77", "device_id": "  leak-device-0003 ", "app_version": "1.0", "device_type": "ios", "locale": null}"#,
    ];
    bodies.extend(hostile.iter().map(|b| b.to_string()));
    env.send(&bodies).await;
    let trace = "trace,aws_smithy_runtime::client::orchestrator=trace";
    let run = |user: Option<&str>, binary: &str, args: &[&str]| {
        let mut command = std::process::Command::new(binary);
        command
            .args(args)
            .envs(env.binary_env())
            .env("RUST_LOG", trace);
        if let Some(user) = user {
            command.env("DATABASE_URL", env.url_as(user));
        }
        common::output_of(&mut command)
    };
    let sample_user = serde_json::from_str::<serde_json::Value>(&bodies[0]).unwrap()["user_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Each run: (what, its output, whether its stdout may hold revealed values).
    let mut runs = vec![("ingest --drain", run(None, INGEST, &["--drain"]), false)];
    assert!(runs[0].1.status.success(), "{}", stderr(&runs[0].1));
    let reveal = ["--purpose", "security-incident", "--reason", "leak test"];
    runs.push((
        "unmask (revealing)",
        run(
            Some("compliance"),
            UNMASK,
            &[
                &["--user-id", &sample_user, "--format", "json"][..],
                &reveal[..],
            ]
            .concat(),
        ),
        true,
    ));
    assert!(runs[1].1.status.success(), "{}", stderr(&runs[1].1));
    for (what, user, args) in [
        (
            "unmask, nothing found",
            "compliance",
            vec!["--user-id", "nobody"],
        ),
        ("unmask, refused", "analyst", vec!["--user-id", "leak-3"]),
        ("rotate-keys status", "keyadmin", vec!["status"]),
        (
            "rotate-keys data-key",
            "keyadmin",
            vec!["data-key", "--grace-seconds", "0"],
        ),
        (
            "rotate-keys token-key",
            "keyadmin",
            vec!["token-key", "--grace-seconds", "0"],
        ),
        ("rotate-keys verify", "keyadmin", vec!["verify"]),
        (
            "rotate-keys erase",
            "keyadmin",
            vec!["erase", "--user-id", "leak-3", "--reason", "r"],
        ),
        ("unmask verify-audit", "compliance", vec!["verify-audit"]),
    ] {
        let binary = if what.starts_with("unmask") {
            UNMASK
        } else {
            ROTATE_KEYS
        };
        let args = if what.starts_with("unmask,") {
            [&args[..], &reveal[..]].concat()
        } else {
            args
        };
        runs.push((what, run(Some(user), binary, &args), false));
    }
    // The error path: a tampered value, refused with an integrity failure.
    sqlx::query(
        "UPDATE login_vault SET sealed_ip = sealed_device_id
         WHERE login_id = (SELECT id FROM user_logins WHERE user_id = $1)",
    )
    .bind(&sample_user)
    .execute(&env.pool)
    .await
    .unwrap();
    let tampered = run(
        Some("compliance"),
        UNMASK,
        &[&["--user-id", &sample_user][..], &reveal[..]].concat(),
    );
    assert_eq!(tampered.status.code(), Some(4), "{}", stderr(&tampered));
    runs.push(("unmask, integrity failure", tampered, false));

    let mut values = Vec::new();
    for body in &bodies {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else {
            continue;
        };
        for field in ["ip", "device_id"] {
            if let Some(text) = value[field].as_str() {
                values.push(text.to_owned());
            }
        }
    }
    assert!(values.len() >= 200);
    let revealed = stdout(&runs[1].1);
    assert!(
        values.iter().any(|v| revealed.contains(v.trim())),
        "unmask did reveal"
    );
    for (what, output, stdout_reveals) in &runs {
        let logs = if *stdout_reveals {
            stderr(output)
        } else {
            format!("{}{}", stdout(output), stderr(output))
        };
        assert!(
            logs.contains("TRACE") || logs.contains("DEBUG"),
            "{what}: the most verbose level was on: {logs}"
        );
        for value in &values {
            for form in forms_of(value) {
                assert!(!logs.contains(&form), "{what}: {value} leaked as {form}");
            }
        }
    }
    let all_logs: String = runs
        .iter()
        .map(|(_, output, _)| format!("{}{}", stdout(output), stderr(output)))
        .collect();
    assert!(all_logs.contains("TRACE"), "trace level was on");
    // Every key pii-vault holds, unwrapped here the way KMS gives it out.
    let keys: Vec<(i64, String, String, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT id, purpose, kms_key_id, wrapped_key FROM vault_keys")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(keys.len() >= 4, "data and token keys, old and new");
    for (id, purpose, kms_key_id, wrapped) in keys {
        let Some(wrapped) = wrapped else { continue };
        let plaintext = env
            .kms
            .client()
            .decrypt()
            .key_id(kms_key_id)
            .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(wrapped))
            .encryption_context("purpose", &purpose)
            .encryption_context("key_id", id.to_string())
            .send()
            .await
            .unwrap()
            .plaintext
            .unwrap()
            .into_inner();
        let hex = hex::encode(&plaintext);
        let decimal = format!("{:?}", &plaintext[..8]);
        let decimal = decimal.trim_end_matches(']');
        for form in [
            hex.clone(),
            hex.to_uppercase(),
            base64(&plaintext),
            decimal.to_owned(),
        ] {
            assert!(
                !all_logs.contains(&form),
                "{purpose} key {id} leaked as {form}"
            );
        }
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_data_key_is_never_taken_past_its_limit_even_when_kms_gives_no_new_one() {
    let env = TestEnv::new(2).await;
    env.init_token_key().await;
    let limit = 100;
    let replica = Replica::spawn(
        &env,
        INGEST,
        &[
            &REPLICA_ARGS[..],
            &["--data-key-max-records", &limit.to_string()],
        ]
        .concat(),
    );
    let (first, first_malformed) = generated(200, 21);
    env.send(&first).await;
    let stored =
        || async { (env.count("user_logins").await + env.count("quarantine").await) as usize };
    within(
        Duration::from_secs(60),
        "the first messages are stored",
        || async { stored().await == first.len() },
    )
    .await;
    let keys_before = env.values_per_data_key().await;
    assert!(
        keys_before.len() >= 4,
        "a new data key every {limit} values: {keys_before:?}"
    );

    // KMS refuses new data keys: sealing stops at the limit, the rest waits on the queue.
    let kms = env.kms.client().clone();
    kms.disable_key()
        .key_id(&env.kms_key_id)
        .send()
        .await
        .unwrap();
    let (second, second_malformed) = generated(200, 22);
    env.send(&second).await;
    within(
        Duration::from_secs(60),
        "/readyz says sealing stopped",
        || async {
            matches!(get(replica.metrics_port, "/readyz").await,
                 Some((503, body)) if body.contains("sealing: sealing stopped"))
        },
    )
    .await;
    within(
        Duration::from_secs(30),
        "refused messages are counted",
        || async { replica.counter(pii_vault::telemetry::SEALING_REFUSED).await > Some(0.0) },
    )
    .await;
    assert!(
        stored().await < first.len() + second.len(),
        "not everything was sealed"
    );
    for (key, values) in env.values_per_data_key().await {
        assert!(
            values <= limit,
            "data key {key} sealed {values} values, over {limit}"
        );
    }

    // KMS answers again: the rest is sealed under new keys, each message exactly once.
    kms.enable_key()
        .key_id(&env.kms_key_id)
        .send()
        .await
        .unwrap();
    within(
        Duration::from_secs(90),
        "the waiting messages are stored",
        || async { stored().await == first.len() + second.len() },
    )
    .await;
    within(
        Duration::from_secs(30),
        "/readyz is ready again",
        || async { matches!(get(replica.metrics_port, "/readyz").await, Some((200, _))) },
    )
    .await;
    terminate_pid(replica.pid());
    let ended = replica.wait(Duration::from_secs(30));
    assert!(ended.status.success(), "{}", ended.stderr);
    for (key, values) in env.values_per_data_key().await {
        assert!(
            values <= limit,
            "data key {key} sealed {values} values, over {limit}"
        );
    }
    env.drain_until_empty(Duration::from_secs(60)).await;
    let valid = first.len() + second.len() - first_malformed - second_malformed;
    assert_exactly_once(&env, valid, first_malformed + second_malformed).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_connection_lost_during_commit_leaves_every_message_stored_once() {
    let env = TestEnv::new(5).await;
    env.init_token_key().await;
    let cutter = common::CommitCutter::start(common::database_port(), 3).await;
    // In clear, so that the proxy sees the COMMIT go by.
    let url = format!("{}?sslmode=disable", env.database_url_through(cutter.port));
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy(&url)
        .unwrap();
    let (bodies, malformed) = generated(300, 61);
    env.send(&bodies).await;
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        ingest::run(
            env.source(poll()),
            pool,
            env.keyring(),
            Settings {
                drain: true,
                batch_size: 50,
                ..settings()
            },
            Arc::default(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("the drain finishes")
    .expect("ingest runs");
    assert_eq!(cutter.cuts(), 3, "three COMMITs lost their answer");
    // A batch whose COMMIT landed although its answer was lost is written again on retry:
    // its rows are found already stored, not stored twice.
    assert!(summary.duplicates > 0, "{summary}");
    env.drain_until_empty(Duration::from_secs(60)).await;
    assert_exactly_once(&env, bodies.len() - malformed, malformed).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_crash_between_commit_and_delete_stores_nothing_twice() {
    let env = TestEnv::new(2).await;
    env.init_token_key().await;
    let (bodies, malformed) = generated(300, 62);
    env.send(&bodies).await;
    let crashed = common::output_of(
        std::process::Command::new(INGEST)
            .args(["--drain", "--flush-ms", "20", "--batch-size", "50"])
            .envs(env.binary_env())
            .env("PII_VAULT_FAILPOINT", "exit-after-commit"),
    );
    assert!(!crashed.status.success(), "it died at the failpoint");
    assert!(
        stderr(&crashed).contains("failpoint exit-after-commit"),
        "{}",
        stderr(&crashed)
    );
    let stored = (env.count("user_logins").await + env.count("quarantine").await) as u64;
    let on_queue = env.messages_on_queue().await;
    assert!(stored > 0, "a batch committed before the crash");
    assert!(
        stored + on_queue > bodies.len() as u64,
        "some committed messages were never deleted: {stored} stored, {on_queue} on the queue"
    );
    env.drain_until_empty(Duration::from_secs(60)).await;
    assert_exactly_once(&env, bodies.len() - malformed, malformed).await;
    env.cleanup().await;
}
