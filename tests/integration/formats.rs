//! Keys where they belong: no officer holds the token key, every wrapped key leaves the table
//! through the audited key door, and values sealed in format 1 still open and move to format 2
//! with a data-key rotation.

use crate::common::{self, TestEnv, login, stderr, stdout, three_logins};
use pii_vault::vault::place::login_place;
use pii_vault::vault::token::Field;

const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");
const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");

/// `unmask --format json` for `user` as the compliance officer: its lines, and stderr.
fn reveal_json(env: &TestEnv, user: &str) -> (Vec<serde_json::Value>, String) {
    let output = env.run_binary_as(
        "compliance",
        UNMASK,
        &[
            "--user-id",
            user,
            "--purpose",
            "fraud-investigation",
            "--reason",
            "formats",
            "--format",
            "json",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let lines = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    (lines, stderr(&output))
}

#[tokio::test]
async fn the_reveal_door_hands_out_no_token_key_and_format_2_values_open_without_one() {
    let env = three_logins().await;
    let compliance = env.pool_as("compliance").await;
    let request: i64 = sqlx::query_scalar(
        "SELECT vault_reveal_request('user_id', 'u-1', 'fraud-investigation', 'columns', 'x')",
    )
    .fetch_one(&compliance)
    .await
    .unwrap();
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(proargnames)::text FROM pg_proc WHERE proname = 'vault_reveal'",
    )
    .fetch_all(&compliance)
    .await
    .unwrap();
    assert!(
        columns.contains(&"data_key_wrapped".to_owned()),
        "{columns:?}"
    );
    assert!(
        !columns.iter().any(|c| c.starts_with("token_key")),
        "the reveal door names no token key: {columns:?}"
    );
    let handed: Vec<(Option<i64>, Option<i16>)> =
        sqlx::query_as("SELECT data_key_id, data_key_format FROM vault_reveal($1)")
            .bind(request)
            .fetch_all(&compliance)
            .await
            .unwrap();
    assert_eq!(handed.len(), 2);
    assert!(
        handed.iter().all(|(_, format)| *format == Some(2)),
        "{handed:?}"
    );
    compliance.close().await;

    let (lines, notes) = reveal_json(&env, "u-1");
    assert_eq!(lines.len(), 2);
    assert!(
        lines.iter().all(|l| l["key_committed"] == true),
        "{lines:?}"
    );
    assert!(!notes.contains("format 1"), "{notes}");
    env.cleanup().await;
}

#[tokio::test]
async fn no_role_reads_wrapped_keys_and_the_key_admin_unwraps_only_through_the_audited_door() {
    let env = three_logins().await;
    for user in ["keyadmin", "ingester", "compliance", "analyst"] {
        let pool = env.pool_as(user).await;
        for attempt in [
            "SELECT wrapped_key FROM vault_keys",
            "SELECT count(*) FROM vault_keys WHERE wrapped_key IS NOT NULL",
            "COPY vault_keys TO STDOUT",
            "SELECT * FROM vault_keys",
        ] {
            let error = sqlx::raw_sql(attempt).execute(&pool).await.unwrap_err();
            assert!(
                pii_vault::db::is_permission_denied(&error),
                "{user}: {attempt}: {error}"
            );
        }
        pool.close().await;
    }
    let keyadmin = env.pool_as("keyadmin").await;
    // Its UPDATE right does not let it copy the bytes somewhere it may read them.
    let error = sqlx::query("UPDATE vault_keys SET kms_key_id = encode(wrapped_key, 'hex')")
        .execute(&keyadmin)
        .await
        .unwrap_err();
    assert!(pii_vault::db::is_permission_denied(&error), "{error}");
    // The ingester may ask the door for token keys only.
    let ingester = env.pool_as("ingester").await;
    let error = sqlx::query(
        "SELECT vault_key_request(ARRAY(SELECT id FROM vault_keys WHERE purpose = 'data'), 'x')",
    )
    .execute(&ingester)
    .await
    .unwrap_err();
    assert!(pii_vault::db::is_permission_denied(&error), "{error}");
    ingester.close().await;

    // A token-key rotation unwraps both token keys, each through the door, each audited.
    let before: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM unmask_audit")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let token_keys: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM vault_keys WHERE purpose = 'token'")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let rotated = env.run_binary_as(
        "keyadmin",
        ROTATE_KEYS,
        &["token-key", "--grace-seconds", "0"],
    );
    assert_eq!(rotated.status.code(), Some(0), "{}", stderr(&rotated));
    let unwrapped: Vec<Vec<i64>> = sqlx::query_scalar(
        "SELECT key_ids FROM unmask_audit
         WHERE id > $1 AND outcome = 'keys-handed-out' AND db_user = 'keyadmin' ORDER BY id",
    )
    .bind(before)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let new_token_key: i64 = sqlx::query_scalar(
        "SELECT id FROM vault_keys WHERE purpose = 'token' AND state = 'active'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    for key in token_keys.iter().chain([&new_token_key]) {
        assert!(
            unwrapped.iter().any(|keys| keys.contains(key)),
            "token key {key} unwrapped without an audit row: {unwrapped:?}"
        );
    }
    keyadmin.close().await;
    env.cleanup().await;
}

/// A deployment upgraded from format 1: its values open for the officer, who is told they are
/// not key-committed; `rotate-keys data-key` re-seals them in format 2, after which they are.
#[tokio::test]
async fn format_1_values_open_uncommitted_until_a_data_key_rotation_moves_them_to_format_2() {
    let env = TestEnv::new(30).await;
    let (tokenizer, sealer) = common::keys_before_0011(&env).await;
    let message_id = "0c2d9a7e-5b1f-4c55-9f31-0e8d2a7b9c10";
    let (ip, device_id) = ("10.9.8.7", "dev-format-1");
    let login_id: i64 = sqlx::query_scalar(
        "INSERT INTO user_logins (user_id, device_type, masked_ip, masked_device_id, app_version,
                                  create_date, message_id, token_key_id, app_version_text)
         VALUES ('u-old', 'ios', $1, $2, 1000000, current_date, $3::uuid, $4, '1.0')
         RETURNING id",
    )
    .bind(tokenizer.token_of(Field::Ip, ip).unwrap().as_str())
    .bind(
        tokenizer
            .token_of(Field::DeviceId, device_id)
            .unwrap()
            .as_str(),
    )
    .bind(message_id)
    .bind(tokenizer.key_id())
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let seal = |field, value: &str| {
        sealer.seal(&login_place(field, message_id, "u-old"), value.as_bytes())
    };
    sqlx::query(
        "INSERT INTO login_vault (login_id, data_key_id, sealed_ip, sealed_device_id, create_date)
         SELECT $1, $2, $3, $4, create_date FROM user_logins WHERE id = $1",
    )
    .bind(login_id)
    .bind(sealer.key_id())
    .bind(seal(Field::Ip, ip))
    .bind(seal(Field::DeviceId, device_id))
    .execute(&env.pool)
    .await
    .unwrap();
    // A new login, ingested now, is sealed in format 2 beside it.
    assert_eq!(
        env.ingest_bodies(&[login("u-old", "10.9.8.8", "dev-format-2")])
            .await
            .stored,
        1
    );

    let (lines, notes) = reveal_json(&env, "u-old");
    let committed: Vec<(String, bool)> = lines
        .iter()
        .map(|l| {
            (
                l["ip"].as_str().unwrap().to_owned(),
                l["key_committed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        committed,
        [("10.9.8.7".into(), false), ("10.9.8.8".into(), true)]
    );
    assert!(
        notes.contains("1 login(s) are sealed in format 1"),
        "{notes}"
    );

    let rotated = env.run_binary_as(
        "keyadmin",
        ROTATE_KEYS,
        &["data-key", "--grace-seconds", "0"],
    );
    assert_eq!(rotated.status.code(), Some(0), "{}", stderr(&rotated));
    let formats: Vec<(i16, i32)> = sqlx::query_as(
        "SELECT k.format, length(v.sealed_ip) FROM login_vault v
         JOIN vault_keys k ON k.id = v.data_key_id WHERE v.login_id = $1",
    )
    .bind(login_id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(formats, [(2, ip.len() as i32 + 60)]);
    let (lines, notes) = reveal_json(&env, "u-old");
    assert!(
        lines.iter().all(|l| l["key_committed"] == true),
        "{lines:?}"
    );
    assert_eq!(lines[0]["ip"], "10.9.8.7");
    assert!(!notes.contains("format 1"), "{notes}");
    env.cleanup().await;
}
