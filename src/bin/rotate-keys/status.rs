//! `rotate-keys status`: every key, the data key limit, retention windows and the owner's watch,
//! as a table for people or one JSON object for scripts.

use pii_vault::cli::Said;
use pii_vault::db;
use pii_vault::lifecycle::{self, KeyStatus};
use pii_vault::vault::Purpose;
use pii_vault::vault::key_table::KeyState;
use pii_vault::vault::retention::WindowState;
use serde_json::json;
use sqlx::PgPool;

pub async fn run(pool: &PgPool, data_key_max_records: u64) -> anyhow::Result<Said> {
    let windows: Vec<(time::Date, WindowState)> =
        sqlx::query_as("SELECT starts, state FROM retention_windows ORDER BY starts")
            .fetch_all(pool)
            .await?;
    let keys = lifecycle::status(pool).await?;
    let owner = db::OwnerWatch::read(pool).await?.describe();
    Ok(said(&keys, &windows, data_key_max_records, owner))
}

fn said(
    keys: &[KeyStatus],
    windows: &[(time::Date, WindowState)],
    data_key_max_records: u64,
    owner: String,
) -> Said {
    let over: Vec<i64> = keys
        .iter()
        .filter(|k| k.purpose == Purpose::Data && k.values as u64 > data_key_max_records)
        .map(|k| k.id)
        .collect();
    let pending: i64 = keys
        .iter()
        .filter(|k| k.state == KeyState::Retiring)
        .map(|k| k.rows)
        .sum();
    let month = |starts: &time::Date| starts.to_string()[..7].to_owned();
    let json = json!({
        "keys": keys.iter().map(|key| json!({
            "id": key.id,
            "purpose": key.purpose.as_str(),
            "state": key.state.as_str(),
            "kms_key_id": key.kms_key_id,
            "age_days": key.age_days,
            "rows": key.rows,
            "values": key.values,
            "first_login": key.first_login.map(|d| d.to_string()),
            "last_login": key.last_login.map(|d| d.to_string()),
        })).collect::<Vec<_>>(),
        "data_key_max_records": data_key_max_records,
        "data_keys_over_limit": over,
        "windows": windows.iter().map(|(starts, state)| json!({
            "month": month(starts),
            "state": state.as_str(),
        })).collect::<Vec<_>>(),
        "rows_under_retiring_keys": pending,
        "owner": owner,
    });
    Said::new(
        table(keys, windows, data_key_max_records, &over, pending, &owner),
        json,
    )
}

fn table(
    keys: &[KeyStatus],
    windows: &[(time::Date, WindowState)],
    data_key_max_records: u64,
    over: &[i64],
    pending: i64,
    owner: &str,
) -> String {
    let mut lines = vec![format!(
        "{:>5}  {:<7} {:<10} {:>8} {:>10} {:>10}  {:<23}  kms key",
        "id", "purpose", "state", "age (d)", "rows", "values", "logins from .. to"
    )];
    for key in keys {
        let window = match (key.first_login, key.last_login) {
            (Some(first), Some(last)) => format!("{first} .. {last}"),
            _ => "-".to_owned(),
        };
        lines.push(format!(
            "{:>5}  {:<7} {:<10} {:>8.1} {:>10} {:>10}  {:<23}  {}",
            key.id,
            key.purpose,
            key.state,
            key.age_days,
            key.rows,
            key.values,
            window,
            key.kms_key_id
        ));
    }
    lines.push(format!(
        "data key limit: {data_key_max_records} values a key{}",
        if over.is_empty() {
            String::new()
        } else {
            let over: Vec<String> = over.iter().map(ToString::to_string).collect();
            format!(
                " (over it: keys {}; `rotate-keys data-key` re-seals them)",
                over.join(", ")
            )
        }
    ));
    lines.push(format!(
        "retention: nothing expires unless an operator runs `rotate-keys expire`; windows: {}",
        if windows.is_empty() {
            "none registered (values are deletable, not shreddable)".to_owned()
        } else {
            windows
                .iter()
                .map(|(starts, state)| format!("{} {state}", &starts.to_string()[..7]))
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    if pending > 0 {
        lines.push(format!(
            "{pending} rows are still under retiring keys: rerun the rotation to finish it"
        ));
    }
    lines.push(owner.to_owned());
    lines.join("\n")
}
