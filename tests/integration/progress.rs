//! Progress as a log collector sees it: the binaries run with stderr a pipe (never a terminal,
//! so no bar is drawn) and `PROGRESS_LOG_SECONDS=0` (a line at every step instead of every 5
//! seconds), and their log lines carry done/total, the waits, and a last line; a rotation's
//! printed rate leaves its grace wait out.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::{self, TestEnv, logins, output_of, stderr, stdout};

const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");
const INGEST: &str = env!("CARGO_BIN_EXE_ingest");

/// Runs `binary` with `args` as `user` (the key admin, or the owner for `None`), progress
/// logged at every step; returns its output and how long it ran.
async fn run_logging_progress(
    env: &TestEnv,
    binary: &'static str,
    user: Option<&str>,
    args: &[&str],
) -> (Output, Duration) {
    let mut command = Command::new(binary);
    command
        .args(args)
        .envs(env.binary_env())
        .env("RUST_LOG", "info")
        .env("PROGRESS_LOG_SECONDS", "0");
    if let Some(user) = user {
        command.env("DATABASE_URL", env.url_as(user));
    }
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let output = output_of(&mut command);
        (output, started.elapsed())
    })
    .await
    .unwrap()
}

/// The progress lines of a run's stderr (the `pii_vault::progress` target).
fn progress_lines(output: &Output) -> Vec<String> {
    stderr(output)
        .lines()
        .filter(|line| line.contains("pii_vault::progress"))
        .map(str::to_owned)
        .collect()
}

/// The number after `before` in `text` (up to the next character that is not part of one).
fn number_after(text: &str, before: &str) -> f64 {
    let at = text
        .find(before)
        .unwrap_or_else(|| panic!("{before:?} in {text}"))
        + before.len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("a number after {before:?} in {text}"))
}

#[tokio::test]
async fn a_rotation_logs_its_progress_and_grace_wait_and_its_rate_leaves_the_wait_out() {
    const ROWS: u64 = 3_000;
    const GRACE: f64 = 3.0;
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&logins(ROWS as usize, 7)).await;

    let args = ["data-key", "--grace-seconds", "3", "--batch-size", "100"];
    let (rotated, elapsed) = run_logging_progress(&env, ROTATE_KEYS, Some("keyadmin"), &args).await;
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    let lines = progress_lines(&rotated);
    let all = lines.join("\n");

    // A line per page of 100 (the interval is 0), each with done and total.
    let first = format!("re-encrypting done=100 total={ROWS} unit=\"rows\" rate=");
    assert!(lines[0].contains(&first), "{all}");
    let pages = lines
        .iter()
        .filter(|l| l.contains("re-encrypting done=") && l.contains(&format!(" total={ROWS} ")))
        .count();
    assert!(pages >= (ROWS / 100) as usize, "{pages} page lines: {all}");
    // The grace wait is announced, with its reason and its length, once the first pass is over.
    let waits: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("re-encrypting: waiting"))
        .collect();
    assert_eq!(waits.len(), 1, "{all}");
    assert!(
        waits[0].contains(&format!("done={ROWS} total={ROWS}"))
            && waits[0].contains("why=\"grace period for running ingesters\"")
            && number_after(waits[0], "wait_seconds=") <= GRACE,
        "{all}"
    );
    // The last line: everything done, the wait apart from the work.
    let last = lines.last().unwrap();
    assert!(
        last.contains(&format!(
            "re-encrypting: done done={ROWS} total={ROWS} unit=\"rows\""
        )),
        "{all}"
    );
    // The wait lasts from the end of the first pass to the end of the grace period (a slow
    // first pass leaves less of it), as announced.
    let logged_wait = number_after(last, "waited_seconds=");
    let announced = number_after(waits[0], "wait_seconds=");
    assert!(logged_wait > 0.5 && logged_wait <= GRACE, "{all}");
    assert!((logged_wait - announced).abs() < 0.1, "{all}");

    // The printed summary: work time and rate without the wait, and the wait said apart.
    let said = stdout(&rotated);
    assert!(
        said.starts_with(&format!("re-encrypted {ROWS} rows in ")),
        "{said}"
    );
    let work = number_after(&said, " rows in ");
    let rate = number_after(&said, "s of work (");
    let waited = number_after(&said, "; grace wait ");
    assert!(said.contains("s not counted)"), "{said}");
    let elapsed = elapsed.as_secs_f64();
    assert!(
        (waited - logged_wait).abs() < 0.01,
        "waited {waited}s: {said}"
    );
    // The work and the wait are both inside the run, apart: the work is less than the run
    // without the wait (the process's start and connections are neither).
    assert!(
        work > 0.0 && work < elapsed - waited,
        "work {work}s, waited {waited}s, the run {elapsed:.2}s: {said}"
    );
    // The rate is over the work alone (the printed work time is rounded to 10 ms).
    let rows = ROWS as f64;
    assert!(
        (rows / (work + 0.006)..=rows / (work - 0.006).max(1e-3)).contains(&rate),
        "{rate} rows/s for {ROWS} rows in {work}s: {said}"
    );

    // `verify` logs its own: every row stored, checked.
    let (verified, _) =
        run_logging_progress(&env, ROTATE_KEYS, Some("keyadmin"), &["verify"]).await;
    assert!(verified.status.success(), "{}", stderr(&verified));
    let lines = progress_lines(&verified);
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains(&format!("verifying: done done={ROWS} total={ROWS}"))),
        "{}",
        lines.join("\n")
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_backfill_logs_the_bytes_of_its_file_read() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let file = format!(
        "{}/tests/data/sample_data.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    let size = std::fs::metadata(&file).unwrap().len();

    let (ingested, _) = run_logging_progress(&env, INGEST, None, &["--from-file", &file]).await;
    assert!(ingested.status.success(), "{}", stderr(&ingested));
    assert!(
        stdout(&ingested).contains("stored=99 quarantined=1"),
        "{}",
        stdout(&ingested)
    );
    let lines = progress_lines(&ingested);
    let all = lines.join("\n");
    assert!(
        lines
            .iter()
            .all(|l| l.contains(&format!(" total={size} unit=\"bytes\""))),
        "{all}"
    );
    assert!(
        lines.last().is_some_and(
            |l| l.contains(&format!("reading the file: done done={size} total={size}"))
        ),
        "{all}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_expiry_logs_each_window_its_grace_wait_and_the_logins_dropped() {
    const ROWS: u64 = 500;
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let arn = env.new_kms_key("pii-vault test: retention window").await;
    let args = ["window", "--month", "2025-01", "--key", &arn];
    let (window, _) = run_logging_progress(&env, ROTATE_KEYS, Some("keyadmin"), &args).await;
    assert!(window.status.success(), "{}", stderr(&window));
    let january = time::Date::from_calendar_date(2025, time::Month::January, 15).unwrap();
    env.drain_from(common::VecSource::sent_at(
        &logins(ROWS as usize, 8),
        january.midnight().assume_utc(),
    ))
    .await;
    let today = time::OffsetDateTime::now_utc().date();
    let february = time::Date::from_calendar_date(2025, time::Month::February, 1).unwrap();
    let horizon = format!("{}d", (today - february).whole_days());

    let args = [
        "expire",
        "--older-than",
        &horizon,
        "--apply",
        "--grace-seconds",
        "1",
    ];
    let (expired, _) = run_logging_progress(&env, ROTATE_KEYS, Some("keyadmin"), &args).await;
    assert!(expired.status.success(), "{}", stderr(&expired));
    assert!(
        stdout(&expired).contains("expired window 2025-01"),
        "{}",
        stdout(&expired)
    );
    let lines = progress_lines(&expired);
    let all = lines.join("\n");
    assert!(
        lines[0].contains("expiring window 2025-01: waiting done=0")
            && lines[0].contains("why=\"grace period for running ingesters\""),
        "{all}"
    );
    let last = lines.last().unwrap();
    assert!(
        last.contains(&format!("expiring window 2025-01: done done={ROWS}"))
            && number_after(last, "waited_seconds=") > 0.9,
        "{all}"
    );
    env.cleanup().await;
}

/// Runs `binary` with `args` as `user` on a terminal (util-linux `script` gives it one),
/// logging at INFO; returns what the terminal showed.
async fn run_on_a_terminal(
    env: &TestEnv,
    binary: &'static str,
    user: &str,
    args: &[&str],
) -> String {
    let line = std::iter::once(binary)
        .chain(args.iter().copied())
        .map(|word| format!("'{word}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = Command::new("script");
    command
        .args([
            "--quiet",
            "--flush",
            "--return",
            "--command",
            &line,
            "/dev/null",
        ])
        .envs(env.binary_env())
        .env("DATABASE_URL", env.url_as(user))
        .env("RUST_LOG", "info")
        .env("PROGRESS_LOG_SECONDS", "0")
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null());
    let output = tokio::task::spawn_blocking(move || {
        command.output().unwrap_or_else(|e| {
            panic!("`script` runs a command on a terminal ({e}); install util-linux (apt-get install util-linux)")
        })
    })
    .await
    .unwrap();
    let shown = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{shown}{}", stderr(&output));
    shown
}

#[tokio::test]
async fn on_a_terminal_a_rotation_draws_a_bar_and_logs_no_progress_lines() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    env.ingest_bodies(&logins(2_000, 9)).await;

    let args = ["data-key", "--grace-seconds", "2", "--batch-size", "100"];
    let shown = run_on_a_terminal(&env, ROTATE_KEYS, "keyadmin", &args).await;
    assert!(shown.contains("re-encrypting ["), "{shown:?}");
    assert!(shown.contains("2,000/2,000 rows"), "{shown:?}");
    // The wait shows while it lasts (what is left of 2 s once the first pass is over).
    assert!(shown.contains("2,000/2,000 rows waiting "), "{shown:?}");
    assert!(shown.contains(" rows/s over "), "{shown:?}");
    assert!(!shown.contains("pii_vault::progress"), "{shown:?}");
    assert!(shown.contains("re-encrypted 2000 rows in "), "{shown:?}");
    env.cleanup().await;
}
