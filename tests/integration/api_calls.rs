//! keys/README.md, E2: every AWS call each command makes is one the policies in keys/ allow the
//! IAM role that runs the command in production. Each command runs against the emulator
//! through a recording proxy; each call it made is turned into the IAM requests AWS would
//! authorize (`common::recording_proxy`) and held to the model in `common::aws_policy`: the
//! role's IAM policy and, for KMS, the key policy of the key it touches. A call no policy grants fails the test, naming the call, the command and
//! the role; the calls of every command are printed (and written to api-calls.txt in the
//! test's temporary directory) for the record.

use std::fmt::Write as _;

use crate::common::aws_policy::{
    Ask, COMPLIANCE, ENVELOPE, INGESTER, KEYADMIN, Key, LOADGEN, REPLAYER, SIGNER, SIGNING,
    VERIFIER, WINDOW, allows, iam, kms_allows, policy,
};
use crate::common::recording_proxy::{Call, Needed, Recorded, RecordingProxy, Resource, classify};
use crate::common::{self, TestEnv, stderr};

const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");
const INGEST: &str = env!("CARGO_BIN_EXE_ingest");
const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");
const LOADGEN_BIN: &str = env!("CARGO_BIN_EXE_loadgen");

/// Which IAM role runs each command in production, and the database login the test runs it
/// as. A new command is one line here (and a step in the test below, which checks that every
/// line was run).
const RUNS_AS: &[(&str, &str, &str)] = &[
    ("ingest", INGESTER, "ingester"),
    ("ingest replay-dead-letters", REPLAYER, "nobody"),
    ("loadgen", LOADGEN, "nobody"),
    ("unmask", COMPLIANCE, "compliance"),
    ("unmask verify-audit", VERIFIER, "compliance"),
    // Locally the compliance login may also sign (tests/integration/unmask.rs).
    ("unmask audit-checkpoint", SIGNER, "compliance"),
    ("rotate-keys init", KEYADMIN, "keyadmin"),
    ("rotate-keys status", KEYADMIN, "keyadmin"),
    ("rotate-keys data-key", KEYADMIN, "keyadmin"),
    ("rotate-keys token-key", KEYADMIN, "keyadmin"),
    ("rotate-keys verify", KEYADMIN, "keyadmin"),
    ("rotate-keys erase", KEYADMIN, "keyadmin"),
    ("rotate-keys witness-erasures", KEYADMIN, "keyadmin"),
    ("rotate-keys reapply-erasures", KEYADMIN, "keyadmin"),
    ("rotate-keys rewrap", KEYADMIN, "keyadmin"),
    ("rotate-keys window", KEYADMIN, "keyadmin"),
    ("rotate-keys expire", KEYADMIN, "keyadmin"),
];

/// The envelope key a rewrap moves to: made with the envelope key policy, as keys/README.md
/// says.
const NEXT_ENVELOPE: Key = Key {
    policy: "kms-key-policy.json",
    arn: "arn:aws:kms:us-east-1:111122223333:key/THE-NEXT-ENVELOPE-KEY-ID",
};

/// What an emulator resource stands for in the policies.
#[derive(Default)]
struct World {
    /// Emulator ARN, what the key is, and its key policy's model.
    keys: Vec<(String, &'static str, Key)>,
    /// Emulator queue name, and the name the policies give it.
    queues: Vec<(String, &'static str)>,
    buckets: Vec<(String, &'static str)>,
}

impl World {
    /// A key as a request names it: its ARN, or its key id.
    fn key(&self, named: &str) -> Option<(&'static str, Key)> {
        self.keys
            .iter()
            .find(|(arn, _, _)| arn == named || arn.ends_with(&format!(":key/{named}")))
            .map(|(_, what, key)| (*what, *key))
    }

    fn queue_arn(&self, name: &str) -> String {
        let name = self
            .queues
            .iter()
            .find(|(emulated, _)| emulated == name)
            .map_or(name, |(_, policies)| policies);
        format!("arn:aws:sqs:us-east-1:111122223333:{name}")
    }

    fn bucket<'a>(&'a self, name: &'a str) -> &'a str {
        self.buckets
            .iter()
            .find(|(emulated, _)| emulated == name)
            .map_or(name, |(_, policies)| policies)
    }
}

/// Whether `role` may do what `need` asks, and the need in words.
fn verdict(world: &World, role: &str, need: &Needed) -> (bool, String) {
    let context: Vec<(&str, &str)> = need
        .context
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let ask = Ask {
        action: &need.action,
        context: &context,
        algorithm: need.algorithm.as_deref(),
    };
    let mut said = need.action.clone();
    if let Some((_, purpose)) = context.iter().find(|(k, _)| *k == "purpose") {
        let _ = write!(said, " (purpose {purpose})");
    }
    if let Some(algorithm) = &need.algorithm {
        let _ = write!(said, " ({algorithm})");
    }
    let iam = iam(role);
    match &need.resource {
        Resource::KmsKey(named) => match world.key(named) {
            Some((what, key)) => {
                let allowed = kms_allows(&policy(key.policy), key.arn, role, &iam, &ask);
                (allowed, format!("{said} on {what}"))
            }
            None => (
                false,
                format!("{said} on {named}, a key the test does not know"),
            ),
        },
        Resource::NoKey => (false, format!("{said}, naming no key")),
        Resource::Account => (allows(&iam, None, "*", &ask), said),
        Resource::Arn(name) if need.action.starts_with("sqs:") => {
            let arn = world.queue_arn(name);
            let queue = arn.rsplit(':').next().unwrap_or_default().to_owned();
            (allows(&iam, None, &arn, &ask), format!("{said} on {queue}"))
        }
        Resource::Arn(path) => {
            let (bucket, rest) = path.split_once('/').unwrap_or((path, ""));
            let bucket = world.bucket(bucket);
            let arn = if rest.is_empty() {
                format!("arn:aws:s3:::{bucket}")
            } else {
                format!("arn:aws:s3:::{bucket}/{rest}")
            };
            let on = if rest.is_empty() {
                "the witness bucket".to_owned()
            } else {
                format!(
                    "{}* in the witness bucket",
                    rest.split('/').next().unwrap_or("")
                )
            };
            (allows(&iam, None, &arn, &ask), format!("{said} on {on}"))
        }
    }
}

/// Runs the commands through the proxy and keeps what each called.
struct Recorder<'a> {
    env: &'a TestEnv,
    proxy: RecordingProxy,
    /// (command as run, command, role, its calls).
    runs: Vec<(String, String, &'static str, Vec<Call>)>,
}

impl Recorder<'_> {
    async fn run(&mut self, binary: &str, args: &[&str]) -> String {
        let name = binary.rsplit('/').next().unwrap_or(binary);
        let command = match args.first() {
            Some(first) if !first.starts_with('-') => format!("{name} {first}"),
            _ => name.to_owned(),
        };
        let &(_, role, database_user) = RUNS_AS
            .iter()
            .find(|(c, _, _)| *c == command)
            .unwrap_or_else(|| panic!("`{command}` is not in RUNS_AS: say which role runs it"));
        let flags: Vec<&str> = args
            .iter()
            .copied()
            .filter(|a| a.starts_with("--"))
            .collect();
        let shown = [command.as_str()]
            .into_iter()
            .chain(flags)
            .collect::<Vec<_>>()
            .join(" ");
        let mut process = std::process::Command::new(binary);
        process
            .args(args)
            .envs(self.env.binary_env())
            .env("AWS_ENDPOINT_URL", self.proxy.endpoint())
            .env("DATABASE_URL", self.env.url_as(database_user));
        for service in ["SQS", "KMS", "S3"] {
            process.env_remove(format!("AWS_ENDPOINT_URL_{service}"));
        }
        let output = tokio::task::spawn_blocking(move || common::output_of(&mut process))
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "`{shown}` failed: {}",
            stderr(&output)
        );
        let calls = self.proxy.take().iter().map(classify).collect();
        self.runs.push((shown, command, role, calls));
        common::stdout(&output)
    }
}

#[tokio::test]
async fn every_call_each_command_makes_is_allowed_to_the_role_that_runs_it() {
    let env = TestEnv::new(30).await;
    let old_window_key = env.new_kms_key("pii-vault test: window 2025-01").await;
    let this_window_key = env.new_kms_key("pii-vault test: this month's window").await;
    let next_envelope = env.new_kms_key("pii-vault test: rewrap target").await;
    let queue_name = env.queue_url.rsplit('/').next().unwrap().to_owned();
    let dead_letters = dead_letter_queue(&env).await;
    let dead_letter_name = dead_letters.rsplit('/').next().unwrap().to_owned();
    let world = World {
        keys: vec![
            (env.kms_key_id.clone(), "the envelope key", ENVELOPE),
            (old_window_key.clone(), "a window key", WINDOW),
            (this_window_key.clone(), "a window key", WINDOW),
            (
                next_envelope.clone(),
                "the next envelope key",
                NEXT_ENVELOPE,
            ),
            (env.audit_signing_key_id.clone(), "the signing key", SIGNING),
        ],
        queues: vec![
            (queue_name, "login-queue"),
            (dead_letter_name, "login-queue-dlq"),
        ],
        buckets: vec![(
            env.audit_witness_bucket.clone(),
            "REPLACE-WITH-WITNESS-BUCKET",
        )],
    };
    let mut recorder = Recorder {
        env: &env,
        proxy: RecordingProxy::start(common::aws_port()).await,
        runs: Vec::new(),
    };
    let queue = env.queue_url.as_str();
    let this_month = time::OffsetDateTime::now_utc().date().to_string()[..7].to_owned();

    recorder.run(ROTATE_KEYS, &["init"]).await;
    // Logins before any window (under the envelope key), then into this month's window; the
    // second pair over the SQS Query protocol.
    let count = ["--count", "20", "--bad-rate", "0.1"];
    let loadgen = [&["--queue", queue, "--seed", "1"][..], &count].concat();
    recorder.run(LOADGEN_BIN, &loadgen).await;
    recorder.run(INGEST, &["--drain"]).await;
    let old_window = ["window", "--month", "2025-01", "--key", &old_window_key];
    recorder.run(ROTATE_KEYS, &old_window).await;
    let this_window = ["window", "--month", &this_month, "--key", &this_window_key];
    recorder.run(ROTATE_KEYS, &this_window).await;
    let query = ["--sqs-protocol", "query"];
    let loadgen = [&["--queue", queue, "--seed", "2"][..], &count, &query].concat();
    recorder.run(LOADGEN_BIN, &loadgen).await;
    // A dead letter, replayed to the login queue (and ingested with the rest below).
    env.sqs
        .send_message()
        .queue_url(&dead_letters)
        .message_body(common::login("u-dead", "10.9.9.9", "999-99-9999"))
        .send()
        .await
        .expect("SendMessage to the dead-letter queue");
    let replay = [
        "replay-dead-letters",
        "--dead-letter-queue-url",
        &dead_letters,
    ];
    recorder.run(INGEST, &replay).await;
    recorder
        .run(INGEST, &[&["--drain"][..], &query].concat())
        .await;

    let login_under = |in_window: bool| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_as::<_, (String, String, String)>(
                "SELECT l.user_id, l.masked_ip, l.masked_device_id FROM user_logins l
                 JOIN login_vault v ON v.login_id = l.id JOIN vault_keys k ON k.id = v.data_key_id
                 WHERE (k.window_starts IS NOT NULL) = $1 ORDER BY l.id LIMIT 1",
            )
            .bind(in_window)
            .fetch_one(&pool)
            .await
            .expect("a login")
        }
    };
    let (windowed_user, _, _) = login_under(true).await;
    let (other_user, masked_ip, masked_device_id) = login_under(false).await;
    let reveal = ["--purpose", "data-subject-access", "--reason", "api calls"];
    for question in [
        ["--user-id", windowed_user.as_str()],
        ["--masked-ip", masked_ip.as_str()],
        ["--masked-device-id", masked_device_id.as_str()],
    ] {
        recorder
            .run(UNMASK, &[&question[..], &reveal].concat())
            .await;
    }
    recorder.run(UNMASK, &["audit-checkpoint"]).await;
    recorder.run(UNMASK, &["verify-audit", "--witness"]).await;

    let quick = ["--grace-seconds", "0"];
    recorder.run(ROTATE_KEYS, &["status"]).await;
    recorder
        .run(ROTATE_KEYS, &[&["data-key"][..], &quick].concat())
        .await;
    recorder
        .run(ROTATE_KEYS, &[&["token-key"][..], &quick].concat())
        .await;
    recorder.run(ROTATE_KEYS, &["verify"]).await;
    let erase = ["erase", "--user-id", &other_user, "--reason", "api calls"];
    recorder.run(ROTATE_KEYS, &erase).await;
    recorder.run(ROTATE_KEYS, &["witness-erasures"]).await;
    let reapplied = recorder.run(ROTATE_KEYS, &["reapply-erasures"]).await;
    assert!(
        reapplied.contains("1 already in this database"),
        "{reapplied}"
    );
    let rewrap = ["rewrap", "--kms-key-id", &next_envelope];
    recorder.run(ROTATE_KEYS, &rewrap).await;
    let expire = [
        "expire",
        "--older-than",
        "1d",
        "--apply",
        "--grace-seconds",
        "0",
    ];
    let expired = recorder.run(ROTATE_KEYS, &expire).await;
    assert!(expired.contains("expired window 2025-01"), "{expired}");

    // The record, and what no policy allows.
    let mut record = String::new();
    let mut refused = Vec::new();
    for (shown, _, role, calls) in &recorder.runs {
        let _ = writeln!(record, "{shown}    [{role}]");
        let mut lines: Vec<(String, usize)> = Vec::new();
        for call in calls {
            for need in &call.needs {
                let (allowed, said) = verdict(&world, role, need);
                let line = format!("{:<34} {said}", call.operation);
                if !allowed {
                    let refusal = format!(
                        "`{shown}` runs as {role}, whose policies do not allow {} ({said})",
                        call.operation
                    );
                    if !refused.contains(&refusal) {
                        refused.push(refusal);
                    }
                }
                match lines.iter_mut().find(|(l, _)| *l == line) {
                    Some((_, n)) => *n += 1,
                    None => lines.push((line, 1)),
                }
            }
        }
        if lines.is_empty() {
            let _ = writeln!(record, "    (no AWS call)");
        }
        for (line, n) in lines {
            let _ = writeln!(record, "    {line}  x{n}");
        }
    }
    println!("{record}");
    let file = format!("{}/api-calls.txt", env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(&file, &record).unwrap_or_else(|e| panic!("{file}: {e}"));

    // Every command of the table ran, and the proxy saw what each is known to call.
    for (command, _, _) in RUNS_AS {
        assert!(
            recorder.runs.iter().any(|(_, c, _, _)| c == command),
            "RUNS_AS names `{command}`, which this test never ran"
        );
    }
    let saw = |command: &str, operation: &str| {
        recorder.runs.iter().any(|(_, c, _, calls)| {
            c == command && calls.iter().any(|call| call.operation == operation)
        })
    };
    for (command, operation) in [
        ("rotate-keys init", "KMS GenerateDataKey"),
        ("loadgen", "SQS SendMessageBatch (JSON)"),
        ("loadgen", "SQS SendMessageBatch (Query)"),
        ("ingest", "SQS ReceiveMessage (JSON)"),
        ("ingest", "SQS DeleteMessageBatch (Query)"),
        ("ingest replay-dead-letters", "SQS ReceiveMessage (JSON)"),
        ("unmask", "KMS Decrypt"),
        ("unmask audit-checkpoint", "KMS Sign"),
        ("unmask audit-checkpoint", "S3 PUT /BUCKET/OBJECT"),
        ("unmask verify-audit", "S3 GET /BUCKET?versions"),
        ("rotate-keys rewrap", "KMS ReEncrypt"),
        ("rotate-keys expire", "KMS ScheduleKeyDeletion"),
        ("rotate-keys erase", "S3 PUT /BUCKET/OBJECT"),
        ("rotate-keys reapply-erasures", "KMS Decrypt"),
    ] {
        assert!(saw(command, operation), "`{command}` made no {operation}");
    }
    assert!(refused.is_empty(), "{}", refused.join("\n"));
    let _ = env.sqs.delete_queue().queue_url(&dead_letters).send().await;
    env.cleanup().await;
}

/// A dead-letter queue for the test's queue (its redrive policy names it, as the replay
/// requires); its URL.
async fn dead_letter_queue(env: &TestEnv) -> String {
    use aws_sdk_sqs::types::QueueAttributeName;
    let name = format!("test-dlq-{}", common::unique_suffix());
    let created = env.sqs.create_queue().queue_name(name).send().await;
    let url = created.expect("CreateQueue").queue_url.expect("a URL");
    let arn = env
        .sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("GetQueueAttributes")
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .expect("the queue's ARN");
    let policy = serde_json::json!({ "deadLetterTargetArn": arn, "maxReceiveCount": "5" });
    env.sqs
        .set_queue_attributes()
        .queue_url(&env.queue_url)
        .attributes(QueueAttributeName::RedrivePolicy, policy.to_string())
        .send()
        .await
        .expect("SetQueueAttributes");
    url
}

/// The checker can say no: calls the policies do not grant are refused, naming what they ask.
#[test]
fn calls_outside_a_roles_policies_are_refused() {
    let world = World {
        keys: vec![
            ("arn:e".into(), "the envelope key", ENVELOPE),
            ("arn:w".into(), "a window key", WINDOW),
        ],
        queues: vec![("test-1".into(), "login-queue")],
        buckets: Vec::new(),
    };
    let kms = |operation: &str, body: &str| Recorded {
        method: "POST".into(),
        target: "/".into(),
        headers: vec![
            (
                "authorization".into(),
                "AWS4-HMAC-SHA256 Credential=t/d/us-east-1/kms/aws4_request, SignedHeaders=host"
                    .into(),
            ),
            ("x-amz-target".into(), format!("TrentService.{operation}")),
        ],
        body: body.to_owned().into(),
    };
    let token = r#""EncryptionContext": {"purpose": "token", "key_id": "1"}"#;
    let cases = [
        (
            COMPLIANCE,
            kms("Decrypt", &format!(r#"{{"KeyId": "arn:e", {token}}}"#)),
            false,
        ),
        (
            INGESTER,
            kms("Decrypt", &format!(r#"{{"KeyId": "arn:e", {token}}}"#)),
            true,
        ),
        (
            KEYADMIN,
            kms("ScheduleKeyDeletion", r#"{"KeyId": "arn:w"}"#),
            true,
        ),
        (
            KEYADMIN,
            kms("ScheduleKeyDeletion", r#"{"KeyId": "arn:e"}"#),
            false,
        ),
        (
            KEYADMIN,
            kms("CancelKeyDeletion", r#"{"KeyId": "arn:w"}"#),
            false,
        ),
        (
            KEYADMIN,
            kms("DescribeKey", r#"{"KeyId": "arn:unknown"}"#),
            false,
        ),
    ];
    for (role, request, want) in cases {
        let call = classify(&request);
        let (allowed, said) = verdict(&world, role, &call.needs[0]);
        assert_eq!(allowed, want, "{role}: {said}");
    }
    let query = Recorded {
        method: "POST".into(),
        target: "/".into(),
        headers: vec![(
            "authorization".into(),
            "AWS4-HMAC-SHA256 Credential=t/d/us-east-1/sqs/aws4_request".into(),
        )],
        body: "Action=SendMessageBatch&QueueUrl=http%3A%2F%2Fh%3A1%2F0%2Ftest-1&X=a+b".into(),
    };
    let call = classify(&query);
    assert_eq!(call.operation, "SQS SendMessageBatch (Query)");
    assert!(verdict(&world, LOADGEN, &call.needs[0]).0);
    assert!(!verdict(&world, INGESTER, &call.needs[0]).0);
}
