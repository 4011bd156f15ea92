//! The operator's view of `ingest`, over the real wire: `/metrics` after an ingest (counts,
//! build, process, queue depth, message and key ages), `/healthz`, `/readyz` and
//! `pii_vault_ready` while the database comes and goes, and JSON logs.

use std::process::Command;
use std::time::Duration;

use crate::common::{self, Proxy, TestEnv, eventually, free_port, get, login, sample, stderr};
use pii_vault::telemetry::{self, latency, process};

const INGEST: &str = env!("CARGO_BIN_EXE_ingest");

/// Valid login bodies, one per user, with recognizable personal values.
fn logins(users: std::ops::Range<u32>) -> Vec<String> {
    users
        .map(|i| {
            login(
                &format!("user-{i}"),
                &format!("198.51.100.{i}"),
                &format!("{i:03}-77-4321"),
            )
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_an_ingest_and_readiness_follows_the_database() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let mut bodies = logins(0..29);
    bodies.push("{not json".to_owned());
    env.send(&bodies).await;

    let proxy = Proxy::start(common::database_port()).await;
    let port = free_port();
    // Its debug logs are read as they come (a full pipe would stall it).
    let child = common::Running::spawn(
        Command::new(INGEST)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--flush-ms", "20", "--log-format", "json"])
            .envs(env.binary_env())
            .env("DATABASE_URL", env.database_url_through(proxy.port))
            .env("RUST_LOG", "debug"),
    );

    let scrape = || async {
        get(port, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    let everything_deleted = eventually(Duration::from_secs(60), || async {
        sample(&scrape().await, telemetry::DELETED) == Some(30.0)
    })
    .await;
    let metrics = scrape().await;
    assert!(everything_deleted, "{metrics}");

    let value = |series: &str| {
        sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert_eq!(value(telemetry::STORED), 29.0);
    assert_eq!(value(telemetry::QUARANTINED), 1.0);
    assert_eq!(
        env.count("user_logins").await,
        29,
        "the counts are the table's"
    );
    assert_eq!(env.count("quarantine").await, 1);
    // The emulator may deliver a message twice; every extra delivery is a skipped duplicate.
    assert_eq!(
        value(telemetry::RECEIVED),
        30.0 + value(telemetry::DUPLICATES),
        "{metrics}"
    );
    assert!(
        value(&format!(
            "{}{{operation=\"Decrypt\"}}",
            telemetry::KMS_CALLS
        )) >= 1.0
    );
    assert!(
        value(&format!(
            "{}{{operation=\"GenerateDataKey\"}}",
            telemetry::KMS_CALLS
        )) >= 1.0
    );
    let committed = value(&format!("{}_count", telemetry::READ_TO_COMMIT));
    assert!(committed >= 30.0, "{metrics}");
    assert_eq!(value(&format!("{}_sum", telemetry::BATCH_SIZE)), committed);
    assert!(
        value(&format!(
            "{}_bucket{{le=\"+Inf\"}}",
            telemetry::READ_TO_COMMIT
        )) == committed
    );
    the_build_and_the_process_are_described(&metrics);

    assert_eq!(get(port, "/healthz").await, Some((200, "ok\n".to_owned())));
    let (status, readiness) = get(port, "/readyz").await.unwrap();
    assert_eq!(
        (status, readiness.as_str()),
        (
            200,
            "database: ok\nqueue: ok\nkeys: ok\nsealing: ok\nstorage: ok\n"
        )
    );
    assert_eq!(get(port, "/nothing-here").await.unwrap().0, 404);

    proxy.cut();
    let not_ready = eventually(Duration::from_secs(20), || async {
        matches!(get(port, "/readyz").await, Some((503, body)) if !body.contains("database: ok"))
    })
    .await;
    assert!(not_ready, "/readyz still ready without the database");
    assert_eq!(
        sample(&scrape().await, telemetry::READY),
        Some(0.0),
        "the gauge is the last check's outcome"
    );
    assert_eq!(
        get(port, "/healthz").await.unwrap().0,
        200,
        "alive all the same"
    );
    // Messages that arrive meanwhile are retried until the database is back.
    env.send(&logins(29..34)).await;
    let write_retries = format!("{}{{operation=\"database_write\"}}", telemetry::RETRIES);
    let retried = eventually(Duration::from_secs(30), || async {
        sample(&scrape().await, &write_retries).is_some_and(|n| n >= 1.0)
    })
    .await;
    assert!(retried, "{}", scrape().await);
    // Received and not deleted, or back on the queue: SQS holds all five until they commit,
    // and some receive saw them waiting.
    let waiting = eventually(Duration::from_secs(40), || async {
        queue(&scrape().await).is_some_and(|(visible, in_flight)| visible + in_flight == 5.0)
    })
    .await;
    assert!(waiting, "{}", scrape().await);
    proxy.restore();
    let ready_again = eventually(Duration::from_secs(30), || async {
        matches!(get(port, "/readyz").await, Some((200, _)))
    })
    .await;
    assert!(ready_again, "/readyz did not recover with the database");
    let caught_up = eventually(Duration::from_secs(60), || async {
        sample(&scrape().await, telemetry::DELETED) == Some(35.0)
    })
    .await;
    let metrics = scrape().await;
    assert!(caught_up, "{metrics}");
    assert_eq!(sample(&metrics, telemetry::STORED), Some(34.0));
    assert_eq!(env.count("user_logins").await, 34);

    // Polled and observed: the keys in use were made during the test, the queue is drained, and
    // the latest receives found it empty.
    let settled = eventually(Duration::from_secs(40), || async {
        let metrics = scrape().await;
        let age = |purpose: &str| {
            sample(
                &metrics,
                &format!("{}{{purpose=\"{purpose}\"}}", telemetry::KEY_AGE),
            )
        };
        age("token").is_some_and(|a| (0.0..300.0).contains(&a))
            && age("data").is_some_and(|a| (0.0..300.0).contains(&a))
            && queue(&metrics) == Some((0.0, 0.0))
            && sample(&metrics, telemetry::OLDEST_MESSAGE_AGE) == Some(0.0)
            && sample(&metrics, telemetry::READY) == Some(1.0)
    })
    .await;
    let metrics = scrape().await;
    assert!(settled, "{metrics}");
    assert_eq!(
        sample(&metrics, telemetry::AUDIT_LAST_CHECKPOINT),
        None,
        "no checkpoint was signed: no series rather than a made-up time"
    );

    // Nothing is left to commit: this is the histogram the summary at exit is taken from.
    let last_metrics = scrape().await;
    common::terminate_pid(child.pid());
    let ended = child.wait(Duration::from_secs(30));
    let logs = ended.stderr;
    assert!(ended.status.success(), "{logs}");
    summary_quantiles_are_the_exposed_histograms(&ended.stdout, &last_metrics);
    assert!(logs.lines().count() > 3, "{logs}");
    for line in logs.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            event["level"].is_string() && event["fields"].is_object(),
            "{line}"
        );
    }
    for personal in ["198.51.100.", "-77-4321"] {
        assert!(!logs.contains(personal), "personal data in the logs");
    }
    env.cleanup().await;
}

/// `pii_vault_queue_messages`: (visible, in flight), once polled.
fn queue(metrics: &str) -> Option<(f64, f64)> {
    let state = |state: &str| {
        sample(
            metrics,
            &format!("{}{{state=\"{state}\"}}", telemetry::QUEUE_MESSAGES),
        )
    };
    Some((state("visible")?, state("in_flight")?))
}

/// `pii_vault_build_info` names this build; the `process_*` figures are this process's.
fn the_build_and_the_process_are_described(metrics: &str) {
    let info = format!(
        "{}{{version=\"{}\",commit=\"{}\",binary=\"ingest\"}}",
        telemetry::BUILD_INFO,
        env!("CARGO_PKG_VERSION"),
        pii_vault::BUILD_COMMIT
    );
    assert_eq!(sample(metrics, &info), Some(1.0), "{info} in\n{metrics}");
    assert!(
        pii_vault::BUILD_COMMIT == "unknown"
            || (pii_vault::BUILD_COMMIT.len() == 12
                && pii_vault::BUILD_COMMIT
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit())),
        "{}",
        pii_vault::BUILD_COMMIT
    );

    let value =
        |name: &str| sample(metrics, name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value(process::START_TIME);
    assert!(
        started > now - 300.0 && started <= now + 1.0,
        "started {started}, now {now}"
    );
    assert!(value(process::CPU_SECONDS) > 0.0);
    let resident = value(process::RESIDENT_MEMORY);
    assert!(
        resident > 1e6 && value(process::VIRTUAL_MEMORY) > resident,
        "{metrics}"
    );
    let open = value(process::OPEN_FDS);
    assert!(open >= 3.0 && value(process::MAX_FDS) >= open, "{metrics}");
}

/// The p50/p99 that `ingest` prints at exit come from the histogram `/metrics` exposed: the
/// same count, and each quantile inside the exported bucket holding its rank.
fn summary_quantiles_are_the_exposed_histograms(stdout: &str, metrics: &str) {
    let summary = stdout
        .lines()
        .find(|line| line.starts_with("received="))
        .unwrap_or_else(|| panic!("no summary in\n{stdout}"));
    let field = |name: &str| -> f64 {
        summary
            .split(' ')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {summary}"))
            .parse()
            .unwrap()
    };
    let series = |suffix: &str| {
        let series = format!("{}{suffix}", telemetry::READ_TO_COMMIT);
        sample(metrics, &series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };

    let count = series("_count");
    let committed = field("stored") + field("quarantined");
    // A redelivery of a message already stored is committed (as nothing) and timed too.
    if field("duplicates") == 0.0 {
        assert_eq!(count, committed, "{summary}\n{metrics}");
    } else {
        assert!(
            (committed..=committed + field("duplicates")).contains(&count),
            "{summary}\n{metrics}"
        );
    }

    let cumulative: Vec<(f64, f64)> = latency::EXPORTED_BOUNDS
        .iter()
        .map(|le| (*le, series(&format!("_bucket{{le=\"{le}\"}}"))))
        .chain([(f64::INFINITY, series("_bucket{le=\"+Inf\"}"))])
        .collect();
    for (q, name) in [(0.5, "p50_ms"), (0.99, "p99_ms")] {
        // The rank `LatencyHistogram::quantile` looks for.
        let rank = (count * q).ceil().max(1.0);
        let holding = cumulative
            .iter()
            .position(|(_, at_or_below)| *at_or_below >= rank)
            .unwrap();
        let above = if holding == 0 {
            0.0
        } else {
            cumulative[holding - 1].0
        };
        let at_most = cumulative[holding].0;
        // The summary prints milliseconds to one decimal.
        let quantile = field(name) / 1e3;
        let rounding = 0.05e-3;
        assert!(
            quantile + rounding > above && quantile - rounding <= at_most,
            "{name} of {summary} is not in ({above}, {at_most}]\n{metrics}"
        );
    }
}

#[test]
fn a_taken_metrics_address_is_a_usage_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = common::output_of(
        Command::new(INGEST)
            .args(["--metrics-addr", &addr])
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("--metrics-addr"), "{message}");
}
