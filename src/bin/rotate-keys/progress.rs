//! A rotation's progress as `rotate-keys` shows it: on a terminal, a line on stderr redrawn
//! at most every 200 ms; otherwise (a scheduler, a pipe) a log line every 5 seconds. Either way
//! a last one when the walk is over.

use std::io::IsTerminal;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use pii_vault::rotate;

pub struct ProgressLine {
    label: &'static str,
    started: Instant,
    last_shown: Mutex<Instant>,
    terminal: bool,
}

impl ProgressLine {
    /// `label` says what is done to the rows (`re-encrypting`, `re-tokenizing`).
    pub fn new(label: &'static str) -> Self {
        Self {
            label,
            started: Instant::now(),
            last_shown: Mutex::new(Instant::now()),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn show(&self, done: u64, total: u64) {
        let label = self.label;
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        if self.terminal {
            eprint!("\r{label}: {done}/{total} rows ({rate:.0} rows/s)   ");
        } else {
            // The target the library logged this line under before it left the drawing to
            // the binary, so that filters and log queries written for it still match.
            tracing::info!(
                target: "pii_vault::rotate",
                done,
                total,
                rows_per_second = rate as u64,
                "{label}"
            );
        }
    }
}

impl rotate::Progress for ProgressLine {
    fn advance(&self, done: u64, total: u64) {
        let every = if self.terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        let mut last_shown = self
            .last_shown
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last_shown.elapsed() >= every {
            *last_shown = Instant::now();
            drop(last_shown);
            self.show(done, total);
        }
    }

    fn finish(&self, done: u64, total: u64) {
        self.show(done, total);
        if self.terminal {
            eprintln!();
        }
    }
}
