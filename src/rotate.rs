//! Key rotation, online: while ingesters write, every stored row stays readable at every
//! moment, and an interrupted rotation (even kill -9) is finished by running it again.
//!
//! A rotation moves keys through `active -> retiring -> retired (-> destroyed)`:
//! 1. the keys to replace are marked `retiring`; running ingesters notice within their
//!    `--key-check-seconds` and move to new keys (a retiring key still opens what it sealed);
//! 2. rows under retiring keys are rewritten under the new key in batches, one transaction each,
//!    walking the primary key, so every row is under the old key or the new one, never neither;
//! 3. after a grace period, a last pass catches rows that slow ingesters wrote meanwhile, and a
//!    key that no row references is marked `retired` under its exclusive key-use lock (an
//!    ingester holds that lock shared from before its inserts until it commits, and checks
//!    the key's state once it holds it, so no row can land under a retired key; see
//!    `vault::keyring::key_use_lock`);
//! 4. `--destroy-retired` drops retired keys' wrapped bytes for good.
//!
//! Re-running a rotation first finishes any unfinished one (keys still `retiring`).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Transaction};
use time::Date;

use crate::vault::KeyId;
use crate::vault::key_cache::KeyCache;
use crate::vault::keyring::{Keyring, KeyringError, key_use_lock};
use crate::vault::kms::KeyWrapper;
use crate::vault::place::{login_place, quarantine_place};
use crate::vault::retention::{Placement, Windows, next_month};
use crate::vault::seal::Sealer;
use crate::vault::sealed::{
    IntegrityError, OpenRowError, RowId, SealedBody, SealedLogin, quarantine_page, rotation_page,
};
use crate::vault::token::{Field, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("keys: {0}")]
    Keys(#[from] KeyringError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("row {row} cannot be opened ({error}); rotation stopped, the row is untouched")]
    Integrity {
        row: RowId,
        #[source]
        error: IntegrityError,
    },
    /// `add-window` for a month already registered under another KMS key.
    #[error("retention window {month} is already registered with KMS key {registered}")]
    WindowTaken { month: Date, registered: String },
}

impl From<OpenRowError> for RotateError {
    fn from(error: OpenRowError) -> Self {
        match error {
            OpenRowError::Keys(e) => RotateError::Keys(e),
            OpenRowError::Integrity { row, error } => RotateError::Integrity { row, error },
        }
    }
}

/// How a rotation runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rows per transaction.
    pub batch_size: i64,
    /// Time given to running ingesters to move off retiring keys before the last pass (at
    /// least their `--key-check-seconds`).
    pub grace: Duration,
    /// Drop the wrapped bytes of retired keys at the end.
    pub destroy_retired: bool,
    /// Values one new data key may seal; re-sealing starts another one past it.
    pub data_key_max_records: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            batch_size: 1_000,
            grace: Duration::from_secs(15),
            destroy_retired: false,
            data_key_max_records: 10_000_000,
        }
    }
}

/// What a rotation did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// False when there was nothing to rotate (and nothing unfinished).
    pub started_or_resumed: bool,
    pub rows_rewritten: u64,
    pub seconds: f64,
    pub retired: Vec<KeyId>,
    pub destroyed: u64,
    /// The keys rows were moved to, in order (re-sealing starts a new data key every
    /// `data_key_max_records` values).
    pub new_keys: Vec<KeyId>,
}

impl Report {
    pub fn rows_per_second(&self) -> f64 {
        self.rows_rewritten as f64 / self.seconds.max(1e-9)
    }
}

/// Rows done out of a total, shown on a terminal or logged every few seconds.
struct Progress {
    label: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    last_shown: Instant,
    terminal: bool,
}

impl Progress {
    fn new(label: &'static str, total: u64) -> Self {
        Self {
            label,
            total,
            done: 0,
            started: Instant::now(),
            last_shown: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn advance(&mut self, rows: u64) {
        self.done += rows;
        let every = if self.terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if self.last_shown.elapsed() >= every {
            self.show();
        }
    }

    fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn show(&mut self) {
        self.last_shown = Instant::now();
        let (label, done, total, rate) = (self.label, self.done, self.total, self.rate());
        if self.terminal {
            eprint!("\r{label}: {done}/{total} rows ({rate:.0} rows/s)   ");
        } else {
            tracing::info!(done, total, rows_per_second = rate as u64, "{label}");
        }
    }

    fn finish(mut self) {
        self.show();
        if self.terminal {
            eprintln!();
        }
    }
}

/// The keys of `purpose` an unfinished rotation left `retiring`.
async fn retiring_keys(pool: &PgPool, purpose: &str) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM vault_keys WHERE purpose = $1 AND state = 'retiring' ORDER BY id",
    )
    .bind(purpose)
    .fetch_all(pool)
    .await
}

/// Replaces every data key: all sealed values (logins and quarantined bodies) are re-sealed
/// under a new one, and the old ones retired.
pub async fn data_keys<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    options: &Options,
) -> Result<Report, RotateError> {
    let mut retiring = retiring_keys(pool, "data").await?;
    if retiring.is_empty() {
        retiring = sqlx::query_scalar(
            "UPDATE vault_keys SET state = 'retiring'
             WHERE purpose = 'data' AND state = 'active' RETURNING id",
        )
        .fetch_all(pool)
        .await?;
    } else {
        tracing::info!(keys = ?retiring, "resuming an unfinished data key rotation");
    }
    if retiring.is_empty() {
        return Ok(Report::default());
    }
    let grace_ends = Instant::now() + options.grace;
    let mut targets = Targets::new(pool, options.data_key_max_records).await?;
    let mut sealers = KeyCache::default();
    let total: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM login_vault WHERE data_key_id = ANY($1))
              + (SELECT count(*) FROM quarantine WHERE data_key_id = ANY($1))",
    )
    .bind(&retiring)
    .fetch_one(pool)
    .await?;
    let mut progress = Progress::new("re-encrypting", total as u64);
    let walk = Walk {
        pool,
        keyring,
        retiring: &retiring,
        options,
        grace_ends,
    };
    let retired = loop {
        reseal_logins(&walk, &mut sealers, &mut targets, &mut progress).await?;
        reseal_quarantine(&walk, &mut sealers, &mut targets, &mut progress).await?;
        if let Some(retired) = walk.retire_if_unused(UNUSED_DATA_KEY).await? {
            break retired;
        }
    };
    walk.finish("data", progress, retired, targets.made).await
}

/// Replaces the token key: every stored token is recomputed from the opened original under a
/// new token key, and the old key is retired. Rows record their token key version throughout
/// (`user_logins.token_key_id`), so a query can tell old tokens from new ones meanwhile.
pub async fn token_key<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    options: &Options,
) -> Result<Report, RotateError> {
    let mut retiring = retiring_keys(pool, "token").await?;
    if retiring.is_empty() {
        keyring.rotate_token_key().await?;
        retiring = retiring_keys(pool, "token").await?;
    } else {
        tracing::info!(keys = ?retiring, "resuming an unfinished token key rotation");
    }
    let grace_ends = Instant::now() + options.grace;
    let target = keyring.active_tokenizer().await?;
    let mut keys = KeyCache::default();
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE token_key_id = ANY($1)")
            .bind(&retiring)
            .fetch_one(pool)
            .await?;
    let mut progress = Progress::new("re-tokenizing", total as u64);
    let walk = Walk {
        pool,
        keyring,
        retiring: &retiring,
        options,
        grace_ends,
    };
    let retired = loop {
        retokenize(&walk, &mut keys, &target, &mut progress).await?;
        if let Some(retired) = walk.retire_if_unused(UNUSED_TOKEN_KEY).await? {
            break retired;
        }
    };
    walk.finish("token", progress, retired, vec![target.key_id()])
        .await
}

/// One rotation's walk over the rows under its retiring keys: in primary-key order, a page of
/// `batch_size` rows at a time, each handed out by the key admin's door (which audits it and
/// locks the page, `SKIP LOCKED`: rows an ingester is still writing are caught by a later
/// pass) and rewritten in a transaction of its own.
struct Walk<'a, W> {
    pool: &'a PgPool,
    keyring: &'a Keyring<W>,
    retiring: &'a [i64],
    options: &'a Options,
    /// Until then, running ingesters may still be writing under the retiring keys.
    grace_ends: Instant,
}

impl<W: KeyWrapper> Walk<'_, W> {
    /// The page after `*after` and its open transaction, or `None` at the end; moves `*after`
    /// to the page's last id. `select` binds `$1` = after, `$2` = the page size, `$3` = the
    /// retiring keys.
    async fn page<R>(
        &self,
        select: &str,
        after: &mut i64,
        id_of: fn(&R) -> i64,
    ) -> Result<Option<(Transaction<'static, Postgres>, Vec<R>)>, RotateError>
    where
        R: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
    {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<R> = sqlx::query_as(select)
            .bind(*after)
            .bind(self.options.batch_size)
            .bind(self.retiring)
            .fetch_all(&mut *tx)
            .await?;
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        *after = id_of(last);
        Ok(Some((tx, rows)))
    }

    /// After a pass: `None` while the grace period lasts (its rest is slept, then one more pass
    /// is due), then the retired keys once no row uses them (`None` if an ingester wrote a row
    /// under them meanwhile: another pass).
    async fn retire_if_unused(&self, unused_sql: &str) -> Result<Option<Vec<KeyId>>, RotateError> {
        let now = Instant::now();
        if now < self.grace_ends {
            tokio::time::sleep(self.grace_ends - now).await;
            return Ok(None);
        }
        retire_unused(self.pool, self.retiring, unused_sql).await
    }

    /// The report of a finished rotation of `purpose` keys, once the retired keys' bytes are
    /// dropped if asked.
    async fn finish(
        &self,
        purpose: &str,
        progress: Progress,
        retired: Vec<KeyId>,
        new_keys: Vec<KeyId>,
    ) -> Result<Report, RotateError> {
        let (rows_rewritten, started) = (progress.done, progress.started);
        progress.finish();
        let destroyed = destroy_retired(self.pool, purpose, self.options.destroy_retired).await?;
        Ok(Report {
            started_or_resumed: true,
            rows_rewritten,
            seconds: started.elapsed().as_secs_f64(),
            retired,
            destroyed,
            new_keys,
        })
    }
}

/// The data keys re-sealed values go under: one per retention window (values stay in the
/// window of their login date), a fresh one each time the current one has sealed its share,
/// so no new key seals more than the limit.
struct Targets {
    windows: Windows,
    current: Vec<(Option<Date>, Sealer, u64)>,
    limit: u64,
    made: Vec<KeyId>,
}

impl Targets {
    async fn new(pool: &PgPool, limit: u64) -> Result<Self, RotateError> {
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

async fn reseal_logins<W: KeyWrapper>(
    walk: &Walk<'_, W>,
    keys: &mut KeyCache,
    targets: &mut Targets,
    progress: &mut Progress,
) -> Result<(), RotateError> {
    let select = rotation_page("reseal");
    let mut after = 0;
    while let Some((mut tx, rows)) = walk
        .page(&select, &mut after, |row: &SealedLogin| row.login_id)
        .await?
    {
        let (mut ids, mut key_ids, mut ips, mut devices) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            let Some([ip, device]) = row.open(walk.keyring, keys).await? else {
                continue; // erased since the page was read: nothing to re-seal
            };
            let target = targets
                .room_for(walk.keyring, Some(row.create_date), 2)
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
        progress.advance(rows.len() as u64);
    }
    Ok(())
}

async fn reseal_quarantine<W: KeyWrapper>(
    walk: &Walk<'_, W>,
    keys: &mut KeyCache,
    targets: &mut Targets,
    progress: &mut Progress,
) -> Result<(), RotateError> {
    let select = quarantine_page("reseal");
    // A body stays in the window its old key served (its month when it was quarantined).
    let windows: Vec<(KeyId, Option<Date>)> =
        sqlx::query_as("SELECT id, window_starts FROM vault_keys WHERE id = ANY($1)")
            .bind(walk.retiring)
            .fetch_all(walk.pool)
            .await?;
    let window_of = |key: KeyId| {
        windows
            .iter()
            .find(|(id, _)| *id == key)
            .and_then(|(_, w)| *w)
    };
    let mut after = 0;
    while let Some((mut tx, rows)) = walk
        .page(&select, &mut after, |row: &SealedBody| row.id)
        .await?
    {
        let (mut ids, mut key_ids, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            let body = row.open(walk.keyring, keys).await?;
            let target = targets
                .room_for(walk.keyring, window_of(row.data_key_id), 1)
                .await?;
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
        progress.advance(rows.len() as u64);
    }
    Ok(())
}

async fn retokenize<W: KeyWrapper>(
    walk: &Walk<'_, W>,
    keys: &mut KeyCache,
    target: &Tokenizer,
    progress: &mut Progress,
) -> Result<(), RotateError> {
    let select = rotation_page("retokenize");
    let mut after = 0;
    while let Some((mut tx, rows)) = walk
        .page(&select, &mut after, |row: &SealedLogin| row.login_id)
        .await?
    {
        // Erased logins have no sealed values: their tokens cannot be recomputed and are
        // dropped.
        let mut tokens: BTreeMap<i64, (String, String)> = BTreeMap::new();
        for row in &rows {
            let Some([ip, device]) = row.open(walk.keyring, keys).await? else {
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
        progress.advance(rows.len() as u64);
    }
    Ok(())
}

const UNUSED_DATA_KEY: &str = "SELECT NOT EXISTS (SELECT 1 FROM login_vault WHERE data_key_id = $1)
    AND NOT EXISTS (SELECT 1 FROM quarantine WHERE data_key_id = $1)";
const UNUSED_TOKEN_KEY: &str =
    "SELECT NOT EXISTS (SELECT 1 FROM user_logins WHERE token_key_id = $1)";

/// Retires the retiring keys if none protects a row any more; `None` if some still do (rows an
/// ingester wrote after the last pass), which calls for another pass.
async fn retire_unused(
    pool: &PgPool,
    retiring: &[i64],
    unused_sql: &str,
) -> Result<Option<Vec<KeyId>>, RotateError> {
    let mut tx = pool.begin().await?;
    // Waits for the writers still using these keys, and holds off new ones until the keys
    // are retired (see `key_use_lock`).
    sqlx::query(key_use_lock::HOLD_KEYS_EXCLUSIVE)
        .bind(retiring)
        .execute(&mut *tx)
        .await?;
    for id in retiring {
        let unused: bool = sqlx::query_scalar(unused_sql)
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        if !unused {
            return Ok(None);
        }
    }
    sqlx::query("UPDATE vault_keys SET state = 'retired', retired_at = now() WHERE id = ANY($1)")
        .bind(retiring)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(retiring.iter().copied().map(KeyId).collect()))
}

async fn destroy_retired(pool: &PgPool, purpose: &str, destroy: bool) -> Result<u64, RotateError> {
    if !destroy {
        return Ok(0);
    }
    let destroyed = sqlx::query(
        "UPDATE vault_keys SET state = 'destroyed', wrapped_key = NULL
         WHERE purpose = $1 AND state = 'retired'",
    )
    .bind(purpose)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(destroyed)
}

/// Re-wraps every stored key (not destroyed) under `new_kms_key_id` with KMS ReEncrypt, one key
/// per statement, so an interrupted run resumes. Returns how many keys were re-wrapped.
pub async fn rewrap<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    new_kms_key_id: &str,
) -> Result<u64, RotateError> {
    let keys: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, kms_key_id FROM vault_keys WHERE wrapped_key IS NOT NULL ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    // KMS answers with the key's ARN: once known, keys already under it are skipped.
    let mut target_arn = new_kms_key_id.to_owned();
    let mut rewrapped = 0;
    for (id, current) in keys {
        if current == target_arn {
            continue;
        }
        target_arn = keyring.rewrap(KeyId(id), new_kms_key_id).await?;
        rewrapped += 1;
        tracing::info!(key_id = id, kms_key = %target_arn, "re-wrapped");
    }
    Ok(rewrapped)
}

/// What an erasure removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    /// Logins whose sealed values were deleted.
    pub logins: u64,
    /// Logins whose tokens were set to NULL (0 with `keep_tokens`).
    pub tokens: u64,
    /// Quarantined messages deleted because their body names the user.
    pub quarantined: u64,
}

/// Erasure: removes a user's sealed values, tokens (unless `keep_tokens`, a legal hold) and
/// the quarantined messages that name them, keeping the analytic rows; records the erasure so
/// that messages sent before it cannot bring the values back; audits it; all in one
/// transaction (the key admin's door `vault_erase_user`).
///
/// The erasure record holds the token of the user id under every token key that is not
/// destroyed (an ingester may still tokenize with a retiring one), never the id itself.
pub async fn erase<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    user_id: &str,
    reason: &str,
    actor: &str,
    keep_tokens: bool,
) -> Result<Erased, RotateError> {
    let token_keys: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM vault_keys WHERE purpose = 'token' AND state <> 'destroyed' ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    let mut tokens = Vec::with_capacity(token_keys.len());
    for id in &token_keys {
        tokens.push(
            keyring
                .tokenizer(KeyId(*id))
                .await?
                .user_id(user_id)
                .to_string(),
        );
    }
    let (logins, nulled, quarantined): (i64, i64, i64) = sqlx::query_as(
        "SELECT logins, tokens, quarantined FROM vault_erase_user($1, $2, $3, $4, $5, $6)",
    )
    .bind(user_id)
    .bind(reason)
    .bind(actor)
    .bind(keep_tokens)
    .bind(&token_keys)
    .bind(&tokens)
    .fetch_one(pool)
    .await?;
    Ok(Erased {
        logins: logins as u64,
        tokens: nulled as u64,
        quarantined: quarantined as u64,
    })
}

/// How an expiry runs (`rotate-keys expire`).
#[derive(Debug, Clone)]
pub struct Expiry {
    /// Windows that end on or before this date expire.
    pub horizon: Date,
    /// Without it, nothing changes: the plan is reported.
    pub apply: bool,
    /// Also set the expired logins' tokens to NULL.
    pub drop_tokens: bool,
    /// Logins per transaction.
    pub batch_size: i64,
    /// Time given to running ingesters to stop sealing into an expiring window.
    pub grace: Duration,
}

/// One window's expiry, planned or done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowExpiry {
    pub starts: Date,
    pub ends: Date,
    /// Logins whose sealed values go (or went), and quarantined bodies, in the plan; rows
    /// touched, when applied.
    pub logins: u64,
    pub quarantined: u64,
    /// The window's data keys, destroyed when applied.
    pub data_keys: Vec<i64>,
    /// The window's KMS key, scheduled for deletion when applied.
    pub kms_key_id: String,
    pub applied: bool,
}

/// Registers the retention window of `month` (its first day): the data keys of logins dated
/// in it are wrapped under `kms_key_id` from now on. Refuses a month already registered with
/// another key.
pub async fn add_window<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    month: Date,
    kms_key_id: &str,
) -> Result<bool, RotateError> {
    keyring
        .wrapper()
        .check_key(kms_key_id)
        .await
        .map_err(KeyringError::WrappingKey)?;
    let added = sqlx::query(
        "INSERT INTO retention_windows (starts, ends, kms_key_id) VALUES ($1, $2, $3)
         ON CONFLICT (starts) DO NOTHING",
    )
    .bind(month)
    .bind(next_month(month))
    .bind(kms_key_id)
    .execute(pool)
    .await?
    .rows_affected()
        == 1;
    let stored: String =
        sqlx::query_scalar("SELECT kms_key_id FROM retention_windows WHERE starts = $1")
            .bind(month)
            .fetch_one(pool)
            .await?;
    if stored != kms_key_id {
        return Err(RotateError::WindowTaken {
            month,
            registered: stored,
        });
    }
    Ok(added)
}

/// Expires every retention window that ends on or before the horizon: deletes the sealed
/// values of its logins and its quarantined bodies (pages through the key admin's door, each
/// audited), retires and destroys its data keys once nothing uses them (under their use lock,
/// like a rotation), then schedules its KMS key for deletion, which makes the data keys in
/// every earlier backup impossible to unwrap. Resumable: each step finds what is left.
pub async fn expire<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    expiry: &Expiry,
) -> Result<Vec<WindowExpiry>, RotateError> {
    let due: Vec<(Date, Date, String, String)> = sqlx::query_as(
        "SELECT starts, ends, kms_key_id, state FROM retention_windows
         WHERE ends <= $1 AND state <> 'expired' ORDER BY starts",
    )
    .bind(expiry.horizon)
    .fetch_all(pool)
    .await?;
    let mut report = Vec::with_capacity(due.len());
    for (starts, ends, kms_key_id, state) in due {
        let keys = window_keys(pool, starts).await?;
        let (logins, quarantined): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM user_logins l JOIN login_vault v ON v.login_id = l.id
                     WHERE l.create_date >= $1 AND l.create_date < $2),
                    (SELECT count(*) FROM quarantine WHERE data_key_id = ANY($3))",
        )
        .bind(starts)
        .bind(ends)
        .bind(&keys)
        .fetch_one(pool)
        .await?;
        let mut window = WindowExpiry {
            starts,
            ends,
            logins: logins as u64,
            quarantined: quarantined as u64,
            data_keys: keys,
            kms_key_id,
            applied: false,
        };
        if expiry.apply {
            expire_window(pool, keyring, expiry, &mut window, state == "active").await?;
        }
        report.push(window);
    }
    Ok(report)
}

async fn window_keys(pool: &PgPool, starts: Date) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM vault_keys WHERE window_starts = $1 AND state <> 'destroyed' ORDER BY id",
    )
    .bind(starts)
    .fetch_all(pool)
    .await
}

async fn expire_window<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    expiry: &Expiry,
    window: &mut WindowExpiry,
    first_run: bool,
) -> Result<(), RotateError> {
    let starts = window.starts;
    // Ingesters stop sealing into it once they see it expiring (within their
    // --key-check-seconds); what they write meanwhile is caught by the passes below.
    sqlx::query(
        "UPDATE retention_windows SET state = 'expiring' WHERE starts = $1 AND state = 'active'",
    )
    .bind(starts)
    .execute(pool)
    .await?;
    sqlx::query(
        "UPDATE vault_keys SET state = 'retiring' WHERE window_starts = $1 AND state = 'active'",
    )
    .bind(starts)
    .execute(pool)
    .await?;
    if first_run {
        tokio::time::sleep(expiry.grace).await;
    }
    loop {
        let keys = window_keys(pool, starts).await?;
        let mut after = 0i64;
        loop {
            let (_, walked_to): (i64, Option<i64>) =
                sqlx::query_as("SELECT * FROM vault_expire_page($1, $2, $3, $4, $5, $6)")
                    .bind(starts)
                    .bind(window.ends)
                    .bind(after)
                    .bind(expiry.batch_size)
                    .bind(expiry.drop_tokens)
                    .bind(&keys)
                    .fetch_one(pool)
                    .await?;
            match walked_to {
                Some(id) => after = id,
                None => break,
            }
        }
        let live: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM vault_keys WHERE window_starts = $1 AND state IN ('active', 'retiring')",
        )
        .bind(starts)
        .fetch_all(pool)
        .await?;
        if live.is_empty() || retire_unused(pool, &live, UNUSED_DATA_KEY).await?.is_some() {
            break;
        }
    }
    sqlx::query(
        "UPDATE vault_keys SET state = 'destroyed', wrapped_key = NULL
         WHERE window_starts = $1 AND state = 'retired'",
    )
    .bind(starts)
    .execute(pool)
    .await?;
    keyring
        .wrapper()
        .schedule_deletion(&window.kms_key_id)
        .await
        .map_err(KeyringError::WrappingKey)?;
    sqlx::query(
        "UPDATE retention_windows SET state = 'expired', expired_at = now() WHERE starts = $1",
    )
    .bind(starts)
    .execute(pool)
    .await?;
    window.applied = true;
    tracing::info!(window = %starts, "retention window expired");
    Ok(())
}

/// One key as `status` shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyStatus {
    pub id: i64,
    pub purpose: String,
    pub state: String,
    pub kms_key_id: String,
    pub age_days: f64,
    /// Rows this key protects (logins and quarantined messages for a data key, tokenized
    /// logins for a token key).
    pub rows: i64,
    /// Values sealed under a data key (two a login, one a quarantined body); tokens for a
    /// token key (two a login).
    pub values: i64,
    /// The login dates a data key's values come from: its time window.
    pub first_login: Option<time::Date>,
    pub last_login: Option<time::Date>,
}

pub async fn status(pool: &PgPool) -> Result<Vec<KeyStatus>, RotateError> {
    Ok(sqlx::query_as(
        "WITH data_use AS (
             SELECT v.data_key_id AS key, count(*) AS logins, min(l.create_date) AS first_login,
                    max(l.create_date) AS last_login
             FROM login_vault v JOIN user_logins l ON l.id = v.login_id GROUP BY 1),
         quarantine_use AS (
             SELECT data_key_id AS key, count(*) AS bodies FROM quarantine GROUP BY 1),
         token_use AS (
             SELECT token_key_id AS key, count(*) AS logins FROM user_logins GROUP BY 1)
         SELECT k.id, k.purpose, k.state, k.kms_key_id,
                extract(epoch FROM now() - k.created_at)::float8 / 86400 AS age_days,
                CASE k.purpose
                  WHEN 'data' THEN coalesce(d.logins, 0) + coalesce(q.bodies, 0)
                  ELSE coalesce(t.logins, 0) END AS rows,
                CASE k.purpose
                  WHEN 'data' THEN 2 * coalesce(d.logins, 0) + coalesce(q.bodies, 0)
                  ELSE 2 * coalesce(t.logins, 0) END AS values,
                d.first_login, d.last_login
         FROM vault_keys k
         LEFT JOIN data_use d ON d.key = k.id AND k.purpose = 'data'
         LEFT JOIN quarantine_use q ON q.key = k.id AND k.purpose = 'data'
         LEFT JOIN token_use t ON t.key = k.id AND k.purpose = 'token'
         ORDER BY k.id",
    )
    .fetch_all(pool)
    .await?)
}
