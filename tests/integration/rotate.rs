//! rotate-keys over the wire, as the key admin runs it: rotations while an ingester writes,
//! kill -9 and rerun, re-wrapping under a new KMS key, erasure. After each, every row opens
//! and matches its token.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::{
    self, Scratch, TestEnv, VecSource, login, logins, rotate_keys, stderr, stdout, what_remains_of,
};
use pii_vault::ingest::source::{Message, Receipt};
use pii_vault::ingest::{batch, writer};
use pii_vault::synth::Generator;
use pii_vault::unmask;
use pii_vault::vault::erasure::ErasedUsers;
use pii_vault::vault::key_table::key_use;

const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");
const INGEST: &str = env!("CARGO_BIN_EXE_ingest");
const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");

/// Every login opens under its keys and matches its token; returns how many.
async fn verify_all(env: &TestEnv) -> u64 {
    let keyadmin = env.pool_as("keyadmin").await;
    let verified = unmask::verify_all(&keyadmin, &env.keyring_on(&keyadmin))
        .await
        .expect("every row opens");
    keyadmin.close().await;
    verified.logins
}

async fn keys_in_state(env: &TestEnv, purpose: &str, state: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM vault_keys WHERE purpose = $1 AND state = $2 ORDER BY id")
        .bind(purpose)
        .bind(state)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

async fn rows_under(env: &TestEnv, sql: &str, keys: &[i64]) -> i64 {
    sqlx::query_scalar(sql)
        .bind(keys)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn data_key_rotation_while_ingesting_leaves_every_row_readable() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&logins(1_500, 1)).await;
    let old = keys_in_state(&env, "data", "active").await;

    let ingesting = env.drain_with(
        VecSource::slow(&logins(1_500, 2), Duration::from_millis(10)),
        Duration::from_millis(200),
    );
    let rotating = rotate_keys(
        &env,
        &["data-key", "--grace-seconds", "1", "--batch-size", "200"],
    );
    let (summary, rotated) = tokio::join!(ingesting, rotating);
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    println!("{}", stdout(&rotated));
    assert_eq!(summary.stored, 1_500);

    assert_eq!(
        verify_all(&env).await,
        3_000,
        "no row lost, every row opens"
    );
    assert_eq!(env.count("user_logins").await, 3_000);
    // Retired: the keys active before (and any the ingester made before the rotation began).
    let retired = keys_in_state(&env, "data", "retired").await;
    assert!(
        old.iter().all(|k| retired.contains(k)),
        "{old:?} retired: {retired:?}"
    );
    let under_old = rows_under(
        &env,
        "SELECT count(*) FROM login_vault WHERE data_key_id = ANY($1)",
        &old,
    )
    .await;
    assert_eq!(under_old, 0);
    // Every page the key admin's door handed out is in the audit, with its logins and keys.
    let (pages, logins, names_old_key): (i64, i64, bool) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(cardinality(login_ids)), 0),
                coalesce(bool_or(key_ids && $1), false)
         FROM unmask_audit WHERE outcome = 'reseal' AND db_user = 'keyadmin'",
    )
    .bind(&old)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(pages >= 8, "one audit row per page of 200: {pages}");
    assert!(logins >= 1_500, "the re-sealed logins are named: {logins}");
    assert!(names_old_key);
    env.cleanup().await;
}

#[tokio::test]
async fn data_key_rotation_killed_midway_is_finished_by_a_rerun() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&logins(3_000, 3)).await;
    env.ingest_bodies(&["not json".to_owned()]).await;
    let old = keys_in_state(&env, "data", "active").await;

    let child = common::Running::spawn(
        std::process::Command::new(ROTATE_KEYS)
            .args(["data-key", "--grace-seconds", "0", "--batch-size", "50"])
            .envs(env.binary_env())
            .env("DATABASE_URL", env.url_as("keyadmin")),
    );
    let moved = common::eventually(Duration::from_secs(30), || async {
        rows_under(
            &env,
            "SELECT count(*) FROM login_vault WHERE NOT data_key_id = ANY($1)",
            &old,
        )
        .await
            > 200
    })
    .await;
    let ended = child.kill();
    assert!(!ended.status.success(), "killed mid-way, not finished");
    assert!(moved, "the rotation got under way before it was killed");
    assert_eq!(
        verify_all(&env).await,
        3_000,
        "mid-rotation, every row still opens"
    );
    assert!(!keys_in_state(&env, "data", "retiring").await.is_empty());

    let rerun = rotate_keys(
        &env,
        &["data-key", "--grace-seconds", "0", "--destroy-retired"],
    )
    .await;
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    assert!(stdout(&rerun).contains("destroyed:"), "{}", stdout(&rerun));
    assert_eq!(verify_all(&env).await, 3_000);
    assert!(keys_in_state(&env, "data", "retiring").await.is_empty());
    let destroyed = keys_in_state(&env, "data", "destroyed").await;
    assert!(
        old.iter().all(|k| destroyed.contains(k)),
        "{old:?} destroyed: {destroyed:?}"
    );
    let wrapped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM vault_keys WHERE state = 'destroyed' AND wrapped_key IS NOT NULL",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(wrapped, 0);
    // The quarantined body moved too.
    let quarantine_old = rows_under(
        &env,
        "SELECT count(*) FROM quarantine WHERE data_key_id = ANY($1)",
        &old,
    )
    .await;
    assert_eq!(quarantine_old, 0);

    let status = rotate_keys(&env, &["status"]).await;
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(stdout(&status).contains("destroyed"), "{}", stdout(&status));
    env.cleanup().await;
}

#[tokio::test]
async fn token_key_rotation_while_ingesting_killed_and_rerun_keeps_duplicates_exact() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let first = logins(2_000, 5);
    env.ingest_bodies(&first).await;
    let old = keys_in_state(&env, "token", "active").await;

    let child = common::Running::spawn(
        std::process::Command::new(ROTATE_KEYS)
            .args(["token-key", "--grace-seconds", "0", "--batch-size", "50"])
            .envs(env.binary_env())
            .env("DATABASE_URL", env.url_as("keyadmin")),
    );
    common::within(
        Duration::from_secs(30),
        "the token rotation gets under way",
        || async {
            rows_under(
                &env,
                "SELECT count(*) FROM user_logins WHERE NOT token_key_id = ANY($1)",
                &old,
            )
            .await
                > 100
        },
    )
    .await;
    let ended = child.kill();
    assert!(!ended.status.success(), "killed mid-way, not finished");
    // Meanwhile a query can tell which version each row's token is in.
    let versions: i64 = sqlx::query_scalar("SELECT count(DISTINCT token_key_id) FROM user_logins")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(versions, 2);
    assert_eq!(verify_all(&env).await, 2_000);

    let second = logins(1_000, 6);
    let ingesting = env.drain_with(
        VecSource::slow(&second, Duration::from_millis(10)),
        Duration::from_millis(200),
    );
    let rotating = rotate_keys(
        &env,
        &["token-key", "--grace-seconds", "1", "--batch-size", "200"],
    );
    let (_, rerun) = tokio::join!(ingesting, rotating);
    assert!(rerun.status.success(), "{}", stderr(&rerun));

    assert_eq!(verify_all(&env).await, 3_000);
    assert_eq!(keys_in_state(&env, "token", "retired").await, old);
    let active = keys_in_state(&env, "token", "active").await;
    let under_new = rows_under(
        &env,
        "SELECT count(*) FROM user_logins WHERE token_key_id = ANY($1)",
        &active,
    )
    .await;
    assert_eq!(under_new, 3_000, "every token is in the new version");
    // Equal values have one token again, across old and new rows.
    let devices: BTreeSet<String> = first
        .iter()
        .chain(&second)
        .map(|b| {
            serde_json::from_str::<serde_json::Value>(b).unwrap()["device_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let tokens: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT masked_device_id) FROM user_logins")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(tokens as usize, devices.len());
    env.cleanup().await;
}

#[tokio::test]
async fn rewrap_moves_every_key_to_a_new_kms_key_and_rows_still_open() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&logins(50, 7)).await;
    let old_kms_key = env.kms_key_id.clone();
    let set_old_key_enabled = |enabled: bool| {
        let client = env.kms.client().clone();
        let key = old_kms_key.clone();
        async move {
            if enabled {
                client
                    .enable_key()
                    .key_id(key)
                    .send()
                    .await
                    .expect("EnableKey");
            } else {
                client
                    .disable_key()
                    .key_id(key)
                    .send()
                    .await
                    .expect("DisableKey");
            }
        }
    };
    // Before the rewrap, every key needs the old KMS key: disabled, nothing opens.
    set_old_key_enabled(false).await;
    let keyadmin = env.pool_as("keyadmin").await;
    let refused = unmask::verify_all(&keyadmin, &env.keyring_on(&keyadmin)).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("Disabled")),
        "a disabled KMS key opens nothing: {:?}",
        refused.map_err(|e| e.to_string())
    );
    set_old_key_enabled(true).await;

    let new_kms_key = env.new_kms_key("pii-vault test: rewrap target").await;
    let output = rotate_keys(&env, &["rewrap", "--kms-key-id", &new_kms_key]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).starts_with("re-wrapped 2 keys"),
        "{}",
        stdout(&output)
    );
    let others: i64 = sqlx::query_scalar("SELECT count(*) FROM vault_keys WHERE kms_key_id <> $1")
        .bind(&new_kms_key)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(others, 0);
    // After it, the old KMS key can be disabled: every value still opens.
    set_old_key_enabled(false).await;
    assert_eq!(
        verify_all(&env).await,
        50,
        "every row opens through the new KMS key"
    );
    keyadmin.close().await;
    let again = rotate_keys(&env, &["rewrap", "--kms-key-id", &new_kms_key]).await;
    assert!(
        stdout(&again).contains("nothing to do"),
        "{}",
        stdout(&again)
    );
    env.cleanup().await;
}

#[tokio::test]
async fn erasure_removes_a_user_for_good_and_older_messages_cannot_bring_them_back() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[
        login("u-1", "10.0.0.1", "111"),
        login("u-1", "10.0.0.2", "222"),
        login("u-2", "10.0.0.3", "111"),
        r#"{"user_id": "u-1", "ip": 5}"#.to_owned(),
        r#"{"user_id": "u-2", "ip": 6}"#.to_owned(),
    ])
    .await;
    // A message of u-1 sent before the erasure and still on the queue while it runs.
    env.send(&[login("u-1", "10.0.0.9", "999")]).await;
    let output = rotate_keys(
        &env,
        &[
            "erase",
            "--user-id",
            "u-1",
            "--reason",
            "GDPR art. 17 #88",
            "--actor",
            "dpo",
        ],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output)
            .contains("sealed values of 2 login(s), tokens of 2, 1 quarantined message(s)"),
        "{}",
        stdout(&output)
    );
    assert_eq!(
        what_remains_of(&env, "u-1").await,
        (2, 0, 0),
        "rows stay, values and tokens go"
    );
    assert_eq!(what_remains_of(&env, "u-2").await, (1, 2, 1));
    assert_eq!(
        env.count("quarantine").await,
        1,
        "u-2's quarantined message stays"
    );

    // Delivered after the erasure, sent before it: stored without personal fields.
    env.drain_until_empty(Duration::from_secs(60)).await;
    assert_eq!(what_remains_of(&env, "u-1").await, (3, 0, 0));
    // A login sent after the erasure is new data.
    env.send(&[login("u-1", "10.0.0.10", "1010")]).await;
    env.drain_until_empty(Duration::from_secs(60)).await;
    assert_eq!(what_remains_of(&env, "u-1").await, (4, 2, 1));

    let unmasked = env.run_binary_as(
        "compliance",
        UNMASK,
        &[
            "--user-id",
            "u-1",
            "--purpose",
            "data-subject-access",
            "--reason",
            "check",
            "--format",
            "json",
        ],
    );
    assert_eq!(unmasked.status.code(), Some(0), "{}", stderr(&unmasked));
    let text = stdout(&unmasked);
    assert!(
        text.contains("10.0.0.10") && !text.contains("10.0.0.1\"") && !text.contains("10.0.0.9"),
        "{text}"
    );
    let other = env.run_binary_as(
        "compliance",
        UNMASK,
        &[
            "--user-id",
            "u-2",
            "--purpose",
            "data-subject-access",
            "--reason",
            "check",
        ],
    );
    assert_eq!(other.status.code(), Some(0), "{}", stderr(&other));
    assert!(stdout(&other).contains("10.0.0.3"));

    let audit: Vec<(String, String, i32, Vec<i64>)> = sqlx::query_as(
        "SELECT actor, question, values_revealed, login_ids FROM unmask_audit
         WHERE outcome = 'erased' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].0, "dpo");
    assert_eq!(
        audit[0].1,
        "erase user_id = u-1: sealed values of 2 logins, tokens of 2, 1 quarantined messages"
    );
    assert_eq!((audit[0].2, audit[0].3.len()), (2, 2));
    // The erasure record names the user by token only.
    let records: Vec<String> = sqlx::query_scalar("SELECT user_token FROM erasures")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(records.len(), 1, "one per token key");
    assert!(records.iter().all(|t| t.len() == 64 && !t.contains("u-1")));

    // A legal hold keeps the tokens, and only them.
    let held = rotate_keys(
        &env,
        &[
            "erase",
            "--user-id",
            "u-2",
            "--reason",
            "court order 12",
            "--keep-tokens",
        ],
    )
    .await;
    assert!(held.status.success(), "{}", stderr(&held));
    assert_eq!(what_remains_of(&env, "u-2").await, (1, 2, 0));
    assert_eq!(env.count("quarantine").await, 0);
    let chain = env.run_binary(UNMASK, &["verify-audit"]);
    assert!(chain.status.success(), "{}", stderr(&chain));
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_made_before_an_erasure_is_refused_and_made_again() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let keyring = env.keyring();
    let tokenizer = keyring.active_tokenizer().await.unwrap();
    let sealer = keyring.new_sealer().await.unwrap();
    let made_before = batch::build(
        vec![message("m-1", login("u-1", "10.0.0.1", "111-11-1111"))],
        &tokenizer,
        &sealer,
        &ErasedUsers::default(),
        false,
    );
    let erased = rotate_keys(
        &env,
        &["erase", "--user-id", "u-1", "--reason", "r", "--in-flight"],
    )
    .await;
    assert!(erased.status.success(), "{}", stderr(&erased));
    let outcome = writer::write(&env.pool, &made_before).await;
    assert!(
        matches!(outcome, Err(writer::WriteError::ErasuresChanged)),
        "{outcome:?}"
    );
    assert_eq!(env.count("user_logins").await, 0);
    // Made again with what the ingester now knows: stored, without personal fields.
    let known = ErasedUsers::load(&env.pool, &keyring).await.unwrap();
    let made_after = batch::build(
        vec![message("m-1", login("u-1", "10.0.0.1", "111-11-1111"))],
        &tokenizer,
        &sealer,
        &known,
        false,
    );
    writer::write(&env.pool, &made_after).await.unwrap();
    assert_eq!(what_remains_of(&env, "u-1").await, (1, 0, 0));
    env.cleanup().await;
}

fn message(id: &str, body: String) -> Message {
    Message {
        id: id.to_owned(),
        body: body.into_bytes(),
        sent_at: None,
        receipt: Receipt(id.to_owned()),
        read_at: std::time::Instant::now(),
    }
}

#[tokio::test]
async fn a_writer_waits_for_a_retiring_rotation_and_then_writes_nothing() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let keyring = env.keyring();
    let tokenizer = keyring.active_tokenizer().await.unwrap();
    let sealer = keyring.new_sealer().await.unwrap();
    let data_key = sealer.key_id().0;
    let batch = batch::build(
        vec![message("m-1", login("u-1", "10.0.0.1", "111-11-1111"))],
        &tokenizer,
        &sealer,
        &ErasedUsers::default(),
        false,
    );

    // A rotation retiring the data key holds the key's use lock exclusively...
    let mut rotation = env.pool.begin().await.unwrap();
    key_use::hold_exclusive(&mut rotation, &[data_key])
        .await
        .unwrap();
    // ...so a writer using that key waits for it,
    let pool = env.pool.clone();
    let writing = tokio::spawn(async move { writer::write(&pool, &batch).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!writing.is_finished(), "the writer waits for the rotation");
    sqlx::query("UPDATE vault_keys SET state = 'retired' WHERE id = $1")
        .bind(data_key)
        .execute(&mut *rotation)
        .await
        .unwrap();
    rotation.commit().await.unwrap();
    // ...then sees the key retired and writes nothing.
    let outcome = writing.await.unwrap();
    assert!(
        matches!(outcome, Err(writer::WriteError::KeyRetired)),
        "{outcome:?}"
    );
    assert_eq!(env.count("user_logins").await, 0);
    assert_eq!(env.count("login_vault").await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn key_rows_are_never_deleted_and_vault_rows_follow_their_logins() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let bodies: Vec<String> = (0..6)
        .map(|i| {
            login(
                &format!("u-{}", i % 2),
                &format!("10.0.0.{i}"),
                "111-11-1111",
            )
        })
        .collect();
    env.ingest_bodies(&bodies).await;
    assert_eq!(env.count("login_vault").await, 6);

    let refused = sqlx::query("DELETE FROM vault_keys")
        .execute(&env.pool)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("never deleted"), "{refused}");
    assert!(env.count("vault_keys").await >= 2);

    sqlx::query("DELETE FROM user_logins WHERE user_id = 'u-0'")
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(env.count("user_logins").await, 3);
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM login_vault v
         WHERE NOT EXISTS (SELECT 1 FROM user_logins l WHERE l.id = v.login_id)",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((env.count("login_vault").await, orphans), (3, 0));
    env.cleanup().await;
}

#[tokio::test]
async fn re_sealing_starts_a_new_data_key_every_max_records_values() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&logins(1_000, 31)).await;
    env.ingest_bodies(&["not json".to_owned()]).await;
    let output = rotate_keys(
        &env,
        &[
            "data-key",
            "--grace-seconds",
            "0",
            "--batch-size",
            "100",
            "--data-key-max-records",
            "300",
        ],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let per_key = env.values_per_data_key().await;
    assert!(
        per_key.len() >= 7,
        "2,001 values, at most 300 a key: {per_key:?}"
    );
    assert!(
        per_key.iter().all(|(_, values)| *values <= 300),
        "{per_key:?}"
    );
    assert_eq!(per_key.iter().map(|(_, v)| v).sum::<i64>(), 2_001);
    assert_eq!(verify_all(&env).await, 1_000);
    let status = rotate_keys(&env, &["status", "--data-key-max-records", "300"]).await;
    assert!(status.status.success(), "{}", stderr(&status));
    let text = stdout(&status);
    for (key, values) in &per_key {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&key.to_string()))
            .unwrap_or_else(|| panic!("key {key} in {text}"));
        let columns: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(columns[5], values.to_string(), "{line}");
        assert!(line.contains(" .. "), "a data key shows its window: {line}");
    }
    assert!(
        text.contains("data key limit: 300 values a key\n"),
        "{text}"
    );
    env.cleanup().await;
}

fn date(year: i32, month: u8, day: u8) -> time::Date {
    time::Date::from_calendar_date(year, time::Month::try_from(month).unwrap(), day).unwrap()
}

/// Logins with sealed values, per month of login date.
async fn sealed_per_month(env: &TestEnv, pool: &sqlx::PgPool) -> Vec<(String, i64)> {
    let _ = env;
    sqlx::query_as(
        "SELECT to_char(l.create_date, 'YYYY-MM'), count(*) FROM user_logins l
         JOIN login_vault v ON v.login_id = l.id GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn expiry_shreds_whole_windows_so_earlier_backups_cannot_open_them() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let months = [(2025, 1), (2025, 2), (2025, 3)];
    let mut window_kms_keys = Vec::new();
    for (year, month) in months {
        let arn = env.new_kms_key("pii-vault test: retention window").await;
        let label = format!("{year}-{month:02}");
        let output = rotate_keys(&env, &["window", "--month", &label, "--key", &arn]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        window_kms_keys.push(arn);
    }
    let mid_month = |(year, month): (i32, u8)| {
        date(year, month, 15)
            .with_hms(12, 0, 0)
            .unwrap()
            .assume_utc()
    };
    let january = mid_month(months[0]);
    env.drain_from(VecSource::sent_at(&logins(600, 41), january))
        .await;
    env.drain_from(VecSource::sent_at(&["not json".to_owned()], january))
        .await;
    env.drain_from(VecSource::sent_at(&logins(300, 42), mid_month(months[1])))
        .await;
    env.drain_from(VecSource::sent_at(&logins(300, 43), mid_month(months[2])))
        .await;
    env.ingest_bodies(&logins(50, 44)).await;
    let this_month = time::OffsetDateTime::now_utc().date().to_string()[..7].to_owned();
    let before = vec![
        ("2025-01".to_owned(), 600),
        ("2025-02".to_owned(), 300),
        ("2025-03".to_owned(), 300),
        (this_month.clone(), 50),
    ];
    assert_eq!(sealed_per_month(&env, &env.pool).await, before);
    // Each window's values are under data keys wrapped by the window's own KMS key.
    let misplaced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM login_vault v JOIN user_logins l ON l.id = v.login_id
         JOIN vault_keys k ON k.id = v.data_key_id
         LEFT JOIN retention_windows w ON w.starts = date_trunc('month', l.create_date)::date
         WHERE k.kms_key_id IS DISTINCT FROM coalesce(w.kms_key_id, k.kms_key_id)
            OR k.window_starts IS DISTINCT FROM w.starts",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(misplaced, 0);

    // A backup taken before the expiry.
    let dump = std::env::temp_dir().join(format!("{}.sql", env.database_name));
    // pg_dump comes with PostgreSQL's client, which scripts/services installs.
    let dumped = common::output_of(std::process::Command::new("pg_dump").args([
        "--file",
        dump.to_str().unwrap(),
        &env.database_url,
    ]));
    assert!(dumped.status.success(), "{}", stderr(&dumped));

    // January ends on 2025-02-01: the horizon that expires it and nothing later.
    let days = (time::OffsetDateTime::now_utc().date() - date(2025, 2, 1)).whole_days();
    let older_than = format!("{days}d");
    let dry = rotate_keys(&env, &["expire", "--older-than", &older_than]).await;
    assert!(dry.status.success(), "{}", stderr(&dry));
    let plan = stdout(&dry);
    assert!(
        plan.contains("would expire window 2025-01")
            && plan.contains(
                "600 login(s) with their tokens and sealed values, 1 quarantined message(s)"
            )
            && !plan.contains("2025-02 ("),
        "{plan}"
    );
    assert_eq!(
        sealed_per_month(&env, &env.pool).await,
        before,
        "a dry run changes nothing"
    );

    // kill -9 while the door waits to drop January: an analyst's open transaction has read
    // the logins, so the door's lock waits (2 s at a time, then asked again). Its transaction
    // has deleted January's quarantined body already; killed, none of it commits.
    let analyst = env.pool_as("analyst").await;
    let mut reading = analyst.begin().await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins")
        .fetch_one(&mut *reading)
        .await
        .unwrap();
    let expiry = || {
        common::Running::spawn(
            std::process::Command::new(ROTATE_KEYS)
                .args(["expire", "--older-than", &older_than, "--apply"])
                .args(["--grace-seconds", "0"])
                .envs(env.binary_env())
                .env("DATABASE_URL", env.url_as("keyadmin")),
        )
    };
    let expiring = expiry();
    common::until_blocked(
        &env,
        "keyadmin",
        "the door waits for the analyst's transaction",
    )
    .await;
    let awaited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks
          WHERE NOT granted AND mode = 'AccessExclusiveLock'
            AND relation = 'user_logins'::regclass",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        awaited, 1,
        "it waits to drop, inside the door's transaction"
    );
    let ended = expiring.kill();
    assert!(
        !ended.status.success(),
        "killed while waiting, not finished"
    );
    // The server goes on with the statement of a killed client: the door's lock timeout ends
    // it, rolled back, before the analyst lets go.
    common::within(
        Duration::from_secs(10),
        "the killed expiry's session ends",
        || async {
            let sessions: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND usename = 'keyadmin'",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap();
            sessions == 0
        },
    )
    .await;
    reading.rollback().await.unwrap();
    assert_eq!(
        sealed_per_month(&env, &env.pool).await,
        before,
        "killed before its drop committed: nothing went"
    );
    assert_eq!(env.count("quarantine").await, 1, "nor the quarantined body");

    // kill -9 after the drop committed, while it waits to retire January's data keys: an
    // ingester holds them for a batch.
    let ingester = env.pool_as("ingester").await;
    let mut batch = ingester.begin().await.unwrap();
    let januarys_data_keys: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM vault_keys WHERE window_starts = '2025-01-01'")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    key_use::hold_shared(&mut batch, &januarys_data_keys)
        .await
        .unwrap();
    let expiring = expiry();
    common::until_blocked(
        &env,
        "keyadmin",
        "the expiry waits for the ingester's batch",
    )
    .await;
    let january_gone: (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT to_regclass('user_logins_2025_01')::text, to_regclass('login_vault_2025_01')::text",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(january_gone, (None, None), "January's partitions dropped");
    let ended = expiring.kill();
    assert!(
        !ended.status.success(),
        "killed while waiting, not finished"
    );
    batch.rollback().await.unwrap();
    let state: String =
        sqlx::query_scalar("SELECT state FROM retention_windows WHERE starts = '2025-01-01'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(state, "expiring", "killed before the keys were destroyed");

    let rerun = rotate_keys(&env, &["expire", "--older-than", &older_than, "--apply"]).await;
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    assert!(
        stdout(&rerun).contains("expired window 2025-01"),
        "{}",
        stdout(&rerun)
    );
    assert_eq!(
        sealed_per_month(&env, &env.pool).await,
        before[1..].to_vec()
    );
    assert_eq!(
        env.count("quarantine").await,
        0,
        "January's quarantined body went too"
    );
    let january_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE create_date < '2025-02-01'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(january_rows, 0, "the analysts' rows went with the month");
    let january_keys: Vec<(String, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT state, wrapped_key FROM vault_keys WHERE window_starts = '2025-01-01'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(!january_keys.is_empty());
    assert!(
        january_keys
            .iter()
            .all(|(state, bytes)| state == "destroyed" && bytes.is_none())
    );
    let kms_state = env
        .kms
        .client()
        .describe_key()
        .key_id(&window_kms_keys[0])
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .key_state
        .unwrap();
    assert_eq!(kms_state, aws_sdk_kms::types::KeyState::PendingDeletion);
    let audited: Vec<(String, i32, Vec<i64>)> = sqlx::query_as(
        "SELECT question, values_revealed, login_ids FROM unmask_audit
         WHERE outcome = 'expired' AND db_user = 'keyadmin'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(audited.len(), 1, "one audit row for the month: {audited:?}");
    let (question, values, ids) = &audited[0];
    assert!(
        question.contains("dropped the month's 600 logins") && question.contains("1 quarantined"),
        "{question}"
    );
    assert_eq!((*values, ids.len()), (600, 0), "counted, not listed");
    assert_eq!(
        verify_all(&env).await,
        650,
        "the other windows still open; January's 600 logins are gone"
    );

    // The backup, restored: January no longer opens, February does.
    let restored = Scratch::empty().await;
    // The door functions are owned by pii_vault_door: the restore runs in a window in which
    // the role administrator lends the owner that role, and pii_vault_door needs CREATE on
    // the schema (as while they were migrated). README, "Migrating a deployment".
    let role_admin = common::role_admin().await;
    let window = pii_vault::db::MigrationWindow::open(&role_admin, &env.pool)
        .await
        .unwrap();
    let psql = |args: &[&str]| {
        let output = common::output_of(
            std::process::Command::new("psql")
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
                .args(args)
                .arg(&restored.database_url),
        );
        assert!(output.status.success(), "{}", stderr(&output));
    };
    psql(&["-c", "GRANT CREATE ON SCHEMA public TO pii_vault_door"]);
    psql(&["-f", dump.to_str().unwrap()]);
    psql(&["-c", "REVOKE CREATE ON SCHEMA public FROM pii_vault_door"]);
    window.close().await.unwrap();
    role_admin.close().await;
    let restored_admin = restored.pool_as("keyadmin").await;
    let keyring = env.keyring_on(&restored_admin);
    let key_of = |month: &'static str| {
        let pool = restored_admin.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT v.data_key_id FROM login_vault v JOIN user_logins l ON l.id = v.login_id
                 WHERE to_char(l.create_date, 'YYYY-MM') = $1 LIMIT 1",
            )
            .bind(month)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let january_key = key_of("2025-01").await;
    let refused = keyring.sealer(pii_vault::vault::KeyId(january_key)).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("KMS refused")),
        "the backup's January data key no longer unwraps: {:?}",
        refused.map(|_| ()).map_err(|e| e.to_string())
    );
    let february_key = key_of("2025-02").await;
    keyring
        .sealer(pii_vault::vault::KeyId(february_key))
        .await
        .expect("February still unwraps");
    restored_admin.close().await;
    restored.drop().await;
    let _ = std::fs::remove_file(&dump);

    // January logins that arrive now are not stored: quarantined without their bodies.
    let late = env
        .drain_from(VecSource::sent_at(&logins(5, 45), january))
        .await;
    assert_eq!((late.stored, late.quarantined), (0, 5), "{late}");
    let january_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE create_date < '2025-02-01'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(january_rows, 0, "five late logins, none stored");
    env.cleanup().await;
}

#[tokio::test]
async fn a_rotation_under_a_running_ingester_refuses_its_batches_and_sqs_brings_them_back() {
    let env = TestEnv::new(2).await;
    env.init_token_key().await;
    let generate = |count, seed| {
        let mut generator = Generator::new(seed, 0.0, 0.1);
        let messages: Vec<_> = (0..count).map(|_| generator.next_message()).collect();
        let malformed = messages.iter().filter(|m| m.malformed).count();
        (
            messages.into_iter().map(|m| m.body).collect::<Vec<_>>(),
            malformed,
        )
    };
    // The ingester checks key states only once an hour: it can learn of the rotation only
    // by having a batch refused.
    let replica = common::Replica::spawn(
        &env,
        INGEST,
        &[
            "--flush-ms",
            "20",
            "--batch-size",
            "20",
            "--wait-seconds",
            "1",
            "--key-check-seconds",
            "3600",
        ],
    );
    let (before, malformed_before) = generate(400, 51);
    env.send(&before).await;
    common::within(
        Duration::from_secs(60),
        "the first messages are stored",
        || async {
            (env.count("user_logins").await + env.count("quarantine").await) as usize
                == before.len()
        },
    )
    .await;
    let old = keys_in_state(&env, "data", "active").await;

    let rotated = rotate_keys(&env, &["data-key", "--grace-seconds", "0"]).await;
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    let retired = keys_in_state(&env, "data", "retired").await;
    assert!(
        old.iter().all(|k| retired.contains(k)),
        "the ingester's key is retired: {old:?} {retired:?}"
    );
    // Sent after the rotation: the ingester seals them under its retired key, the writer
    // refuses the batch, and the messages come back to be sealed under a new one.
    let (after, malformed_after) = generate(200, 52);
    env.send(&after).await;
    let total = before.len() + after.len();
    common::within(
        Duration::from_secs(90),
        "every message is stored",
        || async {
            (env.count("user_logins").await + env.count("quarantine").await) as usize == total
        },
    )
    .await;
    let refused = replica
        .counter(pii_vault::telemetry::LEFT_ON_QUEUE)
        .await
        .unwrap_or_default();
    assert!(
        refused > 0.0,
        "a batch under the retired key was refused and redelivered"
    );
    common::terminate_pid(replica.pid());
    let ended = replica.wait(Duration::from_secs(30));
    assert!(ended.status.success(), "{}", ended.stderr);
    assert!(
        ended.stderr.contains("retired by a rotation"),
        "{}",
        ended.stderr
    );

    let (rows, users, under_old): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT l.user_id),
                count(*) FILTER (WHERE v.data_key_id = ANY($1))
         FROM user_logins l JOIN login_vault v ON v.login_id = l.id",
    )
    .bind(&old)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let valid = (total - malformed_before - malformed_after) as i64;
    assert_eq!(
        (rows, users, under_old),
        (valid, valid, 0),
        "each once, none under the old key"
    );
    // Quarantined bodies were re-sealed too, and open under their new keys.
    let keyadmin = env.pool_as("keyadmin").await;
    let verified = unmask::verify_all(&keyadmin, &env.keyring_on(&keyadmin))
        .await
        .expect("everything opens");
    keyadmin.close().await;
    assert_eq!(
        (verified.logins, verified.bodies),
        (valid as u64, (malformed_before + malformed_after) as u64)
    );
    // status counts what each key protects.
    let status = rotate_keys(&env, &["status"]).await;
    let text = stdout(&status);
    for (key, values) in env.values_per_data_key().await {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&key.to_string()))
            .unwrap_or_else(|| panic!("key {key} in {text}"));
        assert_eq!(
            line.split_whitespace().nth(5),
            Some(values.to_string().as_str()),
            "{line}"
        );
    }
    env.cleanup().await;
}

#[tokio::test]
async fn commands_with_nothing_to_do_say_so_and_exit_0() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    for (args, says) in [
        (&["data-key", "--grace-seconds", "0"][..], "nothing to do"),
        (&["expire", "--older-than", "400d"][..], "nothing to expire"),
        (
            &["expire", "--older-than", "400d", "--apply"][..],
            "nothing to expire",
        ),
        (&["verify"][..], "all 0 logins and 0 quarantined bodies"),
    ] {
        let output = rotate_keys(&env, args).await;
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stdout(&output).contains(says),
            "{args:?}: {}",
            stdout(&output)
        );
    }
    env.cleanup().await;
}
