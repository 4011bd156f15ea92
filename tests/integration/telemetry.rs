//! The operator's view of `ingest`, over the real wire: `/metrics` after an ingest, `/healthz`
//! and `/readyz` while the database comes and goes, and JSON logs.

use std::process::Command;
use std::time::Duration;

use crate::common::{self, Proxy, TestEnv, eventually, free_port, get, login, sample, stderr};
use pii_vault::telemetry::{self, latency};

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

    assert_eq!(get(port, "/healthz").await, Some((200, "ok\n".to_owned())));
    let (status, readiness) = get(port, "/readyz").await.unwrap();
    assert_eq!(
        (status, readiness.as_str()),
        (200, "database: ok\nqueue: ok\nkeys: ok\nsealing: ok\n")
    );
    assert_eq!(get(port, "/nothing-here").await.unwrap().0, 404);

    proxy.cut();
    let not_ready = eventually(Duration::from_secs(20), || async {
        matches!(get(port, "/readyz").await, Some((503, body)) if !body.contains("database: ok"))
    })
    .await;
    assert!(not_ready, "/readyz still ready without the database");
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
