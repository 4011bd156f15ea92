//! The doors' seams, attacked from outside as psql would: the caller's own transaction around a
//! door, every isolation level, the key admin's direct writes, locks any login can take, and
//! inputs of any size. Each test performs the attack and shows what it gets now.

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};

use crate::common::{self, TestEnv, hold_what_a_login_can, login, stderr, stdout, three_logins};
use pii_vault::lifecycle::Erasure;
use pii_vault::{db, lifecycle};

const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");

/// Step one of a reveal of u-1, on `conn`.
async fn request_reveal<'c, E: sqlx::PgExecutor<'c>>(conn: E, reason: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT vault_reveal_request('user_id', 'u-1', 'legal-request', $1, 'mallory')",
    )
    .bind(reason)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// Every (outcome, login ids) of the audit, in order.
/// The audit rows of reveals, pages and refusals (not those of keys handed out, which setting
/// up a test appends too).
async fn audited(env: &TestEnv) -> Vec<(String, Vec<i64>)> {
    sqlx::query_as(
        "SELECT outcome, login_ids FROM unmask_audit
         WHERE outcome IS DISTINCT FROM 'keys-handed-out' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

fn refused_with(error: sqlx::Error, expected: &str) {
    let message = error.to_string();
    assert!(
        message.contains(expected),
        "expected «{expected}»: {message}"
    );
}

#[tokio::test]
async fn a_hand_out_in_the_transaction_of_its_request_is_refused_so_a_rollback_takes_nothing() {
    let env = three_logins().await;
    let compliance = env.pool_as("compliance").await;
    let keyadmin = env.pool_as("keyadmin").await;

    // As compliance: BEGIN; request; hand-out; ROLLBACK. The hand-out is refused: its request
    // has not committed. Nothing was handed out, and nothing stays.
    let mut tx = compliance.begin().await.unwrap();
    let request = request_reveal(&mut *tx, "rolled back").await;
    let refused = sqlx::query("SELECT * FROM vault_reveal($1)")
        .bind(request)
        .fetch_all(&mut *tx)
        .await
        .unwrap_err();
    refused_with(refused, "has not committed");
    tx.rollback().await.unwrap();
    assert!(audited(&env).await.is_empty());

    // As the key admin, the same with each walk: the page is refused inside the request's
    // transaction.
    for (request, page) in [
        (
            "SELECT vault_rotation_request('verify', 0, 1000, '{}')",
            "SELECT * FROM vault_rotation_page($1)",
        ),
        (
            "SELECT vault_quarantine_request('verify', 0, 1000, (SELECT array_agg(id) FROM vault_keys))",
            "SELECT * FROM vault_quarantine_page($1)",
        ),
    ] {
        let mut tx = keyadmin.begin().await.unwrap();
        let id: Option<i64> = sqlx::query_scalar(request)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        if let Some(id) = id {
            let refused = sqlx::query(page)
                .bind(id)
                .fetch_all(&mut *tx)
                .await
                .unwrap_err();
            refused_with(refused, "has not committed");
        }
        tx.rollback().await.unwrap();
    }
    assert!(audited(&env).await.is_empty());

    // A committed request, then a hand-out rolled back: its audit row stands, naming both
    // logins handed out.
    let request = request_reveal(&compliance, "committed").await;
    let mut tx = compliance.begin().await.unwrap();
    let handed: Vec<(String, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT outcome, sealed_ip FROM vault_reveal($1)")
            .bind(request)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(handed.len(), 2);
    assert!(
        handed
            .iter()
            .all(|(o, sealed)| o == "handed-out" && sealed.is_some())
    );
    let rows = audited(&env).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "handed-out");
    assert_eq!(
        rows[0].1.len(),
        2,
        "both logins named before they were handed out"
    );

    // The request is the caller's alone, and serves one committed hand-out.
    let other = env.pool_as("keyadmin").await;
    let refused = sqlx::query("SELECT * FROM vault_reveal($1)")
        .bind(request)
        .fetch_all(&other)
        .await
        .unwrap_err();
    refused_with(refused, "is not a reveal request of keyadmin");
    other.close().await;
    sqlx::query("SELECT * FROM vault_reveal($1)")
        .bind(request)
        .fetch_all(&compliance)
        .await
        .unwrap();
    let refused = sqlx::query("SELECT * FROM vault_reveal($1)")
        .bind(request)
        .fetch_all(&compliance)
        .await
        .unwrap_err();
    refused_with(refused, "was handed out already");

    // An expired request hands out nothing (the owner moves its clock, past the trigger).
    let request = request_reveal(&compliance, "expires").await;
    sqlx::raw_sql(&format!(
        "ALTER TABLE door_requests DISABLE TRIGGER door_requests_only_through_doors;
         UPDATE door_requests SET expires_at = now() - interval '1 second' WHERE id = {request};
         ALTER TABLE door_requests ENABLE TRIGGER door_requests_only_through_doors;"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let refused = sqlx::query("SELECT * FROM vault_reveal($1)")
        .bind(request)
        .fetch_all(&compliance)
        .await
        .unwrap_err();
    refused_with(refused, "has expired");
    compliance.close().await;
    keyadmin.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn every_refusal_a_caller_learns_of_was_recorded_before_it_was_told() {
    let env = three_logins().await;
    let compliance = env.pool_as("compliance").await;
    let nobody = env.pool_as("nobody").await;
    let server_log = ServerLog::from_now(&env).await;
    // A request is answered only by step two, and only once it committed: rolled back, it was
    // never answered, and the server log still has it.
    let mut rolled_back = Vec::new();
    for (pool, user, refusal) in [
        (&compliance, "compliance", "refused-purpose"),
        (&nobody, "nobody", "refused-role"),
    ] {
        let mut tx = pool.begin().await.unwrap();
        let request: i64 = sqlx::query_scalar(
            "SELECT vault_reveal_request('user_id', 'u-1', 'curiosity', 'r', 'mallory')",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let refused = sqlx::query("SELECT * FROM vault_reveal($1)")
            .bind(request)
            .fetch_all(&mut *tx)
            .await
            .unwrap_err();
        refused_with(refused, "has not committed");
        tx.rollback().await.unwrap();
        rolled_back.push(format!(
            "pii-vault: reveal request {request} by {user}: {refusal}"
        ));
    }
    let log = server_log.read();
    for line in &rolled_back {
        assert!(log.contains(line.as_str()), "the server log keeps «{line}»");
    }
    let requests: i64 =
        sqlx::query_scalar("SELECT count(*) FROM door_requests WHERE door <> 'keys'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(requests, 0);

    // Committed, each is answered with the refusal its record already holds.
    for (pool, user, refusal) in [
        (&compliance, "compliance", "refused-purpose"),
        (&nobody, "nobody", "refused-role"),
    ] {
        let request: i64 = sqlx::query_scalar(
            "SELECT vault_reveal_request('user_id', 'u-1', 'curiosity', 'r', 'mallory')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        let (outcome, sealed): (String, Option<Vec<u8>>) =
            sqlx::query_as("SELECT outcome, sealed_ip FROM vault_reveal($1)")
                .bind(request)
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!((outcome.as_str(), sealed), (refusal, None));
        let recorded: (String, String) =
            sqlx::query_as("SELECT db_user, outcome FROM door_requests WHERE id = $1")
                .bind(request)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        assert_eq!(recorded, (user.to_owned(), refusal.to_owned()));
    }
    // The officer's refusal is in the chain; the role-less knock is not (it takes no lock).
    assert_eq!(
        audited(&env).await,
        [("refused-purpose".to_owned(), Vec::new())]
    );
    compliance.close().await;
    nobody.close().await;
    env.cleanup().await;
}

/// Appends one audit row from inside `tx` (a reveal request of compliance).
async fn append_in(tx: &mut Transaction<'static, Postgres>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT vault_reveal_request('user_id', 'u-2', 'legal-request', 'r', 'a')")
        .fetch_one(&mut **tx)
        .await
}

async fn begin_at(pool: &PgPool, isolation: &str) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("SET TRANSACTION ISOLATION LEVEL {isolation}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    // The snapshot is taken here, before anyone else appends.
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    tx
}

/// No row of the audit has two successors, and `verify-audit` finds the chain intact: `rows`
/// rows besides those of keys handed out while setting up.
async fn assert_one_chain(env: &TestEnv, rows: i64) {
    let (count, heads, keys): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT prev_hash),
                count(*) FILTER (WHERE outcome = 'keys-handed-out')
         FROM unmask_audit",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (count, heads),
        (rows + keys, rows + keys),
        "one successor per row"
    );
    let verified = env.run_binary_as("compliance", UNMASK, &["verify-audit"]);
    assert_eq!(verified.status.code(), Some(0), "{}", stderr(&verified));
    assert!(
        stdout(&verified).starts_with(&format!("audit intact: {} rows", rows + keys)),
        "{}",
        stdout(&verified)
    );
}

#[tokio::test]
async fn an_append_on_a_stale_head_is_refused_under_every_isolation_level() {
    let env = three_logins().await;
    let officer = env.pool_as("compliance").await;
    let mut appended = 0;
    for isolation in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"] {
        // A caller whose snapshot predates an append that committed meanwhile...
        let mut stale = begin_at(&officer, isolation).await;
        request_reveal(&officer, "meanwhile").await;
        appended += 1;
        let result = append_in(&mut stale).await;
        if isolation == "READ COMMITTED" {
            // ...reads the newest head (each statement takes a new snapshot) and follows it;
            result.unwrap();
            stale.commit().await.unwrap();
            appended += 1;
        } else {
            // ...or is refused with a serialization failure, never forking the chain.
            let error = result.unwrap_err();
            let code = error.as_database_error().and_then(|e| e.code());
            assert_eq!(code.as_deref(), Some("40001"), "{isolation}: {error}");
            stale.rollback().await.unwrap();
        }
        // Two callers appending at once at this level: the second waits for the first, then is
        // serialized after it or refused.
        let mut first = begin_at(&officer, isolation).await;
        let mut second = begin_at(&officer, isolation).await;
        append_in(&mut first).await.unwrap();
        let waiting = tokio::spawn(async move {
            let result = append_in(&mut second).await;
            (result.is_ok(), second)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "{isolation}: the second append waits for the head"
        );
        first.commit().await.unwrap();
        appended += 1;
        let (followed, second) = waiting.await.unwrap();
        assert_eq!(followed, isolation == "READ COMMITTED", "{isolation}");
        if followed {
            second.commit().await.unwrap();
            appended += 1;
        } else {
            second.rollback().await.unwrap();
        }
    }
    assert_one_chain(&env, appended).await;
    officer.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn eight_officers_at_once_under_repeatable_read_and_serializable_leave_one_chain() {
    let env = three_logins().await;
    let officer = env.pool_as("compliance").await;
    let mut officers = Vec::new();
    for n in 0..8 {
        let pool = officer.clone();
        let isolation = if n % 2 == 0 {
            "REPEATABLE READ"
        } else {
            "SERIALIZABLE"
        };
        officers.push(tokio::spawn(async move {
            let (mut appended, mut refused) = (0, 0);
            while appended < 5 {
                let mut tx = begin_at(&pool, isolation).await;
                match append_in(&mut tx).await {
                    Ok(_) => match tx.commit().await {
                        Ok(()) => appended += 1,
                        Err(_) => refused += 1,
                    },
                    Err(error) => {
                        let code = error.as_database_error().and_then(|e| e.code());
                        assert_eq!(code.as_deref(), Some("40001"), "{error}");
                        refused += 1;
                    }
                }
            }
            refused
        }));
    }
    let mut refused = 0;
    for officer in officers {
        refused += officer.await.unwrap();
    }
    // Retried appends are what the isolation levels cost; the chain holds all 40 once.
    println!("{refused} appends refused on a stale head and retried");
    assert_one_chain(&env, 40).await;
    officer.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_key_admin_changes_logins_and_sealed_values_only_through_audited_doors() {
    let env = three_logins().await;
    let keyadmin = env.pool_as("keyadmin").await;
    // The attacks of before: rename a user's logins, overwrite a sealed ip, a body, a token.
    for statement in [
        "UPDATE user_logins SET user_id = 'someone-else' WHERE user_id = 'u-1'",
        "UPDATE user_logins SET masked_ip = 'x'",
        "UPDATE login_vault SET sealed_ip = '\\x00'",
        "UPDATE login_vault SET data_key_id = data_key_id",
        "UPDATE quarantine SET sealed_body = '\\x00'",
        "DELETE FROM login_vault",
    ] {
        let refused = sqlx::query(statement).execute(&keyadmin).await.unwrap_err();
        refused_with(refused, "permission denied");
    }

    // The write doors take only rows handed out to the writing transaction.
    let data_key: i64 =
        sqlx::query_scalar("SELECT id FROM vault_keys WHERE purpose = 'data' LIMIT 1")
            .fetch_one(&keyadmin)
            .await
            .unwrap();
    let request: i64 = sqlx::query_scalar("SELECT vault_rotation_request('reseal', 0, 2, $1)")
        .bind(vec![data_key])
        .fetch_one(&keyadmin)
        .await
        .unwrap();
    let handed: Vec<i64> =
        sqlx::query_scalar("SELECT login_id FROM vault_rotation_page($1) ORDER BY login_id")
            .bind(request)
            .fetch_all(&keyadmin)
            .await
            .unwrap();
    assert_eq!(handed.len(), 2);
    let write = "SELECT vault_reseal_logins($1, $2, $3, $4, $5)";
    let overwrite = |ids: Vec<i64>| {
        let n = ids.len();
        sqlx::query(write)
            .bind(request)
            .bind(ids)
            .bind(vec![data_key; n])
            .bind(vec![vec![0u8; 40]; n])
            .bind(vec![vec![0u8; 40]; n])
    };
    // Handed out in an earlier transaction: not in hand any more.
    refused_with(
        overwrite(handed.clone())
            .execute(&keyadmin)
            .await
            .unwrap_err(),
        "was not handed out to this transaction",
    );
    // Requested but never handed out, written in a fresh transaction (which has no id yet, as
    // the request has no receiving transaction): refused, in autocommit and in a transaction.
    let never: i64 = sqlx::query_scalar("SELECT vault_rotation_request('verify', 0, 2, '{}')")
        .fetch_one(&keyadmin)
        .await
        .unwrap();
    let never_handed = |ids: Vec<i64>| {
        sqlx::query("SELECT vault_retokenize_logins($1, $2, $3, $4, $5)")
            .bind(never)
            .bind(1i64)
            .bind(ids.clone())
            .bind(vec![Some("x".repeat(64)); ids.len()])
            .bind(vec![Some("y".repeat(64)); ids.len()])
    };
    refused_with(
        never_handed(handed.clone())
            .execute(&keyadmin)
            .await
            .unwrap_err(),
        "was not handed out to this transaction",
    );
    let mut tx = keyadmin.begin().await.unwrap();
    refused_with(
        never_handed(handed.clone())
            .execute(&mut *tx)
            .await
            .unwrap_err(),
        "was not handed out to this transaction",
    );
    tx.rollback().await.unwrap();
    // In hand, but a login the page did not hand out, or one it did, many times over.
    let request2: i64 = sqlx::query_scalar("SELECT vault_rotation_request('reseal', 0, 1, $1)")
        .bind(vec![data_key])
        .fetch_one(&keyadmin)
        .await
        .unwrap();
    let mut tx = keyadmin.begin().await.unwrap();
    sqlx::query("SELECT * FROM vault_rotation_page($1)")
        .bind(request2)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    let outside = handed[1];
    let refused = sqlx::query(write)
        .bind(request2)
        .bind(vec![outside])
        .bind(vec![data_key])
        .bind(vec![vec![0u8; 40]])
        .bind(vec![vec![0u8; 40]])
        .execute(&mut *tx)
        .await
        .unwrap_err();
    refused_with(refused, "only rows handed out by request");
    tx.rollback().await.unwrap();
    let mut tx = keyadmin.begin().await.unwrap();
    let page: Vec<i64> = sqlx::query_scalar("SELECT login_id FROM vault_rotation_page($1)")
        .bind(request2)
        .fetch_all(&mut *tx)
        .await
        .unwrap_or_default();
    let [inside] = page[..] else {
        panic!("the page hands out its one login again: {page:?}");
    };
    let refused = sqlx::query(write)
        .bind(request2)
        .bind(vec![inside; 1000])
        .bind(vec![data_key; 1000])
        .bind(vec![vec![0u8; 40]; 1000])
        .bind(vec![vec![0u8; 40]; 1000])
        .execute(&mut *tx)
        .await
        .unwrap_err();
    refused_with(refused, "each once");
    tx.rollback().await.unwrap();
    // Nothing was written: every value still opens and matches its token.
    let verified = rotate_verify(&env, &keyadmin).await;
    assert_eq!(verified, 3);
    keyadmin.close().await;
    env.cleanup().await;
}

async fn rotate_verify(env: &TestEnv, keyadmin: &PgPool) -> u64 {
    let keyring = env.keyring_on(keyadmin);
    pii_vault::unmask::verify_all(keyadmin, &keyring)
        .await
        .unwrap()
        .logins
}

#[tokio::test]
async fn a_login_without_roles_cannot_stall_a_door_or_an_ingest_batch() {
    let env = three_logins().await;
    let nobody = env.pool_as("nobody").await;
    let mut attacker = nobody.acquire().await.unwrap();
    // The row locks the vault uses now, and the tables behind them, are out of its reach.
    for statement in [
        "SELECT 1 FROM erasure_gate FOR SHARE",
        "SELECT 1 FROM vault_keys FOR SHARE",
        "SELECT 1 FROM audit_head FOR SHARE",
        "SELECT 1 FROM door_requests FOR SHARE",
        "LOCK TABLE erasure_gate IN ACCESS SHARE MODE",
        "LOCK TABLE audit_head IN ACCESS SHARE MODE",
        "LOCK TABLE vault_keys IN ACCESS SHARE MODE",
        "SELECT vault_hold_erasures()",
        "SELECT vault_hold_keys('{1}')",
    ] {
        // In a transaction, as LOCK TABLE needs.
        sqlx::query("BEGIN").execute(&mut *attacker).await.unwrap();
        let refused = sqlx::query(statement)
            .execute(&mut *attacker)
            .await
            .unwrap_err();
        refused_with(refused, "permission denied");
        sqlx::query("ROLLBACK")
            .execute(&mut *attacker)
            .await
            .unwrap();
    }
    // What it can hold: every advisory lock the vault once used, and an open transaction
    // that knocked on the reveal door.
    let key_ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM vault_keys")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    hold_what_a_login_can(&mut attacker, &key_ids).await;
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
         WHERE a.usename = 'nobody' AND l.locktype = 'advisory' AND l.granted",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        held as usize,
        2 + key_ids.len(),
        "the attacker holds its locks"
    );

    // Meanwhile an ingest batch, an erasure and a reveal each go through.
    let limit = Duration::from_secs(30);
    let ingested = tokio::time::timeout(
        limit,
        env.ingest_bodies(&[login("u-3", "10.0.0.4", "444-44-4444")]),
    )
    .await
    .expect("an ingest batch finishes while the attacker holds its locks");
    assert_eq!(ingested.stored, 1);
    let keyadmin = env.pool_as("keyadmin").await;
    let keyring = env.keyring_on(&keyadmin);
    let erased = tokio::time::timeout(
        limit,
        lifecycle::erase(
            &keyadmin,
            &keyring,
            &Erasure::of("u-2", "request 7", "tests"),
            None,
        ),
    )
    .await
    .expect("an erasure finishes while the attacker holds its locks")
    .unwrap();
    assert_eq!(erased.logins, 1);
    // (The binary runs under the harness's time limit.)
    let output = env.run_binary_as(
        "compliance",
        UNMASK,
        &[
            "--purpose",
            "legal-request",
            "--user-id",
            "u-1",
            "--reason",
            "r",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains("10.0.0.1"));
    sqlx::query("ROLLBACK")
        .execute(&mut *attacker)
        .await
        .unwrap();
    drop(attacker);
    nobody.close().await;
    keyadmin.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn inputs_are_bounded_and_a_question_must_name_a_column() {
    let env = three_logins().await;
    let compliance = env.pool_as("compliance").await;
    let nobody = env.pool_as("nobody").await;
    let huge = "x".repeat(1 << 20);
    let ask = |question: Option<&str>, value: Option<&str>, reason: &str, actor: &str| {
        sqlx::query_scalar::<_, i64>("SELECT vault_reveal_request($1, $2, 'legal-request', $3, $4)")
            .bind(question.map(str::to_owned))
            .bind(value.map(str::to_owned))
            .bind(reason.to_owned())
            .bind(actor.to_owned())
    };
    let cases = [
        (
            Some("user_id"),
            Some("u-1"),
            huge.as_str(),
            "a",
            "refused-input",
        ),
        (
            Some(huge.as_str()),
            Some("u-1"),
            "r",
            "a",
            "refused-question",
        ),
        (
            Some("user_id"),
            Some("u-1"),
            "r",
            huge.as_str(),
            "refused-input",
        ),
        (
            Some("user_id"),
            Some(huge.as_str()),
            "r",
            "a",
            "refused-input",
        ),
        (None, Some("u-1"), "r", "a", "refused-question"),
        (Some("sealed_ip"), Some("u-1"), "r", "a", "refused-question"),
        (Some("user_id"), None, "r", "a", "refused-question"),
    ];
    for (question, value, reason, actor, refusal) in cases {
        let request = ask(question, value, reason, actor)
            .fetch_one(&compliance)
            .await
            .unwrap();
        let (outcome, login): (String, Option<i64>) =
            sqlx::query_as("SELECT outcome, login_id FROM vault_reveal($1)")
                .bind(request)
                .fetch_one(&compliance)
                .await
                .unwrap();
        assert_eq!((outcome.as_str(), login), (refusal, None), "{question:?}");
    }
    // Audited, within the documented sizes.
    let rows: Vec<(String, i32, i32, i32)> = sqlx::query_as(
        "SELECT outcome, length(reason), length(actor), length(question)
         FROM unmask_audit WHERE outcome <> 'keys-handed-out' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), cases.len());
    for (outcome, reason, actor, question) in rows {
        assert!(outcome.starts_with("refused-"));
        assert!(
            reason <= 1000 && actor <= 128 && question <= 300,
            "{reason} {actor} {question}"
        );
    }
    // A role-less knock is bounded too.
    ask(Some("user_id"), Some("u-1"), &huge, &huge)
        .fetch_one(&nobody)
        .await
        .unwrap();
    let detail: i32 = sqlx::query_scalar("SELECT max(length(detail)) FROM door_requests")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(detail <= 2000, "{detail}");
    // Every door that appends takes the same bounds: an erasure with a 1 MB reason is refused.
    let keyadmin = env.pool_as("keyadmin").await;
    let keyring = env.keyring_on(&keyadmin);
    let refused = lifecycle::erase(
        &keyadmin,
        &keyring,
        &Erasure::of("u-1", &huge, "tests"),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        refused.to_string().contains("at most 1000 characters"),
        "{refused}"
    );
    // And the user id an erasure names (it goes into the audit's question).
    let refused = sqlx::query(
        "SELECT * FROM vault_erase_user($1, 'r', 'a', false, '{1}', '{t}', '{\\x00}', false, false, NULL)",
    )
        .bind(&huge)
        .fetch_all(&keyadmin)
        .await
        .unwrap_err();
    refused_with(refused, "a user id takes 1 to 256 characters");
    compliance.close().await;
    nobody.close().await;
    keyadmin.close().await;
    env.cleanup().await;
}

/// The PostgreSQL server's log, where pgaudit and the doors' RAISE LOG write, from where it
/// ended when this was made: `PII_VAULT_PG_LOG`, or Debian's file for the server's major
/// version.
struct ServerLog {
    path: String,
    from: u64,
}

impl ServerLog {
    async fn from_now(env: &TestEnv) -> Self {
        let path = match std::env::var("PII_VAULT_PG_LOG") {
            Ok(path) => path,
            Err(_) => {
                let version: String = sqlx::query_scalar("SHOW server_version_num")
                    .fetch_one(&env.pool)
                    .await
                    .unwrap();
                format!("/var/log/postgresql/postgresql-{}-main.log", &version[..2])
            }
        };
        let from = std::fs::metadata(&path)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot read the PostgreSQL server log at {path} ({e}): set PII_VAULT_PG_LOG"
                )
            })
            .len();
        Self { path, from }
    }

    /// What the server logged since.
    fn read(&self) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(&self.path).unwrap();
        file.seek(SeekFrom::Start(self.from)).unwrap();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[tokio::test]
async fn the_owner_is_not_the_door_and_what_it_does_past_the_doors_is_in_the_server_log() {
    let env = three_logins().await;
    // No migration window may open meanwhile: a window lends the owner the door role.
    let role_admin = common::role_admin().await;
    let mut window = role_admin.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(db::MIGRATION_WINDOW_LOCK)
        .execute(&mut *window)
        .await
        .unwrap();
    let tag = format!("owner-attack-{}", common::unique_suffix());
    let server_log = ServerLog::from_now(&env).await;
    let owner: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&env.pool)
        .await
        .unwrap();

    // The attacks of before: become the door, grant itself the door, rewrite a trigger
    // function so that the audit takes an UPDATE.
    for (statement, refused) in [
        (
            format!("SET ROLE pii_vault_door /* {tag} */"),
            "permission denied to set role",
        ),
        (
            format!("GRANT pii_vault_door TO {owner}"),
            "must have admin option",
        ),
        (
            "CREATE OR REPLACE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RETURN NEW; END $$"
                .to_owned(),
            "must be owner of function",
        ),
        (
            "CREATE OR REPLACE FUNCTION vault_reveal(p_request bigint) RETURNS SETOF record
             LANGUAGE sql AS $$ SELECT NULL::record $$"
                .to_owned(),
            "must be owner of function",
        ),
    ] {
        let error = sqlx::raw_sql(&statement)
            .execute(&env.pool)
            .await
            .unwrap_err();
        refused_with(error, refused);
    }

    // What the owner can still do (it owns the tables) happens in view of the server log.
    sqlx::raw_sql(&format!(
        "ALTER TABLE unmask_audit DISABLE TRIGGER USER /* {tag} */;
         ALTER TABLE unmask_audit ENABLE TRIGGER USER;"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let compliance = env.pool_as("compliance").await;
    sqlx::raw_sql(&format!(
        "SET ROLE pii_vault_compliance /* {tag} */; RESET ROLE;"
    ))
    .execute(&compliance)
    .await
    .unwrap();
    compliance.close().await;
    let seen = |log: &str, needles: &[&str]| {
        log.lines()
            .any(|line| needles.iter().all(|needle| line.contains(needle)))
    };
    let disabled = [
        "AUDIT: SESSION",
        "DDL,ALTER TABLE",
        "DISABLE TRIGGER",
        tag.as_str(),
    ];
    // The server writes its log as it goes; allow it a moment.
    let mut log = server_log.read();
    for _ in 0..50 {
        if seen(&log, &disabled) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        log = server_log.read();
    }
    let logged = seen(&log, &disabled);
    assert!(
        logged,
        "pgaudit logged the owner's DISABLE TRIGGER (tag {tag})"
    );
    assert!(
        seen(
            &log,
            &[
                "AUDIT: SESSION",
                "MISC,SET",
                "SET ROLE pii_vault_compliance",
                &tag
            ]
        ),
        "pgaudit logged a SET ROLE"
    );
    assert!(
        seen(&log, &["STATEMENT:", "SET ROLE pii_vault_door", &tag]),
        "the refused SET ROLE to the door is in the log"
    );

    // rotate-keys status tells the operator the owner is watched, and not the door.
    let status = env.run_binary_as("keyadmin", env!("CARGO_BIN_EXE_rotate-keys"), &["status"]);
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let text = stdout(&status);
    assert!(
        text.contains(&format!("database owner {owner}: watched by pgaudit (ddl, role, misc_set); not a member of the door role")),
        "{text}"
    );
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(db::MIGRATION_WINDOW_LOCK)
        .execute(&mut *window)
        .await
        .unwrap();
    drop(window);
    role_admin.close().await;
    env.cleanup().await;
}

// ----------------------------------------------------------------------------- the key door
//
// Migration 0011's door for wrapped keys (`vault_key_request`, then `vault_key_hand_out`
// against the committed request), attacked as the reveal door is above: from psql-like
// sessions of the local logins, inside the caller's own transactions at every isolation
// level, with SET ROLE, and with requests that are not the caller's. What the door must keep:
// every key it hands out is named by a committed audit row 'keys-handed-out' of the caller.

const ISOLATION_LEVELS: [&str; 3] = ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"];

/// One key handed out: (audit id, key id, purpose, wrapped bytes).
type KeyHandedOut = (i64, i64, String, Option<Vec<u8>>);

/// Step one of the key door on `conn`.
async fn request_keys<'c, E: sqlx::PgExecutor<'c>>(
    conn: E,
    keys: &[i64],
    reason: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT vault_key_request($1, $2)")
        .bind(keys)
        .bind(reason)
        .fetch_one(conn)
        .await
}

/// Step two of the key door on `conn`.
async fn hand_out_keys<'c, E: sqlx::PgExecutor<'c>>(
    conn: E,
    request: i64,
) -> Result<Vec<KeyHandedOut>, sqlx::Error> {
    sqlx::query_as("SELECT audit_id, key_id, purpose, wrapped_key FROM vault_key_hand_out($1)")
        .bind(request)
        .fetch_all(conn)
        .await
}

/// The SQLSTATE and message of a refusal.
fn refusal<T: std::fmt::Debug>(result: Result<T, sqlx::Error>) -> (String, String) {
    let error = result.expect_err("refused");
    let database = error
        .as_database_error()
        .unwrap_or_else(|| panic!("a refusal by the database: {error}"));
    (
        database.code().unwrap_or_default().into_owned(),
        database.message().to_owned(),
    )
}

/// `BEGIN ISOLATION LEVEL ...` on a connection of `pool`, as psql would send it.
async fn begin_on(pool: &PgPool, isolation: &str) -> sqlx::pool::PoolConnection<Postgres> {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query(&format!("BEGIN ISOLATION LEVEL {isolation}"))
        .execute(&mut *conn)
        .await
        .unwrap();
    conn
}

async fn end(conn: &mut sqlx::PgConnection, how: &str) {
    sqlx::query(how).execute(&mut *conn).await.unwrap();
}

/// (db user, key ids) of each 'keys-handed-out' audit row whose reason is `reason`.
async fn keys_audited(env: &TestEnv, reason: &str) -> Vec<(String, Vec<i64>)> {
    sqlx::query_as(
        "SELECT db_user, key_ids FROM unmask_audit
         WHERE outcome = 'keys-handed-out' AND reason = $1 ORDER BY id",
    )
    .bind(reason)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// All 'keys-handed-out' audit rows, whoever asked.
async fn key_audit_rows(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM unmask_audit WHERE outcome = 'keys-handed-out'")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// The ids of the keys of `purpose`.
async fn keys_of(env: &TestEnv, purpose: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM vault_keys WHERE purpose = $1 ORDER BY id")
        .bind(purpose)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

fn not_committed(request: i64) -> (String, String) {
    (
        "22023".to_owned(),
        format!("request {request} has not committed: commit it, then ask for the hand-out"),
    )
}

fn not_a_keys_request_of(request: i64, user: &str) -> (String, String) {
    (
        "22023".to_owned(),
        format!("request {request} is not a keys request of {user}"),
    )
}

fn handed_out_already(request: i64) -> (String, String) {
    (
        "22023".to_owned(),
        format!("request {request} was handed out already"),
    )
}

#[tokio::test]
async fn a_key_hand_out_in_the_transaction_of_its_request_is_refused_at_every_isolation_level() {
    let env = three_logins().await;
    let token = keys_of(&env, "token").await;
    let data = keys_of(&env, "data").await;
    let all: Vec<i64> = token.iter().chain(&data).copied().collect();
    let keyadmin = env.pool_as("keyadmin").await;
    let ingester = env.pool_as("ingester").await;
    let rows_before = key_audit_rows(&env).await;
    for isolation in ISOLATION_LEVELS {
        for (user, pool, keys) in [
            ("keyadmin", &keyadmin, &all),
            ("ingester", &ingester, &token),
        ] {
            let reason = format!("seam: same transaction, {user}, {isolation}");
            // BEGIN; request; hand-out; ROLLBACK.
            let mut conn = begin_on(pool, isolation).await;
            let request = request_keys(&mut *conn, keys, &reason).await.unwrap();
            assert_eq!(
                refusal(hand_out_keys(&mut *conn, request).await),
                not_committed(request),
                "{user}, {isolation}"
            );
            end(&mut conn, "ROLLBACK").await;
            // The rolled-back request is gone: no audit row, no record, and nothing can be
            // handed out against it later.
            assert!(keys_audited(&env, &reason).await.is_empty());
            let recorded: i64 =
                sqlx::query_scalar("SELECT count(*) FROM door_requests WHERE id = $1")
                    .bind(request)
                    .fetch_one(&env.pool)
                    .await
                    .unwrap();
            assert_eq!(recorded, 0, "{user}, {isolation}");
            assert_eq!(
                refusal(hand_out_keys(pool, request).await),
                not_a_keys_request_of(request, user),
                "{user}, {isolation}: a rolled-back request hands out nothing later"
            );

            // A request made in a released savepoint is still the same transaction's.
            let mut conn = begin_on(pool, isolation).await;
            end(&mut conn, "SAVEPOINT s").await;
            let request = request_keys(&mut *conn, keys, &reason).await.unwrap();
            end(&mut conn, "RELEASE SAVEPOINT s").await;
            assert_eq!(
                refusal(hand_out_keys(&mut *conn, request).await),
                not_committed(request),
                "{user}, {isolation}, savepoint"
            );
            end(&mut conn, "ROLLBACK").await;

            // The hand-out is refused even when the caller swallows the error in a savepoint
            // and commits the request: the refusal was the answer, and the request, now
            // committed, serves one later hand-out under its audit row.
            let mut conn = begin_on(pool, isolation).await;
            let request = request_keys(&mut *conn, keys, &reason).await.unwrap();
            end(&mut conn, "SAVEPOINT s").await;
            assert_eq!(
                refusal(hand_out_keys(&mut *conn, request).await),
                not_committed(request),
                "{user}, {isolation}, swallowed"
            );
            end(&mut conn, "ROLLBACK TO SAVEPOINT s").await;
            end(&mut conn, "COMMIT").await;
            assert_eq!(
                keys_audited(&env, &reason).await,
                [(user.to_owned(), keys.clone())]
            );
            let handed = hand_out_keys(pool, request).await.unwrap();
            assert_eq!(
                handed.iter().map(|k| k.1).collect::<Vec<_>>(),
                *keys,
                "{user}, {isolation}"
            );
            assert_eq!(
                refusal(hand_out_keys(pool, request).await),
                handed_out_already(request)
            );
        }
    }
    // One committed row per committed request, none for the rolled-back ones.
    assert_eq!(key_audit_rows(&env).await - rows_before, 6);
    keyadmin.close().await;
    ingester.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_rolled_back_key_hand_out_repeats_only_under_its_committed_audit_row() {
    let env = three_logins().await;
    let token = keys_of(&env, "token").await;
    let data = keys_of(&env, "data").await;
    let named: Vec<i64> = token.iter().chain(&data).copied().collect();
    let keyadmin = env.pool_as("keyadmin").await;
    for isolation in ISOLATION_LEVELS {
        let reason = format!("seam: rolled-back hand-out, {isolation}");
        // A committed request, naming also a key that does not exist (yet).
        let next: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) + 1000 FROM vault_keys")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        let asked: Vec<i64> = named.iter().copied().chain([next]).collect();
        let request = request_keys(&keyadmin, &asked, &reason).await.unwrap();
        let audit: Vec<(i64, Vec<i64>)> = sqlx::query_as(
            "SELECT id, key_ids FROM unmask_audit
             WHERE outcome = 'keys-handed-out' AND reason = $1",
        )
        .bind(&reason)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        assert_eq!(audit.len(), 1);
        let (audit_id, audited_keys) = audit[0].clone();
        assert_eq!(audited_keys, named, "the row names the keys that exist");
        let rows_after_request = key_audit_rows(&env).await;

        // Handed out in a transaction that rolls back, then in a savepoint rolled back inside
        // a committed transaction: each time the same keys, under the same committed row.
        let mut attempts = Vec::new();
        let mut conn = begin_on(&keyadmin, isolation).await;
        attempts.push(hand_out_keys(&mut *conn, request).await.unwrap());
        end(&mut conn, "ROLLBACK").await;
        let mut conn = begin_on(&keyadmin, isolation).await;
        end(&mut conn, "SAVEPOINT s").await;
        attempts.push(hand_out_keys(&mut *conn, request).await.unwrap());
        end(&mut conn, "ROLLBACK TO SAVEPOINT s").await;
        end(&mut conn, "COMMIT").await;
        // Committed: the last one.
        attempts.push(hand_out_keys(&keyadmin, request).await.unwrap());
        for handed in &attempts {
            assert_eq!(
                handed
                    .iter()
                    .map(|(audit, key, _, _)| (*audit, *key))
                    .collect::<Vec<_>>(),
                named.iter().map(|k| (audit_id, *k)).collect::<Vec<_>>(),
                "{isolation}: every key handed out is named by the committed row"
            );
            assert!(handed.iter().all(|k| k.3.is_some()));
        }
        assert_eq!(
            refusal(hand_out_keys(&keyadmin, request).await),
            handed_out_already(request),
            "{isolation}"
        );
        let mut conn = begin_on(&keyadmin, isolation).await;
        assert_eq!(
            refusal(hand_out_keys(&mut *conn, request).await),
            handed_out_already(request),
            "{isolation}"
        );
        end(&mut conn, "ROLLBACK").await;
        assert_eq!(
            key_audit_rows(&env).await,
            rows_after_request,
            "{isolation}: a hand-out appends no row of its own and needs none"
        );
    }

    // A request expires after two minutes (the owner moves its clock, past the trigger).
    let request = request_keys(&keyadmin, &named, "seam: expires")
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "ALTER TABLE door_requests DISABLE TRIGGER door_requests_only_through_doors;
         UPDATE door_requests SET expires_at = now() - interval '1 second' WHERE id = {request};
         ALTER TABLE door_requests ENABLE TRIGGER door_requests_only_through_doors;"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        refusal(hand_out_keys(&keyadmin, request).await),
        (
            "22023".to_owned(),
            format!("request {request} has expired: ask again")
        )
    );
    let expires_in: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM expires_at - at)::float8 FROM door_requests
         WHERE door = 'keys' AND id <> $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(request)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!((119.9..=120.1).contains(&expires_in), "{expires_in}");
    keyadmin.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_stale_snapshot_or_a_concurrent_key_hand_out_gets_no_key_twice() {
    let env = three_logins().await;
    let token = keys_of(&env, "token").await;
    let keyadmin = env.pool_as("keyadmin").await;
    for isolation in ISOLATION_LEVELS {
        let reason = format!("seam: concurrent, {isolation}");
        // A snapshot taken before the request committed does not see it under REPEATABLE READ
        // and SERIALIZABLE; under READ COMMITTED each statement sees it and hands it out.
        let mut stale = begin_on(&keyadmin, isolation).await;
        sqlx::query("SELECT 1").execute(&mut *stale).await.unwrap();
        let request = request_keys(&keyadmin, &token, &reason).await.unwrap();
        let seen = hand_out_keys(&mut *stale, request).await;
        if isolation == "READ COMMITTED" {
            assert_eq!(seen.unwrap().len(), token.len());
        } else {
            assert_eq!(
                refusal(seen),
                not_a_keys_request_of(request, "keyadmin"),
                "{isolation}"
            );
        }
        end(&mut stale, "ROLLBACK").await;

        // Two sessions of the same user hand out one request at once: the second waits for
        // the first, then is refused (READ COMMITTED re-reads the row; the others fail to
        // serialize) when the first commits, and gets the keys when it rolls back.
        for first_ends in ["COMMIT", "ROLLBACK"] {
            let request = request_keys(&keyadmin, &token, &reason).await.unwrap();
            let mut first = begin_on(&keyadmin, isolation).await;
            let mut second = begin_on(&keyadmin, isolation).await;
            sqlx::query("SELECT 1").execute(&mut *second).await.unwrap();
            assert_eq!(
                hand_out_keys(&mut *first, request).await.unwrap().len(),
                token.len()
            );
            let waiting = tokio::spawn(async move {
                let result = hand_out_keys(&mut *second, request).await;
                (result, second)
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                !waiting.is_finished(),
                "{isolation}: the second hand-out waits for the first"
            );
            end(&mut first, first_ends).await;
            let (result, mut second) = waiting.await.unwrap();
            match (first_ends, isolation) {
                ("ROLLBACK", _) => assert_eq!(result.unwrap().len(), token.len()),
                ("COMMIT", "READ COMMITTED") => {
                    assert_eq!(refusal(result), handed_out_already(request))
                }
                ("COMMIT", _) => assert_eq!(
                    refusal(result),
                    (
                        "40001".to_owned(),
                        "could not serialize access due to concurrent update".to_owned()
                    ),
                    "{isolation}"
                ),
                _ => unreachable!(),
            }
            end(&mut second, "ROLLBACK").await;
        }
    }
    keyadmin.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_key_door_answers_by_the_session_user_whatever_role_it_sets() {
    let env = three_logins().await;
    let token = keys_of(&env, "token").await;
    let data = keys_of(&env, "data").await;
    let both: Vec<i64> = token.iter().chain(&data).copied().collect();
    let users = ["ingester", "keyadmin", "compliance", "analyst", "nobody"];
    let mut pools = std::collections::HashMap::new();
    for user in users {
        pools.insert(user, env.pool_as(user).await);
    }
    let rows_before = key_audit_rows(&env).await;
    let reason = "seam: roles";

    // No login may become the key admin, or the ingester, without membership.
    for user in users {
        for role in [
            "pii_vault_keyadmin",
            "keyadmin",
            "pii_vault_ingester",
            "pii_vault_door",
        ] {
            let member = matches!(
                (user, role),
                ("keyadmin", "pii_vault_keyadmin") | ("ingester", "pii_vault_ingester")
            ) || user == role;
            let mut conn = pools[user].acquire().await.unwrap();
            let set = sqlx::query(&format!("SET ROLE {role}"))
                .execute(&mut *conn)
                .await;
            if member {
                set.unwrap();
            } else {
                assert_eq!(
                    refusal(set),
                    (
                        "42501".to_owned(),
                        format!("permission denied to set role \"{role}\"")
                    ),
                    "{user}"
                );
            }
            end(&mut conn, "RESET ROLE").await;
        }
    }

    // The ingester: token keys only, whatever role it sets.
    let ingester = &pools["ingester"];
    for keys in [&data, &both] {
        assert_eq!(
            refusal(request_keys(ingester, keys, reason).await),
            (
                "42501".to_owned(),
                "the ingester may unwrap token keys only".to_owned()
            )
        );
    }
    let mut conn = ingester.acquire().await.unwrap();
    end(&mut conn, "SET ROLE pii_vault_ingester").await;
    assert_eq!(
        refusal(request_keys(&mut *conn, &data, reason).await),
        (
            "42501".to_owned(),
            "the ingester may unwrap token keys only".to_owned()
        )
    );
    let ingesters_request = request_keys(&mut *conn, &token, reason).await.unwrap();
    end(&mut conn, "RESET ROLE").await;
    drop(conn);
    let handed = hand_out_keys(ingester, ingesters_request).await.unwrap();
    assert_eq!(
        handed
            .iter()
            .map(|(_, id, purpose, wrapped)| (*id, purpose.as_str(), wrapped.is_some()))
            .collect::<Vec<_>>(),
        token
            .iter()
            .map(|id| (*id, "token", true))
            .collect::<Vec<_>>()
    );

    // Compliance, the analyst and a login without roles: not even the token key. The key
    // admin, as itself or its group role: any key.
    for user in ["compliance", "analyst", "nobody"] {
        for keys in [&token, &data] {
            assert_eq!(
                refusal(request_keys(&pools[user], keys, reason).await),
                (
                    "42501".to_owned(),
                    "permission denied for function vault_key_request".to_owned()
                ),
                "{user}"
            );
        }
        assert_eq!(
            refusal(hand_out_keys(&pools[user], ingesters_request).await),
            (
                "42501".to_owned(),
                "permission denied for function vault_key_hand_out".to_owned()
            ),
            "{user}"
        );
    }
    let keyadmin = &pools["keyadmin"];
    let mut conn = keyadmin.acquire().await.unwrap();
    end(&mut conn, "SET ROLE pii_vault_keyadmin").await;
    let keyadmins_request = request_keys(&mut *conn, &both, reason).await.unwrap();
    end(&mut conn, "RESET ROLE").await;
    drop(conn);

    // A request is its session user's alone, and of its door alone.
    let owner: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    for (request, pool, user) in [
        (keyadmins_request, ingester, "ingester"),
        (keyadmins_request, &env.pool, owner.as_str()),
        (ingesters_request, keyadmin, "keyadmin"),
    ] {
        assert_eq!(
            refusal(hand_out_keys(pool, request).await),
            not_a_keys_request_of(request, user)
        );
    }
    let reveal = request_reveal(keyadmin, "seam: a reveal request").await;
    assert_eq!(
        refusal(hand_out_keys(keyadmin, reveal).await),
        not_a_keys_request_of(reveal, "keyadmin")
    );
    assert_eq!(
        refusal(
            sqlx::query("SELECT * FROM vault_reveal($1)")
                .bind(keyadmins_request)
                .fetch_all(keyadmin)
                .await
        ),
        (
            "22023".to_owned(),
            format!("request {keyadmins_request} is not a reveal request of keyadmin")
        )
    );
    let handed = hand_out_keys(keyadmin, keyadmins_request).await.unwrap();
    assert_eq!(handed.iter().map(|k| k.1).collect::<Vec<_>>(), both);
    for (request, pool) in [(keyadmins_request, keyadmin), (ingesters_request, ingester)] {
        assert_eq!(
            refusal(hand_out_keys(pool, request).await),
            handed_out_already(request)
        );
    }

    // Exactly the two granted requests left a row, each naming what was handed out.
    assert_eq!(
        keys_audited(&env, reason).await,
        [
            ("ingester".to_owned(), token.clone()),
            ("keyadmin".to_owned(), both.clone())
        ]
    );
    assert_eq!(key_audit_rows(&env).await - rows_before, 2);
    for pool in pools.into_values() {
        pool.close().await;
    }
    env.cleanup().await;
}

#[tokio::test]
async fn no_login_reads_wrapped_key_bytes_past_the_door() {
    let env = three_logins().await;
    let denied = (
        "42501".to_owned(),
        "permission denied for table vault_keys".to_owned(),
    );
    for user in ["ingester", "keyadmin", "compliance", "analyst", "nobody"] {
        let pool = env.pool_as(user).await;
        let mut conn = pool.acquire().await.unwrap();
        let mut attempts = vec![
            "SELECT wrapped_key FROM vault_keys",
            "SELECT k FROM vault_keys k",
            "SELECT * FROM vault_keys",
            "SELECT length(wrapped_key) FROM vault_keys",
            "SELECT id FROM vault_keys WHERE wrapped_key IS NOT NULL",
            "SELECT id FROM vault_keys ORDER BY wrapped_key",
            "COPY vault_keys (wrapped_key) TO STDOUT",
        ];
        if user == "keyadmin" {
            // Its UPDATE right reads nothing back, and copies nothing where it may read.
            attempts.extend([
                "UPDATE vault_keys SET state = state WHERE false RETURNING wrapped_key",
                "UPDATE vault_keys SET kms_key_id = encode(wrapped_key, 'hex') WHERE false",
            ]);
        }
        for role in [None, Some(format!("pii_vault_{user}"))] {
            if let Some(role) = &role {
                if !["ingester", "keyadmin"].contains(&user) {
                    continue;
                }
                end(&mut conn, &format!("SET ROLE {role}")).await;
            }
            for attempt in &attempts {
                end(&mut conn, "BEGIN").await;
                let result = sqlx::raw_sql(attempt).execute(&mut *conn).await;
                assert_eq!(refusal(result), denied, "{user} ({role:?}): {attempt}");
                end(&mut conn, "ROLLBACK").await;
            }
            end(&mut conn, "RESET ROLE").await;
        }
        drop(conn);
        pool.close().await;
    }
    env.cleanup().await;
}
