//! unmask over the wire: real PostgreSQL roles, KMS in the emulator, the binary as an officer
//! runs it.

mod common;

use common::{TestEnv, login, stderr, stdout};
use pii_vault::unmask::{self, Question, Request};
use pii_vault::vault::keyring::Keyring;

const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");

/// Three logins: u-1 twice (two devices), u-2 once sharing u-1's first device.
async fn three_logins() -> TestEnv {
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

async fn audit_rows(env: &TestEnv) -> Vec<(String, String, i32, String)> {
    sqlx::query_as(
        "SELECT db_user, outcome, values_revealed, question FROM unmask_audit ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_officer_recovers_a_users_values_and_the_reveal_is_audited() {
    let env = three_logins().await;
    let output = env.run_binary_as(
        "compliance",
        UNMASK,
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

    let audit: Vec<(String, String, i32, String, String, String)> = sqlx::query_as(
        "SELECT db_user, outcome, values_revealed, question, actor, reason FROM unmask_audit",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        audit,
        [(
            "compliance".to_owned(),
            "revealed".to_owned(),
            4,
            "user_id = u-1".to_owned(),
            "alice".to_owned(),
            "ticket 7".to_owned()
        )]
    );

    let table = env.run_binary_as("compliance", UNMASK, &["--user-id", "u-2", "--reason", "t"]);
    assert_eq!(table.status.code(), Some(0), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(text.starts_with("create_date"), "{text}");
    assert!(
        text.contains("10.0.0.3") && text.contains("111-11-1111"),
        "{text}"
    );
    let csv = env.run_binary_as(
        "compliance",
        UNMASK,
        &["--user-id", "u-2", "--reason", "t", "--format", "csv"],
    );
    assert_eq!(stdout(&csv).lines().count(), 2, "header and one row");
    assert_eq!(audit_rows(&env).await.len(), 3);
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
    let output = env.run_binary_as(
        "compliance",
        UNMASK,
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
    let output = env.run_binary_as(
        "compliance",
        UNMASK,
        &["--masked-ip", &ip_token, "--reason", "r"],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains("10.0.0.3"));
    assert!(audit_rows(&env).await[1].3.starts_with("masked_ip = "));
    env.cleanup().await;
}

#[tokio::test]
async fn nothing_found_exits_1_after_auditing_the_attempt() {
    let env = three_logins().await;
    let output = env.run_binary_as(
        "compliance",
        UNMASK,
        &["--user-id", "nobody", "--reason", "r"],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
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
    let cases: [&[&str]; 5] = [
        &["--user-id", "u-1"],
        &["--user-id", "u-1", "--reason", "  \t"],
        &["--user-id", "u-1", "--masked-ip", "ab", "--reason", "r"],
        &["--reason", "r"],
        &["--user-id", "u-1", "--reason", "r", "--format", "xml"],
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
async fn users_without_the_compliance_role_are_not_authorized() {
    let env = three_logins().await;
    for user in ["analyst", "ingester", "keyadmin"] {
        let output = env.run_binary_as(user, UNMASK, &["--user-id", "u-1", "--reason", "curious"]);
        assert_eq!(output.status.code(), Some(3), "{user}: {}", stderr(&output));
        assert!(stdout(&output).is_empty());
        let message = stderr(&output);
        assert!(
            message.contains("not authorized") && message.contains(user),
            "{message}"
        );
        assert!(!message.contains("10.0.0.1"), "{message}");
    }
    // The analyst sees tokens, not the vault.
    let analyst = sqlx::PgPool::connect(&env.url_as("analyst")).await.unwrap();
    let tokens: i64 = sqlx::query_scalar("SELECT count(masked_ip) FROM user_logins")
        .fetch_one(&analyst)
        .await
        .unwrap();
    assert_eq!(tokens, 3);
    let vault = sqlx::query("SELECT * FROM login_vault")
        .fetch_all(&analyst)
        .await;
    assert!(vault.is_err(), "the analyst cannot read the vault");
    analyst.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_audit_is_append_only_and_verify_names_the_broken_row() {
    let env = three_logins().await;
    for reason in ["one", "two", "three"] {
        let output = env.run_binary_as(
            "compliance",
            UNMASK,
            &["--user-id", "u-1", "--reason", reason],
        );
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }
    let verified = env.run_binary_as("compliance", UNMASK, &["verify-audit"]);
    assert_eq!(verified.status.code(), Some(0), "{}", stderr(&verified));
    assert!(
        stdout(&verified).starts_with("audit intact: 3 rows"),
        "{}",
        stdout(&verified)
    );

    // The compliance role may append, not rewrite.
    let compliance = sqlx::PgPool::connect(&env.url_as("compliance"))
        .await
        .unwrap();
    for statement in [
        "UPDATE unmask_audit SET reason = 'x'",
        "DELETE FROM unmask_audit",
    ] {
        let refused = sqlx::query(statement).execute(&compliance).await;
        assert!(refused.is_err(), "{statement}");
    }
    compliance.close().await;

    // Whoever can write anyway (the owner here) is caught by the chain.
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM unmask_audit ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE unmask_audit SET values_revealed = 0 WHERE id = $1")
        .bind(ids[1])
        .execute(&env.pool)
        .await
        .unwrap();
    let edited = env.run_binary(UNMASK, &["verify-audit"]);
    assert_eq!(edited.status.code(), Some(1));
    assert!(
        stderr(&edited).contains(&format!("audit row {} was edited", ids[1])),
        "{}",
        stderr(&edited)
    );

    sqlx::query("DELETE FROM unmask_audit WHERE id = $1")
        .bind(ids[1])
        .execute(&env.pool)
        .await
        .unwrap();
    let deleted = env.run_binary(UNMASK, &["verify-audit"]);
    assert_eq!(deleted.status.code(), Some(1));
    assert!(
        stderr(&deleted).contains(&format!("audit row {} does not follow", ids[2])),
        "{}",
        stderr(&deleted)
    );
    env.cleanup().await;
}

/// Each way of tampering with stored data, done with SQL as the table owner could.
const TAMPERING: [(&str, &str); 6] = [
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
    (
        "a token that does not match the sealed value",
        "UPDATE user_logins SET masked_ip = (SELECT masked_ip FROM user_logins WHERE user_id = 'u-2')
         WHERE id = (SELECT min(id) FROM user_logins WHERE user_id = 'u-1')",
    ),
];

#[tokio::test]
async fn tampering_is_an_integrity_failure_naming_the_row_and_reveals_nothing() {
    for (what, statement) in TAMPERING {
        let env = three_logins().await;
        // A second data key, so that tampering can point at a key that exists.
        env.keyring().new_sealer().await.unwrap();
        let victim: (i64, String) = sqlx::query_as(
            "SELECT id, message_id FROM user_logins WHERE user_id = 'u-1' ORDER BY id LIMIT 1",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        sqlx::raw_sql(statement).execute(&env.pool).await.unwrap();

        let output =
            env.run_binary_as("compliance", UNMASK, &["--user-id", "u-1", "--reason", "r"]);
        assert_eq!(output.status.code(), Some(4), "{what}: {}", stderr(&output));
        assert!(stdout(&output).is_empty(), "{what}: nothing printed");
        let message = stderr(&output);
        assert!(
            message.contains(&format!("login {} (message {})", victim.0, victim.1)),
            "{what}: {message}"
        );
        assert!(!message.contains("10.0.0"), "{what}: {message}");
        assert_eq!(
            audit_rows(&env).await,
            [(
                "compliance".into(),
                "integrity-failure".into(),
                0,
                "user_id = u-1".into()
            )],
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
            reason: "r".into(),
            actor: "tests".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(revealed.len(), 300);
    // One data key and one token key (to check each value against its token).
    assert_eq!(env.kms.calls() - before, 2);
    compliance.close().await;
    env.cleanup().await;
}
