//! `ingest`: the daemon. Long-polls SQS, validates, tokenizes and seals, writes in batches, and
//! deletes each message only after its row has committed. `ingest replay-dead-letters` moves
//! the dead-letter queue back to the login queue.

#[path = "../common/progress.rs"]
mod progress;
mod replay;
mod watch;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use metrics_exporter_prometheus::PrometheusHandle;
use pii_vault::cli::{self, OutputArgs, OutputFormat, Said, SqsArgs, UsageError, VaultArgs};
use pii_vault::db;
use pii_vault::ingest::source::MessageSource;
use pii_vault::ingest::source::config::{Source, SourceConfig, SqsConfig};
use pii_vault::ingest::source::sqs::PollSettings;
use pii_vault::ingest::{self, Settings, Stats, Summary};
use pii_vault::progress::{Progress, Unit, alongside};
use pii_vault::telemetry::{self, readiness::Readiness, server::Endpoints};
use pii_vault::vault::keyring::Keyring;
use pii_vault::vault::kms::AwsKms;

/// Ingest login events from an SQS queue into PostgreSQL, with ip and device_id tokenized and
/// sealed.
///
/// AWS region, credentials and endpoint come from the standard AWS chain (AWS_REGION,
/// AWS_ACCESS_KEY_ID, AWS_PROFILE, instance roles; AWS_ENDPOINT_URL for an emulator).
#[derive(Debug, Parser)]
#[command(name = "ingest", version = pii_vault::VERSION_LINE, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    vault: VaultArgs,
    #[command(flatten)]
    output: OutputArgs,
    /// Queue name or URL.
    #[arg(long, env = "QUEUE", default_value = "login-queue")]
    queue: String,
    #[command(flatten)]
    sqs: SqsArgs,
    /// Exit once the queue is empty instead of running until SIGTERM or Ctrl-C.
    #[arg(long)]
    drain: bool,
    /// Read messages from a file instead of the queue (a backfill or replay): one JSON body
    /// per line, gzip if the name ends in .gz, `-` for stdin. Implies --drain.
    #[arg(long, value_name = "PATH")]
    from_file: Option<String>,
    /// With --from-file: the name that makes line ids (derived from `<source-id>:<line>`)
    /// stable, so a replay adds nothing [default: the file's absolute path, or `stdin`].
    #[arg(long, requires = "from_file")]
    source_id: Option<String>,
    /// Most messages per database transaction [default: 500 from SQS, 4000 from a file].
    #[arg(long, env = "INGEST_BATCH_SIZE",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: Option<u32>,
    /// Longest a message waits for its batch to fill, in milliseconds.
    #[arg(long, env = "INGEST_FLUSH_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    flush_ms: u64,
    /// Concurrent long polls (each receives up to 10 messages).
    #[arg(long, env = "INGEST_POLLERS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pollers: u32,
    /// Concurrent database writers (connections) [default: 2 from SQS, 4 from a file].
    #[arg(long, env = "INGEST_WRITERS",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    writers: Option<u32>,
    /// Long-poll wait in seconds [default: 20, or 2 with --drain].
    #[arg(long, env = "INGEST_WAIT_SECONDS",
          value_parser = clap::value_parser!(i32).range(0..=20))]
    wait_seconds: Option<i32>,
    /// Visibility timeout for received messages, in seconds [default: the queue's].
    #[arg(long, env = "INGEST_VISIBILITY_TIMEOUT",
          value_parser = clap::value_parser!(i32).range(0..=43_200))]
    visibility_timeout: Option<i32>,
    /// Seal at most this many values under one data key, then make a new one.
    #[arg(
        long,
        env = "INGEST_DATA_KEY_MAX_RECORDS",
        default_value_t = 10_000_000
    )]
    data_key_max_records: u64,
    /// Use one data key for at most this many seconds.
    #[arg(long, env = "INGEST_DATA_KEY_MAX_AGE", default_value_t = 86_400)]
    data_key_max_age: u64,
    /// Seconds between checks that the keys in use are still active: a key rotation
    /// (`rotate-keys`) is followed within this time.
    #[arg(long, env = "INGEST_KEY_CHECK_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    key_check_seconds: u64,
    /// Serve Prometheus metrics at /metrics, liveness at /healthz and readiness at /readyz on
    /// this address, e.g. 0.0.0.0:9090 [default: not served].
    #[arg(long, env = "METRICS_ADDR", value_name = "ADDR:PORT")]
    metrics_addr: Option<SocketAddr>,
    /// On SIGTERM or Ctrl-C, seconds allowed to commit and acknowledge what was received.
    #[arg(long, env = "INGEST_SHUTDOWN_DEADLINE", default_value_t = 30)]
    shutdown_deadline: u64,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    ReplayDeadLetters(replay::ReplayArgs),
}

/// `Args`, checked and resolved: what a run needs.
struct Config {
    format: OutputFormat,
    database_url: String,
    kms_key_id: String,
    source: SourceConfig,
    settings: Settings,
    shutdown_deadline: Duration,
    metrics_addr: Option<SocketAddr>,
}

impl TryFrom<Args> for Config {
    type Error = UsageError;

    fn try_from(args: Args) -> Result<Config, UsageError> {
        if args.data_key_max_records == 0 || args.data_key_max_age == 0 {
            return Err(UsageError(
                "--data-key-max-records and --data-key-max-age must be positive".into(),
            ));
        }
        // A file is not a queue: its lines are all there, so bigger batches and one more writer.
        let defaults = if args.from_file.is_some() {
            Settings::for_file()
        } else {
            Settings::default()
        };
        let batch_size = args.batch_size.map_or(defaults.batch_size, |b| b as usize);
        let writers = args.writers.map_or(defaults.writers, |w| w as usize);
        if args.data_key_max_records < 2 * batch_size as u64 {
            return Err(UsageError(
                "--data-key-max-records must be at least twice --batch-size (two values a login)"
                    .into(),
            ));
        }
        let source = match args.from_file {
            Some(path) => SourceConfig::File {
                path,
                source_id: args.source_id,
            },
            None => SourceConfig::Sqs(SqsConfig {
                queue: args.queue,
                protocol: args.sqs.sqs_protocol,
                poll: PollSettings {
                    wait_time_seconds: args.wait_seconds.unwrap_or(if args.drain { 2 } else { 20 }),
                    visibility_timeout_seconds: args.visibility_timeout,
                },
            }),
        };
        let from_file = matches!(source, SourceConfig::File { .. });
        let settings = Settings {
            // A file's lines must be taken in order by one reader.
            pollers: if from_file { 1 } else { args.pollers as usize },
            writers,
            batch_size,
            flush_interval: Duration::from_millis(args.flush_ms),
            drain: args.drain || from_file,
            data_key_max_records: args.data_key_max_records,
            data_key_max_age: Duration::from_secs(args.data_key_max_age),
            key_check_interval: Duration::from_secs(args.key_check_seconds),
            sealing: Arc::default(),
            storage: Arc::default(),
        };
        Ok(Config {
            format: args.output.format,
            database_url: args.vault.database_url,
            kms_key_id: args.vault.kms_key_id,
            source,
            settings,
            shutdown_deadline: Duration::from_secs(args.shutdown_deadline),
            metrics_addr: args.metrics_addr,
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    match args.command.take() {
        Some(Command::ReplayDeadLetters(replay)) => {
            let format = args.output.format;
            cli::main(args.vault.logging, replay, |config| {
                replay::run(config, format)
            })
            .await
        }
        None => cli::main(args.vault.logging, args, run).await,
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let Config {
        format,
        database_url,
        kms_key_id,
        source,
        settings,
        shutdown_deadline,
        metrics_addr,
    } = config;

    // Bound first, so a taken port fails the start; installed before anything records, so no
    // count is lost.
    let endpoint = match metrics_addr {
        Some(addr) => Some(open_endpoint(addr).await?),
        None => None,
    };

    let pool = db::connect(&database_url, settings.writers as u32 + 2).await?;
    db::check_schema(&pool).await?;

    let aws = cli::aws_config().await?;
    let kms = Arc::new(AwsKms::from_conf(&aws));
    let keyring =
        |created_by: &str| Keyring::new(pool.clone(), kms.clone(), &kms_key_id, created_by);

    let source = Arc::new(source.open(&aws).await?);

    let shutdown = CancellationToken::new();
    let signalled = shutdown.clone();
    tokio::spawn(async move {
        cli::shutdown_signal().await;
        tracing::info!("shutdown requested: finishing what was received");
        signalled.cancel();
    });

    // The endpoint outlives a shutdown request (the last counts stay visible while the
    // pipeline drains) and stops when the pipeline has ended.
    let endpoint_stop = CancellationToken::new();
    let stats = Arc::new(Stats::default());
    if let Some((listener, metrics)) = endpoint {
        let health = source.health();
        let checks = ingest::readiness::checks(
            pool.clone(),
            health.clone(),
            keyring("ingest readiness check"),
            settings.sealing.clone(),
            settings.storage.clone(),
        );
        let created_by = cli::process_name("ingest");
        tokio::spawn(watch::run(
            health,
            pool.clone(),
            created_by,
            endpoint_stop.clone(),
        ));
        let readiness = Readiness::new(checks, shutdown.clone());
        let endpoints = Arc::new(Endpoints {
            metrics,
            read_to_commit: stats.read_to_commit().clone(),
            readiness,
        });
        tokio::spawn(telemetry::server::serve(
            listener,
            endpoints,
            endpoint_stop.clone(),
        ));
    }

    let deadline = shutdown_deadline;
    let keyring = keyring(&cli::process_name("ingest"));
    let file = match &*source {
        Source::File(file) => Some(file.clone()),
        _ => None,
    };
    let from_file = file.is_some();
    let drain = settings.drain;
    let summary = match file {
        // A backfill: the file's bytes on a bar, or in log lines.
        Some(file) => {
            let reporter = progress::Reporter::new();
            reporter.start("reading the file", Unit::Bytes, file.size());
            let pipeline = run_pipeline(source, pool, keyring, settings, stats, shutdown, deadline);
            alongside(pipeline, &reporter, progress::POLL_EVERY, || {
                file.bytes_read()
            })
            .await
        }
        // A queue drained: messages written, in log lines (how many are left is not known).
        None if drain => {
            let reporter = progress::Reporter::log_lines();
            reporter.start("draining the queue", Unit::Count("messages"), None);
            let counts = stats.clone();
            let written = move || {
                let now = counts.summary();
                now.stored + now.quarantined + now.duplicates
            };
            let pipeline = run_pipeline(source, pool, keyring, settings, stats, shutdown, deadline);
            alongside(pipeline, &reporter, progress::POLL_EVERY, written).await
        }
        None => run_pipeline(source, pool, keyring, settings, stats, shutdown, deadline).await,
    };
    endpoint_stop.cancel();
    let summary = summary?;
    tracing::info!(kms_calls = kms.calls(), "done");
    Said::new(summary.to_string(), summary.to_json()).print(format);
    if from_file && summary.left_on_queue > 0 {
        // A queue hands these out again; a file does not, so the run must not pass as done.
        anyhow::bail!(
            "{} lines were not written (the log says why); run the same file again: the lines \
             already stored are skipped",
            summary.left_on_queue
        );
    }
    Ok(())
}

/// Installs the metrics recorder and binds the endpoint's address.
async fn open_endpoint(
    addr: SocketAddr,
) -> anyhow::Result<(tokio::net::TcpListener, PrometheusHandle)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| UsageError(format!("--metrics-addr {addr}: {e}")))?;
    let metrics = telemetry::install("ingest")?;
    tracing::info!(
        addr = %listener.local_addr()?,
        "serving /metrics, /healthz and /readyz"
    );
    Ok((listener, metrics))
}

/// Runs the pipeline until it ends, or until the deadline after a shutdown request.
async fn run_pipeline<S: MessageSource>(
    source: Arc<S>,
    pool: sqlx::PgPool,
    keyring: Keyring<AwsKms>,
    settings: Settings,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    deadline: Duration,
) -> anyhow::Result<Summary> {
    let pipeline = ingest::run(source, pool, keyring, settings, stats, shutdown.clone());
    tokio::pin!(pipeline);
    let summary = tokio::select! {
        summary = &mut pipeline => summary?,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(deadline).await } => {
            anyhow::bail!(
                "shutdown deadline of {}s passed before everything received was committed; \
                 the rest will be redelivered after its visibility timeout",
                deadline.as_secs()
            );
        }
    };
    Ok(summary)
}
