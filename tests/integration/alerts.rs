//! The alert rules (deploy/prometheus/alerts.yaml) and the dashboard
//! (deploy/grafana/pii-vault.json), held to promtool and to a running `ingest`: the rules and
//! the sample configuration pass `promtool check`, their unit tests (alerts.test.yaml) pass
//! `promtool test rules` and show every alert both firing and not firing, every runbook link
//! lands on a section of docs/runbook.md, and every metric a rule or a panel names is one that
//! `ingest` serves at /metrics.
//!
//! promtool comes from `scripts/tools promtool`, which installs it when it is missing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{self, TestEnv, eventually, free_port, get, login, stderr, stdout};

const INGEST: &str = env!("CARGO_BIN_EXE_ingest");
const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const RULES: &str = "deploy/prometheus/alerts.yaml";
const RULE_TESTS: &str = "deploy/prometheus/alerts.test.yaml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const DASHBOARD: &str = "deploy/grafana/pii-vault.json";
const RUNBOOK: &str = "docs/runbook.md";

/// Series Prometheus makes itself, not read from a target.
const MADE_BY_PROMETHEUS: [&str; 1] = ["up"];

#[test]
fn alert_rules_pass_promtool_and_test_every_alert_firing_and_not() {
    let promtool = promtool();
    let config = run(&promtool, &["check", "config", PROMETHEUS_CONFIG]);
    let found: usize = config
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("SUCCESS: ")?
                .strip_suffix(" rules found")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no rule count in promtool's answer:\n{config}"));
    run(&promtool, &["check", "rules", RULES]);
    let tested = run(&promtool, &["test", "rules", RULE_TESTS]);
    assert!(tested.contains("SUCCESS"), "{tested}");

    let rules = Rule::read_all();
    assert_eq!(
        rules.len(),
        found,
        "the rules this test reads are promtool's"
    );
    let cases = TestCase::read_all();
    let names: BTreeSet<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    for rule in &rules {
        for firing in [true, false] {
            assert!(
                cases
                    .iter()
                    .any(|case| case.alert == rule.alert && case.firing == firing),
                "{RULE_TESTS} has no case of {} {}",
                rule.alert,
                if firing { "firing" } else { "not firing" }
            );
        }
    }
    for case in &cases {
        assert!(
            names.contains(case.alert.as_str()),
            "{RULE_TESTS} tests {}, which {RULES} does not have",
            case.alert
        );
    }

    let runbook = std::fs::read_to_string(Path::new(REPO).join(RUNBOOK)).unwrap();
    let anchors = anchors(&runbook);
    for rule in &rules {
        let anchor = rule
            .runbook_url
            .strip_prefix(&format!("{RUNBOOK}#"))
            .unwrap_or_else(|| {
                panic!(
                    "{}: runbook_url {:?} is not into {RUNBOOK}",
                    rule.alert, rule.runbook_url
                )
            });
        assert!(
            anchors.contains(anchor),
            "{}: {RUNBOOK} has no section #{anchor}",
            rule.alert
        );
    }

    let firing = cases.iter().filter(|case| case.firing).count();
    println!(
        "{RULES}: {found} alerting rules; {RULE_TESTS}: {} cases ({firing} firing, {} not \
         firing) in {} test groups, all passing",
        cases.len(),
        cases.len() - firing,
        groups_in_rule_tests()
    );
}

#[tokio::test]
async fn the_rules_and_the_dashboard_name_only_metrics_ingest_serves() {
    let in_rules: BTreeSet<String> = Rule::read_all()
        .iter()
        .flat_map(|rule| metric_names(&rule.expr))
        .collect();
    let in_dashboard = dashboard_metric_names();

    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    // A first run hands the ingester its token key (an audit row), which the checkpoint signer
    // then signs as it does every hour: the audit has a checkpoint time to report.
    env.send(&logins(0..5)).await;
    let first = env.run_binary_as("ingester", INGEST, &["--drain"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let signed = env.run_binary_as("compliance", UNMASK, &["audit-checkpoint"]);
    assert!(
        stdout(&signed).contains("signed"),
        "{}{}",
        stdout(&signed),
        stderr(&signed)
    );
    env.send(&logins(5..10)).await;

    // As the ingester login, over the Query protocol: the grants and the second SQS client.
    let port = free_port();
    let child = common::Running::spawn(
        Command::new(INGEST)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--sqs-protocol", "query", "--flush-ms", "20"])
            .envs(env.binary_env())
            .env("DATABASE_URL", env.url_as("ingester")),
    );
    let needed: BTreeSet<&String> = in_rules
        .iter()
        .chain(&in_dashboard)
        .filter(|name| !MADE_BY_PROMETHEUS.contains(&name.as_str()))
        .collect();
    let scrape = || async {
        get(port, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    // Some series appear only once their source was read: a batch committed, the queue
    // and the key table polled.
    let everything_served = eventually(Duration::from_secs(60), || async {
        let served = served_names(&scrape().await);
        needed.iter().all(|name| served.contains(name.as_str()))
    })
    .await;
    let metrics = scrape().await;
    let served = served_names(&metrics);
    let missing = |names: &BTreeSet<String>| -> Vec<String> {
        names
            .iter()
            .filter(|name| {
                !served.contains(name.as_str()) && !MADE_BY_PROMETHEUS.contains(&name.as_str())
            })
            .cloned()
            .collect()
    };
    assert!(
        everything_served,
        "not served by ingest: {:?} (named in {RULES}), {:?} (named in {DASHBOARD})\n{metrics}",
        missing(&in_rules),
        missing(&in_dashboard)
    );
    // The checkpoint's time, as the ingester reads it; a login without its role may not.
    let signed_at: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(signed_at))::float8 FROM audit_checkpoints",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let reported = common::sample(&metrics, pii_vault::telemetry::AUDIT_LAST_CHECKPOINT);
    assert!(
        reported.is_some_and(|at| (at - signed_at).abs() < 1e-3),
        "{reported:?} for {signed_at}"
    );
    for user in ["nobody", "analyst"] {
        let pool = env.pool_as(user).await;
        let refused = sqlx::query("SELECT audit_last_checkpoint_at()")
            .execute(&pool)
            .await
            .expect_err("only the ingester reads the checkpoint time");
        assert!(
            refused.to_string().contains("permission denied"),
            "{refused}"
        );
        pool.close().await;
    }

    println!(
        "{} metric names in {RULES} and {} in {DASHBOARD} ({} in all), every one among the {} \
         series names ingest serves",
        in_rules.len(),
        in_dashboard.len(),
        in_rules.union(&in_dashboard).count(),
        served.len()
    );

    common::terminate_pid(child.pid());
    let ended = child.wait(Duration::from_secs(30));
    assert!(ended.status.success(), "{}", ended.stderr);
    env.cleanup().await;
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let names = |promql: &str| metric_names(promql).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (job, le) (rate(a_seconds_bucket{le!="x", i=~"$instance"}[$__rate_interval])))
               / on (instance) group_left (version) max without (state) (b_info offset 5m)
               > bool 365 * 86400 and time() - c:recorded unless absent(up{job="j"})"#
        ),
        ["a_seconds_bucket", "b_info", "c:recorded", "up"]
    );
    assert_eq!(
        names(r#"sum(rate(x_total{a="{b}", c='[d]'}[5m])) or vector(0)"#),
        ["x_total"]
    );
    assert_eq!(
        names(r#"label_values(pii_vault_build_info{binary="ingest"}, instance)"#),
        ["pii_vault_build_info"]
    );
    // What a scrape serves, families by their series names.
    let served = served_names(
        "# HELP h_seconds x\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"1\"} 0\n\
         h_seconds_sum 0\nh_seconds_count 0\n\ng 1\n",
    );
    assert_eq!(
        served.into_iter().collect::<Vec<_>>(),
        ["g", "h_seconds_bucket", "h_seconds_count", "h_seconds_sum"]
    );
}

/// The path of promtool, installed by `scripts/tools promtool` if it was missing.
fn promtool() -> PathBuf {
    let script = Path::new(REPO).join("scripts/tools");
    let output = Command::new(&script)
        .arg("promtool")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "promtool is needed and `scripts/tools promtool` could not install it:\n{}",
        stderr(&output)
    );
    eprint!("{}", stderr(&output));
    PathBuf::from(stdout(&output).trim())
}

/// Runs promtool in the repository; its output, after asserting that it succeeded.
fn run(promtool: &Path, args: &[&str]) -> String {
    let output = Command::new(promtool)
        .args(args)
        .current_dir(REPO)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", promtool.display()));
    let said = format!("{}{}", stdout(&output), stderr(&output));
    assert!(output.status.success(), "promtool {args:?}:\n{said}");
    said
}

fn logins(users: std::ops::Range<u32>) -> Vec<String> {
    users
        .map(|i| login(&format!("user-{i}"), "192.0.2.1", "device"))
        .collect()
}

/// One alerting rule of alerts.yaml, read line by line: the file keeps one layout (`- alert:`,
/// then `expr: |` and its indented lines, then `runbook_url:`), which promtool has checked.
#[derive(Debug, Default)]
struct Rule {
    alert: String,
    expr: String,
    runbook_url: String,
}

impl Rule {
    fn read_all() -> Vec<Rule> {
        let text = std::fs::read_to_string(Path::new(REPO).join(RULES)).unwrap();
        let mut rules: Vec<Rule> = Vec::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            let trimmed = line.trim_start();
            if let Some(name) = trimmed.strip_prefix("- alert:") {
                rules.push(Rule {
                    alert: unquote(name),
                    ..Rule::default()
                });
            } else if let Some(expr) = trimmed.strip_prefix("expr:") {
                let rule = rules.last_mut().expect("expr inside a rule");
                if expr.trim() == "|" {
                    let indent = line.len() - trimmed.len();
                    while let Some(next) = lines.peek() {
                        let deeper = next.len() - next.trim_start().len() > indent;
                        if !(deeper || next.trim().is_empty()) {
                            break;
                        }
                        rule.expr.push_str(next.trim());
                        rule.expr.push('\n');
                        lines.next();
                    }
                } else {
                    rule.expr = unquote(expr);
                }
            } else if let Some(url) = trimmed.strip_prefix("runbook_url:") {
                rules
                    .last_mut()
                    .expect("runbook_url inside a rule")
                    .runbook_url = unquote(url);
            }
        }
        for rule in &rules {
            assert!(
                !rule.expr.is_empty() && !rule.runbook_url.is_empty(),
                "{RULES}: {rule:?}"
            );
        }
        rules
    }
}

/// One `alert_rule_test` case of alerts.test.yaml: an alert, and whether it is expected to
/// fire (`exp_alerts:` with entries) or not (`exp_alerts: []`).
struct TestCase {
    alert: String,
    firing: bool,
}

impl TestCase {
    fn read_all() -> Vec<TestCase> {
        let text = std::fs::read_to_string(Path::new(REPO).join(RULE_TESTS)).unwrap();
        let mut cases = Vec::new();
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        while let Some(line) = lines.next() {
            if let Some(name) = line.strip_prefix("alertname:") {
                let expected = lines.next().unwrap_or_default();
                let expected = expected
                    .strip_prefix("exp_alerts:")
                    .unwrap_or_else(|| panic!("{RULE_TESTS}: exp_alerts after {name}"));
                cases.push(TestCase {
                    alert: unquote(name),
                    firing: expected.trim() != "[]",
                });
            }
        }
        cases
    }
}

fn groups_in_rule_tests() -> usize {
    std::fs::read_to_string(Path::new(REPO).join(RULE_TESTS))
        .unwrap()
        .lines()
        .filter(|line| line.trim_start().starts_with("- interval:"))
        .count()
}

fn unquote(value: &str) -> String {
    value.trim().trim_matches(['"', '\'']).to_owned()
}

/// The anchors GitHub gives the headings of a Markdown file.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| {
            heading
                .trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// Every metric name the dashboard's queries use (panels, rows' panels, variables); a panel
/// without a query naming a metric fails the test.
fn dashboard_metric_names() -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(REPO).join(DASHBOARD)).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut names = BTreeSet::new();
    let mut panels: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    let mut charted = 0;
    while let Some(panel) = panels.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            panels.extend(inner);
        }
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or("untitled");
        let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
        assert!(!targets.is_empty(), "panel {title:?} queries nothing");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            let found = metric_names(expr);
            assert!(
                !found.is_empty(),
                "panel {title:?}: {expr:?} names no metric"
            );
            names.extend(found);
        }
        charted += 1;
    }
    assert!(charted >= 10, "{DASHBOARD}: only {charted} panels");
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        let query = &variable["query"];
        if let Some(query) = query["query"].as_str().or(query.as_str()) {
            if variable["type"] == "query" {
                names.extend(metric_names(query));
            }
        }
    }
    names
}

/// The names of the series in a Prometheus text exposition (a histogram's are its `_bucket`,
/// `_sum` and `_count`).
fn served_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The metric names a PromQL expression selects: its identifiers outside strings, label
/// matchers, ranges and grouping lists that are neither functions, keywords nor aggregations.
/// Grafana's `$variables` are skipped, and `label_values(metric, label)` counts its metric.
fn metric_names(promql: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 27] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let promql = match promql.trim().strip_prefix("label_values(") {
        Some(arguments) => arguments
            .rsplit_once(',')
            .map_or(arguments, |(metric, _)| metric),
        None => promql,
    };
    let chars: Vec<char> = promql.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = after_quoted(&chars, i);
        } else if c == '{' || c == '[' {
            let close = if c == '{' { '}' } else { ']' };
            i += 1;
            while i < chars.len() && chars[i] != close {
                i = if matches!(chars[i], '"' | '\'' | '`') {
                    after_quoted(&chars, i)
                } else {
                    i + 1
                };
            }
            i += 1;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A Grafana variable, or a number or duration (1e3, 0.99, 5m).
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_.".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let call = chars.get(next) == Some(&'(');
            if call && GROUPING.contains(&word.as_str()) {
                i = next;
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
            } else if !call && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The index after the string literal opening at `start`.
fn after_quoted(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' && quote != '`' {
            2
        } else {
            1
        };
    }
    i + 1
}
