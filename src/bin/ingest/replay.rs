//! `ingest replay-dead-letters`: the dead-letter queue back to the login queue, each message
//! carrying its first send time and id (`pii_vault::ingest::replay`).

use pii_vault::cli::{self, OutputFormat, Said, UsageError};
use pii_vault::ingest::replay::{self, ReplaySettings};
use pii_vault::ingest::source::sqs::json;

/// Move dead letters back to the login queue, keeping their first send time and message id.
///
/// Each message carries its first send time and message id as message attributes, so that
/// ingest dates it, erases it and deduplicates it as the message it was (docs/runbook.md,
/// "Messages in the dead-letter queue"). A message leaves the dead-letter queue only after the
/// login queue accepted its copy. Prints `received=N moved=N sent_not_deleted=N released=N`.
/// Speaks SQS's JSON protocol (AWS, LocalStack 3.0 and later), standard queues only.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The dead-letter queue (URL or name).
    #[arg(long, value_name = "URL")]
    dead_letter_queue_url: String,
    /// The login queue ingest reads (URL or name); its redrive policy must name the
    /// dead-letter queue.
    #[arg(long, env = "QUEUE", value_name = "URL")]
    queue_url: String,
    /// Most messages to move in this run.
    #[arg(long, default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    max_messages: u64,
    /// Seconds a message stays hidden in the dead-letter queue while it is moved.
    #[arg(long, default_value_t = 60,
          value_parser = clap::value_parser!(i32).range(5..=43_200))]
    visibility_timeout: i32,
    /// Long-poll wait: the run ends when a receive waits this long and gets nothing.
    #[arg(long, default_value_t = 2,
          value_parser = clap::value_parser!(i32).range(0..=20))]
    wait_seconds: i32,
}

pub struct ReplayConfig {
    dead_letter_queue: String,
    queue: String,
    settings: ReplaySettings,
}

impl TryFrom<ReplayArgs> for ReplayConfig {
    type Error = UsageError;

    fn try_from(args: ReplayArgs) -> Result<Self, UsageError> {
        if args.dead_letter_queue_url == args.queue_url {
            return Err(UsageError(
                "--dead-letter-queue-url and --queue-url name the same queue".into(),
            ));
        }
        Ok(ReplayConfig {
            dead_letter_queue: args.dead_letter_queue_url,
            queue: args.queue_url,
            settings: ReplaySettings {
                max_messages: args.max_messages,
                visibility_timeout_seconds: args.visibility_timeout,
                wait_time_seconds: args.wait_seconds,
            },
        })
    }
}

pub async fn run(config: ReplayConfig, format: OutputFormat) -> anyhow::Result<()> {
    let aws = cli::aws_config().await?;
    let client = aws_sdk_sqs::Client::new(&aws);
    let dead_letter_queue = json::resolve_queue_url(&client, &config.dead_letter_queue).await?;
    let queue = json::resolve_queue_url(&client, &config.queue).await?;
    let done =
        replay::replay_dead_letters(&client, &dead_letter_queue, &queue, config.settings).await?;
    let json = serde_json::json!({
        "received": done.received,
        "moved": done.moved,
        "sent_not_deleted": done.sent_not_deleted,
        "released": done.released,
    });
    Said::new(done.to_string(), json).print(format);
    if done.sent_not_deleted > 0 {
        anyhow::bail!(
            "{} message(s) were sent but are still in the dead-letter queue; run again (ingest \
             skips the copies)",
            done.sent_not_deleted
        );
    }
    Ok(())
}
