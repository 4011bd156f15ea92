//! The unmask audit trail: append-only, hash-chained.
//!
//! Each row's hash is SHA-256 over a canonical, length-prefixed encoding of its content and the
//! previous row's hash. [`verify`] walks the chain in id order and names the first row that was
//! edited, or that does not follow its predecessor (a row deleted or inserted out of order).
//! Appending takes a transaction-scoped advisory lock, so concurrent reveals form one chain.
//!
//! What the chain cannot show on its own: the removal of the newest rows. Keep the head hash
//! that `verify-audit` prints somewhere the database's administrators cannot write.

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use time::OffsetDateTime;

/// `prev_hash` of the first row.
pub const GENESIS: [u8; 32] = [0; 32];

/// Serializes appends across processes (an arbitrary constant: "piivault" in ASCII).
const APPEND_LOCK: i64 = 0x7069_6976_6175_6c74;

const HASH_VERSION: &[u8] = b"pii-vault/audit/v1";

/// How an audited request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Revealed,
    NothingFound,
    IntegrityFailure,
    Erased,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Revealed => "revealed",
            Outcome::NothingFound => "nothing-found",
            Outcome::IntegrityFailure => "integrity-failure",
            Outcome::Erased => "erased",
        }
    }
}

/// What a caller records; the time, database user and hashes are filled in by [`append`].
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub actor: &'a str,
    pub reason: &'a str,
    pub question: &'a str,
    pub values_revealed: i32,
    pub outcome: Outcome,
}

/// A stored row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Row {
    pub id: i64,
    pub at: OffsetDateTime,
    pub actor: String,
    pub db_user: String,
    pub reason: String,
    pub question: String,
    pub values_revealed: i32,
    pub outcome: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl Row {
    fn expected_hash(&self) -> [u8; 32] {
        hash(
            &self.prev_hash,
            self.at,
            &self.actor,
            &self.db_user,
            &self.reason,
            &self.question,
            self.values_revealed,
            &self.outcome,
        )
    }
}

#[allow(clippy::too_many_arguments)] // one argument per hashed column, in column order
fn hash(
    prev_hash: &[u8],
    at: OffsetDateTime,
    actor: &str,
    db_user: &str,
    reason: &str,
    question: &str,
    values_revealed: i32,
    outcome: &str,
) -> [u8; 32] {
    let micros = (at.unix_timestamp_nanos() / 1_000) as i64;
    let mut hasher = Sha256::new();
    let parts: [&[u8]; 9] = [
        HASH_VERSION,
        prev_hash,
        &micros.to_be_bytes(),
        actor.as_bytes(),
        db_user.as_bytes(),
        reason.as_bytes(),
        question.as_bytes(),
        &values_revealed.to_be_bytes(),
        outcome.as_bytes(),
    ];
    for part in parts {
        hasher.update((part.len() as u32).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Appends `entry` and commits; returns the new row's id. Nothing may be revealed unless this
/// succeeded.
pub async fn append(pool: &PgPool, entry: &Entry<'_>) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let id = append_in(&mut tx, entry).await?;
    tx.commit().await?;
    Ok(id)
}

/// Appends `entry` inside the caller's transaction, so that the audited change and its audit
/// row commit together (or not at all).
pub async fn append_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    entry: &Entry<'_>,
) -> Result<i64, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut **tx)
        .await?;
    let prev_hash: Vec<u8> =
        sqlx::query_scalar("SELECT hash FROM unmask_audit ORDER BY id DESC LIMIT 1")
            .fetch_optional(&mut **tx)
            .await?
            .unwrap_or_else(|| GENESIS.to_vec());
    let db_user: String = sqlx::query_scalar("SELECT session_user::text")
        .fetch_one(&mut **tx)
        .await?;
    // PostgreSQL keeps microseconds: hash exactly what will be stored.
    let now = OffsetDateTime::now_utc();
    let at = now - time::Duration::nanoseconds(i64::from(now.nanosecond() % 1_000));
    let outcome = entry.outcome.as_str();
    let row_hash = hash(
        &prev_hash,
        at,
        entry.actor,
        &db_user,
        entry.reason,
        entry.question,
        entry.values_revealed,
        outcome,
    );
    let id = sqlx::query_scalar(
        "INSERT INTO unmask_audit (at, actor, db_user, reason, question, values_revealed,
                                   outcome, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
    )
    .bind(at)
    .bind(entry.actor)
    .bind(&db_user)
    .bind(entry.reason)
    .bind(entry.question)
    .bind(entry.values_revealed)
    .bind(outcome)
    .bind(&prev_hash)
    .bind(row_hash.as_slice())
    .fetch_one(&mut **tx)
    .await?;
    Ok(id)
}

/// The state of an intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intact {
    pub rows: u64,
    /// The newest row's hash (GENESIS when empty): record it to detect truncation later.
    pub head: [u8; 32],
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("audit row {0} was edited: its hash does not match its content")]
    Edited(i64),
    #[error(
        "audit row {0} does not follow the row before it: a row was deleted or inserted out of order before it"
    )]
    Unlinked(i64),
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Broken(#[from] Broken),
    #[error("reading the audit: {0}")]
    Database(#[from] sqlx::Error),
}

/// Walks the whole chain in id order.
pub async fn verify(pool: &PgPool) -> Result<Intact, VerifyError> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, at, actor, db_user, reason, question, values_revealed, outcome, prev_hash, hash
         FROM unmask_audit ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    Ok(verify_rows(&rows)?)
}

pub fn verify_rows(rows: &[Row]) -> Result<Intact, Broken> {
    let mut head = GENESIS;
    for row in rows {
        if row.prev_hash != head {
            return Err(Broken::Unlinked(row.id));
        }
        let expected = row.expected_hash();
        if row.hash != expected {
            return Err(Broken::Edited(row.id));
        }
        head = expected;
    }
    Ok(Intact {
        rows: rows.len() as u64,
        head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<Row> {
        let mut rows = Vec::new();
        let mut prev = GENESIS.to_vec();
        for i in 0..n {
            let mut row = Row {
                id: i as i64 + 1,
                at: OffsetDateTime::from_unix_timestamp(1_700_000_000 + i as i64).unwrap(),
                actor: "alice".into(),
                db_user: "compliance".into(),
                reason: format!("ticket {i}"),
                question: "user_id = u-1".into(),
                values_revealed: 2,
                outcome: "revealed".into(),
                prev_hash: prev.clone(),
                hash: Vec::new(),
            };
            row.hash = row.expected_hash().to_vec();
            prev = row.hash.clone();
            rows.push(row);
        }
        rows
    }

    #[test]
    fn an_intact_chain_verifies_and_reports_its_head() {
        let rows = chain(3);
        let intact = verify_rows(&rows).unwrap();
        assert_eq!(intact.rows, 3);
        assert_eq!(intact.head.to_vec(), rows[2].hash);
        assert_eq!(verify_rows(&[]).unwrap().head, GENESIS);
    }

    #[test]
    fn an_edited_row_is_named() {
        let mut rows = chain(3);
        rows[1].values_revealed = 0;
        assert_eq!(verify_rows(&rows), Err(Broken::Edited(2)));
    }

    #[test]
    fn a_deleted_row_is_named_by_its_successor() {
        let mut rows = chain(3);
        rows.remove(1);
        assert_eq!(verify_rows(&rows), Err(Broken::Unlinked(3)));
    }

    #[test]
    fn rows_out_of_order_are_caught() {
        let mut rows = chain(3);
        rows.swap(1, 2);
        assert_eq!(verify_rows(&rows), Err(Broken::Unlinked(3)));
    }

    #[test]
    fn hash_parts_are_unambiguous() {
        let at = OffsetDateTime::from_unix_timestamp(0).unwrap();
        let a = hash(&GENESIS, at, "ab", "c", "r", "q", 1, "revealed");
        let b = hash(&GENESIS, at, "a", "bc", "r", "q", 1, "revealed");
        assert_ne!(a, b);
    }
}
