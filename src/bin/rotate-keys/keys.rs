//! `init`, `data-key`, `token-key`, `rewrap` and `verify`: the keys made, replaced, re-wrapped
//! and checked.

use pii_vault::cli::Said;
use pii_vault::db;
use pii_vault::lifecycle::{self, Options, Report};
use pii_vault::unmask;
use pii_vault::vault::keyring::TokenKeyInit;
use pii_vault::vault::{KeyId, Purpose};
use serde_json::json;

use crate::Admin;
use crate::progress::Reporter;

/// Migrates the schema (with the role admin's login, if given) and makes the first token key.
pub async fn init(admin: &Admin, role_admin_url: Option<&str>) -> anyhow::Result<Said> {
    let role_admin = match role_admin_url {
        Some(url) => Some(db::connect(url, 1).await?),
        None => None,
    };
    db::migrate(&admin.pool, role_admin.as_ref()).await?;
    let (id, created) = match admin.keyring().await?.init_token_key().await? {
        TokenKeyInit::Created(id) => (id, true),
        TokenKeyInit::AlreadyActive(id) => (id, false),
    };
    Ok(Said::new(
        if created {
            format!("schema current; token key {id} created")
        } else {
            format!("schema current; token key {id} already active, nothing to do")
        },
        json!({"schema": "current", "token_key": id.0, "created": created}),
    ))
}

/// `data-key` or `token-key`.
pub async fn replace(admin: &Admin, purpose: Purpose, options: &Options) -> anyhow::Result<Said> {
    // What is done to each row, as the report says it.
    let done = match purpose {
        Purpose::Data => "re-encrypted",
        Purpose::Token => "re-tokenized",
    };
    let keyring = admin.keyring().await?;
    let progress = Reporter::new();
    let report =
        lifecycle::replace_keys(purpose, &admin.pool, &keyring, options, &progress).await?;
    Ok(report_said(purpose, done, &report))
}

pub async fn rewrap(admin: &Admin, new_kms_key_id: &str) -> anyhow::Result<Said> {
    let progress = Reporter::new();
    let keyring = admin.keyring().await?;
    let done = lifecycle::rewrap(&admin.pool, &keyring, new_kms_key_id, &progress).await?;
    let first = if done.rewrapped == 0 {
        format!(
            "every key outside retention windows is already wrapped under {new_kms_key_id}; nothing to do"
        )
    } else {
        format!("re-wrapped {} keys under {new_kms_key_id}", done.rewrapped)
    };
    Ok(Said::new(
        format!(
            "{first}; {} data key(s) of retention windows stay under their window's own KMS key",
            done.window_keys_left
        ),
        json!({
            "kms_key_arn": done.kms_key_arn,
            "rewrapped": done.rewrapped,
            "window_keys_left": done.window_keys_left,
        }),
    ))
}

pub async fn verify(admin: &Admin) -> anyhow::Result<Said> {
    let progress = Reporter::new();
    let keyring = admin.keyring().await?;
    let verified = unmask::verify_all_with_progress(&admin.pool, &keyring, &progress).await?;
    Ok(Said::new(
        format!(
            "all {} logins and {} quarantined bodies open and match their tokens",
            verified.logins, verified.bodies
        ),
        json!({"logins": verified.logins, "bodies": verified.bodies}),
    ))
}

fn report_said(purpose: Purpose, verb: &str, report: &Report) -> Said {
    let ids = |keys: &[KeyId]| keys.iter().map(|k| k.0).collect::<Vec<_>>();
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
    let list = |keys: &[KeyId]| match keys {
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
