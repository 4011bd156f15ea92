//! Retention windows: which KMS key wraps the data keys of a login's month.
//!
//! A window is a calendar month (UTC) of login dates with a KMS key of its own (migration
//! 0007). Its data keys are wrapped under that KMS key only, so scheduling the KMS key for
//! deletion when the window expires makes every copy of those data keys, backups included,
//! impossible to unwrap: crypto-shredding. A month with no window is sealed under the default
//! KMS key (deletable, not shreddable).

use sqlx::PgPool;
use time::{Date, Month};

use crate::sql_text::sql_text;

sql_text! {
    /// Where a window is in its life (`retention_windows.state`).
    pub enum WindowState {
        /// Its logins' values are sealed under its data keys.
        Active => "active",
        /// An expiry is deleting its values: ingesters no longer seal into it.
        Expiring => "expiring",
        /// Its values are gone, its data keys destroyed, its KMS key scheduled for deletion.
        Expired => "expired",
    }
}

/// One month's window.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Window {
    pub starts: Date,
    pub ends: Date,
    pub kms_key_id: String,
    pub state: WindowState,
}

/// Where a login's values go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement<'a> {
    /// Sealed under a data key of this window.
    Window(&'a Window),
    /// Its window has expired (or is expiring): not stored, quarantined without its body.
    Expired,
    /// No window covers it: sealed under a data key of the default KMS key.
    Unwindowed,
}

/// The windows known to this process.
#[derive(Debug, Clone, Default)]
pub struct Windows(Vec<Window>);

/// The first day of `date`'s month: a window's key.
pub fn month_of(date: Date) -> Date {
    date.replace_day(1).expect("every month has a first day")
}

/// The first day of the month after `starts`'s.
pub fn next_month(starts: Date) -> Date {
    let (year, month) = match starts.month() {
        Month::December => (starts.year() + 1, Month::January),
        month => (starts.year(), month.next()),
    };
    Date::from_calendar_date(year, month, 1).expect("the first of a month exists")
}

impl Windows {
    pub async fn load(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self(
            sqlx::query_as(
                "SELECT starts, ends, kms_key_id, state FROM retention_windows ORDER BY starts",
            )
            .fetch_all(pool)
            .await?,
        ))
    }

    pub fn placement(&self, login_date: Date) -> Placement<'_> {
        let starts = month_of(login_date);
        match self.0.iter().find(|w| w.starts == starts) {
            Some(window) if window.state == WindowState::Active => Placement::Window(window),
            Some(_) => Placement::Expired,
            None => Placement::Unwindowed,
        }
    }

    /// The window that starts on `starts`.
    pub fn get(&self, starts: Date) -> Option<&Window> {
        self.0.iter().find(|w| w.starts == starts)
    }

    #[cfg(test)]
    pub(crate) fn of(windows: Vec<Window>) -> Self {
        Self(windows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u8, d: u8) -> Date {
        Date::from_calendar_date(y, Month::try_from(m).unwrap(), d).unwrap()
    }

    fn window(starts: Date, state: WindowState) -> Window {
        Window {
            starts,
            ends: next_month(starts),
            kms_key_id: format!("arn:{starts}"),
            state,
        }
    }

    #[test]
    fn a_login_goes_to_the_window_of_its_month() {
        let windows = Windows::of(vec![
            window(date(2025, 1, 1), WindowState::Expired),
            window(date(2025, 2, 1), WindowState::Active),
            window(date(2025, 3, 1), WindowState::Expiring),
        ]);
        assert_eq!(windows.placement(date(2025, 1, 31)), Placement::Expired);
        assert!(matches!(windows.placement(date(2025, 2, 28)),
                         Placement::Window(w) if w.starts == date(2025, 2, 1)));
        assert_eq!(windows.placement(date(2025, 3, 1)), Placement::Expired);
        assert_eq!(windows.placement(date(2025, 4, 1)), Placement::Unwindowed);
        assert_eq!(next_month(date(2025, 12, 1)), date(2026, 1, 1));
        assert_eq!(month_of(date(2024, 2, 29)), date(2024, 2, 1));
    }
}
