//! Writing a batch to PostgreSQL: one transaction, a few statements, whatever the batch size.
//!
//! Rows go in through `UNNEST` of one array per column, so a batch of 1,000 logins is one
//! statement, not 1,000. `ON CONFLICT (message_id) DO NOTHING` makes a redelivered message add
//! nothing; the login and its vault row are inserted by one statement, so a login never
//! exists without its sealed values (unless its user was erased after it was sent: then it
//! has neither tokens nor sealed values).

use sqlx::PgPool;

use super::batch::Batch;
use crate::vault::erasure::erasure_lock;
use crate::vault::keyring::key_use_lock;

/// What one committed batch changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub stored: u64,
    pub quarantined: u64,
    /// Messages already stored (or quarantined) by an earlier delivery.
    pub duplicates: u64,
}

const INSERT_LOGINS: &str = "
WITH input AS (
    SELECT * FROM UNNEST(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
        $7::int4[], $8::text[], $9::date[], $10::bytea[], $11::bytea[]
    ) AS t(message_id, user_id, device_type, masked_ip, masked_device_id, locale,
           app_version, app_version_text, create_date, sealed_ip, sealed_device_id)
), inserted AS (
    INSERT INTO user_logins (user_id, device_type, masked_ip, masked_device_id, locale,
                             app_version, create_date, message_id, token_key_id,
                             app_version_text)
    SELECT user_id, device_type, masked_ip, masked_device_id, locale,
           app_version, create_date, message_id, $12, app_version_text
    FROM input
    ON CONFLICT (message_id) DO NOTHING
    RETURNING id, message_id
)
INSERT INTO login_vault (login_id, data_key_id, sealed_ip, sealed_device_id)
SELECT inserted.id, $13, input.sealed_ip, input.sealed_device_id
FROM inserted JOIN input USING (message_id)
WHERE input.sealed_ip IS NOT NULL";

const INSERT_QUARANTINE: &str = "
INSERT INTO quarantine (message_id, reason, body_bytes, sealed_body, sent_at, user_token,
                        data_key_id, token_key_id)
SELECT message_id, reason, body_bytes, sealed_body, sent_at, user_token, $7,
       CASE WHEN user_token IS NOT NULL THEN $8 END
FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::bytea[], $5::timestamptz[], $6::text[])
    AS t(message_id, reason, body_bytes, sealed_body, sent_at, user_token)
ON CONFLICT (message_id) DO NOTHING";

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A key the batch was sealed or tokenized with was retired meanwhile (a rotation finished
    /// while this process had not yet moved off it): the batch must be made again.
    #[error("a key of this batch was retired by a rotation")]
    KeyRetired,
    /// A user was erased after the batch was made: it must be made again, knowing it.
    #[error("a user was erased after this batch was made")]
    ErasuresChanged,
}

/// Writes `batch` in one transaction. Nothing is visible (or acknowledged) unless it commits.
pub async fn write(pool: &PgPool, batch: &Batch) -> Result<Written, WriteError> {
    let mut tx = pool.begin().await?;
    // First hold the batch's keys, then check them (see `key_use_lock`): a rotation cannot
    // retire them before this commits, and if it already has, nothing is written.
    let keys = [batch.token_key_id.0, batch.data_key_id.0];
    sqlx::query(key_use_lock::HOLD_KEYS_SHARED)
        .bind(&keys[..])
        .execute(&mut *tx)
        .await?;
    let usable: i64 = sqlx::query_scalar(key_use_lock::KEYS_USABLE)
        .bind(&keys[..])
        .fetch_one(&mut *tx)
        .await?;
    if usable < 2 {
        return Err(WriteError::KeyRetired); // dropping the transaction rolls it back
    }
    // Likewise for erasures: one cannot commit between this check and the commit below.
    sqlx::query(erasure_lock::HOLD_SHARED)
        .execute(&mut *tx)
        .await?;
    let newest: i64 = sqlx::query_scalar(erasure_lock::NEWEST)
        .fetch_one(&mut *tx)
        .await?;
    if newest > batch.erasures_seen {
        return Err(WriteError::ErasuresChanged);
    }
    let mut written = Written::default();
    if !batch.logins.is_empty() {
        let rows = &batch.logins;
        let stored = sqlx::query(INSERT_LOGINS)
            .bind(
                rows.iter()
                    .map(|r| r.message_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|r| r.device_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|r| r.personal.as_ref().map(|p| p.masked_ip.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|r| r.personal.as_ref().map(|p| p.masked_device_id.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|r| r.locale.as_deref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.app_version).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|r| r.app_version_text.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|r| r.create_date).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|r| r.personal.as_ref().map(|p| p.sealed_ip.as_slice()))
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|r| r.personal.as_ref().map(|p| p.sealed_device_id.as_slice()))
                    .collect::<Vec<_>>(),
            )
            .bind(batch.token_key_id)
            .bind(batch.data_key_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        written.stored = stored;
        written.duplicates += rows.len() as u64 - stored;
    }
    if !batch.quarantined.is_empty() {
        let rows = &batch.quarantined;
        let quarantined = sqlx::query(INSERT_QUARANTINE)
            .bind(
                rows.iter()
                    .map(|r| r.message_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.body_bytes).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|r| r.sealed_body.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|r| r.sent_at).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|r| r.user_token.as_ref().map(|t| t.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(batch.data_key_id)
            .bind(batch.token_key_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        written.quarantined = quarantined;
        written.duplicates += rows.len() as u64 - quarantined;
    }
    tx.commit().await?;
    Ok(written)
}
