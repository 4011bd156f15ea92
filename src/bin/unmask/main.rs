//! `unmask`: a compliance officer recovers original ip and device_id values; every reveal is
//! audited before anything is printed.

mod output;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};

use pii_vault::audit::{self, CheckpointKey, Intact};
use pii_vault::cli::{
    self, NothingFound, OutputFormat, Said, UsageError, VaultArgs, Witness, WitnessArgs,
};
use pii_vault::db;
use pii_vault::unmask::{self, Question, Request, RevealPurpose};
use pii_vault::vault::keyring::Keyring;
use pii_vault::vault::kms::AwsKms;
use serde_json::json;

/// The usage line: the three questions are alternatives, one of them required.
const USAGE: &str = "unmask (--user-id <USER_ID> | --masked-ip <TOKEN> | --masked-device-id <TOKEN>) --purpose <PURPOSE> --reason <REASON> [OPTIONS]
       unmask <COMMAND>";

/// Recover a user's original ip and device_id values (audited).
///
/// Ask exactly one of --user-id, --masked-ip or --masked-device-id, with a --purpose and a
/// --reason; both are recorded in the audit before anything is shown.
///
/// Exit codes: 0 values found, 1 nothing found (the attempt is still audited) or another
/// failure, 2 bad arguments, 3 not authorized, 4 integrity failure (nothing is printed) or,
/// for verify-audit, tampering found.
#[derive(Debug, Parser)]
#[command(
    name = "unmask",
    version = pii_vault::VERSION_LINE,
    args_conflicts_with_subcommands = true,
    // Exactly one question: the group is what clap enforces, the usage what it shows.
    group(ArgGroup::new("question").required(true).multiple(false)),
    override_usage = USAGE
)]
struct Args {
    #[command(flatten)]
    vault: VaultArgs,
    #[command(subcommand)]
    command: Option<Command>,
    /// Every login of this user.
    #[arg(long, group = "question")]
    user_id: Option<String>,
    /// Every login whose ip has this token (masked_ip).
    #[arg(long, group = "question", value_name = "TOKEN")]
    masked_ip: Option<String>,
    /// Every login whose device id has this token (masked_device_id).
    #[arg(long, group = "question", value_name = "TOKEN")]
    masked_device_id: Option<String>,
    /// Why, from a fixed list: recorded in the audit; the database refuses any other.
    #[arg(long, value_enum)]
    purpose: Option<RevealPurpose>,
    /// Why, in words: recorded in the audit (a ticket, a legal request).
    #[arg(long)]
    reason: Option<String>,
    /// Who is asking, for the audit [default: the OS user].
    #[arg(long)]
    actor: Option<String>,
    /// Output format: a reveal prints a table, JSON or CSV; verify-audit and audit-checkpoint
    /// print text (`table`) or one JSON object.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    format: Format,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check the whole audit: every row's hash and link, and every signed checkpoint against
    /// the signing key's public key. Exit 0 intact (prints the head to keep elsewhere), 4
    /// naming the first place where history was edited, rewritten, truncated or forked.
    VerifyAudit {
        #[command(flatten)]
        signing: SigningArgs,
        /// A head hash kept elsewhere (printed by an earlier verify-audit): it must still be
        /// in the chain, which catches the removal of rows after the last checkpoint.
        #[arg(long, value_name = "HASH")]
        expect_head: Option<String>,
        /// Also hold the audit to the newest checkpoint in the witness bucket (Object Lock):
        /// the chain must reach it, no signed checkpoint up to it may be missing, and an empty
        /// audit must have an empty witness. Checkpoint rows that do not verify are then
        /// named as warnings and skipped.
        #[arg(long)]
        witness: bool,
        #[command(flatten)]
        bucket: WitnessArgs,
    },
    /// Sign the audit's current head with the KMS checkpoint key, store the checkpoint and
    /// write it to the witness bucket (after verifying the chain against the witness). Run it
    /// on a schedule, as the checkpoint signer.
    AuditCheckpoint {
        #[command(flatten)]
        signing: SigningArgs,
        #[command(flatten)]
        bucket: WitnessArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    #[value(alias = "text")]
    Table,
    Json,
    Csv,
}

/// `Args`, checked and resolved: what a run needs.
struct Config {
    database_url: String,
    task: Task,
}

/// How the audit commands print: a reveal's formats less CSV.
fn audit_format(format: Format) -> Result<OutputFormat, UsageError> {
    match format {
        Format::Table => Ok(OutputFormat::Text),
        Format::Json => Ok(OutputFormat::Json),
        Format::Csv => Err(UsageError(
            "--format csv is for reveals; verify-audit and audit-checkpoint print text or json"
                .into(),
        )),
    }
}

enum Task {
    /// Reveal what `request` asks.
    Unmask {
        kms_key_id: String,
        request: Request,
        format: Format,
    },
    VerifyAudit {
        signing: SigningArgs,
        format: OutputFormat,
        /// The 32 bytes of `--expect-head`.
        expect_head: Option<Vec<u8>>,
        /// With `--witness`.
        witness: Option<Witness>,
    },
    AuditCheckpoint {
        signing: SigningArgs,
        format: OutputFormat,
        witness: Witness,
    },
}

impl TryFrom<Args> for Config {
    type Error = UsageError;

    fn try_from(args: Args) -> Result<Config, UsageError> {
        let task = match args.command {
            Some(Command::VerifyAudit {
                signing,
                expect_head,
                witness,
                bucket,
            }) => Task::VerifyAudit {
                format: audit_format(args.format)?,
                witness: witness.then(|| bucket.required("--witness")).transpose()?,
                signing,
                expect_head: expect_head
                    .map(|text| {
                        hex::decode(&text)
                            .ok()
                            .filter(|b| b.len() == 32)
                            .ok_or_else(|| UsageError("--expect-head takes 64 hex digits".into()))
                    })
                    .transpose()?,
            },
            Some(Command::AuditCheckpoint { signing, bucket }) => Task::AuditCheckpoint {
                signing,
                format: audit_format(args.format)?,
                witness: bucket.required("audit-checkpoint")?,
            },
            None => Task::Unmask {
                kms_key_id: args.vault.kms_key_id,
                request: request(
                    args.user_id,
                    args.masked_ip,
                    args.masked_device_id,
                    args.purpose,
                    args.reason,
                    args.actor,
                )?,
                format: args.format,
            },
        };
        Ok(Config {
            database_url: args.vault.database_url,
            task,
        })
    }
}

/// The reveal asked for, checked before anything is audited.
fn request(
    user_id: Option<String>,
    masked_ip: Option<String>,
    masked_device_id: Option<String>,
    purpose: Option<RevealPurpose>,
    reason: Option<String>,
    actor: Option<String>,
) -> Result<Request, UsageError> {
    let question = match (user_id, masked_ip, masked_device_id) {
        (Some(user), None, None) => Question::UserId(user),
        (None, Some(token), None) => Question::MaskedIp(token),
        (None, None, Some(token)) => Question::MaskedDeviceId(token),
        _ => unreachable!("clap requires exactly one question"),
    };
    let Some(purpose) = purpose else {
        return Err(UsageError(format!(
            "--purpose is required: one of {}",
            RevealPurpose::listed()
        )));
    };
    let reason = reason.unwrap_or_default();
    if reason.trim().is_empty() {
        return Err(UsageError("--reason is required and must say why".into()));
    }
    let actor = match actor {
        Some(actor) if !actor.trim().is_empty() => actor,
        Some(_) => return Err(UsageError("--actor must not be empty".into())),
        None => std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".to_owned()),
    };
    Ok(Request {
        question,
        purpose,
        reason,
        actor,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    cli::main(args.vault.logging, args, run).await
}

async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let (kms_key_id, request, format) = match config.task {
        Task::VerifyAudit {
            signing,
            format,
            expect_head,
            witness,
        } => {
            verify_audit(
                &config.database_url,
                &signing,
                expect_head.as_deref(),
                witness.as_ref(),
            )
            .await?
            .print(format);
            return Ok(ExitCode::SUCCESS);
        }
        Task::AuditCheckpoint {
            signing,
            format,
            witness,
        } => {
            let pool = db::connect(&config.database_url, 1).await?;
            let key = checkpoint_key(&signing).await?;
            let bucket = witness.bucket().await?;
            let signed = key.checkpoint(&pool, &bucket).await?;
            for skipped in &signed.skipped {
                eprintln!("warning: {skipped}");
            }
            let mut text: Vec<String> = signed
                .completed
                .iter()
                .map(|seq| {
                    format!(
                        "checkpoint seq {seq} (stored earlier, not yet witnessed) witnessed in {}",
                        bucket.bucket()
                    )
                })
                .collect();
            text.push(match &signed.checkpoint {
                Some(checkpoint) => format!(
                    "checkpoint {} signed: seq {}, audit row {}, head {}, witnessed in {}",
                    checkpoint.id,
                    checkpoint.seq.unwrap_or_default(),
                    checkpoint.last_audit_id,
                    hex::encode(&checkpoint.head_hash),
                    bucket.bucket()
                ),
                None => "the audit is empty; nothing to sign".to_owned(),
            });
            let json = json!({
                "witness_bucket": bucket.bucket(),
                "completed": signed.completed,
                "skipped": signed.skipped.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "checkpoint": signed.checkpoint.as_ref().map(|c| json!({
                    "id": c.id,
                    "seq": c.seq,
                    "last_audit_id": c.last_audit_id,
                    "head": hex::encode(&c.head_hash),
                })),
            });
            Said::new(text.join("\n"), json).print(format);
            return Ok(ExitCode::SUCCESS);
        }
        Task::Unmask {
            kms_key_id,
            request,
            format,
        } => (kms_key_id, request, format),
    };

    let pool = db::connect(&config.database_url, 2).await?;
    let kms = Arc::new(AwsKms::from_conf(&cli::aws_config().await?));
    let keyring = Keyring::new(pool.clone(), kms.clone(), &kms_key_id, &request.actor);
    let revealed = unmask::unmask(&pool, &keyring, &request).await?;
    tracing::debug!(kms_calls = kms.calls(), logins = revealed.len(), "unmasked");
    if revealed.is_empty() {
        return Err(NothingFound(format!(
            "nothing found for {} (the attempt was audited)",
            request.question
        ))
        .into());
    }
    if revealed
        .iter()
        .all(|r| r.ip.is_none() && r.device_id.is_none())
    {
        return Err(NothingFound(format!(
            "the values of {} were erased: {} login(s), nothing to reveal (the attempt was audited)",
            request.question,
            revealed.len()
        ))
        .into());
    }
    let uncommitted = revealed.iter().filter(|r| !r.key_committed).count();
    if uncommitted > 0 {
        eprintln!(
            "note: {uncommitted} login(s) are sealed in format 1, authenticated but not \
             key-committed without the token key; `rotate-keys data-key` re-seals them in format 2"
        );
    }
    let mut out = std::io::stdout().lock();
    match format {
        Format::Table => output::table(&mut out, &revealed)?,
        Format::Json => output::json(&mut out, &revealed)?,
        Format::Csv => output::csv(&mut out, &revealed)?,
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
struct SigningArgs {
    /// The KMS asymmetric key (ECC_NIST_P256, SIGN_VERIFY) that signs audit checkpoints.
    #[arg(
        long,
        env = "AUDIT_SIGNING_KEY_ID",
        default_value = "alias/pii-vault-audit-signer"
    )]
    audit_signing_key_id: String,
}

async fn checkpoint_key(signing: &SigningArgs) -> Result<CheckpointKey, UsageError> {
    Ok(CheckpointKey {
        client: aws_sdk_kms::Client::new(&cli::aws_config().await?),
        key_id: signing.audit_signing_key_id.clone(),
    })
}

async fn verify_audit(
    database_url: &str,
    signing: &SigningArgs,
    expect_head: Option<&[u8]>,
    witness: Option<&Witness>,
) -> anyhow::Result<Said> {
    let pool = db::connect(database_url, 1).await?;
    if let Some(witness) = witness {
        let key = checkpoint_key(signing).await?.verifying_key().await?;
        let bucket = witness.bucket().await?;
        let intact = audit::verify_with_witness(&pool, &key, &bucket, expect_head).await?;
        for skipped in &intact.skipped {
            eprintln!("warning: {skipped}");
        }
        let mut said = intact_said(&intact);
        said.text += &match &intact.witnessed {
            Some(witnessed) => format!(
                "\nwitness: checkpoint seq {} (audit row {}) in {} reached",
                witnessed.seq.unwrap_or_default(),
                witnessed.last_audit_id,
                bucket.bucket()
            ),
            None => format!("\nwitness: {} holds no checkpoint yet", bucket.bucket()),
        };
        said.json["witness"] = json!({
            "bucket": bucket.bucket(),
            "seq": intact.witnessed.as_ref().and_then(|w| w.seq),
            "last_audit_id": intact.witnessed.as_ref().map(|w| w.last_audit_id),
        });
        return Ok(said);
    }
    let checkpoints: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_checkpoints")
        .fetch_one(&pool)
        .await?;
    // The public key is needed only to check checkpoints; an audit without any verifies
    // without KMS.
    let key = if checkpoints > 0 {
        Some(checkpoint_key(signing).await?.verifying_key().await?)
    } else {
        None
    };
    let intact = audit::verify(&pool, key.as_ref(), expect_head).await?;
    Ok(intact_said(&intact))
}

fn intact_said(intact: &Intact) -> Said {
    Said::new(
        format!(
            "audit intact: {} rows, {} signed checkpoints, head {}",
            intact.rows,
            intact.checkpoints,
            hex::encode(intact.head)
        ),
        json!({
            "intact": true,
            "rows": intact.rows,
            "checkpoints": intact.checkpoints,
            "head": hex::encode(intact.head),
            "last_audit_id": intact.last_id,
            "skipped": intact.skipped.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }),
    )
}
