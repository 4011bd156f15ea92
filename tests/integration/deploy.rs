//! deploy/: the CloudFormation templates' policies are the files in keys/, and the stack,
//! deployed to the local emulator by `scripts/deploy-local`, carries the demo: the binaries run
//! against the queue, keys and witness bucket it made, found by its outputs.
//!
//! The emulator is LocalStack as `scripts/services up` starts it (CloudFormation, IAM and STS
//! beside SQS, KMS and S3). It runs no ECS, EventBridge Scheduler, SNS or CloudWatch, so the
//! stack is deployed without them (DeployCompute and DeployAlarms false): the data plane and
//! the roles. moto cannot serve a deployed stack (`scripts/deploy-local` says why).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use aws_sdk_kms::types::{KeySpec, KeyUsageType};
use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::Value;

use crate::common::{self, SAMPLE_JSONL, TestEnv, output_of, stderr, stdout};
use pii_vault::audit::witness::WitnessBucket;

const INGEST: &str = env!("CARGO_BIN_EXE_ingest");
const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");
const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");
const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A Python with PyYAML for deploy/policies.py: the lint virtualenv or an emulator's.
fn python() -> PathBuf {
    for venv in [".venv-lint", ".venv-localstack", ".venv"] {
        let python = Path::new(ROOT).join(venv).join("bin/python");
        let has_yaml = Command::new(&python)
            .args(["-c", "import yaml"])
            .output()
            .is_ok_and(|o| o.status.success());
        if has_yaml {
            return python;
        }
    }
    panic!(
        "no Python with PyYAML in .venv-lint, .venv-localstack or .venv: run `make lint` or \
         `scripts/services up`"
    )
}

fn policies_check(keys_dir: &Path) -> Output {
    Command::new(python())
        .arg(Path::new(ROOT).join("deploy/policies.py"))
        .arg("--check")
        .arg("--keys-dir")
        .arg(keys_dir)
        .output()
        .expect("running deploy/policies.py")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn the_templates_policies_are_the_files_in_keys() {
    let keys = Path::new(ROOT).join("keys");
    let output = policies_check(&keys);
    assert!(
        output.status.success(),
        "deploy/*.yaml and keys/ disagree:\n{}",
        stderr(&output)
    );
    assert!(stdout(&output).contains("deploy/*.yaml equal keys/"));

    // A keys/ that drifted from the templates is refused, naming the file: here the verifier
    // given Sign, and a policy no template uses.
    let drifted = std::env::temp_dir().join(format!("pii-vault-keys-{}", common::unique_suffix()));
    copy_dir(&keys, &drifted);
    let verifier = drifted.join("iam-audit-verifier.json");
    let text = std::fs::read_to_string(&verifier).unwrap();
    let widened = text.replace(
        r#""Action": "kms:GetPublicKey""#,
        r#""Action": ["kms:GetPublicKey", "kms:Sign"]"#,
    );
    assert_ne!(text, widened, "the verifier's policy changed shape");
    std::fs::write(&verifier, widened).unwrap();
    std::fs::write(
        drifted.join("iam-orphan.json"),
        r#"{"Version": "2012-10-17", "Statement": []}"#,
    )
    .unwrap();
    let output = policies_check(&drifted);
    std::fs::remove_dir_all(&drifted).unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let said = stderr(&output);
    assert!(
        said.contains(
            "keys/iam-audit-verifier.json differs from the permission policy of AuditVerifierPolicy"
        ) && said.contains("kms:Sign"),
        "{said}"
    );
    assert!(
        said.contains("keys/iam-orphan.json is in no template"),
        "{said}"
    );
}

/// `scripts/deploy-local ARGS` against the tests' emulator: its JSON answer.
fn deploy_local(args: &[&str]) -> Value {
    let output = output_of(
        Command::new(Path::new(ROOT).join("scripts/deploy-local"))
            .args(args)
            .env("AWS_ENDPOINT_URL", common::aws_endpoint()),
    );
    assert!(
        output.status.success(),
        "scripts/deploy-local {}: {}",
        args.join(" "),
        stderr(&output)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("deploy-local printed no JSON ({e}): {}", stdout(&output)))
}

/// Deletes a stack at the end of the test, also when it fails half-way.
struct Stack {
    name: String,
    outputs: Value,
    seconds: f64,
    deleted: bool,
}

impl Stack {
    fn up(args: &[&str]) -> Self {
        let answer = deploy_local(&[&["up"], args].concat());
        Self {
            name: answer["stack"].as_str().expect("a stack name").to_owned(),
            outputs: answer["outputs"].clone(),
            seconds: answer["seconds"].as_f64().expect("seconds"),
            deleted: false,
        }
    }

    fn output(&self, key: &str) -> String {
        self.outputs[key]
            .as_str()
            .unwrap_or_else(|| panic!("stack {} has no output {key}", self.name))
            .to_owned()
    }

    fn down(mut self) {
        deploy_local(&["down", &self.name]);
        self.deleted = true;
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = Command::new(Path::new(ROOT).join("scripts/deploy-local"))
                .args(["down", &self.name])
                .env("AWS_ENDPOINT_URL", common::aws_endpoint())
                .output();
        }
    }
}

/// A GET of the witness bucket (`?query` or `/key?query`): the body of its 200 answer.
async fn bucket_answer(witness: &WitnessBucket, path: &str) -> String {
    let answer = witness
        .send(path, "GET", path, &[], Vec::new())
        .await
        .unwrap();
    let body = String::from_utf8(answer.body.to_vec()).unwrap();
    assert_eq!(answer.status, 200, "GET {path}: {body}");
    body
}

fn sample_user() -> (String, String, String) {
    let first = std::fs::read_to_string(SAMPLE_JSONL).unwrap();
    let line: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    let field = |name: &str| line[name].as_str().unwrap().to_owned();
    (field("user_id"), field("ip"), field("device_id"))
}

#[tokio::test]
async fn the_stack_deploys_to_the_emulator_and_the_demo_runs_through_its_resources() {
    let started = Instant::now();
    let stack = Stack::up(&[]);
    let deployed = started.elapsed();
    let queue_url = stack.output("QueueUrl");
    let key = stack.output("EnvelopeKeyArn");
    let signing_key = stack.output("AuditSigningKeyArn");
    let bucket = stack.output("WitnessBucketName");

    // What the stack made: the queue's failures go to its dead-letter queue, both encrypted,
    // with the long poll and visibility timeout ingest expects; the keys of the right kinds
    // behind their aliases; the witness bucket under Object Lock in COMPLIANCE mode.
    let config = common::aws_config().await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let queue = common::queue_attributes(&sqs, &queue_url).await;
    let redrive: Value = serde_json::from_str(&queue[&QueueAttributeName::RedrivePolicy]).unwrap();
    assert_eq!(
        redrive["deadLetterTargetArn"],
        stack.output("DeadLetterQueueArn")
    );
    assert_eq!(redrive["maxReceiveCount"], 5);
    assert_eq!(queue[&QueueAttributeName::SqsManagedSseEnabled], "true");
    assert_eq!(queue[&QueueAttributeName::VisibilityTimeout], "60");
    assert_eq!(
        queue[&QueueAttributeName::ReceiveMessageWaitTimeSeconds],
        "20"
    );
    let dlq = common::queue_attributes(&sqs, &stack.output("DeadLetterQueueUrl")).await;
    assert_eq!(dlq[&QueueAttributeName::SqsManagedSseEnabled], "true");
    let allowed: Value =
        serde_json::from_str(&dlq[&QueueAttributeName::RedriveAllowPolicy]).unwrap();
    assert_eq!(
        allowed["sourceQueueArns"],
        serde_json::json!([stack.output("QueueArn")])
    );

    let kms = aws_sdk_kms::Client::new(&config);
    for (alias, arn, spec, usage) in [
        (
            "EnvelopeKeyAlias",
            &key,
            KeySpec::SymmetricDefault,
            KeyUsageType::EncryptDecrypt,
        ),
        (
            "AuditSigningKeyAlias",
            &signing_key,
            KeySpec::EccNistP256,
            KeyUsageType::SignVerify,
        ),
    ] {
        let described = kms
            .describe_key()
            .key_id(stack.output(alias))
            .send()
            .await
            .expect("DescribeKey")
            .key_metadata
            .unwrap();
        assert_eq!(&described.arn.unwrap(), arn, "{alias}");
        assert_eq!(described.key_spec, Some(spec), "{alias}");
        assert_eq!(described.key_usage, Some(usage), "{alias}");
    }

    let witness = WitnessBucket::new(&config, &bucket, common::WITNESS_RETAIN_DAYS);
    witness
        .check_locked()
        .await
        .expect("the bucket has Object Lock");
    let lock = bucket_answer(&witness, "?object-lock").await;
    assert!(
        lock.contains("<Mode>COMPLIANCE</Mode>") && lock.contains("<Days>1</Days>"),
        "{lock}"
    );
    let versioning = bucket_answer(&witness, "?versioning").await;
    assert!(
        versioning.contains("<Status>Enabled</Status>"),
        "{versioning}"
    );

    // The demo over a fresh database, through the stack's resources.
    let demo_started = Instant::now();
    let env = TestEnv::unmigrated().await;
    let stack_env: HashMap<&str, String> = HashMap::from([
        ("KMS_KEY_ID", key.clone()),
        ("QUEUE", queue_url.clone()),
        ("AUDIT_SIGNING_KEY_ID", signing_key.clone()),
        ("AUDIT_WITNESS_BUCKET", bucket.clone()),
    ]);
    let run = |user: Option<&str>, binary: &str, args: &[&str]| {
        let mut command = Command::new(binary);
        command.args(args).envs(env.binary_env()).envs(&stack_env);
        if let Some(user) = user {
            command.env("DATABASE_URL", env.url_as(user));
        }
        let output = output_of(&mut command);
        assert!(
            output.status.success(),
            "{binary} {args:?}: {}",
            stderr(&output)
        );
        output
    };

    run(None, ROTATE_KEYS, &["init"]);
    run(
        None,
        LOADGEN,
        &["--file", SAMPLE_JSONL, "--queue", &queue_url],
    );
    run(Some("ingester"), INGEST, &["--drain"]);
    assert_eq!(env.count("user_logins").await, 99);
    assert_eq!(env.count("quarantine").await, 1);
    let wrapped_under: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT kms_key_id FROM vault_keys")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        wrapped_under,
        std::slice::from_ref(&key),
        "every key wrapped by the stack's key"
    );
    let queue = common::queue_attributes(&sqs, &queue_url).await;
    for left in [
        QueueAttributeName::ApproximateNumberOfMessages,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
    ] {
        assert_eq!(queue[&left], "0", "{left:?}: the queue is drained");
    }

    let (user, ip, device_id) = sample_user();
    let reveal = run(
        Some("compliance"),
        UNMASK,
        &[
            "--user-id",
            &user,
            "--purpose",
            "data-subject-access",
            "--reason",
            "deploy test",
            "--actor",
            "deploy-test",
            "--format",
            "json",
        ],
    );
    let revealed: Vec<Value> = stdout(&reveal)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(revealed.len(), 1, "{revealed:?}");
    assert_eq!(revealed[0]["ip"], ip.as_str());
    assert_eq!(revealed[0]["device_id"], device_id.as_str());

    let signed = run(Some("compliance"), UNMASK, &["audit-checkpoint"]);
    assert!(
        stdout(&signed).contains(&format!("witnessed in {bucket}")),
        "{}",
        stdout(&signed)
    );
    let verified = run(Some("compliance"), UNMASK, &["verify-audit", "--witness"]);
    assert!(
        stdout(&verified).contains("witness: checkpoint seq 1 ")
            && stdout(&verified).contains(&bucket),
        "{}",
        stdout(&verified)
    );
    // The checkpoint is in the stack's bucket, locked in COMPLIANCE mode.
    let versions = witness.versions().await.unwrap();
    assert_eq!(versions.len(), 1, "{versions:?}");
    let (object, version) = &versions[0];
    let retention = bucket_answer(
        &witness,
        &format!("/{object}?retention&versionId={version}"),
    )
    .await;
    assert!(retention.contains("<Mode>COMPLIANCE</Mode>"), "{retention}");

    // A month's retention window from deploy/retention-window.yaml, registered by the key admin.
    let window = Stack::up(&[
        "--template",
        "deploy/retention-window.yaml",
        "--param",
        "Month=2020-01",
        "--param",
        &format!("NamePrefix={}", stack.name),
    ]);
    let window_key = window.output("WindowKeyArn");
    run(
        Some("keyadmin"),
        ROTATE_KEYS,
        &["window", "--month", "2020-01", "--key", &window_key],
    );
    let demo = demo_started.elapsed();

    let deleting = Instant::now();
    let (name, seconds) = (stack.name.clone(), stack.seconds);
    window.down();
    stack.down();
    let deleted = deleting.elapsed();
    // The queues went with the stack (the keys and the bucket are retained, by design).
    let gone = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .send()
        .await;
    assert!(gone.is_err(), "the login queue outlived its stack");

    eprintln!(
        "deploy: stack {name} created in {seconds:.1} s ({:.1} s with the checks of \
         deploy-local), demo through it in {:.1} s, stacks deleted in {:.1} s",
        deployed.as_secs_f64(),
        demo.as_secs_f64(),
        deleted.as_secs_f64()
    );
    env.cleanup().await;
}
