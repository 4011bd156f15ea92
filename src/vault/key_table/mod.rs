//! The key table, `vault_keys`: every statement on it, its door (`vault_key_request` /
//! `vault_key_hand_out`) and its locks, as typed functions; what its `state` and `purpose`
//! columns hold, as [`KeyState`] and [`Purpose`]. Nothing else in the crate writes SQL on the
//! table or spells a key's state.
//!
//! A key moves through `active -> retiring -> retired (-> destroyed)`:
//! - **active**: new rows are written under it (one active token key; data keys, one per
//!   ingester and retention window);
//! - **retiring**: a rotation or an expiry is moving rows off it; it still opens what it
//!   sealed, and a retiring token key still tokenizes (an erasure is recorded under it too);
//! - **retired**: no row uses it any more ([`retire_unused`], under the key-use lock of
//!   [`key_use`]); its wrapped bytes are kept;
//! - **destroyed**: its wrapped bytes are gone, for good (the database refuses it while an
//!   erasure record still names the key).
//!
//! The parts: `rows` (making a key's row, re-wrapping it, handing it out, finding keys by
//! state), `states` (the moves between states, for rotations and expiries), [`status`] (each
//! key with what it protects) and [`key_use`] (the lock writers and rotations share).

pub mod key_use;
mod rows;
mod states;
mod status;

pub use rows::{
    NewKey, StoredKey, active_among, active_token_key, creation_times, data_keys, hand_out, insert,
    reserve_id, retiring, set_wrapped, tokenizing, windows_of,
};
pub use states::{
    destroy_retired, destroy_retired_in_window, retire_unused, start_data_rotation,
    start_token_rotation, start_window_retirement, usable_in_window, window_keys,
};
pub use status::{KeyStatus, live_window_keys, rewrappable, status, wraps_outside_window};

use crate::sql_text::sql_text;

sql_text! {
    /// Where a key is in its life (`vault_keys.state`; see the module docs).
    pub enum KeyState {
        /// New rows are written under it.
        Active => "active",
        /// Rows are being moved off it; it still opens what it sealed.
        Retiring => "retiring",
        /// No row uses it; its wrapped bytes are kept.
        Retired => "retired",
        /// Its wrapped bytes are gone: what it protected can no longer be opened.
        Destroyed => "destroyed",
    }
}

sql_text! {
    /// What a key is for. Stored in `vault_keys.purpose` and sent to KMS in the encryption
    /// context, so KMS key policies can allow each role exactly the operations its purpose
    /// needs.
    pub enum Purpose {
        /// The HMAC key behind the tokens.
        Token => "token",
        /// An AES-256-GCM-SIV key that seals personal values.
        Data => "data",
    }
}
