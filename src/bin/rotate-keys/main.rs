//! `rotate-keys`: schema and key administration. Every command is idempotent and safe to run
//! from a scheduler: an interrupted run is finished by the next one.
//!
//! Its parts: `args` (the command line, checked into a [`Config`]); a file per group of
//! commands, each running its commands and saying what they did: `keys` (init, data-key,
//! token-key, rewrap, verify), `erasure` (erase, witness-erasures, reapply-erasures),
//! `retention` (window, expire) and `status`.

mod args;
mod erasure;
mod keys;
#[path = "../common/progress.rs"]
mod progress;
mod retention;
mod status;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use sqlx::PgPool;

use pii_vault::cli::{self, Said};
use pii_vault::db;
use pii_vault::vault::keyring::Keyring;
use pii_vault::vault::kms::AwsKms;

use args::{Args, Config, Task};

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

/// What the key admin's commands run against: the database, and a keyring on it.
pub struct Admin {
    pub pool: PgPool,
    kms_key_id: String,
}

impl Admin {
    /// The keyring, on AWS KMS (made when a command first needs it: it reads the AWS
    /// configuration).
    pub async fn keyring(&self) -> anyhow::Result<Keyring<AwsKms>> {
        let kms = Arc::new(AwsKms::from_conf(&cli::aws_config().await?));
        Ok(Keyring::new(
            self.pool.clone(),
            kms,
            &self.kms_key_id,
            &cli::process_name("rotate-keys"),
        ))
    }
}

/// Runs the task and says what it did.
async fn execute(config: Config) -> anyhow::Result<Said> {
    let admin = Admin {
        pool: db::connect(&config.database_url, 4).await?,
        kms_key_id: config.kms_key_id,
    };
    // Only `init` may find the schema behind: it brings it up to date.
    if !matches!(config.task, Task::Init { .. }) {
        db::check_schema(&admin.pool).await?;
    }
    Ok(match config.task {
        Task::Init { role_admin_url } => keys::init(&admin, role_admin_url.as_deref()).await?,
        Task::Status {
            data_key_max_records,
        } => status::run(&admin.pool, data_key_max_records).await?,
        Task::ReplaceKeys(purpose, options) => keys::replace(&admin, purpose, &options).await?,
        Task::Rewrap { new_kms_key_id } => keys::rewrap(&admin, &new_kms_key_id).await?,
        Task::Verify => keys::verify(&admin).await?,
        Task::Erase(erase) => erasure::erase(&admin, erase).await?,
        Task::WitnessErasures(witness) => erasure::witness(&admin, witness).await?,
        Task::ReapplyErasures { actor, witness } => {
            erasure::reapply(&admin, &actor, witness).await?
        }
        Task::Window { month, kms_key_id } => {
            retention::add_window(&admin, month, &kms_key_id).await?
        }
        Task::Partitions { ahead } => retention::add_months(&admin, ahead).await?,
        Task::Expire(expiry) => retention::expire(&admin, &expiry).await?,
    })
}
