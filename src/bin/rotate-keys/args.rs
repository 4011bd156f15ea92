//! `rotate-keys`' arguments, and the run they ask for, checked ([`Config`], [`Task`]): a bad
//! one is a one-line error (exit code 2) before anything is connected to.

use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

use pii_vault::cli::{OutputArgs, OutputFormat, UsageError, VaultArgs, Witness, WitnessArgs};
use pii_vault::lifecycle::{Expiry, Options};
use pii_vault::vault::Purpose;

/// Create, rotate, re-wrap and retire pii-vault's keys, online.
#[derive(Debug, Parser)]
#[command(name = "rotate-keys", version = pii_vault::VERSION_LINE)]
pub struct Args {
    #[command(flatten)]
    pub vault: VaultArgs,
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
    /// Add the month partitions logins are stored in: this month's and the next N. A login of
    /// a month without them stays on the queue; run this on a schedule (e.g. daily).
    Partitions {
        /// Months after this one to add.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=24))]
        ahead: u32,
    },
    /// Expire the retention windows that end before the horizon: drop their months' logins
    /// (tokens and sealed values with them) and delete their quarantined bodies, destroy their
    /// data keys and schedule their KMS keys for deletion, so backups cannot open them either.
    /// A dry run unless --apply; resumable.
    Expire {
        /// The horizon, in days (e.g. 400d): windows ending on or before today minus this.
        #[arg(long, value_parser = parse_days)]
        older_than: u32,
        /// Do it (without it, the plan is printed and nothing changes).
        #[arg(long)]
        apply: bool,
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
pub struct Config {
    pub database_url: String,
    pub kms_key_id: String,
    pub format: OutputFormat,
    pub task: Task,
}

/// A [`Command`], checked.
pub enum Task {
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
    Erase(Erase),
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
    Partitions {
        ahead: u32,
    },
    Expire(Expiry),
}

/// `erase`, checked.
pub struct Erase {
    pub user_id: String,
    pub reason: String,
    pub actor: String,
    pub keep_tokens: bool,
    pub in_flight: bool,
    pub dry_run: bool,
    /// None only for a dry run.
    pub witness: Option<Witness>,
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
                Task::Erase(Erase {
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
                })
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
            Command::Partitions { ahead } => Task::Partitions { ahead },
            Command::Expire {
                older_than,
                apply,
                grace_seconds,
            } => {
                let today = time::OffsetDateTime::now_utc().date();
                Task::Expire(Expiry {
                    horizon: today - time::Duration::days(i64::from(older_than)),
                    apply,
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
