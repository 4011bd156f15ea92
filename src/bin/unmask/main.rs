//! `unmask`: a compliance officer recovers original ip and device_id values; every reveal is
//! audited before anything is printed.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use pii_vault::cli::{self, DatabaseArgs, KmsArgs, LoggingArgs, UsageError};
use pii_vault::unmask::{self, Question, Request, Revealed, UnmaskError};
use pii_vault::vault::keyring::Keyring;
use pii_vault::vault::kms::AwsKms;
use pii_vault::{audit, db};

/// Recover a user's original ip and device_id values (audited).
///
/// Exit codes: 0 values found, 1 nothing found (the attempt is still audited) or another
/// failure, 2 bad arguments, 3 not authorized, 4 integrity failure (nothing is printed).
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(flatten)]
    logging: LoggingArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    kms: KmsArgs,
    #[command(subcommand)]
    command: Option<Command>,
    /// Every login of this user.
    #[arg(long, group = "question", required = true)]
    user_id: Option<String>,
    /// Every login whose ip has this token (masked_ip).
    #[arg(long, group = "question", required = true)]
    masked_ip: Option<String>,
    /// Every login whose device id has this token (masked_device_id).
    #[arg(long, group = "question", required = true)]
    masked_device_id: Option<String>,
    /// Why: recorded in the audit (a ticket, a legal request).
    #[arg(long)]
    reason: Option<String>,
    /// Who is asking, for the audit [default: the OS user].
    #[arg(long)]
    actor: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Walk the audit's hash chain; exit 1 naming the first row that was edited, deleted or
    /// inserted out of order.
    VerifyAudit,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    cli::init_logging(&args.logging);
    let result = run(args).await;
    if let Err(error) = &result {
        if let Some(unmask_error) = error.downcast_ref::<UnmaskError>() {
            eprintln!("error: {}", cli::one_line(error));
            return ExitCode::from(unmask_error.exit_code());
        }
    }
    match result {
        Ok(code) => code,
        Err(error) => cli::exit_code(Err(error)),
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(Command::VerifyAudit) = args.command {
        let pool = db::connect(&args.database.database_url, 1).await?;
        let intact = audit::verify(&pool).await?;
        let head: String = intact.head.iter().map(|b| format!("{b:02x}")).collect();
        println!("audit intact: {} rows, head {head}", intact.rows);
        return Ok(ExitCode::SUCCESS);
    }
    let question = match (args.user_id, args.masked_ip, args.masked_device_id) {
        (Some(user), None, None) => Question::UserId(user),
        (None, Some(token), None) => Question::MaskedIp(token),
        (None, None, Some(token)) => Question::MaskedDeviceId(token),
        _ => unreachable!("clap requires exactly one question"),
    };
    let reason = args.reason.unwrap_or_default();
    if reason.trim().is_empty() {
        return Err(UsageError("--reason is required and must say why".into()).into());
    }
    let actor = match args.actor {
        Some(actor) if !actor.trim().is_empty() => actor,
        Some(_) => return Err(UsageError("--actor must not be empty".into()).into()),
        None => std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".to_owned()),
    };

    let pool = db::connect(&args.database.database_url, 2).await?;
    let kms = Arc::new(AwsKms::from_conf(&cli::aws_config().await));
    let keyring = Keyring::new(pool.clone(), kms.clone(), &args.kms.kms_key_id, &actor);
    let request = Request {
        question,
        reason,
        actor,
    };
    let revealed = unmask::unmask(&pool, &keyring, &request).await?;
    tracing::debug!(kms_calls = kms.calls(), logins = revealed.len(), "unmasked");
    if revealed.is_empty() {
        eprintln!(
            "nothing found for {} (the attempt was audited)",
            request.question
        );
        return Ok(ExitCode::FAILURE);
    }
    if revealed
        .iter()
        .all(|r| r.ip.is_none() && r.device_id.is_none())
    {
        eprintln!(
            "the values of {} were erased: {} login(s), nothing to reveal (the attempt was audited)",
            request.question,
            revealed.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Table => print_table(&mut out, &revealed)?,
        Format::Json => print_json(&mut out, &revealed)?,
        Format::Csv => print_csv(&mut out, &revealed)?,
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

const ERASED: &str = "(erased)";

fn columns(r: &Revealed) -> [String; 8] {
    let value = |v: &Option<zeroize::Zeroizing<String>>| {
        v.as_deref()
            .map(String::as_str)
            .unwrap_or(ERASED)
            .to_owned()
    };
    [
        r.create_date.to_string(),
        r.user_id.clone(),
        r.device_type.clone(),
        value(&r.ip),
        value(&r.device_id),
        r.masked_ip.clone().unwrap_or_default(),
        r.masked_device_id.clone().unwrap_or_default(),
        r.message_id.clone(),
    ]
}

const HEADERS: [&str; 8] = [
    "create_date",
    "user_id",
    "device_type",
    "ip",
    "device_id",
    "masked_ip",
    "masked_device_id",
    "message_id",
];

fn print_table(out: &mut impl Write, revealed: &[Revealed]) -> std::io::Result<()> {
    // Tokens are shortened on a terminal; json and csv carry them whole.
    let rows: Vec<[String; 8]> = revealed
        .iter()
        .map(|r| {
            let mut row = columns(r);
            for token in &mut row[5..7] {
                if token.len() > 16 {
                    token.truncate(16);
                    token.push('…');
                }
            }
            row
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| -> String {
        cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(&HEADERS))?;
    for row in &rows {
        writeln!(out, "{}", line(&row.each_ref().map(String::as_str)))?;
    }
    Ok(())
}

fn print_json(out: &mut impl Write, revealed: &[Revealed]) -> std::io::Result<()> {
    for r in revealed {
        let line = serde_json::json!({
            "login_id": r.login_id,
            "message_id": r.message_id,
            "user_id": r.user_id,
            "create_date": r.create_date.to_string(),
            "device_type": r.device_type,
            "ip": r.ip.as_deref().map(String::as_str),
            "device_id": r.device_id.as_deref().map(String::as_str),
            "masked_ip": r.masked_ip,
            "masked_device_id": r.masked_device_id,
        });
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn print_csv(out: &mut impl Write, revealed: &[Revealed]) -> std::io::Result<()> {
    let quote = |cell: &str| {
        if cell.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", cell.replace('"', "\"\""))
        } else {
            cell.to_owned()
        }
    };
    writeln!(out, "{}", HEADERS.join(","))?;
    for r in revealed {
        let row = columns(r);
        let cells: Vec<String> = row.iter().map(|c| quote(c)).collect();
        writeln!(out, "{}", cells.join(","))?;
    }
    Ok(())
}
