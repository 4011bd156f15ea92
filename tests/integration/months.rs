//! Logins stored by month (migration 0017): a month without partitions keeps its messages on
//! the queue and readiness names it; each month has its own keys, without the login date
//! (0022), and stores a message once; idempotency holds across months, for a redelivered
//! message, for a file replayed on a later day (its lines dated by their source, 0021) and for
//! lines stored before that; the months are added by the key admin alone, and a partition is
//! no way around the parents' grants; the doors hand out a user's logins of several months
//! together (0018), and rotation and erasure write only in their logins' months (0020).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::common::{self, TestEnv, login, rotate_keys, sample_bodies, stderr, stdout};
use pii_vault::ingest::batch::Batch;
use pii_vault::ingest::source::file::FileSource;
use pii_vault::ingest::source::{Message, Receipt};
use pii_vault::ingest::{self, Settings};
use pii_vault::telemetry::readiness::Condition;
use pii_vault::vault::seal::Sealer;
use pii_vault::vault::token::Tokenizer;
use time::{Date, Month, OffsetDateTime};

fn at(year: i32, month: Month, day: u8, hms: (u8, u8, u8)) -> OffsetDateTime {
    Date::from_calendar_date(year, month, day)
        .unwrap()
        .with_hms(hms.0, hms.1, hms.2)
        .unwrap()
        .assume_utc()
}

async fn partitions_of(env: &TestEnv, month: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits
          WHERE inhparent IN ('user_logins'::regclass, 'login_vault'::regclass)
            AND inhrelid::regclass::text IN ('user_logins_' || $1, 'login_vault_' || $1)",
    )
    .bind(month)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_month_without_partitions_keeps_its_logins_on_the_queue_and_readiness_names_it() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let sent = at(2021, Month::March, 15, (12, 0, 0));
    assert_eq!(partitions_of(&env, "2021_03").await, 0);
    let messages = || -> Vec<Message> {
        (0..3)
            .map(|n| Message {
                id: format!("march-{n}"),
                body: login(&format!("u-{n}"), "10.1.1.1", "dev").into_bytes(),
                sent_at: Some(sent),
                receipt: Receipt(format!("r-{n}")),
                read_at: Instant::now(),
            })
            .collect()
    };
    let storage = Arc::new(Condition::default());
    let run = |messages: Vec<Message>| {
        let settings = Settings {
            drain: true,
            flush_interval: Duration::from_millis(20),
            storage: storage.clone(),
            ..Settings::default()
        };
        ingest::run(
            common::VecSource::of_messages(messages),
            env.pool.clone(),
            env.keyring(),
            settings,
            Arc::default(),
            CancellationToken::new(),
        )
    };
    let summary = run(messages()).await.unwrap();
    assert_eq!(
        (summary.stored, summary.left_on_queue, summary.acknowledged),
        (0, 3, 0),
        "{summary}"
    );
    let why = storage.get().expect("readiness says why");
    assert!(why.contains("no partition for logins of 2021-03"), "{why}");
    assert!(why.contains("rotate-keys partitions"), "{why}");
    assert_eq!(env.count("user_logins").await, 0);

    // The key admin adds the month: the same messages, delivered again, are stored.
    env.add_month(sent.date()).await;
    assert_eq!(partitions_of(&env, "2021_03").await, 2);
    let summary = run(messages()).await.unwrap();
    assert_eq!((summary.stored, summary.left_on_queue), (3, 0), "{summary}");
    assert_eq!(storage.get(), None, "a stored batch clears it");

    // Without this month's partitions, readiness fails before any message does.
    let this_month: String = sqlx::query_scalar("SELECT to_char(current_date, 'YYYY_MM')")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let report = |env: &TestEnv| {
        let checks = ingest::readiness::checks(
            env.pool.clone(),
            None,
            env.keyring(),
            Arc::default(),
            Arc::default(),
        );
        pii_vault::telemetry::readiness::Readiness::new(checks, CancellationToken::new())
    };
    let ready = report(&env).check().await;
    assert!(ready.is_ready(), "{ready}");
    sqlx::query(&format!("DROP TABLE login_vault_{this_month}"))
        .execute(&env.pool)
        .await
        .unwrap();
    let ready = report(&env).check().await;
    assert!(!ready.is_ready());
    let month = this_month.replace('_', "-");
    assert!(
        ready
            .to_string()
            .contains(&format!("storage: no partition for logins of {month}")),
        "{ready}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_message_delivered_again_in_the_next_month_is_stored_once_in_its_send_month() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let sent = at(2025, Month::January, 31, (23, 59, 59));
    env.add_month(sent.date()).await;
    env.add_month(at(2025, Month::February, 1, (0, 0, 0)).date())
        .await;
    let delivery = |receipt: &str| Message {
        id: "a4f0c1de-0000-4c55-9f31-0e8d2a7b9c10".to_owned(),
        body: login("u-1", "10.1.1.1", "dev").into_bytes(),
        sent_at: Some(sent),
        receipt: Receipt(receipt.to_owned()),
        read_at: Instant::now(),
    };
    let first = env
        .drain_from(common::VecSource::of_messages(vec![delivery("first")]))
        .await;
    assert_eq!(first.stored, 1, "{first}");
    // Redelivered in February (its visibility timeout passed across midnight): SQS keeps its
    // SentTimestamp, so its date and its month are the first delivery's.
    let again = env
        .drain_from(common::VecSource::of_messages(vec![delivery("again")]))
        .await;
    assert_eq!((again.stored, again.duplicates), (0, 1), "{again}");
    let rows: Vec<(String, Date)> =
        sqlx::query_as("SELECT tableoid::regclass::text, create_date FROM user_logins")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows, [("user_logins_2025_01".to_owned(), sent.date())]);
    env.cleanup().await;
}

/// Migration 0022 gives each month its own keys, without the login date: built for the months
/// stored before it, made with every month added after. A message is then stored once a month
/// whatever day it carries, as the owner finds when writing past the writer. A month that
/// already held a message on two days (possible before 0022) keeps its key by day and loses
/// nothing, and the writer's look-up by month still finds both.
#[tokio::test]
async fn each_month_keys_its_logins_without_their_date_and_stores_a_message_once_a_month() {
    let env = TestEnv::unmigrated().await;
    let role_admin = env.migrate_before(22).await;
    env.init_token_key().await;
    let store = |id: &str, sent_at: OffsetDateTime| {
        env.drain_from(common::VecSource::of_messages(vec![Message {
            id: id.to_owned(),
            body: login("u-1", "10.1.1.1", "dev").into_bytes(),
            sent_at: Some(sent_at),
            receipt: Receipt(String::new()),
            read_at: Instant::now(),
        }]))
    };
    let (once, twice, new) = (
        "b5e1d2ef-0000-4c55-9f31-0e8d2a7b9c10",
        "c6f2e3f0-0000-4c55-9f31-0e8d2a7b9c10",
        "d7a3f4a1-0000-4c55-9f31-0e8d2a7b9c10",
    );
    let december = at(2024, Month::December, 3, (8, 0, 0));
    let january = at(2025, Month::January, 3, (8, 0, 0));
    env.add_month(december.date()).await;
    env.add_month(january.date()).await;
    let stored = |summary: ingest::Summary| (summary.stored, summary.duplicates);
    assert_eq!(stored(store(once, december).await), (1, 0));
    assert_eq!(stored(store(twice, january).await), (1, 0));
    // The owner stores a login again on another day, past the writer: before 0022 a message
    // key held for its day only, so the month takes it.
    let copy_to_another_day = |from: &str, to: &str| {
        sqlx::query(
            "INSERT INTO user_logins
             SELECT user_id, device_type, masked_ip, masked_device_id, locale, app_version,
                    $2::date, nextval('user_logins_id_seq'), message_id, token_key_id,
                    app_version_text, ingested_at, message_id_text
             FROM user_logins WHERE create_date = $1::date",
        )
        .bind(from.to_owned())
        .bind(to.to_owned())
        .execute(&env.pool)
    };
    copy_to_another_day("2025-01-03", "2025-01-20")
        .await
        .unwrap();

    pii_vault::db::migrate(&env.pool, Some(&role_admin))
        .await
        .unwrap();
    env.add_month(at(2025, Month::February, 1, (0, 0, 0)).date())
        .await;
    let keys: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT x.indrelid::regclass::text, x.indexrelid::regclass::text,
                string_agg(a.attname, ', ' ORDER BY k.n)
         FROM pg_index x
         CROSS JOIN LATERAL unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
         JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
         WHERE x.indisunique
           AND x.indrelid IN (SELECT 'user_logins'::regclass UNION ALL
                              SELECT 'login_vault'::regclass UNION ALL
                              SELECT inhrelid FROM pg_inherits
                              WHERE inhparent IN ('user_logins'::regclass, 'login_vault'::regclass))
         GROUP BY 1, 2 ORDER BY 2",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    // The test's three months and those `init` added ahead, each table's; no parent.
    let months: std::collections::BTreeSet<&str> =
        keys.iter().map(|(table, _, _)| table.as_str()).collect();
    assert!(months.len() >= 6, "{months:?}");
    assert!(
        months.is_superset(
            &[
                "user_logins_2024_12",
                "user_logins_2025_01",
                "login_vault_2025_02"
            ]
            .into()
        )
    );
    assert!(!months.contains("user_logins") && !months.contains("login_vault"));
    let want: Vec<(String, String, String)> = months
        .iter()
        .flat_map(|&table| {
            let key = |index: &str, columns: &str| {
                (
                    table.to_owned(),
                    format!("{table}_{index}"),
                    columns.to_owned(),
                )
            };
            if table.starts_with("login_vault") {
                vec![key("pkey", "login_id")]
            } else if table == "user_logins_2025_01" {
                vec![
                    key("message_id_key", "message_id, create_date"),
                    key("pkey", "id"),
                ]
            } else {
                vec![key("message_id_key", "message_id"), key("pkey", "id")]
            }
        })
        .collect();
    assert_eq!(keys, want);

    // Another day of a stored message's month finds it, where the same in January before 0022
    // stored it again; the month that kept its key by day finds either of its two rows.
    let later_in_december = at(2024, Month::December, 28, (8, 0, 0));
    assert_eq!(stored(store(once, later_in_december).await), (0, 1));
    assert_eq!(
        stored(store(twice, at(2025, Month::January, 25, (8, 0, 0))).await),
        (0, 1)
    );
    assert_eq!(
        stored(store(new, at(2025, Month::February, 2, (8, 0, 0))).await),
        (1, 0)
    );
    assert_eq!(
        stored(store(new, at(2025, Month::February, 27, (8, 0, 0))).await),
        (0, 1)
    );
    assert_eq!(env.count("user_logins").await, 4);

    // The owner writing past the writer meets the month's key as well.
    let refused = copy_to_another_day("2025-02-02", "2025-02-14")
        .await
        .unwrap_err();
    let constraint = refused.as_database_error().and_then(|e| e.constraint());
    assert_eq!(
        constraint,
        Some("user_logins_2025_02_message_id_key"),
        "{refused}"
    );
    env.cleanup().await;
}

/// Moves every stored login and vault row, and the day each file source was first ingested,
/// `days` into the past: the file was first ingested then. Rows change partition as their
/// date changes month.
async fn backdate(env: &TestEnv, days: i32) {
    for (table, column) in [
        ("user_logins", "create_date"),
        ("login_vault", "create_date"),
        ("file_sources", "first_day"),
    ] {
        sqlx::query(&format!("UPDATE {table} SET {column} = {column} - $1"))
            .bind(days)
            .execute(&env.pool)
            .await
            .unwrap();
    }
}

/// A file's lines are dated the day its source was first ingested (migration 0021): a replay
/// a month later finds them in that month, and a line added since is dated that day too.
#[tokio::test]
async fn a_file_replayed_in_a_later_month_stores_nothing_again() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let today = OffsetDateTime::now_utc().date();
    let first_day = today - time::Duration::days(40);
    env.add_month(first_day).await;
    let path = std::env::temp_dir().join(format!("pii-vault-{}.jsonl", common::unique_suffix()));
    std::fs::copy(common::SAMPLE_JSONL, &path).unwrap();
    let file = || Arc::new(FileSource::open(path.to_str().unwrap(), Some("backfill-7")).unwrap());
    let first = env.drain_from(file()).await;
    assert_eq!((first.stored, first.quarantined), (99, 1), "{first}");
    let recorded: Vec<Date> = sqlx::query_scalar("SELECT first_day FROM file_sources")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(recorded, [today], "one source, first ingested today");
    backdate(&env, 40).await;
    assert_eq!(
        env.count("login_vault").await,
        99,
        "moving a row is no delete"
    );
    let first_month = format!(
        "user_logins_{}",
        &first_day.to_string()[..7].replace('-', "_")
    );
    let months = async || -> Vec<(String, i64)> {
        sqlx::query_as(
            "SELECT tableoid::regclass::text, count(*) FROM user_logins GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap()
    };
    assert_eq!(months().await, [(first_month.clone(), 99)]);

    // Replayed today with one more line: the 100 lines it had are found in the first month,
    // and the new line is dated the source's first day, in that month too.
    let mut more = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(
        &mut more,
        format!("{}\n", login("u-new", "10.1.2.3", "new-device")).as_bytes(),
    )
    .unwrap();
    let replay = env.drain_from(file()).await;
    assert_eq!(
        (replay.stored, replay.quarantined, replay.duplicates),
        (1, 0, 100),
        "{replay}"
    );
    assert_eq!(months().await, [(first_month, 100)]);
    std::fs::remove_file(&path).unwrap();
    env.cleanup().await;
}

/// A batch of the first line of a file whose source id is `source`, its login dated `day` (its
/// source's first day), with the keys of `keys`.
fn file_line_batch(keys: &(Tokenizer, Sealer), source: &str, day: Date) -> Batch {
    let mut batch = pii_vault::ingest::batch::build(
        vec![Message {
            id: pii_vault::ingest::source::file::line_id(source, 1),
            body: sample_bodies()[0].clone().into_bytes(),
            sent_at: None,
            receipt: Receipt(String::new()),
            read_at: Instant::now(),
        }],
        &keys.0,
        &keys.1,
        &Default::default(),
        false,
    );
    batch.date_undated_logins(day);
    batch
}

async fn batch_keys(env: &TestEnv) -> (Tokenizer, Sealer) {
    let keyring = env.keyring();
    (
        keyring.active_tokenizer().await.unwrap(),
        keyring.new_sealer().await.unwrap(),
    )
}

/// Two replays of one file at once store each line once, with no lock between them: both date
/// the line its source's first day, so the second meets the first's uncommitted copy at the
/// month's unique index, is refused once it commits (`Raced`), and written again stores nothing.
#[tokio::test]
async fn two_replays_of_a_file_at_once_store_each_line_once() {
    use pii_vault::ingest::writer::{self, WriteError};
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let keys = batch_keys(&env).await;
    let today = OffsetDateTime::now_utc().date();
    let mut first_replay = env.pool.begin().await.unwrap();
    let copy = file_line_batch(&keys, "twice.jsonl", today);
    sqlx::query(
        "INSERT INTO user_logins (user_id, device_type, app_version, create_date, message_id,
                                  token_key_id, app_version_text)
         VALUES ('first', 'ios', 1, $1, $2::uuid, $3, '1')",
    )
    .bind(today)
    .bind(&copy.logins[0].message_id)
    .bind(keys.0.key_id())
    .execute(&mut *first_replay)
    .await
    .unwrap();
    let pool = env.pool.clone();
    let writing = tokio::spawn(async move { writer::write(&pool, &copy).await });
    common::until_waiting_on_a_lock(
        &env,
        "the second replay's copy waiting",
        "COPY user_logins%",
    )
    .await;
    first_replay.commit().await.unwrap();
    let raced = writing.await.unwrap();
    assert!(matches!(raced, Err(WriteError::Raced)), "{raced:?}");
    let again = writer::write(&env.pool, &file_line_batch(&keys, "twice.jsonl", today))
        .await
        .unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 1));
    let owners: Vec<String> = sqlx::query_scalar("SELECT user_id::text FROM user_logins")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(owners, ["first"]);
    env.cleanup().await;
}

/// Lines stored before migration 0021 were dated the day they were ingested, in any month up to
/// the migration's day (`lines_dated_when_ingested`): a file line is looked up in those months
/// too, and only there. In a database that had no logins then, those months are not read.
#[tokio::test]
async fn a_line_stored_before_lines_were_dated_by_their_source_is_found_in_its_month() {
    use pii_vault::ingest::writer;
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let earlier = OffsetDateTime::now_utc().date() - time::Duration::days(40);
    env.add_month(earlier).await;
    let keys = batch_keys(&env).await;
    let today = OffsetDateTime::now_utc().date();
    let batch = || file_line_batch(&keys, "replayed.jsonl", today);
    let line = batch().logins[0].message_id.clone();
    let through: Option<Date> = sqlx::query_scalar("SELECT through FROM lines_dated_when_ingested")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(through, None, "migrated with no logins");
    // The line as an ingester before 0021 stored it: dated the day of that ingest.
    sqlx::query(
        "INSERT INTO user_logins (user_id, device_type, app_version, create_date, message_id,
                                  token_key_id, app_version_text)
         VALUES ('earlier', 'ios', 1, $1, $2::uuid, $3, '1')",
    )
    .bind(earlier)
    .bind(&line)
    .bind(keys.0.key_id())
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE lines_dated_when_ingested SET through = $1")
        .bind(earlier + time::Duration::days(1))
        .execute(&env.pool)
        .await
        .unwrap();
    let written = writer::write(&env.pool, &batch()).await.unwrap();
    assert_eq!((written.stored, written.duplicates), (0, 1));

    // Without the months of dated-when-ingested lines, the same batch would store it again.
    sqlx::query("UPDATE lines_dated_when_ingested SET through = NULL")
        .execute(&env.pool)
        .await
        .unwrap();
    let written = writer::write(&env.pool, &batch()).await.unwrap();
    assert_eq!((written.stored, written.duplicates), (1, 0));
    env.cleanup().await;
}

#[tokio::test]
async fn months_are_added_by_the_key_admin_alone_and_partitions_are_no_way_around_grants() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let output = rotate_keys(&env, &["partitions", "--ahead", "6"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let said = stdout(&output);
    assert!(said.contains("have their partitions; added"), "{said}");
    let in_six: String =
        sqlx::query_scalar("SELECT to_char(current_date + interval '6 months', 'YYYY_MM')")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(partitions_of(&env, &in_six).await, 2);
    let again = rotate_keys(&env, &["partitions", "--ahead", "6"]).await;
    assert!(
        stdout(&again).contains("nothing to do"),
        "{}",
        stdout(&again)
    );

    for role in ["ingester", "analyst", "compliance", "nobody"] {
        let pool = env.pool_as(role).await;
        let refused = sqlx::query("SELECT vault_add_month('2030-01-01')")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("permission denied"),
            "{role}: {refused}"
        );
        pool.close().await;
    }
    let keyadmin = env.pool_as("keyadmin").await;
    let far = sqlx::query("SELECT vault_add_month((current_date + interval '5 years')::date)")
        .execute(&keyadmin)
        .await
        .unwrap_err();
    assert!(far.to_string().contains("24 months ahead"), "{far}");
    let own = sqlx::query(
        "CREATE TABLE mine PARTITION OF user_logins FOR VALUES FROM ('2040-01-01') TO ('2040-02-01')",
    )
    .execute(&keyadmin)
    .await
    .unwrap_err();
    assert!(
        own.to_string().contains("permission denied") || own.to_string().contains("must be owner"),
        "{own}"
    );
    keyadmin.close().await;

    // Through a partition no role reads more than through its parent: sealed columns not at
    // all, and a partition's rows not even where the parent's may be read.
    env.ingest_bodies(&sample_bodies()[..5]).await;
    let this_month: String = sqlx::query_scalar("SELECT to_char(current_date, 'YYYY_MM')")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    for role in ["ingester", "analyst", "compliance", "keyadmin", "nobody"] {
        let pool = env.pool_as(role).await;
        for query in [
            format!("SELECT sealed_ip FROM login_vault_{this_month}"),
            format!("SELECT count(*) FROM user_logins_{this_month}"),
        ] {
            let refused = sqlx::query(&query).execute(&pool).await.unwrap_err();
            assert!(
                refused.to_string().contains("permission denied"),
                "{role}: {query}: {refused}"
            );
        }
        pool.close().await;
    }
    env.cleanup().await;
}

/// Stores one login of `user` sent at `sent_at` for each pair, the n-th from ip 10.9.9.n,
/// adding each login's month first.
async fn store_one_login_each(env: &TestEnv, logins: &[(&str, OffsetDateTime)]) {
    let mut messages = Vec::new();
    for (n, (user, sent_at)) in logins.iter().enumerate() {
        env.add_month(sent_at.date()).await;
        messages.push(Message {
            id: format!("a4f0c1de-0000-4c55-9f31-0e8d2a7b9c1{n}"),
            body: login(user, &format!("10.9.9.{n}"), &format!("dev-{n}")).into_bytes(),
            sent_at: Some(*sent_at),
            receipt: Receipt(format!("r{n}")),
            read_at: Instant::now(),
        });
    }
    let stored = env
        .drain_from(common::VecSource::of_messages(messages))
        .await;
    assert_eq!(stored.stored, logins.len() as u64, "{stored}");
}

/// A user's logins in three months are revealed together, each read in its own month: the
/// request records each login's month beside its id (migration 0018). A request made before
/// 0018 recorded no months; its hand-out finds them by id and hands out the same logins.
#[tokio::test]
async fn a_users_logins_in_three_months_are_revealed_together_with_or_without_their_months() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let sent = [
        at(2025, Month::January, 31, (23, 0, 0)),
        at(2025, Month::February, 14, (8, 0, 0)),
        at(2025, Month::March, 1, (0, 0, 1)),
    ];
    store_one_login_each(&env, &sent.map(|sent_at| ("u-1", sent_at))).await;

    let output = env.run_binary_as(
        "compliance",
        env!("CARGO_BIN_EXE_unmask"),
        &[
            "--purpose",
            "legal-request",
            "--user-id",
            "u-1",
            "--reason",
            "t",
            "--format",
            "csv",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let shown = stdout(&output);
    for (n, sent_at) in sent.iter().enumerate() {
        assert!(
            shown.contains(&format!("10.9.9.{n}")) && shown.contains(&sent_at.date().to_string()),
            "{shown}"
        );
    }
    let days: Vec<(Vec<i64>, Vec<Date>)> =
        sqlx::query_as("SELECT ids, days FROM door_requests WHERE door = 'reveal' ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let dates: Vec<Date> = sent.iter().map(|s| s.date()).collect();
    assert_eq!(days.len(), 1);
    assert_eq!(days[0].1, dates, "each id's month, in the ids' order");

    // A request as made before 0018: its days are empty.
    let compliance = env.pool_as("compliance").await;
    let request: i64 = sqlx::query_scalar(
        "SELECT vault_reveal_request('user_id', 'u-1', 'legal-request', 'before 0018', 'ann')",
    )
    .fetch_one(&compliance)
    .await
    .unwrap();
    let mut owner = env.pool.begin().await.unwrap();
    let trigger = "door_requests_only_through_doors";
    sqlx::query(&format!(
        "ALTER TABLE door_requests DISABLE TRIGGER {trigger}"
    ))
    .execute(&mut *owner)
    .await
    .unwrap();
    sqlx::query("UPDATE door_requests SET days = '{}' WHERE id = $1")
        .bind(request)
        .execute(&mut *owner)
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER TABLE door_requests ENABLE TRIGGER {trigger}"
    ))
    .execute(&mut *owner)
    .await
    .unwrap();
    owner.commit().await.unwrap();
    let mut tx = compliance.begin().await.unwrap();
    let handed: Vec<(Date, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT create_date, sealed_ip FROM vault_reveal($1)")
            .bind(request)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        handed.iter().map(|(day, _)| *day).collect::<Vec<_>>(),
        dates
    );
    assert!(
        handed.iter().all(|(_, sealed)| sealed.is_some()),
        "vault rows found by id"
    );
    compliance.close().await;
    env.cleanup().await;
}

/// Scans of each partition of `table` that this transaction has made so far, by month
/// ("2025_02"): sequential and index scans together.
async fn scans_so_far(conn: &mut sqlx::PgConnection, table: &str) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT right(s.relname, 7), coalesce(s.seq_scan, 0) + coalesce(s.idx_scan, 0)
           FROM pg_stat_xact_user_tables s
           JOIN pg_inherits i ON i.inhrelid = s.relid AND i.inhparent = $1::regclass
          ORDER BY 1",
    )
    .bind(table)
    .fetch_all(conn)
    .await
    .unwrap()
}

/// Partitions of `table` scanned between two `scans_so_far`.
fn scanned(before: &[(String, i64)], after: &[(String, i64)]) -> Vec<String> {
    after
        .iter()
        .filter(|(month, n)| before.iter().any(|(m, b)| m == month && b < n))
        .map(|(month, _)| month.clone())
        .collect()
}

/// The doors that write logins reach only the months of the logins they write (migration
/// 0020): a rotation page's reseal and retokenize, and a user's erasure, leave a month they
/// have no login of unread, as counted by the caller's own transaction statistics.
#[tokio::test]
async fn rotation_and_erasure_write_only_in_the_months_of_their_logins() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let sent = [
        ("u-1", at(2025, Month::January, 20, (9, 0, 0))),
        ("u-2", at(2025, Month::February, 10, (9, 0, 0))),
        ("u-1", at(2025, Month::March, 5, (9, 0, 0))),
    ];
    store_one_login_each(&env, &sent).await;
    let (token_key, data_key): (i64, i64) =
        sqlx::query_as("SELECT l.token_key_id, v.data_key_id FROM user_logins l JOIN login_vault v ON v.login_id = l.id LIMIT 1")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let written_months = ["2025_01", "2025_03"];
    let keyadmin = env.pool_as("keyadmin").await;

    // A rotation page of every month's logins, of which the January and March ones are
    // written back (unchanged: the door checks only that the keys are active).
    for (operation, key, table) in [
        ("reseal", data_key, "login_vault"),
        ("retokenize", token_key, "user_logins"),
    ] {
        // The request commits first; the hand-out and the write share a transaction.
        let request: i64 = sqlx::query_scalar("SELECT vault_rotation_request($1, 0, 100, $2)")
            .bind(operation)
            .bind(vec![key])
            .fetch_one(&keyadmin)
            .await
            .unwrap();
        let mut tx = keyadmin.begin().await.unwrap();
        type PageRow = (
            i64,
            Date,
            Option<String>,
            Option<String>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
        );
        let page: Vec<PageRow> = sqlx::query_as(
            "SELECT login_id, create_date, masked_ip, masked_device_id, sealed_ip, sealed_device_id
               FROM vault_rotation_page($1)",
        )
        .bind(request)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert_eq!(
            page.len(),
            3,
            "{operation}: every month's login is on the page"
        );
        let written: Vec<&PageRow> = page
            .iter()
            .filter(|row| row.1.month() != Month::February)
            .collect();
        let ids: Vec<i64> = written.iter().map(|row| row.0).collect();
        let before = scans_so_far(&mut tx, table).await;
        let n: i64 = if operation == "reseal" {
            sqlx::query_scalar("SELECT vault_reseal_logins($1, $2, $3, $4, $5)")
                .bind(request)
                .bind(&ids)
                .bind(vec![data_key; ids.len()])
                .bind(
                    written
                        .iter()
                        .map(|row| row.4.clone().unwrap())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    written
                        .iter()
                        .map(|row| row.5.clone().unwrap())
                        .collect::<Vec<_>>(),
                )
                .fetch_one(&mut *tx)
                .await
                .unwrap()
        } else {
            sqlx::query_scalar("SELECT vault_retokenize_logins($1, $2, $3, $4, $5)")
                .bind(request)
                .bind(token_key)
                .bind(&ids)
                .bind(written.iter().map(|row| row.2.clone()).collect::<Vec<_>>())
                .bind(written.iter().map(|row| row.3.clone()).collect::<Vec<_>>())
                .fetch_one(&mut *tx)
                .await
                .unwrap()
        };
        let after = scans_so_far(&mut tx, table).await;
        tx.commit().await.unwrap();
        assert_eq!(n, 2, "{operation}");
        assert_eq!(
            scanned(&before, &after),
            written_months,
            "{operation}: {before:?} -> {after:?}"
        );
    }

    // u-1's erasure: its logins are looked for in every month, its vault rows only in theirs.
    let mut tx = keyadmin.begin().await.unwrap();
    let before = scans_so_far(&mut tx, "login_vault").await;
    let (logins,): (i64,) = sqlx::query_as(
        "SELECT logins FROM vault_erase_user('u-1', 'test', 'ann', false, $1, '{t}', '{\\x00}',
                                             false, false, NULL)",
    )
    .bind(vec![token_key])
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let after = scans_so_far(&mut tx, "login_vault").await;
    tx.commit().await.unwrap();
    assert_eq!(logins, 2);
    assert_eq!(
        scanned(&before, &after),
        written_months,
        "{before:?} -> {after:?}"
    );
    let sealed: Vec<(String, i64)> = sqlx::query_as(
        "SELECT l.user_id, count(v.login_id) FROM user_logins l
           LEFT JOIN login_vault v ON v.login_id = l.id AND v.create_date = l.create_date
          GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(sealed, [("u-1".to_owned(), 0), ("u-2".to_owned(), 1)]);
    keyadmin.close().await;
    env.cleanup().await;
}
