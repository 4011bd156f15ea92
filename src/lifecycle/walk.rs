//! The walk of a rotation over the rows under its retiring keys: in primary-key order, a page at
//! a time, each page rewritten on its own; passes until no row uses the retiring keys; progress
//! told to the caller, never printed.
//!
//! It knows nothing of the database: [`Pages`] and [`Rotation`] are what it needs of one. The
//! rotations in `rewrite` page through the key admin's doors (which audit each page and lock it,
//! `SKIP LOCKED`: rows an ingester is still writing are left to a later pass) and rewrite each
//! page in a transaction of its own; the tests below drive the walk with tables in memory.

use std::time::{Duration, Instant};

use super::LifecycleError;
use crate::progress::{Progress, Stopwatch, Unit};
use crate::vault::KeyId;

/// One table as a rotation walks it: its rows under the retiring keys, in primary-key order, a
/// page at a time, and the rewrite of a page under the new key.
pub(super) trait Pages {
    type Row;
    /// What holds a page's rows until it is rewritten (the database's open transaction, whose
    /// row locks keep others off them); dropped without a rewrite, it lets them go untouched.
    type Held;

    /// A row's primary key: the next page starts after the last row of this one.
    fn id(row: &Self::Row) -> i64;

    /// The page of rows after id `after`, empty at the end. Rows another writer holds are not
    /// waited for but skipped: they are still under a retiring key after the pass, so the
    /// rotation's [`Rotation::retire_if_unused`] asks for another.
    async fn fetch(&mut self, after: i64) -> Result<(Self::Held, Vec<Self::Row>), LifecycleError>;

    /// Rewrites the page under the new key and lets it go (commits).
    async fn rewrite(&mut self, held: Self::Held, rows: &[Self::Row])
    -> Result<(), LifecycleError>;
}

/// One pass over `pages`, from the first row to the end: each page is rewritten, then counted
/// in `tally`; the first empty page ends it.
pub(super) async fn pass_over<P: Pages>(
    pages: &mut P,
    tally: &mut Tally<'_>,
) -> Result<(), LifecycleError> {
    let mut after = 0;
    loop {
        let (held, rows) = pages.fetch(after).await?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = P::id(last);
        pages.rewrite(held, &rows).await?;
        tally.advance(rows.len() as u64);
    }
}

/// A rotation as the walk drives it: passes over its tables until its retiring keys protect no
/// row.
pub(super) trait Rotation {
    /// One pass over each of its tables ([`pass_over`]).
    async fn pass(&mut self, tally: &mut Tally<'_>) -> Result<(), LifecycleError>;

    /// The retiring keys, retired, if no row uses them any more (under their key-use lock, so
    /// that no writer can add one meanwhile); `None` if some row still does (one a writer held
    /// during the pass, or wrote since), which calls for another pass.
    async fn retire_if_unused(&mut self) -> Result<Option<Vec<KeyId>>, LifecycleError>;
}

/// Passes until the keys are retired: a pass that ends before `grace_ends` (until when running
/// ingesters may still write under the retiring keys) is followed by a wait to it and one more
/// pass; after that, passes go on until no row uses the keys. Returns the retired keys.
pub(super) async fn until_retired(
    rotation: &mut impl Rotation,
    grace_ends: Instant,
    tally: &mut Tally<'_>,
) -> Result<Vec<KeyId>, LifecycleError> {
    loop {
        rotation.pass(tally).await?;
        if Instant::now() < grace_ends {
            tally.wait_until(grace_ends).await;
            continue;
        }
        if let Some(retired) = rotation.retire_if_unused().await? {
            return Ok(retired);
        }
    }
}

/// Why a rotation or an expiry waits, as its progress says it.
pub(super) const GRACE: &str = "grace period for running ingesters";

/// Rows rewritten so far out of the total, told to the caller's [`Progress`] after every page,
/// and the walk's time, its grace wait apart.
pub(super) struct Tally<'a> {
    done: u64,
    clock: Stopwatch,
    progress: &'a dyn Progress,
}

/// What a walk did: rows rewritten, and its time, working and waiting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Walked {
    pub rows: u64,
    pub working: Duration,
    pub waited: Duration,
}

impl<'a> Tally<'a> {
    /// Starts `phase` over `total` rows.
    pub(super) fn new(phase: &str, total: u64, progress: &'a dyn Progress) -> Self {
        progress.start(phase, Unit::Count("rows"), Some(total));
        Self {
            done: 0,
            clock: Stopwatch::start_at(Instant::now()),
            progress,
        }
    }

    fn advance(&mut self, rows: u64) {
        self.done += rows;
        self.progress.advance(self.done);
    }

    /// Sleeps until `until`, the time told as a wait.
    async fn wait_until(&mut self, until: Instant) {
        self.clock.wait_at(Instant::now(), until);
        self.progress.waiting(GRACE, until);
        tokio::time::sleep_until(until.into()).await;
        self.clock.resume_at(Instant::now());
    }

    /// The walk is over: the caller is told, and gets what it did.
    pub(super) fn finish(self) -> Walked {
        self.progress.finish();
        let now = Instant::now();
        Walked {
            rows: self.done,
            working: self.clock.working_at(now),
            waited: self.clock.waited_at(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    const OLD: i64 = 1;
    const NEW: i64 = 2;

    /// A table in memory: each row's id and the key it is under. Rows in `held` are held by
    /// another writer, and skipped as the door's `SKIP LOCKED` skips them.
    struct Table {
        rows: BTreeMap<i64, i64>,
        held: BTreeSet<i64>,
        page_size: usize,
        /// The `after` of every fetch, in order.
        fetched_after: Vec<i64>,
        /// The ids of every page rewritten, in order.
        rewritten: Vec<Vec<i64>>,
        /// The rewrite fails (as a lost connection would).
        failing: bool,
    }

    impl Table {
        fn new(ids: impl IntoIterator<Item = i64>, page_size: usize) -> Self {
            Self {
                rows: ids.into_iter().map(|id| (id, OLD)).collect(),
                held: BTreeSet::new(),
                page_size,
                fetched_after: Vec::new(),
                rewritten: Vec::new(),
                failing: false,
            }
        }

        fn under(&self, key: i64) -> Vec<i64> {
            self.rows
                .iter()
                .filter(|(_, k)| **k == key)
                .map(|(id, _)| *id)
                .collect()
        }
    }

    impl Pages for Table {
        type Row = i64;
        type Held = ();

        fn id(row: &i64) -> i64 {
            *row
        }

        async fn fetch(&mut self, after: i64) -> Result<((), Vec<i64>), LifecycleError> {
            self.fetched_after.push(after);
            let page = self
                .rows
                .range(after + 1..)
                .filter(|(id, key)| **key == OLD && !self.held.contains(id))
                .map(|(id, _)| *id)
                .take(self.page_size)
                .collect();
            Ok(((), page))
        }

        async fn rewrite(&mut self, (): (), rows: &[i64]) -> Result<(), LifecycleError> {
            if self.failing {
                return Err(LifecycleError::Database(sqlx::Error::PoolTimedOut));
            }
            for id in rows {
                self.rows.insert(*id, NEW);
            }
            self.rewritten.push(rows.to_vec());
            Ok(())
        }
    }

    /// A rotation of one [`Table`]; `between_passes` is what other writers do while the
    /// walk is between two passes.
    struct OneTable {
        table: Table,
        between_passes: fn(&mut Table),
        passes: u32,
        retire_checks: u32,
    }

    impl OneTable {
        fn new(table: Table, between_passes: fn(&mut Table)) -> Self {
            Self {
                table,
                between_passes,
                passes: 0,
                retire_checks: 0,
            }
        }
    }

    impl Rotation for OneTable {
        async fn pass(&mut self, tally: &mut Tally<'_>) -> Result<(), LifecycleError> {
            pass_over(&mut self.table, tally).await?;
            self.passes += 1;
            (self.between_passes)(&mut self.table);
            Ok(())
        }

        async fn retire_if_unused(&mut self) -> Result<Option<Vec<KeyId>>, LifecycleError> {
            self.retire_checks += 1;
            Ok(self.table.under(OLD).is_empty().then(|| vec![KeyId(OLD)]))
        }
    }

    /// What the walk told its caller: the phase's total, each `done`, the waits (until, from
    /// the walk's start) and whether it finished, at which `done`.
    #[derive(Default)]
    struct Seen {
        total: Mutex<Option<u64>>,
        advances: Mutex<Vec<u64>>,
        waits: Mutex<Vec<(String, Instant)>>,
        finished: Mutex<Vec<u64>>,
    }

    impl Progress for Seen {
        fn start(&self, _phase: &str, _unit: Unit, total: Option<u64>) {
            *self.total.lock().unwrap() = total;
        }

        fn advance(&self, done: u64) {
            self.advances.lock().unwrap().push(done);
        }

        fn waiting(&self, why: &str, until: Instant) {
            self.waits.lock().unwrap().push((why.to_owned(), until));
        }

        fn finish(&self) {
            let last = self.advances.lock().unwrap().last().copied().unwrap_or(0);
            self.finished.lock().unwrap().push(last);
        }
    }

    #[tokio::test]
    async fn a_pass_resumes_after_each_pages_last_id_and_ends_at_the_first_empty_page() {
        // Gaps in the ids: the cursor is the last id seen, not a count of rows.
        let mut table = Table::new([3, 5, 8, 13, 21, 34, 55], 3);
        // A row already under another key is not handed out.
        table.rows.insert(4, NEW);
        let seen = Seen::default();
        let mut tally = Tally::new("re-encrypting", 7, &seen);

        pass_over(&mut table, &mut tally).await.unwrap();

        assert_eq!(table.fetched_after, [0, 8, 34, 55]);
        assert_eq!(table.rewritten, [vec![3, 5, 8], vec![13, 21, 34], vec![55]]);
        assert!(table.under(OLD).is_empty());
        assert_eq!(*seen.total.lock().unwrap(), Some(7));
        assert_eq!(*seen.advances.lock().unwrap(), [3, 6, 7]);
        assert!(seen.finished.lock().unwrap().is_empty());
        assert_eq!(tally.finish().rows, 7);
        assert_eq!(*seen.finished.lock().unwrap(), [7]);
    }

    #[tokio::test]
    async fn a_pass_over_nothing_fetches_once_and_rewrites_nothing() {
        let mut table = Table::new(std::iter::empty(), 100);
        let seen = Seen::default();
        let mut tally = Tally::new("re-encrypting", 0, &seen);

        pass_over(&mut table, &mut tally).await.unwrap();

        assert_eq!(table.fetched_after, [0]);
        assert!(table.rewritten.is_empty());
        assert!(seen.advances.lock().unwrap().is_empty());
        assert_eq!(tally.finish().rows, 0);
        assert_eq!(*seen.finished.lock().unwrap(), [0]);
    }

    #[tokio::test]
    async fn a_failed_rewrite_ends_the_pass_without_counting_its_page() {
        let mut table = Table::new(1..=10, 4);
        table.failing = true;
        let seen = Seen::default();
        let mut tally = Tally::new("re-encrypting", 10, &seen);

        let failed = pass_over(&mut table, &mut tally).await;

        assert!(
            matches!(failed, Err(LifecycleError::Database(_))),
            "{failed:?}"
        );
        assert_eq!(table.fetched_after, [0]);
        assert_eq!(table.under(OLD).len(), 10);
        assert!(seen.advances.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn rows_a_writer_holds_are_skipped_and_rewritten_by_another_pass() {
        let mut table = Table::new(1..=10, 4);
        table.held.extend([2, 7]);
        // The writer commits once the first pass is over.
        let mut rotation = OneTable::new(table, |table| table.held.clear());
        let seen = Seen::default();
        let mut tally = Tally::new("re-encrypting", 10, &seen);

        let retired = until_retired(&mut rotation, Instant::now(), &mut tally)
            .await
            .unwrap();

        assert_eq!(retired, [KeyId(OLD)]);
        assert_eq!(rotation.passes, 2);
        // The first pass was refused the retirement (rows 2 and 7 were still under the key).
        assert_eq!(rotation.retire_checks, 2);
        let table = &rotation.table;
        assert_eq!(
            table.rewritten,
            [vec![1, 3, 4, 5], vec![6, 8, 9, 10], vec![2, 7]]
        );
        // Each pass starts from the first row again, and ends at an empty page.
        assert_eq!(table.fetched_after, [0, 5, 10, 0, 7]);
        assert!(table.under(OLD).is_empty());
        assert_eq!(*seen.advances.lock().unwrap(), [4, 8, 10]);
        assert!(
            seen.waits.lock().unwrap().is_empty(),
            "no grace period left"
        );
        assert_eq!(tally.finish().rows, 10);
    }

    #[tokio::test]
    async fn rows_written_during_the_grace_period_are_rewritten_by_the_pass_after_it() {
        let grace = Duration::from_millis(250);
        let started = Instant::now();
        // An ingester that has not yet seen the key retiring writes one more row under it.
        let mut rotation = OneTable::new(Table::new(1..=10, 4), |table| {
            table.rows.entry(11).or_insert(OLD);
        });
        let seen = Seen::default();
        let mut tally = Tally::new("re-encrypting", 10, &seen);

        let retired = until_retired(&mut rotation, started + grace, &mut tally)
            .await
            .unwrap();

        assert_eq!(retired, [KeyId(OLD)]);
        assert!(started.elapsed() >= grace);
        assert_eq!(rotation.passes, 2);
        // Not asked during the grace period: the pass after it is the first to be checked.
        assert_eq!(rotation.retire_checks, 1);
        assert_eq!(rotation.table.rewritten.last(), Some(&vec![11]));
        // The total counted at the start; the row written since takes `done` past it.
        let walked = tally.finish();
        assert_eq!(walked.rows, 11);
        assert_eq!(*seen.finished.lock().unwrap(), [11]);
        assert_eq!(*seen.total.lock().unwrap(), Some(10));
        // The wait was announced, until the end of the grace period, and is not working time.
        assert_eq!(
            *seen.waits.lock().unwrap(),
            [(GRACE.to_owned(), started + grace)]
        );
        assert!(
            walked.waited > grace - Duration::from_millis(50),
            "{walked:?}"
        );
        assert!(walked.waited <= grace, "{walked:?}");
        assert!(
            walked.working + walked.waited <= started.elapsed(),
            "{walked:?}"
        );
    }
}
