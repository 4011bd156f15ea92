//! `rotate-keys`: schema and key administration.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use pii_vault::cli::{self, DatabaseArgs, KmsArgs};
use pii_vault::db;
use pii_vault::vault::keyring::{Keyring, TokenKeyInit};
use pii_vault::vault::kms::AwsKms;

/// Create, rotate and retire pii-vault's keys.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    kms: KmsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the database migrations and create the first token key. Safe to run again: an
    /// existing token key is never replaced.
    Init,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    cli::init_logging();
    cli::exit_code(run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let pool = db::connect(&args.database.database_url, 2).await?;
    match args.command {
        Command::Init => {
            db::migrate(&pool).await?;
            let kms = Arc::new(AwsKms::from_conf(&cli::aws_config().await));
            let keyring = Keyring::new(
                pool,
                kms,
                &args.kms.kms_key_id,
                &cli::process_name("rotate-keys"),
            );
            match keyring.init_token_key().await? {
                TokenKeyInit::Created(id) => println!("schema current; token key {id} created"),
                TokenKeyInit::AlreadyActive(id) => {
                    println!("schema current; token key {id} already active, nothing to do")
                }
            }
        }
    }
    Ok(())
}
