//! What a rotation does to each page: values re-sealed under new data keys, tokens recomputed
//! under the new token key.

use std::collections::BTreeMap;

use sqlx::PgPool;
use time::Date;

use super::RotateError;
use super::walk::{Tally, Walk};
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

pub(super) async fn reseal_logins<W: KeyWrapper>(
    walk: &Walk<'_, W>,
    keys: &mut KeyCache,
    targets: &mut Targets,
    tally: &mut Tally<'_>,
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
        tally.advance(rows.len() as u64);
    }
    Ok(())
}

pub(super) async fn reseal_quarantine<W: KeyWrapper>(
    walk: &Walk<'_, W>,
    keys: &mut KeyCache,
    targets: &mut Targets,
    tally: &mut Tally<'_>,
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
        tally.advance(rows.len() as u64);
    }
    Ok(())
}

pub(super) async fn retokenize<W: KeyWrapper>(
    walk: &Walk<'_, W>,
    keys: &mut KeyCache,
    target: &Tokenizer,
    tally: &mut Tally<'_>,
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
        tally.advance(rows.len() as u64);
    }
    Ok(())
}
