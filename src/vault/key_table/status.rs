//! Each key with what it protects (`rotate-keys status`), and which keys a re-wrap moves: those
//! outside retention windows, since a window's keys stay under the window's own KMS key.

use sqlx::PgExecutor;
use time::Date;

use super::{KeyState, Purpose};

/// One key as `status` shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyStatus {
    pub id: i64,
    pub purpose: Purpose,
    pub state: KeyState,
    pub kms_key_id: String,
    pub age_days: f64,
    /// Rows this key protects (logins and quarantined messages for a data key, tokenized
    /// logins for a token key).
    pub rows: i64,
    /// Values sealed under a data key (two a login, one a quarantined body); tokens for a
    /// token key (two a login).
    pub values: i64,
    /// The login dates a data key's values come from: its time window.
    pub first_login: Option<Date>,
    pub last_login: Option<Date>,
}

/// Every key, by id.
pub async fn status(db: impl PgExecutor<'_>) -> Result<Vec<KeyStatus>, sqlx::Error> {
    sqlx::query_as(
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
    .fetch_all(db)
    .await
}

/// The keys a re-wrap moves, by id: not destroyed, outside retention windows, with the KMS key
/// each is under now.
pub async fn rewrappable(db: impl PgExecutor<'_>) -> Result<Vec<(i64, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, kms_key_id FROM vault_keys
         WHERE state <> 'destroyed' AND window_starts IS NULL ORDER BY id",
    )
    .fetch_all(db)
    .await
}

/// How many data keys of retention windows are not destroyed (a re-wrap leaves them).
pub async fn live_window_keys(db: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM vault_keys WHERE state <> 'destroyed' AND window_starts IS NOT NULL",
    )
    .fetch_one(db)
    .await
}

/// Whether KMS key `kms_key_arn` wraps a key outside the retention window of `month`.
pub async fn wraps_outside_window(
    db: impl PgExecutor<'_>,
    kms_key_arn: &str,
    month: Date,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM vault_keys
                        WHERE kms_key_id = $1 AND window_starts IS DISTINCT FROM $2)",
    )
    .bind(kms_key_arn)
    .bind(month)
    .fetch_one(db)
    .await
}
