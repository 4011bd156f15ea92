//! Retention windows among the other key commands, through the binary and the emulator's KMS:
//! `rewrap` leaves each window's data keys under the window's own KMS key and puts nothing else
//! under one, and `window` refuses a KMS key that wraps anything outside its window, so that
//! expiring a window shreds exactly that window; expiry drops the month, by the key admin's
//! door alone, and late logins of an expired month keep nothing.

use crate::common::{TestEnv, VecSource, logins, rotate_keys, stderr, stdout, unique_suffix};
use pii_vault::ingest::source::{Message, Receipt};
use pii_vault::unmask;

const MONTHS: [&str; 3] = ["2025-01", "2025-02", "2025-03"];
const LOGINS_PER_MONTH: usize = 40;
const LOGINS_NOW: usize = 30;

/// One stored key: id, purpose, window (its first day), KMS key, wrapped bytes.
type KeyRow = (i64, String, Option<time::Date>, String, Option<Vec<u8>>);

async fn key_rows(env: &TestEnv) -> Vec<KeyRow> {
    sqlx::query_as(
        "SELECT id, purpose, window_starts, kms_key_id, wrapped_key FROM vault_keys ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

async fn verified_logins(env: &TestEnv) -> u64 {
    let keyadmin = env.pool_as("keyadmin").await;
    let verified = unmask::verify_all(&keyadmin, &env.keyring_on(&keyadmin))
        .await
        .expect("every stored value opens");
    keyadmin.close().await;
    verified.logins
}

async fn key_state(env: &TestEnv, kms_key: &str) -> aws_sdk_kms::types::KeyState {
    env.kms
        .client()
        .describe_key()
        .key_id(kms_key)
        .send()
        .await
        .expect("DescribeKey")
        .key_metadata
        .and_then(|m| m.key_state)
        .expect("a key state")
}

fn month_start(month: &str) -> time::Date {
    let (year, month) = month.split_once('-').unwrap();
    let month = time::Month::try_from(month.parse::<u8>().unwrap()).unwrap();
    time::Date::from_calendar_date(year.parse().unwrap(), month, 1).unwrap()
}

/// `rotate-keys expire` up to 2025-02-01 (January's window and nothing later), applied or
/// planned; it must succeed.
async fn expire_january(env: &TestEnv, apply: bool) -> std::process::Output {
    let today = time::OffsetDateTime::now_utc().date();
    let days = (today - month_start("2025-02")).whole_days();
    let horizon = format!("{days}d");
    let mut args = vec!["expire", "--older-than", &horizon];
    if apply {
        args.extend(["--apply", "--grace-seconds", "0"]);
    }
    let output = rotate_keys(env, &args).await;
    assert!(output.status.success(), "{}", stderr(&output));
    output
}

#[tokio::test]
async fn rewrap_leaves_each_window_under_its_own_kms_key_and_puts_nothing_else_under_one() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let mut window_keys = Vec::new();
    for month in MONTHS {
        let arn = env.new_kms_key("pii-vault test: retention window").await;
        let output = rotate_keys(&env, &["window", "--month", month, "--key", &arn]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        window_keys.push(arn);
    }
    for (seed, month) in (1..).zip(MONTHS) {
        let sent =
            month_start(month).with_hms(12, 0, 0).unwrap().assume_utc() + time::Duration::days(14);
        env.drain_from(VecSource::sent_at(&logins(LOGINS_PER_MONTH, seed), sent))
            .await;
        // A quarantined body of the month: sealed under a data key of its window too.
        env.drain_from(VecSource::sent_at(&["not json".to_owned()], sent))
            .await;
    }
    env.ingest_bodies(&logins(LOGINS_NOW, 9)).await;
    let before = key_rows(&env).await;
    for (month, window_key) in MONTHS.iter().zip(&window_keys) {
        let starts = Some(month_start(month));
        let under_it: Vec<&KeyRow> = before.iter().filter(|k| k.3 == *window_key).collect();
        assert!(!under_it.is_empty(), "{month} has data keys");
        assert!(under_it.iter().all(|k| k.1 == "data" && k.2 == starts));
    }
    let outside: Vec<&KeyRow> = before.iter().filter(|k| k.2.is_none()).collect();
    assert_eq!(outside.len(), 2, "the token key and today's data key");
    assert!(outside.iter().all(|k| k.3 == env.kms_key_id));

    // A window's KMS key as the target, by ARN or by an alias of it: refused, nothing moved.
    let alias = format!("alias/pii-vault-test-{}", unique_suffix());
    env.kms
        .client()
        .create_alias()
        .alias_name(&alias)
        .target_key_id(&window_keys[1])
        .send()
        .await
        .expect("CreateAlias");
    for (target, month) in [(&window_keys[0], "2025-01"), (&alias, "2025-02")] {
        let refused = rotate_keys(&env, &["rewrap", "--kms-key-id", target]).await;
        assert_eq!(refused.status.code(), Some(3), "{}", stdout(&refused));
        let said = stderr(&refused);
        assert!(
            said.contains(&format!("is the KMS key of retention window {month}-01"))
                && said.contains("nothing was re-wrapped"),
            "{said}"
        );
        assert_eq!(key_rows(&env).await, before, "rewrap to {target}");
    }
    // Nor can a window be registered under a key that wraps something outside it: the key
    // new keys go under, or another window's.
    let taken = [
        ("2025-04", env.kms_key_id.as_str(), "KMS_KEY_ID"),
        (
            "2025-05",
            window_keys[0].as_str(),
            "wraps keys outside that window",
        ),
    ];
    for (month, key, why) in taken {
        let refused = rotate_keys(&env, &["window", "--month", month, "--key", key]).await;
        assert_eq!(refused.status.code(), Some(3), "{}", stdout(&refused));
        let said = stderr(&refused);
        assert!(
            said.contains(&format!(
                "cannot be the KMS key of retention window {month}-01"
            )) && said.contains(why),
            "{said}"
        );
    }
    assert_eq!(env.count("retention_windows").await, 3);

    let new_key = env.new_kms_key("pii-vault test: rewrap target").await;
    let output = rotate_keys(&env, &["rewrap", "--kms-key-id", &new_key]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let window_data_keys = before.len() - outside.len();
    assert_eq!(
        stdout(&output).trim(),
        format!(
            "re-wrapped 2 keys under {new_key}; {window_data_keys} data key(s) of retention \
             windows stay under their window's own KMS key"
        )
    );
    let after = key_rows(&env).await;
    for (was, now) in before.iter().zip(&after) {
        if was.2.is_some() {
            assert_eq!(now, was, "a window's data key is untouched");
        } else {
            assert_eq!((now.0, &now.3), (was.0, &new_key));
            assert_ne!(now.4, was.4, "re-wrapped");
        }
    }
    // With the old KMS key disabled, everything still opens: each window through its own key.
    env.kms
        .client()
        .disable_key()
        .key_id(&env.kms_key_id)
        .send()
        .await
        .expect("DisableKey");
    let all = (MONTHS.len() * LOGINS_PER_MONTH + LOGINS_NOW) as u64;
    assert_eq!(verified_logins(&env).await, all);

    // Expiring January (the horizon is 2025-02-01) shreds January alone: its KMS key is
    // scheduled for deletion, and the token key and the other windows open as before.
    let output = expire_january(&env, true).await;
    let said = stdout(&output);
    assert!(
        said.contains("expired window 2025-01") && !said.contains("2025-02"),
        "{said}"
    );
    use aws_sdk_kms::types::KeyState;
    assert_eq!(
        key_state(&env, &window_keys[0]).await,
        KeyState::PendingDeletion
    );
    for key in [&window_keys[1], &window_keys[2], &new_key] {
        assert_eq!(key_state(&env, key).await, KeyState::Enabled);
    }
    assert_eq!(
        verified_logins(&env).await,
        all - LOGINS_PER_MONTH as u64,
        "what is left opens; January's logins went with its month"
    );
    let sealed: Vec<(String, i64)> = sqlx::query_as(
        "SELECT to_char(l.create_date, 'YYYY-MM'), count(*) FROM user_logins l
         JOIN login_vault v ON v.login_id = l.id GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let per_month = LOGINS_PER_MONTH as i64;
    let this_month = time::OffsetDateTime::now_utc().date().to_string()[..7].to_owned();
    assert_eq!(
        sealed,
        [
            ("2025-02".to_owned(), per_month),
            ("2025-03".to_owned(), per_month),
            (this_month, LOGINS_NOW as i64)
        ],
        "January's values are gone"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn expiry_deletes_a_body_of_its_month_quarantined_before_the_window_existed() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let mid = |month| month_start(month).with_hms(12, 0, 0).unwrap().assume_utc();
    // Quarantined while January had no window: sealed under a data key of no window.
    for month in ["2025-01", "2025-03"] {
        let summary = env
            .drain_from(VecSource::sent_at(&["not json".to_owned()], mid(month)))
            .await;
        assert_eq!(summary.quarantined, 1);
    }
    let arn = env.new_kms_key("pii-vault test: retention window").await;
    let output = rotate_keys(&env, &["window", "--month", "2025-01", "--key", &arn]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let plan = expire_january(&env, false).await;
    expire_january(&env, true).await;
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT to_char(sent_at AT TIME ZONE 'UTC', 'YYYY-MM') FROM quarantine
         WHERE sealed_body IS NOT NULL",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        left,
        ["2025-03"],
        "January's body is gone, whatever key sealed it; plan: {}",
        stdout(&plan)
    );
    env.cleanup().await;
}

/// Expiry drops the month (migration 0019): only through the key admin's door, only for a
/// window that is expiring and has ended; a login of the expired month that arrives late is
/// quarantined without its body, and the month's partitions do not come back.
#[tokio::test]
async fn an_expired_month_is_dropped_and_its_late_logins_keep_nothing() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let mut window_keys = Vec::new();
    for month in ["2025-01", "2025-02"] {
        let arn = env.new_kms_key("pii-vault test: retention window").await;
        let output = rotate_keys(&env, &["window", "--month", month, "--key", &arn]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        window_keys.push(arn);
    }
    let mid = |month| month_start(month).with_hms(12, 0, 0).unwrap().assume_utc();
    env.drain_from(VecSource::sent_at(&logins(20, 51), mid("2025-01")))
        .await;
    env.drain_from(VecSource::sent_at(&logins(10, 52), mid("2025-02")))
        .await;
    let january_partitions = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_class
              WHERE relname IN ('user_logins_2025_01', 'login_vault_2025_01')",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    assert_eq!(january_partitions().await, 2);

    // From outside: the door refuses an active window; nobody calls the drop itself.
    let keyadmin = env.pool_as("keyadmin").await;
    let active = sqlx::query("SELECT * FROM vault_expire_month('2025-01-01', '{}')")
        .execute(&keyadmin)
        .await
        .unwrap_err();
    assert!(
        active
            .to_string()
            .contains("only the month of an expiring window"),
        "{active}"
    );
    for user in ["keyadmin", "analyst", "compliance", "ingester"] {
        let pool = env.pool_as(user).await;
        for statement in [
            "SELECT * FROM vault_drop_month('2025-01-01')",
            "DROP TABLE user_logins_2025_01",
        ] {
            let refused = sqlx::query(statement).execute(&pool).await.unwrap_err();
            assert!(
                refused.to_string().contains("permission denied")
                    || refused.to_string().contains("must be owner"),
                "{user}: {statement}: {refused}"
            );
        }
        pool.close().await;
    }
    assert_eq!(january_partitions().await, 2, "nothing dropped");

    // January's window expiring, the door is attacked from the caller's side: a transaction
    // rolled back after the drop, at every isolation level, keeps the month and writes no
    // audit row.
    sqlx::query("UPDATE retention_windows SET state = 'expiring' WHERE starts = '2025-01-01'")
        .execute(&keyadmin)
        .await
        .unwrap();
    let expired_rows = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM unmask_audit WHERE outcome = 'expired'")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    for level in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"] {
        let mut tx = keyadmin.begin().await.unwrap();
        sqlx::query(&format!("SET TRANSACTION ISOLATION LEVEL {level}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        let dropped: (i64, i64) =
            sqlx::query_as("SELECT * FROM vault_expire_month('2025-01-01', '{}')")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert_eq!(dropped, (20, 0), "{level}");
        tx.rollback().await.unwrap();
        assert_eq!(january_partitions().await, 2, "{level}: rolled back");
    }
    assert_eq!(expired_rows().await, 0);

    // The door is the key admin's by membership, as every door: a role granted it through
    // another role may call it once it has set the role (it does not inherit); a login that is
    // not a member cannot set the role.
    let role_admin = pii_vault::testing::role_admin().await;
    let suffix = unique_suffix();
    let (team, ops) = (
        format!("expiry_team_{suffix}"),
        format!("expiry_ops_{suffix}"),
    );
    sqlx::raw_sql(&format!(
        "CREATE ROLE {team} NOLOGIN; GRANT pii_vault_keyadmin TO {team};
         CREATE ROLE {ops} LOGIN NOINHERIT PASSWORD '{ops}' IN ROLE {team};"
    ))
    .execute(&role_admin)
    .await
    .unwrap();
    let nested = env.pool_as(&ops).await;
    let mut conn = nested.acquire().await.unwrap();
    let refused = sqlx::query("SELECT * FROM vault_expire_month('2025-01-01', '{}')")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("permission denied"),
        "{refused}"
    );
    sqlx::raw_sql("SET ROLE pii_vault_keyadmin; BEGIN")
        .execute(&mut *conn)
        .await
        .unwrap();
    let dropped: (i64, i64) =
        sqlx::query_as("SELECT * FROM vault_expire_month('2025-01-01', '{}')")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(dropped, (20, 0));
    sqlx::raw_sql("ROLLBACK; RESET ROLE")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    nested.close().await;
    sqlx::raw_sql(&format!("DROP ROLE {ops}; DROP ROLE {team}"))
        .execute(&role_admin)
        .await
        .unwrap();
    role_admin.close().await;
    let analyst = env.pool_as("analyst").await;
    let set = sqlx::query("SET ROLE pii_vault_keyadmin")
        .execute(&analyst)
        .await
        .unwrap_err();
    assert!(
        set.to_string().contains("permission denied to set role"),
        "{set}"
    );
    analyst.close().await;
    assert_eq!((january_partitions().await, expired_rows().await), (2, 0));

    // A lock on another month (what autovacuum or an owner's ANALYZE takes) does not hold the
    // expiry up: the door locks the parents, not every month's partition (migration 0020).
    let mut other_month = env.pool.begin().await.unwrap();
    sqlx::query(
        "LOCK TABLE user_logins_2025_02, login_vault_2025_02 IN SHARE UPDATE EXCLUSIVE MODE",
    )
    .execute(&mut *other_month)
    .await
    .unwrap();
    // (While that lock is held the month could not be dropped under a lock of every month:
    // expire would give up with MonthHeld, and this helper asserts success.)
    let output = expire_january(&env, true).await;
    other_month.commit().await.unwrap();
    assert!(
        stdout(&output).contains(
            "expired window 2025-01 (logins dated 2025-01-01 to 2025-01-31): 20 login(s)"
        ),
        "{}",
        stdout(&output)
    );
    assert_eq!(january_partitions().await, 0, "the month is dropped");
    let per_month: Vec<(String, i64)> = sqlx::query_as(
        "SELECT to_char(create_date, 'YYYY-MM'), count(*) FROM user_logins GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(per_month, [("2025-02".to_owned(), 10)]);

    // Late for January: a valid login and an invalid one, each delivered twice.
    let late = || {
        let bodies = [
            crate::common::login("u-late", "10.7.7.7", "late-device"),
            r#"{"user_id": "u-late", "ip": 5}"#.to_owned(),
        ];
        let messages = bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| Message {
                id: format!("late-{i}"),
                body: body.into_bytes(),
                sent_at: Some(mid("2025-01")),
                receipt: Receipt(format!("late-{i}")),
                read_at: std::time::Instant::now(),
            })
            .collect();
        VecSource::of_messages(messages)
    };
    let first = env.drain_from(late()).await;
    assert_eq!((first.stored, first.quarantined), (0, 2), "{first}");
    let again = env.drain_from(late()).await;
    assert_eq!((again.stored, again.quarantined), (0, 0), "{again}");
    let kept: Vec<(String, Option<String>, bool, bool)> = sqlx::query_as(
        "SELECT reason, body_withheld, sealed_body IS NULL, user_token IS NULL FROM quarantine
          WHERE sent_at < '2025-02-01' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(kept.len(), 2, "each late message recorded once: {kept:?}");
    assert_eq!(
        kept[0],
        (
            pii_vault::ingest::batch::LATE_FOR_ITS_WINDOW.to_owned(),
            Some("window-expired".to_owned()),
            true,
            true
        )
    );
    assert_eq!(
        (kept[1].1.as_deref(), kept[1].2, kept[1].3),
        (Some("window-expired"), true, true)
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE user_id = 'u-late'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);

    // The month does not come back, by `window` or the door.
    let fresh = env.new_kms_key("pii-vault test: retention window").await;
    let again = rotate_keys(&env, &["window", "--month", "2025-01", "--key", &fresh]).await;
    assert!(!again.status.success());
    assert!(stderr(&again).contains("has expired"), "{}", stderr(&again));
    let added = sqlx::query("SELECT vault_add_month('2025-01-01')")
        .execute(&keyadmin)
        .await
        .unwrap_err();
    assert!(added.to_string().contains("has expired"), "{added}");
    assert_eq!(january_partitions().await, 0);
    keyadmin.close().await;
    env.cleanup().await;
}
