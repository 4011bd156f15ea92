//! The vault's lifecycle operations at size, against the local services
//! (`scripts/services up`): `verify-audit` over 100,000 audit rows, without and with the
//! witness (after an `audit-checkpoint`: KMS signs, S3 witnesses), `erase` of a user with
//! 10,000 logins, `expire` of a retention window holding 1,000,000 logins, and an ingest
//! batch's locks while a login without roles holds all it can.
//!
//! Rows are seeded in SQL (the operations measured never open a value, so synthetic sealed
//! bytes serve), audit rows through the reveal door itself.
//!
//! Run: `cargo bench --bench lifecycle [-- --expire-count N]`

#[path = "../tests/integration/common/mod.rs"]
#[allow(dead_code)] // the tests' set-up, of which a bench uses a part
mod common;

use std::time::{Duration, Instant};

use pii_vault::audit::{self, CheckpointKey};
use pii_vault::lifecycle::{self, Erasure, Expiry};

/// `count` logins of `user` dated `date`, with a data key of `window` (if any), in SQL.
async fn seed(env: &common::TestEnv, user_sql: &str, count: i64, date: &str, window: Option<&str>) {
    let token_key: i64 = sqlx::query_scalar("SELECT id FROM vault_keys WHERE purpose = 'token'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let data_key: i64 = sqlx::query_scalar(
        "INSERT INTO vault_keys (purpose, kms_key_id, wrapped_key, created_by, window_starts)
         VALUES ('data', $1, '\\x00', 'bench', $2::date) RETURNING id",
    )
    .bind(&env.kms_key_id)
    .bind(window)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "WITH logins AS (
             INSERT INTO user_logins (user_id, device_type, masked_ip, masked_device_id, locale,
                                      app_version, create_date, message_id, token_key_id,
                                      app_version_text)
             SELECT {user_sql}, 'ios', md5(i::text) || md5(i::text), md5((-i)::text) || md5((-i)::text),
                    NULL, 1000000, $1::date, message_key('bench-' || $2::text || '-' || i), $3, '1.0'
             FROM generate_series(1, $4::int8) AS i
             RETURNING id, create_date)
         INSERT INTO login_vault (login_id, data_key_id, sealed_ip, sealed_device_id, create_date)
         SELECT id, $5, decode(repeat('ab', 36), 'hex'), decode(repeat('cd', 39), 'hex'),
                create_date
         FROM logins"
    ))
    .bind(date)
    .bind(data_key)
    .bind(token_key)
    .bind(count)
    .bind(data_key)
    .execute(&env.pool)
    .await
    .unwrap();
}

/// Median microseconds of a batch's lock transaction as the ingester, without and with an
/// attacker.
async fn batch_lock_waits(env: &common::TestEnv) -> (f64, f64) {
    let ingester = env.pool_as("ingester").await;
    let keys: Vec<i64> = sqlx::query_scalar("SELECT id FROM vault_keys ORDER BY id LIMIT 2")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    let median = || async {
        let mut micros = Vec::new();
        for _ in 0..1_000 {
            let started = Instant::now();
            let mut tx = ingester.begin().await.unwrap();
            sqlx::query("SELECT vault_hold_keys($1)")
                .bind(&keys)
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::query("SELECT vault_hold_erasures()")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            micros.push(started.elapsed().as_secs_f64() * 1e6);
        }
        micros.sort_by(f64::total_cmp);
        micros[micros.len() / 2]
    };
    let alone = median().await;
    let nobody = env.pool_as("nobody").await;
    let mut attacker = nobody.acquire().await.unwrap();
    common::hold_what_a_login_can(&mut attacker, &keys).await;
    let attacked = median().await;
    sqlx::query("ROLLBACK")
        .execute(&mut *attacker)
        .await
        .unwrap();
    drop(attacker);
    nobody.close().await;
    ingester.close().await;
    (alone, attacked)
}

#[tokio::main]
async fn main() {
    let audit_rows = common::bench_arg("--audit-rows", 100_000) as i64;
    let erase_logins = common::bench_arg("--erase-logins", 10_000) as i64;
    let expire_count = common::bench_arg("--expire-count", 1_000_000) as i64;
    let env = common::TestEnv::new(30).await;
    env.init_token_key().await;

    // verify-audit: rows appended by the door, as psql or unmask would.
    let compliance = env.pool_as("compliance").await;
    sqlx::query(
        "SELECT count(*) FROM generate_series(1, $1::int8) AS i,
             LATERAL vault_reveal_request('user_id', 'nobody-' || i, 'security-incident', 'bench', 'bench')",
    )
    .bind(audit_rows)
    .execute(&compliance)
    .await
    .unwrap();
    let started = Instant::now();
    let intact = audit::verify(&compliance, None, None).await.unwrap();
    let verify_seconds = started.elapsed().as_secs_f64();
    assert_eq!(intact.rows as i64, audit_rows);
    // verify-audit --witness: after a checkpoint signed and witnessed, as the signer runs it.
    let signer = CheckpointKey {
        client: env.kms.client().clone(),
        key_id: env.audit_signing_key_id.clone(),
    };
    let witness = env.witness().await;
    let signed = signer.checkpoint(&compliance, &witness).await.unwrap();
    assert_eq!(signed.checkpoint.and_then(|c| c.seq), Some(1));
    let public = signer.verifying_key().await.unwrap();
    let started = Instant::now();
    let intact = audit::verify_with_witness(&compliance, &public, &witness, None)
        .await
        .unwrap();
    let witness_seconds = started.elapsed().as_secs_f64();
    assert_eq!((intact.rows as i64, intact.checkpoints), (audit_rows, 1));
    assert!(intact.witnessed.is_some());
    compliance.close().await;

    // erase: one user with many logins.
    seed(&env, "'bench-erased'", erase_logins, "2026-01-15", None).await;
    let keyadmin = env.pool_as("keyadmin").await;
    let keyring = env.keyring_on(&keyadmin);
    let started = Instant::now();
    let erased = lifecycle::erase(
        &keyadmin,
        &keyring,
        &Erasure::of("bench-erased", "bench", "bench"),
        None,
    )
    .await
    .unwrap();
    let erase_seconds = started.elapsed().as_secs_f64();
    assert_eq!(erased.logins as i64, erase_logins);

    // expire: one window of many logins.
    let window_key = env.new_kms_key("pii-vault bench: retention window").await;
    sqlx::query(
        "INSERT INTO retention_windows (starts, ends, kms_key_id)
         VALUES ('2025-01-01', '2025-02-01', $1)",
    )
    .bind(&window_key)
    .execute(&keyadmin)
    .await
    .unwrap();
    seed(
        &env,
        "'u-' || i",
        expire_count,
        "2025-01-15",
        Some("2025-01-01"),
    )
    .await;
    sqlx::query("ANALYZE").execute(&env.pool).await.unwrap();
    let horizon = time::Date::from_calendar_date(2025, time::Month::February, 1).unwrap();
    let expiry = Expiry {
        horizon,
        apply: true,
        grace: Duration::ZERO,
    };
    let started = Instant::now();
    let report = lifecycle::expire(&keyadmin, &keyring, &expiry, &())
        .await
        .unwrap();
    let expire_seconds = started.elapsed().as_secs_f64();
    assert!(report[0].applied);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM login_vault")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    keyadmin.close().await;

    // An ingest batch's locks (the key-use rows and the erasure gate), taken as the ingester
    // does, alone and while a login without roles holds everything it can.
    let (alone, attacked) = batch_lock_waits(&env).await;

    println!(
        "ingest batch locks (key use + erasure gate): median {alone:.0} us alone, {attacked:.0} us while a login without roles holds every advisory lock the vault once used and an open transaction that knocked on the reveal door"
    );
    println!(
        "verify-audit --witness over {audit_rows} rows: {witness_seconds:.2} s ({:.0} audit rows verified per second with the witness)",
        audit_rows as f64 / witness_seconds
    );
    println!(
        "verify-audit over {audit_rows} rows: {verify_seconds:.2} s; erase of a user with {erase_logins} logins: {erase_seconds:.2} s; expire of {expire_count} logins: {expire_seconds:.1} s ({:.0} rows/s)",
        expire_count as f64 / expire_seconds
    );
    println!(
        "{{\"verify_audit_rows\": {audit_rows}, \"verify_audit_s\": {verify_seconds:.3}, \"verify_audit_witness_s\": {witness_seconds:.3}, \"erase_logins\": {erase_logins}, \"erase_s\": {erase_seconds:.3}, \"expire_logins\": {expire_count}, \"expire_s\": {expire_seconds:.2}, \"expire_rows_per_s\": {:.0}}}",
        expire_count as f64 / expire_seconds
    );
    env.cleanup().await;
}
