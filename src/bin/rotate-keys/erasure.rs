//! `erase`, `witness-erasures` and `reapply-erasures`: users erased, their erasures witnessed
//! outside the database, and applied again to a restored one.

use pii_vault::cli::{Said, Witness};
use pii_vault::lifecycle::{self, Erasure};
use serde_json::json;

use crate::Admin;
use crate::args::Erase;

pub async fn erase(admin: &Admin, erase: Erase) -> anyhow::Result<Said> {
    let (user_id, keep_tokens, dry_run) = (&erase.user_id, erase.keep_tokens, erase.dry_run);
    let witness = erase.witness;
    let keyring = admin.keyring().await?;
    let bucket = match &witness {
        Some(witness) => Some(witness.bucket().await?),
        None => None,
    };
    let erasure = Erasure {
        user_id,
        reason: &erase.reason,
        actor: &erase.actor,
        keep_tokens,
        in_flight: erase.in_flight,
        dry_run,
    };
    let erased = lifecycle::erase(&admin.pool, &keyring, &erasure, bucket.as_ref()).await?;
    Ok(Said::new(
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
    ))
}

pub async fn witness(admin: &Admin, witness: Witness) -> anyhow::Result<Said> {
    let keyring = admin.keyring().await?;
    let bucket = witness.bucket().await?;
    let done = lifecycle::witness_erasures(&admin.pool, &keyring, &bucket).await?;
    Ok(Said::new(
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
    ))
}

pub async fn reapply(admin: &Admin, actor: &str, witness: Witness) -> anyhow::Result<Said> {
    let keyring = admin.keyring().await?;
    let bucket = witness.bucket().await?;
    let done = lifecycle::reapply_erasures(&admin.pool, &keyring, &bucket, actor).await?;
    Ok(Said::new(
        format!(
            "re-applied {} witnessed erasure(s) (audited); {} already in this database",
            done.reapplied, done.present
        ),
        json!({"reapplied": done.reapplied, "present": done.present}),
    ))
}
