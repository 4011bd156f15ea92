//! One exit-code table for every binary (README, "Exit codes"): each code produced by a real
//! command over the real services, with its one-line error. The table the run saw is written
//! to `target/tmp/exit-codes.txt`.

use std::process::Output;

use crate::common::{self, TestEnv, stderr, stdout, three_logins};

const INGEST: &str = env!("CARGO_BIN_EXE_ingest");
const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");
const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");
const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

const REVEAL: [&str; 4] = ["--purpose", "fraud-investigation", "--reason", "case 1"];

struct Seen {
    code: i32,
    command: String,
    said: String,
}

fn seen(binary: &str, args: &[&str], output: &Output) -> Seen {
    let name = binary.rsplit('/').next().unwrap_or(binary);
    Seen {
        code: output.status.code().expect("exited, not killed"),
        command: format!("{name} {}", args.join(" ")),
        said: stderr(output).trim_end().to_owned(),
    }
}

#[tokio::test]
async fn every_exit_code_is_produced_by_its_failure() {
    let env = three_logins().await;
    let mut table: Vec<(i32, Seen)> = Vec::new();
    let mut expect = |code: i32, seen: Seen| table.push((code, seen));
    let as_user = |user: &str, binary: &str, args: &[&str]| {
        seen(binary, args, &env.run_binary_as(user, binary, args))
    };

    let args = ["status"];
    expect(
        0,
        seen(ROTATE_KEYS, &args, &env.run_binary(ROTATE_KEYS, &args)),
    );

    // 1, a fault: nothing listens where the database should be.
    let port = common::free_port();
    let nowhere = format!("postgres://pii_vault:secret@127.0.0.1:{port}/pii_vault");
    let args = ["status", "--database-url", nowhere.as_str()];
    expect(
        1,
        seen(ROTATE_KEYS, &args, &env.run_binary(ROTATE_KEYS, &args)),
    );

    // 2, usage: an argument missing, a queue that does not exist, no region.
    let args = ["--user-id", "u-1", "--purpose", "fraud-investigation"];
    expect(2, as_user("compliance", UNMASK, &args));
    let missing_queue = format!("no-such-queue-{}", common::unique_suffix());
    let args = ["--drain", "--queue", missing_queue.as_str()];
    expect(2, as_user("ingester", INGEST, &args));
    let args = ["--count", "1"];
    let no_region = common::output_of(
        std::process::Command::new(LOADGEN)
            .args(args)
            .envs(env.binary_env())
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true"),
    );
    expect(2, seen(LOADGEN, &args, &no_region));

    // 3, refused: a login without the compliance role asks the reveal door; the analyst's
    // login runs a key admin's command.
    let args = [&["--user-id", "u-1"][..], &REVEAL].concat();
    expect(3, as_user("analyst", UNMASK, &args));
    let args = ["status"];
    expect(3, as_user("analyst", ROTATE_KEYS, &args));

    // 6, nothing found: the officer asks about nobody; the key admin erases nobody.
    let args = [&["--user-id", "nobody"][..], &REVEAL].concat();
    expect(6, as_user("compliance", UNMASK, &args));
    let args = ["erase", "--user-id", "nobody", "--reason", "r", "--dry-run"];
    expect(6, as_user("keyadmin", ROTATE_KEYS, &args));

    // 5, KMS refused: the KMS key that wraps the data keys is disabled.
    let kms = aws_sdk_kms::Client::new(&common::aws_config().await);
    kms.disable_key()
        .key_id(&env.kms_key_id)
        .send()
        .await
        .expect("DisableKey");
    let args = [&["--user-id", "u-2"][..], &REVEAL].concat();
    expect(5, as_user("compliance", UNMASK, &args));
    kms.enable_key()
        .key_id(&env.kms_key_id)
        .send()
        .await
        .expect("EnableKey");

    // 4, integrity: a sealed value moved to another login, as the table owner could.
    sqlx::raw_sql(
        "UPDATE login_vault SET sealed_ip = (SELECT v.sealed_ip FROM login_vault v
           JOIN user_logins l ON l.id = v.login_id WHERE l.user_id = 'u-2')
         WHERE login_id = (SELECT min(id) FROM user_logins WHERE user_id = 'u-1')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let args = [&["--user-id", "u-1"][..], &REVEAL].concat();
    expect(4, as_user("compliance", UNMASK, &args));

    let report: String = table
        .iter()
        .map(|(_, seen)| format!("{} | {} | {}\n", seen.code, seen.command, seen.said))
        .collect();
    write_report(&report);
    for (code, seen) in &table {
        assert_eq!(seen.code, *code, "{}: {}", seen.command, seen.said);
        if *code != 0 {
            assert_eq!(seen.said.lines().count(), 1, "one line: {}", seen.said);
            assert!(seen.said.starts_with("error: "), "{}", seen.said);
            assert!(!seen.said.contains("secret"), "no password: {}", seen.said);
        }
    }
    let codes: std::collections::BTreeSet<i32> = table.iter().map(|(code, _)| *code).collect();
    assert_eq!(codes.into_iter().collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5, 6]);
    let what_to_do = |needle: &str| table.iter().any(|(_, seen)| seen.said.contains(needle));
    assert!(what_to_do("AWS_REGION"), "the missing region is named");
    assert!(what_to_do("QUEUE"), "the missing queue says what to check");
    assert!(
        what_to_do("Database roles"),
        "a missing privilege names the roles"
    );
    env.cleanup().await;
}

/// `--version` names the binary, the version and the commit; global flags are accepted after
/// a subcommand; `--format json` prints one object.
#[tokio::test]
async fn version_global_flags_and_json_output() {
    let env = three_logins().await;
    for binary in [INGEST, UNMASK, ROTATE_KEYS, LOADGEN] {
        let output = env.run_binary(binary, &["--version"]);
        let line = stdout(&output);
        let name = binary.rsplit('/').next().unwrap();
        let expected = format!(
            "{name} {} (commit {})",
            env!("CARGO_PKG_VERSION"),
            pii_vault::BUILD_COMMIT
        );
        assert_eq!(line.trim_end(), expected);
        assert_ne!(pii_vault::BUILD_COMMIT, "", "{line}");
    }

    let json = |output: &Output| -> serde_json::Value {
        assert!(output.status.success(), "{}", stderr(output));
        let text = stdout(output);
        assert_eq!(text.trim_end().lines().count(), 1, "one line: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    // The global flags after the subcommand, with a database URL only the flag gives.
    let status = json(&common::output_of(
        std::process::Command::new(ROTATE_KEYS)
            .args(["status", "--format", "json", "--log-format", "json"])
            .args(["--database-url", &env.url_as("keyadmin")])
            .envs(env.binary_env())
            .env_remove("DATABASE_URL"),
    ));
    let keys = status["keys"].as_array().unwrap();
    assert!(
        keys.iter()
            .any(|k| k["purpose"] == "token" && k["state"] == "active")
    );
    assert!(
        keys.iter()
            .any(|k| k["purpose"] == "data" && k["rows"] == 3)
    );

    let verified = json(&env.run_binary(UNMASK, &["verify-audit", "--format", "json"]));
    assert_eq!(verified["intact"], true);
    assert_eq!(verified["head"].as_str().unwrap().len(), 64);
    let text = env.run_binary(UNMASK, &["verify-audit"]);
    assert!(
        stdout(&text).contains(verified["head"].as_str().unwrap()),
        "the same head both ways: {}",
        stdout(&text)
    );

    let rotated = json(&env.run_binary_as(
        "keyadmin",
        ROTATE_KEYS,
        &["data-key", "--grace-seconds", "0", "--format", "json"],
    ));
    assert_eq!(rotated["rows"], 3);
    assert_eq!(rotated["retired"].as_array().unwrap().len(), 1);

    // Nothing on the queue: a summary of zeros, and no data key made for it.
    let data_keys = env.count("vault_keys WHERE purpose = 'data'").await;
    let summary = json(&env.run_binary_as(
        "ingester",
        INGEST,
        &["--drain", "--wait-seconds", "0", "--format", "json"],
    ));
    assert_eq!(summary["received"], 0);
    assert_eq!(summary["stored"], 0);
    assert_eq!(
        env.count("vault_keys WHERE purpose = 'data'").await,
        data_keys,
        "a run that seals nothing makes no data key"
    );

    let refused = env.run_binary(UNMASK, &["verify-audit", "--format", "csv"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    env.cleanup().await;
}

/// `loadgen` given a queue name that does not exist makes it with a dead-letter queue.
#[tokio::test]
async fn loadgen_creates_a_queue_with_its_dead_letter_queue() {
    let env = TestEnv::new(30).await;
    let name = format!("loadgen-made-{}", common::unique_suffix());
    let sent = env.run_binary(LOADGEN, &["--queue", &name, "--count", "2"]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    let sqs = aws_sdk_sqs::Client::new(&common::aws_config().await);
    let url_of = |name: String| sqs.get_queue_url().queue_name(name).send();
    let queue = url_of(name.clone()).await.unwrap().queue_url.unwrap();
    let dead_letters = url_of(format!("{name}-dlq"))
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let attributes = common::queue_attributes(&sqs, &queue).await;
    let policy = &attributes[&aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy];
    assert!(policy.contains(&format!("{name}-dlq")), "{policy}");
    for url in [queue, dead_letters] {
        sqs.delete_queue().queue_url(url).send().await.unwrap();
    }
    env.cleanup().await;
}

fn write_report(report: &str) {
    let dir = format!("{}/target/tmp", env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(format!("{dir}/exit-codes.txt"), report).unwrap();
    println!("{report}");
}
