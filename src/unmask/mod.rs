//! Audited recovery of original values, for a compliance officer.
//!
//! 1. Knock on the database's door in two steps. `vault_reveal_request` checks the caller's
//!    role, the purpose and the reason, appends the audit row naming every login it will hand
//!    out, and commits, returning only a request id. `vault_reveal` then hands out, against
//!    that committed request, their sealed values and the wrapped data keys they need (or the
//!    refusal, or that nothing was found). A hand-out thus never outlives a rolled-back audit
//!    row. No token key is handed out: with it an officer could test guesses against the
//!    analysts' tokens offline.
//! 2. Unwrap each distinct data key once (KMS `Decrypt`, with the encryption context the door
//!    names).
//! 3. Open every value at its place. A format 2 value opens only under the key it commits to;
//!    a format 1 value (sealed before format 2) is authenticated but not key-committed, which
//!    [`Revealed::key_committed`] says. Any failure stops everything and names the row; no
//!    value is returned.
//! 4. Record the outcome (`vault_reveal_outcome`: revealed, integrity failure, KMS refusal) and
//!    commit it. Only then are the values handed back to be shown; if that record cannot be
//!    written, nothing is shown.
//!
//! The texts the door is handed and answers are enums in `door_terms` ([`RevealPurpose`],
//! [`QuestionKind`], [`RevealOutcome`], [`RequestOutcome`]).

mod door_terms;

use std::fmt;

use sqlx::PgPool;
use time::Date;
use zeroize::Zeroizing;

use crate::progress::{Progress, Unit};
use crate::vault::handed_out::DoorOperation::Verify;
use crate::vault::handed_out::{
    IntegrityError, OpenRowError, RowId, SealedBody, SealedLogin, SealedValue, open_checked, page,
};
use crate::vault::key_cache::KeyCache;
use crate::vault::key_table;
use crate::vault::keyring::{Keyring, KeyringError};
use crate::vault::kms::KeyWrapper;
use crate::vault::seal::SealFormat;
use crate::vault::token::Field;
use crate::vault::{KeyId, Purpose, WrappedKey};

pub use door_terms::{QuestionKind, RequestOutcome, RevealOutcome, RevealPurpose};

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

impl Question {
    /// The door's (question, value) arguments.
    fn door_arguments(&self) -> (QuestionKind, &str) {
        match self {
            Question::UserId(v) => (QuestionKind::UserId, v),
            Question::MaskedIp(v) => (QuestionKind::MaskedIp, v),
            Question::MaskedDeviceId(v) => (QuestionKind::MaskedDeviceId, v),
        }
    }
}

impl fmt::Display for Question {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (column, value) = self.door_arguments();
        write!(f, "{column} = {value}")
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
    /// Whether the values carried their own key commitment (format 2). Format 1 values were
    /// authenticated at their place but not checked against a commitment: only the token key
    /// could, which no officer holds. `rotate-keys data-key` moves them to format 2.
    pub key_committed: bool,
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
    /// The door refused the request as asked (an unknown purpose, no reason).
    #[error("refused: {0} (the attempt was audited)")]
    Refused(String),
    #[error("integrity failure at {row}: {error}; nothing was revealed")]
    Integrity {
        row: RowId,
        #[source]
        error: IntegrityError,
    },
    /// KMS refused to unwrap a key a door handed out: a wrapped key altered, moved to another
    /// id, or under a disabled or deleted KMS key. Nothing was revealed.
    #[error("KMS refused the key of {row}: {error}; nothing was revealed")]
    KmsRefused {
        row: RowId,
        #[source]
        error: KeyringError,
    },
    #[error("keys: {0}")]
    Keys(KeyringError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl UnmaskError {
    /// The database refused this login the door or a table (SQLSTATE 42501): a role that
    /// is not the compliance officer's.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, UnmaskError::Database(e) if crate::db::is_permission_denied(e))
    }

    /// What the audit records as the outcome of a hand-out that ended in this error.
    fn audit_outcome(&self) -> RevealOutcome {
        match self {
            UnmaskError::Integrity { .. } => RevealOutcome::IntegrityFailure,
            UnmaskError::NotAuthorized(_) | UnmaskError::KmsRefused { .. } => {
                RevealOutcome::KmsRefused
            }
            _ => RevealOutcome::KeysUnavailable,
        }
    }
}

/// Who asks, and why: all of it goes into the audit.
#[derive(Debug, Clone)]
pub struct Request {
    pub question: Question,
    pub purpose: RevealPurpose,
    pub reason: String,
    pub actor: String,
}

/// A row of the door's answer: the outcome, and for a hand-out one login with its sealed
/// values and the wrapped keys that open them.
struct HandedOut {
    /// `None` for a knock by a caller without the compliance role: it is no audit row.
    audit_id: Option<i64>,
    outcome: String,
    login_id: Option<i64>,
    message_id: Option<String>,
    user_id: Option<String>,
    device_type: Option<String>,
    create_date: Option<Date>,
    masked_ip: Option<String>,
    masked_device_id: Option<String>,
    data_key_id: Option<KeyId>,
    data_key_format: Option<i16>,
    data_key_kms: Option<String>,
    data_key_wrapped: Option<Vec<u8>>,
    sealed_ip: Option<Vec<u8>>,
    sealed_device_id: Option<Vec<u8>>,
}

fn wrapped(kms_key_id: &Option<String>, ciphertext: &Option<Vec<u8>>) -> Option<WrappedKey> {
    Some(WrappedKey {
        ciphertext: ciphertext.clone()?,
        kms_key_id: kms_key_id.clone()?,
    })
}

/// Answers `request` through the audited door; see the module docs for the order of steps.
pub async fn unmask<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    request: &Request,
) -> Result<Vec<Revealed>, UnmaskError> {
    let (question, value) = request.question.door_arguments();
    // Step one commits on its own (the pool's autocommit), so the audit row stands before
    // step two hands anything out.
    let request_id: i64 = sqlx::query_scalar("SELECT vault_reveal_request($1, $2, $3, $4, $5)")
        .bind(question)
        .bind(value)
        .bind(request.purpose)
        .bind(&request.reason)
        .bind(&request.actor)
        .fetch_one(pool)
        .await?;
    // Checked against the door's result columns at build time (`.sqlx/`).
    let handed = sqlx::query_as!(
        HandedOut,
        r#"SELECT audit_id, outcome AS "outcome!", login_id, message_id, user_id, device_type,
                  create_date, masked_ip, masked_device_id, data_key_id AS "data_key_id: KeyId",
                  data_key_format, data_key_kms, data_key_wrapped, sealed_ip, sealed_device_id
             FROM vault_reveal($1)"#,
        request_id
    )
    .fetch_all(pool)
    .await?;
    let Some(first) = handed.first() else {
        return Err(UnmaskError::Database(sqlx::Error::RowNotFound));
    };
    let audit_id = first.audit_id;
    match RequestOutcome::parse(&first.outcome) {
        Some(RequestOutcome::HandedOut) => {}
        Some(RequestOutcome::NothingFound) => return Ok(Vec::new()),
        Some(RequestOutcome::RefusedRole) => {
            let user: String = sqlx::query_scalar("SELECT session_user::text")
                .fetch_one(pool)
                .await?;
            return Err(UnmaskError::NotAuthorized(format!(
                "database user {user} does not hold the pii_vault_compliance role (the attempt was recorded)"
            )));
        }
        Some(RequestOutcome::RefusedPurpose) => {
            return Err(UnmaskError::Refused(format!(
                "the purpose must be one of: {}",
                RevealPurpose::listed()
            )));
        }
        _ => return Err(UnmaskError::Refused(first.outcome.clone())),
    }
    let result = open_handed_out(keyring, &handed).await;
    let (outcome, values) = match &result {
        Ok(revealed) => (
            RevealOutcome::Revealed,
            revealed
                .iter()
                .map(|r| i32::from(r.ip.is_some()) + i32::from(r.device_id.is_some()))
                .sum(),
        ),
        Err(error) => (error.audit_outcome(), 0),
    };
    sqlx::query("SELECT vault_reveal_outcome($1, $2, $3)")
        .bind(audit_id)
        .bind(outcome)
        .bind(values)
        .execute(pool)
        .await?;
    result
}

/// Unwraps each handed-out data key once, then opens every value.
async fn open_handed_out<W: KeyWrapper>(
    keyring: &Keyring<W>,
    handed: &[HandedOut],
) -> Result<Vec<Revealed>, UnmaskError> {
    let mut keys = KeyCache::default();
    for row in handed {
        let (Some(login_id), Some(message_id)) = (row.login_id, &row.message_id) else {
            continue;
        };
        let row_id = || RowId::login(login_id, message_id);
        if let (Some(id), Some(key), Some(format)) = (
            row.data_key_id,
            wrapped(&row.data_key_kms, &row.data_key_wrapped),
            row.data_key_format,
        ) {
            let format = SealFormat::from_stored(format)
                .map_err(|source| key_failure(row_id(), KeyringError::Format { id, source }))?;
            keys.sealer(keyring, id, Some((&key, format)))
                .await
                .map_err(|error| key_failure(row_id(), error))?;
        }
    }
    handed.iter().map(|row| reveal(row, &keys)).collect()
}

fn reveal(row: &HandedOut, keys: &KeyCache) -> Result<Revealed, UnmaskError> {
    let (Some(login_id), Some(message_id), Some(user_id)) = (
        row.login_id,
        row.message_id.as_deref(),
        row.user_id.as_deref(),
    ) else {
        return Err(UnmaskError::Database(sqlx::Error::RowNotFound));
    };
    let integrity = |error| UnmaskError::Integrity {
        row: RowId::login(login_id, message_id),
        error,
    };
    let sealer = match row.data_key_id {
        Some(id) => Some(keys.opened_sealer(id).ok_or_else(|| {
            integrity(IntegrityError::KeyNotHandedOut {
                purpose: Purpose::Data,
                id,
            })
        })?),
        None => None,
    };
    let open = |field, sealed: &Option<Vec<u8>>, stored_token: &Option<String>| {
        let (Some(sealer), Some(sealed)) = (sealer, sealed) else {
            return Ok(None); // erased
        };
        let value = SealedValue {
            field,
            message_id,
            user_id,
            sealed,
            stored_token: stored_token.as_deref(),
        };
        open_checked(&value, sealer, None)
            .map(Some)
            .map_err(integrity)
    };
    Ok(Revealed {
        login_id,
        message_id: message_id.to_owned(),
        user_id: user_id.to_owned(),
        device_type: row.device_type.clone().unwrap_or_default(),
        create_date: row.create_date.unwrap_or(Date::MIN),
        masked_ip: row.masked_ip.clone(),
        masked_device_id: row.masked_device_id.clone(),
        ip: open(Field::Ip, &row.sealed_ip, &row.masked_ip)?,
        device_id: open(
            Field::DeviceId,
            &row.sealed_device_id,
            &row.masked_device_id,
        )?,
        key_committed: sealer.is_none_or(|s| s.format().is_key_committing()),
    })
}

/// A key that will not unwrap: KMS denying *us* is an authorization problem; anything else
/// (a corrupted or moved wrapped key, a wrong purpose, a destroyed key) is an integrity one.
fn key_failure(row: RowId, error: KeyringError) -> UnmaskError {
    match &error {
        KeyringError::Kms { source, .. } if source.is_access_denied() => {
            UnmaskError::NotAuthorized(error.to_string())
        }
        KeyringError::Kms { source, .. } if source.is_transient() => UnmaskError::Keys(error),
        KeyringError::Database(_) => UnmaskError::Keys(error),
        KeyringError::Kms { .. } => UnmaskError::KmsRefused { row, error },
        _ => UnmaskError::Integrity {
            row,
            error: IntegrityError::Key(error),
        },
    }
}

/// What `verify_all` opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// Logins checked (their values opened and matched against their tokens, where not erased).
    pub logins: u64,
    /// Quarantined bodies opened.
    pub bodies: u64,
}

/// Opens and checks every stored login and quarantined body through the key admin's doors
/// (audited, one row per page), revealing nothing: what was checked, or the first integrity
/// failure. For operators after a rotation (`rotate-keys verify`).
pub async fn verify_all<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
) -> Result<Verified, OpenRowError> {
    verify_all_with_progress(pool, keyring, &()).await
}

/// [`verify_all`], telling `progress` the rows checked (logins, then bodies) out of those
/// stored when it began.
pub async fn verify_all_with_progress<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    progress: &dyn Progress,
) -> Result<Verified, OpenRowError> {
    let total: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM user_logins)
              + (SELECT count(*) FROM quarantine WHERE data_key_id IS NOT NULL)",
    )
    .fetch_one(pool)
    .await
    .map_err(KeyringError::Database)?;
    progress.start("verifying", Unit::Count("rows"), Some(total as u64));
    let verified = verify_pages(pool, keyring, progress).await;
    progress.finish();
    verified
}

async fn verify_pages<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    progress: &dyn Progress,
) -> Result<Verified, OpenRowError> {
    let mut keys = KeyCache::default();
    let mut verified = Verified {
        logins: 0,
        bodies: 0,
    };
    let mut conn = pool.acquire().await.map_err(KeyringError::Database)?;
    let mut after = 0i64;
    while let Some(page) = page::<SealedLogin>(pool, &mut conn, Verify, after, VERIFY_PAGE, &[])
        .await
        .map_err(KeyringError::Database)?
    {
        for row in &page.rows {
            row.open(keyring, &mut keys).await?;
            after = row.login_id;
        }
        verified.logins += page.rows.len() as u64;
        progress.advance(verified.logins);
    }
    let data_keys = key_table::data_keys(pool)
        .await
        .map_err(KeyringError::Database)?;
    let mut after = 0i64;
    while let Some(page) =
        page::<SealedBody>(pool, &mut conn, Verify, after, VERIFY_PAGE, &data_keys)
            .await
            .map_err(KeyringError::Database)?
    {
        for body in &page.rows {
            body.open(keyring, &mut keys).await?;
            after = body.id;
        }
        verified.bodies += page.rows.len() as u64;
        progress.advance(verified.logins + verified.bodies);
    }
    Ok(verified)
}

/// Rows per page of `verify_all`, each page one audit row.
const VERIFY_PAGE: i64 = 5_000;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::vault::SecretKey;
    use crate::vault::kms::memory::{MemoryKms, TEST_KMS_KEY};
    use crate::vault::place::login_place;
    use crate::vault::seal::Sealer;
    use crate::vault::token::Tokenizer;

    const TOKEN_KEY: KeyId = KeyId(1);
    const DATA_KEY: KeyId = KeyId(2);

    /// What a door hands out, made with keys from an in-memory KMS: the database is not needed
    /// to open it.
    struct Door {
        kms: Arc<MemoryKms>,
        keyring: Keyring<MemoryKms>,
        token_key: (SecretKey, WrappedKey),
        data_key: (SecretKey, WrappedKey),
        format: SealFormat,
    }

    impl Door {
        async fn new() -> Self {
            let kms = Arc::new(MemoryKms::new());
            Self {
                keyring: kms.keyring_without_database(),
                token_key: kms.wrapped_key(Purpose::Token, TOKEN_KEY).await,
                data_key: kms.wrapped_key(Purpose::Data, DATA_KEY).await,
                format: SealFormat::CURRENT,
                kms,
            }
        }

        /// Login `login_id` of `user` with its ip and device id, sealed and tokenized as the
        /// ingester does, and the wrapped keys beside it as the door returns them.
        fn login(&self, login_id: i64, user: &str, ip: &str, device_id: &str) -> HandedOut {
            let message_id = format!("m-{login_id}");
            let sealer = Sealer::new(DATA_KEY, &self.data_key.0, self.format);
            let tokenizer = Tokenizer::new(TOKEN_KEY, &self.token_key.0);
            let seal = |field, value: &str| {
                sealer.seal(&login_place(field, &message_id, user), value.as_bytes())
            };
            let token = |field, value| {
                Some(
                    tokenizer
                        .token_of(field, value)
                        .unwrap()
                        .as_str()
                        .to_owned(),
                )
            };
            HandedOut {
                audit_id: Some(1),
                outcome: RequestOutcome::HandedOut.as_str().into(),
                login_id: Some(login_id),
                sealed_ip: Some(seal(Field::Ip, ip)),
                sealed_device_id: Some(seal(Field::DeviceId, device_id)),
                message_id: Some(message_id),
                user_id: Some(user.into()),
                device_type: Some("android".into()),
                create_date: None,
                masked_ip: token(Field::Ip, ip),
                masked_device_id: token(Field::DeviceId, device_id),
                data_key_id: Some(DATA_KEY),
                data_key_format: Some(self.format.stored()),
                data_key_kms: Some(self.data_key.1.kms_key_id.clone()),
                data_key_wrapped: Some(self.data_key.1.ciphertext.clone()),
            }
        }
    }

    fn plain(value: &Option<Zeroizing<String>>) -> Option<&str> {
        value.as_ref().map(|v| v.as_str())
    }

    #[tokio::test]
    async fn handed_out_logins_open_with_one_unwrap_per_key() {
        let door = Door::new().await;
        let handed = [
            door.login(1, "u-1", "10.0.0.1", "d-1"),
            door.login(2, "u-1", "2001:db8::7", "d-2"),
        ];
        let revealed = open_handed_out(&door.keyring, &handed).await.unwrap();
        let values: Vec<_> = revealed
            .iter()
            .map(|r| (r.login_id, plain(&r.ip), plain(&r.device_id)))
            .collect();
        assert_eq!(
            values,
            [
                (1, Some("10.0.0.1"), Some("d-1")),
                (2, Some("2001:db8::7"), Some("d-2"))
            ]
        );
        assert_eq!(
            door.kms.calls("Decrypt"),
            1,
            "the data key, once; no token key"
        );
        assert!(revealed.iter().all(|r| r.key_committed));
    }

    #[tokio::test]
    async fn a_value_sealed_under_another_key_reveals_nothing() {
        let door = Door::new().await;
        let mut moved = door.login(1, "u-1", "10.0.0.1", "d-1");
        // Another data key handed out under the same id: the value commits to the first.
        let other = Door::new().await;
        moved.data_key_wrapped = Some(other.data_key.1.ciphertext.clone());
        let other_keyring = &other.keyring;
        let error = open_handed_out(other_keyring, &[moved]).await.unwrap_err();
        assert!(
            matches!(
                error,
                UnmaskError::Integrity {
                    error: IntegrityError::NotOpened { .. },
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(error.audit_outcome(), RevealOutcome::IntegrityFailure);
    }

    #[tokio::test]
    async fn format_1_values_open_without_the_token_key_and_say_so() {
        let mut door = Door::new().await;
        door.format = SealFormat::V1;
        let revealed = open_handed_out(&door.keyring, &[door.login(1, "u-1", "10.0.0.1", "d-1")])
            .await
            .unwrap();
        assert_eq!(plain(&revealed[0].ip), Some("10.0.0.1"));
        assert!(!revealed[0].key_committed);
        assert_eq!(door.kms.calls("Decrypt"), 1);
    }

    #[tokio::test]
    async fn kms_refusals_and_throttling_are_told_apart() {
        let door = Door::new().await;
        let row = || door.login(1, "u-1", "10.0.0.1", "d-1");

        // A data key handed out under another id: KMS refuses the context.
        let mut moved = row();
        moved.data_key_id = Some(KeyId(9));
        let error = open_handed_out(&door.keyring, &[moved]).await.unwrap_err();
        assert!(matches!(error, UnmaskError::KmsRefused { .. }), "{error:?}");
        assert_eq!(error.audit_outcome(), RevealOutcome::KmsRefused);

        // Throttled: worth asking again, and audited as keys unavailable.
        door.kms.throttle_next("Decrypt", 1);
        let error = open_handed_out(&door.keyring, &[row()]).await.unwrap_err();
        assert!(matches!(error, UnmaskError::Keys(_)), "{error:?}");
        assert_eq!(error.audit_outcome(), RevealOutcome::KeysUnavailable);

        // The KMS key disabled: refused, as AWS refuses it.
        door.kms.disable(TEST_KMS_KEY);
        let error = open_handed_out(&door.keyring, &[row()]).await.unwrap_err();
        assert!(matches!(error, UnmaskError::KmsRefused { .. }), "{error:?}");
        door.kms.enable(TEST_KMS_KEY);
        assert_eq!(
            open_handed_out(&door.keyring, &[row()])
                .await
                .unwrap()
                .len(),
            1
        );
    }
}
