//! The two rotations over the database: values re-sealed under new data keys ([`DataKeys`]),
//! tokens recomputed under the new token key ([`TokenKeys`]). Each walks its tables (`walk`)
//! a page at a time through the key admin's doors, and rewrites each page in a transaction of
//! its own, so every row is under the old key or the new one, never neither.

use std::collections::BTreeMap;

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Transaction};
use time::Date;

use super::RotateError;
use super::admin::{UNUSED_DATA_KEY, UNUSED_TOKEN_KEY, retire_unused};
use super::walk::{Pages, Rotation, Tally, pass_over};
use crate::vault::KeyId;
use crate::vault::key_cache::KeyCache;
use crate::vault::keyring::Keyring;
use crate::vault::kms::KeyWrapper;
use crate::vault::place::{login_place, quarantine_place};
use crate::vault::retention::{Placement, Windows};
use crate::vault::seal::Sealer;
use crate::vault::sealed::{
    IntegrityError, SealedBody, SealedLogin, quarantine_page, rotation_page,
};
use crate::vault::token::{Field, Tokenizer};

/// What a rotation works on: the database, the keys, the keys it retires, and its page size.
pub(super) struct Scope<'a, W> {
    pub(super) pool: &'a PgPool,
    pub(super) keyring: &'a Keyring<W>,
    pub(super) retiring: &'a [i64],
    /// Rows per page (and per transaction).
    pub(super) batch_size: i64,
}

/// A page's open transaction: it holds the page's rows locked until the rewrite commits.
type PageTx = Transaction<'static, Postgres>;

impl<W> Scope<'_, W> {
    /// The page after `after` through a door, and the transaction it was read in. `select`
    /// binds `$1` = after, `$2` = the page size, `$3` = the retiring keys
    /// ([`rotation_page`], [`quarantine_page`]).
    async fn page<R>(&self, select: &str, after: i64) -> Result<(PageTx, Vec<R>), RotateError>
    where
        R: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
    {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<R> = sqlx::query_as(select)
            .bind(after)
            .bind(self.batch_size)
            .bind(self.retiring)
            .fetch_all(&mut *tx)
            .await?;
        Ok((tx, rows))
    }
}

/// Replacing the data keys: every login's values, then every quarantined body, re-sealed.
pub(super) struct DataKeys<'a, W> {
    pub(super) scope: Scope<'a, W>,
    pub(super) keys: KeyCache,
    pub(super) targets: Targets,
}

impl<W: KeyWrapper> Rotation for DataKeys<'_, W> {
    async fn pass(&mut self, tally: &mut Tally<'_>) -> Result<(), RotateError> {
        let scope = &self.scope;
        let mut logins = LoginValues {
            scope,
            select: rotation_page("reseal"),
            keys: &mut self.keys,
            targets: &mut self.targets,
        };
        pass_over(&mut logins, tally).await?;
        // A body stays in the window its old key served (its month when it was quarantined).
        let windows: Vec<(KeyId, Option<Date>)> =
            sqlx::query_as("SELECT id, window_starts FROM vault_keys WHERE id = ANY($1)")
                .bind(scope.retiring)
                .fetch_all(scope.pool)
                .await?;
        let mut bodies = QuarantinedBodies {
            scope,
            select: quarantine_page("reseal"),
            keys: &mut self.keys,
            targets: &mut self.targets,
            windows,
        };
        pass_over(&mut bodies, tally).await
    }

    async fn retire_if_unused(&mut self) -> Result<Option<Vec<KeyId>>, RotateError> {
        retire_unused(self.scope.pool, self.scope.retiring, UNUSED_DATA_KEY).await
    }
}

/// Replacing the token key: every login's tokens recomputed under `target`.
pub(super) struct TokenKeys<'a, W> {
    pub(super) scope: Scope<'a, W>,
    pub(super) keys: KeyCache,
    pub(super) target: Tokenizer,
}

impl<W: KeyWrapper> Rotation for TokenKeys<'_, W> {
    async fn pass(&mut self, tally: &mut Tally<'_>) -> Result<(), RotateError> {
        let mut tokens = LoginTokens {
            scope: &self.scope,
            select: rotation_page("retokenize"),
            keys: &mut self.keys,
            target: &self.target,
        };
        pass_over(&mut tokens, tally).await
    }

    async fn retire_if_unused(&mut self) -> Result<Option<Vec<KeyId>>, RotateError> {
        retire_unused(self.scope.pool, self.scope.retiring, UNUSED_TOKEN_KEY).await
    }
}

/// Logins' sealed values under the retiring data keys, re-sealed under new ones.
struct LoginValues<'a, W> {
    scope: &'a Scope<'a, W>,
    select: String,
    keys: &'a mut KeyCache,
    targets: &'a mut Targets,
}

impl<W: KeyWrapper> Pages for LoginValues<'_, W> {
    type Row = SealedLogin;
    type Held = PageTx;

    fn id(row: &SealedLogin) -> i64 {
        row.login_id
    }

    async fn fetch(&mut self, after: i64) -> Result<(PageTx, Vec<SealedLogin>), RotateError> {
        self.scope.page(&self.select, after).await
    }

    async fn rewrite(&mut self, mut tx: PageTx, rows: &[SealedLogin]) -> Result<(), RotateError> {
        let keyring = self.scope.keyring;
        let (mut ids, mut key_ids, mut ips, mut devices) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for row in rows {
            let Some([ip, device]) = row.open(keyring, self.keys).await? else {
                continue; // erased since the page was read: nothing to re-seal
            };
            let target = self
                .targets
                .room_for(keyring, Some(row.create_date), 2)
                .await?;
            let place = |field| login_place(field, &row.message_id, &row.user_id);
            ids.push(row.login_id);
            key_ids.push(target.key_id());
            ips.push(target.seal(&place(Field::Ip), ip.as_bytes()));
            devices.push(target.seal(&place(Field::DeviceId), device.as_bytes()));
        }
        sqlx::query(
            "UPDATE login_vault v
             SET data_key_id = u.data_key_id, sealed_ip = u.sealed_ip,
                 sealed_device_id = u.sealed_device_id
             FROM UNNEST($1::int8[], $2::int8[], $3::bytea[], $4::bytea[])
                  AS u(login_id, data_key_id, sealed_ip, sealed_device_id)
             WHERE v.login_id = u.login_id",
        )
        .bind(&ids)
        .bind(&key_ids)
        .bind(&ips)
        .bind(&devices)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Quarantined bodies under the retiring data keys, re-sealed under new ones.
struct QuarantinedBodies<'a, W> {
    scope: &'a Scope<'a, W>,
    select: String,
    keys: &'a mut KeyCache,
    targets: &'a mut Targets,
    /// The retention window (its first day) each retiring key served.
    windows: Vec<(KeyId, Option<Date>)>,
}

impl<W> QuarantinedBodies<'_, W> {
    fn window_of(&self, key: KeyId) -> Option<Date> {
        self.windows
            .iter()
            .find(|(id, _)| *id == key)
            .and_then(|(_, w)| *w)
    }
}

impl<W: KeyWrapper> Pages for QuarantinedBodies<'_, W> {
    type Row = SealedBody;
    type Held = PageTx;

    fn id(row: &SealedBody) -> i64 {
        row.id
    }

    async fn fetch(&mut self, after: i64) -> Result<(PageTx, Vec<SealedBody>), RotateError> {
        self.scope.page(&self.select, after).await
    }

    async fn rewrite(&mut self, mut tx: PageTx, rows: &[SealedBody]) -> Result<(), RotateError> {
        let keyring = self.scope.keyring;
        let (mut ids, mut key_ids, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
        for row in rows {
            let body = row.open(keyring, self.keys).await?;
            let window = self.window_of(row.data_key_id);
            let target = self.targets.room_for(keyring, window, 1).await?;
            ids.push(row.id);
            key_ids.push(target.key_id());
            bodies.push(target.seal(&quarantine_place(&row.message_id), &body));
        }
        sqlx::query(
            "UPDATE quarantine q SET data_key_id = u.data_key_id, sealed_body = u.sealed_body
             FROM UNNEST($1::int8[], $2::int8[], $3::bytea[]) AS u(id, data_key_id, sealed_body)
             WHERE q.id = u.id",
        )
        .bind(&ids)
        .bind(&key_ids)
        .bind(&bodies)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Logins' tokens under the retiring token key, recomputed from the opened values under
/// `target`.
struct LoginTokens<'a, W> {
    scope: &'a Scope<'a, W>,
    select: String,
    keys: &'a mut KeyCache,
    target: &'a Tokenizer,
}

impl<W: KeyWrapper> Pages for LoginTokens<'_, W> {
    type Row = SealedLogin;
    type Held = PageTx;

    fn id(row: &SealedLogin) -> i64 {
        row.login_id
    }

    async fn fetch(&mut self, after: i64) -> Result<(PageTx, Vec<SealedLogin>), RotateError> {
        self.scope.page(&self.select, after).await
    }

    async fn rewrite(&mut self, mut tx: PageTx, rows: &[SealedLogin]) -> Result<(), RotateError> {
        let target = self.target;
        // Erased logins have no sealed values: their tokens cannot be recomputed and are
        // dropped.
        let mut tokens: BTreeMap<i64, (String, String)> = BTreeMap::new();
        for row in rows {
            let Some([ip, device]) = row.open(self.scope.keyring, self.keys).await? else {
                continue;
            };
            let ip_token =
                target
                    .token_of(Field::Ip, &ip)
                    .ok_or_else(|| RotateError::Integrity {
                        row: row.row(),
                        error: IntegrityError::NotAnAddress,
                    })?;
            let device_token = target.device_id(&device);
            tokens.insert(
                row.login_id,
                (ip_token.to_string(), device_token.to_string()),
            );
        }
        let ids: Vec<i64> = rows.iter().map(|row| row.login_id).collect();
        let ips: Vec<Option<&str>> = ids
            .iter()
            .map(|id| tokens.get(id).map(|t| t.0.as_str()))
            .collect();
        let devices: Vec<Option<&str>> = ids
            .iter()
            .map(|id| tokens.get(id).map(|t| t.1.as_str()))
            .collect();
        sqlx::query(
            "UPDATE user_logins l
             SET masked_ip = u.masked_ip, masked_device_id = u.masked_device_id, token_key_id = $1
             FROM UNNEST($2::int8[], $3::text[], $4::text[]) AS u(id, masked_ip, masked_device_id)
             WHERE l.id = u.id",
        )
        .bind(target.key_id())
        .bind(&ids)
        .bind(&ips)
        .bind(&devices)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The data keys re-sealed values go under: one per retention window (values stay in the
/// window of their login date), a fresh one each time the current one has sealed its share,
/// so no new key seals more than the limit.
pub(super) struct Targets {
    windows: Windows,
    current: Vec<(Option<Date>, Sealer, u64)>,
    limit: u64,
    pub(super) made: Vec<KeyId>,
}

impl Targets {
    pub(super) async fn new(pool: &PgPool, limit: u64) -> Result<Self, RotateError> {
        Ok(Self {
            windows: Windows::load(pool).await?,
            current: Vec::new(),
            limit,
            made: Vec::new(),
        })
    }

    /// The sealer for `values` more values of logins dated `date` (unknown: the window of no
    /// month), after moving to a new key if they would take the current one past its limit.
    async fn room_for<W: KeyWrapper>(
        &mut self,
        keyring: &Keyring<W>,
        date: Option<Date>,
        values: u64,
    ) -> Result<&Sealer, RotateError> {
        let window = match date.map(|d| self.windows.placement(d)) {
            Some(Placement::Window(window)) => Some(window.clone()),
            _ => None,
        };
        let starts = window.as_ref().map(|w| w.starts);
        let at = match self.current.iter().position(|(w, _, _)| *w == starts) {
            Some(at) if self.current[at].2 + values <= self.limit => at,
            found => {
                let sealer = keyring.new_sealer_in(window.as_ref()).await?;
                self.made.push(sealer.key_id());
                match found {
                    Some(at) => {
                        self.current[at] = (starts, sealer, 0);
                        at
                    }
                    None => {
                        self.current.push((starts, sealer, 0));
                        self.current.len() - 1
                    }
                }
            }
        };
        self.current[at].2 += values;
        Ok(&self.current[at].1)
    }
}
