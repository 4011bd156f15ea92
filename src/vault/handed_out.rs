//! Sealed values as the doors hand them out, opened at their place and checked against their
//! key commitment.
//!
//! A format 2 value carries its key commitment ([`super::seal`]), checked by the sealer: it
//! opens under no other key. A format 1 value does not: AES-GCM-SIV is not key-committing, and
//! its stored token is its commitment, which only a holder of the token key can check (the key
//! admin's rotations and verification; never a compliance officer, who holds no token key).
//! Whoever holds the token key checks every value against its token, whatever its format.
//! Every failure is an [`IntegrityError`] that says what failed and never the value.

use std::fmt;

use sqlx::{PgConnection, PgPool};
use time::Date;
use zeroize::Zeroizing;

use super::key_cache::KeyCache;
use super::keyring::{Keyring, KeyringError};
use super::kms::KeyWrapper;
use super::place::{login_place, quarantine_place};
use super::seal::{OpenError, Sealer};
use super::token::{Field, Tokenizer};
use super::{KeyId, Purpose};
use crate::sql_text::sql_text;

/// The row a sealed value belongs to, as an integrity error names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowId {
    /// A login (`user_logins.id`) and its message id.
    Login { id: i64, message_id: String },
    /// A quarantined message (`quarantine.id`) and its message id.
    Quarantine { id: i64, message_id: String },
}

impl RowId {
    pub fn login(id: i64, message_id: &str) -> Self {
        RowId::Login {
            id,
            message_id: message_id.to_owned(),
        }
    }
}

impl fmt::Display for RowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowId::Login { id, message_id } => write!(f, "login {id} (message {message_id})"),
            RowId::Quarantine { id, message_id } => {
                write!(f, "quarantine {id} (message {message_id})")
            }
        }
    }
}

/// Why a stored value cannot be trusted. The text names the field, never the value.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// The value does not authenticate at its place under its key: altered, moved to another
    /// row, user or field, or under another key.
    #[error("{field}: {error}")]
    NotOpened {
        field: &'static str,
        #[source]
        error: OpenError,
    },
    #[error("{field}: opened value is not text")]
    NotText { field: &'static str },
    /// An ip that opened but does not parse has no token to check it against.
    #[error("ip: the opened value is not an address")]
    NotAnAddress,
    /// The key commitment failed: the value opened, but its token is not the stored one.
    #[error("{field}: the opened value does not match the stored token")]
    TokenMismatch { field: &'static str },
    /// A login under a data key without the sealed value of one of its fields.
    #[error("{field}: no sealed value beside a data key")]
    Missing { field: &'static str },
    /// A row names a key the door did not hand out with it.
    #[error("{purpose} key {id} was not handed out, so the row cannot be opened and checked")]
    KeyNotHandedOut { purpose: Purpose, id: KeyId },
    /// A key the row names is not one that can open it (destroyed, missing, another purpose).
    #[error("{0}")]
    Key(#[source] KeyringError),
}

/// A sealed personal value with what binds it: its place and its stored token.
#[derive(Debug, Clone, Copy)]
pub struct SealedValue<'a> {
    pub field: Field,
    pub message_id: &'a str,
    pub user_id: &'a str,
    pub sealed: &'a [u8],
    /// `None` where the token was dropped: nothing then commits the value, which is refused.
    pub stored_token: Option<&'a str>,
}

/// Opens a value at its place (a format 2 value only under the key it commits to) and, given
/// the token key, checks it against its token: the key commitment of a format 1 value, and the
/// analysts' token of any value. Without the token key a format 1 value is authenticated but
/// not key-committed; the caller sees which by [`Sealer::format`].
pub fn open_checked(
    value: &SealedValue<'_>,
    sealer: &Sealer,
    tokenizer: Option<&Tokenizer>,
) -> Result<Zeroizing<String>, IntegrityError> {
    let field = value.field.name();
    let place = login_place(value.field, value.message_id, value.user_id);
    let opened = sealer
        .open(&place, value.sealed)
        .map_err(|error| IntegrityError::NotOpened { field, error })?;
    let text = std::str::from_utf8(&opened).map_err(|_| IntegrityError::NotText { field })?;
    let Some(tokenizer) = tokenizer else {
        return Ok(Zeroizing::new(text.to_owned()));
    };
    let token = tokenizer
        .token_of(value.field, text)
        .ok_or(IntegrityError::NotAnAddress)?;
    match value.stored_token {
        Some(stored) if token.matches(stored) => Ok(Zeroizing::new(text.to_owned())),
        _ => Err(IntegrityError::TokenMismatch { field }),
    }
}

/// A row that cannot be opened, or the keys to open it cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum OpenRowError {
    #[error("keys: {0}")]
    Keys(#[from] KeyringError),
    #[error("row {row} cannot be opened ({error})")]
    Integrity {
        row: RowId,
        #[source]
        error: IntegrityError,
    },
}

/// A login as the key admin's rotation door hands it out (`vault_rotation_page`): sealed
/// values are `None` where the user's values were erased.
#[derive(Debug)]
pub struct SealedLogin {
    pub login_id: i64,
    pub message_id: String,
    pub user_id: String,
    pub create_date: Date,
    pub masked_ip: Option<String>,
    pub masked_device_id: Option<String>,
    pub token_key_id: KeyId,
    pub data_key_id: Option<KeyId>,
    pub sealed_ip: Option<Vec<u8>>,
    pub sealed_device_id: Option<Vec<u8>>,
}

impl SealedLogin {
    pub fn row(&self) -> RowId {
        RowId::login(self.login_id, &self.message_id)
    }

    /// The sealed value of `field`, unless erased.
    pub fn value(&self, field: Field) -> Option<SealedValue<'_>> {
        let (sealed, stored_token) = match field {
            Field::Ip => (&self.sealed_ip, &self.masked_ip),
            Field::DeviceId => (&self.sealed_device_id, &self.masked_device_id),
        };
        Some(SealedValue {
            field,
            message_id: &self.message_id,
            user_id: &self.user_id,
            sealed: sealed.as_deref()?,
            stored_token: stored_token.as_deref(),
        })
    }

    /// Opens the login's values (ip, device id) with their keys, each checked against its
    /// token; `None` where erased.
    pub async fn open<W: KeyWrapper>(
        &self,
        keyring: &Keyring<W>,
        keys: &mut KeyCache,
    ) -> Result<Option<[Zeroizing<String>; 2]>, OpenRowError> {
        let Some(data_key) = self.data_key_id else {
            return Ok(None);
        };
        let (tokenizer, sealer) = keys
            .login_keys(keyring, self.token_key_id, data_key)
            .await?;
        let open = |field: Field| {
            let opened = match self.value(field) {
                Some(value) => open_checked(&value, sealer, Some(tokenizer)),
                None => Err(IntegrityError::Missing {
                    field: field.name(),
                }),
            };
            opened.map_err(|error| OpenRowError::Integrity {
                row: self.row(),
                error,
            })
        };
        Ok(Some([open(Field::Ip)?, open(Field::DeviceId)?]))
    }
}

/// A quarantined message's sealed body as the key admin's quarantine door hands it out
/// (`vault_quarantine_page`).
#[derive(Debug)]
pub struct SealedBody {
    pub id: i64,
    pub message_id: String,
    pub data_key_id: KeyId,
    pub sealed_body: Vec<u8>,
}

sql_text! {
    /// What a walk's page is requested for (each door takes every one): the audit row names
    /// it, and the write doors accept only a page requested for their own.
    pub enum DoorOperation {
        /// Open and check every row, writing nothing (`rotate-keys verify`).
        Verify => "verify",
        /// The rows under the retiring data keys, to re-seal under new ones.
        Reseal => "reseal",
        /// The rows under the retiring token key, to recompute their tokens.
        Retokenize => "retokenize",
    }
}

/// A page a door handed out, and the request it was handed out against (the write doors
/// accept only rows of the request handed out in their own transaction).
#[derive(Debug)]
pub struct DoorPage<R> {
    pub request: i64,
    pub rows: Vec<R>,
}

/// A row the key admin's walks hand out, a page at a time, through a pair of doors: a request,
/// whose audit row commits on its own, then the hand-out against it. The hand-out's result
/// columns are checked against the schema at build time (`query_as!`, with the metadata in
/// `.sqlx/`: migrations/README.md).
pub trait HandedOutRow: Sized + Send + Unpin {
    /// The request door's call: (operation, after, limit, keys), answering the request's id, or
    /// NULL when nothing is left.
    const REQUEST: &'static str;

    /// The walk's order: the row's primary key.
    fn id(&self) -> i64;

    /// The rows handed out against `request`, on `conn`.
    fn hand_out(
        conn: &mut PgConnection,
        request: i64,
    ) -> impl Future<Output = Result<Vec<Self>, sqlx::Error>> + Send;
}

impl HandedOutRow for SealedLogin {
    const REQUEST: &'static str = "SELECT vault_rotation_request($1, $2, $3, $4)";

    fn id(&self) -> i64 {
        self.login_id
    }

    async fn hand_out(conn: &mut PgConnection, request: i64) -> Result<Vec<Self>, sqlx::Error> {
        // A function's result columns carry no NOT NULL: "!" says which ones the door fills.
        sqlx::query_as!(
            SealedLogin,
            r#"SELECT login_id AS "login_id!", message_id AS "message_id!",
                      user_id AS "user_id!", create_date AS "create_date!",
                      masked_ip, masked_device_id, token_key_id AS "token_key_id!: KeyId",
                      data_key_id AS "data_key_id: KeyId", sealed_ip, sealed_device_id
                 FROM vault_rotation_page($1)"#,
            request
        )
        .fetch_all(conn)
        .await
    }
}

impl HandedOutRow for SealedBody {
    const REQUEST: &'static str = "SELECT vault_quarantine_request($1, $2, $3, $4)";

    fn id(&self) -> i64 {
        self.id
    }

    async fn hand_out(conn: &mut PgConnection, request: i64) -> Result<Vec<Self>, sqlx::Error> {
        sqlx::query_as!(
            SealedBody,
            r#"SELECT id AS "id!", message_id AS "message_id!",
                      data_key_id AS "data_key_id!: KeyId", sealed_body AS "sealed_body!"
                 FROM vault_quarantine_page($1)"#,
            request
        )
        .fetch_all(conn)
        .await
    }
}

/// The next page of `operation` after row `after`, at most `limit` rows, under `keys` (the
/// operation says what they select). The request runs on `pool` and commits on its own; the
/// hand-out runs on `conn`, usually the transaction that will write the page. `None` once no
/// row is left to hand out.
pub async fn page<R: HandedOutRow>(
    pool: &PgPool,
    conn: &mut PgConnection,
    operation: DoorOperation,
    after: i64,
    limit: i64,
    keys: &[i64],
) -> Result<Option<DoorPage<R>>, sqlx::Error> {
    let request: Option<i64> = sqlx::query_scalar(R::REQUEST)
        .bind(operation)
        .bind(after)
        .bind(limit)
        .bind(keys)
        .fetch_one(pool)
        .await?;
    let Some(request) = request else {
        return Ok(None);
    };
    let rows = R::hand_out(conn, request).await?;
    // Rows erased between the two steps are not handed out; a page left empty ends the walk
    // like the end of the table (a rotation's next pass finds what remains).
    Ok((!rows.is_empty()).then_some(DoorPage { request, rows }))
}

impl SealedBody {
    pub fn row(&self) -> RowId {
        RowId::Quarantine {
            id: self.id,
            message_id: self.message_id.clone(),
        }
    }

    /// Opens the body at its place with its key (a body has no token to check).
    pub async fn open<W: KeyWrapper>(
        &self,
        keyring: &Keyring<W>,
        keys: &mut KeyCache,
    ) -> Result<Zeroizing<Vec<u8>>, OpenRowError> {
        keys.sealer(keyring, self.data_key_id, None)
            .await?
            .open(&quarantine_place(&self.message_id), &self.sealed_body)
            .map_err(|error| OpenRowError::Integrity {
                row: self.row(),
                error: IntegrityError::NotOpened {
                    field: super::place::BODY_FIELD,
                    error,
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::seal::SealFormat;
    use crate::vault::testing::key;

    const MESSAGE: &str = "m-1";
    const USER: &str = "u-1";

    fn keys() -> (Sealer, Tokenizer) {
        (
            Sealer::new(KeyId(2), &key(2), SealFormat::CURRENT),
            Tokenizer::new(KeyId(1), &key(1)),
        )
    }

    /// `text` sealed as `field` of the test login, with its token under `tokenizer`.
    fn sealed(
        field: Field,
        text: &str,
        sealer: &Sealer,
        tokenizer: &Tokenizer,
    ) -> (Vec<u8>, String) {
        let sealed = sealer.seal(&login_place(field, MESSAGE, USER), text.as_bytes());
        let token = tokenizer.token_of(field, text).unwrap().to_string();
        (sealed, token)
    }

    fn value<'a>(field: Field, sealed: &'a [u8], token: Option<&'a str>) -> SealedValue<'a> {
        SealedValue {
            field,
            message_id: MESSAGE,
            user_id: USER,
            sealed,
            stored_token: token,
        }
    }

    #[test]
    fn a_value_opens_when_it_matches_its_token() {
        let (sealer, tokenizer) = keys();
        for (field, text) in [(Field::Ip, "10.0.0.1"), (Field::DeviceId, "593-47-5928")] {
            let (bytes, token) = sealed(field, text, &sealer, &tokenizer);
            let opened = open_checked(
                &value(field, &bytes, Some(&token)),
                &sealer,
                Some(&tokenizer),
            );
            assert_eq!(opened.unwrap().as_str(), text);
        }
    }

    #[test]
    fn another_value_s_token_is_a_token_mismatch() {
        let (sealer, tokenizer) = keys();
        let (bytes, _) = sealed(Field::Ip, "10.0.0.1", &sealer, &tokenizer);
        let (_, other) = sealed(Field::Ip, "10.0.0.9", &sealer, &tokenizer);
        for stored in [Some(other.as_str()), Some(""), None] {
            let error = open_checked(&value(Field::Ip, &bytes, stored), &sealer, Some(&tokenizer))
                .unwrap_err();
            assert!(
                matches!(error, IntegrityError::TokenMismatch { field: "ip" }),
                "{error:?}"
            );
            assert_eq!(
                error.to_string(),
                "ip: the opened value does not match the stored token"
            );
        }
    }

    /// The key commitment of format 1, and the analysts' token of any format: a value sealed
    /// under the right data key but tokenized under another token key (or a token key swapped
    /// for another) does not pass.
    #[test]
    fn a_token_under_another_token_key_is_a_token_mismatch() {
        let (_, tokenizer) = keys();
        let sealer = Sealer::new(KeyId(2), &key(2), SealFormat::V1);
        let other_tokenizer = Tokenizer::new(KeyId(3), &key(3));
        let (bytes, token) = sealed(Field::DeviceId, "d-1", &sealer, &other_tokenizer);
        let error = open_checked(
            &value(Field::DeviceId, &bytes, Some(&token)),
            &sealer,
            Some(&tokenizer),
        )
        .unwrap_err();
        assert!(
            matches!(error, IntegrityError::TokenMismatch { field: "device_id" }),
            "{error:?}"
        );
    }

    /// Without the token key (a compliance officer's case) a format 2 value is still bound to
    /// its key by its commitment, and a format 1 value opens authenticated but uncommitted.
    #[test]
    fn without_the_token_key_values_open_by_their_own_commitment() {
        let (sealer, tokenizer) = keys();
        let (bytes, _) = sealed(Field::Ip, "10.0.0.1", &sealer, &tokenizer);
        let opened = open_checked(&value(Field::Ip, &bytes, None), &sealer, None).unwrap();
        assert_eq!(opened.as_str(), "10.0.0.1");
        let under_another_key = Sealer::new(KeyId(2), &key(9), SealFormat::V2);
        let error = open_checked(&value(Field::Ip, &bytes, None), &under_another_key, None);
        assert!(matches!(error, Err(IntegrityError::NotOpened { .. })));

        let old = Sealer::new(KeyId(2), &key(2), SealFormat::V1);
        let (bytes, _) = sealed(Field::Ip, "10.0.0.1", &old, &tokenizer);
        let opened = open_checked(&value(Field::Ip, &bytes, None), &old, None).unwrap();
        assert_eq!(opened.as_str(), "10.0.0.1");
        assert!(!old.format().is_key_committing());
    }

    #[test]
    fn a_tampered_or_moved_value_is_not_opened() {
        let (sealer, tokenizer) = keys();
        let (bytes, token) = sealed(Field::Ip, "10.0.0.1", &sealer, &tokenizer);
        let mut tampered = bytes.clone();
        tampered[15] ^= 1;
        let other_user = SealedValue {
            user_id: "u-2",
            ..value(Field::Ip, &bytes, Some(&token))
        };
        let other_field = value(Field::DeviceId, &bytes, Some(&token));
        let other_key = Sealer::new(KeyId(2), &key(9), SealFormat::CURRENT);
        let cases = [
            (value(Field::Ip, &tampered, Some(&token)), &sealer, "ip"),
            (value(Field::Ip, &bytes[..10], Some(&token)), &sealer, "ip"),
            (other_user, &sealer, "ip"),
            (other_field, &sealer, "device_id"),
            (value(Field::Ip, &bytes, Some(&token)), &other_key, "ip"),
        ];
        for (value, sealer, name) in cases {
            let error = open_checked(&value, sealer, Some(&tokenizer)).unwrap_err();
            assert!(
                matches!(error, IntegrityError::NotOpened { field, error: OpenError } if field == name),
                "{error:?}"
            );
            assert_eq!(
                error.to_string(),
                format!(
                    "{name}: sealed value failed authentication (altered, moved, or under another key)"
                )
            );
        }
    }

    #[test]
    fn an_opened_value_that_is_not_text_or_not_an_address_is_refused() {
        let (sealer, tokenizer) = keys();
        let place = login_place(Field::DeviceId, MESSAGE, USER);
        let binary = sealer.seal(&place, &[0xff, 0xfe]);
        let error = open_checked(
            &value(Field::DeviceId, &binary, Some("t")),
            &sealer,
            Some(&tokenizer),
        )
        .unwrap_err();
        assert!(matches!(
            error,
            IntegrityError::NotText { field: "device_id" }
        ));
        assert_eq!(error.to_string(), "device_id: opened value is not text");

        let not_ip = sealer.seal(&login_place(Field::Ip, MESSAGE, USER), b"not an ip");
        let error = open_checked(
            &value(Field::Ip, &not_ip, Some("t")),
            &sealer,
            Some(&tokenizer),
        )
        .unwrap_err();
        assert!(matches!(error, IntegrityError::NotAnAddress));
    }

    #[test]
    fn errors_name_the_row_and_never_the_value() {
        let (sealer, tokenizer) = keys();
        let (bytes, _) = sealed(Field::Ip, "10.0.0.1", &sealer, &tokenizer);
        let error = open_checked(
            &value(Field::Ip, &bytes, Some("x")),
            &sealer,
            Some(&tokenizer),
        )
        .unwrap_err();
        let error = OpenRowError::Integrity {
            row: RowId::login(7, MESSAGE),
            error,
        };
        let text = error.to_string();
        assert_eq!(
            text,
            "row login 7 (message m-1) cannot be opened \
             (ip: the opened value does not match the stored token)"
        );
        assert!(!text.contains("10.0.0.1"));
        let body = RowId::Quarantine {
            id: 3,
            message_id: "m-3".into(),
        };
        assert_eq!(body.to_string(), "quarantine 3 (message m-3)");
    }

    #[test]
    fn a_login_s_values_are_none_where_erased() {
        let (sealer, tokenizer) = keys();
        let (ip, ip_token) = sealed(Field::Ip, "10.0.0.1", &sealer, &tokenizer);
        let login = SealedLogin {
            login_id: 1,
            message_id: MESSAGE.into(),
            user_id: USER.into(),
            create_date: Date::MIN,
            masked_ip: Some(ip_token),
            masked_device_id: None,
            token_key_id: KeyId(1),
            data_key_id: Some(KeyId(2)),
            sealed_ip: Some(ip),
            sealed_device_id: None,
        };
        let ip = login.value(Field::Ip).unwrap();
        assert_eq!(
            open_checked(&ip, &sealer, Some(&tokenizer))
                .unwrap()
                .as_str(),
            "10.0.0.1"
        );
        assert!(login.value(Field::DeviceId).is_none());
    }
}
