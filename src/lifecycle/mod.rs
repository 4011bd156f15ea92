//! The vault's lifecycle, as the key admin runs it (`rotate-keys`): keys rotated online,
//! re-wrapped under another KMS key, users erased, retention windows registered and expired.
//! Each goes through the key admin's doors and the key table ([`crate::vault::key_table`]).
//!
//! The module's parts:
//! - `rotation`: the two rotations ([`replace_keys`]), their options and report;
//! - `walk`: a rotation's walk over the rows under the retiring keys, page after page and pass
//!   after pass until no row uses them, with its progress and its grace wait told to the
//!   caller's [`Progress`](crate::progress::Progress) (the library prints nothing); it needs no
//!   database, and its unit tests drive it with tables in memory;
//! - `rewrite`: the two rotations over the database: their pages, read through the key admin's
//!   doors, and what is done to each (values re-sealed under new data keys, a fresh one
//!   whenever one is full; tokens recomputed under the new token key);
//! - `rewrap`: re-wrapping the keys outside retention windows under another KMS key;
//! - `erasure`: a user's erasure through the door, its records carried to each new token
//!   key, witnessed outside the database, and re-applied to a restored database;
//! - `retention`: retention windows: registering one (and what its KMS key may be), and
//!   expiring them;
//! - `months`: the month partitions logins are stored in, added ahead of time;
//! - [`status`]: every key with what it protects, from the key table.

mod erasure;
mod months;
mod retention;
mod rewrap;
mod rewrite;
mod rotation;
mod walk;

use time::Date;

use crate::audit::witness::WitnessError;
use crate::vault::handed_out::{IntegrityError, OpenRowError, RowId};
use crate::vault::keyring::KeyringError;

pub use crate::vault::key_table::{KeyStatus, status};
pub use erasure::{
    Erased, Erasure, Reapplied, Witnessed, erase, reapply_erasures, witness_erasures,
};
pub use months::{add_month, add_months_ahead};
pub use retention::{Expiry, WindowExpiry, add_window, expire};
pub use rewrap::{Rewrapped, rewrap};
pub use rotation::{Options, Report, replace_keys};

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
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
    /// `rewrap` to the KMS key of a retention window.
    #[error("{kms_key} is the KMS key of retention window {month}: {why}; nothing was re-wrapped")]
    WindowKeyTaken {
        kms_key: String,
        month: Date,
        why: &'static str,
    },
    /// `erase` of a user id that nothing stored names, without `--in-flight`.
    #[error(
        "no login and no quarantined message names this user id; nothing was erased (check the id; \
         to record the erasure for messages still on the queue, pass --in-flight)"
    )]
    NoSuchUser,
    /// An erasure record whose sealed user id does not open under its token key.
    #[error("erasure record {id} does not open under its token key; nothing was carried")]
    ErasureRecord { id: i64 },
    /// The witness store could not take or give an erasure.
    #[error("erasure witness: {0}")]
    NotWitnessed(String),
    #[error("{0}")]
    Witness(#[from] WitnessError),
    /// `expire` could not drop a month: open transactions held its tables every time.
    #[error(
        "the logins of {month} were not dropped: open transactions on user_logins or login_vault \
         held them through {attempts} attempts; nothing of the month was dropped, run expire again"
    )]
    MonthHeld { month: Date, attempts: u32 },
    /// `add-window` with a KMS key that wraps something outside the window.
    #[error("{kms_key} cannot be the KMS key of retention window {month}: {why}")]
    WindowKeyRefused {
        kms_key: String,
        month: Date,
        why: &'static str,
    },
}

impl From<OpenRowError> for LifecycleError {
    fn from(error: OpenRowError) -> Self {
        match error {
            OpenRowError::Keys(e) => LifecycleError::Keys(e),
            OpenRowError::Integrity { row, error } => LifecycleError::Integrity { row, error },
        }
    }
}
