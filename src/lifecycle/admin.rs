//! Key administration: key states (retiring, retired, destroyed), re-wrapping the keys outside
//! retention windows under another KMS key, what a window's KMS key may be, and the keys'
//! status.

use sqlx::PgPool;
use time::Date;

use super::LifecycleError;
use crate::progress::{Progress, Unit};
use crate::vault::KeyId;
use crate::vault::key_use;
use crate::vault::keyring::{Keyring, KeyringError};
use crate::vault::kms::KeyWrapper;

/// The keys of `purpose` an unfinished rotation left `retiring`.
pub(super) async fn retiring_keys(pool: &PgPool, purpose: &str) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM vault_keys WHERE purpose = $1 AND state = 'retiring' ORDER BY id",
    )
    .bind(purpose)
    .fetch_all(pool)
    .await
}

pub(super) const UNUSED_DATA_KEY: &str =
    "SELECT NOT EXISTS (SELECT 1 FROM login_vault WHERE data_key_id = $1)
    AND NOT EXISTS (SELECT 1 FROM quarantine WHERE data_key_id = $1)";
/// Erasure records with a sealed id are carried to the new key before this is asked; those made
/// before migration 0014 cannot be, and keep their key from being destroyed instead.
pub(super) const UNUSED_TOKEN_KEY: &str =
    "SELECT NOT EXISTS (SELECT 1 FROM user_logins WHERE token_key_id = $1)
    AND NOT EXISTS (SELECT 1 FROM quarantine WHERE token_key_id = $1)
    AND NOT EXISTS (SELECT 1 FROM erasures WHERE token_key_id = $1 AND sealed_user_id IS NOT NULL)";

/// Retires the retiring keys if none protects a row any more; `None` if some still do (rows an
/// ingester wrote after the last pass), which calls for another pass.
pub(super) async fn retire_unused(
    pool: &PgPool,
    retiring: &[i64],
    unused_sql: &str,
) -> Result<Option<Vec<KeyId>>, LifecycleError> {
    let mut tx = pool.begin().await?;
    // Waits for the writers still using these keys, and holds off new ones until the keys
    // are retired (see `vault::key_use`).
    sqlx::query(key_use::HOLD_KEYS_EXCLUSIVE)
        .bind(retiring)
        .execute(&mut *tx)
        .await?;
    for id in retiring {
        let unused: bool = sqlx::query_scalar(unused_sql)
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        if !unused {
            return Ok(None);
        }
    }
    sqlx::query("UPDATE vault_keys SET state = 'retired', retired_at = now() WHERE id = ANY($1)")
        .bind(retiring)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(retiring.iter().copied().map(KeyId).collect()))
}

pub(super) async fn destroy_retired(
    pool: &PgPool,
    purpose: &str,
    destroy: bool,
) -> Result<u64, LifecycleError> {
    if !destroy {
        return Ok(0);
    }
    // A retired key that something still names (an erasure record from before migration
    // 0014) is kept: the database refuses to destroy it anyway.
    let destroyed = sqlx::query(
        "UPDATE vault_keys SET state = 'destroyed', wrapped_key = NULL
         WHERE purpose = $1 AND state = 'retired' AND NOT vault_key_named(id)",
    )
    .bind(purpose)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(destroyed)
}

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
    let keys: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, kms_key_id FROM vault_keys
         WHERE state <> 'destroyed' AND window_starts IS NULL ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
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
    let window_keys_left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM vault_keys WHERE state <> 'destroyed' AND window_starts IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok(Rewrapped {
        kms_key_arn,
        rewrapped,
        window_keys_left: window_keys_left as u64,
    })
}

/// The month of the retention window whose KMS key is `kms_key_arn` (windows registered before
/// their key was recorded as an ARN may name it by key id).
async fn window_of_kms_key(pool: &PgPool, kms_key_arn: &str) -> Result<Option<Date>, sqlx::Error> {
    let windows: Vec<(Date, String)> =
        sqlx::query_as("SELECT starts, kms_key_id FROM retention_windows ORDER BY starts")
            .fetch_all(pool)
            .await?;
    Ok(windows
        .into_iter()
        .find(|(_, key)| key == kms_key_arn || kms_key_arn.ends_with(&format!(":key/{key}")))
        .map(|(starts, _)| starts))
}

/// Checks that `kms_key_id` can be the KMS key of the retention window of `month`, and answers
/// its ARN. Expiring a window schedules the deletion of its KMS key, so that key must wrap
/// nothing outside the window: not the key new keys are wrapped under (`KMS_KEY_ID`), nor a
/// stored key of another window or of none (the token key, other data keys).
pub(super) async fn check_window_key<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    month: Date,
    kms_key_id: &str,
) -> Result<String, LifecycleError> {
    let wrapper = keyring.wrapper();
    let arn = wrapper
        .check_key(kms_key_id)
        .await
        .map_err(KeyringError::WrappingKey)?;
    let refused = |why| LifecycleError::WindowKeyRefused {
        kms_key: kms_key_id.to_owned(),
        month,
        why,
    };
    let default = wrapper.check_key(keyring.kms_key_id()).await;
    if default.is_ok_and(|default| default == arn) {
        return Err(refused(
            "it is the KMS key new keys are wrapped under (KMS_KEY_ID)",
        ));
    }
    let wraps_others: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM vault_keys
                        WHERE kms_key_id = $1 AND window_starts IS DISTINCT FROM $2)",
    )
    .bind(&arn)
    .bind(month)
    .fetch_one(pool)
    .await?;
    if wraps_others {
        return Err(refused("it wraps keys outside that window"));
    }
    match window_of_kms_key(pool, &arn).await? {
        Some(other) if other != month => Err(refused("it is another window's key")),
        _ => Ok(arn),
    }
}

/// One key as `status` shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyStatus {
    pub id: i64,
    pub purpose: String,
    pub state: String,
    pub kms_key_id: String,
    pub age_days: f64,
    /// Rows this key protects (logins and quarantined messages for a data key, tokenized
    /// logins for a token key).
    pub rows: i64,
    /// Values sealed under a data key (two a login, one a quarantined body); tokens for a
    /// token key (two a login).
    pub values: i64,
    /// The login dates a data key's values come from: its time window.
    pub first_login: Option<time::Date>,
    pub last_login: Option<time::Date>,
}

pub async fn status(pool: &PgPool) -> Result<Vec<KeyStatus>, LifecycleError> {
    Ok(sqlx::query_as(
        "WITH data_use AS (
             SELECT v.data_key_id AS key, count(*) AS logins, min(l.create_date) AS first_login,
                    max(l.create_date) AS last_login
             FROM login_vault v JOIN user_logins l ON l.id = v.login_id GROUP BY 1),
         quarantine_use AS (
             SELECT data_key_id AS key, count(*) AS bodies FROM quarantine GROUP BY 1),
         token_use AS (
             SELECT token_key_id AS key, count(*) AS logins FROM user_logins GROUP BY 1)
         SELECT k.id, k.purpose, k.state, k.kms_key_id,
                extract(epoch FROM now() - k.created_at)::float8 / 86400 AS age_days,
                CASE k.purpose
                  WHEN 'data' THEN coalesce(d.logins, 0) + coalesce(q.bodies, 0)
                  ELSE coalesce(t.logins, 0) END AS rows,
                CASE k.purpose
                  WHEN 'data' THEN 2 * coalesce(d.logins, 0) + coalesce(q.bodies, 0)
                  ELSE 2 * coalesce(t.logins, 0) END AS values,
                d.first_login, d.last_login
         FROM vault_keys k
         LEFT JOIN data_use d ON d.key = k.id AND k.purpose = 'data'
         LEFT JOIN quarantine_use q ON q.key = k.id AND k.purpose = 'data'
         LEFT JOIN token_use t ON t.key = k.id AND k.purpose = 'token'
         ORDER BY k.id",
    )
    .fetch_all(pool)
    .await?)
}
