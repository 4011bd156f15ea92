//! Audited recovery of original values, for a compliance officer.
//!
//! 1. Refuse at once unless the database user may read the vault and append to the audit.
//! 2. Fetch the matching logins with their sealed values.
//! 3. Unwrap each distinct data key and token key once (KMS `Decrypt`).
//! 4. Open every value at its place, then recompute its token and compare it in constant time
//!    with the stored one: AES-GCM-SIV is not key-committing, and the token is the commitment.
//!    Any failure stops everything and names the row; no value is returned.
//! 5. Append the audit row and commit it. Only then are the values handed back to be shown.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;

use sqlx::PgPool;
use time::Date;
use zeroize::Zeroizing;

use crate::audit::{self, Outcome};
use crate::ingest::batch::login_place;
use crate::vault::KeyId;
use crate::vault::keyring::{Keyring, KeyringError};
use crate::vault::kms::KeyWrapper;
use crate::vault::seal::Sealer;
use crate::vault::token::{Field, Tokenizer};

/// What the officer asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Question {
    /// Every login of a user.
    UserId(String),
    /// Every login whose ip has this token.
    MaskedIp(String),
    /// Every login whose device id has this token.
    MaskedDeviceId(String),
}

impl fmt::Display for Question {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Question::UserId(u) => write!(f, "user_id = {u}"),
            Question::MaskedIp(t) => write!(f, "masked_ip = {t}"),
            Question::MaskedDeviceId(t) => write!(f, "masked_device_id = {t}"),
        }
    }
}

/// One login with its original values.
#[derive(Clone)]
pub struct Revealed {
    pub login_id: i64,
    pub message_id: String,
    pub user_id: String,
    pub device_type: String,
    pub create_date: Date,
    pub masked_ip: Option<String>,
    pub masked_device_id: Option<String>,
    /// `None` once the user's sealed values were erased.
    pub ip: Option<Zeroizing<String>>,
    pub device_id: Option<Zeroizing<String>>,
}

impl fmt::Debug for Revealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revealed")
            .field("login_id", &self.login_id)
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnmaskError {
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    #[error(
        "integrity failure at login {login_id} (message {message_id}): {what}; nothing was revealed"
    )]
    Integrity {
        login_id: i64,
        message_id: String,
        what: String,
    },
    #[error("keys: {0}")]
    Keys(KeyringError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl UnmaskError {
    /// The exit code `unmask` ends with: 3 not authorized, 4 integrity failure, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            UnmaskError::NotAuthorized(_) => 3,
            UnmaskError::Integrity { .. } => 4,
            UnmaskError::Database(e) if is_permission_denied(e) => 3,
            _ => 1,
        }
    }
}

fn is_permission_denied(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("42501"))
}

/// Who asks, and why: both go into the audit.
#[derive(Debug, Clone)]
pub struct Request {
    pub question: Question,
    pub reason: String,
    pub actor: String,
}

#[derive(sqlx::FromRow)]
struct SealedLogin {
    id: i64,
    message_id: String,
    user_id: String,
    device_type: String,
    create_date: Date,
    masked_ip: Option<String>,
    masked_device_id: Option<String>,
    token_key_id: i64,
    data_key_id: Option<i64>,
    sealed_ip: Option<Vec<u8>>,
    sealed_device_id: Option<Vec<u8>>,
}

const SELECT_LOGINS: &str = "
SELECT l.id, l.message_id, l.user_id, l.device_type, l.create_date, l.masked_ip,
       l.masked_device_id, l.token_key_id, v.data_key_id, v.sealed_ip, v.sealed_device_id
FROM user_logins l LEFT JOIN login_vault v ON v.login_id = l.id";

/// Answers `request`, auditing it; see the module docs for the order of steps.
pub async fn unmask<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    request: &Request,
) -> Result<Vec<Revealed>, UnmaskError> {
    check_privileges(pool).await?;
    let (filter, value) = match &request.question {
        Question::UserId(v) => ("l.user_id", v),
        Question::MaskedIp(v) => ("l.masked_ip", v),
        Question::MaskedDeviceId(v) => ("l.masked_device_id", v),
    };
    let rows: Vec<SealedLogin> = sqlx::query_as(&format!(
        "{SELECT_LOGINS} WHERE {filter} = $1 ORDER BY l.create_date, l.id"
    ))
    .bind(value)
    .fetch_all(pool)
    .await?;
    let question = request.question.to_string();
    let audit = |outcome, values_revealed| audit::Entry {
        actor: &request.actor,
        reason: &request.reason,
        question: &question,
        values_revealed,
        outcome,
    };
    match open_all(keyring, &rows).await {
        Ok(revealed) => {
            let values = revealed
                .iter()
                .map(|r| i32::from(r.ip.is_some()) + i32::from(r.device_id.is_some()))
                .sum();
            let outcome = if values == 0 {
                Outcome::NothingFound
            } else {
                Outcome::Revealed
            };
            audit::append(pool, &audit(outcome, values)).await?;
            Ok(revealed)
        }
        Err(error) => {
            if matches!(error, UnmaskError::Integrity { .. }) {
                audit::append(pool, &audit(Outcome::IntegrityFailure, 0)).await?;
            }
            Err(error)
        }
    }
}

async fn check_privileges(pool: &PgPool) -> Result<(), UnmaskError> {
    // Membership, not just table privileges: the key admin can read the vault too (rotation
    // re-encrypts it), but revealing values is the compliance officer's duty alone.
    let (allowed, user): (bool, String) = sqlx::query_as(
        "SELECT pg_has_role(session_user, 'pii_vault_compliance', 'MEMBER')
            AND has_table_privilege('login_vault', 'SELECT')
            AND has_table_privilege('unmask_audit', 'INSERT'), session_user::text",
    )
    .fetch_one(pool)
    .await?;
    if allowed {
        Ok(())
    } else {
        Err(UnmaskError::NotAuthorized(format!(
            "database user {user} does not hold the pii_vault_compliance role"
        )))
    }
}

async fn open_all<W: KeyWrapper>(
    keyring: &Keyring<W>,
    rows: &[SealedLogin],
) -> Result<Vec<Revealed>, UnmaskError> {
    // One KMS call per distinct key, whatever the number of rows.
    let mut sealers: BTreeMap<i64, Sealer> = BTreeMap::new();
    let mut tokenizers: BTreeMap<i64, Tokenizer> = BTreeMap::new();
    for row in rows {
        if let Some(id) = row.data_key_id {
            if let Entry::Vacant(slot) = sealers.entry(id) {
                let sealer = keyring.sealer(KeyId(id)).await;
                slot.insert(sealer.map_err(|e| key_failure(row, e))?);
            }
        }
        if let Entry::Vacant(slot) = tokenizers.entry(row.token_key_id) {
            let tokenizer = keyring.tokenizer(KeyId(row.token_key_id)).await;
            slot.insert(tokenizer.map_err(|e| key_failure(row, e))?);
        }
    }
    rows.iter()
        .map(|row| {
            let tokenizer = &tokenizers[&row.token_key_id];
            let sealer = row.data_key_id.map(|id| &sealers[&id]);
            Ok(Revealed {
                login_id: row.id,
                message_id: row.message_id.clone(),
                user_id: row.user_id.clone(),
                device_type: row.device_type.clone(),
                create_date: row.create_date,
                masked_ip: row.masked_ip.clone(),
                masked_device_id: row.masked_device_id.clone(),
                ip: open_field(row, sealer, tokenizer, Field::Ip)?,
                device_id: open_field(row, sealer, tokenizer, Field::DeviceId)?,
            })
        })
        .collect()
}

fn integrity(row: &SealedLogin, what: impl Into<String>) -> UnmaskError {
    UnmaskError::Integrity {
        login_id: row.id,
        message_id: row.message_id.clone(),
        what: what.into(),
    }
}

/// A key that will not unwrap: KMS denying *us* is an authorization problem; anything else
/// (a corrupted or moved wrapped key, a wrong purpose, a destroyed key) is an integrity one.
fn key_failure(row: &SealedLogin, error: KeyringError) -> UnmaskError {
    match &error {
        KeyringError::Kms { source, .. } if source.is_access_denied() => {
            UnmaskError::NotAuthorized(error.to_string())
        }
        KeyringError::Kms { source, .. } if source.is_transient() => UnmaskError::Keys(error),
        KeyringError::Database(_) => UnmaskError::Keys(error),
        _ => integrity(row, error.to_string()),
    }
}

fn open_field(
    row: &SealedLogin,
    sealer: Option<&Sealer>,
    tokenizer: &Tokenizer,
    field: Field,
) -> Result<Option<Zeroizing<String>>, UnmaskError> {
    let (sealed, stored_token) = match field {
        Field::Ip => (&row.sealed_ip, &row.masked_ip),
        Field::DeviceId => (&row.sealed_device_id, &row.masked_device_id),
    };
    let (Some(sealer), Some(sealed)) = (sealer, sealed) else {
        return Ok(None); // erased
    };
    let sealed = SealedValue {
        field,
        message_id: &row.message_id,
        user_id: &row.user_id,
        sealed,
        stored_token: stored_token.as_deref(),
    };
    open_checked(&sealed, sealer, tokenizer)
        .map(Some)
        .map_err(|what| integrity(row, what))
}

/// A sealed personal value with what binds it: its place and its stored token.
pub(crate) struct SealedValue<'a> {
    pub field: Field,
    pub message_id: &'a str,
    pub user_id: &'a str,
    pub sealed: &'a [u8],
    pub stored_token: Option<&'a str>,
}

/// Opens a value at its place and checks it against its token (the key commitment). The error
/// says what failed, never the value.
pub(crate) fn open_checked(
    value: &SealedValue<'_>,
    sealer: &Sealer,
    tokenizer: &Tokenizer,
) -> Result<Zeroizing<String>, String> {
    let field = value.field.name();
    let place = login_place(value.field, value.message_id, value.user_id);
    let opened = sealer
        .open(&place, value.sealed)
        .map_err(|e| format!("{field}: {e}"))?;
    let text =
        std::str::from_utf8(&opened).map_err(|_| format!("{field}: opened value is not text"))?;
    let committed = match (tokenizer.token_of(value.field, text), value.stored_token) {
        (Some(token), Some(stored)) => token.matches(stored),
        _ => false,
    };
    if !committed {
        return Err(format!(
            "{field}: the opened value does not match the stored token"
        ));
    }
    Ok(Zeroizing::new(text.to_owned()))
}

/// Opens and checks every stored login, revealing nothing: the number of logins that open, or
/// the first integrity failure. For operators after a rotation (`rotate-keys verify`).
pub async fn verify_all<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
) -> Result<u64, UnmaskError> {
    let mut after = 0i64;
    let mut checked = 0u64;
    loop {
        let rows: Vec<SealedLogin> = sqlx::query_as(&format!(
            "{SELECT_LOGINS} WHERE l.id > $1 ORDER BY l.id LIMIT 5000"
        ))
        .bind(after)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else {
            return Ok(checked);
        };
        after = last.id;
        checked += open_all(keyring, &rows).await?.len() as u64;
    }
}
