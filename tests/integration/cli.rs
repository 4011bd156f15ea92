//! The binaries as a user runs them: flags, exit codes, one-line errors, and the demo's path
//! (loadgen -> rotate-keys init -> ingest --drain).

use crate::common::{self, TestEnv, stderr, stdout};

const INGEST: &str = env!("CARGO_BIN_EXE_ingest");
const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");
const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");
const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");

fn sample(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn demo_path_loadgen_init_ingest() {
    let env = TestEnv::unmigrated().await;

    // ingest needs no DDL rights: on an empty database it refuses and says what to run.
    let refused = env.run_binary(INGEST, &["--drain"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let message = stderr(&refused);
    assert!(message.contains("rotate-keys init"), "{message}");
    assert_eq!(message.trim_end().lines().count(), 1, "one line: {message}");
    assert!(
        !message.contains("pii_vault:pii_vault"),
        "no password in errors: {message}"
    );

    let init = env.run_binary(ROTATE_KEYS, &["init"]);
    assert!(init.status.success(), "{}", stderr(&init));
    assert!(stdout(&init).contains("created"), "{}", stdout(&init));
    let again = env.run_binary(ROTATE_KEYS, &["init"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stdout(&again).contains("nothing to do"),
        "{}",
        stdout(&again)
    );
    assert_eq!(env.count("vault_keys WHERE purpose = 'token'").await, 1);

    let sent = env.run_binary(LOADGEN, &["--file", &sample("sample_data.jsonl")]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    assert!(
        stdout(&sent).starts_with("sent 100 messages"),
        "{}",
        stdout(&sent)
    );

    // The ingester needs nothing beyond the pii_vault_ingester role.
    let ingested = env.run_binary_as("ingester", INGEST, &["--drain"]);
    assert_sample_stored(&env, &ingested).await;
    env.cleanup().await;
}

#[tokio::test]
async fn loadgen_reads_the_original_gzip_array_and_generates() {
    let env = TestEnv::new(30).await;
    let sent = env.run_binary(LOADGEN, &["--file", &sample("sample_data.json.gz")]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    assert!(
        stdout(&sent).starts_with("sent 100 messages"),
        "{}",
        stdout(&sent)
    );
    let generated = env.run_binary(LOADGEN, &["--count", "25", "--bad-rate", "0.5"]);
    assert!(generated.status.success(), "{}", stderr(&generated));
    assert!(
        stdout(&generated).starts_with("sent 25 messages"),
        "{}",
        stdout(&generated)
    );
    assert_eq!(env.messages_on_queue().await, 125);

    env.init_token_key().await;
    let summary = env.drain().await;
    // At least once: the emulator may hand one message to two concurrent polls.
    assert_eq!(summary.received, 125 + summary.duplicates);
    assert_eq!(summary.stored + summary.quarantined, 125);
    assert!(
        summary.quarantined > 1,
        "about half the generated ones are malformed"
    );
    env.cleanup().await;
}

/// The demo's path over the SQS Query protocol (as against LocalStack before 3.0), and `auto`,
/// which asks the endpoint and says what it chose.
#[tokio::test]
async fn query_protocol_loadgen_and_ingest_and_auto() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let sent = env.run_binary(
        LOADGEN,
        &[
            "--sqs-protocol",
            "query",
            "--file",
            &sample("sample_data.jsonl"),
        ],
    );
    assert!(sent.status.success(), "{}", stderr(&sent));
    assert!(
        stdout(&sent).starts_with("sent 100 messages"),
        "{}",
        stdout(&sent)
    );
    let ingested = env.run_binary(INGEST, &["--sqs-protocol", "query", "--drain"]);
    assert_sample_stored(&env, &ingested).await;

    // auto, from the environment: LocalStack 4 speaks JSON, and the choice is logged once.
    let run_auto = |binary: &str, args: &[&str]| {
        common::output_of(
            std::process::Command::new(binary)
                .args(args)
                .envs(env.binary_env())
                .env("SQS_PROTOCOL", "auto")
                .env("RUST_LOG", "info"),
        )
    };
    let auto_sent = run_auto(LOADGEN, &["--count", "3", "--bad-rate", "0"]);
    assert!(auto_sent.status.success(), "{}", stderr(&auto_sent));
    let auto_ingested = run_auto(INGEST, &["--drain"]);
    assert!(auto_ingested.status.success(), "{}", stderr(&auto_ingested));
    for output in [&auto_sent, &auto_ingested] {
        let said = stderr(output);
        assert_eq!(
            said.matches("--sqs-protocol auto: the SQS endpoint speaks the json protocol")
                .count(),
            1,
            "{said}"
        );
    }
    assert!(
        stdout(&auto_ingested).contains("stored=3 quarantined=0"),
        "{}",
        stdout(&auto_ingested)
    );

    // The Query client speaks plain HTTP only, and says so in one line.
    let https = env.run_binary(
        INGEST,
        &[
            "--sqs-protocol",
            "query",
            "--drain",
            "--queue",
            "https://sqs.us-east-1.amazonaws.com/123456789012/login-queue",
        ],
    );
    assert_eq!(https.status.code(), Some(2), "{}", stderr(&https));
    let message = stderr(&https);
    assert!(message.contains("plain HTTP only"), "{message}");
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    env.cleanup().await;
}

#[test]
fn bad_arguments_exit_2_with_one_clear_line() {
    let cases: [(&str, &[&str]); 7] = [
        (INGEST, &["--batch-size", "0"]),
        (INGEST, &["--wait-seconds", "21"]),
        (INGEST, &["--sqs-protocol", "soap"]),
        (LOADGEN, &["--count", "1", "--sqs-protocol", "xml"]),
        (LOADGEN, &[]),
        (LOADGEN, &["--count", "5", "--dup-rate", "2"]),
        (ROTATE_KEYS, &["frobnicate"]),
    ];
    for (binary, args) in cases {
        let output = common::output_of(
            std::process::Command::new(binary)
                .args(args)
                .env("DATABASE_URL", "postgres://nobody:secret@127.0.0.1:1/none"),
        );
        assert_eq!(
            output.status.code(),
            Some(2),
            "{binary} {args:?}: {}",
            stderr(&output)
        );
        assert!(stderr(&output).contains("error"), "{}", stderr(&output));
    }
}

/// The three questions of `unmask` are alternatives, exactly one required: the usage says so,
/// and so does the error when none is asked.
#[test]
fn unmask_usage_shows_the_questions_as_alternatives() {
    let help = common::output_of(std::process::Command::new(UNMASK).arg("--help"));
    assert!(help.status.success(), "{}", stderr(&help));
    let usage = stdout(&help);
    let line = usage
        .lines()
        .find(|line| line.starts_with("Usage: "))
        .unwrap_or_else(|| panic!("no usage line in\n{usage}"));
    assert_eq!(
        line,
        "Usage: unmask (--user-id <USER_ID> | --masked-ip <TOKEN> | --masked-device-id <TOKEN>) \
         --purpose <PURPOSE> --reason <REASON> [OPTIONS]"
    );

    let none = common::output_of(
        std::process::Command::new(UNMASK)
            .args(["--purpose", "legal-request", "--reason", "r"])
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
    );
    assert_eq!(none.status.code(), Some(2), "{}", stderr(&none));
    assert!(
        stderr(&none)
            .contains("<--user-id <USER_ID>|--masked-ip <TOKEN>|--masked-device-id <TOKEN>>"),
        "{}",
        stderr(&none)
    );
}

/// `ingest --drain` stored the sample (99 logins, 1 quarantined) and left the queue empty.
async fn assert_sample_stored(env: &TestEnv, ingested: &std::process::Output) {
    assert!(ingested.status.success(), "{}", stderr(ingested));
    assert!(
        stdout(ingested).contains("stored=99 quarantined=1"),
        "{}",
        stdout(ingested)
    );
    assert_eq!(env.count("user_logins").await, 99);
    assert_eq!(env.messages_on_queue().await, 0);
}

/// A file's lines that KMS gives no data key for are neither written nor passed over in
/// silence: the run fails and says how many, and the same file run again stores them.
#[tokio::test]
async fn from_file_fails_when_kms_will_not_seal_and_a_rerun_stores_everything() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let kms = env.kms.client();
    let refusing = kms
        .create_key()
        .description("pii-vault test key, disabled")
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .key_id;
    kms.disable_key().key_id(&refusing).send().await.unwrap();
    let file = sample("sample_data.jsonl");

    let refused = common::output_of(
        std::process::Command::new(INGEST)
            .args(["--from-file", &file])
            .envs(env.binary_env())
            .env("KMS_KEY_ID", &refusing),
    );
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stdout(&refused)
            .contains("stored=0 quarantined=0 duplicates=0 acknowledged=0 left_on_queue=100"),
        "{}",
        stdout(&refused)
    );
    let message = stderr(&refused);
    assert!(
        message.contains("error: 100 lines were not written")
            && message.contains("DisabledException"),
        "{message}"
    );
    assert_eq!(env.count("user_logins").await, 0);

    let rerun = env.run_binary(INGEST, &["--from-file", &file]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    assert!(
        stdout(&rerun).contains("stored=99 quarantined=1"),
        "{}",
        stdout(&rerun)
    );
    env.cleanup().await;
}

#[test]
fn unreachable_database_is_one_line_without_the_password() {
    let output = common::output_of(std::process::Command::new(INGEST).args(["--drain"]).env(
        "DATABASE_URL",
        "postgres://someone:hunter2@127.0.0.1:1/none",
    ));
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.starts_with("error: cannot connect to PostgreSQL"),
        "{message}"
    );
    assert!(message.contains("someone:***@127.0.0.1:1"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
}

#[tokio::test]
async fn from_file_ingests_a_backfill_and_a_replay_adds_nothing() {
    let env = TestEnv::new(30).await;
    env.init_token_key().await;
    let file = sample("sample_data.jsonl");
    let first = common::output_of(
        std::process::Command::new(INGEST)
            .args(["--from-file", &file])
            .envs(env.binary_env())
            .env("RUST_LOG", "info"),
    );
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stdout(&first).contains("stored=99 quarantined=1"),
        "{}",
        stdout(&first)
    );
    // A file's own defaults: bigger batches and one more writer than from a queue.
    assert!(
        stderr(&first).contains("writers=4 batch_size=4000"),
        "{}",
        stderr(&first)
    );
    let replay = common::output_of(
        std::process::Command::new(INGEST)
            .args(["--from-file", &file, "--batch-size", "7"])
            .envs(env.binary_env())
            .env("RUST_LOG", "info"),
    );
    assert!(
        stderr(&replay).contains("writers=4 batch_size=7"),
        "{}",
        stderr(&replay)
    );
    assert!(replay.status.success(), "{}", stderr(&replay));
    assert!(
        stdout(&replay).contains("stored=0 quarantined=0 duplicates=100"),
        "{}",
        stdout(&replay)
    );
    assert_eq!(env.count("user_logins").await, 99);

    // From stdin, under a source id of its own: new ids, so stored again.
    let piped = common::output_of(
        std::process::Command::new(INGEST)
            .args(["--from-file", "-", "--source-id", "stdin-replay"])
            .envs(env.binary_env())
            .stdin(std::fs::File::open(&file).unwrap()),
    );
    assert!(piped.status.success(), "{}", stderr(&piped));
    assert_eq!(env.count("user_logins").await, 198);

    let missing = env.run_binary(INGEST, &["--from-file", "/nonexistent/file.jsonl"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("opening /nonexistent/file.jsonl"),
        "{}",
        stderr(&missing)
    );
    env.cleanup().await;
}
