//! Erasures that last, over real PostgreSQL, KMS and S3: `erase` refuses an id that names
//! nothing and has a dry run; an erasure survives a token-key rotation that destroys the old
//! key (ingest runs on, the person stays erased, their quarantined messages are still found);
//! the database refuses to destroy a key anything names; and a dump taken before an erasure,
//! restored, forgets that person again once `rotate-keys reapply-erasures` has run.

use std::process::Output;

use time::OffsetDateTime;

use crate::common::{self, TestEnv, login, rotate_keys, stderr, stdout, what_remains_of};
use pii_vault::vault::erasure::WitnessedErasure;

const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");

/// A rejected body naming `user` (an unexpected field `extra`).
fn rejected(user: &str) -> String {
    format!(r#"{{"user_id": "{user}", "ip": "10.9.9.9", "device_id": "999-99-9999", "extra": 1}}"#)
}

/// rotate-keys as the key admin against `database_url`, with `env`'s other settings.
async fn rotate_keys_on(env: &TestEnv, database_url: &str, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(ROTATE_KEYS);
    command
        .args(args)
        .envs(env.binary_env())
        .env("DATABASE_URL", database_url);
    tokio::task::spawn_blocking(move || common::output_of(&mut command))
        .await
        .unwrap()
}

/// Audit rows of erasures (unwrapping the token keys to compute the records is audited too).
async fn audit_rows(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM unmask_audit WHERE purpose = 'erasure'")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn witnessed(env: &TestEnv) -> Vec<String> {
    let mut names: Vec<String> = env
        .witness()
        .await
        .versions_under("erasures/")
        .await
        .unwrap()
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    names.dedup();
    names
}

async fn key_state(env: &TestEnv, key: i64) -> String {
    sqlx::query_scalar("SELECT state FROM vault_keys WHERE id = $1")
        .bind(key)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// The time of the only erasure.
async fn erased_at(pool: &sqlx::PgPool) -> OffsetDateTime {
    sqlx::query_scalar("SELECT DISTINCT erased_at FROM erasures")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `token-key --destroy-retired`, without a grace period; asserts it succeeded.
async fn rotate_token_key_destroying(env: &TestEnv) -> Output {
    let rotated = rotate_keys(
        env,
        &["token-key", "--grace-seconds", "0", "--destroy-retired"],
    )
    .await;
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    rotated
}

async fn active_token_key(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT id FROM vault_keys WHERE purpose = 'token' AND state = 'active'")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn erase_refuses_an_id_that_names_nothing_and_a_dry_run_changes_nothing() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[
        login("u-1", "10.0.0.1", "111-11-1111"),
        login("u-1", "10.0.0.2", "111-11-1112"),
    ])
    .await;
    let audit_before = audit_rows(&env.pool).await;

    // A typo: refused, nothing recorded, nothing audited.
    let typo = rotate_keys(&env, &["erase", "--user-id", "u-l", "--reason", "ticket 4"]).await;
    assert_eq!(typo.status.code(), Some(6), "{}", stdout(&typo));
    assert!(
        stderr(&typo).contains("nothing was erased") && stderr(&typo).contains("--in-flight"),
        "{}",
        stderr(&typo)
    );
    assert_eq!(env.count("erasures").await, 0);

    // The dry run says what would go, and changes, audits and witnesses nothing.
    let dry = rotate_keys(
        &env,
        &[
            "erase",
            "--user-id",
            "u-1",
            "--reason",
            "ticket 4",
            "--dry-run",
        ],
    )
    .await;
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(
        stdout(&dry).contains(
            "would erase user u-1: sealed values of 2 login(s), tokens of 2, 0 quarantined message(s); dry run: nothing changed"
        ),
        "{}",
        stdout(&dry)
    );
    assert_eq!(what_remains_of(&env, "u-1").await, (2, 4, 2));
    assert_eq!(env.count("erasures").await, 0);
    assert_eq!(audit_rows(&env.pool).await, audit_before);
    assert!(witnessed(&env).await.is_empty());
    // A dry run of a typo is refused as the erasure would be.
    let dry_typo = rotate_keys(
        &env,
        &["erase", "--user-id", "u-l", "--reason", "r", "--dry-run"],
    )
    .await;
    assert_eq!(dry_typo.status.code(), Some(6));

    // Told the messages are still in flight, the erasure is recorded (and witnessed).
    let in_flight = rotate_keys(
        &env,
        &[
            "erase",
            "--user-id",
            "u-9",
            "--reason",
            "ticket 5",
            "--in-flight",
        ],
    )
    .await;
    assert!(in_flight.status.success(), "{}", stderr(&in_flight));
    assert_eq!(env.count("erasures").await, 1);
    assert_eq!(audit_rows(&env.pool).await, audit_before + 1);
    assert_eq!(witnessed(&env).await.len(), 1);
    // The real one.
    let done = rotate_keys(&env, &["erase", "--user-id", "u-1", "--reason", "ticket 4"]).await;
    assert!(done.status.success(), "{}", stderr(&done));
    assert_eq!(what_remains_of(&env, "u-1").await, (2, 0, 0));
    env.cleanup().await;
}

#[tokio::test]
async fn an_erasure_survives_a_token_key_rotation_that_destroys_the_old_key() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let summary = env
        .ingest_bodies(&[
            login("u-1", "10.0.0.1", "111-11-1111"),
            login("u-2", "10.0.0.2", "222-22-2222"),
            rejected("u-3"),
        ])
        .await;
    assert_eq!((summary.stored, summary.quarantined), (2, 1));
    let old_key = active_token_key(&env.pool).await;
    let erased = rotate_keys(&env, &["erase", "--user-id", "u-1", "--reason", "ticket 1"]).await;
    assert!(erased.status.success(), "{}", stderr(&erased));
    let erased_at = erased_at(&env.pool).await;

    let rotated = rotate_token_key_destroying(&env).await;
    let new_key = active_token_key(&env.pool).await;
    assert_ne!(new_key, old_key);
    let old_state = key_state(&env, old_key).await;
    assert_eq!(old_state, "destroyed", "{}", stdout(&rotated));
    // The record and the quarantined message's link moved to the new key, the time kept.
    let records: Vec<(i64, OffsetDateTime)> =
        sqlx::query_as("SELECT token_key_id, erased_at FROM erasures")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(records, vec![(new_key, erased_at)]);
    let quarantine_keys: Vec<Option<i64>> =
        sqlx::query_scalar("SELECT token_key_id FROM quarantine")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(quarantine_keys, vec![Some(new_key)]);

    // Ingest runs on, and a message of u-1 sent before the erasure stays without personal
    // fields; one of u-2 is stored as usual.
    let late = common::VecSource::sent_at(
        &[login("u-1", "10.0.0.3", "111-11-1113")],
        erased_at - time::Duration::minutes(5),
    );
    let summary = env.drain_from(late).await;
    assert_eq!(summary.stored, 1);
    assert_eq!(what_remains_of(&env, "u-1").await, (2, 0, 0));
    let summary = env
        .ingest_bodies(&[login("u-2", "10.0.0.4", "222-22-2223")])
        .await;
    assert_eq!(summary.stored, 1);
    assert_eq!(what_remains_of(&env, "u-2").await, (2, 4, 2));
    let verified = rotate_keys(&env, &["verify"]).await;
    assert!(verified.status.success(), "{}", stderr(&verified));

    // u-3's quarantined message is still found by an erasure under the new key.
    let erased = rotate_keys(&env, &["erase", "--user-id", "u-3", "--reason", "ticket 2"]).await;
    assert!(erased.status.success(), "{}", stderr(&erased));
    assert!(
        stdout(&erased).contains("1 quarantined message(s)"),
        "{}",
        stdout(&erased)
    );
    assert_eq!(env.count("quarantine").await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn the_database_refuses_to_destroy_a_key_that_something_names() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[login("u-1", "10.0.0.1", "111-11-1111")])
        .await;
    let (token_key, data_key): (i64, i64) = sqlx::query_as(
        "SELECT l.token_key_id, v.data_key_id FROM user_logins l JOIN login_vault v ON v.login_id = l.id",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    // As the key admin with psql, and as the table owner: both keys are named by the login.
    for pool in [env.pool_as("keyadmin").await, env.pool.clone()] {
        for key in [token_key, data_key] {
            let refused = sqlx::query(
                "UPDATE vault_keys SET state = 'destroyed', wrapped_key = NULL WHERE id = $1",
            )
            .bind(key)
            .execute(&pool)
            .await
            .unwrap_err();
            assert!(
                refused.to_string().contains("cannot be destroyed"),
                "{refused}"
            );
        }
    }
    // An erasure record made before migration 0014 (no sealed id: it cannot be carried to a
    // new key) keeps its key from being destroyed by a rotation, which retires it and says so.
    let erased = rotate_keys(
        &env,
        &["erase", "--user-id", "u-7", "--reason", "r", "--in-flight"],
    )
    .await;
    assert!(erased.status.success(), "{}", stderr(&erased));
    sqlx::query("UPDATE erasures SET sealed_user_id = NULL")
        .execute(&env.pool)
        .await
        .unwrap();
    let rotated = rotate_token_key_destroying(&env).await;
    let state = key_state(&env, token_key).await;
    assert_eq!(state, "retired", "{}", stdout(&rotated));
    let refused =
        sqlx::query("UPDATE vault_keys SET state = 'destroyed', wrapped_key = NULL WHERE id = $1")
            .bind(token_key)
            .execute(&env.pool)
            .await
            .unwrap_err();
    assert!(
        refused.to_string().contains("cannot be destroyed"),
        "{refused}"
    );
    // Ingest still honours the record under the kept key: a message sent before the erasure
    // keeps no personal fields.
    let erased_at = erased_at(&env.pool).await;
    let late = common::VecSource::sent_at(
        &[login("u-7", "10.0.0.7", "777-77-7777")],
        erased_at - time::Duration::minutes(1),
    );
    let summary = env.drain_from(late).await;
    assert_eq!(summary.stored, 1);
    assert_eq!(what_remains_of(&env, "u-7").await, (1, 0, 0));
    env.cleanup().await;
}

#[tokio::test]
async fn an_erasure_whose_witness_write_failed_is_witnessed_by_witness_erasures() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[login("u-1", "10.0.0.1", "111-11-1111")])
        .await;
    let mut command = std::process::Command::new(ROTATE_KEYS);
    command
        .args(["erase", "--user-id", "u-1", "--reason", "ticket 3"])
        .envs(env.binary_env())
        .env("DATABASE_URL", env.url_as("keyadmin"))
        .env("AUDIT_WITNESS_BUCKET", "pii-vault-no-such-bucket");
    let failed = common::output_of(&mut command);
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        stderr(&failed).contains("erasure witness"),
        "{}",
        stderr(&failed)
    );
    // The erasure itself committed: the witness comes after it, and is caught up.
    assert_eq!(what_remains_of(&env, "u-1").await, (1, 0, 0));
    assert!(witnessed(&env).await.is_empty());
    let caught_up = rotate_keys(&env, &["witness-erasures"]).await;
    assert!(caught_up.status.success(), "{}", stderr(&caught_up));
    assert!(
        stdout(&caught_up).contains("witnessed 1 erasure(s)"),
        "{}",
        stdout(&caught_up)
    );
    let again = rotate_keys(&env, &["witness-erasures"]).await;
    assert!(
        stdout(&again).contains("witnessed 0 erasure(s)")
            && stdout(&again).contains("1 already there"),
        "{}",
        stdout(&again)
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_restored_dump_forgets_again_once_the_witnessed_erasures_are_reapplied() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[
        login("u-1", "10.0.0.1", "111-11-1111"),
        login("u-1", "10.0.0.2", "111-11-1112"),
        login("u-2", "10.0.0.3", "222-22-2222"),
    ])
    .await;
    let dump = env.dump();
    let erased = rotate_keys(&env, &["erase", "--user-id", "u-1", "--reason", "ticket 8"]).await;
    assert!(erased.status.success(), "{}", stderr(&erased));
    let erased_at = erased_at(&env.pool).await;
    // The witness holds the erasure, its time, and no user id in clear.
    let names = witnessed(&env).await;
    assert_eq!(names, vec![WitnessedErasure::name_of(erased_at)]);
    let object = env.witness().await.get(&names[0]).await.unwrap();
    assert!(!String::from_utf8_lossy(&object).contains("u-1"));

    let restored = env.restore(&dump).await;
    std::fs::remove_file(&dump).unwrap();
    let owner = pii_vault::db::connect(&restored.database_url, 2)
        .await
        .unwrap();
    let sealed_of_u1 = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(v.login_id) FROM user_logins l JOIN login_vault v ON v.login_id = l.id
             WHERE l.user_id = 'u-1'",
        )
        .fetch_one(&owner)
        .await
        .unwrap()
    };
    assert_eq!(sealed_of_u1().await, 2, "the dump predates the erasure");

    let keyadmin_url = restored.url_as("keyadmin");
    let reapplied = rotate_keys_on(&env, &keyadmin_url, &["reapply-erasures"]).await;
    assert!(reapplied.status.success(), "{}", stderr(&reapplied));
    assert!(
        stdout(&reapplied).contains("re-applied 1 witnessed erasure(s)"),
        "{}",
        stdout(&reapplied)
    );
    assert_eq!(sealed_of_u1().await, 0);
    let (tokens, at): (i64, OffsetDateTime) = sqlx::query_as(
        "SELECT (SELECT count(masked_ip) FROM user_logins WHERE user_id = 'u-1'),
                (SELECT erased_at FROM erasures)",
    )
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!((tokens, at), (0, erased_at), "re-applied at its first time");
    // The rest of the restored database still opens; a second run finds nothing to do.
    let verified = rotate_keys_on(&env, &keyadmin_url, &["verify"]).await;
    assert!(verified.status.success(), "{}", stderr(&verified));
    let again = rotate_keys_on(&env, &keyadmin_url, &["reapply-erasures"]).await;
    assert!(
        stdout(&again).contains("re-applied 0 witnessed erasure(s) (audited); 1 already"),
        "{}",
        stdout(&again)
    );
    owner.close().await;
    restored.drop().await;
    env.cleanup().await;
}
