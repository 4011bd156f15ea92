//! Late messages of an erased person, over real SQS and PostgreSQL: an invalid message sent
//! before the erasure and delivered after it keeps no body.

use std::time::{Duration, Instant};

use crate::common::{self, TestEnv, login, stderr};
use pii_vault::ingest::source::{Message, Receipt};
use pii_vault::ingest::{batch, writer};
use pii_vault::unmask;
use pii_vault::vault::erasure::ErasedUsers;

const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");

/// A rejected body naming `user`, `ip` and `device_id` (an unexpected field `extra`).
fn rejected(user: &str, ip: &str, device_id: &str) -> String {
    format!(r#"{{"user_id": "{user}", "ip": "{ip}", "device_id": "{device_id}", "extra": 1}}"#)
}

async fn run(
    env: &TestEnv,
    program: &'static str,
    user: &str,
    args: &[&str],
) -> std::process::Output {
    let mut command = std::process::Command::new(program);
    command.args(args).envs(env.binary_env());
    if !user.is_empty() {
        command.env("DATABASE_URL", env.url_as(user));
    }
    tokio::task::spawn_blocking(move || common::output_of(&mut command))
        .await
        .unwrap()
}

async fn erase(env: &TestEnv, user: &str) {
    let erased = run(
        env,
        ROTATE_KEYS,
        "keyadmin",
        &["erase", "--user-id", user, "--reason", "ticket 9"],
    )
    .await;
    assert!(erased.status.success(), "{}", stderr(&erased));
}

/// (logins, with tokens, with sealed values) of a user.
async fn what_remains_of(env: &TestEnv, user: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(l.masked_ip) + count(l.masked_device_id), count(v.login_id)
         FROM user_logins l LEFT JOIN login_vault v ON v.login_id = l.id WHERE l.user_id = $1",
    )
    .bind(user)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// A quarantine row as stored: (reason, body_bytes, sealed body kept, data key, user token,
/// token key, body_withheld, sent_at known).
type Quarantined = (
    String,
    i32,
    bool,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    bool,
);

async fn quarantined(env: &TestEnv) -> Vec<Quarantined> {
    sqlx::query_as(
        "SELECT reason, body_bytes, sealed_body IS NOT NULL, data_key_id, user_token,
                token_key_id, body_withheld, sent_at IS NOT NULL
         FROM quarantine ORDER BY body_bytes",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_invalid_message_of_a_user_erased_after_it_was_sent_keeps_no_body() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[login("u-1", "10.9.9.0", "d-0")]).await;
    let of_erased = rejected("u-1", "10.9.9.1", "secret-device-1");
    let of_other = rejected("u-2", "10.9.9.2", "dev-2");
    // Sent before the erasure, still on the queue while it runs.
    env.send(&[
        of_erased.clone(),
        of_other.clone(),
        login("u-1", "10.9.9.3", "d-3"),
    ])
    .await;
    erase(&env, "u-1").await;
    env.drain_until_empty(Duration::from_secs(60)).await;

    let rows = quarantined(&env).await;
    let reason = "unexpected field `extra`".to_owned();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows[1],
        (
            reason.clone(),
            of_erased.len() as i32,
            false,
            None,
            None,
            None,
            Some("user-erased".to_owned()),
            true
        ),
        "recorded, with nothing of its body and nothing that names its user"
    );
    let (_, bytes, kept, data_key, token, token_key, withheld, _) = &rows[0];
    assert_eq!(
        (bytes, kept, withheld),
        (&(of_other.len() as i32), &true, &None)
    );
    assert!(data_key.is_some() && token.is_some() && token_key.is_some());
    assert_eq!(what_remains_of(&env, "u-1").await, (2, 0, 0));

    // Nothing withheld is handed out: the key admin's verify opens the other body only, and a
    // data-key rotation re-seals around the withheld row.
    let keyadmin = env.pool_as("keyadmin").await;
    let verified = unmask::verify_all(&keyadmin, &env.keyring_on(&keyadmin))
        .await
        .unwrap();
    assert_eq!((verified.logins, verified.bodies), (2, 1));
    let rotated = run(
        &env,
        ROTATE_KEYS,
        "keyadmin",
        &["data-key", "--grace-seconds", "0"],
    )
    .await;
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    assert_eq!(quarantined(&env).await[1].6.as_deref(), Some("user-erased"));
    let withheld: Option<String> =
        sqlx::query_scalar("SELECT body_withheld FROM quarantine WHERE body_withheld IS NOT NULL")
            .fetch_one(&keyadmin)
            .await
            .unwrap();
    assert_eq!(
        withheld.as_deref(),
        Some("user-erased"),
        "the runbook's look-up"
    );

    // The database holds the shape: no body comes back to a withheld row, even by the owner.
    for tamper in [
        "UPDATE quarantine SET sealed_body = '\\x01' WHERE body_withheld IS NOT NULL",
        "UPDATE quarantine SET body_withheld = NULL WHERE body_withheld IS NOT NULL",
        "UPDATE quarantine SET user_token = 'x', token_key_id = 1 WHERE body_withheld IS NOT NULL",
        "UPDATE quarantine SET body_withheld = 'user-erased' WHERE body_withheld IS NULL",
        "UPDATE quarantine SET body_withheld = 'no reason' WHERE body_withheld IS NOT NULL",
    ] {
        let refused = sqlx::query(tamper).execute(&env.pool).await.unwrap_err();
        let code = refused.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("23514"), "{tamper}: {refused}");
    }
    keyadmin.close().await;
    env.cleanup().await;
}

/// The database's rule, for an ingester that does not know it (an older release during an
/// upgrade): a body inserted with the token of a user erased after it was sent is withheld.
#[tokio::test]
async fn the_database_withholds_a_body_an_ingester_would_keep_for_an_erased_user() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[login("u-1", "10.0.0.1", "d-1")]).await;
    erase(&env, "u-1").await;
    let (token_key, token): (i64, String) =
        sqlx::query_as("SELECT token_key_id, user_token FROM erasures")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let data_key: i64 = sqlx::query_scalar("SELECT id FROM vault_keys WHERE purpose = 'data'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let ingester = env.pool_as("ingester").await;
    for (message_id, sent) in [
        ("m-before", "-1 hour"),
        ("m-after", "1 hour"),
        ("m-unknown", ""),
    ] {
        sqlx::query(
            "INSERT INTO quarantine (message_id, reason, body_bytes, sealed_body, sent_at,
                                     user_token, token_key_id, data_key_id)
             VALUES ($1, 'r', 3, '\\x010203',
                     now() + nullif($2, '')::interval, $3, $4, $5)",
        )
        .bind(message_id)
        .bind(sent)
        .bind(&token)
        .bind(token_key)
        .bind(data_key)
        .execute(&ingester)
        .await
        .unwrap();
    }
    let rows: Vec<(String, Option<String>, bool, bool)> = sqlx::query_as(
        "SELECT message_id, body_withheld, sealed_body IS NULL, user_token IS NULL
         FROM quarantine ORDER BY message_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let withheld = (Some("user-erased".to_owned()), true, true);
    assert_eq!(
        rows,
        [
            ("m-after".to_owned(), None, false, false),
            (
                "m-before".to_owned(),
                withheld.0.clone(),
                withheld.1,
                withheld.2
            ),
            ("m-unknown".to_owned(), withheld.0, withheld.1, withheld.2),
        ],
        "sent after the erasure: new data, kept"
    );
    ingester.close().await;
    env.cleanup().await;
}

/// The batch decides with the erasures it knows; the writer commits it only under the erasure
/// gate with no newer erasure, so a body sealed before an erasure is never stored after it.
#[tokio::test]
async fn a_quarantined_body_sealed_before_an_erasure_is_refused_and_withheld_when_made_again() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&[login("u-1", "10.0.0.1", "d-1")]).await;
    let keyring = env.keyring();
    let tokenizer = keyring.active_tokenizer().await.unwrap();
    let sealer = keyring.new_sealer().await.unwrap();
    // Sent before the erasure, made into a batch on both sides of it.
    let sent = time::OffsetDateTime::now_utc();
    let message = || Message {
        id: "m-late".to_owned(),
        body: rejected("u-1", "10.0.0.9", "d-9").into_bytes(),
        sent_at: Some(sent),
        receipt: Receipt("r".to_owned()),
        read_at: Instant::now(),
    };
    let known = ErasedUsers::load(&env.pool, &keyring).await.unwrap();
    let made_before = batch::build(vec![message()], &tokenizer, &sealer, &known, false);
    assert!(made_before.quarantined[0].body.sealed().is_some());
    erase(&env, "u-1").await;
    let outcome = writer::write(&env.pool, &made_before).await;
    assert!(
        matches!(outcome, Err(writer::WriteError::ErasuresChanged)),
        "{outcome:?}"
    );
    assert_eq!(env.count("quarantine").await, 0);
    let known = ErasedUsers::load(&env.pool, &keyring).await.unwrap();
    let made_after = batch::build(vec![message()], &tokenizer, &sealer, &known, false);
    let written = writer::write(&env.pool, &made_after).await.unwrap();
    assert_eq!(written.quarantined, 1);
    assert_eq!(quarantined(&env).await[0].6.as_deref(), Some("user-erased"));
    env.cleanup().await;
}
