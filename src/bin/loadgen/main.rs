//! `loadgen`: puts login messages on a queue with SendMessageBatch, from a file (the sample's
//! JSONL or its original .json.gz array) or generated.

#[path = "../common/progress.rs"]
mod progress;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::task::JoinSet;

use pii_vault::cli::{self, LoggingArgs, SqsArgs, UsageError};
use pii_vault::ingest::source::sqs::json;
use pii_vault::ingest::source::sqs::query::QueryClient;
use pii_vault::ingest::source::sqs::{Protocol, SQS_BATCH_LIMIT};
use pii_vault::progress::{Progress, Unit};
use pii_vault::synth::Generator;

/// Send login messages to an SQS queue (creating it, with its dead-letter queue, if it is
/// missing).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version = pii_vault::VERSION_LINE)]
struct Args {
    #[command(flatten)]
    logging: LoggingArgs,
    /// Queue name or URL.
    #[arg(long, env = "QUEUE", default_value = "login-queue")]
    queue: String,
    #[command(flatten)]
    sqs: SqsArgs,
    /// Send the bodies in this file: JSON lines, or a JSON array (gzip-compressed if the name
    /// ends in .gz).
    #[arg(long, conflicts_with = "count", required_unless_present = "count")]
    file: Option<PathBuf>,
    /// Send this many generated messages.
    #[arg(long)]
    count: Option<u64>,
    /// Chance that a generated login reuses an earlier ip, and independently an earlier
    /// device_id.
    #[arg(long, default_value_t = 0.2)]
    dup_rate: f64,
    /// Chance that a generated message is malformed.
    #[arg(long, default_value_t = 0.01)]
    bad_rate: f64,
    /// Seed of the generator: the same seed sends the same messages.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// SendMessageBatch calls in flight.
    #[arg(long, default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,
}

/// `Args`, checked: what a run needs.
struct Config {
    queue: String,
    sqs: SqsArgs,
    bodies: Bodies,
    concurrency: usize,
}

/// What to send.
enum Bodies {
    File(PathBuf),
    Generated {
        count: u64,
        seed: u64,
        dup_rate: f64,
        bad_rate: f64,
    },
}

impl TryFrom<Args> for Config {
    type Error = UsageError;

    fn try_from(args: Args) -> Result<Config, UsageError> {
        for (name, rate) in [("--dup-rate", args.dup_rate), ("--bad-rate", args.bad_rate)] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(UsageError(format!("{name} must be between 0 and 1")));
            }
        }
        let bodies = match (args.file, args.count) {
            (Some(path), _) => Bodies::File(path),
            (None, Some(count)) => Bodies::Generated {
                count,
                seed: args.seed,
                dup_rate: args.dup_rate,
                bad_rate: args.bad_rate,
            },
            (None, None) => unreachable!("clap requires --file or --count"),
        };
        Ok(Config {
            queue: args.queue,
            sqs: args.sqs,
            bodies,
            concurrency: args.concurrency as usize,
        })
    }
}

/// Exit codes: README, "Exit codes" (`cli::Failure`).
#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    cli::main(args.logging, args, run).await
}

async fn run(config: Config) -> anyhow::Result<()> {
    let (bodies, total): (Box<dyn Iterator<Item = String> + Send>, u64) = match &config.bodies {
        Bodies::File(path) => {
            let bodies = read_bodies(path)?;
            let total = bodies.len() as u64;
            (Box::new(bodies.into_iter()), total)
        }
        &Bodies::Generated {
            count,
            seed,
            dup_rate,
            bad_rate,
        } => {
            let mut generator = Generator::new(seed, dup_rate, bad_rate);
            (
                Box::new((0..count).map(move |_| generator.next_message().body)),
                count,
            )
        }
    };

    let aws = cli::aws_config().await?;
    let protocol = config
        .sqs
        .sqs_protocol
        .resolve(&aws, &config.queue)
        .await
        .context("choosing the SQS protocol")?;
    let client = match protocol {
        Protocol::Json => Sender::Json(aws_sdk_sqs::Client::new(&aws)),
        Protocol::Query => Sender::Query(QueryClient::new(&aws)),
    };
    let queue_url = client
        .create_or_find(&config.queue)
        .await
        .with_context(|| format!("creating or finding queue {}", config.queue))?;

    let progress = progress::Reporter::new();
    progress.start("sending", Unit::Count("messages"), Some(total));
    let started = std::time::Instant::now();
    let mut in_flight = JoinSet::new();
    let mut sent = 0u64;
    let mut chunk = Vec::with_capacity(SQS_BATCH_LIMIT);
    let mut bodies = bodies.peekable();
    while bodies.peek().is_some() {
        chunk.clear();
        chunk.extend(bodies.by_ref().take(SQS_BATCH_LIMIT));
        if in_flight.len() >= config.concurrency {
            sent += in_flight.join_next().await.expect("not empty")??;
            progress.advance(sent);
        }
        in_flight.spawn(send_batch(client.clone(), queue_url.clone(), chunk.clone()));
    }
    while let Some(done) = in_flight.join_next().await {
        sent += done??;
        progress.advance(sent);
    }
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "sent {sent} messages to {queue_url} in {seconds:.2}s ({:.0} msgs/s)",
        sent as f64 / seconds.max(1e-9)
    );
    Ok(())
}

/// SendMessageBatch and CreateQueue in the protocol the queue speaks.
#[derive(Clone)]
enum Sender {
    Json(aws_sdk_sqs::Client),
    Query(QueryClient),
}

impl Sender {
    /// The URL of `queue` (a URL already, or a name). A missing queue is created with its
    /// dead-letter queue `<name>-dlq` and a redrive policy, as production has it, so that a
    /// message ingest cannot store ends there and not in an endless loop; an existing queue is
    /// left as it is.
    async fn create_or_find(&self, queue: &str) -> anyhow::Result<String> {
        if queue.starts_with("http://") || queue.starts_with("https://") {
            return match self {
                // Refuses an HTTPS URL for the Query protocol, in one line.
                Sender::Query(client) => Ok(client.get_queue_url(queue).await?),
                Sender::Json(_) => Ok(queue.to_owned()),
            };
        }
        match self {
            Sender::Json(client) => match json::resolve_queue_url(client, queue).await {
                Ok(url) => Ok(url),
                Err(missing) if !missing.transient => create_with_dead_letters(client, queue).await,
                Err(fault) => Err(fault.into()),
            },
            Sender::Query(client) => client.get_queue_url(queue).await.map_err(|missing| {
                anyhow::anyhow!(
                    "{missing}; loadgen creates a queue (with its dead-letter queue) over the JSON \
                     protocol only: run it once with --sqs-protocol json, or create the queue \
                     with scripts/aws-init.py"
                )
            }),
        }
    }
}

/// Receives a message may have before SQS moves it to the dead-letter queue.
const MAX_RECEIVE_COUNT: u32 = 5;

/// Creates `<queue>-dlq`, then `queue` with a redrive policy naming it.
async fn create_with_dead_letters(
    client: &aws_sdk_sqs::Client,
    queue: &str,
) -> anyhow::Result<String> {
    use aws_sdk_sqs::types::QueueAttributeName;
    let dead_letters = format!("{queue}-dlq");
    let create = |name: String| client.create_queue().queue_name(name);
    let dlq_url = create(dead_letters.clone())
        .send()
        .await
        .map_err(|e| json::source_error(&format!("CreateQueue {dead_letters}"), e))?
        .queue_url
        .context("CreateQueue returned no URL")?;
    let dlq_arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| json::source_error(&format!("GetQueueAttributes {dead_letters}"), e))?
        .attributes
        .and_then(|mut attributes| attributes.remove(&QueueAttributeName::QueueArn))
        .context("GetQueueAttributes returned no QueueArn")?;
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": MAX_RECEIVE_COUNT,
    });
    let url = create(queue.to_owned())
        .attributes(QueueAttributeName::RedrivePolicy, redrive.to_string())
        .send()
        .await
        .map_err(|e| json::source_error(&format!("CreateQueue {queue}"), e))?
        .queue_url
        .context("CreateQueue returned no URL")?;
    tracing::info!(queue, dead_letter_queue = %dead_letters, "created the queue and its dead-letter queue");
    Ok(url)
}

async fn send_batch(client: Sender, queue_url: String, bodies: Vec<String>) -> anyhow::Result<u64> {
    let sent = match &client {
        Sender::Json(client) => json::send_batch(client, &queue_url, &bodies).await?,
        Sender::Query(client) => client.send_batch(&queue_url, &bodies).await?,
    };
    Ok(sent as u64)
}

/// The bodies in a file: one per line, or the elements of a JSON array.
fn read_bodies(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut text = String::new();
    let reading = if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)
    } else {
        std::io::BufReader::new(file).read_to_string(&mut text)
    };
    reading.with_context(|| format!("reading {}", path.display()))?;
    if text.trim_start().starts_with('[') {
        let records: Vec<serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON array", path.display()))?;
        return Ok(records.iter().map(|r| r.to_string()).collect());
    }
    Ok(text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect())
}
