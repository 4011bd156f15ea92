//! unmask over the wire: real PostgreSQL roles, KMS in the emulator, the binary as an officer
//! runs it.

use crate::common::{self, TestEnv, login, stderr, stdout, three_logins};
use pii_vault::unmask::{self, Question, Request, RevealPurpose};
use pii_vault::vault::keyring::Keyring;

const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");
const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");

/// (db_user, outcome, values_revealed, question) of every audit row, in order.
/// The audit rows of reveals and refusals (not those of keys handed out to the ingester or
/// the key admin, which setting up a test appends too).
async fn audit_rows(env: &TestEnv) -> Vec<(String, String, i32, String)> {
    sqlx::query_as(
        "SELECT db_user, outcome, values_revealed, question FROM unmask_audit
         WHERE outcome IS DISTINCT FROM 'keys-handed-out' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

async fn outcomes(env: &TestEnv) -> Vec<(String, i32)> {
    audit_rows(env)
        .await
        .into_iter()
        .map(|(_, outcome, values, _)| (outcome, values))
        .collect()
}

fn pair(outcome: &str, values: i32) -> (String, i32) {
    (outcome.to_owned(), values)
}

/// `unmask` as database user `user`, for `purpose`, with `args` after it.
fn unmask_as(env: &TestEnv, user: &str, purpose: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--purpose", purpose];
    all.extend_from_slice(args);
    env.run_binary_as(user, UNMASK, &all)
}

/// `unmask` as the compliance officer, for a purpose, with `args` after it.
fn unmask_as_officer(env: &TestEnv, args: &[&str]) -> std::process::Output {
    unmask_as(env, "compliance", "fraud-investigation", args)
}

/// What `unmask` prints to the compliance officer who asks `args`: the reveal must succeed.
fn shown_to_officer(env: &TestEnv, args: &[&str]) -> String {
    let output = unmask_as_officer(env, args);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    stdout(&output)
}

#[tokio::test]
async fn an_officer_recovers_a_users_values_and_the_reveal_is_audited() {
    let env = three_logins().await;
    let output = unmask_as_officer(
        &env,
        &[
            "--user-id",
            "u-1",
            "--reason",
            "ticket 7",
            "--actor",
            "alice",
            "--format",
            "json",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let lines: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let mut pairs: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["ip"].as_str().unwrap(), l["device_id"].as_str().unwrap()))
        .collect();
    pairs.sort();
    assert_eq!(
        pairs,
        [("10.0.0.1", "111-11-1111"), ("10.0.0.2", "222-22-2222")]
    );
    assert!(
        lines
            .iter()
            .all(|l| l["user_id"] == "u-1" && l["masked_ip"].as_str().unwrap().len() == 64)
    );

    type Audited = (
        String,
        String,
        i32,
        String,
        String,
        String,
        String,
        Vec<i64>,
    );
    let audit: Vec<Audited> = sqlx::query_as(
        "SELECT db_user, outcome, values_revealed, question, actor, reason, purpose, login_ids
         FROM unmask_audit WHERE outcome <> 'keys-handed-out' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let u1_logins: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM user_logins WHERE user_id = 'u-1' ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let handout_id: i64 =
        sqlx::query_scalar("SELECT min(id) FROM unmask_audit WHERE outcome <> 'keys-handed-out'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let row = |outcome: &str, values, question: String| {
        (
            "compliance".to_owned(),
            outcome.to_owned(),
            values,
            question,
            "alice".to_owned(),
            "ticket 7".to_owned(),
            "fraud-investigation".to_owned(),
            u1_logins.clone(),
        )
    };
    assert_eq!(
        audit,
        [
            row("handed-out", 0, "user_id = u-1".into()),
            row("revealed", 4, format!("outcome of audit row {handout_id}")),
        ],
        "the door names what it handed out, then the outcome is recorded"
    );

    let text = shown_to_officer(&env, &["--user-id", "u-2", "--reason", "t"]);
    assert!(text.starts_with("create_date"), "{text}");
    assert!(
        text.contains("10.0.0.3") && text.contains("111-11-1111"),
        "{text}"
    );
    let csv = shown_to_officer(
        &env,
        &["--user-id", "u-2", "--reason", "t", "--format", "csv"],
    );
    assert_eq!(csv.lines().count(), 2, "header and one row");
    assert_eq!(audit_rows(&env).await.len(), 6);
    env.cleanup().await;
}

#[tokio::test]
async fn reverse_lookups_find_every_login_carrying_a_token() {
    let env = three_logins().await;
    let device_token: String =
        sqlx::query_scalar("SELECT masked_device_id FROM user_logins WHERE user_id = 'u-2'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let output = unmask_as_officer(
        &env,
        &[
            "--masked-device-id",
            &device_token,
            "--reason",
            "fraud case",
            "--format",
            "json",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let mut users: Vec<String> = stdout(&output)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["user_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    users.sort();
    assert_eq!(users, ["u-1", "u-2"]);

    let ip_token: String =
        sqlx::query_scalar("SELECT masked_ip FROM user_logins WHERE user_id = 'u-2'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let shown = shown_to_officer(&env, &["--masked-ip", &ip_token, "--reason", "r"]);
    assert!(shown.contains("10.0.0.3"));
    assert!(audit_rows(&env).await[2].3.starts_with("masked_ip = "));
    env.cleanup().await;
}

#[tokio::test]
async fn nothing_found_exits_6_after_auditing_the_attempt() {
    let env = three_logins().await;
    let output = unmask_as_officer(&env, &["--user-id", "nobody", "--reason", "r"]);
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(stdout(&output).is_empty());
    assert_eq!(
        audit_rows(&env).await,
        [(
            "compliance".into(),
            "nothing-found".into(),
            0,
            "user_id = nobody".into()
        )]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn bad_arguments_exit_2() {
    let env = three_logins().await;
    let cases: [&[&str]; 8] = [
        &["--user-id", "u-1", "--purpose", "legal-request"],
        &[
            "--user-id",
            "u-1",
            "--purpose",
            "legal-request",
            "--reason",
            "  \t",
        ],
        &["--user-id", "u-1", "--masked-ip", "ab", "--reason", "r"],
        &["--reason", "r", "--purpose", "legal-request"],
        &["--user-id", "u-1", "--reason", "r", "--format", "xml"],
        &["--user-id", "u-1", "--reason", "r"],
        &[
            "--user-id",
            "u-1",
            "--reason",
            "r",
            "--purpose",
            "curiosity",
        ],
        &["verify-audit", "--expect-head", "not-hex"],
    ];

    for args in cases {
        let output = env.run_binary_as("compliance", UNMASK, args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(stdout(&output).is_empty());
    }
    assert!(audit_rows(&env).await.is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn users_without_the_compliance_role_are_refused_and_the_attempt_is_recorded() {
    let env = three_logins().await;
    for user in ["analyst", "ingester", "keyadmin", "nobody"] {
        let args = ["--user-id", "u-1", "--reason", "curious"];
        let output = unmask_as(&env, user, "legal-request", &args);
        assert_eq!(output.status.code(), Some(3), "{user}: {}", stderr(&output));
        assert!(stdout(&output).is_empty());
        let message = stderr(&output);
        assert!(
            message.contains("not authorized") && message.contains(user),
            "{message}"
        );
        assert_eq!(message.lines().count(), 1, "one line: {message}");
        assert!(!message.contains("10.0.0.1"), "{message}");
    }
    // Knocks by callers without the role are recorded beside the chain, not in it: they take
    // none of its lock.
    assert!(outcomes(&env).await.is_empty());
    let refused: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT db_user, outcome, detail FROM door_requests WHERE audit_id IS NULL ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let users: Vec<&str> = refused.iter().map(|(user, _, _)| user.as_str()).collect();
    assert_eq!(users, ["analyst", "ingester", "keyadmin", "nobody"]);
    for (_, outcome, detail) in &refused {
        assert_eq!(outcome, "refused-role");
        assert!(
            detail.starts_with("user_id = u-1; purpose legal-request; reason curious"),
            "{detail}"
        );
    }
    env.cleanup().await;
}

/// What a statement did when a role ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// It ran (or failed on data, e.g. a NOT NULL column: the privilege check passed).
    Allowed,
    /// PostgreSQL refused it: no privilege, or a trigger or door refusing the caller.
    Refused,
}

/// Every table, sealed column and door, by operation, as psql would try it. `true`: the
/// statement must also return a row to count as allowed (the reveal door answers everyone,
/// but hands values only to compliance).
const MATRIX: [(&str, &str, bool); 63] = [
    (
        "SELECT user_logins",
        "SELECT * FROM user_logins LIMIT 0",
        false,
    ),
    (
        "INSERT user_logins",
        "INSERT INTO user_logins DEFAULT VALUES",
        false,
    ),
    (
        "UPDATE user_logins",
        "UPDATE user_logins SET masked_ip = NULL WHERE false",
        false,
    ),
    (
        "DELETE user_logins",
        "DELETE FROM user_logins WHERE false",
        false,
    ),
    ("TRUNCATE user_logins", "TRUNCATE user_logins", false),
    (
        "SELECT login_vault.sealed_ip",
        "SELECT sealed_ip FROM login_vault LIMIT 0",
        false,
    ),
    (
        "SELECT login_vault.sealed_device_id",
        "SELECT sealed_device_id FROM login_vault LIMIT 0",
        false,
    ),
    (
        "SELECT login_vault.(login_id, data_key_id)",
        "SELECT login_id, data_key_id FROM login_vault LIMIT 0",
        false,
    ),
    (
        "INSERT login_vault",
        "INSERT INTO login_vault DEFAULT VALUES",
        false,
    ),
    (
        "UPDATE login_vault",
        "UPDATE login_vault SET sealed_ip = NULL WHERE false",
        false,
    ),
    (
        "DELETE login_vault",
        "DELETE FROM login_vault WHERE false",
        false,
    ),
    ("TRUNCATE login_vault", "TRUNCATE login_vault", false),
    (
        "SELECT quarantine.sealed_body",
        "SELECT sealed_body FROM quarantine LIMIT 0",
        false,
    ),
    (
        "SELECT quarantine.(id, message_id, reason)",
        "SELECT id, message_id, reason FROM quarantine LIMIT 0",
        false,
    ),
    (
        "INSERT quarantine",
        "INSERT INTO quarantine DEFAULT VALUES",
        false,
    ),
    (
        "UPDATE quarantine",
        "UPDATE quarantine SET sealed_body = NULL WHERE false",
        false,
    ),
    (
        "DELETE quarantine",
        "DELETE FROM quarantine WHERE false",
        false,
    ),
    ("TRUNCATE quarantine", "TRUNCATE quarantine", false),
    (
        "SELECT vault_keys.wrapped_key",
        "SELECT wrapped_key FROM vault_keys LIMIT 0",
        false,
    ),
    (
        "SELECT vault_keys.(id, purpose, state)",
        "SELECT id, purpose, state FROM vault_keys LIMIT 0",
        false,
    ),
    (
        "INSERT vault_keys",
        "INSERT INTO vault_keys DEFAULT VALUES",
        false,
    ),
    (
        "UPDATE vault_keys",
        "UPDATE vault_keys SET state = NULL WHERE false",
        false,
    ),
    (
        "DELETE vault_keys",
        "DELETE FROM vault_keys WHERE false",
        false,
    ),
    ("TRUNCATE vault_keys", "TRUNCATE vault_keys", false),
    (
        "SELECT unmask_audit",
        "SELECT * FROM unmask_audit LIMIT 0",
        false,
    ),
    (
        "INSERT unmask_audit",
        "INSERT INTO unmask_audit DEFAULT VALUES",
        false,
    ),
    (
        "UPDATE unmask_audit",
        "UPDATE unmask_audit SET reason = 'x' WHERE false",
        false,
    ),
    (
        "DELETE unmask_audit",
        "DELETE FROM unmask_audit WHERE false",
        false,
    ),
    ("TRUNCATE unmask_audit", "TRUNCATE unmask_audit", false),
    (
        "SELECT audit_checkpoints",
        "SELECT * FROM audit_checkpoints LIMIT 0",
        false,
    ),
    (
        "INSERT audit_checkpoints",
        "INSERT INTO audit_checkpoints DEFAULT VALUES",
        false,
    ),
    (
        "UPDATE audit_checkpoints",
        "UPDATE audit_checkpoints SET signature = NULL WHERE false",
        false,
    ),
    (
        "DELETE audit_checkpoints",
        "DELETE FROM audit_checkpoints WHERE false",
        false,
    ),
    (
        "TRUNCATE audit_checkpoints",
        "TRUNCATE audit_checkpoints",
        false,
    ),
    (
        "door vault_reveal_request",
        "SELECT vault_reveal_request('user_id', 'u-1', 'fraud-investigation', 'matrix', 'tests')",
        false,
    ),
    ("door vault_reveal", "SELECT * FROM vault_reveal(-1)", false),
    (
        "door vault_reveal_outcome",
        "SELECT vault_reveal_outcome(-1, 'revealed', 0)",
        false,
    ),
    (
        "door vault_rotation_request",
        "SELECT vault_rotation_request('verify', 0, 1, '{}')",
        false,
    ),
    (
        "door vault_key_request (the token key)",
        "SELECT vault_key_request(ARRAY(SELECT id FROM vault_keys WHERE purpose = 'token'), 'matrix')",
        false,
    ),
    (
        "door vault_key_request (a data key)",
        "SELECT vault_key_request(ARRAY(SELECT id FROM vault_keys WHERE purpose = 'data'), 'matrix')",
        false,
    ),
    (
        "door vault_rotation_page",
        "SELECT * FROM vault_rotation_page(-1)",
        false,
    ),
    (
        "door vault_quarantine_request",
        "SELECT vault_quarantine_request('verify', 0, 1, '{}')",
        false,
    ),
    (
        "door vault_quarantine_page",
        "SELECT * FROM vault_quarantine_page(-1)",
        false,
    ),
    (
        "door vault_reseal_logins",
        "SELECT vault_reseal_logins(-1, '{}', '{}', '{}', '{}')",
        false,
    ),
    (
        "door vault_retokenize_logins",
        "SELECT vault_retokenize_logins(-1, 1, '{}', '{}', '{}')",
        false,
    ),
    (
        "door vault_reseal_quarantine",
        "SELECT vault_reseal_quarantine(-1, '{}', '{}', '{}')",
        false,
    ),
    (
        "lock vault_hold_keys",
        "SELECT vault_hold_keys('{1}')",
        false,
    ),
    (
        "lock vault_hold_erasures",
        "SELECT vault_hold_erasures()",
        false,
    ),
    (
        "lock vault_keys rows",
        "SELECT 1 FROM vault_keys FOR SHARE",
        false,
    ),
    (
        "INSERT file_sources",
        "INSERT INTO file_sources VALUES ('00000000-0000-0000-0000-000000000001', '2025-01-01')",
        false,
    ),
    (
        "SELECT file_sources",
        "SELECT first_day FROM file_sources",
        false,
    ),
    (
        "UPDATE file_sources",
        "UPDATE file_sources SET first_day = first_day",
        false,
    ),
    (
        "UPDATE lines_dated_when_ingested",
        "UPDATE lines_dated_when_ingested SET through = NULL",
        false,
    ),
    (
        "lock erasure_gate",
        "SELECT 1 FROM erasure_gate FOR SHARE",
        false,
    ),
    (
        "door vault_erase_user",
        "SELECT * FROM vault_erase_user('u-1', 'matrix', 'tests', false, '{1}', '{x}', '{\\x00}', false, false, NULL)",
        false,
    ),
    (
        "door vault_carry_erasures",
        "SELECT vault_carry_erasures(1, '{1}', '{x}', '{\\x00}')",
        false,
    ),
    (
        "door vault_retokenize_quarantine",
        "SELECT vault_retokenize_quarantine(-1, 1, '{1}', '{x}')",
        false,
    ),
    (
        "function vault_key_named",
        "SELECT vault_key_named(1)",
        false,
    ),
    (
        "SELECT erasures.(id, token_key_id, user_token, erased_at)",
        "SELECT id, token_key_id, user_token, erased_at FROM erasures",
        false,
    ),
    (
        "SELECT erasures.sealed_user_id",
        "SELECT sealed_user_id FROM erasures",
        false,
    ),
    (
        "door vault_expire_month",
        "SELECT * FROM vault_expire_month('2025-01-01', '{}')",
        false,
    ),
    (
        "function vault_drop_month (the expiry door's own)",
        "SELECT * FROM vault_drop_month('2025-01-01')",
        false,
    ),
    (
        "audit_append (the doors' own)",
        "SELECT audit_append('a', 'b', 'c', 'd', 0, 'e', '{}', '{}')",
        false,
    ),
];

/// What each role may do; everything else in [`MATRIX`] must be refused.
fn allowed_for(user: &str) -> &'static [&'static str] {
    match user {
        "ingester" => &[
            "INSERT user_logins",
            "INSERT login_vault",
            "INSERT quarantine",
            "SELECT vault_keys.(id, purpose, state)",
            "INSERT vault_keys",
            "door vault_key_request (the token key)",
            "lock vault_hold_keys",
            "lock vault_hold_erasures",
            "SELECT erasures.(id, token_key_id, user_token, erased_at)",
            "door vault_reveal_request",
            "door vault_reveal",
            // The day each file source was first ingested, which dates its lines (0021).
            "INSERT file_sources",
            "SELECT file_sources",
        ],
        "analyst" => &[
            "SELECT user_logins",
            "door vault_reveal_request",
            "door vault_reveal",
        ],
        "compliance" => &[
            "SELECT user_logins",
            "SELECT unmask_audit",
            "SELECT audit_checkpoints",
            "INSERT audit_checkpoints",
            "door vault_reveal_request",
            "door vault_reveal",
            "door vault_reveal_outcome",
        ],
        // No UPDATE of logins or sealed values: those go through the write doors.
        "keyadmin" => &[
            "SELECT user_logins",
            "SELECT login_vault.(login_id, data_key_id)",
            "SELECT quarantine.(id, message_id, reason)",
            "SELECT vault_keys.(id, purpose, state)",
            "INSERT vault_keys",
            "UPDATE vault_keys",
            "door vault_key_request (the token key)",
            "door vault_key_request (a data key)",
            "SELECT unmask_audit",
            "SELECT audit_checkpoints",
            "INSERT audit_checkpoints",
            "door vault_reveal_request",
            "door vault_reveal",
            "door vault_rotation_request",
            "door vault_rotation_page",
            "door vault_quarantine_request",
            "door vault_quarantine_page",
            "door vault_reseal_logins",
            "door vault_retokenize_logins",
            "door vault_reseal_quarantine",
            "door vault_erase_user",
            "door vault_carry_erasures",
            "door vault_retokenize_quarantine",
            "function vault_key_named",
            "SELECT erasures.(id, token_key_id, user_token, erased_at)",
            "SELECT erasures.sealed_user_id",
            "door vault_expire_month",
            "lock vault_keys rows",
        ],
        _ => &["door vault_reveal_request", "door vault_reveal"],
    }
}

#[tokio::test]
async fn every_role_may_do_exactly_its_duty_on_every_table_column_and_door() {
    let env = three_logins().await;
    let mut wrong = Vec::new();
    for user in ["ingester", "analyst", "compliance", "keyadmin", "nobody"] {
        let pool = env.pool_as(user).await;
        for (name, statement, needs_rows) in MATRIX {
            // Each attempt in its own transaction, rolled back: nothing it did stays.
            let mut tx = pool.begin().await.unwrap();
            let verdict = match sqlx::query(statement).fetch_all(&mut *tx).await {
                Ok(rows) if needs_rows && rows.is_empty() => Verdict::Refused,
                Ok(_) => Verdict::Allowed,
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
                    Verdict::Refused
                }
                // Past the privilege check, refused by the data (a NOT NULL column, a door's
                // own check): the statement was allowed to run.
                Err(sqlx::Error::Database(e))
                    if e.code()
                        .is_some_and(|c| ["22", "23", "P0"].contains(&&c[..2])) =>
                {
                    Verdict::Allowed
                }
                Err(other) => panic!("{user}: {name}: {other}"),
            };
            tx.rollback().await.unwrap();
            let expected = if allowed_for(user).contains(&name) {
                Verdict::Allowed
            } else {
                Verdict::Refused
            };
            if verdict != expected {
                wrong.push(format!(
                    "{user}: {name}: {verdict:?}, expected {expected:?}"
                ));
            }
        }
        pool.close().await;
    }
    assert!(wrong.is_empty(), "privileges differ:\n{}", wrong.join("\n"));
    assert!(
        outcomes(&env).await.is_empty(),
        "every attempt was rolled back"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn psql_as_compliance_reads_sealed_values_only_through_the_audited_door() {
    let env = three_logins().await;
    let compliance = env.pool_as("compliance").await;
    for statement in [
        "SELECT sealed_ip FROM login_vault",
        "SELECT * FROM login_vault",
        "SELECT wrapped_key FROM vault_keys",
        "SELECT sealed_body FROM quarantine",
    ] {
        let refused = sqlx::query(statement)
            .fetch_all(&compliance)
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("permission denied"),
            "{statement}: {refused}"
        );
    }
    assert!(outcomes(&env).await.is_empty());

    // The door answers psql like it answers unmask, and audits it the same way.
    type HandOut = (String, Option<Vec<u8>>, Option<Vec<u8>>);
    let request: i64 = sqlx::query_scalar(
        "SELECT vault_reveal_request('user_id', 'u-1', 'legal-request', 'court order 5', 'alice')",
    )
    .fetch_one(&compliance)
    .await
    .unwrap();
    let handed: Vec<HandOut> =
        sqlx::query_as("SELECT outcome, sealed_ip, data_key_wrapped FROM vault_reveal($1)")
            .bind(request)
            .fetch_all(&compliance)
            .await
            .unwrap();
    assert_eq!(handed.len(), 2);
    assert!(
        handed
            .iter()
            .all(|(outcome, sealed, key)| outcome == "handed-out"
                && sealed.is_some()
                && key.is_some())
    );
    compliance.close().await;
    let args = [
        "--user-id",
        "u-1",
        "--reason",
        "court order 5",
        "--actor",
        "alice",
    ];
    let output = unmask_as(&env, "compliance", "legal-request", &args);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    type Audited = (
        String,
        String,
        String,
        String,
        String,
        i32,
        String,
        Vec<i64>,
        Vec<i64>,
    );
    let rows: Vec<Audited> = sqlx::query_as(
        "SELECT actor, db_user, purpose, reason, question, values_revealed, outcome, login_ids,
                key_ids
         FROM unmask_audit WHERE outcome = 'handed-out' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0], rows[1], "psql's row is unmask's row");
    assert_eq!(rows[0].7.len(), 2, "both logins named");
    env.cleanup().await;
}

/// Recomputes every audit hash from row `from` on, as an owner rewriting history would.
fn rehash_from(from: i64) -> String {
    format!(
        "DO $$ DECLARE r record; prev bytea; BEGIN
           SELECT hash INTO prev FROM unmask_audit WHERE id < {from} ORDER BY id DESC LIMIT 1;
           FOR r IN SELECT * FROM unmask_audit WHERE id >= {from} ORDER BY id LOOP
             UPDATE unmask_audit SET prev_hash = prev,
               hash = audit_hash_v2(prev, r.at, r.actor, r.db_user, r.purpose, r.reason,
                                    r.question, r.values_revealed, r.outcome, r.login_ids, r.key_ids)
             WHERE id = r.id RETURNING hash INTO prev;
           END LOOP;
         END $$"
    )
}

/// A forged row with a correct hash over its content, claiming a reveal that never happened.
fn forged_row(id: i64, prev_of: &str) -> String {
    format!(
        "INSERT INTO unmask_audit (id, format, at, actor, db_user, purpose, reason, question,
                                   values_revealed, outcome, login_ids, key_ids, prev_hash, hash)
         OVERRIDING SYSTEM VALUE
         SELECT {id}, 2, p.at, 'mallory', 'compliance', 'legal-request', 'forged', 'user_id = u-2',
                0, 'nothing-found', '{{}}', '{{}}', p.hash,
                audit_hash_v2(p.hash, p.at, 'mallory', 'compliance', 'legal-request', 'forged',
                              'user_id = u-2', 0, 'nothing-found', '{{}}', '{{}}')
         FROM unmask_audit p WHERE p.id = ({prev_of})"
    )
}

/// The ids of the audit rows, in order.
/// The audit rows of keys handed out (to the ingester and the key admin) so far.
async fn keys_handed_out(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM unmask_audit WHERE outcome = 'keys-handed-out'")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// The ids of the audit rows after those of keys handed out while setting up.
async fn audit_ids(env: &TestEnv) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT id FROM unmask_audit
         WHERE id > coalesce((SELECT max(id) FROM unmask_audit
                              WHERE outcome = 'keys-handed-out'), 0)
         ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// `unmask audit-checkpoint` as the compliance officer (who may sign here): what it printed.
fn checkpoint_now(env: &TestEnv) -> String {
    let output = env.run_binary_as("compliance", UNMASK, &["audit-checkpoint"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains("signed"), "{}", stdout(&output));
    stdout(&output)
}

/// Three logins, one reveal, and checkpoint 1 signed and witnessed.
async fn witnessed_once() -> TestEnv {
    let env = three_logins().await;
    shown_to_officer(&env, &["--user-id", "u-1", "--reason", "one"]);
    assert!(checkpoint_now(&env).contains(": seq 1, "));
    env
}

/// `unmask verify-audit` as the compliance officer, with `extra` arguments.
fn verify_audit(env: &TestEnv, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["verify-audit"];
    args.extend_from_slice(extra);
    env.run_binary_as("compliance", UNMASK, &args)
}

/// The head hash an intact verify-audit printed (the last word of its first line).
fn head_of(output: &std::process::Output) -> String {
    assert_eq!(output.status.code(), Some(0), "{}", stderr(output));
    let text = stdout(output);
    let first = text.lines().next().unwrap_or_default();
    assert!(first.starts_with("audit intact: "), "{text}");
    first.rsplit(' ').next().unwrap().to_owned()
}

#[tokio::test]
async fn the_owner_cannot_rewrite_the_audit_unseen() {
    let env = three_logins().await;
    let reveal = |reason: &str| {
        shown_to_officer(&env, &["--user-id", "u-2", "--reason", reason]);
    };
    let checkpoint = || {
        checkpoint_now(&env);
    };
    reveal("one");
    // A reveal rolled back after the door ran leaves a gap in the ids, as a failed
    // transaction does in production: room for a forger to insert a row.
    let compliance = env.pool_as("compliance").await;
    let mut tx = compliance.begin().await.unwrap();
    sqlx::query("SELECT vault_reveal_request('user_id', 'u-2', 'legal-request', 'x', 'y')")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    compliance.close().await;
    reveal("two");
    checkpoint();
    reveal("three");
    checkpoint();
    reveal("four");
    let ids = audit_ids(&env).await;
    assert_eq!(ids.len(), 8);
    let gap = ids[1] + 1;
    assert_eq!(ids[2], gap + 1, "one id skipped");
    let verify = |extra: &[&str]| verify_audit(&env, extra);
    let intact = verify(&[]);
    assert_eq!(intact.status.code(), Some(0), "{}", stderr(&intact));
    let text = stdout(&intact);
    let rows = 8 + keys_handed_out(&env).await;
    assert!(
        text.starts_with(&format!(
            "audit intact: {rows} rows, 2 signed checkpoints, head "
        )),
        "{text}"
    );
    let head = head_of(&intact);

    // Even the owner may not change or remove a row while the triggers stand.
    for statement in [
        "UPDATE unmask_audit SET reason = 'x'",
        "DELETE FROM unmask_audit",
        "TRUNCATE unmask_audit",
        "INSERT INTO unmask_audit (at, actor, db_user, reason, question, values_revealed, outcome, prev_hash, hash)
         VALUES (now(), 'a', 'b', 'c', 'd', 0, 'e', '\\x00', '\\x01')",
        "UPDATE audit_checkpoints SET signature = '\\x00'",
        "DELETE FROM audit_checkpoints",
    ] {
        let refused = sqlx::query(statement).execute(&env.pool).await.unwrap_err();
        assert!(
            refused.to_string().contains("append-only")
                || refused.to_string().contains("door functions"),
            "{statement}: {refused}"
        );
    }

    // Past the triggers (the owner may disable them), a second successor of a row (a forged row
    // in a gap, or a fork off an old head) is still refused by the one-successor index...
    sqlx::raw_sql(
        "ALTER TABLE unmask_audit DISABLE TRIGGER USER;
         ALTER TABLE audit_checkpoints DISABLE TRIGGER USER;
         CREATE TABLE audit_copy AS SELECT * FROM unmask_audit;",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    for forged in [
        forged_row(gap, &ids[1].to_string()),
        forged_row(ids[7] + 1, &ids[2].to_string()),
    ] {
        let refused = sqlx::raw_sql(&forged).execute(&env.pool).await.unwrap_err();
        assert!(
            refused.to_string().contains("unmask_audit_one_successor"),
            "{refused}"
        );
    }
    // ...which the owner may drop too; from there each rewrite is named.
    sqlx::raw_sql("DROP INDEX unmask_audit_one_successor")
        .execute(&env.pool)
        .await
        .unwrap();
    let expect_head = ["--expect-head", head.as_str()];
    let cases: Vec<(&str, String, &[&str], String)> = vec![
        (
            "an edited row",
            format!("UPDATE unmask_audit SET values_revealed = 0 WHERE id = {}", ids[1]),
            &[],
            format!("audit row {} was edited", ids[1]),
        ),
        (
            "an edited row with every later hash recomputed",
            format!(
                "UPDATE unmask_audit SET reason = 'nothing to see' WHERE id = {}; {}",
                ids[4],
                rehash_from(ids[4])
            ),
            &[],
            format!(
                "audit rows after {} up to {} were rewritten: checkpoint",
                ids[3], ids[5]
            ),
        ),
        (
            "the newest rows deleted, back into a checkpoint",
            format!("DELETE FROM unmask_audit WHERE id >= {}", ids[5]),
            &[],
            format!("audit row {} was removed", ids[5]),
        ),
        (
            "the rows after the last checkpoint deleted, against a head kept elsewhere",
            format!("DELETE FROM unmask_audit WHERE id >= {}", ids[6]),
            &expect_head,
            "the expected head is not in the audit".to_owned(),
        ),
        (
            "a forged row inserted into a gap",
            forged_row(gap, &ids[1].to_string()),
            &[],
            format!("audit row {} does not follow", ids[2]),
        ),
        (
            "a forged row inserted into a gap with every later hash recomputed",
            format!("{}; {}", forged_row(gap, &ids[1].to_string()), rehash_from(ids[2])),
            &[],
            format!("audit rows after 0 up to {} were rewritten", ids[3]),
        ),
        (
            "a second chain forked off an old head",
            forged_row(ids[7] + 1, &ids[2].to_string()),
            &[],
            format!("audit row {} does not follow", ids[7] + 1),
        ),
        (
            "a checkpoint not signed by the signing key",
            format!(
                "INSERT INTO audit_checkpoints (last_audit_id, head_hash, signed_at, kms_key_id, signature)
                 SELECT id, hash, now(), 'forged', '\\x3006020101020101' FROM unmask_audit WHERE id = {}",
                ids[7]
            ),
            &[],
            "does not verify under the audit signing key".to_owned(),
        ),
    ];
    for (what, tamper, extra, named) in cases {
        sqlx::raw_sql(&tamper).execute(&env.pool).await.unwrap();
        let found = verify(extra);
        assert_eq!(found.status.code(), Some(4), "{what}: {}", stderr(&found));
        assert!(
            stderr(&found).contains(&named),
            "{what}: {}",
            stderr(&found)
        );
        assert!(stdout(&found).is_empty(), "{what}");
        // Back to the true history for the next case.
        sqlx::raw_sql(
            "DELETE FROM unmask_audit;
             INSERT INTO unmask_audit OVERRIDING SYSTEM VALUE SELECT * FROM audit_copy;
             DELETE FROM audit_checkpoints WHERE kms_key_id = 'forged';",
        )
        .execute(&env.pool)
        .await
        .unwrap();
        let restored = verify(&["--expect-head", &head]);
        assert_eq!(
            restored.status.code(),
            Some(0),
            "{what}: {}",
            stderr(&restored)
        );
    }
    env.cleanup().await;
}

/// Saves the audit and its checkpoints beside them, as they are (the triggers are disabled,
/// so an owner's rewrites can be undone for the next case).
const SAVE_AUDIT: &str = "ALTER TABLE unmask_audit DISABLE TRIGGER USER;
     ALTER TABLE audit_checkpoints DISABLE TRIGGER USER;
     CREATE TABLE audit_copy AS SELECT * FROM unmask_audit;
     CREATE TABLE checkpoint_copy AS SELECT * FROM audit_checkpoints;";

const RESTORE_AUDIT: &str = "DELETE FROM unmask_audit;
     INSERT INTO unmask_audit OVERRIDING SYSTEM VALUE SELECT * FROM audit_copy;
     DELETE FROM audit_checkpoints;
     INSERT INTO audit_checkpoints OVERRIDING SYSTEM VALUE SELECT * FROM checkpoint_copy;";

/// Issue cases (a) to (c): what an owner with the triggers disabled hides from the database
/// alone (verify-audit exits 0, even with a head kept elsewhere) is named with the witness.
#[tokio::test]
async fn the_witness_names_what_the_owner_hides_from_the_database() {
    let env = three_logins().await;
    let reveal = |reason: &str| {
        shown_to_officer(&env, &["--user-id", "u-2", "--reason", reason]);
    };
    reveal("one");
    assert!(checkpoint_now(&env).contains(": seq 1, "));
    // A head kept elsewhere after the first checkpoint.
    let early = head_of(&verify_audit(&env, &[]));
    reveal("two");
    assert!(checkpoint_now(&env).contains(": seq 2, "));
    reveal("three");
    let ids = audit_ids(&env).await;
    assert_eq!(ids.len(), 6);
    let witnessed = verify_audit(&env, &["--witness"]);
    head_of(&witnessed);
    assert!(
        stdout(&witnessed).contains(&format!("witness: checkpoint seq 2 (audit row {})", ids[3])),
        "{}",
        stdout(&witnessed)
    );
    assert!(stderr(&witnessed).is_empty(), "{}", stderr(&witnessed));

    sqlx::raw_sql(SAVE_AUDIT).execute(&env.pool).await.unwrap();
    let drop_newest_checkpoint = "DELETE FROM audit_checkpoints WHERE seq = 2";
    let expect_early: &[&str] = &["--expect-head", &early];
    let cases: Vec<(&str, String, &[&str], String)> = vec![
        (
            "(a) the witnessed head replaced by a forged row with a correct hash",
            format!(
                "{drop_newest_checkpoint}; DELETE FROM unmask_audit WHERE id >= {}; {}",
                ids[3],
                forged_row(ids[3], &ids[2].to_string())
            ),
            expect_early,
            format!(
                "audit row {} is not the row witnessed checkpoint seq 2 signed: the chain does not reach the witness",
                ids[3]
            ),
        ),
        (
            "(a) the witnessed head deleted and a forged row appended after it",
            format!(
                "{drop_newest_checkpoint}; DELETE FROM unmask_audit WHERE id >= {}; {}",
                ids[3],
                forged_row(ids[5] + 1, &ids[2].to_string())
            ),
            expect_early,
            format!(
                "audit row {} is gone but witnessed checkpoint seq 2 signed the chain up to it",
                ids[3]
            ),
        ),
        (
            "(b) the newest checkpoint deleted, then a reveal row rewritten",
            format!(
                "{drop_newest_checkpoint}; UPDATE unmask_audit SET reason = 'nothing to see' WHERE id = {}; {}",
                ids[2],
                rehash_from(ids[2])
            ),
            expect_early,
            format!(
                "audit row {} is not the row witnessed checkpoint seq 2 signed",
                ids[3]
            ),
        ),
        (
            "(b) the newest checkpoint deleted",
            drop_newest_checkpoint.to_owned(),
            expect_early,
            "checkpoints were removed from the database: the newest that verifies there is seq 1 but the witness holds seq 2".to_owned(),
        ),
        (
            "(b) an older checkpoint deleted",
            "DELETE FROM audit_checkpoints WHERE seq = 1".to_owned(),
            expect_early,
            "checkpoint seq 1 was removed from the database".to_owned(),
        ),
        (
            "(c) every row and checkpoint deleted",
            "DELETE FROM unmask_audit; DELETE FROM audit_checkpoints".to_owned(),
            &[],
            format!(
                "the audit chain is empty but the witness is not: witnessed checkpoint seq 2 signed it up to row {}",
                ids[3]
            ),
        ),
    ];
    for (what, tamper, unseen_with, named) in cases {
        sqlx::raw_sql(&tamper).execute(&env.pool).await.unwrap();
        let unseen = verify_audit(&env, unseen_with);
        assert_eq!(
            unseen.status.code(),
            Some(0),
            "{what}: the database alone cannot tell: {}",
            stderr(&unseen)
        );
        let mut args = vec!["--witness"];
        args.extend_from_slice(unseen_with);
        let found = verify_audit(&env, &args);
        assert_eq!(found.status.code(), Some(4), "{what}: {}", stderr(&found));
        let said = stderr(&found);
        assert!(said.contains(&named), "{what}: {said}");
        assert_eq!(said.trim().lines().count(), 1, "{what}: one line: {said}");
        assert!(stdout(&found).is_empty(), "{what}");
        sqlx::raw_sql(RESTORE_AUDIT)
            .execute(&env.pool)
            .await
            .unwrap();
        let restored = verify_audit(&env, &["--witness", "--expect-head", &early]);
        assert_eq!(
            restored.status.code(),
            Some(0),
            "{what}: {}",
            stderr(&restored)
        );
    }
    // The empty audit of (c) without the witness, as it was before witnessing.
    sqlx::raw_sql("DELETE FROM unmask_audit; DELETE FROM audit_checkpoints")
        .execute(&env.pool)
        .await
        .unwrap();
    assert!(stdout(&verify_audit(&env, &[])).starts_with("audit intact: 0 rows"));
    sqlx::raw_sql(RESTORE_AUDIT)
        .execute(&env.pool)
        .await
        .unwrap();
    // The signer refuses to sign a head the witness does not reach...
    sqlx::raw_sql(drop_newest_checkpoint)
        .execute(&env.pool)
        .await
        .unwrap();
    let refused = env.run_binary_as("compliance", UNMASK, &["audit-checkpoint"]);
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("checkpoints were removed from the database"));
    // ...and signs the true history on.
    sqlx::raw_sql(RESTORE_AUDIT)
        .execute(&env.pool)
        .await
        .unwrap();
    assert!(checkpoint_now(&env).contains(": seq 3, "));
    env.cleanup().await;
}

/// Issue case (d): whoever holds INSERT on audit_checkpoints (compliance, the key admin) can
/// plant a row that does not verify. Without a witness it still fails verification (it could
/// be a forgery hiding a rewrite); with the witness deciding, it is named and skipped, and
/// checkpointing carries on past it.
#[tokio::test]
async fn a_checkpoint_planted_by_compliance_or_the_key_admin_is_named_and_skipped() {
    let env = witnessed_once().await;
    for (user, seq, next) in [("compliance", "2", 2), ("keyadmin", "NULL", 3)] {
        let pool = env.pool_as(user).await;
        let planted: i64 = sqlx::query_scalar(&format!(
            "INSERT INTO audit_checkpoints (seq, last_audit_id, head_hash, signed_at, kms_key_id, signature)
             SELECT {seq}, id, hash, now(), 'planted', '\\x3006020101020101'
             FROM unmask_audit ORDER BY id DESC LIMIT 1 RETURNING id"
        ))
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{user} may insert checkpoints: {e}"));
        pool.close().await;

        let strict = verify_audit(&env, &[]);
        assert_eq!(strict.status.code(), Some(4), "{user}: {}", stderr(&strict));
        assert!(
            stderr(&strict).contains("does not verify under the audit signing key"),
            "{user}: {}",
            stderr(&strict)
        );

        let witnessed = verify_audit(&env, &["--witness"]);
        assert_eq!(
            witnessed.status.code(),
            Some(0),
            "{user}: {}",
            stderr(&witnessed)
        );
        assert!(
            stderr(&witnessed).contains(&format!(
                "warning: checkpoint row {planted} (inserted by {user}) does not verify under the audit signing key: skipped"
            )),
            "{user}: {}",
            stderr(&witnessed)
        );
        // The signer is not stopped either, even by a row claiming the next number.
        let signed = env.run_binary_as("compliance", UNMASK, &["audit-checkpoint"]);
        assert_eq!(signed.status.code(), Some(0), "{user}: {}", stderr(&signed));
        assert!(
            stdout(&signed).contains(&format!(": seq {next}, ")),
            "{user}: {}",
            stdout(&signed)
        );
        assert!(stderr(&signed).contains(&format!("checkpoint row {planted}")));
        let after = verify_audit(&env, &["--witness"]);
        assert!(
            stdout(&after).contains(&format!("witness: checkpoint seq {next} ")),
            "{user}: {}{}",
            stdout(&after),
            stderr(&after)
        );
    }
    env.cleanup().await;
}

/// audit-checkpoint writes the database first: a run that ends before witnessing leaves a
/// signed checkpoint ahead of the witness, which verifies, and which the next run witnesses
/// before signing the next number.
#[tokio::test]
async fn a_checkpoint_stored_but_not_witnessed_verifies_and_the_next_run_witnesses_it() {
    let env = witnessed_once().await;
    shown_to_officer(&env, &["--user-id", "u-2", "--reason", "two"]);
    // What a signer killed between its COMMIT and its PutObject leaves: checkpoint 2, signed
    // by the key and stored, not witnessed.
    let (last, head, signed_at): (i64, Vec<u8>, time::OffsetDateTime) = sqlx::query_as(
        "SELECT id, hash, date_trunc('milliseconds', clock_timestamp())
         FROM unmask_audit ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let message = pii_vault::audit::checkpoint_message_v2(2, last, &head, signed_at);
    let signature = env
        .kms
        .client()
        .sign()
        .key_id(&env.audit_signing_key_id)
        .message(aws_sdk_kms::primitives::Blob::new(message))
        .message_type(aws_sdk_kms::types::MessageType::Raw)
        .signing_algorithm(aws_sdk_kms::types::SigningAlgorithmSpec::EcdsaSha256)
        .send()
        .await
        .unwrap()
        .signature
        .unwrap()
        .into_inner();
    let compliance = env.pool_as("compliance").await;
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, last_audit_id, head_hash, signed_at, kms_key_id, signature)
         VALUES (2, $1, $2, $3, $4, $5)",
    )
    .bind(last)
    .bind(&head)
    .bind(signed_at)
    .bind(&env.audit_signing_key_id)
    .bind(&signature)
    .execute(&compliance)
    .await
    .unwrap();
    compliance.close().await;

    let ahead = verify_audit(&env, &["--witness"]);
    head_of(&ahead);
    assert!(
        stdout(&ahead).contains("witness: checkpoint seq 1 "),
        "{}",
        stdout(&ahead)
    );
    let next = checkpoint_now(&env);
    assert!(
        next.contains("checkpoint seq 2 (stored earlier, not yet witnessed) witnessed in"),
        "{next}"
    );
    assert!(next.contains(": seq 3, "), "{next}");
    let witnessed = env.witness().await.versions().await.unwrap();
    let mut keys: Vec<String> = witnessed.into_iter().map(|(key, _)| key).collect();
    keys.sort();
    assert_eq!(
        keys,
        (1..=3)
            .map(pii_vault::audit::witness::object_key)
            .collect::<Vec<_>>()
    );
    let after = verify_audit(&env, &["--witness"]);
    assert!(
        stdout(&after).contains("witness: checkpoint seq 3 "),
        "{}",
        stdout(&after)
    );
    env.cleanup().await;
}

/// The witness holds: Object Lock refuses to delete a witnessed checkpoint's version, and a
/// delete marker (which Object Lock allows) or a newer version stacked on the key hides
/// nothing from verify-audit --witness.
#[tokio::test]
async fn object_lock_keeps_the_witnessed_checkpoints() {
    let env = witnessed_once().await;
    let witness = env.witness().await;
    let key = pii_vault::audit::witness::object_key(1);
    let versions = witness.versions().await.unwrap();
    assert_eq!(versions.len(), 1, "{versions:?}");
    let (listed, version) = &versions[0];
    assert_eq!(listed, &key);
    let original = witness.get_version(&key, version).await.unwrap();

    let path = format!("/{key}?versionId={version}");
    let deleted = witness
        .send("DeleteObject", "DELETE", &path, &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(deleted.status, 403, "{:?}", deleted.body);
    assert_eq!(
        witness.refusal("DeleteObject", &deleted).code(),
        Some("AccessDenied")
    );
    assert_eq!(witness.get_version(&key, version).await.unwrap(), original);

    // What Object Lock does allow: a delete marker, and a newer version over the key.
    let marker = witness
        .send(
            "DeleteObject",
            "DELETE",
            &format!("/{key}"),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
    assert!((200..300).contains(&marker.status), "{}", marker.status);
    let stacked = witness
        .send(
            "PutObject",
            "PUT",
            &format!("/{key}"),
            &[("content-md5", "CY9rzUYh03PK3k6DJie09g==".to_owned())],
            b"test".to_vec(),
        )
        .await
        .unwrap();
    assert!((200..300).contains(&stacked.status), "{}", stacked.status);
    sqlx::raw_sql(SAVE_AUDIT).execute(&env.pool).await.unwrap();
    sqlx::raw_sql("DELETE FROM unmask_audit; DELETE FROM audit_checkpoints")
        .execute(&env.pool)
        .await
        .unwrap();
    let found = verify_audit(&env, &["--witness"]);
    assert_eq!(found.status.code(), Some(4), "{}", stderr(&found));
    assert!(
        stderr(&found).contains("the audit chain is empty but the witness is not"),
        "{}",
        stderr(&found)
    );
    sqlx::raw_sql(RESTORE_AUDIT)
        .execute(&env.pool)
        .await
        .unwrap();
    let intact = verify_audit(&env, &["--witness"]);
    assert_eq!(intact.status.code(), Some(0), "{}", stderr(&intact));
    assert!(
        stderr(&intact).contains(&format!("warning: witness object {key} (version ")),
        "the stacked version is named: {}",
        stderr(&intact)
    );

    // A bucket without Object Lock witnesses nothing: refused, for signing and verifying.
    let unlocked = format!("{}-unlocked", env.audit_witness_bucket);
    let made =
        pii_vault::audit::witness::WitnessBucket::new(&common::aws_config().await, &unlocked, 1)
            .send("CreateBucket", "PUT", "", &[], Vec::new())
            .await
            .unwrap();
    assert_eq!(made.status, 200);
    for args in [&["verify-audit", "--witness"][..], &["audit-checkpoint"]] {
        let mut all = args.to_vec();
        all.extend(["--audit-witness-bucket", &unlocked]);
        let refused = env.run_binary_as("compliance", UNMASK, &all);
        assert_eq!(
            refused.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&refused)
        );
        assert!(
            stderr(&refused).contains(&format!("witness bucket {unlocked} has no Object Lock")),
            "{args:?}: {}",
            stderr(&refused)
        );
    }
    env.cleanup().await;
}

#[tokio::test]
async fn when_the_audit_cannot_be_written_nothing_is_revealed() {
    let env = three_logins().await;
    // A failing audit append, as a full disk or a broken constraint would cause: first at the
    // outcome row (values already opened in memory), then at the door's own row.
    for outcome in ["revealed", "handed-out"] {
        sqlx::raw_sql(&format!(
            "CREATE OR REPLACE FUNCTION fail_append() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.outcome = '{outcome}' THEN RAISE EXCEPTION 'audit storage unavailable'; END IF;
               RETURN NEW;
             END $$;
             DROP TRIGGER IF EXISTS fail_append ON unmask_audit;
             CREATE TRIGGER fail_append BEFORE INSERT ON unmask_audit
               FOR EACH ROW EXECUTE FUNCTION fail_append();"
        ))
        .execute(&env.pool)
        .await
        .unwrap();
        let output = unmask_as_officer(
            &env,
            &["--user-id", "u-1", "--reason", "r", "--format", "json"],
        );
        assert_eq!(
            output.status.code(),
            Some(1),
            "{outcome}: {}",
            stderr(&output)
        );
        assert!(stdout(&output).is_empty(), "{outcome}: nothing written");
        assert!(
            stderr(&output).contains("audit storage unavailable"),
            "{}",
            stderr(&output)
        );
        assert!(!stderr(&output).contains("10.0.0"), "{}", stderr(&output));
    }
    let recorded = outcomes(&env).await;
    assert_eq!(
        recorded,
        [pair("handed-out", 0)],
        "only what committed stays"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn eight_officers_at_once_leave_one_chain_that_verifies() {
    let env = three_logins().await;
    let officers: Vec<common::Running> = (0..8)
        .map(|i| {
            common::Running::spawn(
                std::process::Command::new(UNMASK)
                    .args([
                        "--user-id",
                        if i % 2 == 0 { "u-1" } else { "u-2" },
                        "--purpose",
                        "security-incident",
                        "--reason",
                        &format!("incident {i}"),
                    ])
                    .envs(env.binary_env())
                    .env("DATABASE_URL", env.url_as("compliance")),
            )
        })
        .collect();
    for officer in officers {
        let ended = officer.wait(common::BINARY_LIMIT);
        assert_eq!(ended.status.code(), Some(0), "{}", ended.stderr);
        assert!(ended.stdout.contains("10.0.0."));
    }
    let mut recorded = outcomes(&env).await;
    recorded.sort();
    let mut expected: Vec<(String, i32)> = (0..8)
        .flat_map(|i| {
            [
                pair("handed-out", 0),
                pair("revealed", if i % 2 == 0 { 4 } else { 2 }),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(recorded, expected);
    let verified = env.run_binary_as("compliance", UNMASK, &["verify-audit"]);
    assert_eq!(verified.status.code(), Some(0), "{}", stderr(&verified));
    let rows = 16 + keys_handed_out(&env).await;
    assert!(
        stdout(&verified).starts_with(&format!("audit intact: {rows} rows")),
        "{}",
        stdout(&verified)
    );
    env.cleanup().await;
}

#[tokio::test]
async fn hostile_revealed_values_cannot_act_on_the_officer() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let formula = "=cmd|' /C calc'!A0";
    let reversing = "abc\u{202E}fed";
    let summary = env
        .ingest_bodies(&[
            login("u-h", "10.9.9.1", formula),
            login("u-h", "10.9.9.2", reversing),
            login("u-h", "10.9.9.3", "@SUM(1+1)"),
        ])
        .await;
    assert_eq!(summary.stored, 3);
    let text = shown_to_officer(
        &env,
        &["--user-id", "u-h", "--reason", "r", "--format", "csv"],
    );
    assert!(text.contains("\"'=cmd|' /C calc'!A0\""), "{text}");
    assert!(text.contains("\"'@SUM(1+1)\""), "{text}");
    for cell in text.lines().flat_map(|line| line.split(',')) {
        assert!(
            !cell.starts_with(['=', '+', '-', '@']),
            "live formula cell {cell:?} in {text}"
        );
    }
    let text = shown_to_officer(&env, &["--user-id", "u-h", "--reason", "r"]);
    assert!(text.contains("abc\\u{202e}fed"), "{text}");
    assert!(
        !text.contains('\u{202E}'),
        "the control character is not printed raw"
    );
    let json = shown_to_officer(
        &env,
        &["--user-id", "u-h", "--reason", "r", "--format", "json"],
    );
    let values: Vec<String> = json
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["device_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(
        values.contains(&reversing.to_owned()) && values.contains(&formula.to_owned()),
        "JSON carries the data as is"
    );
    env.cleanup().await;
}

/// Each way of tampering with stored data, done with SQL as the table owner could. (A token
/// changed to another value's is not among them: the officer holds no token key to check it;
/// `rotate-keys verify` finds it, see `a_token_that_does_not_match_its_value_is_found_by_verify`.)
const TAMPERING: [(&str, &str); 5] = [
    (
        "a ciphertext copied from another login of the same user",
        "UPDATE login_vault SET sealed_ip = (SELECT v.sealed_ip FROM login_vault v JOIN user_logins l ON l.id = v.login_id
           WHERE l.user_id = 'u-1' ORDER BY l.id DESC LIMIT 1)
         WHERE login_id = (SELECT min(id) FROM user_logins WHERE user_id = 'u-1')",
    ),
    (
        "a ciphertext copied from another user",
        "UPDATE login_vault SET sealed_device_id = (SELECT v.sealed_device_id FROM login_vault v JOIN user_logins l ON l.id = v.login_id
           WHERE l.user_id = 'u-2')
         WHERE login_id = (SELECT min(id) FROM user_logins WHERE user_id = 'u-1')",
    ),
    (
        "a changed data key id",
        "UPDATE login_vault SET data_key_id = (SELECT max(id) FROM vault_keys WHERE purpose = 'data')
         WHERE login_id = (SELECT min(id) FROM user_logins WHERE user_id = 'u-1')",
    ),
    (
        "a corrupted wrapped key",
        "UPDATE vault_keys SET wrapped_key = set_byte(wrapped_key, length(wrapped_key) - 1,
           get_byte(wrapped_key, length(wrapped_key) - 1) # 1)
         WHERE id = (SELECT data_key_id FROM login_vault LIMIT 1)",
    ),
    (
        "a wrapped key presented under another key id (wrong encryption context)",
        "UPDATE vault_keys SET wrapped_key = (SELECT wrapped_key FROM vault_keys WHERE purpose = 'data' ORDER BY id DESC LIMIT 1)
         WHERE id = (SELECT data_key_id FROM login_vault LIMIT 1)",
    ),
];

/// The analysts' token of a login changed to another value's: the officer, who holds no token
/// key, still gets the sealed value (format 2 commits to its key without the token); the key
/// admin's verification, which holds the token key through the audited key door, names the row.
#[tokio::test]
async fn a_token_that_does_not_match_its_value_is_found_by_verify() {
    let env = three_logins().await;
    let victim: i64 = sqlx::query_scalar("SELECT min(id) FROM user_logins WHERE user_id = 'u-1'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE user_logins SET masked_ip = (SELECT masked_ip FROM user_logins WHERE user_id = 'u-2')
         WHERE id = $1",
    )
    .bind(victim)
    .execute(&env.pool)
    .await
    .unwrap();
    let output = unmask_as_officer(&env, &["--user-id", "u-1", "--reason", "r"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let verify = env.run_binary_as("keyadmin", ROTATE_KEYS, &["verify"]);
    assert_ne!(verify.status.code(), Some(0), "{}", stdout(&verify));
    let message = stderr(&verify);
    assert!(
        message.contains(&format!("login {victim} ")) && message.contains("stored token"),
        "{message}"
    );
    assert!(!message.contains("10.0.0"), "{message}");
    env.cleanup().await;
}

#[tokio::test]
async fn tampering_is_an_integrity_failure_naming_the_row_and_reveals_nothing() {
    for (what, statement) in TAMPERING {
        let env = three_logins().await;
        // A second data key, so that tampering can point at a key that exists.
        env.keyring().new_sealer().await.unwrap();
        let victim: (i64, String) = sqlx::query_as(
            "SELECT id, coalesce(message_id_text, message_id::text) FROM user_logins
             WHERE user_id = 'u-1' ORDER BY id LIMIT 1",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        sqlx::raw_sql(statement).execute(&env.pool).await.unwrap();

        let output = unmask_as_officer(&env, &["--user-id", "u-1", "--reason", "r"]);
        assert_eq!(output.status.code(), Some(4), "{what}: {}", stderr(&output));
        assert!(stdout(&output).is_empty(), "{what}: nothing printed");
        let message = stderr(&output);
        assert!(
            message.contains(&format!("login {} (message {})", victim.0, victim.1)),
            "{what}: {message}"
        );
        assert!(!message.contains("10.0.0"), "{what}: {message}");
        // A wrapped key KMS will not unwrap is a KMS refusal; the rest fail after unwrapping.
        let refused_by_kms = what.contains("wrapped key");
        assert_eq!(
            message.contains("KMS refused"),
            refused_by_kms,
            "{what}: {message}"
        );
        let outcome = if refused_by_kms {
            "kms-refused"
        } else {
            "integrity-failure"
        };
        assert_eq!(
            outcomes(&env).await,
            [pair("handed-out", 0), pair(outcome, 0)],
            "{what}"
        );
        env.cleanup().await;
    }
}

#[tokio::test]
async fn kms_is_called_once_per_distinct_key_not_per_row() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let bodies: Vec<String> = (0..300)
        .map(|i| {
            login(
                "many",
                &format!("10.1.{}.{}", i / 256, i % 256),
                &format!("{i:03}-00-0000"),
            )
        })
        .collect();
    env.ingest_bodies(&bodies).await;
    let compliance = sqlx::PgPool::connect(&env.url_as("compliance"))
        .await
        .unwrap();
    let keyring = Keyring::new(
        compliance.clone(),
        env.kms.clone(),
        &env.kms_key_id,
        "tests",
    );
    let before = env.kms.calls();
    let revealed = unmask::unmask(
        &compliance,
        &keyring,
        &Request {
            question: Question::UserId("many".into()),
            purpose: RevealPurpose::SecurityIncident,
            reason: "r".into(),
            actor: "tests".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(revealed.len(), 300);
    // One data key; no token key (format 2 values carry their own key commitment).
    assert_eq!(env.kms.calls() - before, 1);
    compliance.close().await;
    env.cleanup().await;
}

/// The format-2 hash is computed only by `audit_hash_v2` in the database, so the database is
/// held to the golden vectors too (`tests/data/vectors/audit.json`, made by
/// `scripts/format-vectors.py` from docs/FORMAT.md §7): a migration that changed the encoding
/// would leave every later row unverifiable.
#[tokio::test]
async fn audit_hash_v2_in_the_database_matches_the_format_vectors() {
    let env = TestEnv::new(30).await;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/vectors/audit.json");
    let vectors: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let unhex = |field: &serde_json::Value| {
        let hex = field.as_str().unwrap();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    };
    let ids = |field: &serde_json::Value| -> Vec<i64> {
        field
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_i64().unwrap())
            .collect()
    };
    let mut checked = 0;
    for row in vectors["rows"].as_array().unwrap() {
        if row["format"] != 2 {
            continue;
        }
        let micros = i128::from(row["at_micros"].as_i64().unwrap());
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(micros * 1_000).unwrap();
        let hash: Vec<u8> = sqlx::query_scalar(
            "SELECT audit_hash_v2($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(unhex(&row["prev_hash"]))
        .bind(at)
        .bind(row["actor"].as_str().unwrap())
        .bind(row["db_user"].as_str().unwrap())
        .bind(row["purpose"].as_str().unwrap())
        .bind(row["reason"].as_str().unwrap())
        .bind(row["question"].as_str().unwrap())
        .bind(i32::try_from(row["values_revealed"].as_i64().unwrap()).unwrap())
        .bind(row["outcome"].as_str().unwrap())
        .bind(ids(&row["login_ids"]))
        .bind(ids(&row["key_ids"]))
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(hash, unhex(&row["hash"]), "audit.json row {}", row["id"]);
        checked += 1;
    }
    assert_eq!(checked, 3);
    env.cleanup().await;
}
