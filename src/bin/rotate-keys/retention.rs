//! `window`, `partitions` and `expire`: retention windows registered, the months logins are
//! stored in added, and windows expired.

use pii_vault::cli::Said;
use pii_vault::lifecycle::{self, Expiry, WindowExpiry};
use serde_json::json;

use crate::Admin;
use crate::progress::Reporter;

pub async fn add_window(
    admin: &Admin,
    month: time::Date,
    kms_key_id: &str,
) -> anyhow::Result<Said> {
    let keyring = admin.keyring().await?;
    let added = lifecycle::add_window(&admin.pool, &keyring, month, kms_key_id).await?;
    let month = &month.to_string()[..7];
    Ok(Said::new(
        if added {
            format!("retention window {month} registered under {kms_key_id}")
        } else {
            format!("retention window {month} already registered under {kms_key_id}; nothing to do")
        },
        json!({"month": month, "kms_key_id": kms_key_id, "added": added}),
    ))
}

pub async fn add_months(admin: &Admin, ahead: u32) -> anyhow::Result<Said> {
    let today = time::OffsetDateTime::now_utc().date();
    let months = lifecycle::add_months_ahead(&admin.pool, today, ahead).await?;
    let name = |month: &time::Date| month.to_string()[..7].to_owned();
    let added: Vec<String> = months
        .iter()
        .filter(|(_, added)| *added)
        .map(|(month, _)| name(month))
        .collect();
    let (first, last) = (name(&months[0].0), name(&months[months.len() - 1].0));
    Ok(Said::new(
        if added.is_empty() {
            format!("months {first} to {last} have their partitions; nothing to do")
        } else {
            format!(
                "months {first} to {last} have their partitions; added {}",
                added.join(", ")
            )
        },
        json!({"first": first, "last": last, "added": added}),
    ))
}

pub async fn expire(admin: &Admin, expiry: &Expiry) -> anyhow::Result<Said> {
    let progress = Reporter::new();
    let keyring = admin.keyring().await?;
    let report = lifecycle::expire(&admin.pool, &keyring, expiry, &progress).await?;
    Ok(expiry_said(expiry, &report))
}

fn expiry_said(expiry: &Expiry, windows: &[WindowExpiry]) -> Said {
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
            "window {month} (logins dated {} to {}): {} login(s) with their tokens and sealed values, {} quarantined message(s), data keys {:?}, KMS key {}",
            window.starts,
            window.ends - time::Duration::days(1),
            window.logins,
            window.quarantined,
            window.data_keys,
            window.kms_key_id
        );
        if window.applied {
            text += &format!(
                "expired {what}: the month's logins dropped, data keys destroyed, KMS key scheduled for deletion\n"
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
