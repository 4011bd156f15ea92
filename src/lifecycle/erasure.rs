//! A user's erasure, and what keeps it erased: the erasure itself through the key admin's
//! door (`vault_erase_user`), its record carried to each new token key, and its witness outside
//! the database, from which a restored database is made to forget again.
//!
//! An erasure record holds, per token key an ingester may tokenize with (active or retiring),
//! the token of the user id and the id sealed under that key (bound to the token). A token-key
//! rotation opens each record under the retiring key and writes it again under the new one
//! ([`carry_erasures`]), so no record names a key that is destroyed later. The witness store
//! (the audit's Object Lock bucket, under `erasures/`) keeps one object per erasure: its time
//! and the id sealed under a KMS-wrapped key of its own; never the id in clear.

use std::collections::BTreeSet;

use sqlx::PgPool;
use time::OffsetDateTime;

use super::LifecycleError;
use crate::audit::witness::WitnessBucket;
use crate::vault::KeyId;
use crate::vault::erasure::WitnessedErasure;
use crate::vault::key_cache::KeyCache;
use crate::vault::key_table;
use crate::vault::keyring::{Keyring, KeyringError};
use crate::vault::kms::KeyWrapper;
use crate::vault::token::Tokenizer;

/// Where the witness store keeps erasures.
const WITNESS_PREFIX: &str = "erasures/";

/// An erasure request, as `rotate-keys erase` takes it.
#[derive(Debug, Clone, Copy)]
pub struct Erasure<'a> {
    pub user_id: &'a str,
    /// Why: recorded in the audit.
    pub reason: &'a str,
    /// Who asks: recorded in the audit.
    pub actor: &'a str,
    /// Keep the user's tokens (a legal hold that needs the rows linkable).
    pub keep_tokens: bool,
    /// Record the erasure even if nothing stored names the user yet (messages in flight).
    pub in_flight: bool,
    /// Only count what would go.
    pub dry_run: bool,
}

impl<'a> Erasure<'a> {
    /// An erasure of a user whose data is stored, tokens dropped.
    pub fn of(user_id: &'a str, reason: &'a str, actor: &'a str) -> Self {
        Self {
            user_id,
            reason,
            actor,
            keep_tokens: false,
            in_flight: false,
            dry_run: false,
        }
    }
}

/// What an erasure removed (or, in a dry run, would remove).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    /// Logins whose sealed values were deleted.
    pub logins: u64,
    /// Logins whose tokens were set to NULL (0 with `keep_tokens`).
    pub tokens: u64,
    /// Quarantined messages deleted because their body names the user.
    pub quarantined: u64,
    pub erased_at: OffsetDateTime,
}

/// Erasure: removes a user's sealed values, tokens (unless `keep_tokens`) and the quarantined
/// messages that name them, keeping the analytic rows; records the erasure so that messages
/// sent before it cannot bring the values back; audits it; all in one transaction. Then
/// witnesses it in `witness` (a dry run changes nothing and witnesses nothing).
///
/// Refuses ([`LifecycleError::NoSuchUser`]) a user id that nothing stored names, unless
/// `in_flight`.
pub async fn erase<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    erasure: &Erasure<'_>,
    witness: Option<&WitnessBucket>,
) -> Result<Erased, LifecycleError> {
    let tokenizers = tokenizing_keys(pool, keyring).await?;
    let erased = erase_at(pool, &tokenizers, erasure, None).await?;
    if let (false, Some(bucket)) = (erasure.dry_run, witness) {
        let witnessed = WitnessedErasure::seal(
            keyring.wrapper(),
            keyring.kms_key_id(),
            erasure.user_id,
            erased.erased_at,
            erasure.keep_tokens,
        )
        .await
        .map_err(|e| LifecycleError::NotWitnessed(e.to_string()))?;
        bucket
            .put_locked(&witnessed.name(), witnessed.to_json())
            .await
            .map_err(|e| LifecycleError::NotWitnessed(e.to_string()))?;
    }
    Ok(erased)
}

/// The erasure door, at `erased_at` (`None`: now), recorded under each of `tokenizers`.
async fn erase_at(
    pool: &PgPool,
    tokenizers: &[Tokenizer],
    erasure: &Erasure<'_>,
    erased_at: Option<OffsetDateTime>,
) -> Result<Erased, LifecycleError> {
    let (mut keys, mut tokens, mut sealed) = (Vec::new(), Vec::new(), Vec::new());
    for tokenizer in tokenizers {
        let (token, sealed_id) = tokenizer.erased_user(erasure.user_id);
        keys.push(tokenizer.key_id());
        tokens.push(token.to_string());
        sealed.push(sealed_id);
    }
    let row: Result<(i64, i64, i64, OffsetDateTime), sqlx::Error> = sqlx::query_as(
        "SELECT logins, tokens, quarantined, erased_at
         FROM vault_erase_user($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(erasure.user_id)
    .bind(erasure.reason)
    .bind(erasure.actor)
    .bind(erasure.keep_tokens)
    .bind(&keys)
    .bind(&tokens)
    .bind(&sealed)
    .bind(erasure.in_flight)
    .bind(erasure.dry_run)
    .bind(erased_at)
    .fetch_one(pool)
    .await;
    let (logins, nulled, quarantined, erased_at) = match row {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(NO_DATA_FOUND) => {
            return Err(LifecycleError::NoSuchUser);
        }
        row => row?,
    };
    Ok(Erased {
        logins: logins as u64,
        tokens: nulled as u64,
        quarantined: quarantined as u64,
        erased_at,
    })
}

/// SQLSTATE of the erasure door's refusal of a user id that names nothing.
const NO_DATA_FOUND: &str = "P0002";

/// The token keys an ingester may tokenize with (active, or retiring during a rotation): an
/// erasure is recorded under each.
async fn tokenizing_keys<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
) -> Result<Vec<Tokenizer>, LifecycleError> {
    let ids = key_table::tokenizing(pool).await?;
    let mut tokenizers = Vec::with_capacity(ids.len());
    for id in ids {
        tokenizers.push(keyring.tokenizer(id).await?);
    }
    Ok(tokenizers)
}

/// The user id erasure record `record` seals under token key `key`, checked against its token;
/// each token key unwrapped once.
async fn open_record<W: KeyWrapper>(
    keys: &mut KeyCache,
    keyring: &Keyring<W>,
    (record, key, token, sealed): (i64, KeyId, &str, &[u8]),
) -> Result<String, LifecycleError> {
    keys.tokenizer(keyring, key, None)
        .await?
        .open_erased_user(token, sealed)
        .map_err(|_| LifecycleError::ErasureRecord { id: record })
}

/// Erasure records carried per call of the door.
const CARRY_BATCH: i64 = 1_000;

/// Carries the erasure records under the `retiring` token keys to `target` (part of a token-key
/// rotation): each is opened, and written again under the new key through the key admin's door,
/// which drops the old one. Records made before migration 0014 keep no sealed id: they stay,
/// and keep their key from being destroyed. Returns the records carried.
pub(super) async fn carry_erasures<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    retiring: &[i64],
    target: &Tokenizer,
) -> Result<u64, LifecycleError> {
    let mut keys = KeyCache::default();
    let mut carried = 0;
    loop {
        let records: Vec<(i64, KeyId, String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, token_key_id, user_token, sealed_user_id FROM erasures
             WHERE token_key_id = ANY ($1) AND sealed_user_id IS NOT NULL ORDER BY id LIMIT $2",
        )
        .bind(retiring)
        .bind(CARRY_BATCH)
        .fetch_all(pool)
        .await?;
        if records.is_empty() {
            return Ok(carried);
        }
        let (mut ids, mut tokens, mut sealed) = (Vec::new(), Vec::new(), Vec::new());
        for (id, key, token, sealed_id) in &records {
            let user_id = open_record(&mut keys, keyring, (*id, *key, token, sealed_id)).await?;
            let (new_token, new_sealed) = target.erased_user(&user_id);
            ids.push(*id);
            tokens.push(new_token.to_string());
            sealed.push(new_sealed);
        }
        let n: i64 = sqlx::query_scalar("SELECT vault_carry_erasures($1, $2, $3, $4)")
            .bind(target.key_id())
            .bind(&ids)
            .bind(&tokens)
            .bind(&sealed)
            .fetch_one(pool)
            .await?;
        carried += n as u64;
    }
}

/// What [`witness_erasures`] found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Witnessed {
    /// Erasures written to the witness store by this run.
    pub written: u64,
    /// Erasures the store had already.
    pub present: u64,
    /// Erasures made before migration 0014, whose records keep no sealed id to witness.
    pub without_sealed_id: u64,
}

/// One record of each erasure: (erased at, record id, token key, token, sealed id, tokens kept).
type ErasureRecord = (OffsetDateTime, i64, KeyId, String, Option<Vec<u8>>, bool);

/// Writes to the witness store every erasure of the database it does not hold yet (an erase
/// whose witness write failed, or erasures from before witnessing began).
pub async fn witness_erasures<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    bucket: &WitnessBucket,
) -> Result<Witnessed, LifecycleError> {
    let there = witnessed_names(bucket).await?;
    let erasures: Vec<ErasureRecord> = sqlx::query_as(
        "SELECT DISTINCT ON (erased_at)
                    erased_at, id, token_key_id, user_token, sealed_user_id, tokens_kept
             FROM erasures ORDER BY erased_at, sealed_user_id IS NULL, id",
    )
    .fetch_all(pool)
    .await?;
    let mut keys = KeyCache::default();
    let mut report = Witnessed::default();
    for (erased_at, id, key, token, sealed, tokens_kept) in erasures {
        let Some(sealed) = sealed else {
            report.without_sealed_id += 1;
            continue;
        };
        if there.contains(&WitnessedErasure::name_of(erased_at)) {
            report.present += 1;
            continue;
        }
        let user_id = open_record(&mut keys, keyring, (id, key, &token, &sealed)).await?;
        let witnessed = WitnessedErasure::seal(
            keyring.wrapper(),
            keyring.kms_key_id(),
            &user_id,
            erased_at,
            tokens_kept,
        )
        .await
        .map_err(KeyringError::WrappingKey)?;
        if bucket
            .put_locked(&witnessed.name(), witnessed.to_json())
            .await?
        {
            report.written += 1;
        } else {
            report.present += 1;
        }
    }
    Ok(report)
}

async fn witnessed_names(bucket: &WitnessBucket) -> Result<BTreeSet<String>, LifecycleError> {
    Ok(bucket
        .versions_under(WITNESS_PREFIX)
        .await?
        .into_iter()
        .map(|(key, _)| key)
        .collect())
}

/// What [`reapply_erasures`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reapplied {
    /// Witnessed erasures this database did not hold, applied again.
    pub reapplied: u64,
    /// Witnessed erasures it holds already.
    pub present: u64,
}

/// The restore procedure's step: applies again, at their original time, every erasure in the
/// witness store that this database does not hold (a database restored from a dump taken
/// before them), so that nobody erased since the dump opens again.
pub async fn reapply_erasures<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    bucket: &WitnessBucket,
    actor: &str,
) -> Result<Reapplied, LifecycleError> {
    let tokenizers = tokenizing_keys(pool, keyring).await?;
    let keys: Vec<KeyId> = tokenizers.iter().map(Tokenizer::key_id).collect();
    let mut report = Reapplied::default();
    for name in witnessed_names(bucket).await? {
        let bytes = bucket.get(&name).await?;
        let witnessed = WitnessedErasure::from_json(&bytes)
            .filter(|w| w.name() == name)
            .ok_or_else(|| LifecycleError::NotWitnessed(format!("{name} is not an erasure")))?;
        let user_id = witnessed
            .open(keyring.wrapper())
            .await
            .map_err(|e| LifecycleError::NotWitnessed(e.to_string()))?;
        let tokens: Vec<String> = tokenizers
            .iter()
            .map(|t| t.user_id(&user_id).to_string())
            .collect();
        let present: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM erasures e
                            JOIN unnest($1::bigint[], $2::text[]) AS t(key_id, token)
                              ON e.token_key_id = t.key_id AND e.user_token = t.token
                            WHERE e.erased_at >= $3)",
        )
        .bind(&keys)
        .bind(&tokens)
        .bind(witnessed.erased_at)
        .fetch_one(pool)
        .await?;
        if present {
            report.present += 1;
            continue;
        }
        let reason = format!("restore: re-applying the erasure witnessed as {name}");
        let erasure = Erasure {
            user_id: &user_id,
            reason: &reason,
            actor,
            keep_tokens: witnessed.tokens_kept,
            in_flight: true,
            dry_run: false,
        };
        erase_at(pool, &tokenizers, &erasure, Some(witnessed.erased_at)).await?;
        report.reapplied += 1;
    }
    Ok(report)
}
