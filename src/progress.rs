//! How far a long operation is, told to whoever runs it. The library draws nothing and prints
//! nothing: an operation (a rotation, an expiry, a verification, a file read by `ingest`)
//! reports to the caller's [`Progress`], and the binaries choose how to show it (a bar on a
//! terminal; otherwise [`LogLines`], a log line every few seconds).
//!
//! Rates count working time only: a wait the operation announces ([`Progress::waiting`], e.g.
//! a rotation's grace period for running ingesters) is timed apart ([`Stopwatch`]), so a rate
//! says how fast the work went, not how long the operation was told to hold still.
//!
//! Log lines written to stderr while a bar is drawn there go through [`LogWriter`], which sets
//! the bar aside for each line (the binary that draws one registers how with [`draw_aside`]).

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// What a phase counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Things counted one by one, named by their plural (`rows`, `keys`, `messages`).
    Count(&'static str),
    /// Bytes (of a file read).
    Bytes,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Count(name) => name,
            Unit::Bytes => "bytes",
        }
    }
}

/// Where a long operation is. Called from the operation's task after each step; an
/// implementation keeps it cheap (it decides how often to show anything).
pub trait Progress: Sync {
    /// A phase begins: `phase` says what is done (`re-encrypting`), `total` how many `unit`s
    /// there are, when known. A phase started while another runs ends that one.
    fn start(&self, phase: &str, unit: Unit, total: Option<u64>);
    /// `done` units so far in the phase. It may pass `total`: rows written meanwhile by
    /// others, or a row done again by a later pass, count too.
    fn advance(&self, done: u64);
    /// Nothing is done until `until`, because of `why`; the time is not working time. The next
    /// call ends the wait (at `until` at the latest).
    fn waiting(&self, why: &str, until: Instant);
    /// The phase is over, at the last `done`.
    fn finish(&self);
}

/// Progress nobody watches.
impl Progress for () {
    fn start(&self, _phase: &str, _unit: Unit, _total: Option<u64>) {}
    fn advance(&self, _done: u64) {}
    fn waiting(&self, _why: &str, _until: Instant) {}
    fn finish(&self) {}
}

/// Time since a start, split into waiting and working. Every reading takes `now`, so that
/// tests can drive it with instants of their own.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch {
    started: Instant,
    /// Waits that are over.
    waited: Duration,
    /// The wait under way: from when, until when at the latest.
    wait: Option<(Instant, Instant)>,
}

impl Stopwatch {
    pub fn start_at(now: Instant) -> Self {
        Self {
            started: now,
            waited: Duration::ZERO,
            wait: None,
        }
    }

    /// A wait from `now` until `until` begins (ending any wait under way).
    pub fn wait_at(&mut self, now: Instant, until: Instant) {
        self.resume_at(now);
        self.wait = Some((now, until.max(now)));
    }

    /// The wait under way, if any, is over at `now`: it counts until then, or until its `until`
    /// if that came first (time past it was spent working).
    pub fn resume_at(&mut self, now: Instant) {
        if let Some((from, until)) = self.wait.take() {
            self.waited += now.min(until).saturating_duration_since(from);
        }
    }

    /// Waiting time up to `now`, the wait under way included.
    pub fn waited_at(&self, now: Instant) -> Duration {
        let under_way = self.wait.map_or(Duration::ZERO, |(from, until)| {
            now.min(until).saturating_duration_since(from)
        });
        self.waited + under_way
    }

    pub fn elapsed_at(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// Working time up to `now`: the elapsed time less the waits.
    pub fn working_at(&self, now: Instant) -> Duration {
        self.elapsed_at(now).saturating_sub(self.waited_at(now))
    }
}

/// `done` over `working`, per second (0 before any time has passed).
pub fn per_second(done: u64, working: Duration) -> f64 {
    let seconds = working.as_secs_f64();
    if seconds > 0.0 {
        done as f64 / seconds
    } else {
        0.0
    }
}

/// A phase as a line of progress shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub phase: String,
    pub unit: Unit,
    pub done: u64,
    pub total: Option<u64>,
    pub working: Duration,
    pub waited: Duration,
}

impl Snapshot {
    /// Units per second of working time.
    pub fn rate(&self) -> f64 {
        per_second(self.done, self.working)
    }

    /// Working time still needed at the rate so far, when the total is known.
    pub fn left(&self) -> Option<Duration> {
        let rate = self.rate();
        let total = self.total?;
        (rate > 0.0).then(|| Duration::from_secs_f64(total.saturating_sub(self.done) as f64 / rate))
    }
}

/// The bookkeeping behind a [`Progress`] that shows lines: the phase under way, its
/// [`Stopwatch`], and when a line was last due. Every call takes `now`.
#[derive(Debug)]
pub struct Tracker {
    every: Duration,
    phase: Option<Phase>,
}

#[derive(Debug)]
struct Phase {
    name: String,
    unit: Unit,
    total: Option<u64>,
    done: u64,
    clock: Stopwatch,
    shown: Instant,
}

impl Tracker {
    /// Progress lines are due at most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self { every, phase: None }
    }

    pub fn start(&mut self, now: Instant, name: &str, unit: Unit, total: Option<u64>) {
        self.phase = Some(Phase {
            name: name.to_owned(),
            unit,
            total,
            done: 0,
            clock: Stopwatch::start_at(now),
            shown: now,
        });
    }

    /// Counts `done`; the snapshot when a line is due (`every` since the last one).
    pub fn advance(&mut self, now: Instant, done: u64) -> Option<Snapshot> {
        let phase = self.phase.as_mut()?;
        phase.clock.resume_at(now);
        phase.done = done;
        if now.saturating_duration_since(phase.shown) < self.every {
            return None;
        }
        phase.shown = now;
        self.snapshot(now)
    }

    /// A wait begins; its line is always due.
    pub fn waiting(&mut self, now: Instant, until: Instant) -> Option<Snapshot> {
        let phase = self.phase.as_mut()?;
        phase.clock.wait_at(now, until);
        phase.shown = now;
        self.snapshot(now)
    }

    /// The phase is over: its last snapshot, always due.
    pub fn finish(&mut self, now: Instant) -> Option<Snapshot> {
        let phase = self.phase.as_mut()?;
        phase.clock.resume_at(now);
        let last = self.snapshot(now);
        self.phase = None;
        last
    }

    pub fn snapshot(&self, now: Instant) -> Option<Snapshot> {
        let phase = self.phase.as_ref()?;
        Some(Snapshot {
            phase: phase.name.clone(),
            unit: phase.unit,
            done: phase.done,
            total: phase.total,
            working: phase.clock.working_at(now),
            waited: phase.clock.waited_at(now),
        })
    }
}

/// Progress as log lines, for a scheduler, a pipe or a log collector (stderr not a terminal):
/// one every `every` while the phase advances, one when a wait begins, and a last one when the
/// phase is over; each with the fields `done`, `total` (when known), `unit` and `rate` (per
/// second of working time), under the target `pii_vault::progress`.
pub struct LogLines {
    tracker: Mutex<Tracker>,
}

impl LogLines {
    pub fn new(every: Duration) -> Self {
        Self {
            tracker: Mutex::new(Tracker::new(every)),
        }
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Logs `snapshot` with `message`, and the fields every progress line carries.
macro_rules! progress_line {
    ($snapshot:expr, $($field:tt)*) => {{
        let s: &Snapshot = $snapshot;
        let (done, unit, rate) = (s.done, s.unit.name(), s.rate().round() as u64);
        match s.total {
            Some(total) => tracing::info!(
                target: "pii_vault::progress", done, total, unit, rate, $($field)*
            ),
            None => tracing::info!(target: "pii_vault::progress", done, unit, rate, $($field)*),
        }
    }};
}

impl Progress for LogLines {
    fn start(&self, phase: &str, unit: Unit, total: Option<u64>) {
        self.tracker().start(Instant::now(), phase, unit, total);
    }

    fn advance(&self, done: u64) {
        let due = self.tracker().advance(Instant::now(), done);
        if let Some(s) = due {
            progress_line!(&s, "{}", s.phase);
        }
    }

    fn waiting(&self, why: &str, until: Instant) {
        let now = Instant::now();
        let due = self.tracker().waiting(now, until);
        if let Some(s) = due {
            let seconds =
                (until.saturating_duration_since(now).as_secs_f64() * 100.0).round() / 100.0;
            progress_line!(&s, wait_seconds = seconds, why, "{}: waiting", s.phase);
        }
    }

    fn finish(&self) {
        let last = self.tracker().finish(Instant::now());
        if let Some(s) = last {
            let round = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
            let (working_seconds, waited_seconds) = (round(s.working), round(s.waited));
            progress_line!(&s, working_seconds, waited_seconds, "{}: done", s.phase);
        }
    }
}

/// Runs `work`, telling `progress` what `count` says every `every` meanwhile, once more when
/// the work is over (whatever its outcome), and then that the phase is over. The caller
/// starts the phase.
pub async fn alongside<T>(
    work: impl Future<Output = T>,
    progress: &dyn Progress,
    every: Duration,
    count: impl Fn() -> u64,
) -> T {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => {
                progress.advance(count());
                progress.finish();
                return out;
            }
            _ = ticks.tick() => progress.advance(count()),
        }
    }
}

/// How a binary sets what it draws on stderr aside while `write` writes there.
pub type Aside = Arc<dyn Fn(&mut dyn FnMut()) + Send + Sync>;

static ASIDE: RwLock<Option<Aside>> = RwLock::new(None);

/// Registers (`Some`) or withdraws (`None`) what is drawn on stderr: [`LogWriter`] sets it
/// aside for each log line, so that a line never lands inside a progress bar.
pub fn draw_aside(aside: Option<Aside>) {
    *ASIDE.write().unwrap_or_else(PoisonError::into_inner) = aside;
}

/// Runs `write` with whatever is drawn on stderr set aside.
pub fn around_drawing(write: &mut dyn FnMut()) {
    let aside = ASIDE.read().unwrap_or_else(PoisonError::into_inner).clone();
    match aside {
        Some(aside) => aside(write),
        None => write(),
    }
}

/// Log lines to stderr, around whatever a binary draws there ([`draw_aside`]): a
/// `tracing_subscriber` writer (the subscriber writes each event in one call).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut result = Ok(());
        around_drawing(&mut || result = std::io::stderr().lock().write_all(buf));
        result.map(|()| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_wait_is_not_working_time() {
        let t0 = Instant::now();
        let mut clock = Stopwatch::start_at(t0);
        // 3 s of work, a 10 s wait announced, ended on time, then 2 s of work.
        clock.wait_at(t0 + 3 * S, t0 + 13 * S);
        assert_eq!(
            clock.waited_at(t0 + 8 * S),
            5 * S,
            "a wait under way counts"
        );
        assert_eq!(clock.working_at(t0 + 8 * S), 3 * S);
        clock.resume_at(t0 + 13 * S);
        assert_eq!(clock.working_at(t0 + 15 * S), 5 * S);
        assert_eq!(clock.waited_at(t0 + 15 * S), 10 * S);
        assert_eq!(clock.elapsed_at(t0 + 15 * S), 15 * S);
        assert_eq!(per_second(1_000, clock.working_at(t0 + 15 * S)), 200.0);
    }

    #[test]
    fn a_wait_ends_at_its_until_even_when_told_late_and_early_when_told_early() {
        let t0 = Instant::now();
        let mut clock = Stopwatch::start_at(t0);
        clock.wait_at(t0 + S, t0 + 3 * S);
        // Told only at 10 s: the 7 s after the wait's end were work (the pass after it).
        assert_eq!(clock.waited_at(t0 + 10 * S), 2 * S);
        clock.resume_at(t0 + 10 * S);
        assert_eq!(clock.working_at(t0 + 10 * S), 8 * S);
        // A wait cut short counts until it was.
        clock.wait_at(t0 + 10 * S, t0 + 20 * S);
        clock.resume_at(t0 + 11 * S);
        assert_eq!(clock.waited_at(t0 + 30 * S), 3 * S);
        // A second wait announced during the first ends it.
        clock.wait_at(t0 + 30 * S, t0 + 40 * S);
        clock.wait_at(t0 + 32 * S, t0 + 33 * S);
        clock.resume_at(t0 + 50 * S);
        assert_eq!(clock.waited_at(t0 + 50 * S), 6 * S);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
    }

    #[test]
    fn lines_are_due_every_interval_at_a_wait_and_at_the_end_with_the_wait_left_out() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(5 * S);
        assert_eq!(tracker.advance(t0, 1), None, "no phase yet");
        tracker.start(t0, "re-encrypting", Unit::Count("rows"), Some(1_000));
        assert_eq!(tracker.advance(t0 + S, 100), None);
        assert_eq!(tracker.advance(t0 + 4 * S, 400), None);
        let due = tracker
            .advance(t0 + 5 * S, 500)
            .expect("5 s since the start");
        assert_eq!((due.done, due.total, due.rate()), (500, Some(1_000), 100.0));
        assert_eq!(due.left(), Some(5 * S));
        assert_eq!(
            tracker.advance(t0 + 9 * S, 900),
            None,
            "5 s since the last line"
        );

        let wait = tracker
            .waiting(t0 + 10 * S, t0 + 30 * S)
            .expect("always due");
        assert_eq!(
            (wait.done, wait.working, wait.waited),
            (900, 10 * S, Duration::ZERO)
        );
        // The first page after the wait is due (the last line was 21 s ago) and its rate does
        // not fall for the wait.
        let after = tracker.advance(t0 + 31 * S, 1_000).expect("due");
        assert_eq!((after.working, after.waited), (11 * S, 20 * S));
        assert_eq!(after.rate().round(), 91.0);
        let last = tracker.finish(t0 + 32 * S).expect("always due");
        assert_eq!(
            (last.done, last.working, last.waited),
            (1_000, 12 * S, 20 * S)
        );
        assert_eq!(last.rate().round(), 83.0);
        assert_eq!(last.left(), Some(Duration::ZERO));
        assert_eq!(tracker.finish(t0 + 33 * S), None, "once");
    }

    #[test]
    fn without_a_total_nothing_is_left_to_guess() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(Duration::ZERO);
        tracker.start(t0, "draining", Unit::Count("messages"), None);
        let due = tracker.advance(t0 + 2 * S, 10).unwrap();
        assert_eq!((due.total, due.left(), due.rate()), (None, None, 5.0));
    }

    /// Log lines as the text format writes them, for the events of `during`.
    fn logged(during: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, during);
        String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn log_lines_carry_done_total_unit_and_rate_and_announce_the_wait() {
        let logged = logged(|| {
            let progress = LogLines::new(Duration::ZERO);
            progress.advance(1);
            progress.start("re-encrypting", Unit::Count("rows"), Some(300));
            progress.advance(100);
            progress.waiting("grace for running ingesters", Instant::now() + 2 * S);
            progress.advance(300);
            progress.finish();
            progress.start("reading", Unit::Bytes, None);
            progress.advance(4096);
            progress.finish();
        });
        let lines: Vec<&str> = logged.lines().map(str::trim_start).collect();
        assert_eq!(lines.len(), 6, "{logged}");
        let rows = "total=300 unit=\"rows\" rate=";
        assert!(
            lines[0].starts_with(&format!(
                "INFO pii_vault::progress: re-encrypting done=100 {rows}"
            )),
            "{logged}"
        );
        assert!(
            lines[1].starts_with(&format!(
                "INFO pii_vault::progress: re-encrypting: waiting done=100 {rows}"
            )) && lines[1].contains(" why=\"grace for running ingesters\"")
                && (lines[1].contains(" wait_seconds=2") || lines[1].contains(" wait_seconds=1.9")),
            "{logged}"
        );
        assert!(
            lines[2].contains("re-encrypting done=300 total=300"),
            "{logged}"
        );
        assert!(
            lines[3].contains("re-encrypting: done done=300 total=300")
                && lines[3].contains(" working_seconds=")
                && lines[3].contains(" waited_seconds="),
            "{logged}"
        );
        assert!(
            lines[4].contains("reading done=4096 unit=\"bytes\" rate=")
                && !lines[4].contains("total"),
            "{logged}"
        );
        assert!(lines[5].contains("reading: done done=4096"), "{logged}");
    }

    #[test]
    fn an_interval_holds_lines_back_but_not_the_last() {
        let logged = logged(|| {
            let progress = LogLines::new(Duration::from_secs(3600));
            progress.start("verifying", Unit::Count("values"), Some(3));
            for done in 1..=3 {
                progress.advance(done);
            }
            progress.finish();
        });
        assert_eq!(logged.lines().count(), 1, "{logged}");
        assert!(
            logged.contains("verifying: done done=3 total=3"),
            "{logged}"
        );
    }

    #[tokio::test]
    async fn alongside_reports_while_the_work_runs_and_finishes_after_it() {
        #[derive(Default)]
        struct Seen(Mutex<Vec<String>>);
        impl Progress for Seen {
            fn start(&self, _: &str, _: Unit, _: Option<u64>) {}
            fn advance(&self, done: u64) {
                self.0.lock().unwrap().push(done.to_string());
            }
            fn waiting(&self, _: &str, _: Instant) {}
            fn finish(&self) {
                self.0.lock().unwrap().push("finish".into());
            }
        }
        let seen = Seen::default();
        let count = std::sync::atomic::AtomicU64::new(0);
        let work = async {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                count.fetch_add(10, std::sync::atomic::Ordering::Relaxed);
            }
            "out"
        };
        let every = Duration::from_millis(20);
        let out = alongside(work, &seen, every, || {
            count.load(std::sync::atomic::Ordering::Relaxed)
        })
        .await;
        assert_eq!(out, "out");
        let seen = seen.0.into_inner().unwrap();
        assert_eq!(seen.last().map(String::as_str), Some("finish"));
        assert_eq!(
            seen[seen.len() - 2],
            "30",
            "the count once the work is over"
        );
        // A tick at once, then one every 20 ms over 180 ms (a loaded machine may skip some).
        assert!(seen.len() >= 4, "{seen:?}");
    }

    #[test]
    fn the_log_writer_sets_what_is_drawn_aside_for_each_line() {
        let set_aside = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = set_aside.clone();
        draw_aside(Some(Arc::new(move |write: &mut dyn FnMut()| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            write();
        })));
        // Empty lines: nothing shows on the test's stderr.
        let mut writer = LogWriter;
        assert_eq!(writer.write(b"").unwrap(), 0);
        draw_aside(None);
        assert_eq!(writer.write(b"").unwrap(), 0);
        assert_eq!(set_aside.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
