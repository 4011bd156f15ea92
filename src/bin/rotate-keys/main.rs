//! `rotate-keys`: schema and key administration. Every command is idempotent and safe to run
//! from a scheduler: an interrupted run is finished by the next one.

#[path = "../common/progress.rs"]
mod progress;
mod status;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

use pii_vault::cli::{
    self, OutputArgs, OutputFormat, Said, UsageError, VaultArgs, Witness, WitnessArgs,
};
use pii_vault::db;
use pii_vault::lifecycle::{self, Options, Report};
use pii_vault::unmask;
use pii_vault::vault::Purpose;
use pii_vault::vault::keyring::{Keyring, TokenKeyInit};
use pii_vault::vault::kms::AwsKms;
use pii_vault::vault::retention::WindowState;
use serde_json::json;

use progress::Reporter;

/// Create, rotate, re-wrap and retire pii-vault's keys, online.
#[derive(Debug, Parser)]
#[command(name = "rotate-keys", version = pii_vault::VERSION_LINE)]
struct Args {
    #[command(flatten)]
    vault: VaultArgs,
    #[command(flatten)]
    output: OutputArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the database migrations and create the first token key. Safe to run again: an
    /// existing token key is never replaced.
    Init {
        /// A login with CREATEROLE (RDS's master user) that opens the migration window: it
        /// lends the owner the door role for the migrations and takes it back after. Needed
        /// only when migrations are pending.
        #[arg(long, env = "ROLE_ADMIN_DATABASE_URL", hide_env_values = true)]
        role_admin_url: Option<String>,
    },
    /// Every key: purpose, state, KMS key, age, the rows and values it protects and, for a
    /// data key, the login dates they come from; the data key limit and the retention.
    Status {
        /// The limit to hold data keys to (as given to ingest and data-key).
        #[arg(long, default_value_t = 10_000_000)]
        data_key_max_records: u64,
    },
    /// Replace every data key: re-seal all stored values under a new one, retire the old ones.
    DataKey(RotationArgs),
    /// Replace the token key: recompute every stored token, retire the old key.
    TokenKey(RotationArgs),
    /// Re-wrap every stored key outside retention windows under the KMS key that new keys
    /// are wrapped under (--kms-key-id, KMS_KEY_ID), with KMS ReEncrypt, so that the old KMS
    /// key can be disabled: point KMS_KEY_ID at the new key everywhere, then run this. A
    /// window's data keys stay under the window's own KMS key, and a window's KMS key is
    /// refused as the target.
    Rewrap,
    /// Erase a user for good (an erasure request): their sealed values, their tokens and the
    /// quarantined messages that name them; the analytic rows stay. Messages of theirs sent
    /// before the erasure and delivered after it are stored without personal fields.
    Erase {
        #[arg(long)]
        user_id: String,
        /// Why: recorded in the audit.
        #[arg(long)]
        reason: String,
        /// Who asks, for the audit [default: the OS user].
        #[arg(long)]
        actor: Option<String>,
        /// Keep the user's tokens (a legal hold that needs the rows linkable); by default they
        /// go, since a token is a stable pseudonym and personal data.
        #[arg(long)]
        keep_tokens: bool,
        /// Record the erasure even though nothing stored names the user yet (their messages
        /// are still on the queue). Without it, an id that names nothing is refused.
        #[arg(long)]
        in_flight: bool,
        /// Print what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        witness: WitnessArgs,
    },
    /// Write to the witness bucket every erasure it does not hold yet (after an erase whose
    /// witness write failed). Safe to run from a scheduler.
    WitnessErasures {
        #[command(flatten)]
        witness: WitnessArgs,
    },
    /// Step of the restore procedure: apply again every erasure in the witness bucket that this
    /// database does not hold (it was restored from a dump taken before them). Run it before
    /// the restored database serves anyone.
    ReapplyErasures {
        /// Who runs the restore, for the audit [default: the OS user].
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        witness: WitnessArgs,
    },
    /// Open and check every stored value (revealing nothing), e.g. after a rotation.
    Verify,
    /// Register the retention window of a month: data keys of logins dated in it are wrapped
    /// under its own KMS key from now on, so that expiring it shreds every copy.
    Window {
        /// The month, as YYYY-MM.
        #[arg(long, value_parser = parse_month)]
        month: time::Date,
        /// The window's KMS key (id or ARN, not an alias: the window must keep its key), made
        /// with keys/kms-window-key-policy.json. Refused if it wraps anything outside the window.
        #[arg(long = "key", id = "window_kms_key_id", value_name = "KMS_KEY")]
        kms_key_id: String,
    },
    /// Expire the retention windows that end before the horizon: delete their logins' sealed
    /// values and quarantined bodies, destroy their data keys and schedule their KMS keys for
    /// deletion, so backups cannot open them either. A dry run unless --apply; resumable.
    Expire {
        /// The horizon, in days (e.g. 400d): windows ending on or before today minus this.
        #[arg(long, value_parser = parse_days)]
        older_than: u32,
        /// Do it (without it, the plan is printed and nothing changes).
        #[arg(long)]
        apply: bool,
        /// Also set the expired logins' tokens to NULL.
        #[arg(long)]
        tokens: bool,
        /// Logins per transaction.
        #[arg(long, default_value_t = 1_000,
              value_parser = clap::value_parser!(i64).range(1..=100_000))]
        batch_size: i64,
        /// Seconds given to running ingesters to stop sealing into an expiring window (at
        /// least their --key-check-seconds).
        #[arg(long, default_value_t = 15)]
        grace_seconds: u64,
    },
}

#[derive(Debug, ClapArgs)]
struct RotationArgs {
    /// Rows per transaction.
    #[arg(long, default_value_t = 1_000,
          value_parser = clap::value_parser!(i64).range(1..=100_000))]
    batch_size: i64,
    /// Seconds given to running ingesters to move to the new key before the last pass (at
    /// least their --key-check-seconds).
    #[arg(long, default_value_t = 15)]
    grace_seconds: u64,
    /// Drop the wrapped bytes of retired keys once they protect nothing. Irreversible.
    #[arg(long)]
    destroy_retired: bool,
    /// Values one new data key may seal (data-key): re-sealing starts a new key past it.
    #[arg(long, default_value_t = 10_000_000,
          value_parser = clap::value_parser!(u64).range(2..))]
    data_key_max_records: u64,
}

impl RotationArgs {
    fn options(&self) -> Options {
        Options {
            batch_size: self.batch_size,
            grace: Duration::from_secs(self.grace_seconds),
            destroy_retired: self.destroy_retired,
            data_key_max_records: self.data_key_max_records,
        }
    }
}

/// `Args`, checked and resolved: what a run needs.
struct Config {
    database_url: String,
    kms_key_id: String,
    format: OutputFormat,
    task: Task,
}

/// A [`Command`], checked.
enum Task {
    Init {
        role_admin_url: Option<String>,
    },
    Status {
        data_key_max_records: u64,
    },
    /// `data-key` or `token-key`: the keys of that purpose replaced.
    ReplaceKeys(Purpose, Options),
    Rewrap {
        new_kms_key_id: String,
    },
    Erase {
        user_id: String,
        reason: String,
        actor: String,
        keep_tokens: bool,
        in_flight: bool,
        dry_run: bool,
        /// None only for a dry run.
        witness: Option<Witness>,
    },
    WitnessErasures(Witness),
    ReapplyErasures {
        actor: String,
        witness: Witness,
    },
    Verify,
    Window {
        month: time::Date,
        kms_key_id: String,
    },
    Expire(lifecycle::Expiry),
}

impl TryFrom<Args> for Config {
    type Error = UsageError;

    fn try_from(args: Args) -> Result<Config, UsageError> {
        let task = match args.command {
            Command::Init { role_admin_url } => Task::Init { role_admin_url },
            Command::Status {
                data_key_max_records,
            } => Task::Status {
                data_key_max_records,
            },
            Command::DataKey(rotation) => Task::ReplaceKeys(Purpose::Data, rotation.options()),
            Command::TokenKey(rotation) => Task::ReplaceKeys(Purpose::Token, rotation.options()),
            Command::Rewrap => Task::Rewrap {
                new_kms_key_id: args.vault.kms_key_id.clone(),
            },
            Command::Erase {
                user_id,
                reason,
                actor,
                keep_tokens,
                in_flight,
                dry_run,
                witness,
            } => {
                if reason.trim().is_empty() {
                    return Err(UsageError("--reason must say why".into()));
                }
                if user_id.is_empty() {
                    return Err(UsageError("--user-id must not be empty".into()));
                }
                Task::Erase {
                    user_id,
                    reason,
                    actor: actor_or_os_user(actor),
                    keep_tokens,
                    in_flight,
                    dry_run,
                    witness: if dry_run {
                        None
                    } else {
                        Some(witness.required("erase")?)
                    },
                }
            }
            Command::WitnessErasures { witness } => {
                Task::WitnessErasures(witness.required("witness-erasures")?)
            }
            Command::ReapplyErasures { actor, witness } => Task::ReapplyErasures {
                actor: actor_or_os_user(actor),
                witness: witness.required("reapply-erasures")?,
            },
            Command::Verify => Task::Verify,
            Command::Window { month, kms_key_id } => {
                if kms_key_id.starts_with("alias/") {
                    return Err(UsageError(
                        "--kms-key-id must name the key itself (id or ARN), not an alias".into(),
                    ));
                }
                Task::Window { month, kms_key_id }
            }
            Command::Expire {
                older_than,
                apply,
                tokens,
                batch_size,
                grace_seconds,
            } => {
                let today = time::OffsetDateTime::now_utc().date();
                Task::Expire(lifecycle::Expiry {
                    horizon: today - time::Duration::days(i64::from(older_than)),
                    apply,
                    drop_tokens: tokens,
                    batch_size,
                    grace: Duration::from_secs(grace_seconds),
                })
            }
        };
        Ok(Config {
            database_url: args.vault.database_url,
            kms_key_id: args.vault.kms_key_id,
            format: args.output.format,
            task,
        })
    }
}

/// The actor an audit row names: the one given, or the OS user.
fn actor_or_os_user(actor: Option<String>) -> String {
    actor
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Exit codes: README, "Exit codes" (`cli::Failure`).
#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    cli::main(args.vault.logging, args, run).await
}

async fn run(config: Config) -> anyhow::Result<()> {
    let format = config.format;
    execute(config).await?.print(format);
    Ok(())
}

/// Runs the task and says what it did.
async fn execute(config: Config) -> anyhow::Result<Said> {
    let pool = db::connect(&config.database_url, 4).await?;
    let keyring = || async {
        let kms = Arc::new(AwsKms::from_conf(&cli::aws_config().await?));
        anyhow::Ok(Keyring::new(
            pool.clone(),
            kms,
            &config.kms_key_id,
            &cli::process_name("rotate-keys"),
        ))
    };
    Ok(match config.task {
        Task::Init { role_admin_url } => {
            let role_admin = match &role_admin_url {
                Some(url) => Some(db::connect(url, 1).await?),
                None => None,
            };
            db::migrate(&pool, role_admin.as_ref()).await?;
            let (id, created) = match keyring().await?.init_token_key().await? {
                TokenKeyInit::Created(id) => (id, true),
                TokenKeyInit::AlreadyActive(id) => (id, false),
            };
            Said::new(
                if created {
                    format!("schema current; token key {id} created")
                } else {
                    format!("schema current; token key {id} already active, nothing to do")
                },
                json!({"schema": "current", "token_key": id.0, "created": created}),
            )
        }
        Task::Status {
            data_key_max_records,
        } => {
            db::check_schema(&pool).await?;
            let windows: Vec<(time::Date, WindowState)> =
                sqlx::query_as("SELECT starts, state FROM retention_windows ORDER BY starts")
                    .fetch_all(&pool)
                    .await?;
            let keys = lifecycle::status(&pool).await?;
            let owner = db::OwnerWatch::read(&pool).await?.describe();
            status::said(&keys, &windows, data_key_max_records, owner)
        }
        Task::ReplaceKeys(purpose, options) => {
            db::check_schema(&pool).await?;
            // What is done to each row, as the report says it.
            let done = match purpose {
                Purpose::Data => "re-encrypted",
                Purpose::Token => "re-tokenized",
            };
            let keyring = keyring().await?;
            let progress = Reporter::new();
            let report =
                lifecycle::replace_keys(purpose, &pool, &keyring, &options, &progress).await?;
            report_said(purpose, done, &report)
        }
        Task::Rewrap { new_kms_key_id } => {
            db::check_schema(&pool).await?;
            let progress = Reporter::new();
            let done =
                lifecycle::rewrap(&pool, &keyring().await?, &new_kms_key_id, &progress).await?;
            let first = if done.rewrapped == 0 {
                format!(
                    "every key outside retention windows is already wrapped under {new_kms_key_id}; nothing to do"
                )
            } else {
                format!("re-wrapped {} keys under {new_kms_key_id}", done.rewrapped)
            };
            Said::new(
                format!(
                    "{first}; {} data key(s) of retention windows stay under their window's own KMS key",
                    done.window_keys_left
                ),
                json!({
                    "kms_key_arn": done.kms_key_arn,
                    "rewrapped": done.rewrapped,
                    "window_keys_left": done.window_keys_left,
                }),
            )
        }
        Task::Erase {
            user_id,
            reason,
            actor,
            keep_tokens,
            in_flight,
            dry_run,
            witness,
        } => {
            db::check_schema(&pool).await?;
            let keyring = keyring().await?;
            let bucket = match &witness {
                Some(witness) => Some(witness.bucket().await?),
                None => None,
            };
            let erasure = lifecycle::Erasure {
                user_id: &user_id,
                reason: &reason,
                actor: &actor,
                keep_tokens,
                in_flight,
                dry_run,
            };
            let erased = lifecycle::erase(&pool, &keyring, &erasure, bucket.as_ref()).await?;
            Said::new(
                format!(
                    "{} user {user_id}: sealed values of {} login(s), tokens of {}{}, {} quarantined message(s){}",
                    if dry_run { "would erase" } else { "erased" },
                    erased.logins,
                    erased.tokens,
                    if keep_tokens {
                        " (kept: legal hold)"
                    } else {
                        ""
                    },
                    erased.quarantined,
                    match (dry_run, &witness) {
                        (true, _) => "; dry run: nothing changed".to_owned(),
                        (false, Some(w)) => format!(" (audited; witnessed in {})", w.bucket),
                        (false, None) => " (audited)".to_owned(),
                    }
                ),
                json!({
                    "user_id": user_id,
                    "dry_run": dry_run,
                    "logins": erased.logins,
                    "tokens": erased.tokens,
                    "tokens_kept": keep_tokens,
                    "quarantined": erased.quarantined,
                    "witness_bucket": witness.map(|w| w.bucket),
                }),
            )
        }
        Task::WitnessErasures(witness) => {
            db::check_schema(&pool).await?;
            let done =
                lifecycle::witness_erasures(&pool, &keyring().await?, &witness.bucket().await?)
                    .await?;
            Said::new(
                format!(
                    "witnessed {} erasure(s) in {}; {} already there{}",
                    done.written,
                    witness.bucket,
                    done.present,
                    if done.without_sealed_id > 0 {
                        format!(
                            "; {} made before migration 0014 cannot be witnessed (their records keep no sealed id)",
                            done.without_sealed_id
                        )
                    } else {
                        String::new()
                    }
                ),
                json!({
                    "witness_bucket": witness.bucket,
                    "written": done.written,
                    "present": done.present,
                    "without_sealed_id": done.without_sealed_id,
                }),
            )
        }
        Task::ReapplyErasures { actor, witness } => {
            db::check_schema(&pool).await?;
            let done = lifecycle::reapply_erasures(
                &pool,
                &keyring().await?,
                &witness.bucket().await?,
                &actor,
            )
            .await?;
            Said::new(
                format!(
                    "re-applied {} witnessed erasure(s) (audited); {} already in this database",
                    done.reapplied, done.present
                ),
                json!({"reapplied": done.reapplied, "present": done.present}),
            )
        }
        Task::Window { month, kms_key_id } => {
            db::check_schema(&pool).await?;
            let added = lifecycle::add_window(&pool, &keyring().await?, month, &kms_key_id).await?;
            let month = &month.to_string()[..7];
            Said::new(
                if added {
                    format!("retention window {month} registered under {kms_key_id}")
                } else {
                    format!(
                        "retention window {month} already registered under {kms_key_id}; nothing to do"
                    )
                },
                json!({"month": month, "kms_key_id": kms_key_id, "added": added}),
            )
        }
        Task::Expire(expiry) => {
            db::check_schema(&pool).await?;
            let progress = Reporter::new();
            let report = lifecycle::expire(&pool, &keyring().await?, &expiry, &progress).await?;
            expiry_said(&expiry, &report)
        }
        Task::Verify => {
            db::check_schema(&pool).await?;
            let progress = Reporter::new();
            let verified =
                unmask::verify_all_with_progress(&pool, &keyring().await?, &progress).await?;
            Said::new(
                format!(
                    "all {} logins and {} quarantined bodies open and match their tokens",
                    verified.logins, verified.bodies
                ),
                json!({"logins": verified.logins, "bodies": verified.bodies}),
            )
        }
    })
}

fn parse_month(text: &str) -> Result<time::Date, String> {
    let (year, month) = text
        .split_once('-')
        .ok_or_else(|| "a month is YYYY-MM".to_owned())?;
    let year: i32 = year.parse().map_err(|_| "a month is YYYY-MM".to_owned())?;
    let month: u8 = month.parse().map_err(|_| "a month is YYYY-MM".to_owned())?;
    let month = time::Month::try_from(month).map_err(|_| "no such month".to_owned())?;
    time::Date::from_calendar_date(year, month, 1).map_err(|e| e.to_string())
}

fn parse_days(text: &str) -> Result<u32, String> {
    text.strip_suffix('d')
        .and_then(|days| days.parse().ok())
        .filter(|days| *days > 0)
        .ok_or_else(|| "a number of days with a d suffix, e.g. 400d".to_owned())
}

fn expiry_said(expiry: &lifecycle::Expiry, windows: &[lifecycle::WindowExpiry]) -> Said {
    let mut text = String::new();
    if windows.is_empty() {
        text = format!(
            "no retention window ends on or before {}; nothing to expire",
            expiry.horizon
        );
    }
    for window in windows {
        let month = &window.starts.to_string()[..7];
        let what = format!(
            "window {month} (logins dated {} to {}): sealed values of {} login(s), {} quarantined message(s), data keys {:?}, KMS key {}",
            window.starts,
            window.ends - time::Duration::days(1),
            window.logins,
            window.quarantined,
            window.data_keys,
            window.kms_key_id
        );
        if window.applied {
            text += &format!(
                "expired {what}: values deleted, data keys destroyed, KMS key scheduled for deletion\n"
            );
        } else {
            text += &format!("would expire {what}\n");
        }
    }
    if !windows.is_empty() && !expiry.apply {
        text += "dry run: nothing changed; run again with --apply to expire";
    }
    let windows: Vec<serde_json::Value> = windows
        .iter()
        .map(|w| {
            json!({
                "month": &w.starts.to_string()[..7],
                "logins": w.logins,
                "quarantined": w.quarantined,
                "data_keys": w.data_keys,
                "kms_key_id": w.kms_key_id,
                "applied": w.applied,
            })
        })
        .collect();
    Said::new(
        text,
        json!({"horizon": expiry.horizon.to_string(), "apply": expiry.apply, "windows": windows}),
    )
}

fn report_said(purpose: Purpose, verb: &str, report: &Report) -> Said {
    let ids = |keys: &[pii_vault::vault::KeyId]| keys.iter().map(|k| k.0).collect::<Vec<_>>();
    let json = json!({
        "purpose": purpose.to_string(),
        "rotated": report.started_or_resumed,
        "rows": report.rows_rewritten,
        "work_seconds": report.seconds,
        "waited_seconds": report.waited_seconds,
        "rows_per_second": report.rows_per_second(),
        "new_keys": ids(&report.new_keys),
        "retired": ids(&report.retired),
        "destroyed": report.destroyed,
    });
    if !report.started_or_resumed {
        return Said::new(
            format!("no active {purpose} key to rotate; nothing to do"),
            json,
        );
    }
    let list = |keys: &[pii_vault::vault::KeyId]| match keys {
        [] => "none".to_owned(),
        keys => keys
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    Said::new(
        format!(
            "{verb} {} rows in {:.2}s of work ({:.0} rows/s; grace wait {:.2}s not counted) under {purpose} key(s) {}; retired {purpose} keys: {}; destroyed: {}",
            report.rows_rewritten,
            report.seconds,
            report.rows_per_second(),
            report.waited_seconds,
            list(&report.new_keys),
            list(&report.retired),
            report.destroyed
        ),
        json,
    )
}
