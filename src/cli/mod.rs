//! What the binaries share: common flags, logging, AWS configuration, and how an error is
//! printed: one line on stderr, with its chain of causes, never a panic or backtrace.
//!
//! Every binary ends a failed run with the exit code [`Failure::of`] its error gives: one table
//! for all of them (README, "Exit codes").

mod failure;

use failure::lacks_privilege;
pub use failure::{Failure, NothingFound, UsageError, one_line, print_error};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

use crate::db::LOCAL_DATABASE_URL;
use crate::ingest::source::sqs::probe::ProtocolChoice;

/// The flags of every binary that opens the vault (`ingest`, `unmask`, `rotate-keys`): how it
/// logs, its database, and the KMS key that wraps new keys.
#[derive(Debug, Clone, clap::Args)]
pub struct VaultArgs {
    #[command(flatten)]
    pub logging: LoggingArgs,
    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = LOCAL_DATABASE_URL,
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,
    /// KMS key (id, ARN or alias) that wraps new keys. Existing keys unwrap under the KMS key
    /// recorded with them.
    #[arg(
        long,
        env = "KMS_KEY_ID",
        default_value = "alias/pii-vault",
        global = true
    )]
    pub kms_key_id: String,
}

/// `--sqs-protocol`, shared by `ingest` and `loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct SqsArgs {
    /// The protocol to speak to SQS: LocalStack before 3.0 (as in the original take-home's
    /// docker-compose) knows only `query`.
    #[arg(long, env = "SQS_PROTOCOL", value_enum, default_value_t = ProtocolChoice::Json)]
    pub sqs_protocol: ProtocolChoice,
}

/// The witness store: the S3 bucket (Object Lock, COMPLIANCE mode) that witnesses audit
/// checkpoints and erasures.
#[derive(Debug, Clone, clap::Args)]
pub struct WitnessArgs {
    /// The S3 bucket (Object Lock on, COMPLIANCE mode) that witnesses audit checkpoints and
    /// erasures.
    #[arg(long, env = "AUDIT_WITNESS_BUCKET", value_name = "BUCKET")]
    pub audit_witness_bucket: Option<String>,
    /// Days each witnessed object is locked (COMPLIANCE mode: nobody can shorten it). Use the
    /// audit's retention period.
    #[arg(
        long,
        env = "AUDIT_WITNESS_RETAIN_DAYS",
        default_value_t = 2557,
        value_name = "DAYS"
    )]
    pub audit_witness_retain_days: u32,
}

/// The witness bucket, resolved: its name and retention.
#[derive(Debug, Clone)]
pub struct Witness {
    pub bucket: String,
    pub retain_days: u32,
}

impl WitnessArgs {
    /// The bucket, which `why` cannot do without.
    pub fn required(self, why: &str) -> Result<Witness, UsageError> {
        match self.audit_witness_bucket {
            Some(bucket) if !bucket.trim().is_empty() => Ok(Witness {
                bucket,
                retain_days: self.audit_witness_retain_days,
            }),
            _ => Err(UsageError(format!(
                "{why} needs the witness bucket: set AUDIT_WITNESS_BUCKET or --audit-witness-bucket"
            ))),
        }
    }
}

impl Witness {
    /// The bucket, reached with the process's AWS settings.
    pub async fn bucket(&self) -> Result<crate::audit::witness::WitnessBucket, UsageError> {
        Ok(crate::audit::witness::WitnessBucket::new(
            &aws_config().await?,
            &self.bucket,
            self.retain_days,
        ))
    }
}

/// `--format`: how a command prints its result on stdout.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OutputArgs {
    /// How the result is printed on stdout: `text` for people, `json` (one object on one line)
    /// for scripts. Errors stay one line on stderr either way.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text, global = true)]
    pub format: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// A command's result, said both ways: lines for people and one JSON object for scripts.
#[derive(Debug)]
pub struct Said {
    pub text: String,
    pub json: serde_json::Value,
}

impl Said {
    pub fn new(text: impl Into<String>, json: serde_json::Value) -> Self {
        Said {
            text: text.into(),
            json,
        }
    }

    /// Prints the result on stdout as `format` asks.
    pub fn print(&self, format: OutputFormat) {
        match format {
            OutputFormat::Text => println!("{}", self.text.trim_end()),
            OutputFormat::Json => println!("{}", self.json),
        }
    }
}

#[derive(Debug, Clone, Copy, clap::Args)]
pub struct LoggingArgs {
    /// How log lines on stderr look: `text` for people, `json` (one object per line) for a log
    /// collector. Verbosity comes from RUST_LOG (default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when stderr is a terminal.
    Text,
    /// One JSON object per line: timestamp, level, target, message and fields.
    Json,
}

/// Libraries whose most verbose levels print request and response contents (the AWS SDK's
/// orchestrator logs every ReceiveMessage output, message bodies included, at TRACE). Their
/// events pass only up to DEBUG, whatever `RUST_LOG` asks: the cap is a second filter, so it
/// can lower a level but never raise one.
const CAPPED_CRATES: [&str; 11] = [
    "aws_config",
    "aws_runtime",
    "aws_sdk_kms",
    "aws_sdk_sqs",
    "aws_sdk_sts",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "h2",
    "hyper",
];

/// The cap on `CAPPED_CRATES` (everything else passes).
pub fn verbosity_cap() -> Targets {
    CAPPED_CRATES.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |cap, krate| cap.with_target(*krate, LevelFilter::DEBUG),
    )
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`). They never carry personal data
/// or key material: the types that hold either print redacted, and the libraries that would
/// print message bodies are capped ([`verbosity_cap`]).
pub fn init_logging(args: &LoggingArgs) {
    let filter = EnvFilter::try_new(quiet_sdk(
        &std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
    ))
    .unwrap_or_else(|_| EnvFilter::new(quiet_sdk("info")));
    let text = tracing_subscriber::fmt::layer()
        .with_writer(crate::progress::LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let layer = match args.log_format {
        LogFormat::Text => text.boxed(),
        LogFormat::Json => text.json().with_ansi(false).boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter).with_filter(verbosity_cap()))
        .init();
}

/// `RUST_LOG`'s directives, with the AWS SDK's configuration loader held to errors unless they
/// ask for debug detail: its warnings (a region or credentials looked for in vain, each with
/// its whole error context) are detail, and the error that follows says what to do in one line.
fn quiet_sdk(directives: &str) -> String {
    if ["debug", "trace", "aws_config"]
        .iter()
        .any(|word| directives.contains(word))
    {
        directives.to_owned()
    } else {
        format!("{directives},aws_config=error")
    }
}

/// AWS configuration from the standard chain: `AWS_REGION`, credentials from the environment,
/// profile or instance role, and `AWS_ENDPOINT_URL` for an emulator. The SDK retries throttling
/// and transient faults with back-off before pii-vault sees an error. No region anywhere in
/// the chain is a usage error that says to set `AWS_REGION`, before any request fails on it.
pub async fn aws_config() -> Result<aws_config::SdkConfig, UsageError> {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(5))
        .load()
        .await;
    if config.region().is_none() {
        return Err(UsageError(
            "no AWS region: set AWS_REGION (e.g. AWS_REGION=us-east-1) or a profile's region"
                .into(),
        ));
    }
    Ok(config)
}

/// Names this process in the keys it creates: program, host and pid.
pub fn process_name(program: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!("{program}@{host}:{}", std::process::id())
}

/// A binary's life after parsing: logging started as `logging` (from `args`) says, its
/// arguments checked into its configuration (a bad one is one line and exit code 2), then
/// `run`; a failure is printed as one line and ends with its [`Failure`]'s exit code.
pub async fn main<Args, Config, Run, Done>(
    logging: LoggingArgs,
    args: Args,
    run: impl FnOnce(Config) -> Run,
) -> std::process::ExitCode
where
    Config: TryFrom<Args, Error = UsageError>,
    Run: std::future::Future<Output = anyhow::Result<Done>>,
    Done: std::process::Termination,
{
    init_logging(&logging);
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(usage) => {
            print_error(&usage.into());
            return std::process::ExitCode::from(Failure::Usage.code());
        }
    };
    match run(config).await {
        Ok(done) => done.report(),
        Err(error) => {
            let failure = Failure::of(&error);
            if failure == Failure::Refused && lacks_privilege(&error) {
                eprintln!(
                    "error: {} (the database login lacks the role this command needs: README, \"Database roles\")",
                    one_line(&error)
                );
            } else {
                print_error(&error);
            }
            std::process::ExitCode::from(failure.code())
        }
    }
}

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_joins_the_chain_without_repeats() {
        let error = anyhow::anyhow!("root cause")
            .context("middle")
            .context("middle: root cause wrapped");
        assert_eq!(one_line(&error), "middle: root cause wrapped");
        let error = anyhow::anyhow!("root\ncause").context("outer");
        assert_eq!(one_line(&error), "outer: root cause");
    }
}
