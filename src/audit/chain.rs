//! The chain: a stored audit row and the hash its content and predecessor call for, in each
//! format (the encodings are in the module's documentation, [`super`]).

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{length_prefixed, micros};

const FORMAT_1: &[u8] = b"pii-vault/audit/v1";
const FORMAT_2: &[u8] = b"pii-vault/audit/v2";

/// A stored row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Row {
    pub id: i64,
    pub format: i16,
    pub at: OffsetDateTime,
    pub actor: String,
    pub db_user: String,
    pub purpose: Option<String>,
    pub reason: String,
    pub question: String,
    pub values_revealed: i32,
    pub outcome: String,
    pub login_ids: Option<Vec<i64>>,
    pub key_ids: Option<Vec<i64>>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

pub(super) const SELECT_ROWS: &str =
    "SELECT id, format, at, actor, db_user, purpose, reason, question,
       values_revealed, outcome, login_ids, key_ids, prev_hash, hash FROM unmask_audit";

/// SHA-256 over length-prefixed parts.
fn hash_parts(parts: &[&[u8]]) -> [u8; 32] {
    Sha256::digest(length_prefixed(parts)).into()
}

fn id_list(ids: &[i64]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_be_bytes()).collect()
}

impl Row {
    /// The hash this row's content and predecessor call for, in the row's format.
    pub fn expected_hash(&self) -> [u8; 32] {
        let at = micros(self.at);
        let values = self.values_revealed.to_be_bytes();
        if self.format == 1 {
            return hash_parts(&[
                FORMAT_1,
                &self.prev_hash,
                &at,
                self.actor.as_bytes(),
                self.db_user.as_bytes(),
                self.reason.as_bytes(),
                self.question.as_bytes(),
                &values,
                self.outcome.as_bytes(),
            ]);
        }
        let logins = id_list(self.login_ids.as_deref().unwrap_or_default());
        let keys = id_list(self.key_ids.as_deref().unwrap_or_default());
        hash_parts(&[
            FORMAT_2,
            &self.prev_hash,
            &at,
            self.actor.as_bytes(),
            self.db_user.as_bytes(),
            self.purpose.as_deref().unwrap_or_default().as_bytes(),
            self.reason.as_bytes(),
            self.question.as_bytes(),
            &values,
            self.outcome.as_bytes(),
            &logins,
            &keys,
        ])
    }
}
