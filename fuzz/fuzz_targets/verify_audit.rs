//! `audit::verify_rows` / `verify_against` / `verify_witnessed` on arbitrary rows, checkpoints
//! (numbered or not) and a witnessed checkpoint: never panics; a chain built by the rules
//! verifies, and one whose content changed after hashing does not.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::{DerSignature, SigningKey, VerifyingKey, signature::Signer};
use pii_vault::audit::{self, Broken, Checkpoint, GENESIS, Row};
use time::OffsetDateTime;

#[derive(Arbitrary, Debug)]
struct ArbRow {
    id_step: u8,
    format: i16,
    at_micros: i64,
    actor: String,
    db_user: String,
    purpose: Option<String>,
    reason: String,
    question: String,
    values_revealed: i32,
    outcome: String,
    login_ids: Option<Vec<i64>>,
    key_ids: Option<Vec<i64>>,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct ArbCheckpoint {
    id: i64,
    seq: Option<i64>,
    last_audit_id: i64,
    head_hash: Vec<u8>,
    signed_at_micros: i64,
    signature: Vec<u8>,
    sign_it: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    rows: Vec<ArbRow>,
    checkpoints: Vec<ArbCheckpoint>,
    /// Link and hash the rows by the rules before checking (else take them as given).
    chain: bool,
    tamper: Option<(u8, u8)>,
    expect_head: Option<Vec<u8>>,
    with_key: bool,
    /// Which checkpoint (by position) the witness holds, if any.
    witnessed: Option<u8>,
}

fn at(micros: i64) -> OffsetDateTime {
    // Within what PostgreSQL's timestamptz can hold, as the stored rows are.
    let micros = micros.rem_euclid(400 * 365 * 86_400 * 1_000_000) - 100 * 365 * 86_400 * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).unwrap()
}

fuzz_target!(|input: Input| {
    let key = SigningKey::from_slice(&[0x11; 32]).unwrap();
    let verifying = VerifyingKey::from(&key);
    let mut id = 0i64;
    let mut rows: Vec<Row> = input
        .rows
        .into_iter()
        .take(64)
        .map(|r| {
            id += i64::from(r.id_step) + 1;
            Row {
                id,
                format: r.format,
                at: at(r.at_micros),
                actor: r.actor,
                db_user: r.db_user,
                purpose: r.purpose,
                reason: r.reason,
                question: r.question,
                values_revealed: r.values_revealed,
                outcome: r.outcome,
                login_ids: r.login_ids,
                key_ids: r.key_ids,
                prev_hash: r.prev_hash,
                hash: r.hash,
            }
        })
        .collect();
    if input.chain {
        let mut head = GENESIS.to_vec();
        for row in &mut rows {
            row.prev_hash = head;
            row.hash = row.expected_hash().to_vec();
            head = row.hash.clone();
        }
        let intact = audit::verify_rows(&rows).expect("a chain built by the rules verifies");
        assert_eq!(intact.rows, rows.len() as u64);
        if let Some((which, byte)) = input.tamper {
            if !rows.is_empty() {
                let at = usize::from(which) % rows.len();
                let before = rows[at].expected_hash();
                rows[at].reason.push(char::from(byte));
                assert_ne!(rows[at].expected_hash(), before);
                assert_eq!(audit::verify_rows(&rows), Err(Broken::Edited(rows[at].id)));
            }
        }
    }
    let _ = audit::verify_rows(&rows);
    let checkpoints: Vec<Checkpoint> = input
        .checkpoints
        .into_iter()
        .take(8)
        .map(|c| {
            let signed_at = at(c.signed_at_micros);
            let mut checkpoint = Checkpoint {
                id: c.id,
                seq: c.seq,
                last_audit_id: c.last_audit_id,
                head_hash: c.head_hash,
                signed_at,
                kms_key_id: String::new(),
                signature: c.signature,
                created_by: String::new(),
            };
            if c.sign_it {
                let signature: DerSignature = key.sign(&checkpoint.message());
                checkpoint.signature = signature.as_bytes().to_vec();
            }
            checkpoint
        })
        .collect();
    let signer = input.with_key.then_some(&verifying);
    let _ = audit::verify_against(&rows, &checkpoints, signer, input.expect_head.as_deref());
    let witnessed = input
        .witnessed
        .and_then(|at| checkpoints.get(usize::from(at)))
        .filter(|c| c.seq.is_some());
    let _ = audit::verify_witnessed(
        &rows,
        &checkpoints,
        &verifying,
        witnessed,
        input.expect_head.as_deref(),
    );
});
