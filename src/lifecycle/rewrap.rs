//! Re-wrapping the keys outside retention windows under another KMS key (KMS ReEncrypt), so
//! that the old KMS key can be disabled.

use sqlx::PgPool;

use super::LifecycleError;
use super::retention::window_of_kms_key;
use crate::progress::{Progress, Unit};
use crate::vault::KeyId;
use crate::vault::key_table;
use crate::vault::keyring::{Keyring, KeyringError};
use crate::vault::kms::KeyWrapper;

/// What [`rewrap`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrapped {
    /// The target KMS key's ARN.
    pub kms_key_arn: String,
    /// Keys re-wrapped under it by this run.
    pub rewrapped: u64,
    /// Data keys of retention windows, left under their window's own KMS key.
    pub window_keys_left: u64,
}

/// Re-wraps every stored key (not destroyed) outside retention windows under `new_kms_key_id`
/// with KMS ReEncrypt, one key per statement, so an interrupted run resumes.
///
/// A window's data keys stay under the window's own KMS key: expiring the window schedules
/// that key's deletion, which shreds them in every copy; a copy under another key would
/// survive it. For the same reason no other key goes under a window's KMS key: given one (by
/// id, ARN or alias), nothing is re-wrapped. The window key policy refuses both at KMS too
/// (keys/README.md, K14).
///
/// `progress` counts the keys to re-wrap (one KMS call each).
pub async fn rewrap<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    new_kms_key_id: &str,
    progress: &dyn Progress,
) -> Result<Rewrapped, LifecycleError> {
    let kms_key_arn = keyring
        .wrapper()
        .check_key(new_kms_key_id)
        .await
        .map_err(KeyringError::WrappingKey)?;
    if let Some(month) = window_of_kms_key(pool, &kms_key_arn).await? {
        return Err(LifecycleError::WindowKeyTaken {
            kms_key: new_kms_key_id.to_owned(),
            month,
            why: "only that window's data keys go under it",
        });
    }
    let keys = key_table::rewrappable(pool).await?;
    let to_rewrap: Vec<i64> = keys
        .into_iter()
        .filter(|(_, current)| *current != kms_key_arn)
        .map(|(id, _)| id)
        .collect();
    progress.start(
        "re-wrapping",
        Unit::Count("keys"),
        Some(to_rewrap.len() as u64),
    );
    let mut rewrapped = 0;
    for id in to_rewrap {
        let now_under = keyring.rewrap(KeyId(id), &kms_key_arn).await;
        let now_under = now_under.inspect_err(|_| progress.finish())?;
        rewrapped += 1;
        progress.advance(rewrapped);
        tracing::info!(key_id = id, kms_key = %now_under, "re-wrapped");
    }
    progress.finish();
    let window_keys_left = key_table::live_window_keys(pool).await?;
    Ok(Rewrapped {
        kms_key_arn,
        rewrapped,
        window_keys_left: window_keys_left as u64,
    })
}
