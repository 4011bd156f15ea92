//! A key's row: its id reserved, the row made, re-wrapped, handed out through the key door, and
//! keys found by state and purpose.

use sqlx::{PgExecutor, PgPool};
use time::Date;

use super::Purpose;
use crate::vault::{KeyId, WrappedKey};

/// Reserves the id of a key about to be made: the id is part of the encryption context KMS
/// binds into the wrapped key, so it is known before the row exists.
pub async fn reserve_id(db: impl PgExecutor<'_>) -> Result<KeyId, sqlx::Error> {
    let id = sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('vault_keys', 'id'))")
        .fetch_one(db)
        .await?;
    Ok(KeyId(id))
}

/// A key's row as it is made (`active`).
#[derive(Debug, Clone, Copy)]
pub struct NewKey<'a> {
    pub id: KeyId,
    pub purpose: Purpose,
    pub wrapped: &'a WrappedKey,
    pub created_by: &'a str,
    /// The retention window (its first day) whose KMS key wraps it.
    pub window_starts: Option<Date>,
    /// The sealing format it serves (`SealFormat::stored`).
    pub format: i16,
}

pub async fn insert(db: impl PgExecutor<'_>, key: &NewKey<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO vault_keys (id, purpose, kms_key_id, wrapped_key, created_by, window_starts,
                                 format)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(key.id)
    .bind(key.purpose)
    .bind(&key.wrapped.kms_key_id)
    .bind(&key.wrapped.ciphertext)
    .bind(key.created_by)
    .bind(key.window_starts)
    .bind(key.format)
    .execute(db)
    .await?;
    Ok(())
}

/// Puts key `id` under the KMS key that re-wrapped it.
pub async fn set_wrapped(
    db: impl PgExecutor<'_>,
    id: KeyId,
    rewrapped: &WrappedKey,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE vault_keys SET wrapped_key = $2, kms_key_id = $3 WHERE id = $1")
        .bind(id)
        .bind(&rewrapped.ciphertext)
        .bind(&rewrapped.kms_key_id)
        .execute(db)
        .await?;
    Ok(())
}

/// A row of `vault_keys` as the key door hands it out (no wrapped bytes once destroyed).
#[derive(Debug)]
pub struct StoredKey {
    pub purpose: Purpose,
    pub format: i16,
    pub kms_key_id: String,
    pub wrapped_key: Option<Vec<u8>>,
}

/// Key `id` through the audited key door, for `reason` (the audit names it): one audit row,
/// then the key; `None` if there is no such key.
pub async fn hand_out(
    pool: &PgPool,
    id: KeyId,
    reason: &str,
) -> Result<Option<StoredKey>, sqlx::Error> {
    // Step one commits on its own (the pool's autocommit) before step two hands out.
    let request: i64 = sqlx::query_scalar("SELECT vault_key_request($1, $2)")
        .bind([id.0])
        .bind(reason)
        .fetch_one(pool)
        .await?;
    // Checked against the door's result columns at build time (`.sqlx/`); a function's
    // columns carry no NOT NULL, so "!" says which ones the door fills.
    sqlx::query_as!(
        StoredKey,
        r#"SELECT purpose AS "purpose!: Purpose", format AS "format!",
                  kms_key_id AS "kms_key_id!", wrapped_key
             FROM vault_key_hand_out($1)"#,
        request
    )
    .fetch_optional(pool)
    .await
}

/// The active token key, if there is one (`rotate-keys init` makes the first).
pub async fn active_token_key(db: impl PgExecutor<'_>) -> Result<Option<KeyId>, sqlx::Error> {
    let id = sqlx::query_scalar(
        "SELECT id FROM vault_keys WHERE purpose = 'token' AND state = 'active'",
    )
    .fetch_optional(db)
    .await?;
    Ok(id.map(KeyId))
}

/// Which of `ids` are active, the only state new writes should use.
pub async fn active_among(
    db: impl PgExecutor<'_>,
    ids: &[KeyId],
) -> Result<Vec<KeyId>, sqlx::Error> {
    let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
    let active: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM vault_keys WHERE id = ANY($1) AND state = 'active'")
            .bind(&ids)
            .fetch_all(db)
            .await?;
    Ok(active.into_iter().map(KeyId).collect())
}

/// The token keys an ingester may tokenize with: active, or retiring during a rotation.
pub async fn tokenizing(db: impl PgExecutor<'_>) -> Result<Vec<KeyId>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM vault_keys
         WHERE purpose = 'token' AND state IN ('active', 'retiring') ORDER BY id",
    )
    .fetch_all(db)
    .await
}

/// The keys of `purpose` an unfinished rotation left retiring.
pub async fn retiring(db: impl PgExecutor<'_>, purpose: Purpose) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM vault_keys WHERE purpose = $1 AND state = 'retiring' ORDER BY id",
    )
    .bind(purpose)
    .fetch_all(db)
    .await
}

/// Every data key, whatever its state.
pub async fn data_keys(db: impl PgExecutor<'_>) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM vault_keys WHERE purpose = 'data'")
        .fetch_all(db)
        .await
}

/// The retention window (its first day) each of `ids` serves.
pub async fn windows_of(
    db: impl PgExecutor<'_>,
    ids: &[i64],
) -> Result<Vec<(KeyId, Option<Date>)>, sqlx::Error> {
    sqlx::query_as("SELECT id, window_starts FROM vault_keys WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(db)
        .await
}

/// When the active token key and the newest active data key that `created_by` made since
/// `since` were created, seconds after the epoch (a data key is made when the first batch needs
/// one, so there may be none).
pub async fn creation_times(
    db: impl PgExecutor<'_>,
    created_by: &str,
    since: f64,
) -> Result<(Option<f64>, Option<f64>), sqlx::Error> {
    sqlx::query_as(
        "SELECT
             (SELECT extract(epoch FROM max(created_at))::float8 FROM vault_keys
              WHERE purpose = 'token' AND state = 'active'),
             (SELECT extract(epoch FROM max(created_at))::float8 FROM vault_keys
              WHERE purpose = 'data' AND state = 'active' AND created_by = $1
                AND created_at >= to_timestamp($2))",
    )
    .bind(created_by)
    .bind(since)
    .fetch_one(db)
    .await
}
