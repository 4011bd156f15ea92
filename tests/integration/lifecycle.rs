//! A seeded random walk through the vault's lifecycle, over the real binaries and the library
//! against the real PostgreSQL and the AWS emulator: ingest batches of a small pool of users
//! (some dated in past months, some invalid), erase users, rotate data and token keys (with
//! and without destroying the retired ones), re-wrap under a fresh KMS key, register and expire
//! retention windows, take dumps and restore them. After every step the invariants below are
//! checked on the database, and on a restored dump too.
//!
//! - (a) every stored value opens and matches its token: `rotate-keys verify` as the key admin
//!   exits 0, having opened every sealed login and quarantined body;
//! - (b) an erased user keeps nothing of what was sent before the erasure: no `login_vault`
//!   row, NULL tokens in `user_logins`, no quarantined body sealed; what was sent after it is
//!   new data, stored with its tokens and values;
//! - (c) nothing of an expired window's month opens: no `login_vault` row for a login dated in
//!   it, no sealed quarantined body sent in it, its data keys destroyed, its KMS key pending
//!   deletion;
//! - (d) ingest still stores a new message exactly once: one fresh message ingested twice
//!   (`ingest --from-file`, as the ingester) is one row.
//!
//! `LIFECYCLE_SEEDS` (comma list, default `1` to `8`: every kind of step among them) and
//! `LIFECYCLE_STEPS` (default 14) choose the walks, `LIFECYCLE_PARALLEL` (default 2) how many
//! run at once. Each step is announced on stderr as `lifecycle seed S step N: <Step>`, and a
//! failure names its seed and step:
//! `LIFECYCLE_SEEDS=S cargo test --test integration lifecycle::` replays it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use time::{Date, OffsetDateTime};
use tokio_util::sync::CancellationToken;

use crate::common::{self, TestEnv, login, rotate_keys, stderr, stdout};
use pii_vault::db;
use pii_vault::ingest::source::{Message, Receipt};
use pii_vault::ingest::{self, Settings, Summary};
use pii_vault::vault::keyring::Keyring;

const INGEST: &str = env!("CARGO_BIN_EXE_ingest");
const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");

/// The users every batch draws from.
const USERS: [&str; 6] = ["u-1", "u-2", "u-3", "u-4", "u-5", "u-6"];
/// Past months a batch may be dated in, and a retention window registered for.
const MONTHS: [(i32, u8); 6] = [
    (2025, 1),
    (2025, 2),
    (2025, 3),
    (2025, 4),
    (2025, 5),
    (2025, 6),
];

// ------------------------------------------------------------------------------ the walk

/// splitmix64: a tiny deterministic generator, the same walk for the same seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True one time in `n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// One step of the walk, with everything the generator chose for it.
#[derive(Debug, Clone)]
enum Step {
    /// Logins (user, ip, device id) and, perhaps, an invalid body naming a user; sent now or
    /// on the 15th of a past month.
    Ingest {
        logins: Vec<(&'static str, String, String)>,
        invalid: Option<&'static str>,
        month: Option<Date>,
    },
    Erase {
        user: &'static str,
    },
    DataKey {
        destroy_retired: bool,
    },
    TokenKey {
        destroy_retired: bool,
    },
    Rewrap,
    AddWindow {
        month: Date,
    },
    /// Expires the oldest window not expired yet (and no other).
    Expire {
        month: Date,
    },
    TakeDump,
    /// Restores the dump taken as the walk's `dump`-th one.
    RestoreDump {
        dump: usize,
    },
}

impl Step {
    fn name(&self) -> &'static str {
        match self {
            Step::Ingest { .. } => "Ingest",
            Step::Erase { .. } => "Erase",
            Step::DataKey { .. } => "DataKey",
            Step::TokenKey { .. } => "TokenKey",
            Step::Rewrap => "Rewrap",
            Step::AddWindow { .. } => "AddWindow",
            Step::Expire { .. } => "Expire",
            Step::TakeDump => "TakeDump",
            Step::RestoreDump { .. } => "RestoreDump",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Ingest {
                logins,
                invalid,
                month,
            } => {
                let users: Vec<&str> = logins.iter().map(|l| l.0).collect();
                write!(f, "Ingest {users:?}")?;
                if let Some(user) = invalid {
                    write!(f, " + an invalid body of {user}")?;
                }
                match month {
                    Some(month) => write!(f, ", sent in {}", month_text(*month)),
                    None => write!(f, ", sent now"),
                }
            }
            Step::Erase { user } => write!(f, "Erase {user}"),
            Step::DataKey { destroy_retired } => {
                write!(f, "DataKey (destroy retired: {destroy_retired})")
            }
            Step::TokenKey { destroy_retired } => {
                write!(f, "TokenKey (destroy retired: {destroy_retired})")
            }
            Step::Rewrap => write!(f, "Rewrap to a fresh KMS key"),
            Step::AddWindow { month } => write!(f, "AddWindow {}", month_text(*month)),
            Step::Expire { month } => write!(f, "Expire the window {}", month_text(*month)),
            Step::TakeDump => write!(f, "TakeDump"),
            Step::RestoreDump { dump } => write!(f, "RestoreDump of dump {dump}"),
        }
    }
}

/// A message the walk sent: whose, when, and whether it is a login or an invalid body.
struct Sent {
    user: &'static str,
    /// `None`: unknown (a file source), which counts as sent before every erasure.
    sent_at: Option<OffsetDateTime>,
    /// Stored as a login: false for a rejected body, and for a login sent in a window that had
    /// expired (quarantined without its body).
    valid: bool,
}

struct Window {
    kms_key: String,
    expired: bool,
}

/// A dump, removed when the walk ends.
struct Dump {
    path: PathBuf,
    after_step: usize,
}

/// What the walk did, which the database must reflect.
#[derive(Default)]
struct Model {
    /// Every message sent to the vault's batches, by message id.
    sent: HashMap<String, Sent>,
    /// Each erased user and the time its (latest) erasure ended.
    erased: BTreeMap<&'static str, OffsetDateTime>,
    windows: BTreeMap<Date, Window>,
    dumps: Vec<Dump>,
}

impl Drop for Model {
    fn drop(&mut self) {
        for dump in &self.dumps {
            let _ = std::fs::remove_file(&dump.path);
        }
    }
}

/// A database the invariants are checked on: the walk's own or a restored dump.
struct Target {
    /// The owner's URL.
    url: String,
    /// A pool of the owner, who reads what no login may (sealed bodies, wrapped keys).
    pool: PgPool,
    what: String,
    /// A restored dump rather than the walk's own database.
    restored: bool,
}

struct Walk {
    seed: u64,
    rng: SplitMix64,
    env: TestEnv,
    /// The ingester's pool on the walk's database.
    ingester: PgPool,
    model: Model,
    step: usize,
    probes: usize,
    restores: usize,
    progress: Arc<Mutex<Progress>>,
}

/// How far a walk got, read by the test when it ends, failed or not.
struct Progress {
    /// The step being run (or set-up).
    at: String,
    /// Steps started, by kind.
    counts: BTreeMap<&'static str, usize>,
}

impl Walk {
    async fn new(seed: u64, progress: Arc<Mutex<Progress>>) -> Self {
        let env = TestEnv::new(30).await;
        let init = rotate_keys(&env, &["init"]).await;
        assert!(init.status.success(), "rotate-keys init: {}", stderr(&init));
        for (year, month) in MONTHS {
            let month = time::Month::try_from(month).unwrap();
            env.add_month(Date::from_calendar_date(year, month, 1).unwrap())
                .await;
        }
        let ingester = db::connect(&url_as(&env.database_url, "ingester"), 4)
            .await
            .expect("the ingester logs in");
        Self {
            seed,
            rng: SplitMix64(seed),
            env,
            ingester,
            model: Model::default(),
            step: 0,
            probes: 0,
            restores: 0,
            progress,
        }
    }

    /// The next step: a kind by weight among those that apply now, then its details.
    fn choose(&mut self) -> Step {
        let users_with_logins: Vec<&'static str> = USERS
            .iter()
            .copied()
            .filter(|u| self.model.sent.values().any(|s| s.user == *u && s.valid))
            .collect();
        let free_months: Vec<Date> = MONTHS
            .iter()
            .map(|(y, m)| month(*y, *m))
            .filter(|m| !self.model.windows.contains_key(m))
            .collect();
        let live_window = self
            .model
            .windows
            .iter()
            .find(|(_, w)| !w.expired)
            .map(|(m, _)| *m);
        let mut kinds: Vec<(&str, usize)> = vec![
            ("Ingest", 5),
            ("DataKey", 2),
            ("TokenKey", 2),
            ("Rewrap", 1),
            ("TakeDump", 1),
        ];
        if !users_with_logins.is_empty() {
            kinds.push(("Erase", 2));
        }
        if !free_months.is_empty() {
            kinds.push(("AddWindow", 2));
        }
        if live_window.is_some() {
            kinds.push(("Expire", 1));
        }
        if !self.model.dumps.is_empty() {
            kinds.push(("RestoreDump", 1));
        }
        let total: usize = kinds.iter().map(|k| k.1).sum();
        let mut roll = self.rng.below(total);
        let kind = kinds
            .iter()
            .find(|(_, weight)| {
                if roll < *weight {
                    true
                } else {
                    roll -= weight;
                    false
                }
            })
            .expect("a kind")
            .0;
        match kind {
            "Ingest" => {
                let count = 2 + self.rng.below(4);
                let logins = (0..count)
                    .map(|_| {
                        (
                            self.rng.pick(&USERS),
                            format!("10.0.0.{}", 1 + self.rng.below(8)),
                            format!("dev-{}", 1 + self.rng.below(8)),
                        )
                    })
                    .collect();
                let invalid = self.rng.one_in(3).then(|| self.rng.pick(&USERS));
                let month = self.rng.one_in(3).then(|| {
                    let (y, m) = self.rng.pick(&MONTHS);
                    month(y, m)
                });
                Step::Ingest {
                    logins,
                    invalid,
                    month,
                }
            }
            "Erase" => Step::Erase {
                user: self.rng.pick(&users_with_logins),
            },
            "DataKey" => Step::DataKey {
                destroy_retired: self.rng.one_in(2),
            },
            "TokenKey" => Step::TokenKey {
                destroy_retired: self.rng.one_in(2),
            },
            "Rewrap" => Step::Rewrap,
            "AddWindow" => Step::AddWindow {
                month: self.rng.pick(&free_months),
            },
            "Expire" => Step::Expire {
                month: live_window.expect("a live window"),
            },
            "TakeDump" => Step::TakeDump,
            "RestoreDump" => Step::RestoreDump {
                dump: self.rng.below(self.model.dumps.len()),
            },
            other => unreachable!("{other}"),
        }
    }

    async fn run(&mut self, steps: usize) {
        for n in 1..=steps {
            self.step = n;
            let step = self.choose();
            let line = format!("lifecycle seed {} step {n}: {step}", self.seed);
            eprintln!("{line}");
            {
                let mut progress = self.progress.lock().unwrap();
                progress.at = format!("step {n}: {step}");
                *progress.counts.entry(step.name()).or_default() += 1;
            }
            self.perform(&step).await;
            let target = Target {
                url: self.env.database_url.clone(),
                pool: self.env.pool.clone(),
                what: format!("the database (seed {}, after step {n})", self.seed),
                restored: false,
            };
            self.check(&target).await;
        }
    }

    async fn perform(&mut self, step: &Step) {
        match step {
            Step::Ingest {
                logins,
                invalid,
                month,
            } => self.ingest(logins, *invalid, *month).await,
            Step::Erase { user } => {
                let reason = format!("lifecycle seed {} step {}", self.seed, self.step);
                let output = self
                    .rotate_keys(&["erase", "--user-id", user, "--reason", &reason])
                    .await;
                assert!(
                    stdout(&output).starts_with(&format!("erased user {user}: ")),
                    "{}",
                    stdout(&output)
                );
                self.model.erased.insert(user, OffsetDateTime::now_utc());
            }
            Step::DataKey { destroy_retired } | Step::TokenKey { destroy_retired } => {
                let command = match step {
                    Step::DataKey { .. } => "data-key",
                    _ => "token-key",
                };
                let mut args = vec![command, "--grace-seconds", "0"];
                if *destroy_retired {
                    args.push("--destroy-retired");
                }
                let output = self.rotate_keys(&args).await;
                let said = stdout(&output);
                assert!(
                    said.starts_with("re-encrypted ")
                        || said.starts_with("re-tokenized ")
                        || said.contains("nothing to do"),
                    "{said}"
                );
            }
            Step::Rewrap => {
                let target = self.env.new_kms_key("pii-vault lifecycle: rewrap").await;
                let output = self.rotate_keys(&["rewrap", "--kms-key-id", &target]).await;
                assert!(
                    stdout(&output).contains(&format!(" under {target}")),
                    "{}",
                    stdout(&output)
                );
                // As the runbook says: what creates keys from now on points at the new key.
                self.env.kms_key_id = target;
            }
            Step::AddWindow { month } => {
                let kms_key = self.env.new_kms_key("pii-vault lifecycle: window").await;
                let text = month_text(*month);
                let output = self
                    .rotate_keys(&["window", "--month", &text, "--key", &kms_key])
                    .await;
                assert_eq!(
                    stdout(&output).trim(),
                    format!("retention window {text} registered under {kms_key}")
                );
                self.model.windows.insert(
                    *month,
                    Window {
                        kms_key,
                        expired: false,
                    },
                );
            }
            Step::Expire { month } => {
                let today = OffsetDateTime::now_utc().date();
                let days = (today - next_month(*month)).whole_days();
                let older_than = format!("{days}d");
                let output = self
                    .rotate_keys(&[
                        "expire",
                        "--older-than",
                        &older_than,
                        "--apply",
                        "--grace-seconds",
                        "0",
                    ])
                    .await;
                let said = stdout(&output);
                let expired: Vec<&str> = said
                    .lines()
                    .filter(|l| l.starts_with("expired window "))
                    .collect();
                assert!(
                    expired.len() == 1
                        && expired[0]
                            .starts_with(&format!("expired window {} ", month_text(*month))),
                    "expires exactly the window {}: {said}",
                    month_text(*month)
                );
                self.model
                    .windows
                    .get_mut(month)
                    .expect("a registered window")
                    .expired = true;
            }
            Step::TakeDump => {
                let path = self.env.dump();
                self.model.dumps.push(Dump {
                    path,
                    after_step: self.step,
                });
            }
            Step::RestoreDump { dump } => self.restore(*dump).await,
        }
    }

    /// Runs rotate-keys as the key admin; it must succeed.
    async fn rotate_keys(&self, args: &[&str]) -> Output {
        let output = rotate_keys(&self.env, args).await;
        assert!(
            output.status.success(),
            "rotate-keys {}: exit {:?}\n{}{}",
            args.join(" "),
            output.status.code(),
            stdout(&output),
            stderr(&output)
        );
        output
    }

    /// The batch through the ingest pipeline as the ingester login, from a source that
    /// delivers it with the chosen send time.
    async fn ingest(
        &mut self,
        logins: &[(&'static str, String, String)],
        invalid: Option<&'static str>,
        month: Option<Date>,
    ) {
        let sent_at = match month {
            Some(month) => month
                .replace_day(15)
                .unwrap()
                .with_hms(12, 0, 0)
                .unwrap()
                .assume_utc(),
            None => OffsetDateTime::now_utc(),
        };
        // A login of an expired window is not stored: quarantined without its body (0019).
        let expired = month.is_some_and(|m| self.model.windows.get(&m).is_some_and(|w| w.expired));
        let mut messages = Vec::new();
        let mut bodies: Vec<(&'static str, String, bool)> = logins
            .iter()
            .map(|(user, ip, device)| (*user, login(user, ip, device), true))
            .collect();
        if let Some(user) = invalid {
            bodies.push((user, format!(r#"{{"user_id": "{user}", "ip": 5}}"#), false));
        }
        for (i, (user, body, valid)) in bodies.into_iter().enumerate() {
            let id = format!("lc-{}-{}-{i}", self.seed, self.step);
            self.model.sent.insert(
                id.clone(),
                Sent {
                    user,
                    sent_at: Some(sent_at),
                    valid: valid && !expired,
                },
            );
            messages.push(Message {
                receipt: Receipt(id.clone()),
                id,
                body: body.into_bytes(),
                sent_at: Some(sent_at),
                read_at: Instant::now(),
            });
        }
        let keyring = Keyring::new(
            self.ingester.clone(),
            self.env.kms.clone(),
            &self.env.kms_key_id,
            "lifecycle",
        );
        let settings = Settings {
            drain: true,
            flush_interval: Duration::from_millis(20),
            key_check_interval: Duration::from_secs(5),
            ..Settings::default()
        };
        let summary: Summary = tokio::time::timeout(
            Duration::from_secs(120),
            ingest::run(
                common::VecSource::of_messages(messages),
                self.ingester.clone(),
                keyring,
                settings,
                Arc::default(),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("ingest --drain finishes")
        .unwrap_or_else(|e| panic!("ingest fails: {e}"));
        assert_eq!(
            (
                summary.stored,
                summary.quarantined,
                summary.duplicates,
                summary.left_on_queue
            ),
            if expired {
                (
                    0,
                    (logins.len() + usize::from(invalid.is_some())) as u64,
                    0,
                    0,
                )
            } else {
                (logins.len() as u64, u64::from(invalid.is_some()), 0, 0)
            },
            "every message of the batch stored once, or quarantined once if its window expired"
        );
    }

    /// pg_restore of an earlier dump into a fresh database, the restore procedure, and the
    /// invariants on what it gives.
    async fn restore(&mut self, dump: usize) {
        self.restores += 1;
        // As the runbook restores a backup (common::TestEnv::restore).
        let restored_db = self.env.restore(&self.model.dumps[dump].path).await;
        let url = restored_db.database_url.clone();
        let restored = db::connect(&url, 2).await.unwrap();
        run_restore_procedure(&self.env, &url).await;

        let target = Target {
            url: url.clone(),
            pool: restored.clone(),
            what: format!(
                "dump {dump} (taken after step {}) restored at step {} of seed {}",
                self.model.dumps[dump].after_step, self.step, self.seed
            ),
            restored: true,
        };
        self.check(&target).await;
        restored.close().await;
        restored_db.drop().await;
    }

    // -------------------------------------------------------------------- the invariants

    async fn check(&mut self, target: &Target) {
        self.every_value_opens(target).await;
        self.erased_users_keep_nothing(target).await;
        self.expired_windows_keep_nothing(target).await;
        self.ingest_stores_exactly_once(target).await;
    }

    /// (a) `rotate-keys verify` as the key admin walks every login (opening its sealed values,
    /// if it has any, and checking them against its tokens) and opens every sealed body.
    async fn every_value_opens(&self, target: &Target) {
        let output = blocking(
            Command::new(ROTATE_KEYS)
                .arg("verify")
                .envs(self.env.binary_env())
                .env("DATABASE_URL", url_as(&target.url, "keyadmin")),
        )
        .await;
        assert!(
            output.status.success(),
            "(a) rotate-keys verify on {}: exit {:?}: {}",
            target.what,
            output.status.code(),
            stderr(&output)
        );
        let (logins, bodies): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM user_logins),
                    (SELECT count(*) FROM quarantine WHERE sealed_body IS NOT NULL)",
        )
        .fetch_one(&target.pool)
        .await
        .unwrap();
        assert_eq!(
            stdout(&output).trim(),
            format!(
                "all {logins} logins and {bodies} quarantined bodies open and match their tokens"
            ),
            "(a) verify walked every login and opened every sealed body on {}",
            target.what
        );
    }

    /// (b) An erased user's logins and bodies sent before the erasure keep no personal field;
    /// those sent after it are new data.
    async fn erased_users_keep_nothing(&self, target: &Target) {
        for (user, erased_at) in &self.model.erased {
            let sent_before = |sent: &Sent| sent.sent_at.is_none_or(|at| at < *erased_at);
            let rows: Vec<(String, bool, bool, bool)> = sqlx::query_as(
                "SELECT coalesce(l.message_id_text, l.message_id::text),
                        l.masked_ip IS NOT NULL, l.masked_device_id IS NOT NULL,
                        v.login_id IS NOT NULL
                 FROM user_logins l LEFT JOIN login_vault v ON v.login_id = l.id
                 WHERE l.user_id = $1 ORDER BY l.id",
            )
            .bind(user)
            .fetch_all(&target.pool)
            .await
            .unwrap();
            for (id, ip_token, device_token, sealed) in rows {
                let sent = self.model.sent.get(&id).unwrap_or_else(|| {
                    panic!("(b) login {id} of {user} on {} was never sent", target.what)
                });
                if sent_before(sent) {
                    assert!(
                        !ip_token && !device_token && !sealed,
                        "(b) {user}, erased at {erased_at}: login {id} sent at {:?} keeps \
                         ip token {ip_token}, device token {device_token}, sealed values \
                         {sealed} on {}",
                        sent.sent_at,
                        target.what
                    );
                } else {
                    assert!(
                        ip_token && device_token && sealed,
                        "(b) {user}, erased at {erased_at}: login {id} sent after it, at {:?}, \
                         is new data, yet has ip token {ip_token}, device token {device_token}, \
                         sealed values {sealed} on {}",
                        sent.sent_at,
                        target.what
                    );
                }
            }
            let bodies: Vec<String> = self
                .model
                .sent
                .iter()
                .filter(|(_, s)| s.user == *user && !s.valid && sent_before(s))
                .map(|(id, _)| id.clone())
                .collect();
            let sealed: Vec<String> = sqlx::query_scalar(
                "SELECT message_id FROM quarantine
                 WHERE message_id = ANY($1) AND sealed_body IS NOT NULL ORDER BY id",
            )
            .bind(&bodies)
            .fetch_all(&target.pool)
            .await
            .unwrap();
            assert!(
                sealed.is_empty(),
                "(b) {user}, erased at {erased_at}: quarantined bodies {sealed:?} still sealed on {}",
                target.what
            );
        }
    }

    /// (c) Nothing of an expired window's month opens.
    async fn expired_windows_keep_nothing(&self, target: &Target) {
        for (starts, window) in self.model.windows.iter().filter(|(_, w)| w.expired) {
            let ends = next_month(*starts);
            let what = format!("(c) window {} on {}", month_text(*starts), target.what);
            let state: Option<String> =
                sqlx::query_scalar("SELECT state FROM retention_windows WHERE starts = $1")
                    .bind(starts)
                    .fetch_optional(&target.pool)
                    .await
                    .unwrap();
            // A restored dump taken before the window was registered does not know it (and
            // holds nothing under it); any other copy must know it expired, or it would seal
            // late logins of the month again.
            if state.is_some() || !target.restored {
                assert_eq!(state.as_deref(), Some("expired"), "{what}: its state");
            }
            let (sealed_logins, sealed_bodies): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM login_vault v JOIN user_logins l ON l.id = v.login_id
                         WHERE l.create_date >= $1 AND l.create_date < $2),
                        (SELECT count(*) FROM quarantine WHERE sealed_body IS NOT NULL
                         AND sent_at >= $3 AND sent_at < $4)",
            )
            .bind(starts)
            .bind(ends)
            .bind(starts.midnight().assume_utc())
            .bind(ends.midnight().assume_utc())
            .fetch_one(&target.pool)
            .await
            .unwrap();
            assert_eq!(
                sealed_logins, 0,
                "{what}: logins dated in it keep sealed values"
            );
            assert_eq!(
                sealed_bodies, 0,
                "{what}: quarantined bodies sent in it are still sealed"
            );
            let live_keys: Vec<(i64, String, bool)> = sqlx::query_as(
                "SELECT id, state, wrapped_key IS NOT NULL FROM vault_keys
                 WHERE window_starts = $1 AND (state <> 'destroyed' OR wrapped_key IS NOT NULL)
                 ORDER BY id",
            )
            .bind(starts)
            .fetch_all(&target.pool)
            .await
            .unwrap();
            assert!(
                live_keys.is_empty(),
                "{what}: data keys not destroyed (id, state, has wrapped bytes): {live_keys:?}"
            );
            let kms_state = self
                .env
                .kms
                .client()
                .describe_key()
                .key_id(&window.kms_key)
                .send()
                .await
                .expect("DescribeKey")
                .key_metadata
                .and_then(|m| m.key_state);
            assert_eq!(
                kms_state,
                Some(aws_sdk_kms::types::KeyState::PendingDeletion),
                "{what}: its KMS key"
            );
        }
    }

    /// (d) One fresh message, ingested twice from a file as the ingester, is one row.
    async fn ingest_stores_exactly_once(&mut self, target: &Target) {
        self.probes += 1;
        let user = format!("probe-{}", self.probes);
        let file = std::env::temp_dir().join(format!(
            "{}-probe-{}.jsonl",
            self.env.database_name, self.probes
        ));
        std::fs::write(
            &file,
            login(
                &user,
                &format!("192.0.2.{}", self.probes % 250),
                &format!("probe-device-{}", self.probes),
            ) + "\n",
        )
        .unwrap();
        let source_id = format!("lifecycle-{}-probe-{}", self.seed, self.probes);
        let mut runs = Vec::new();
        for _ in 0..2 {
            runs.push(
                blocking(
                    Command::new(INGEST)
                        .arg("--from-file")
                        .arg(&file)
                        .args(["--source-id", &source_id])
                        .envs(self.env.binary_env())
                        .env("DATABASE_URL", url_as(&target.url, "ingester")),
                )
                .await,
            );
        }
        let _ = std::fs::remove_file(&file);
        for output in &runs {
            assert!(
                output.status.success(),
                "(d) ingest --from-file on {}: exit {:?}: {}{}",
                target.what,
                output.status.code(),
                stdout(output),
                stderr(output)
            );
        }
        let said: Vec<String> = runs.iter().map(stdout).collect();
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE user_id = $1")
            .bind(&user)
            .fetch_one(&target.pool)
            .await
            .unwrap();
        assert_eq!(
            rows, 1,
            "(d) one message ingested twice on {}: {said:?}",
            target.what
        );
        assert!(
            said[0].contains("stored=1 quarantined=0 duplicates=0")
                && said[1].contains("stored=0 quarantined=0 duplicates=1"),
            "(d) on {}: {said:?}",
            target.what
        );
    }
}

/// What a restored backup goes through before anything reads it (README, "Backups"):
/// `rotate-keys reapply-erasures` against `db_url`, as the key admin, with `env`'s AWS
/// settings and witness bucket.
async fn run_restore_procedure(env: &TestEnv, db_url: &str) {
    let keyadmin = {
        let (_, host_and_db) = db_url.rsplit_once('@').expect("URL has credentials");
        format!("postgres://keyadmin:keyadmin@{host_and_db}")
    };
    let output = blocking(
        Command::new(env!("CARGO_BIN_EXE_rotate-keys"))
            .arg("reapply-erasures")
            .envs(env.binary_env())
            .env("DATABASE_URL", keyadmin),
    )
    .await;
    assert!(
        output.status.success(),
        "reapply-erasures: {}",
        stderr(&output)
    );
}

// ------------------------------------------------------------------------------- helpers

fn month(year: i32, month: u8) -> Date {
    Date::from_calendar_date(year, time::Month::try_from(month).unwrap(), 1).unwrap()
}

fn next_month(starts: Date) -> Date {
    match starts.month() {
        time::Month::December => month(starts.year() + 1, 1),
        m => month(starts.year(), u8::from(m) + 1),
    }
}

fn month_text(starts: Date) -> String {
    starts.to_string()[..7].to_owned()
}

/// `url` (any user's) logged in as one of the local users instead.
fn url_as(url: &str, user: &str) -> String {
    let (_, host_and_db) = url.rsplit_once('@').expect("URL has credentials");
    format!("postgres://{user}:{user}@{host_and_db}")
}

/// Runs `command` to its end off the async threads.
async fn blocking(command: &mut Command) -> Output {
    let mut command = std::mem::replace(command, Command::new("true"));
    tokio::task::spawn_blocking(move || common::output_of(&mut command))
        .await
        .unwrap()
}

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {s:?}"))
        })
        .collect()
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_lifecycle_keeps_every_invariant_after_every_step() {
    let seeds = env_list("LIFECYCLE_SEEDS", "1,2,3,4,5,6,7,8");
    let steps = env_list("LIFECYCLE_STEPS", "14")[0] as usize;
    let parallel = env_list("LIFECYCLE_PARALLEL", "2")[0].max(1) as usize;
    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
    // Walks run as local tasks (their futures borrow across awaits in ways that are not
    // `Send`); the binaries they run, and the pipeline's own tasks, still run in parallel.
    let local = tokio::task::LocalSet::new();
    let mut walks = Vec::new();
    for seed in seeds {
        let progress = Arc::new(Mutex::new(Progress {
            at: "setting up".to_owned(),
            counts: BTreeMap::new(),
        }));
        let slots = slots.clone();
        let walking = progress.clone();
        let walk = local.spawn_local(async move {
            let _slot = slots.acquire_owned().await.unwrap();
            let mut walk = Walk::new(seed, walking).await;
            walk.run(steps).await;
            let Walk {
                env,
                ingester,
                model,
                ..
            } = walk;
            drop(model);
            ingester.close().await;
            env.cleanup().await;
        });
        walks.push((seed, progress, walk));
    }
    let mut failures = Vec::new();
    let mut totals: BTreeMap<&'static str, usize> = BTreeMap::new();
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    for (seed, progress, walk) in walks {
        let ended = local.run_until(walk).await;
        let progress = progress.lock().unwrap();
        for (kind, n) in &progress.counts {
            *totals.entry(kind).or_default() += n;
        }
        match ended {
            Ok(()) => {
                eprintln!(
                    "lifecycle seed {seed}: {steps} steps, every invariant held after each: {:?}",
                    progress.counts
                );
                passed.push(seed);
            }
            Err(error) => {
                let why = if error.is_panic() {
                    panic_text(&*error.into_panic())
                } else {
                    error.to_string()
                };
                failures.push(format!(
                    "lifecycle seed {seed} failed at {}: {why}",
                    progress.at
                ));
                failed.push(seed);
            }
        }
    }
    eprintln!(
        "lifecycle: {} steps run in {:.0?}; seeds passed {passed:?}, failed {failed:?}; \
         steps per kind: {totals:?}",
        totals.values().sum::<usize>(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
