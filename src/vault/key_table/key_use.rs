//! Who may still use a key, and when a rotation may retire it, as a lock on the key's row of
//! `vault_keys`: a row lock only the roles that may update that table can take (the key admin,
//! and the ingester through the `vault_hold_keys` function), where an advisory lock could be
//! taken, and held forever, by any login.
//!
//! A writer holds the rows *shared* (`FOR SHARE`) on the keys its rows name, from before its
//! inserts until its transaction ends, and in the same statement counts those still usable
//! ([`hold_shared`]). A rotation locks them *exclusively* (`FOR UPDATE`) to retire keys
//! ([`hold_exclusive`]): it waits for every writer using them, then sees their rows and does
//! not retire; a writer that comes after waits for the rotation, then sees the key retired and
//! writes nothing. So no row is ever committed under a retired key. Rows are locked in key id
//! order, so writers and rotations cannot deadlock on them.
//!
//! It lives in `vault`, not beside either of its users, because it is the one lock both
//! `ingest` (its writers) and `lifecycle` (rotations, expiries) take, and both sit above
//! `vault`: neither may import the other, so the protocol between them is kept here, by the
//! keys it guards.

use sqlx::PgConnection;

/// Holds the keys of `$1::int8[]` shared; how many of them new rows may still use.
const HOLD_KEYS_SHARED: &str = "SELECT vault_hold_keys($1)";

/// Holds the keys of `$1::int8[]` exclusively.
const HOLD_KEYS_EXCLUSIVE: &str =
    "SELECT id FROM vault_keys WHERE id = ANY($1) ORDER BY id FOR UPDATE";

/// Holds `keys` shared until the transaction on `tx` ends; how many of them new rows may still
/// use (fewer than `keys`: one was retired, and nothing may be written under it).
pub async fn hold_shared(tx: &mut PgConnection, keys: &[i64]) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(HOLD_KEYS_SHARED)
        .bind(keys)
        .fetch_one(tx)
        .await
}

/// Holds `keys` exclusively until the transaction on `tx` ends, once every writer holding them
/// shared has committed or rolled back.
pub async fn hold_exclusive(tx: &mut PgConnection, keys: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query(HOLD_KEYS_EXCLUSIVE)
        .bind(keys)
        .execute(tx)
        .await?;
    Ok(())
}
