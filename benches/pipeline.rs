//! The whole pipeline against the local PostgreSQL, compared in the same run with the physical
//! limit: a raw COPY of the same number of already-masked rows.
//!
//! `cargo bench --bench pipeline -- [--count N] [--sqs-count M] [--writers W] [--batch-size B]`
//! (needs `scripts/services up`)
//!
//! 1. N generated messages (1% malformed, 20% repeated ip/device_id) in a JSONL file, through
//!    the real `--from-file` path into a fresh database with durable commits: msgs/s, machine
//!    CPU per record, peak RSS, KMS calls, WAL and disk per login (disk by table and index),
//!    and the row and quarantine counts checked; then the same into a database whose two
//!    tables are not partitioned and keyed as before migration 0017, for what the monthly
//!    partitions cost the pipeline and each login's bytes.
//! 2. Read-to-commit latency when fed at half that rate.
//! 3. The same rows, already masked, loaded by COPY on one connection into another fresh
//!    database: the limit; and again into those unpartitioned tables, for what the monthly
//!    partitions cost at that limit.
//! 4. The SQS path: the emulator's bare drain rate (receive + delete, no processing) against
//!    ingest's over the same queue.
//!
//! Ends with one line of JSON holding every figure.

#[path = "../tests/integration/common/mod.rs"]
#[allow(dead_code)] // the tests' set-up, of which a bench uses a part
mod common;

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use tokio_util::sync::CancellationToken;

use pii_vault::event;
use pii_vault::ingest::source::file::{FileSource, line_id};
use pii_vault::ingest::source::sqs::PollSettings;
use pii_vault::ingest::source::{
    Acknowledged, Message, MessageKey, MessageSource, Receipt, SourceError,
};
use pii_vault::ingest::{self, Settings, Summary};
use pii_vault::synth::Generator;
use pii_vault::vault::place::login_place;
use pii_vault::vault::token::Field;

/// Busy CPU time of the whole machine (every process, PostgreSQL included), in microseconds.
fn machine_busy_micros() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    let idle = fields[3] + fields[4];
    let total: u64 = fields.iter().take(8).sum();
    // USER_HZ is 100 on Linux.
    (total - idle) * 10_000
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// The pipeline's settings: a file's, as `ingest --from-file` uses them; `--writers W` and
/// `--batch-size B` override them, to compare.
fn settings() -> Settings {
    let file = Settings::for_file();
    Settings {
        pollers: 1,
        writers: common::bench_arg("--writers", file.writers as u64) as usize,
        batch_size: common::bench_arg("--batch-size", file.batch_size as u64) as usize,
        flush_interval: Duration::from_millis(50),
        drain: true,
        ..file
    }
}

/// A source that hands out another one's messages at a fixed rate.
struct Paced<S> {
    inner: S,
    per_second: f64,
    started: Instant,
    handed: AtomicU64,
}

impl<S: MessageSource> MessageSource for Paced<S> {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        let mut messages = self.inner.receive().await?;
        let handed = self
            .handed
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        let due = self.started + Duration::from_secs_f64(handed as f64 / self.per_second);
        tokio::time::sleep_until(due.into()).await;
        let now = Instant::now();
        for message in &mut messages {
            message.read_at = now;
        }
        Ok(messages)
    }

    async fn acknowledge(&self, receipts: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        self.inner.acknowledge(receipts).await
    }

    fn undated_source_key(&self) -> Option<MessageKey> {
        self.inner.undated_source_key()
    }
}

fn write_messages(path: &std::path::Path, count: u64, seed: u64) -> u64 {
    let mut out = BufWriter::new(std::fs::File::create(path).unwrap());
    let mut generator = Generator::new(seed, 0.2, 0.01);
    let mut malformed = 0;
    for _ in 0..count {
        let message = generator.next_message();
        malformed += u64::from(message.malformed);
        writeln!(out, "{}", message.body).unwrap();
    }
    out.flush().unwrap();
    malformed
}

#[tokio::main]
async fn main() {
    let count = common::bench_arg("--count", 1_000_000);
    let sqs_count = common::bench_arg("--sqs-count", 500);
    let dir = std::env::temp_dir().join(format!("pii-vault-bench-{}", common::unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("messages.jsonl");
    let malformed = write_messages(&input, count, 42);
    println!(
        "generated {count} messages ({malformed} malformed) in {}",
        input.display()
    );

    // 1. The pipeline, from the file.
    let env = common::TestEnv::new(30).await;
    env.init_token_key().await;
    let pool = pipeline_pool(&env).await;
    let kms_before = env.kms.calls();
    // A checkpoint during the run would add full-page images to the WAL measured: start
    // right after one (the next is minutes away), and say if one ran anyway.
    let checkpointed = sqlx::query("CHECKPOINT").execute(&pool).await.is_ok();
    let checkpoints_before = checkpoints(&pool).await;
    let wal_before = wal_position(&pool).await;
    let cpu_before = machine_busy_micros();
    let (summary, seconds) = ingest_file(&env, &pool, &input).await;
    let cpu_us_per_record = (machine_busy_micros() - cpu_before) as f64 / count as f64;
    let peak_rss = peak_rss_mib();
    let kms_calls = env.kms.calls() - kms_before;
    let msgs_per_s = count as f64 / seconds;
    let (rows, quarantined) = (
        env.count("user_logins").await as u64,
        env.count("quarantine").await as u64,
    );
    assert_eq!(
        (rows, quarantined),
        (count - malformed, malformed),
        "every message once"
    );
    let footprint = Footprint::measure(&pool, &wal_before, rows).await;
    let (wal_bytes_per_login, disk_bytes_per_login) = (footprint.wal, footprint.disk);
    let checkpoints_during_run = checkpoints(&pool).await - checkpoints_before;
    if !checkpointed || checkpoints_during_run > 0 {
        println!(
            "note: WAL per login includes full-page images (CHECKPOINT before the run {}; {checkpoints_during_run} checkpoints during it); `scripts/services up` grants pg_checkpoint",
            if checkpointed { "ran" } else { "was refused" }
        );
    }
    println!(
        "pipeline: {count} messages in {seconds:.2}s = {msgs_per_s:.0} msgs/s; machine CPU {cpu_us_per_record:.1} us/record; peak RSS {peak_rss:.1} MiB; KMS calls {kms_calls}; WAL {wal_bytes_per_login:.0} B/login, disk {disk_bytes_per_login:.0} B/login; {summary}"
    );
    // The same input through the whole process, `ingest --from-file`, into a fresh database.
    let whole_process_msgs_per_s = whole_process(&input, count, count - malformed).await;
    println!("disk per login: {}", footprint.parts());
    println!(
        "whole process (ingest --from-file, defaults): {whole_process_msgs_per_s:.0} msgs/s = {:.2}x the in-process run",
        whole_process_msgs_per_s / msgs_per_s
    );
    // The same pipeline into tables that are not partitioned: what the months cost it.
    let (flat_msgs_per_s, flat) = unpartitioned_pipeline(&input, count, count - malformed).await;
    let pipeline_partitioned_to_flat = msgs_per_s / flat_msgs_per_s;
    println!(
        "pipeline into unpartitioned tables: {flat_msgs_per_s:.0} msgs/s; into the monthly partitions = {pipeline_partitioned_to_flat:.2}x; unpartitioned WAL {:.0} B/login, disk {:.0} B/login: {}",
        flat.wal,
        flat.disk,
        flat.parts()
    );

    // 2. Latency at half the rate just measured.
    let latency_count = ((msgs_per_s / 2.0) * 10.0).min(count as f64) as u64;
    let latency_input = dir.join("latency.jsonl");
    write_messages(&latency_input, latency_count, 43);
    let paced = Paced {
        inner: FileSource::open(latency_input.to_str().unwrap(), Some("latency")).unwrap(),
        per_second: msgs_per_s / 2.0,
        started: Instant::now(),
        handed: AtomicU64::new(0),
    };
    let keyring = env.keyring_on(&pool);
    let latency = ingest::run(
        Arc::new(paced),
        pool.clone(),
        keyring,
        Settings {
            batch_size: 500,
            flush_interval: Duration::from_millis(5),
            ..settings()
        },
        Arc::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let (p50_ms, p99_ms) = (
        latency.p50.as_secs_f64() * 1e3,
        latency.p99.as_secs_f64() * 1e3,
    );
    println!(
        "latency at {:.0} msgs/s ({latency_count} messages): p50 {p50_ms:.1} ms, p99 {p99_ms:.1} ms",
        msgs_per_s / 2.0
    );

    // 3. The limit: the same rows, already masked, by COPY into a fresh database.
    let reference = common::TestEnv::new(30).await;
    reference.init_token_key().await;
    let reference_keyring = reference.keyring();
    let tokenizer = reference_keyring.active_tokenizer().await.unwrap();
    let sealer = reference_keyring.new_sealer().await.unwrap();
    let (logins_copy, vault_copy) = (dir.join("logins.copy"), dir.join("vault.copy"));
    {
        let mut logins = BufWriter::new(std::fs::File::create(&logins_copy).unwrap());
        let mut vault = BufWriter::new(std::fs::File::create(&vault_copy).unwrap());
        let hex = |bytes: &[u8]| hex::encode(bytes);
        let today = time::OffsetDateTime::now_utc().date();
        let mut login_id = 0u64;
        for (line, body) in BufReader::new(std::fs::File::open(&input).unwrap())
            .lines()
            .enumerate()
        {
            let body = body.unwrap();
            let Ok(login) = event::parse(body.as_bytes()) else {
                continue;
            };
            login_id += 1;
            let message_id = line_id("copy", line as u64 + 1);
            let (ip, device) = seal_login(&sealer, &message_id, &login);
            writeln!(
                logins,
                "{}\t{}\t{}\t{}\t{}\t{}\t{today}\t{message_id}\t{}\t{}",
                login.in_clear.user_id,
                login.in_clear.device_type,
                tokenizer.ip(login.ip_addr),
                tokenizer.device_id(&login.device_id),
                login.in_clear.locale.as_deref().unwrap_or("\\N"),
                login.in_clear.app_version.encoded,
                tokenizer.key_id(),
                login.in_clear.app_version.text,
            )
            .unwrap();
            writeln!(
                vault,
                "{login_id}\t{}\t\\\\x{}\t\\\\x{}\t{today}",
                sealer.key_id(),
                hex(&ip),
                hex(&device)
            )
            .unwrap();
        }
    }
    let logins_columns = "(user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date, message_id, token_key_id, app_version_text)";
    let vault_columns = "(login_id, data_key_id, sealed_ip, sealed_device_id, create_date)";
    let copy_seconds = copy_into(
        &reference.pool,
        [
            (
                &logins_copy,
                format!("COPY user_logins {logins_columns} FROM STDIN"),
            ),
            (
                &vault_copy,
                format!("COPY login_vault {vault_columns} FROM STDIN"),
            ),
        ],
    )
    .await;
    let copied = reference.count("user_logins").await as u64;
    assert_eq!(copied, count - malformed);
    let copy_per_s = copied as f64 / copy_seconds;
    let ratio_to_copy = (rows as f64 / seconds) / copy_per_s;
    println!(
        "raw COPY: {copied} rows in {copy_seconds:.2}s = {copy_per_s:.0} rows/s; pipeline stores {:.0} rows/s = {ratio_to_copy:.2}x",
        rows as f64 / seconds
    );
    // The same COPY into unpartitioned tables of the same columns and indexes: what the
    // monthly partitions (migration 0017) cost at the limit.
    sqlx::raw_sql(&unpartitioned_tables("flat_logins", "flat_vault"))
        .execute(&reference.pool)
        .await
        .unwrap();
    let flat_seconds = copy_into(
        &reference.pool,
        [
            (
                &logins_copy,
                format!("COPY flat_logins {logins_columns} FROM STDIN"),
            ),
            (
                &vault_copy,
                format!("COPY flat_vault {vault_columns} FROM STDIN"),
            ),
        ],
    )
    .await;
    let partitioned_to_flat = flat_seconds / copy_seconds;
    println!(
        "raw COPY into unpartitioned tables: {:.0} rows/s; into the monthly partitions = {partitioned_to_flat:.2}x",
        copied as f64 / flat_seconds
    );

    // 5. Beside the seed's design (one INSERT and one COMMIT per login, on one connection, in
    //    the same schema), the whole process on the same logins.
    let seed_count = common::bench_arg("--seed-count", 50_000);
    let seed_input = dir.join("seed.jsonl");
    let seed_malformed = write_messages(&seed_input, seed_count, 45);
    let seed_msgs_per_s = seed_design(&seed_input, seed_count - seed_malformed).await;
    let whole_seed_msgs_per_s =
        whole_process(&seed_input, seed_count, seed_count - seed_malformed).await;
    let ratio_to_seed = whole_seed_msgs_per_s / seed_msgs_per_s;
    println!(
        "seed design ({seed_count} messages, a row and a commit at a time): {seed_msgs_per_s:.0} msgs/s; whole process {whole_seed_msgs_per_s:.0} msgs/s = {ratio_to_seed:.1}x"
    );

    // 4. The SQS path: the emulator's bare drain rate, then ingest's, over the same queue.
    let mut generator = Generator::new(44, 0.2, 0.01);
    let bodies: Vec<String> = (0..sqs_count)
        .map(|_| generator.next_message().body)
        .collect();
    env.send(&bodies).await;
    let bare_rate = bare_drain(&env, sqs_count).await;
    env.send(&bodies).await;
    let base = (env.count("user_logins").await + env.count("quarantine").await) as u64;
    let source = env.source(PollSettings {
        wait_time_seconds: 1,
        visibility_timeout_seconds: None,
    });
    let keyring = env.keyring_on(&pool);
    let started = Instant::now();
    let run = tokio::spawn(ingest::run(
        source,
        pool.clone(),
        keyring,
        Settings {
            pollers: 4,
            ..settings()
        },
        Arc::default(),
        CancellationToken::new(),
    ));
    common::eventually(Duration::from_secs(600), || async {
        (env.count("user_logins").await + env.count("quarantine").await) as u64 >= base + sqs_count
    })
    .await;
    let ingest_rate = sqs_count as f64 / started.elapsed().as_secs_f64();
    run.await.unwrap().unwrap();
    let sqs_ratio = ingest_rate / bare_rate;
    println!(
        "SQS path ({sqs_count} messages): emulator bare drain {bare_rate:.0} msgs/s, ingest {ingest_rate:.0} msgs/s = {sqs_ratio:.2}x"
    );

    println!(
        "{{\"msgs_per_s\": {msgs_per_s:.0}, \"ratio_to_copy\": {ratio_to_copy:.3}, \"partitioned_copy_to_flat\": {partitioned_to_flat:.3}, \"partitioned_pipeline_to_flat\": {pipeline_partitioned_to_flat:.3}, \"cpu_us_per_record\": {cpu_us_per_record:.2}, \"p50_ms\": {p50_ms:.2}, \"p99_ms\": {p99_ms:.2}, \"peak_rss_mib\": {peak_rss:.1}, \"kms_calls\": {kms_calls}, \"sqs_ratio\": {sqs_ratio:.3}, \"rows\": {rows}, \"quarantined\": {quarantined}, \"wal_bytes_per_login\": {wal_bytes_per_login:.0}, \"disk_bytes_per_login\": {disk_bytes_per_login:.0}, \"whole_process_msgs_per_s\": {whole_process_msgs_per_s:.0}, \"seed_design_msgs_per_s\": {seed_msgs_per_s:.0}, \"ratio_to_seed\": {ratio_to_seed:.1}, \"checkpoints_during_run\": {checkpoints_during_run}}}"
    );
    pool.close().await;
    env.cleanup().await;
    reference.cleanup().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A login's ip and device id sealed as the pipeline seals them.
fn seal_login(
    sealer: &pii_vault::vault::seal::Sealer,
    message_id: &str,
    login: &event::LoginEvent<'_>,
) -> (Vec<u8>, Vec<u8>) {
    let seal = |field, value: &str| {
        sealer.seal(
            &login_place(field, message_id, &login.in_clear.user_id),
            value.as_bytes(),
        )
    };
    (
        seal(Field::Ip, &login.ip),
        seal(Field::DeviceId, &login.device_id),
    )
}

/// COPYs each file with its statement, all in one transaction; the seconds it took.
async fn copy_into(pool: &sqlx::PgPool, copies: [(&std::path::PathBuf, String); 2]) -> f64 {
    let mut connection = pool.acquire().await.unwrap();
    let started = Instant::now();
    let mut tx = sqlx::Connection::begin(&mut *connection).await.unwrap();
    for (file, statement) in copies {
        let mut copy = tx.copy_in_raw(&statement).await.unwrap();
        let mut reader = BufReader::with_capacity(1 << 20, std::fs::File::open(file).unwrap());
        loop {
            let chunk = reader.fill_buf().unwrap().to_vec();
            if chunk.is_empty() {
                break;
            }
            reader.consume(chunk.len());
            copy.send(chunk).await.unwrap();
        }
        copy.finish().await.unwrap();
    }
    tx.commit().await.unwrap();
    started.elapsed().as_secs_f64()
}

/// What stored logins cost PostgreSQL, per login: WAL written since `wal_before` (the bench
/// runs alone), and table plus index bytes on disk, also by table (its partitions together)
/// and by index (a parent's index with its partitions', a month's own key with the other
/// months').
struct Footprint {
    wal: f64,
    disk: f64,
    by_relation: Vec<(String, f64)>,
}

impl Footprint {
    async fn measure(pool: &sqlx::PgPool, wal_before: &str, logins: u64) -> Footprint {
        let (wal, by_relation): (f64, Vec<(String, f64)>) = (
            sqlx::query_scalar(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::float8 / $2",
            )
            .bind(wal_before)
            .bind(logins as f64)
            .fetch_one(pool)
            .await
            .unwrap(),
            sqlx::query_as(
                "WITH relations AS (
                   SELECT t, p.relid
                     FROM unnest('{user_logins,login_vault}'::regclass[]) AS t,
                          LATERAL (SELECT relid FROM pg_partition_tree(t) UNION SELECT t) AS p)
                 SELECT name, (sum(size) / $1)::float8 FROM (
                   SELECT t::text || ' table' AS name, pg_table_size(relid) AS size
                     FROM relations
                   UNION ALL
                   SELECT coalesce(pg_partition_root(i.indexrelid)::text,
                                   regexp_replace(i.indexrelid::regclass::text,
                                                  '_[0-9]{4}_[0-9]{2}_', '_')),
                          pg_relation_size(i.indexrelid)
                     FROM pg_index i JOIN relations r ON r.relid = i.indrelid) AS s
                 GROUP BY name ORDER BY name",
            )
            .bind(logins as f64)
            .fetch_all(pool)
            .await
            .unwrap(),
        );
        let disk = by_relation.iter().map(|(_, bytes)| bytes).sum();
        Footprint {
            wal,
            disk,
            by_relation,
        }
    }

    fn parts(&self) -> String {
        self.by_relation
            .iter()
            .map(|(name, bytes)| format!("{name} {bytes:.0} B"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A pool of the ingester's size: its pollers and writers need more than the test kit's few
/// connections.
async fn pipeline_pool(env: &common::TestEnv) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&env.database_url)
        .await
        .unwrap()
}

/// Tables `logins` and `vault` with the columns, defaults and checks of `user_logins` and
/// `login_vault`, not partitioned, and the indexes they had before migration 0017: keys
/// without the login date.
fn unpartitioned_tables(logins: &str, vault: &str) -> String {
    format!(
        "CREATE TABLE {logins} (LIKE user_logins INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
         CREATE TABLE {vault} (LIKE login_vault INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
         ALTER TABLE {logins} ADD PRIMARY KEY (id), ADD UNIQUE (message_id);
         ALTER TABLE {vault} ADD PRIMARY KEY (login_id);
         CREATE INDEX ON {logins} USING hash (user_id);
         CREATE INDEX ON {logins} USING hash (masked_ip);
         CREATE INDEX ON {logins} USING hash (masked_device_id);
         CREATE INDEX ON {vault} USING brin (data_key_id)
             WITH (pages_per_range = 16, autosummarize = on);"
    )
}

/// The in-process pipeline over `input` into a fresh database whose `user_logins` and
/// `login_vault` are replaced by [`unpartitioned_tables`] (the writer's SQL names only the
/// parents): messages per second, and what the logins cost.
async fn unpartitioned_pipeline(
    input: &std::path::Path,
    messages: u64,
    logins: u64,
) -> (f64, Footprint) {
    let env = common::TestEnv::new(30).await;
    env.init_token_key().await;
    sqlx::raw_sql(&format!(
        "ALTER SEQUENCE user_logins_id_seq OWNED BY NONE;
         {}
         DROP TABLE user_logins, login_vault CASCADE;
         ALTER TABLE flat_logins RENAME TO user_logins;
         ALTER TABLE flat_vault RENAME TO login_vault;
         CHECKPOINT;",
        unpartitioned_tables("flat_logins", "flat_vault")
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let pool = pipeline_pool(&env).await;
    let wal_before = wal_position(&pool).await;
    let (_, seconds) = ingest_file(&env, &pool, input).await;
    assert_eq!(env.count("user_logins").await as u64, logins);
    let footprint = Footprint::measure(&pool, &wal_before, logins).await;
    pool.close().await;
    env.cleanup().await;
    (messages as f64 / seconds, footprint)
}

/// `input` through the in-process pipeline, with the bench's settings, into `env`'s database
/// on `pool`: its summary, and the seconds it took.
async fn ingest_file(
    env: &common::TestEnv,
    pool: &sqlx::PgPool,
    input: &std::path::Path,
) -> (Summary, f64) {
    let source = FileSource::open(input.to_str().unwrap(), Some("bench")).unwrap();
    let started = Instant::now();
    let summary = ingest::run(
        Arc::new(source),
        pool.clone(),
        env.keyring_on(pool),
        settings(),
        Arc::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    (summary, started.elapsed().as_secs_f64())
}

/// The server's WAL position now.
async fn wal_position(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Checkpoints the server has made so far.
async fn checkpoints(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `ingest --from-file` over `input` into a fresh database, with its defaults: messages per
/// second, start to exit.
async fn whole_process(input: &std::path::Path, messages: u64, logins: u64) -> f64 {
    let env = common::TestEnv::new(30).await;
    env.init_token_key().await;
    let started = Instant::now();
    let output = common::output_of(
        std::process::Command::new(env!("CARGO_BIN_EXE_ingest"))
            .args([
                "--from-file",
                input.to_str().unwrap(),
                "--source-id",
                "whole",
            ])
            .envs(env.binary_env()),
    );
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(env.count("user_logins").await as u64, logins);
    env.cleanup().await;
    messages as f64 / seconds
}

/// The seed's design over `input`: each login tokenized, sealed, and inserted with its vault
/// row in a transaction of its own, on one connection. Messages per second.
async fn seed_design(input: &std::path::Path, logins: u64) -> f64 {
    let env = common::TestEnv::new(30).await;
    env.init_token_key().await;
    let keyring = env.keyring();
    let tokenizer = keyring.active_tokenizer().await.unwrap();
    let sealer = keyring.new_sealer().await.unwrap();
    let mut connection = env.pool.acquire().await.unwrap();
    let today = time::OffsetDateTime::now_utc().date();
    let lines: Vec<String> = BufReader::new(std::fs::File::open(input).unwrap())
        .lines()
        .map(Result::unwrap)
        .collect();
    let started = Instant::now();
    for (line, body) in lines.iter().enumerate() {
        let Ok(login) = event::parse(body.as_bytes()) else {
            continue;
        };
        let message_id = line_id("seed", line as u64 + 1);
        let (ip, device) = seal_login(&sealer, &message_id, &login);
        let mut tx = sqlx::Connection::begin(&mut *connection).await.unwrap();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO user_logins (user_id, device_type, masked_ip, masked_device_id, locale,
                                      app_version, create_date, message_id, token_key_id,
                                      app_version_text)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8::uuid, $9, $10) RETURNING id",
        )
        .bind(login.in_clear.user_id.as_str())
        .bind(login.in_clear.device_type.as_str())
        .bind(tokenizer.ip(login.ip_addr).as_str())
        .bind(tokenizer.device_id(&login.device_id).as_str())
        .bind(login.in_clear.locale.as_deref())
        .bind(login.in_clear.app_version.encoded)
        .bind(today)
        .bind(&message_id)
        .bind(tokenizer.key_id())
        .bind(login.in_clear.app_version.text.as_str())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        sqlx::query("INSERT INTO login_vault VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(sealer.key_id())
            .bind(&ip)
            .bind(&device)
            .bind(today)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(connection);
    assert_eq!(env.count("user_logins").await as u64, logins);
    env.cleanup().await;
    lines.len() as f64 / seconds
}

/// Receive and delete with 4 concurrent long polls, no processing: messages per second until
/// the last one is deleted.
async fn bare_drain(env: &common::TestEnv, count: u64) -> f64 {
    let deleted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut pollers = Vec::new();
    for _ in 0..4 {
        let (sqs, url, deleted) = (env.sqs.clone(), env.queue_url.clone(), deleted.clone());
        pollers.push(tokio::spawn(async move {
            while deleted.load(Ordering::Relaxed) < count {
                let received = sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await
                    .unwrap();
                let entries: Vec<_> = received
                    .messages
                    .unwrap_or_default()
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle().unwrap())
                            .build()
                            .unwrap()
                    })
                    .collect();
                if entries.is_empty() {
                    continue;
                }
                let n = entries.len() as u64;
                sqs.delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .unwrap();
                deleted.fetch_add(n, Ordering::Relaxed);
            }
            Instant::now()
        }));
    }
    let mut last = started;
    for poller in pollers {
        last = last.max(poller.await.unwrap());
    }
    count as f64 / (last - started).as_secs_f64()
}
