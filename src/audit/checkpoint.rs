//! Checkpoints: `(seq, last id, head hash, time)` signed by a KMS asymmetric key, what their
//! signatures cover, and `audit-checkpoint`, which signs one and has the witness keep it.

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{MessageType, SigningAlgorithmSpec};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{DerSignature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use sqlx::PgPool;
use time::OffsetDateTime;

use super::{Skipped, VerifyError, length_prefixed, micros, read, verify_witnessed, witness};

const CHECKPOINT_FORMAT: &[u8] = b"pii-vault/audit-checkpoint/v1";
const CHECKPOINT_FORMAT_2: &[u8] = b"pii-vault/audit-checkpoint/v2";
/// Serializes `audit-checkpoint` runs (transaction-scoped advisory lock): "piiwitns".
const CHECKPOINT_LOCK: i64 = 0x7069_6977_6974_6e73;

/// A signed statement that the chain ended at `last_audit_id` with `head_hash`: a row of
/// `audit_checkpoints`, or an object of the [`witness`] (whose `id` is 0).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Checkpoint {
    pub id: i64,
    /// The witnessed checkpoint's number, signed with it (format 2); `None` for checkpoints
    /// signed before witnessing (format 1).
    pub seq: Option<i64>,
    pub last_audit_id: i64,
    pub head_hash: Vec<u8>,
    pub signed_at: OffsetDateTime,
    /// The KMS key that signed it, as KMS named it.
    pub kms_key_id: String,
    pub signature: Vec<u8>,
    /// The database user who inserted the row (named when it does not verify).
    pub created_by: String,
}

impl Checkpoint {
    /// The bytes its signature covers, in its format.
    pub fn message(&self) -> Vec<u8> {
        match self.seq {
            None => checkpoint_message(self.last_audit_id, &self.head_hash, self.signed_at),
            Some(seq) => {
                checkpoint_message_v2(seq, self.last_audit_id, &self.head_hash, self.signed_at)
            }
        }
    }

    /// Whether `signer` signed it (never, without a key).
    pub fn verifies(&self, signer: Option<&VerifyingKey>) -> bool {
        signer.is_some_and(|key| {
            DerSignature::from_bytes(&self.signature)
                .is_ok_and(|signature| key.verify(&self.message(), &signature).is_ok())
        })
    }

    /// Whether `other` states the same signed content (wherever each is stored).
    pub fn states_the_same_as(&self, other: &Checkpoint) -> bool {
        (
            self.seq,
            self.last_audit_id,
            &self.head_hash,
            self.signed_at,
        ) == (
            other.seq,
            other.last_audit_id,
            &other.head_hash,
            other.signed_at,
        )
    }
}

/// The bytes a format-1 checkpoint's signature covers.
pub fn checkpoint_message(
    last_audit_id: i64,
    head_hash: &[u8],
    signed_at: OffsetDateTime,
) -> Vec<u8> {
    length_prefixed(&[
        CHECKPOINT_FORMAT,
        &last_audit_id.to_be_bytes(),
        head_hash,
        &micros(signed_at),
    ])
}

/// The bytes a format-2 (witnessed, numbered) checkpoint's signature covers.
pub fn checkpoint_message_v2(
    seq: i64,
    last_audit_id: i64,
    head_hash: &[u8],
    signed_at: OffsetDateTime,
) -> Vec<u8> {
    length_prefixed(&[
        CHECKPOINT_FORMAT_2,
        &seq.to_be_bytes(),
        &last_audit_id.to_be_bytes(),
        head_hash,
        &micros(signed_at),
    ])
}

/// What `audit-checkpoint` did.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The new checkpoint, or `None` when the audit is empty.
    pub checkpoint: Option<Checkpoint>,
    /// Numbers of checkpoints an earlier run stored but did not witness, witnessed now.
    pub completed: Vec<i64>,
    /// Checkpoint rows and witness objects that did not verify and were skipped.
    pub skipped: Vec<Skipped>,
}

/// The KMS asymmetric key that signs checkpoints.
#[derive(Debug, Clone)]
pub struct CheckpointKey {
    pub client: aws_sdk_kms::Client,
    /// Key id, ARN or alias (`alias/pii-vault-audit-signer`).
    pub key_id: String,
}

impl CheckpointKey {
    /// The public key, fetched once from KMS (GetPublicKey) and used locally.
    pub async fn verifying_key(&self) -> Result<VerifyingKey, VerifyError> {
        let output = self
            .client
            .get_public_key()
            .key_id(&self.key_id)
            .send()
            .await
            .map_err(|e| VerifyError::SigningKey(crate::aws_error::one_line(&e)))?;
        let der = output
            .public_key
            .ok_or_else(|| VerifyError::SigningKey("KMS returned no public key".into()))?;
        VerifyingKey::from_public_key_der(der.as_ref())
            .map_err(|_| VerifyError::SigningKey("not an ECC_NIST_P256 public key".into()))
    }

    /// Verifies the chain against the witness, then signs its head with the next number (KMS
    /// Sign), stores the checkpoint, and only then writes it to the witness.
    ///
    /// Database first: a run that ends between the two leaves a signed checkpoint the
    /// witness lacks, which verifies (a number ahead of the witness is what a crash leaves,
    /// and only the signer can sign one), and the next run witnesses it before signing
    /// anew. Witness first would leave the witness ahead of the database, which is exactly
    /// what a removed checkpoint looks like: a false alarm until repaired. Runs are
    /// serialized by an advisory lock, so two signers never take one number.
    pub async fn checkpoint(
        &self,
        pool: &PgPool,
        witness: &witness::WitnessBucket,
    ) -> Result<Signed, VerifyError> {
        let key = self.verifying_key().await?;
        let newest = witness.newest(&key).await?;
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CHECKPOINT_LOCK)
            .execute(&mut *tx)
            .await?;
        let (rows, checkpoints) = read(&mut tx).await?;
        // Only a chain that verifies is signed; rows appended meanwhile wait for the next one.
        let mut intact =
            verify_witnessed(&rows, &checkpoints, &key, newest.checkpoint.as_ref(), None)?;
        intact.skipped.extend(newest.skipped);
        let mut signed = Signed {
            checkpoint: None,
            completed: Vec::new(),
            skipped: intact.skipped,
        };
        let witnessed = intact.witnessed.and_then(|c| c.seq).unwrap_or(0);
        let mut pending: Vec<&Checkpoint> = checkpoints
            .iter()
            .filter(|c| c.seq.is_some_and(|seq| seq > witnessed) && c.verifies(Some(&key)))
            .collect();
        pending.sort_by_key(|c| (c.seq, c.id));
        pending.dedup_by_key(|c| c.seq);
        for checkpoint in pending {
            witness.put(checkpoint).await?;
            signed.completed.extend(checkpoint.seq);
        }
        if intact.rows == 0 {
            tx.commit().await?;
            return Ok(signed);
        }
        let seq = checkpoints
            .iter()
            .filter(|c| c.verifies(Some(&key)))
            .filter_map(|c| c.seq)
            .max()
            .unwrap_or(0)
            .max(witnessed)
            + 1;
        let (last_id, head) = (intact.last_id, intact.head.to_vec());
        let signed_at: OffsetDateTime =
            sqlx::query_scalar("SELECT date_trunc('milliseconds', clock_timestamp())")
                .fetch_one(&mut *tx)
                .await?;
        let message = checkpoint_message_v2(seq, last_id, &head, signed_at);
        let signature = self
            .client
            .sign()
            .key_id(&self.key_id)
            .message(Blob::new(message))
            .message_type(MessageType::Raw)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
            .await
            .map_err(|e| VerifyError::SigningKey(crate::aws_error::one_line(&e)))?;
        let kms_key_id = signature.key_id.unwrap_or_else(|| self.key_id.clone());
        let signature = signature
            .signature
            .ok_or_else(|| VerifyError::SigningKey("KMS returned no signature".into()))?
            .into_inner();
        let (id, created_by): (i64, String) = sqlx::query_as(
            "INSERT INTO audit_checkpoints (seq, last_audit_id, head_hash, signed_at, kms_key_id, signature)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, created_by",
        )
        .bind(seq)
        .bind(last_id)
        .bind(&head)
        .bind(signed_at)
        .bind(&kms_key_id)
        .bind(&signature)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let checkpoint = Checkpoint {
            id,
            seq: Some(seq),
            last_audit_id: last_id,
            head_hash: head,
            signed_at,
            kms_key_id,
            signature,
            created_by,
        };
        witness
            .put(&checkpoint)
            .await
            .map_err(|error| VerifyError::NotWitnessed { seq, error })?;
        signed.checkpoint = Some(checkpoint);
        Ok(signed)
    }
}
