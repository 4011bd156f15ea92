//! The moves between key states: a rotation or an expiry marks keys retiring, retires them once
//! no row uses them (under their key-use lock), and destroys them if asked.

use sqlx::{PgConnection, PgExecutor, PgPool};
use time::Date;

use super::{Purpose, key_use};
use crate::vault::KeyId;

/// Starts a token key rotation: the active token key becomes retiring (in the caller's
/// transaction, which then makes the new one). The keys marked: none if no token key was
/// active.
pub async fn start_token_rotation(tx: &mut PgConnection) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE vault_keys SET state = 'retiring' WHERE purpose = 'token' AND state = 'active'",
    )
    .execute(tx)
    .await?
    .rows_affected())
}

/// Starts a data key rotation: every active data key becomes retiring. The keys marked.
pub async fn start_data_rotation(db: impl PgExecutor<'_>) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE vault_keys SET state = 'retiring'
         WHERE purpose = 'data' AND state = 'active' RETURNING id",
    )
    .fetch_all(db)
    .await
}

/// Whether data key `$1` protects no row.
const UNUSED_DATA_KEY: &str = "SELECT NOT EXISTS (SELECT 1 FROM login_vault WHERE data_key_id = $1)
    AND NOT EXISTS (SELECT 1 FROM quarantine WHERE data_key_id = $1)";
/// Whether token key `$1` is named by no row. Erasure records with a sealed id are carried to
/// the new key before this is asked; those made before migration 0014 cannot be, and keep their
/// key from being destroyed instead.
const UNUSED_TOKEN_KEY: &str =
    "SELECT NOT EXISTS (SELECT 1 FROM user_logins WHERE token_key_id = $1)
    AND NOT EXISTS (SELECT 1 FROM quarantine WHERE token_key_id = $1)
    AND NOT EXISTS (SELECT 1 FROM erasures WHERE token_key_id = $1 AND sealed_user_id IS NOT NULL)";

/// Retires the retiring keys of `purpose` in `retiring` if none protects a row any more; `None`
/// if some still do (rows an ingester wrote after the last pass), which calls for another
/// pass.
pub async fn retire_unused(
    pool: &PgPool,
    retiring: &[i64],
    purpose: Purpose,
) -> Result<Option<Vec<KeyId>>, sqlx::Error> {
    let unused_sql = match purpose {
        Purpose::Data => UNUSED_DATA_KEY,
        Purpose::Token => UNUSED_TOKEN_KEY,
    };
    let mut tx = pool.begin().await?;
    // Waits for the writers still using these keys, and holds off new ones until the keys
    // are retired (see `key_use`).
    key_use::hold_exclusive(&mut tx, retiring).await?;
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

/// Drops the wrapped bytes of the retired keys of `purpose`; how many. A retired key that
/// something still names (an erasure record from before migration 0014) is kept: the database
/// refuses to destroy it anyway.
pub async fn destroy_retired(
    db: impl PgExecutor<'_>,
    purpose: Purpose,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE vault_keys SET state = 'destroyed', wrapped_key = NULL
         WHERE purpose = $1 AND state = 'retired' AND NOT vault_key_named(id)",
    )
    .bind(purpose)
    .execute(db)
    .await?
    .rows_affected())
}

/// The data keys of the retention window that starts on `starts`, not yet destroyed.
pub async fn window_keys(db: impl PgExecutor<'_>, starts: Date) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM vault_keys WHERE window_starts = $1 AND state <> 'destroyed' ORDER BY id",
    )
    .bind(starts)
    .fetch_all(db)
    .await
}

/// Starts retiring the active data keys of an expiring window.
pub async fn start_window_retirement(
    db: impl PgExecutor<'_>,
    starts: Date,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE vault_keys SET state = 'retiring' WHERE window_starts = $1 AND state = 'active'",
    )
    .bind(starts)
    .execute(db)
    .await?;
    Ok(())
}

/// The data keys of a window that rows may still be written under (active or retiring).
pub async fn usable_in_window(
    db: impl PgExecutor<'_>,
    starts: Date,
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM vault_keys WHERE window_starts = $1 AND state IN ('active', 'retiring')",
    )
    .bind(starts)
    .fetch_all(db)
    .await
}

/// Drops the wrapped bytes of an expired window's retired data keys.
pub async fn destroy_retired_in_window(
    db: impl PgExecutor<'_>,
    starts: Date,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE vault_keys SET state = 'destroyed', wrapped_key = NULL
         WHERE window_starts = $1 AND state = 'retired'",
    )
    .bind(starts)
    .execute(db)
    .await?;
    Ok(())
}
