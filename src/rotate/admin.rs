//! Key administration: key states (retiring, retired, destroyed), re-wrapping every key under
//! another KMS key, and the keys' status.

use sqlx::PgPool;

use super::RotateError;
use crate::vault::KeyId;
use crate::vault::key_use;
use crate::vault::keyring::Keyring;
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
pub(super) const UNUSED_TOKEN_KEY: &str =
    "SELECT NOT EXISTS (SELECT 1 FROM user_logins WHERE token_key_id = $1)";

/// Retires the retiring keys if none protects a row any more; `None` if some still do (rows an
/// ingester wrote after the last pass), which calls for another pass.
pub(super) async fn retire_unused(
    pool: &PgPool,
    retiring: &[i64],
    unused_sql: &str,
) -> Result<Option<Vec<KeyId>>, RotateError> {
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
) -> Result<u64, RotateError> {
    if !destroy {
        return Ok(0);
    }
    let destroyed = sqlx::query(
        "UPDATE vault_keys SET state = 'destroyed', wrapped_key = NULL
         WHERE purpose = $1 AND state = 'retired'",
    )
    .bind(purpose)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(destroyed)
}

/// Re-wraps every stored key (not destroyed) under `new_kms_key_id` with KMS ReEncrypt, one key
/// per statement, so an interrupted run resumes. Returns how many keys were re-wrapped.
pub async fn rewrap<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    new_kms_key_id: &str,
) -> Result<u64, RotateError> {
    let keys: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, kms_key_id FROM vault_keys WHERE state <> 'destroyed' ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    // KMS answers with the key's ARN: once known, keys already under it are skipped.
    let mut target_arn = new_kms_key_id.to_owned();
    let mut rewrapped = 0;
    for (id, current) in keys {
        if current == target_arn {
            continue;
        }
        target_arn = keyring.rewrap(KeyId(id), new_kms_key_id).await?;
        rewrapped += 1;
        tracing::info!(key_id = id, kms_key = %target_arn, "re-wrapped");
    }
    Ok(rewrapped)
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

pub async fn status(pool: &PgPool) -> Result<Vec<KeyStatus>, RotateError> {
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
