//! The two rotations over the database: values re-sealed under new data keys ([`DataKeys`]),
//! tokens recomputed under the new token key ([`TokenKeys`]). Each walks its tables (`walk`)
//! a page at a time through the key admin's doors, and rewrites each page in a transaction of
//! its own, so every row is under the old key or the new one, never neither.

use std::collections::BTreeMap;

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgPool, Postgres, Transaction};
use time::Date;

use super::LifecycleError;
use super::erasure::carry_erasures;
use super::walk::{Pages, Rotation, Tally, pass_over};
use crate::event::user_id_named_in;
use crate::vault::handed_out::DoorOperation::{self, Reseal, Retokenize};
use crate::vault::handed_out::{self, HandedOutRow, IntegrityError, SealedBody, SealedLogin};
use crate::vault::key_cache::KeyCache;
use crate::vault::key_table;
use crate::vault::keyring::Keyring;
use crate::vault::kms::KeyWrapper;
use crate::vault::place::{login_place, quarantine_place};
use crate::vault::retention::{Placement, Windows};
use crate::vault::seal::Sealer;
use crate::vault::token::{Field, Tokenizer};
use crate::vault::{KeyId, Purpose};

/// What a rotation works on: the database, the keys, the keys it retires, and its page size.
pub(super) struct Scope<'a, W> {
    pub(super) pool: &'a PgPool,
    pub(super) keyring: &'a Keyring<W>,
    pub(super) retiring: &'a [i64],
    /// Rows per page (and per transaction).
    pub(super) batch_size: i64,
}

/// A page's open transaction, which holds the page's rows locked until the rewrite commits, and
/// the request the page was handed out against.
type PageTx = (Transaction<'static, Postgres>, i64);

/// The statement that puts a page's rows under the new key, its values bound.
type Update = Query<'static, Postgres, PgArguments>;

impl<W> Scope<'_, W> {
    /// One table's pages of `operation` through the doors of its rows, opened with `keys` and
    /// rewritten by `table`.
    fn pages<'s, T>(
        &'s self,
        operation: DoorOperation,
        keys: &'s mut KeyCache,
        table: T,
    ) -> DoorPages<'s, W, T> {
        DoorPages {
            scope: self,
            operation,
            keys,
            table,
        }
    }
}

/// One table's rows under the retiring keys as a rotation walks them: each page requested and
/// handed out through the key admin's doors, and its write (the table's own door) run in the
/// transaction the page was handed out in, which then commits.
struct DoorPages<'s, W, T> {
    scope: &'s Scope<'s, W>,
    operation: DoorOperation,
    keys: &'s mut KeyCache,
    table: T,
}

/// A page as a table's rewrite gets it: the request it was handed out against, its rows, with
/// the keyring and the keys unwrapped so far to open them.
struct Page<'p, W, R> {
    request: i64,
    rows: &'p [R],
    keyring: &'p Keyring<W>,
    keys: &'p mut KeyCache,
}

/// What a rotation does to one of its tables.
trait Rewrite<W> {
    type Row: HandedOutRow;

    /// The write door's call that puts the page's rows under the new key.
    async fn update(&mut self, page: Page<'_, W, Self::Row>) -> Result<Update, LifecycleError>;
}

impl<W: KeyWrapper, T: Rewrite<W>> Pages for DoorPages<'_, W, T> {
    type Row = T::Row;
    type Held = PageTx;

    fn id(row: &T::Row) -> i64 {
        row.id()
    }

    async fn fetch(&mut self, after: i64) -> Result<(PageTx, Vec<T::Row>), LifecycleError> {
        let scope = self.scope;
        let mut tx = scope.pool.begin().await?;
        let page = handed_out::page::<T::Row>(
            scope.pool,
            &mut tx,
            self.operation,
            after,
            scope.batch_size,
            scope.retiring,
        )
        .await?;
        Ok(match page {
            Some(page) => ((tx, page.request), page.rows),
            None => ((tx, 0), Vec::new()),
        })
    }

    async fn rewrite(
        &mut self,
        (mut tx, request): PageTx,
        rows: &[T::Row],
    ) -> Result<(), LifecycleError> {
        let page = Page {
            request,
            rows,
            keyring: self.scope.keyring,
            keys: self.keys,
        };
        self.table.update(page).await?.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Replacing the data keys: every login's values, then every quarantined body, re-sealed.
pub(super) struct DataKeys<'a, W> {
    pub(super) scope: Scope<'a, W>,
    pub(super) keys: KeyCache,
    pub(super) targets: Targets,
}

impl<W: KeyWrapper> Rotation for DataKeys<'_, W> {
    async fn pass(&mut self, tally: &mut Tally<'_>) -> Result<(), LifecycleError> {
        let scope = &self.scope;
        let logins = LoginValues {
            targets: &mut self.targets,
        };
        let mut pages = scope.pages(Reseal, &mut self.keys, logins);
        pass_over(&mut pages, tally).await?;
        // A body stays in the window its old key served (its month when it was quarantined).
        let windows = key_table::windows_of(scope.pool, scope.retiring).await?;
        let bodies = QuarantinedBodies {
            targets: &mut self.targets,
            windows,
        };
        let mut pages = scope.pages(Reseal, &mut self.keys, bodies);
        pass_over(&mut pages, tally).await
    }

    async fn retire_if_unused(&mut self) -> Result<Option<Vec<KeyId>>, LifecycleError> {
        let (pool, retiring) = (self.scope.pool, self.scope.retiring);
        Ok(key_table::retire_unused(pool, retiring, Purpose::Data).await?)
    }
}

/// Replacing the token key: every login's tokens recomputed under `target`.
pub(super) struct TokenKeys<'a, W> {
    pub(super) scope: Scope<'a, W>,
    pub(super) keys: KeyCache,
    pub(super) target: Tokenizer,
}

impl<W: KeyWrapper> Rotation for TokenKeys<'_, W> {
    async fn pass(&mut self, tally: &mut Tally<'_>) -> Result<(), LifecycleError> {
        let tokens = LoginTokens {
            target: &self.target,
        };
        let mut pages = self.scope.pages(Retokenize, &mut self.keys, tokens);
        pass_over(&mut pages, tally).await?;
        // What links a quarantined message or an erasure record to its user moves too: no
        // retiring key may stay named, or it could never be destroyed.
        let bodies = QuarantineTokens {
            target: &self.target,
        };
        let mut pages = self.scope.pages(Retokenize, &mut self.keys, bodies);
        pass_over(&mut pages, tally).await?;
        let scope = &self.scope;
        carry_erasures(scope.pool, scope.keyring, scope.retiring, &self.target).await?;
        Ok(())
    }

    async fn retire_if_unused(&mut self) -> Result<Option<Vec<KeyId>>, LifecycleError> {
        let (pool, retiring) = (self.scope.pool, self.scope.retiring);
        Ok(key_table::retire_unused(pool, retiring, Purpose::Token).await?)
    }
}

/// Logins' sealed values under the retiring data keys, re-sealed under new ones.
struct LoginValues<'a> {
    targets: &'a mut Targets,
}

impl<W: KeyWrapper> Rewrite<W> for LoginValues<'_> {
    type Row = SealedLogin;

    async fn update(&mut self, page: Page<'_, W, SealedLogin>) -> Result<Update, LifecycleError> {
        let (mut ids, mut key_ids, mut ips, mut devices) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for row in page.rows {
            let Some([ip, device]) = row.open(page.keyring, page.keys).await? else {
                continue; // erased since the page was read: nothing to re-seal
            };
            let target = self
                .targets
                .room_for(page.keyring, Some(row.create_date), 2)
                .await?;
            let place = |field| login_place(field, &row.message_id, &row.user_id);
            ids.push(row.login_id);
            key_ids.push(target.key_id());
            ips.push(target.seal(&place(Field::Ip), ip.as_bytes()));
            devices.push(target.seal(&place(Field::DeviceId), device.as_bytes()));
        }
        let update = sqlx::query("SELECT vault_reseal_logins($1, $2, $3, $4, $5)");
        Ok(update
            .bind(page.request)
            .bind(ids)
            .bind(key_ids)
            .bind(ips)
            .bind(devices))
    }
}

/// Quarantined bodies under the retiring data keys, re-sealed under new ones.
struct QuarantinedBodies<'a> {
    targets: &'a mut Targets,
    /// The retention window (its first day) each retiring key served.
    windows: Vec<(KeyId, Option<Date>)>,
}

impl QuarantinedBodies<'_> {
    fn window_of(&self, key: KeyId) -> Option<Date> {
        self.windows
            .iter()
            .find(|(id, _)| *id == key)
            .and_then(|(_, w)| *w)
    }
}

impl<W: KeyWrapper> Rewrite<W> for QuarantinedBodies<'_> {
    type Row = SealedBody;

    async fn update(&mut self, page: Page<'_, W, SealedBody>) -> Result<Update, LifecycleError> {
        let (mut ids, mut key_ids, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
        for row in page.rows {
            let body = row.open(page.keyring, page.keys).await?;
            let window = self.window_of(row.data_key_id);
            let target = self.targets.room_for(page.keyring, window, 1).await?;
            ids.push(row.id);
            key_ids.push(target.key_id());
            bodies.push(target.seal(&quarantine_place(&row.message_id), &body));
        }
        let update = sqlx::query("SELECT vault_reseal_quarantine($1, $2, $3, $4)");
        Ok(update
            .bind(page.request)
            .bind(ids)
            .bind(key_ids)
            .bind(bodies))
    }
}

/// Logins' tokens under the retiring token key, recomputed from the opened values under
/// `target`.
struct LoginTokens<'a> {
    target: &'a Tokenizer,
}

impl<W: KeyWrapper> Rewrite<W> for LoginTokens<'_> {
    type Row = SealedLogin;

    async fn update(&mut self, page: Page<'_, W, SealedLogin>) -> Result<Update, LifecycleError> {
        let target = self.target;
        // Erased logins have no sealed values: their tokens cannot be recomputed and are
        // dropped.
        let mut tokens: BTreeMap<i64, (String, String)> = BTreeMap::new();
        for row in page.rows {
            let Some([ip, device]) = row.open(page.keyring, page.keys).await? else {
                continue;
            };
            let ip_token =
                target
                    .token_of(Field::Ip, &ip)
                    .ok_or_else(|| LifecycleError::Integrity {
                        row: row.row(),
                        error: IntegrityError::NotAnAddress,
                    })?;
            let device_token = target.device_id(&device);
            tokens.insert(
                row.login_id,
                (ip_token.to_string(), device_token.to_string()),
            );
        }
        let ids: Vec<i64> = page.rows.iter().map(|row| row.login_id).collect();
        let (ips, devices): (Vec<Option<String>>, Vec<Option<String>>) =
            ids.iter().map(|id| tokens.get(id).cloned().unzip()).unzip();
        let update = sqlx::query("SELECT vault_retokenize_logins($1, $2, $3, $4, $5)");
        Ok(update
            .bind(page.request)
            .bind(target.key_id())
            .bind(ids)
            .bind(ips)
            .bind(devices))
    }
}

/// Quarantined messages' user tokens under the retiring token key, recomputed under `target`
/// from the user id their opened body names.
struct QuarantineTokens<'a> {
    target: &'a Tokenizer,
}

impl<W: KeyWrapper> Rewrite<W> for QuarantineTokens<'_> {
    type Row = SealedBody;

    async fn update(&mut self, page: Page<'_, W, SealedBody>) -> Result<Update, LifecycleError> {
        let (mut ids, mut tokens) = (Vec::new(), Vec::new());
        for row in page.rows {
            let body = row.open(page.keyring, page.keys).await?;
            // The stored token was made from this id: a body that names none cannot match it.
            let user_id = user_id_named_in(&body).ok_or_else(|| LifecycleError::Integrity {
                row: row.row(),
                error: IntegrityError::TokenMismatch { field: "user_id" },
            })?;
            ids.push(row.id);
            tokens.push(self.target.user_id(&user_id).to_string());
        }
        let update = sqlx::query("SELECT vault_retokenize_quarantine($1, $2, $3, $4)");
        Ok(update
            .bind(page.request)
            .bind(self.target.key_id())
            .bind(ids)
            .bind(tokens))
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
    pub(super) async fn new(pool: &PgPool, limit: u64) -> Result<Self, LifecycleError> {
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
    ) -> Result<&Sealer, LifecycleError> {
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
