//! Retention windows: registering a month's window, and expiring windows through the key
//! admin's door (`vault_expire_month`), which drops the month's logins, then shredding their
//! data keys and scheduling their KMS key for deletion.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use time::Date;

use super::LifecycleError;
use super::walk::GRACE;
use crate::progress::{Progress, Unit};
use crate::vault::Purpose;
use crate::vault::key_table;
use crate::vault::keyring::{Keyring, KeyringError};
use crate::vault::kms::KeyWrapper;
use crate::vault::retention::{WindowState, next_month};

/// How an expiry runs (`rotate-keys expire`).
#[derive(Debug, Clone)]
pub struct Expiry {
    /// Windows that end on or before this date expire.
    pub horizon: Date,
    /// Without it, nothing changes: the plan is reported.
    pub apply: bool,
    /// Time given to running ingesters to stop sealing into an expiring window.
    pub grace: Duration,
}

/// One window's expiry, planned or done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowExpiry {
    pub starts: Date,
    pub ends: Date,
    /// Logins of the month that go (or went, as the database counted or estimated them), with
    /// their tokens and sealed values, and quarantined bodies.
    pub logins: u64,
    pub quarantined: u64,
    /// The window's data keys, destroyed when applied.
    pub data_keys: Vec<i64>,
    /// The window's KMS key, scheduled for deletion when applied.
    pub kms_key_id: String,
    pub applied: bool,
}

/// Registers the retention window of `month` (its first day): the data keys of logins dated
/// in it are wrapped under `kms_key_id` (recorded as its ARN) from now on. Refuses a month
/// already registered with another key, and a KMS key that wraps anything outside the window.
pub async fn add_window<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    month: Date,
    kms_key_id: &str,
) -> Result<bool, LifecycleError> {
    let kms_key_id = &check_window_key(pool, keyring, month, kms_key_id).await?;
    // A window's logins need their month's partitions: made with the window, never after.
    super::add_month(pool, month).await?;
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
    // A window registered before its key was recorded as an ARN may name it by key id.
    if stored != *kms_key_id && !kms_key_id.ends_with(&format!(":key/{stored}")) {
        return Err(LifecycleError::WindowTaken {
            month,
            registered: stored,
        });
    }
    Ok(added)
}

/// The month of the retention window whose KMS key is `kms_key_arn` (windows registered before
/// their key was recorded as an ARN may name it by key id).
pub(super) async fn window_of_kms_key(
    pool: &PgPool,
    kms_key_arn: &str,
) -> Result<Option<Date>, sqlx::Error> {
    let windows: Vec<(Date, String)> =
        sqlx::query_as("SELECT starts, kms_key_id FROM retention_windows ORDER BY starts")
            .fetch_all(pool)
            .await?;
    Ok(windows
        .into_iter()
        .find(|(_, key)| key == kms_key_arn || kms_key_arn.ends_with(&format!(":key/{key}")))
        .map(|(starts, _)| starts))
}

/// Checks that `kms_key_id` can be the KMS key of the retention window of `month`, and answers
/// its ARN. Expiring a window schedules the deletion of its KMS key, so that key must wrap
/// nothing outside the window: not the key new keys are wrapped under (`KMS_KEY_ID`), nor a
/// stored key of another window or of none (the token key, other data keys).
async fn check_window_key<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    month: Date,
    kms_key_id: &str,
) -> Result<String, LifecycleError> {
    let wrapper = keyring.wrapper();
    let arn = wrapper
        .check_key(kms_key_id)
        .await
        .map_err(KeyringError::WrappingKey)?;
    let refused = |why| LifecycleError::WindowKeyRefused {
        kms_key: kms_key_id.to_owned(),
        month,
        why,
    };
    let default = wrapper.check_key(keyring.kms_key_id()).await;
    if default.is_ok_and(|default| default == arn) {
        return Err(refused(
            "it is the KMS key new keys are wrapped under (KMS_KEY_ID)",
        ));
    }
    if key_table::wraps_outside_window(pool, &arn, month).await? {
        return Err(refused("it wraps keys outside that window"));
    }
    match window_of_kms_key(pool, &arn).await? {
        Some(other) if other != month => Err(refused("it is another window's key")),
        _ => Ok(arn),
    }
}

/// Expires every retention window that ends on or before the horizon: drops its month's
/// logins (their tokens and sealed values with them) and deletes its quarantined bodies
/// through the key admin's door, audited; retires and destroys its data keys once nothing
/// uses them (under their use lock, like a rotation), then schedules its KMS key for deletion,
/// which makes the data keys in every earlier backup impossible to unwrap. Resumable: each
/// step finds what is left. A window expired before its month could be dropped (before
/// migration 0019) is taken again until its month is gone.
///
/// Applied, each window is a phase of `progress`: the grace wait, then the drop.
pub async fn expire<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    expiry: &Expiry,
    progress: &dyn Progress,
) -> Result<Vec<WindowExpiry>, LifecycleError> {
    let due: Vec<(Date, Date, String, WindowState)> = sqlx::query_as(
        "SELECT starts, ends, kms_key_id, state FROM retention_windows
         WHERE ends <= $1
           AND (state <> 'expired'
                OR to_regclass('public.user_logins_' || to_char(starts, 'YYYY_MM')) IS NOT NULL
                OR to_regclass('public.login_vault_' || to_char(starts, 'YYYY_MM')) IS NOT NULL)
         ORDER BY starts",
    )
    .bind(expiry.horizon)
    .fetch_all(pool)
    .await?;
    let mut report = Vec::with_capacity(due.len());
    for (starts, ends, kms_key_id, state) in due {
        let keys = key_table::window_keys(pool, starts).await?;
        let mut window = WindowExpiry {
            starts,
            ends,
            logins: 0,
            quarantined: 0,
            data_keys: keys,
            kms_key_id,
            applied: false,
        };
        if !expiry.apply {
            // A dry run counts: it may take a while on a large month, and changes nothing. (The
            // key admin cannot read sealed_body: a body not withheld is sealed.)
            let (logins, quarantined): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM user_logins
                         WHERE create_date >= $1 AND create_date < $2),
                        (SELECT count(*) FROM quarantine
                         WHERE data_key_id = ANY($3)
                            OR (body_withheld IS NULL
                                AND sent_at >= $1::timestamp AT TIME ZONE 'UTC'
                                AND sent_at < $2::timestamp AT TIME ZONE 'UTC'))",
            )
            .bind(starts)
            .bind(ends)
            .bind(&window.data_keys)
            .fetch_one(pool)
            .await?;
            (window.logins, window.quarantined) = (logins as u64, quarantined as u64);
        } else {
            let phase = format!("expiring window {}", &starts.to_string()[..7]);
            progress.start(&phase, Unit::Count("logins"), None);
            let first_run = state == WindowState::Active;
            let expired =
                expire_window(pool, keyring, expiry, &mut window, first_run, progress).await;
            progress.finish();
            expired?;
        }
        report.push(window);
    }
    Ok(report)
}

/// How long an expiry keeps asking to drop a month that open transactions hold, and how long
/// it pauses between asks (each ask queues every new reader behind it for up to the door's
/// 2 s lock timeout, so it does not ask back to back).
const DROP_ATTEMPTS: u32 = 20;
const DROP_PAUSE: Duration = Duration::from_secs(3);
const WAITING_TO_DROP: &str = "open transactions on the logins tables";

async fn expire_window<W: KeyWrapper>(
    pool: &PgPool,
    keyring: &Keyring<W>,
    expiry: &Expiry,
    window: &mut WindowExpiry,
    first_run: bool,
    progress: &dyn Progress,
) -> Result<(), LifecycleError> {
    let starts = window.starts;
    // Ingesters stop sealing into it once they see it expiring (within their
    // --key-check-seconds), and quarantine its late logins without their bodies; a batch
    // they write meanwhile goes with the month, or is caught by the next pass below.
    sqlx::query(
        "UPDATE retention_windows SET state = 'expiring' WHERE starts = $1 AND state = 'active'",
    )
    .bind(starts)
    .execute(pool)
    .await?;
    key_table::start_window_retirement(pool, starts).await?;
    if first_run {
        let until = Instant::now() + expiry.grace;
        progress.waiting(GRACE, until);
        tokio::time::sleep_until(until.into()).await;
    }
    loop {
        let keys = key_table::window_keys(pool, starts).await?;
        let (logins, quarantined) = drop_month(pool, starts, &keys, progress).await?;
        window.logins += logins;
        window.quarantined += quarantined;
        progress.advance(window.logins);
        let live = key_table::usable_in_window(pool, starts).await?;
        if live.is_empty()
            || key_table::retire_unused(pool, &live, Purpose::Data)
                .await?
                .is_some()
        {
            break;
        }
    }
    key_table::destroy_retired_in_window(pool, starts).await?;
    keyring
        .wrapper()
        .schedule_deletion(&window.kms_key_id)
        .await
        .map_err(KeyringError::WrappingKey)?;
    sqlx::query(
        "UPDATE retention_windows SET state = 'expired', expired_at = coalesce(expired_at, now())
         WHERE starts = $1",
    )
    .bind(starts)
    .execute(pool)
    .await?;
    window.applied = true;
    tracing::info!(window = %starts, "retention window expired");
    Ok(())
}

/// The door's drop of the month of the window `starts` (its logins and quarantined bodies
/// gone), asked again while open transactions hold the tables past the door's lock timeout.
async fn drop_month(
    pool: &PgPool,
    starts: Date,
    keys: &[i64],
    progress: &dyn Progress,
) -> Result<(u64, u64), LifecycleError> {
    let mut attempt = 1;
    loop {
        let dropped: Result<(i64, i64), sqlx::Error> =
            sqlx::query_as("SELECT * FROM vault_expire_month($1, $2)")
                .bind(starts)
                .bind(keys)
                .fetch_one(pool)
                .await;
        match dropped {
            Ok((logins, quarantined)) => return Ok((logins as u64, quarantined as u64)),
            Err(error) if lock_not_available(&error) && attempt < DROP_ATTEMPTS => {
                attempt += 1;
                let until = Instant::now() + DROP_PAUSE;
                progress.waiting(WAITING_TO_DROP, until);
                tokio::time::sleep_until(until.into()).await;
            }
            Err(error) if lock_not_available(&error) => {
                return Err(LifecycleError::MonthHeld {
                    month: starts,
                    attempts: attempt,
                });
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// SQLSTATE 55P03: a lock timeout ran out.
fn lock_not_available(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "55P03")
}
