//! Writing a batch to PostgreSQL: one transaction, a few statements, whatever the batch size.
//!
//! Logins go in by binary `COPY`, the cheapest way PostgreSQL has to take rows: one WAL record
//! per page instead of one per row, and no per-row executor. `COPY` has no `ON CONFLICT`, so
//! idempotency is kept another way: in the batch's transaction the writer looks up which of
//! its message keys are stored already and copies only the others, with login ids it has
//! reserved from the sequence, so the login and its vault row go in together. Should another
//! replica commit the same message between the look-up and the copy (a redelivery racing its
//! first delivery), the unique index refuses the copy and the batch is written again
//! ([`WriteError::Raced`]), when the look-up sees it.
//!
//! Both tables are partitioned by login month (migration 0017), and each month has its own
//! unique index of message keys (0022), so the look-up and the unique index go by (message key,
//! login month). A message from a queue keeps its date over every redelivery
//! ([`LoginDate::Sent`]); a file line is dated the day its source was first ingested
//! ([`LoginDate::Ingested`], [`first_day`]), which every replay repeats. So a message is looked
//! up in its batch's months only, and two deliveries racing meet at the unique index; file
//! lines are also looked up in the months of lines stored before migration 0021, which were
//! dated when ingested. A month without partitions refuses the copy ([`WriteError::NoPartition`]):
//! nothing is written, and the messages stay on the queue.
//!
//! A login never exists without its sealed
//! values (unless its user was erased after it was sent: then it has neither tokens nor
//! sealed values). Quarantined messages, rare, go in by `INSERT ... ON CONFLICT`, with their
//! bodies sealed, or withheld when their person is gone.

use std::collections::HashSet;

use sqlx::PgPool;
use sqlx::postgres::PgDatabaseError;

use super::batch::{Batch, LoginDate, LoginRow, Withheld};
use super::source::MessageKey;
use crate::vault::erasure::erasure_lock;
use crate::vault::key_table::key_use;

/// What one committed batch changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub stored: u64,
    pub quarantined: u64,
    /// Messages already stored (or quarantined) by an earlier delivery.
    pub duplicates: u64,
}

/// Searches only the batch's months, from `$2` (the first day of its first) to `$3` (the first
/// day after its last): each month's unique index holds for the whole month. A range prunes the
/// other months in a generic plan too, where a list of days (`= ANY`) prunes only in a plan
/// made for its values.
pub const STORED_KEYS_OF_MONTHS: &str = "SELECT message_id::text FROM user_logins
     WHERE message_id = ANY ($1::text[]::uuid[]) AND create_date >= $2 AND create_date < $3";

/// For file lines, also the months up to `lines_dated_when_ingested.through`: lines stored
/// before migration 0021 were dated the day they were ingested, not the day their source was
/// first ingested. No such month is read once they have expired (pruned as the query runs).
const STORED_KEYS_OF_FILE_LINES: &str = "
SELECT message_id::text FROM user_logins
 WHERE message_id = ANY ($1::text[]::uuid[]) AND create_date >= $2 AND create_date < $3
UNION ALL
SELECT message_id::text FROM user_logins
 WHERE message_id = ANY ($1::text[]::uuid[])
   AND create_date <= (SELECT through FROM lines_dated_when_ingested)";

/// Records `$1`'s first day, today, unless a run before this one did.
const ADD_FILE_SOURCE: &str = "INSERT INTO file_sources (source_key, first_day)
     VALUES ($1::text::uuid, (now() AT TIME ZONE 'UTC')::date) ON CONFLICT DO NOTHING";

const FILE_SOURCE_DAY: &str =
    "SELECT first_day FROM file_sources WHERE source_key = $1::text::uuid";

const RESERVE_LOGIN_IDS: &str =
    "SELECT nextval('user_logins_id_seq') FROM generate_series(1, $1::int4)";

/// How the unique index whose refusal means another writer stored one of the batch's messages
/// ends its name, in each month's partition (`user_logins_2026_12_message_id_key`, 0022).
const MESSAGE_KEY_INDEX: &str = "_message_id_key";

/// A withheld body (migration 0013) has neither a data key nor a user token.
const INSERT_QUARANTINE: &str = "
INSERT INTO quarantine (message_id, reason, body_bytes, sealed_body, sent_at, user_token,
                        data_key_id, token_key_id, body_withheld)
SELECT message_id, reason, body_bytes, sealed_body, sent_at, user_token,
       CASE WHEN sealed_body IS NOT NULL THEN $7 END,
       CASE WHEN user_token IS NOT NULL THEN $8 END, body_withheld
FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::bytea[], $5::timestamptz[], $6::text[],
            $9::text[])
    AS t(message_id, reason, body_bytes, sealed_body, sent_at, user_token, body_withheld)
ON CONFLICT (message_id) DO NOTHING";

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A key the batch was sealed or tokenized with was retired meanwhile (a rotation finished
    /// while this process had not yet moved off it): the batch must be made again.
    #[error("a key of this batch was retired by a rotation")]
    KeyRetired,
    /// A user was erased after the batch was made: it must be made again, knowing it.
    #[error("a user was erased after this batch was made")]
    ErasuresChanged,
    /// Another writer committed one of the batch's messages while this one was copying it:
    /// writing the batch again skips it.
    #[error("another writer stored a message of this batch meanwhile")]
    Raced,
    /// A login's month has no partition: `rotate-keys partitions` (or `window`) adds it.
    #[error("no partition for logins of {month}: `rotate-keys partitions --ahead N` adds months")]
    NoPartition { month: String },
}

/// Writes `batch` in one transaction. Nothing is visible (or acknowledged) unless it commits.
pub async fn write(pool: &PgPool, batch: &Batch) -> Result<Written, WriteError> {
    let mut tx = pool.begin().await?;
    // First hold the batch's keys, then check them (see `vault::key_table::key_use`): a rotation
    // cannot retire them before this commits, and if it already has, nothing is written.
    let keys = [batch.token_key_id.0, batch.data_key_id.0];
    let usable = key_use::hold_shared(&mut tx, &keys).await?;
    if usable < 2 {
        return Err(WriteError::KeyRetired); // dropping the transaction rolls it back
    }
    // Likewise for erasures: one cannot commit between this check and the commit below. The
    // batch decided with the erasures it knew which logins keep personal fields and which
    // quarantined bodies are withheld; a newer one means it must be made again.
    let newest: i64 = sqlx::query_scalar(erasure_lock::HOLD_SHARED)
        .fetch_one(&mut *tx)
        .await?;
    if newest > batch.erasures_seen {
        return Err(WriteError::ErasuresChanged);
    }
    let mut written = Written::default();
    if !batch.logins.is_empty() {
        written.stored = copy_logins(&mut tx, batch).await?;
        written.duplicates += batch.logins.len() as u64 - written.stored;
    }
    if !batch.quarantined.is_empty() {
        let rows = &batch.quarantined;
        let quarantined = sqlx::query(INSERT_QUARANTINE)
            .bind(
                rows.iter()
                    .map(|r| r.message_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.body_bytes).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.body.sealed()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.sent_at).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|r| r.body.user_token().map(|t| t.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(batch.data_key_id)
            .bind(batch.token_key_id)
            .bind(
                rows.iter()
                    .map(|r| r.body.withheld().map(Withheld::as_str))
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
        written.quarantined = quarantined;
        written.duplicates += rows.len() as u64 - quarantined;
    }
    tx.commit().await?;
    Ok(written)
}

/// The day the lines of the file source `source` are dated: the day it was first ingested,
/// recorded now if this is its first run (migration 0021). Two first runs at once record one.
pub async fn first_day(pool: &PgPool, source: MessageKey) -> Result<time::Date, sqlx::Error> {
    let key = source.to_text();
    sqlx::query(ADD_FILE_SOURCE)
        .bind(&key)
        .execute(pool)
        .await?;
    sqlx::query_scalar(FILE_SOURCE_DAY)
        .bind(&key)
        .fetch_one(pool)
        .await
}

/// Copies the batch's logins not stored yet, and their vault rows; returns how many.
async fn copy_logins(tx: &mut sqlx::PgConnection, batch: &Batch) -> Result<u64, WriteError> {
    // Each message's key, and the key's text: what the look-up binds and, where it differs
    // from the id as received, the sign that the id's text is stored beside its key.
    let keys: Vec<(MessageKey, String)> = batch
        .logins
        .iter()
        .map(|row| {
            let key = MessageKey::of(&row.message_id);
            (key, key.to_text())
        })
        .collect();
    let texts: Vec<&str> = keys.iter().map(|(_, text)| text.as_str()).collect();
    let file_lines = batch
        .logins
        .iter()
        .any(|row| matches!(row.create_date, LoginDate::Ingested(_)));
    let (first_day, after_last_day) =
        months_spanned(batch.logins.iter().map(|r| r.create_date.day()))
            .expect("a batch with logins");
    let look_up = if file_lines {
        STORED_KEYS_OF_FILE_LINES
    } else {
        STORED_KEYS_OF_MONTHS
    };
    let stored: HashSet<String> = sqlx::query_scalar(look_up)
        .bind(&texts)
        .bind(first_day)
        .bind(after_last_day)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
    let mut copied = HashSet::with_capacity(keys.len());
    let new: Vec<(&LoginRow, &(MessageKey, String))> = batch
        .logins
        .iter()
        .zip(&keys)
        .filter(|(_, (key, text))| !stored.contains(text) && copied.insert(*key))
        .collect();
    if new.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = sqlx::query_scalar(RESERVE_LOGIN_IDS)
        .bind(i32::try_from(new.len()).expect("batches are far smaller than 2^31"))
        .fetch_all(&mut *tx)
        .await?;

    // Each column named beside its value: the COPY's column list and each row's field count
    // are derived from these lines, so a column is added with one line.
    let mut logins = CopyRows::new("user_logins", new.len() * 320);
    let mut vault = CopyRows::new("login_vault", new.len() * 140);
    for ((row, (key, text)), &id) in new.iter().zip(&ids) {
        let id_text = (*text != row.message_id).then_some(row.message_id.as_str());
        let personal = row.personal.as_ref();
        let clear = &row.in_clear;
        logins.row(|r| {
            r.int8("id", id);
            r.bytes("message_id", Some(&key.0));
            r.text("message_id_text", id_text);
            r.text("user_id", Some(&clear.user_id));
            r.text("device_type", Some(&clear.device_type));
            r.text("masked_ip", personal.map(|p| p.masked_ip.as_str()));
            r.text(
                "masked_device_id",
                personal.map(|p| p.masked_device_id.as_str()),
            );
            r.text("locale", clear.locale.as_deref());
            r.int4("app_version", clear.app_version.encoded);
            r.text("app_version_text", Some(&clear.app_version.text));
            r.date("create_date", row.create_date.day());
            r.int8("token_key_id", batch.token_key_id.0);
        });
        if let Some(personal) = personal {
            vault.row(|r| {
                r.int8("login_id", id);
                r.int8("data_key_id", batch.data_key_id.0);
                r.bytes("sealed_ip", Some(&personal.sealed_ip));
                r.bytes("sealed_device_id", Some(&personal.sealed_device_id));
                r.date("create_date", row.create_date.day());
            });
        }
    }
    let stored = copy(tx, logins).await?;
    // A batch whose logins all keep no personal field (erased users, an expired window) has no
    // vault rows, and sends no COPY to `login_vault` at all.
    copy(tx, vault).await?;
    Ok(stored)
}

/// Sends `rows` by `COPY`; returns how many went in (none is sent when there are none).
async fn copy(tx: &mut sqlx::PgConnection, rows: CopyRows) -> Result<u64, WriteError> {
    let Some(statement) = rows.statement() else {
        return Ok(0);
    };
    let mut copy = tx.copy_in_raw(&statement).await?;
    copy.send(rows.finish()).await?;
    copy.finish().await.map_err(|error| match &error {
        sqlx::Error::Database(e)
            if e.constraint()
                .is_some_and(|name| name.ends_with(MESSAGE_KEY_INDEX)) =>
        {
            WriteError::Raced
        }
        sqlx::Error::Database(e) if e.message().starts_with("no partition of relation") => {
            WriteError::NoPartition {
                month: failing_month(e.try_downcast_ref::<PgDatabaseError>()),
            }
        }
        _ => WriteError::Database(error),
    })
}

/// The first day of the first month of `days`, and the first day after the last month: the
/// months a batch's keys are looked up in (none without days).
fn months_spanned(days: impl IntoIterator<Item = time::Date>) -> Option<(time::Date, time::Date)> {
    let (first, last) = days.into_iter().fold(None, |span, day| match span {
        None => Some((day, day)),
        Some((first, last)) => Some((day.min(first), day.max(last))),
    })?;
    let month_after_last = match last.month() {
        time::Month::December => (last.year() + 1, time::Month::January),
        month => (last.year(), month.next()),
    };
    Some((
        first.replace_day(1).expect("every month has a first day"),
        time::Date::from_calendar_date(month_after_last.0, month_after_last.1, 1)
            .expect("a valid month"),
    ))
}

/// The month of the row a partitioned table had no partition for, from the error's detail:
/// "Partition key of the failing row contains (create_date) = (2027-05-01)." (a date, never
/// personal).
fn failing_month(error: Option<&PgDatabaseError>) -> String {
    error
        .and_then(PgDatabaseError::detail)
        .and_then(|detail| detail.split_once("= (")?.1.get(..7).map(str::to_owned))
        .unwrap_or_else(|| "a month".to_owned())
}

/// One table's rows in PostgreSQL's binary `COPY` format: a header, then per row a field count
/// and per field a length (-1 for NULL) and the value in the type's binary form. Each field is
/// written with its column's name; the first row's names are the statement's column list, and
/// every row must name the same columns in the same order (a missing value is a NULL).
struct CopyRows {
    table: &'static str,
    columns: Vec<&'static str>,
    buffer: Vec<u8>,
    rows: usize,
}

/// The row being written, and how many fields it has so far.
struct Row<'c> {
    rows: &'c mut CopyRows,
    fields: usize,
}

impl CopyRows {
    fn new(table: &'static str, capacity: usize) -> Self {
        let mut buffer = Vec::with_capacity(capacity + 19);
        buffer.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buffer.extend_from_slice(&0i32.to_be_bytes()); // flags
        buffer.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        CopyRows {
            table,
            columns: Vec::new(),
            buffer,
            rows: 0,
        }
    }

    /// Appends one row, whose fields `fill` writes; its field count is patched in after.
    fn row(&mut self, fill: impl FnOnce(&mut Row<'_>)) {
        let start = self.buffer.len();
        self.buffer.extend_from_slice(&0i16.to_be_bytes());
        let mut row = Row {
            rows: self,
            fields: 0,
        };
        fill(&mut row);
        let fields = row.fields;
        assert_eq!(
            fields,
            self.columns.len(),
            "every row of {} names the same columns",
            self.table
        );
        let count = i16::try_from(fields).expect("a table has far fewer than 2^15 columns");
        self.buffer[start..start + 2].copy_from_slice(&count.to_be_bytes());
        self.rows += 1;
    }

    /// `COPY <table> (<columns>) FROM STDIN (FORMAT binary)`, or `None` before the first row.
    fn statement(&self) -> Option<String> {
        (self.rows > 0).then(|| {
            format!(
                "COPY {} ({}) FROM STDIN (FORMAT binary)",
                self.table,
                self.columns.join(", ")
            )
        })
    }

    fn finish(mut self) -> Vec<u8> {
        self.buffer.extend_from_slice(&(-1i16).to_be_bytes());
        self.buffer
    }
}

impl Row<'_> {
    fn column(&mut self, name: &'static str) {
        if self.rows.rows == 0 {
            self.rows.columns.push(name);
        } else {
            debug_assert_eq!(self.rows.columns.get(self.fields), Some(&name));
        }
        self.fields += 1;
    }

    fn bytes(&mut self, column: &'static str, value: Option<&[u8]>) {
        self.column(column);
        let buffer = &mut self.rows.buffer;
        match value {
            Some(value) => {
                let len = i32::try_from(value.len()).expect("fields are bounded by the body limit");
                buffer.extend_from_slice(&len.to_be_bytes());
                buffer.extend_from_slice(value);
            }
            None => buffer.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }

    fn text(&mut self, column: &'static str, value: Option<&str>) {
        self.bytes(column, value.map(str::as_bytes));
    }

    fn int4(&mut self, column: &'static str, value: i32) {
        self.bytes(column, Some(&value.to_be_bytes()));
    }

    fn int8(&mut self, column: &'static str, value: i64) {
        self.bytes(column, Some(&value.to_be_bytes()));
    }

    /// Days since 2000-01-01, PostgreSQL's epoch.
    fn date(&mut self, column: &'static str, value: time::Date) {
        const POSTGRES_EPOCH_JULIAN_DAY: i32 = 2_451_545;
        self.int4(column, value.to_julian_day() - POSTGRES_EPOCH_JULIAN_DAY);
    }
}

#[cfg(test)]
mod tests {
    use super::{CopyRows, months_spanned};
    use time::{Date, Month};

    #[test]
    fn a_batch_is_looked_up_from_its_first_month_to_its_last() {
        let day = |y, m, d| Date::from_calendar_date(y, m, d).unwrap();
        assert_eq!(
            months_spanned([
                day(2024, Month::March, 9),
                day(2024, Month::February, 29),
                day(2024, Month::March, 1),
            ]),
            Some((day(2024, Month::February, 1), day(2024, Month::April, 1)))
        );
        assert_eq!(
            months_spanned([day(2027, Month::January, 1), day(2026, Month::December, 31)]),
            Some((day(2026, Month::December, 1), day(2027, Month::February, 1)))
        );
        assert_eq!(
            months_spanned([day(2026, Month::December, 31)]),
            Some((day(2026, Month::December, 1), day(2027, Month::January, 1)))
        );
        assert_eq!(months_spanned([]), None);
    }

    #[test]
    fn rows_are_framed_and_the_column_list_comes_from_the_fields() {
        let mut rows = CopyRows::new("t", 0);
        assert_eq!(rows.statement(), None, "no row, no statement");
        let day = time::Date::from_calendar_date(2000, time::Month::January, 2).unwrap();
        for text in ["ab", "c"] {
            rows.row(|r| {
                r.text("a", Some(text));
                r.text("b", None);
                r.date("c", day);
            });
        }
        assert_eq!(
            rows.statement().as_deref(),
            Some("COPY t (a, b, c) FROM STDIN (FORMAT binary)")
        );
        let bytes = rows.finish();
        let mut want = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        want.extend_from_slice(&[0, 3, 0, 0, 0, 2, b'a', b'b', 0xff, 0xff, 0xff, 0xff]);
        want.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 3, 0, 0, 0, 1, b'c', 0xff, 0xff, 0xff, 0xff]);
        want.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 1, 0xff, 0xff]);
        assert_eq!(bytes, want);
    }

    #[test]
    #[should_panic(expected = "every row of t names the same columns")]
    fn a_row_missing_a_column_is_refused_before_it_is_sent() {
        let mut rows = CopyRows::new("t", 0);
        rows.row(|r| {
            r.int8("a", 1);
            r.int8("b", 2);
        });
        rows.row(|r| r.int8("a", 1));
    }
}
