//! Who may still use a key, and when a rotation may retire it, as one lock per key id: an
//! advisory lock (class "pkey"), so that taking it needs no privilege on `vault_keys`.
//!
//! A writer holds it *shared* on the keys its rows name, from before its inserts until its
//! transaction ends, and checks the keys' states only once it holds it ([`HOLD_KEYS_SHARED`],
//! then [`KEYS_USABLE`]). A rotation takes it *exclusively* to retire keys
//! ([`HOLD_KEYS_EXCLUSIVE`]): it waits for every writer using them, then sees their rows and
//! does not retire; a writer that comes after waits for the rotation, then sees the key retired
//! and writes nothing. So no row is ever committed under a retired key. Locks are taken in key
//! id order, so writers and rotations cannot deadlock on them.
//!
//! It lives in `vault`, not beside either of its users, because it is the one lock both
//! `ingest` (its writers) and `rotate` take, and both sit above `vault`: neither may import
//! the other, so the protocol between them is kept here, by the keys it guards.

/// `pg_advisory_xact_lock_shared` on each id of `$1::int8[]`.
pub const HOLD_KEYS_SHARED: &str = "
SELECT pg_advisory_xact_lock_shared(1886086521, (k % 2147483648)::int4)
FROM (SELECT k FROM unnest($1::int8[]) AS k ORDER BY k) AS keys";

/// `pg_advisory_xact_lock` on each id of `$1::int8[]`.
pub const HOLD_KEYS_EXCLUSIVE: &str = "
SELECT pg_advisory_xact_lock(1886086521, (k % 2147483648)::int4)
FROM (SELECT k FROM unnest($1::int8[]) AS k ORDER BY k) AS keys";

/// How many of the ids in `$1` name a key new rows may still use.
pub const KEYS_USABLE: &str = "
SELECT count(*) FROM vault_keys WHERE id = ANY($1) AND state IN ('active', 'retiring')";
