//! The audit trail: append-only, hash-chained, computed by the database, with signed
//! checkpoints.
//!
//! Rows are appended only by the vault's door functions (migration 0005): the server sets each
//! row's id, time, database user, previous hash and hash under an advisory lock, so concurrent
//! callers form one chain and no client chooses what is recorded. This module *verifies*:
//! [`verify_rows`] recomputes every hash in id order and names the first row that was edited
//! or that does not follow its predecessor (deleted, inserted or forked).
//!
//! A database owner can disable the triggers and rewrite history, recomputing every later
//! hash; the chain alone cannot show that, nor the removal of the newest rows. Checkpoints
//! can: `(last id, head hash, time)` signed by a KMS asymmetric key (ECC_NIST_P256) that only
//! the checkpoint signer may use, verified here against its public key. A rewritten row before
//! a checkpoint changes the head it signed; a truncation removes the row it names; a forged
//! checkpoint does not verify. Rows after the newest checkpoint are covered by a head hash
//! kept elsewhere (`--expect-head`).
//!
//! The owner can also delete checkpoint rows, and whoever holds INSERT on the table
//! (compliance, the key admin) can add rows that do not verify. So each checkpoint is numbered
//! (`seq`, signed with it: format 2) and also written to a [`witness`] the database owner
//! cannot rewrite, an S3 bucket under Object Lock. [`verify_witnessed`] holds the chain to the
//! newest witnessed checkpoint: the chain must reach it (its row still carries the head it
//! signed), every signed checkpoint up to it must still be in the table (no gap in `seq`), and
//! an empty chain must have an empty witness. Checkpoint rows whose signatures do not verify
//! are named ([`Skipped`]) and skipped there: the witness decides, so a planted row cannot
//! stop verification (or checkpointing) for good.
//!
//! Encodings (both SHA-256 over length-prefixed parts, a part being a u32 big-endian length
//! then its bytes; integers big-endian; times as i64 microseconds since the Unix epoch):
//! - format 1 (rows written by pii-vault before 0.2, hashed by the client):
//!   `"pii-vault/audit/v1", prev_hash, at, actor, db_user, reason, question, values_revealed
//!   (i32), outcome`;
//! - format 2 (computed in SQL by `audit_hash_v2`): `"pii-vault/audit/v2", prev_hash, at,
//!   actor, db_user, purpose, reason, question, values_revealed (i32), outcome, login_ids,
//!   key_ids` (each id list one part: its ids as consecutive i64);
//! - a checkpoint signs `"pii-vault/audit-checkpoint/v1", last_id (i64), head_hash,
//!   signed_at` (format 1, before witnessing) or `"pii-vault/audit-checkpoint/v2", seq (i64),
//!   last_id (i64), head_hash, signed_at` (format 2) with ECDSA P-256 over SHA-256 (KMS
//!   `ECDSA_SHA_256`, message type RAW).
//!
//! docs/FORMAT.md §7 says the same byte for byte; `tests/data/vectors/audit.json` and a chain
//! written by an earlier version (`fixture-audit-*.json`) pin it.

mod chain;
mod checkpoint;
pub mod witness;

pub use chain::Row;
use chain::SELECT_ROWS;
pub use checkpoint::{
    Checkpoint, CheckpointKey, Signed, checkpoint_message, checkpoint_message_v2,
};

use std::collections::BTreeSet;

use p256::ecdsa::VerifyingKey;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;

/// `prev_hash` of the first row.
pub const GENESIS: [u8; 32] = [0; 32];

fn length_prefixed(parts: &[&[u8]]) -> Vec<u8> {
    let mut message = Vec::new();
    for part in parts {
        message.extend_from_slice(&(part.len() as u32).to_be_bytes());
        message.extend_from_slice(part);
    }
    message
}

/// A time as big-endian i64 microseconds since the Unix epoch.
fn micros(at: OffsetDateTime) -> [u8; 8] {
    ((at.unix_timestamp_nanos() / 1_000) as i64).to_be_bytes()
}

/// The state of an intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intact {
    pub rows: u64,
    /// The newest row's hash (GENESIS when empty): keep it elsewhere to detect truncation.
    pub head: [u8; 32],
    /// The newest row's id (0 when empty).
    pub last_id: i64,
    /// Checkpoints whose signatures verified and whose rows still match.
    pub checkpoints: u64,
    /// The newest witnessed checkpoint, which the chain reaches (with a witness only).
    pub witnessed: Option<Checkpoint>,
    /// What did not verify and was skipped (with a witness only; without one it fails).
    pub skipped: Vec<Skipped>,
}

/// A checkpoint that does not verify, skipped when a witness decides.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skipped {
    #[error(
        "checkpoint row {id} (inserted by {created_by}) does not verify under the audit signing key: skipped"
    )]
    Checkpoint { id: i64, created_by: String },
    #[error(
        "witness object {key} does not hold a checkpoint signed by the audit signing key under its number: skipped"
    )]
    WitnessObject { key: String },
}

/// Where history was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("audit row {0} was edited: its hash does not match its content")]
    Edited(i64),
    #[error(
        "audit row {0} does not follow the row before it: a row was deleted, inserted or forked off before it"
    )]
    Unlinked(i64),
    #[error("checkpoint {0} does not verify under the audit signing key: it was forged or altered")]
    ForgedCheckpoint(i64),
    #[error(
        "audit rows after {after} up to {upto} were rewritten: checkpoint {checkpoint} signed another head for row {upto}"
    )]
    Rewritten {
        checkpoint: i64,
        after: i64,
        upto: i64,
    },
    #[error("audit row {row} was removed: checkpoint {checkpoint} signed the chain up to it")]
    Truncated { checkpoint: i64, row: i64 },
    #[error(
        "the expected head is not in the audit: rows at or before it were removed or rewritten"
    )]
    ExpectedHeadMissing,
    #[error(
        "the audit chain is empty but the witness is not: witnessed checkpoint seq {seq} signed it up to row {row}"
    )]
    EmptyButWitnessed { seq: i64, row: i64 },
    #[error(
        "audit row {row} is gone but witnessed checkpoint seq {seq} signed the chain up to it: the chain does not reach the witness (rows at the head were deleted or replaced)"
    )]
    WitnessedRowMissing { seq: i64, row: i64 },
    #[error(
        "audit row {row} is not the row witnessed checkpoint seq {seq} signed: the chain does not reach the witness (rows up to it were rewritten or forged)"
    )]
    WitnessedRowChanged { seq: i64, row: i64 },
    #[error(
        "checkpoints were removed from the database: the newest that verifies there is seq {newest} but the witness holds seq {witnessed}"
    )]
    CheckpointsRemoved { newest: i64, witnessed: i64 },
    #[error(
        "checkpoint seq {seq} was removed from the database: the signed checkpoints' numbers have a gap"
    )]
    CheckpointMissing { seq: i64 },
    #[error("checkpoint seq {seq} in the database is not the one the witness holds")]
    WitnessDisagrees { seq: i64 },
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Broken(#[from] Broken),
    #[error("reading the audit: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the audit signing key: {0}")]
    SigningKey(String),
    #[error(transparent)]
    Witness(#[from] witness::WitnessError),
    #[error(
        "checkpoint seq {seq} is stored in the database but not witnessed ({error}); the next audit-checkpoint witnesses it"
    )]
    NotWitnessed {
        seq: i64,
        error: witness::WitnessError,
    },
}

/// Walks the chain in id order: every hash, every link.
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
        last_id: rows.last().map_or(0, |row| row.id),
        checkpoints: 0,
        witnessed: None,
        skipped: Vec::new(),
    })
}

/// Holds an intact chain to its checkpoints (in the order of the rows they cover) and, if
/// given, to a head hash kept elsewhere. Every checkpoint must verify under `signer`.
pub fn verify_against(
    rows: &[Row],
    checkpoints: &[Checkpoint],
    signer: Option<&VerifyingKey>,
    expect_head: Option<&[u8]>,
) -> Result<Intact, Broken> {
    let mut intact = verify_rows(rows)?;
    if let Some(forged) = checkpoints.iter().find(|c| !c.verifies(signer)) {
        return Err(Broken::ForgedCheckpoint(forged.id));
    }
    match_checkpoints(rows, checkpoints.iter().collect(), &mut intact)?;
    has_expected_head(rows, expect_head)?;
    Ok(intact)
}

/// Like [`verify_against`], with the newest checkpoint the witness holds (already checked
/// against `signer`; `None` when the witness is empty) deciding: the chain must reach it, and
/// every signed checkpoint up to it must still be in `checkpoints`. Checkpoint rows that do
/// not verify are skipped and named in [`Intact::skipped`].
pub fn verify_witnessed(
    rows: &[Row],
    checkpoints: &[Checkpoint],
    signer: &VerifyingKey,
    witnessed: Option<&Checkpoint>,
    expect_head: Option<&[u8]>,
) -> Result<Intact, Broken> {
    let mut intact = verify_rows(rows)?;
    let (signed, unsigned): (Vec<&Checkpoint>, Vec<&Checkpoint>) = checkpoints
        .iter()
        .partition(|checkpoint| checkpoint.verifies(Some(signer)));
    intact.skipped = unsigned
        .into_iter()
        .map(|checkpoint| Skipped::Checkpoint {
            id: checkpoint.id,
            created_by: checkpoint.created_by.clone(),
        })
        .collect();
    if let Some(witnessed) = witnessed {
        reaches_witness(rows, &signed, witnessed)?;
        intact.witnessed = Some(witnessed.clone());
    }
    match_checkpoints(rows, signed, &mut intact)?;
    has_expected_head(rows, expect_head)?;
    Ok(intact)
}

/// The chain reaches the witnessed checkpoint (its row still carries the head it signed, so
/// every row before it is unchanged), and the signed checkpoints in the database number
/// 1, 2, ... without a gap up to at least the witnessed one, which is among them.
fn reaches_witness(
    rows: &[Row],
    signed: &[&Checkpoint],
    witnessed: &Checkpoint,
) -> Result<(), Broken> {
    let (seq, row) = (witnessed.seq.unwrap_or(0), witnessed.last_audit_id);
    if rows.is_empty() {
        return Err(Broken::EmptyButWitnessed { seq, row });
    }
    match rows.binary_search_by_key(&row, |r| r.id) {
        Err(_) => return Err(Broken::WitnessedRowMissing { seq, row }),
        Ok(at) if rows[at].hash != witnessed.head_hash => {
            return Err(Broken::WitnessedRowChanged { seq, row });
        }
        Ok(_) => {}
    }
    let numbers: BTreeSet<i64> = signed.iter().filter_map(|c| c.seq).collect();
    let newest = numbers.last().copied().unwrap_or(0);
    if newest < seq {
        return Err(Broken::CheckpointsRemoved {
            newest,
            witnessed: seq,
        });
    }
    // Numbers are consecutive, so a gap shows within `numbers.len()` steps.
    if let Some(missing) = (1..=newest).find(|n| !numbers.contains(n)) {
        return Err(Broken::CheckpointMissing { seq: missing });
    }
    if !signed
        .iter()
        .any(|c| c.seq == Some(seq) && c.states_the_same_as(witnessed))
    {
        return Err(Broken::WitnessDisagrees { seq });
    }
    Ok(())
}

/// Each signed checkpoint, in the order of the rows it covers, still names a row carrying
/// the head it signed.
fn match_checkpoints(
    rows: &[Row],
    mut signed: Vec<&Checkpoint>,
    intact: &mut Intact,
) -> Result<(), Broken> {
    signed.sort_by_key(|c| (c.last_audit_id, c.id));
    let mut verified_up_to = 0;
    for checkpoint in signed {
        match rows.binary_search_by_key(&checkpoint.last_audit_id, |row| row.id) {
            Ok(at) if rows[at].hash == checkpoint.head_hash => {
                verified_up_to = checkpoint.last_audit_id;
            }
            Ok(_) => {
                return Err(Broken::Rewritten {
                    checkpoint: checkpoint.id,
                    after: verified_up_to,
                    upto: checkpoint.last_audit_id,
                });
            }
            Err(_) => {
                return Err(Broken::Truncated {
                    checkpoint: checkpoint.id,
                    row: checkpoint.last_audit_id,
                });
            }
        }
        intact.checkpoints += 1;
    }
    Ok(())
}

fn has_expected_head(rows: &[Row], expect_head: Option<&[u8]>) -> Result<(), Broken> {
    if let Some(expected) = expect_head {
        if expected != GENESIS && !rows.iter().any(|row| row.hash == expected) {
            return Err(Broken::ExpectedHeadMissing);
        }
    }
    Ok(())
}

const SELECT_CHECKPOINTS: &str = "SELECT id, seq, last_audit_id, head_hash, signed_at, kms_key_id,
       signature, created_by FROM audit_checkpoints";

/// The whole audit in id order, and every checkpoint row.
async fn read(conn: &mut PgConnection) -> Result<(Vec<Row>, Vec<Checkpoint>), sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!("{SELECT_ROWS} ORDER BY id"))
        .fetch_all(&mut *conn)
        .await?;
    let checkpoints: Vec<Checkpoint> = sqlx::query_as(&format!("{SELECT_CHECKPOINTS} ORDER BY id"))
        .fetch_all(&mut *conn)
        .await?;
    Ok((rows, checkpoints))
}

/// Reads the whole audit and its checkpoints and verifies them (see [`verify_against`]).
/// Without a signing key, any checkpoint counts as unverifiable.
pub async fn verify(
    pool: &PgPool,
    signer: Option<&VerifyingKey>,
    expect_head: Option<&[u8]>,
) -> Result<Intact, VerifyError> {
    let (rows, checkpoints) = read(&mut *pool.acquire().await?).await?;
    Ok(verify_against(&rows, &checkpoints, signer, expect_head)?)
}

/// Reads the newest checkpoint the witness holds, then the audit and its checkpoints, and
/// verifies them against it (see [`verify_witnessed`]). The witness is read first: a
/// checkpoint made meanwhile is then in the database, never only in the witness.
pub async fn verify_with_witness(
    pool: &PgPool,
    signer: &VerifyingKey,
    witness: &witness::WitnessBucket,
    expect_head: Option<&[u8]>,
) -> Result<Intact, VerifyError> {
    let newest = witness.newest(signer).await?;
    let (rows, checkpoints) = read(&mut *pool.acquire().await?).await?;
    let mut intact = verify_witnessed(
        &rows,
        &checkpoints,
        signer,
        newest.checkpoint.as_ref(),
        expect_head,
    )?;
    intact.skipped.extend(newest.skipped);
    Ok(intact)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::testing::{self, bytes, hex, int, text};
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::DecodePublicKey;

    pub(super) fn chain(n: usize, format: i16) -> Vec<Row> {
        let mut rows = Vec::new();
        let mut prev = GENESIS.to_vec();
        for i in 0..n {
            let mut row = Row {
                id: i as i64 + 1,
                format,
                at: OffsetDateTime::from_unix_timestamp(1_700_000_000 + i as i64).unwrap(),
                actor: "alice".into(),
                db_user: "compliance".into(),
                purpose: (format == 2).then(|| "fraud-investigation".into()),
                reason: format!("ticket {i}"),
                question: "user_id = u-1".into(),
                values_revealed: 2,
                outcome: "revealed".into(),
                login_ids: (format == 2).then(|| vec![i as i64 + 10]),
                key_ids: (format == 2).then(|| vec![1, 2]),
                prev_hash: prev.clone(),
                hash: Vec::new(),
            };
            row.hash = row.expected_hash().to_vec();
            prev = row.hash.clone();
            rows.push(row);
        }
        rows
    }

    fn signing_key() -> SigningKey {
        SigningKey::from_slice(&[7u8; 32]).unwrap()
    }

    /// A format-1 checkpoint (no number) of `row`, signed by `key`.
    fn checkpoint(id: i64, row: &Row, key: &SigningKey) -> Checkpoint {
        signed(id, None, row, key)
    }

    /// A witnessed (format 2) checkpoint number `seq` of `row`, signed by `key`.
    fn numbered(id: i64, seq: i64, row: &Row, key: &SigningKey) -> Checkpoint {
        signed(id, Some(seq), row, key)
    }

    pub(super) fn signed(id: i64, seq: Option<i64>, row: &Row, key: &SigningKey) -> Checkpoint {
        let mut checkpoint = Checkpoint {
            id,
            seq,
            last_audit_id: row.id,
            head_hash: row.hash.clone(),
            signed_at: OffsetDateTime::from_unix_timestamp(1_800_000_000 + row.id).unwrap(),
            kms_key_id: "signer".into(),
            signature: Vec::new(),
            created_by: "signer".into(),
        };
        let signature: p256::ecdsa::Signature = key.sign(&checkpoint.message());
        checkpoint.signature = signature.to_der().as_bytes().to_vec();
        checkpoint
    }

    /// A row planted by someone with INSERT on the table: it claims a number and a head,
    /// with a signature the key never made.
    fn planted(id: i64, seq: Option<i64>, row: &Row, by: &str) -> Checkpoint {
        let mut checkpoint = signed(id, seq, row, &SigningKey::from_slice(&[9u8; 32]).unwrap());
        checkpoint.created_by = by.into();
        checkpoint
    }

    #[test]
    fn a_numbered_checkpoint_signs_its_number() {
        let key = signing_key();
        let rows = chain(2, 2);
        let second = numbered(2, 2, &rows[1], &key);
        assert!(second.verifies(Some(key.verifying_key())));
        let mut renumbered = second.clone();
        renumbered.seq = Some(3);
        assert!(!renumbered.verifies(Some(key.verifying_key())));
        let mut unnumbered = second.clone();
        unnumbered.seq = None;
        assert!(
            !unnumbered.verifies(Some(key.verifying_key())),
            "a format-2 signature is no format-1 signature"
        );
        assert_ne!(second.message(), checkpoint(2, &rows[1], &key).message());
    }

    #[test]
    fn the_witness_catches_a_replaced_head_removed_checkpoints_and_an_emptied_chain() {
        let key = signing_key();
        let verifying = *key.verifying_key();
        let rows = chain(6, 2);
        let checkpoints = vec![
            checkpoint(1, &rows[0], &key),
            numbered(2, 1, &rows[1], &key),
            numbered(3, 2, &rows[3], &key),
        ];
        let witnessed = numbered(0, 2, &rows[3], &key);
        let verify = |rows: &[Row], checkpoints: &[Checkpoint]| {
            verify_witnessed(rows, checkpoints, &verifying, Some(&witnessed), None)
        };
        let intact = verify(&rows, &checkpoints).unwrap();
        assert_eq!((intact.rows, intact.checkpoints), (6, 3));
        assert_eq!(intact.witnessed.and_then(|w| w.seq), Some(2));
        assert!(intact.skipped.is_empty());
        let unwitnessed = verify_witnessed(&rows, &checkpoints, &verifying, None, None);
        assert!(unwitnessed.is_ok(), "an empty witness holds nothing to");

        // The newest checkpoint deleted, then its row and the rest rewritten: the chain and
        // the remaining checkpoints verify; the witness does not.
        let mut rewritten = rows.clone();
        rewritten[2].reason = "nothing to see".into();
        rehash_from(&mut rewritten, 2);
        assert!(verify_against(&rewritten, &checkpoints[..2], Some(&verifying), None).is_ok());
        assert_eq!(
            verify(&rewritten, &checkpoints[..2]),
            Err(Broken::WitnessedRowChanged { seq: 2, row: 4 })
        );
        // The head replaced by a forged row under another id.
        let mut forged = rows[..3].to_vec();
        let mut row = rows[3].clone();
        (row.id, row.actor) = (7, "mallory".into());
        row.hash = row.expected_hash().to_vec();
        forged.push(row);
        assert!(verify_against(&forged, &checkpoints[..2], Some(&verifying), None).is_ok());
        assert_eq!(
            verify(&forged, &checkpoints[..2]),
            Err(Broken::WitnessedRowMissing { seq: 2, row: 4 })
        );
        // Checkpoints removed: the newest, or one before it.
        assert_eq!(
            verify(&rows, &checkpoints[..2]),
            Err(Broken::CheckpointsRemoved {
                newest: 1,
                witnessed: 2
            })
        );
        assert_eq!(
            verify(&rows, &[checkpoints[0].clone(), checkpoints[2].clone()]),
            Err(Broken::CheckpointMissing { seq: 1 })
        );
        // Everything deleted.
        assert!(verify_against(&[], &[], Some(&verifying), None).is_ok());
        assert_eq!(
            verify(&[], &[]),
            Err(Broken::EmptyButWitnessed { seq: 2, row: 4 })
        );
        // A checkpoint ahead of the witness (a run that ended before witnessing) is fine.
        let mut ahead = checkpoints.clone();
        ahead.push(numbered(4, 3, &rows[5], &key));
        assert_eq!(verify(&rows, &ahead).unwrap().checkpoints, 4);
        // Another checkpoint signed under the witnessed number is not the witnessed one.
        let mut other = checkpoints.clone();
        other[2] = numbered(9, 2, &rows[2], &key);
        assert_eq!(
            verify(&rows, &other),
            Err(Broken::WitnessDisagrees { seq: 2 })
        );
    }

    #[test]
    fn checkpoints_that_do_not_verify_are_skipped_only_when_a_witness_decides() {
        let key = signing_key();
        let verifying = *key.verifying_key();
        let rows = chain(4, 2);
        let witnessed = numbered(0, 1, &rows[1], &key);
        let mut checkpoints = vec![numbered(1, 1, &rows[1], &key)];
        checkpoints.push(planted(2, Some(2), &rows[3], "compliance"));
        checkpoints.push(planted(3, None, &rows[2], "keyadmin"));
        assert_eq!(
            verify_against(&rows, &checkpoints, Some(&verifying), None),
            Err(Broken::ForgedCheckpoint(2)),
            "without a witness a planted row still fails verification"
        );
        let intact =
            verify_witnessed(&rows, &checkpoints, &verifying, Some(&witnessed), None).unwrap();
        assert_eq!(intact.checkpoints, 1);
        assert_eq!(
            intact.skipped,
            [
                Skipped::Checkpoint {
                    id: 2,
                    created_by: "compliance".into()
                },
                Skipped::Checkpoint {
                    id: 3,
                    created_by: "keyadmin".into()
                }
            ]
        );
        assert!(
            intact.skipped[0].to_string().starts_with(
                "checkpoint row 2 (inserted by compliance) does not verify under the audit signing key"
            ),
            "{}",
            intact.skipped[0]
        );
        // A planted row cannot stand in for the witnessed checkpoint it copies.
        let mut copy = planted(4, Some(1), &rows[1], "compliance");
        copy.signed_at = witnessed.signed_at;
        assert_eq!(
            verify_witnessed(&rows, &[copy], &verifying, Some(&witnessed), None),
            Err(Broken::CheckpointsRemoved {
                newest: 0,
                witnessed: 1
            })
        );
    }

    /// Recomputes every hash from `from` on, as an owner rewriting history would.
    fn rehash_from(rows: &mut [Row], from: usize) {
        for i in from..rows.len() {
            if i > 0 {
                rows[i].prev_hash = rows[i - 1].hash.clone();
            }
            rows[i].hash = rows[i].expected_hash().to_vec();
        }
    }

    #[test]
    fn an_intact_chain_verifies_and_reports_its_head() {
        for format in [1, 2] {
            let rows = chain(3, format);
            let intact = verify_rows(&rows).unwrap();
            assert_eq!(intact.rows, 3);
            assert_eq!(intact.head.to_vec(), rows[2].hash);
        }
        assert_eq!(verify_rows(&[]).unwrap().head, GENESIS);
    }

    #[test]
    fn a_chain_may_change_format_midway() {
        let mut rows = chain(2, 1);
        rows.extend(chain(2, 2).into_iter().map(|mut row| {
            row.id += 2;
            row
        }));
        rehash_from(&mut rows, 2);
        assert_eq!(verify_rows(&rows).unwrap().rows, 4);
    }

    #[test]
    fn an_edited_row_is_named() {
        let mut rows = chain(3, 2);
        rows[1].values_revealed = 0;
        assert_eq!(verify_rows(&rows), Err(Broken::Edited(2)));
        let mut rows = chain(3, 2);
        rows[1].login_ids = Some(vec![]);
        assert_eq!(verify_rows(&rows), Err(Broken::Edited(2)));
    }

    #[test]
    fn a_deleted_row_is_named_by_its_successor() {
        let mut rows = chain(3, 2);
        rows.remove(1);
        assert_eq!(verify_rows(&rows), Err(Broken::Unlinked(3)));
    }

    #[test]
    fn rows_out_of_order_are_caught() {
        let mut rows = chain(3, 2);
        rows.swap(1, 2);
        assert_eq!(verify_rows(&rows), Err(Broken::Unlinked(3)));
    }

    #[test]
    fn hash_parts_are_unambiguous() {
        let rows = chain(1, 2);
        let (mut a, mut b) = (rows[0].clone(), rows[0].clone());
        (a.actor, a.db_user) = ("ab".into(), "c".into());
        (b.actor, b.db_user) = ("a".into(), "bc".into());
        assert_ne!(a.expected_hash(), b.expected_hash());
        (a.login_ids, b.login_ids) = (Some(vec![1]), Some(vec![]));
        (a.key_ids, b.key_ids) = (Some(vec![]), Some(vec![1]));
        assert_ne!(a.expected_hash(), b.expected_hash());
    }

    #[test]
    fn a_rewrite_with_recomputed_hashes_is_caught_by_the_checkpoint_after_it() {
        let key = signing_key();
        let mut rows = chain(6, 2);
        let checkpoints = [checkpoint(1, &rows[1], &key), checkpoint(2, &rows[4], &key)];
        let verifying = *key.verifying_key();
        let intact = verify_against(&rows, &checkpoints, Some(&verifying), None).unwrap();
        assert_eq!((intact.rows, intact.checkpoints), (6, 2));

        rows[2].reason = "nothing to see".into();
        rehash_from(&mut rows, 2);
        assert!(verify_rows(&rows).is_ok(), "the chain alone cannot tell");
        assert_eq!(
            verify_against(&rows, &checkpoints, Some(&verifying), None),
            Err(Broken::Rewritten {
                checkpoint: 2,
                after: 2,
                upto: 5
            })
        );
    }

    #[test]
    fn truncation_forgery_and_a_lost_head_are_caught() {
        let key = signing_key();
        let verifying = *key.verifying_key();
        let rows = chain(5, 2);
        let checkpoints = [checkpoint(1, &rows[3], &key)];
        assert_eq!(
            verify_against(&rows[..3], &checkpoints, Some(&verifying), None),
            Err(Broken::Truncated {
                checkpoint: 1,
                row: 4
            })
        );
        let other = SigningKey::from_slice(&[9u8; 32]).unwrap();
        let forged = [checkpoint(1, &rows[3], &other)];
        assert_eq!(
            verify_against(&rows, &forged, Some(&verifying), None),
            Err(Broken::ForgedCheckpoint(1))
        );
        assert_eq!(
            verify_against(&rows, &checkpoints, None, None),
            Err(Broken::ForgedCheckpoint(1)),
            "without the public key a checkpoint proves nothing"
        );
        let head = rows[4].hash.clone();
        assert!(verify_against(&rows, &[], None, Some(&head)).is_ok());
        assert_eq!(
            verify_against(&rows[..4], &[], None, Some(&head)),
            Err(Broken::ExpectedHeadMissing)
        );
    }

    /// A row as the vectors and fixtures write it (times as microseconds since the epoch).
    fn row_from(vector: &serde_json::Value) -> Row {
        let ids = |field: &str| {
            vector[field]
                .as_array()
                .map(|ids| ids.iter().map(|id| id.as_i64().unwrap()).collect())
        };
        Row {
            id: int(vector, "id"),
            format: int(vector, "format") as i16,
            at: at_micros(int(vector, "at_micros")),
            actor: text(vector, "actor").into(),
            db_user: text(vector, "db_user").into(),
            purpose: vector["purpose"].as_str().map(str::to_owned),
            reason: text(vector, "reason").into(),
            question: text(vector, "question").into(),
            values_revealed: i32::try_from(int(vector, "values_revealed")).unwrap(),
            outcome: text(vector, "outcome").into(),
            login_ids: ids("login_ids"),
            key_ids: ids("key_ids"),
            prev_hash: bytes(vector, "prev_hash"),
            hash: bytes(vector, "hash"),
        }
    }

    fn at_micros(micros: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).unwrap()
    }

    fn micros_of(at: OffsetDateTime) -> i64 {
        i64::try_from(at.unix_timestamp_nanos() / 1_000).unwrap()
    }

    /// docs/FORMAT.md §7, against `tests/data/vectors/audit.json` (made by
    /// `scripts/format-vectors.py`): each row's hash in its format (1 and 2, one chain), the
    /// checkpoint's signed message, and its signature through [`verify_against`] with the
    /// public key read as KMS hands it out (SubjectPublicKeyInfo DER).
    #[test]
    fn audit_rows_and_checkpoint_match_the_format_vectors() {
        let vectors = testing::vectors("audit.json");
        assert_eq!(bytes(&vectors, "genesis"), GENESIS);
        let rows: Vec<Row> = vectors["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(row_from)
            .collect();
        for row in &rows {
            assert_eq!(hex(&row.expected_hash()), hex(&row.hash), "row {}", row.id);
        }
        assert_eq!(
            rows.iter().map(|row| row.format).collect::<Vec<_>>(),
            [1, 1, 2, 2, 2]
        );
        let intact = verify_rows(&rows).unwrap();

        let c = &vectors["checkpoint"];
        assert_eq!(intact.head.to_vec(), bytes(c, "head_hash"));
        assert_eq!(intact.last_id, int(c, "last_audit_id"));
        let signed_at = at_micros(int(c, "signed_at_micros"));
        let message = checkpoint_message(intact.last_id, &intact.head, signed_at);
        assert_eq!(hex(&message), text(c, "message"));

        let public = VerifyingKey::from_public_key_der(&bytes(c, "public_key_spki_der")).unwrap();
        let private = SigningKey::from_slice(&bytes(c, "private_key")).unwrap();
        assert_eq!(*private.verifying_key(), public);
        let checkpoint = Checkpoint {
            id: 1,
            seq: None,
            last_audit_id: intact.last_id,
            head_hash: intact.head.to_vec(),
            signed_at,
            kms_key_id: String::new(),
            signature: bytes(c, "signature_der"),
            created_by: String::new(),
        };
        let verified = verify_against(&rows, &[checkpoint], Some(&public), None).unwrap();
        assert_eq!((verified.rows, verified.checkpoints), (5, 1));
        // Both sides sign deterministically (RFC 6979), so even the signature is the same.
        let signature: p256::ecdsa::Signature = private.sign(&message);
        assert_eq!(hex(signature.to_der().as_bytes()), text(c, "signature_der"));

        // The witnessed checkpoint (format 2): its message, signature and witness object.
        let w = &vectors["witnessed_checkpoint"];
        let witnessed = Checkpoint {
            id: 2,
            seq: Some(int(w, "seq")),
            last_audit_id: int(w, "last_audit_id"),
            head_hash: bytes(w, "head_hash"),
            signed_at: at_micros(int(w, "signed_at_micros")),
            kms_key_id: text(w, "kms_key_id").into(),
            signature: bytes(w, "signature_der"),
            created_by: String::new(),
        };
        assert_eq!(hex(&witnessed.message()), text(w, "message"));
        let signature: p256::ecdsa::Signature = private.sign(&witnessed.message());
        assert_eq!(hex(signature.to_der().as_bytes()), text(w, "signature_der"));
        assert_eq!(
            witness::object_key(witnessed.seq.unwrap()),
            text(w, "object_key")
        );
        assert_eq!(
            String::from_utf8(witness::to_object(&witnessed)).unwrap(),
            text(w, "object")
        );
        let from_witness = witness::from_object(text(w, "object").as_bytes()).unwrap();
        assert!(from_witness.states_the_same_as(&witnessed));
        assert_eq!(from_witness.kms_key_id, witnessed.kms_key_id);
        assert!(from_witness.verifies(Some(&public)));
        // Alone in the table, it lacks the 2^32 + 6 checkpoints numbered before it.
        assert_eq!(
            verify_witnessed(&rows, &[witnessed], &public, Some(&from_witness), None),
            Err(Broken::CheckpointMissing { seq: 1 })
        );
    }

    const FIXTURE_AUDIT: &str = "fixture-audit-0.1.0.json";

    /// An audit chain written by pii-vault 0.1.0 (rows by `audit_append` in PostgreSQL, a
    /// checkpoint signed over `checkpoint_message`) keeps verifying.
    #[test]
    fn audit_chain_written_by_0_1_0_still_verifies() {
        let fixture = testing::vectors(FIXTURE_AUDIT);
        let rows: Vec<Row> = fixture["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(row_from)
            .collect();
        assert!(rows.iter().all(|row| row.format == 2));
        assert!(
            rows.iter()
                .any(|row| row.login_ids.as_ref().is_some_and(|ids| !ids.is_empty()))
        );
        let checkpoints: Vec<Checkpoint> = fixture["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Checkpoint {
                id: int(c, "id"),
                seq: None,
                last_audit_id: int(c, "last_audit_id"),
                head_hash: bytes(c, "head_hash"),
                signed_at: at_micros(int(c, "signed_at_micros")),
                kms_key_id: String::new(),
                signature: bytes(c, "signature_der"),
                created_by: String::new(),
            })
            .collect();
        let public =
            VerifyingKey::from_public_key_der(&bytes(&fixture, "public_key_spki_der")).unwrap();
        let head = rows.last().unwrap().hash.clone();
        let intact = verify_against(&rows, &checkpoints, Some(&public), Some(&head)).unwrap();
        assert_eq!((intact.rows, intact.checkpoints), (3, 1));
    }

    /// Writes the fixture above, once, from a scratch database on the PostgreSQL server at
    /// `DATABASE_URL`: three rows appended by `audit_append` (the function the doors call),
    /// read back as `verify-audit` reads them, and a checkpoint signed over them. Also holds
    /// `audit_hash_v2` to the spec's format-2 vectors. Refuses to overwrite the fixture.
    #[tokio::test]
    #[ignore = "needs PostgreSQL; writes tests/data/vectors/fixture-audit-*.json once"]
    async fn write_fixture_audit_chain() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/vectors")
            .join(FIXTURE_AUDIT);
        assert!(
            !path.exists(),
            "{} exists: it is never rewritten",
            path.display()
        );
        let db = crate::testing::Scratch::new().await;
        let pool = db.pool.clone();

        let vectors = testing::vectors("audit.json");
        for vector in vectors["rows"].as_array().unwrap() {
            let row = row_from(vector);
            if row.format != 2 {
                continue;
            }
            let sql: Vec<u8> = sqlx::query_scalar(
                "SELECT audit_hash_v2($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(&row.prev_hash)
            .bind(row.at)
            .bind(&row.actor)
            .bind(&row.db_user)
            .bind(&row.purpose)
            .bind(&row.reason)
            .bind(&row.question)
            .bind(row.values_revealed)
            .bind(&row.outcome)
            .bind(&row.login_ids)
            .bind(&row.key_ids)
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!(
                hex(&sql),
                hex(&row.hash),
                "audit_hash_v2 of vector row {}",
                row.id
            );
        }

        // (actor, purpose, reason, question, values revealed, outcome, login ids, key ids)
        type Append<'a> = (
            &'a str,
            &'a str,
            &'a str,
            &'a str,
            i32,
            &'a str,
            &'a [i64],
            &'a [i64],
        );
        let appends: [Append<'static>; 3] = [
            (
                "Zo\u{eb} \u{c5}ngstr\u{f6}m",
                "fraud-investigation",
                "case 4711",
                "user_id = \u{fc}ser-42 \u{1f600}",
                0,
                "handed-out",
                &[1, 2, 4_294_967_298],
                &[1, 2],
            ),
            (
                "Zo\u{eb} \u{c5}ngstr\u{f6}m",
                "fraud-investigation",
                "case 4711",
                "outcome of audit row 1",
                6,
                "revealed",
                &[1, 2, 4_294_967_298],
                &[1, 2],
            ),
            ("", "", "", "user_id = u-1", 0, "refused-purpose", &[], &[]),
        ];
        for (actor, purpose, reason, question, values, outcome, logins, keys) in appends {
            sqlx::query("SELECT audit_append($1, $2, $3, $4, $5, $6, $7, $8)")
                .bind(actor)
                .bind(purpose)
                .bind(reason)
                .bind(question)
                .bind(values)
                .bind(outcome)
                .bind(logins)
                .bind(keys)
                .execute(&pool)
                .await
                .unwrap();
        }
        let rows: Vec<Row> = sqlx::query_as(&format!("{SELECT_ROWS} ORDER BY id"))
            .fetch_all(&pool)
            .await
            .unwrap();
        let intact = verify_rows(&rows).unwrap();
        let signed_at: OffsetDateTime =
            sqlx::query_scalar("SELECT date_trunc('milliseconds', clock_timestamp())")
                .fetch_one(&pool)
                .await
                .unwrap();
        let key = SigningKey::from_slice(&[0x11; 32]).unwrap();
        let message = checkpoint_message(intact.last_id, &intact.head, signed_at);
        let signature: p256::ecdsa::Signature = key.sign(&message);
        // SubjectPublicKeyInfo of an ecPublicKey on prime256v1, as KMS GetPublicKey gives it.
        let public = [
            testing::unhex("3059301306072a8648ce3d020106082a8648ce3d030107034200"),
            key.verifying_key()
                .to_encoded_point(false)
                .as_bytes()
                .to_vec(),
        ]
        .concat();
        assert!(VerifyingKey::from_public_key_der(&public).is_ok());
        db.drop().await;

        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|row| {
                serde_json::json!({
                    "id": row.id,
                    "format": row.format,
                    "at_micros": micros_of(row.at),
                    "actor": row.actor,
                    "db_user": row.db_user,
                    "purpose": row.purpose,
                    "reason": row.reason,
                    "question": row.question,
                    "values_revealed": row.values_revealed,
                    "outcome": row.outcome,
                    "login_ids": row.login_ids,
                    "key_ids": row.key_ids,
                    "prev_hash": hex(&row.prev_hash),
                    "hash": hex(&row.hash),
                })
            })
            .collect();
        let fixture = serde_json::json!({
            "about": "an audit chain written by pii-vault 0.1.0: rows appended by audit_append (migration 0005) in PostgreSQL, a checkpoint signed over checkpoint_message; it must keep verifying",
            "spec": "docs/FORMAT.md, §7 Audit",
            "written_by": concat!("pii-vault ", env!("CARGO_PKG_VERSION"), ", audit::tests::write_fixture_audit_chain"),
            "public_key_spki_der": hex(&public),
            "rows": rows,
            "checkpoints": [{
                "id": 1,
                "last_audit_id": intact.last_id,
                "head_hash": hex(&intact.head),
                "signed_at_micros": micros_of(signed_at),
                "signature_der": hex(signature.to_der().as_bytes()),
            }],
        });
        let text = serde_json::to_string_pretty(&fixture).unwrap() + "\n";
        std::fs::write(&path, text).unwrap();
    }
}
