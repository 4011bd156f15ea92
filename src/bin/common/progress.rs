//! Progress as every binary shows it (each includes this file): on a terminal, a bar on stderr
//! (indicatif); otherwise (a scheduler, a pipe, a log collector) a log line every 5 seconds
//! ([`LogLines`]; `PROGRESS_LOG_SECONDS` sets another interval), one when a wait begins and
//! a last one when the phase is over. Rates count working time: waits are left out.
//!
//! The bar is never drawn unless stderr is a terminal (and not a `dumb` one). While it is
//! drawn, it is registered with [`progress::draw_aside`], so that log lines written through
//! [`progress::LogWriter`] set it aside instead of landing inside it.

// Each binary uses its own part of it.
#![allow(dead_code)]

use std::io::IsTerminal;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pii_vault::progress::{self, LogLines, Progress, Snapshot, Tracker, Unit};

/// Between two log lines, unless `PROGRESS_LOG_SECONDS` says otherwise.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// Between two updates of the bar's rate.
const BAR_EVERY: Duration = Duration::from_millis(200);
/// How often the bar is redrawn even when nothing advances (a spinner, a wait).
const BAR_TICK: Duration = Duration::from_millis(250);

/// How often a watcher of a count (a file being read, a queue drained) tells the reporter.
pub const POLL_EVERY: Duration = Duration::from_millis(200);

/// What a binary reports progress to.
pub enum Reporter {
    Bar(Bar),
    Log(LogLines),
}

impl Reporter {
    /// A bar if stderr is a terminal, log lines otherwise.
    pub fn new() -> Self {
        let dumb = std::env::var_os("TERM").is_some_and(|term| term == "dumb");
        if std::io::stderr().is_terminal() && !dumb {
            Reporter::Bar(Bar::default())
        } else {
            Self::log_lines()
        }
    }

    /// Log lines, whatever stderr is (a daemon's progress).
    pub fn log_lines() -> Self {
        Reporter::Log(LogLines::new(log_every()))
    }
}

/// `PROGRESS_LOG_SECONDS` (a number of seconds, fractions allowed), or 5 seconds.
fn log_every() -> Duration {
    let Ok(text) = std::env::var("PROGRESS_LOG_SECONDS") else {
        return LOG_EVERY;
    };
    match text.trim().parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Duration::from_secs_f64(seconds),
        _ => {
            tracing::warn!(
                value = %text,
                "PROGRESS_LOG_SECONDS is not a number of seconds; logging progress every 5 s"
            );
            LOG_EVERY
        }
    }
}

impl Progress for Reporter {
    fn start(&self, phase: &str, unit: Unit, total: Option<u64>) {
        match self {
            Reporter::Bar(bar) => bar.start(phase, unit, total),
            Reporter::Log(log) => log.start(phase, unit, total),
        }
    }

    fn advance(&self, done: u64) {
        match self {
            Reporter::Bar(bar) => bar.advance(done),
            Reporter::Log(log) => log.advance(done),
        }
    }

    fn waiting(&self, why: &str, until: Instant) {
        match self {
            Reporter::Bar(bar) => bar.waiting(why, until),
            Reporter::Log(log) => log.waiting(why, until),
        }
    }

    fn finish(&self) {
        match self {
            Reporter::Bar(bar) => bar.finish(),
            Reporter::Log(log) => log.finish(),
        }
    }
}

/// A bar on stderr, one phase at a time. indicatif's own rate would count waits; the rate and
/// the time left shown are the [`Tracker`]'s.
pub struct Bar {
    tracker: Mutex<Tracker>,
    drawn: Mutex<Option<Drawn>>,
}

struct Drawn {
    bar: ProgressBar,
    unit: Unit,
    /// A wait is shown: the next advance replaces it with the rate at once.
    waiting: bool,
}

impl Default for Bar {
    fn default() -> Self {
        Self {
            tracker: Mutex::new(Tracker::new(BAR_EVERY)),
            drawn: Mutex::new(None),
        }
    }
}

impl Bar {
    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn drawn(&self) -> std::sync::MutexGuard<'_, Option<Drawn>> {
        self.drawn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Leaves the phase's bar on screen as it is, and stops setting it aside for log lines.
    fn end(drawn: &mut Option<Drawn>, last: Option<Snapshot>) {
        if let Some(Drawn { bar, unit, .. }) = drawn.take() {
            progress::draw_aside(None);
            match last {
                Some(last) => bar.finish_with_message(summary(&last, unit)),
                None => bar.abandon(),
            }
        }
    }
}

impl Progress for Bar {
    fn start(&self, phase: &str, unit: Unit, total: Option<u64>) {
        let mut drawn = self.drawn();
        let last = self.tracker().finish(Instant::now());
        Self::end(&mut drawn, last);
        self.tracker().start(Instant::now(), phase, unit, total);
        let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
        bar.set_style(style(unit, total.is_some()));
        bar.set_prefix(phase.to_owned());
        bar.enable_steady_tick(BAR_TICK);
        let weak = bar.downgrade();
        progress::draw_aside(Some(Arc::new(move |write: &mut dyn FnMut()| {
            match weak.upgrade() {
                Some(bar) => bar.suspend(write),
                None => write(),
            }
        })));
        *drawn = Some(Drawn {
            bar,
            unit,
            waiting: false,
        });
    }

    fn advance(&self, done: u64) {
        let mut drawn = self.drawn();
        let Some(Drawn { bar, unit, waiting }) = drawn.as_mut() else {
            return;
        };
        bar.set_position(done);
        let mut tracker = self.tracker();
        let due = match tracker.advance(Instant::now(), done) {
            None if *waiting => tracker.snapshot(Instant::now()),
            due => due,
        };
        if let Some(snapshot) = due {
            *waiting = false;
            bar.set_message(rate(&snapshot, *unit));
        }
    }

    fn waiting(&self, why: &str, until: Instant) {
        let mut drawn = self.drawn();
        let Some(Drawn { bar, waiting, .. }) = drawn.as_mut() else {
            return;
        };
        let now = Instant::now();
        self.tracker().waiting(now, until);
        *waiting = true;
        let wait = short(until.saturating_duration_since(now));
        bar.set_message(format!("waiting {wait}: {why}"));
    }

    fn finish(&self) {
        let mut drawn = self.drawn();
        let last = self.tracker().finish(Instant::now());
        Self::end(&mut drawn, last);
    }
}

impl Drop for Bar {
    /// An operation that failed mid-phase leaves its bar where it stopped.
    fn drop(&mut self) {
        Self::end(&mut self.drawn(), None);
    }
}

fn style(unit: Unit, with_total: bool) -> ProgressStyle {
    let count = match unit {
        Unit::Bytes if with_total => "{binary_bytes}/{binary_total_bytes}".to_owned(),
        Unit::Bytes => "{binary_bytes}".to_owned(),
        Unit::Count(name) if with_total => format!("{{human_pos}}/{{human_len}} {name}"),
        Unit::Count(name) => format!("{{human_pos}} {name}"),
    };
    // `wide_msg`: the message is cut to the terminal's width, so the bar stays one line.
    let template = if with_total {
        format!("{{prefix}} [{{bar:20}}] {count} {{wide_msg}}")
    } else {
        format!("{{spinner}} {{prefix}} {count} {{wide_msg}}")
    };
    // ASCII only: widths are right without indicatif's unicode-width feature.
    ProgressStyle::with_template(&template)
        .expect("a valid template")
        .progress_chars("=> ")
        .tick_chars("|/-\\ ")
}

fn per_second(snapshot: &Snapshot, unit: Unit) -> String {
    let rate = snapshot.rate();
    match unit {
        Unit::Bytes => format!("{}/s", HumanBytes(rate as u64)),
        Unit::Count(name) => format!("{rate:.0} {name}/s"),
    }
}

/// The bar's message while it advances: the rate, and the time left when known.
fn rate(snapshot: &Snapshot, unit: Unit) -> String {
    let rate = per_second(snapshot, unit);
    match snapshot.left() {
        Some(left) if left >= Duration::from_secs(1) => format!("({rate}, ~{} left)", short(left)),
        _ => format!("({rate})"),
    }
}

/// The bar's message once the phase is over.
fn summary(last: &Snapshot, unit: Unit) -> String {
    let working = last.working.as_secs_f64();
    let rate = per_second(last, unit);
    if last.waited.is_zero() {
        format!("({rate} over {working:.2}s)")
    } else {
        let waited = last.waited.as_secs_f64();
        format!("({rate} over {working:.2}s of work; waited {waited:.2}s)")
    }
}

/// A duration as few characters as a bar can spare: `42s`, `3m05s`, `2h07m`.
fn short(duration: Duration) -> String {
    let seconds = duration.as_secs_f64().round() as u64;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}
