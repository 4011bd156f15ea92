//! A witness object: one checkpoint as JSON under `checkpoints/<seq, 20 digits>.json`
//! (docs/FORMAT.md §7), and which objects count (signed by the audit key under their own
//! number).

use p256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::super::Checkpoint;

pub(super) const PREFIX: &str = "checkpoints/";
/// The `format` of a witness object.
const OBJECT_FORMAT: &str = "pii-vault/audit-checkpoint/v2";

/// The object key of checkpoint `seq`.
pub fn object_key(seq: i64) -> String {
    format!("{PREFIX}{seq:020}.json")
}

/// The number an object key names, if it is a checkpoint's key.
pub(super) fn seq_of(key: &str) -> Option<i64> {
    let digits = key.strip_prefix(PREFIX)?.strip_suffix(".json")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// A witness object as stored (JSON; binary fields in lowercase hex).
#[derive(Debug, Serialize, Deserialize)]
struct Object {
    format: String,
    seq: i64,
    last_audit_id: i64,
    head_hash: String,
    signed_at_micros: i64,
    kms_key_id: String,
    signature_der: String,
}

/// The object for `checkpoint` (which must carry a number).
pub fn to_object(checkpoint: &Checkpoint) -> Vec<u8> {
    let object = Object {
        format: OBJECT_FORMAT.to_owned(),
        seq: checkpoint.seq.unwrap_or(0),
        last_audit_id: checkpoint.last_audit_id,
        head_hash: hex::encode(&checkpoint.head_hash),
        signed_at_micros: (checkpoint.signed_at.unix_timestamp_nanos() / 1_000) as i64,
        kms_key_id: checkpoint.kms_key_id.clone(),
        signature_der: hex::encode(&checkpoint.signature),
    };
    let mut text = serde_json::to_vec_pretty(&object).expect("plain fields serialize");
    text.push(b'\n');
    text
}

/// The checkpoint in an object, if it is one (not whether it verifies).
pub fn from_object(bytes: &[u8]) -> Option<Checkpoint> {
    let object: Object = serde_json::from_slice(bytes).ok()?;
    if object.format != OBJECT_FORMAT {
        return None;
    }
    Some(Checkpoint {
        id: 0,
        seq: Some(object.seq),
        last_audit_id: object.last_audit_id,
        head_hash: hex::decode(&object.head_hash).ok()?,
        signed_at: OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(object.signed_at_micros) * 1_000,
        )
        .ok()?,
        kms_key_id: object.kms_key_id,
        signature: hex::decode(&object.signature_der).ok()?,
        created_by: "the witness".to_owned(),
    })
}

/// The checkpoint in object `key` when it verifies under `signer` with the number its key
/// names.
pub(super) fn verified(key: &str, bytes: &[u8], signer: &VerifyingKey) -> Option<Checkpoint> {
    from_object(bytes).filter(|c| c.seq == seq_of(key) && c.verifies(Some(signer)))
}
