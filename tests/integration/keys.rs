//! keys/README.md, proved: one test per numbered claim (K1, K2, ...). Each reads the policies in
//! keys/ and asks the model of AWS authorization in `common::aws_policy` what a principal may
//! do, over every KMS action on a key and a set of well- and ill-formed requests, and compares
//! both ways with the claim: what it lists is allowed, everything else is refused.

use serde_json::json;

use crate::common::aws_policy::{
    ACCOUNT, ANYONE, Ask, BREAK_GLASS, COMPLIANCE, ENVELOPE, INGESTER, KEYADMIN, Key, LOADGEN,
    POLICY_ADMIN, REPLAYER, SIGNER, SIGNING, VERIFIER, WINDOW, action_matches, all_policies,
    allows, decider, glob, iam, in_context, kms_allows, plain, policy, role, statements, strings,
};

/// The roles deploy/pii-vault.yaml adds to the eight: the scheduled `verify-audit --witness`
/// (`VERIFIER`),
/// the ECS agent's (image, logs, secrets) and EventBridge Scheduler's.
const TASK_EXECUTION: &str = "pii-vault-task-execution";
const SCHEDULER: &str = "pii-vault-scheduler";

const PRINCIPALS: [&str; 12] = [
    INGESTER,
    COMPLIANCE,
    KEYADMIN,
    POLICY_ADMIN,
    SIGNER,
    BREAK_GLASS,
    LOADGEN,
    REPLAYER,
    VERIFIER,
    TASK_EXECUTION,
    SCHEDULER,
    ANYONE,
];
const KEYS: [Key; 3] = [ENVELOPE, WINDOW, SIGNING];

/// Every KMS action authorized on a key (account-wide ones such as CreateKey are not).
#[rustfmt::skip]
const KEY_ACTIONS: [&str; 44] = [
    "kms:CancelKeyDeletion", "kms:CreateAlias", "kms:CreateGrant", "kms:Decrypt",
    "kms:DeleteAlias", "kms:DeleteImportedKeyMaterial", "kms:DeriveSharedSecret",
    "kms:DescribeKey", "kms:DisableKey", "kms:DisableKeyRotation", "kms:EnableKey",
    "kms:EnableKeyRotation", "kms:Encrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyPairWithoutPlaintext", "kms:GenerateDataKeyWithoutPlaintext",
    "kms:GenerateMac", "kms:GetKeyPolicy", "kms:GetKeyRotationStatus",
    "kms:GetParametersForImport", "kms:GetPublicKey", "kms:ImportKeyMaterial", "kms:ListGrants",
    "kms:ListKeyPolicies", "kms:ListKeyRotations", "kms:ListResourceTags", "kms:PutKeyPolicy",
    "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:ReplicateKey", "kms:RetireGrant",
    "kms:RevokeGrant", "kms:RotateKeyOnDemand", "kms:ScheduleKeyDeletion", "kms:Sign",
    "kms:SynchronizeMultiRegionKey", "kms:TagResource", "kms:UntagResource", "kms:UpdateAlias",
    "kms:UpdateKeyDescription", "kms:UpdatePrimaryRegion", "kms:Verify", "kms:VerifyMac",
];
/// The actions whose requests carry an encryption context: the key-use grants.
#[rustfmt::skip]
const CONTEXT_ACTIONS: [&str; 8] = [
    "kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext", "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyPairWithoutPlaintext",
];
const SIGNING_ACTIONS: [&str; 2] = ["kms:Sign", "kms:Verify"];

type Context = &'static [(&'static str, &'static str)];
/// A data key's context, as the database's audited door hands it out.
const DATA_KEY: Context = &[("purpose", "data"), ("key_id", "7")];
/// The door's shape (purpose and key_id, nothing else) and every way to stray from it.
const CONTEXTS: [Context; 12] = [
    DATA_KEY,
    &[("purpose", "token"), ("key_id", "7")],
    &[("purpose", "other"), ("key_id", "7")],
    &[("purpose", "Data"), ("key_id", "7")],
    &[],
    &[("purpose", "data")],
    &[("purpose", "token")],
    &[("key_id", "7")],
    &[("purpose", "data"), ("key_id", "7"), ("user", "u-1")],
    &[("purpose", "token"), ("key_id", "7"), ("user", "u-1")],
    &[("PURPOSE", "data"), ("key_id", "7")],
    &[("purpose", "data"), ("Key_Id", "7")],
];
const ALGORITHMS: [Option<&str>; 4] = [
    None,
    Some("ECDSA_SHA_256"),
    Some("ECDSA_SHA_384"),
    Some("RSASSA_PSS_SHA_256"),
];

/// A request the claims try: every one is made of constants.
type Request = Ask<'static>;

/// The requests to try for `action`.
fn asks(action: &'static str) -> Vec<Request> {
    if CONTEXT_ACTIONS.contains(&action) {
        CONTEXTS.map(|context| in_context(action, context)).to_vec()
    } else if SIGNING_ACTIONS.contains(&action) {
        ALGORITHMS
            .iter()
            .map(|&algorithm| Ask {
                algorithm,
                ..plain(action)
            })
            .collect()
    } else {
        vec![plain(action)]
    }
}

/// The purpose of a context shaped as the door hands it out: keys exactly `purpose`, `key_id`.
fn purpose<'a>(context: &[(&'a str, &'a str)]) -> Option<&'a str> {
    let mut keys: Vec<&str> = context.iter().map(|(k, _)| *k).collect();
    keys.sort();
    let purpose = context.iter().find(|(k, _)| *k == "purpose");
    purpose
        .filter(|_| keys == ["key_id", "purpose"])
        .map(|(_, v)| *v)
}

/// Whether a grant limited to `only` (purposes for key use, algorithms for signing, nothing for
/// other actions) covers `ask`.
fn covers(only: &[&str], ask: &Ask) -> bool {
    if CONTEXT_ACTIONS.contains(&ask.action) {
        purpose(ask.context).is_some_and(|p| only.contains(&p))
    } else if SIGNING_ACTIONS.contains(&ask.action) {
        ask.algorithm.is_some_and(|a| only.contains(&a))
    } else {
        only.is_empty()
    }
}

/// What a principal may do on one key: each action, limited as `covers` reads it.
type Rights<'a> = &'a [(&'a str, &'a [&'a str])];

/// `decide` allows exactly `expected`, each action limited as `covers` reads it, and no other
/// request for any action on a key.
fn assert_exactly(what: &str, decide: impl Fn(&Ask) -> bool, expected: Rights) {
    for (action, _) in expected {
        assert!(
            KEY_ACTIONS.contains(action),
            "{action} is not a KMS key action"
        );
    }
    for action in KEY_ACTIONS {
        let only = expected
            .iter()
            .find(|(a, _)| *a == action)
            .map(|(_, only)| *only);
        for ask in asks(action) {
            let want = only.is_some_and(|only| covers(only, &ask));
            assert_eq!(decide(&ask), want, "{what}: {ask:?}");
        }
    }
}

/// A role's effective rights on the three keys are exactly these, and its IAM policy alone
/// allows the same key use and signing on the envelope and signing keys as their key policies
/// give it by name. (IAM policies do not repeat the window key policy: a window key's ARN is
/// not known when the role is made, and a `key/*` grant would reach other applications' keys.)
fn assert_role(who: &str, envelope: Rights, window: Rights, signing: Rights) {
    for (key, rights) in [(ENVELOPE, envelope), (WINDOW, window), (SIGNING, signing)] {
        let what = format!("{who} on {}", key.policy);
        assert_exactly(&what, decider(who, key), rights);
    }
    let iam = iam(who);
    let checked = [
        (ENVELOPE, &CONTEXT_ACTIONS[..]),
        (SIGNING, &["kms:Sign", "kms:Verify", "kms:GetPublicKey"][..]),
    ];
    for (key, actions) in checked {
        let key_policy = policy(key.policy);
        for ask in actions.iter().flat_map(|&a| asks(a)) {
            assert_eq!(
                allows(&iam, None, key.arn, &ask),
                allows(&key_policy, Some(&role(who)), key.arn, &ask),
                "{who}: the IAM policy and {} disagree on {ask:?}",
                key.policy
            );
        }
    }
}

/// No right at all.
const NOTHING: Rights = &[];
const NO_LIMIT: &[&str] = &[];

// ------------------------------------------------------------------------------ the claims

#[test]
fn k1_the_account_administers_the_keys_but_cannot_use_them_nor_change_their_policies() {
    #[rustfmt::skip]
    let envelope = [
        "kms:DescribeKey", "kms:GetKeyPolicy", "kms:GetKeyRotationStatus",
        "kms:GetParametersForImport", "kms:GetPublicKey", "kms:ListGrants",
        "kms:ListKeyPolicies", "kms:ListKeyRotations", "kms:ListResourceTags", "kms:UpdateAlias",
        "kms:UpdateKeyDescription", "kms:UpdatePrimaryRegion", "kms:EnableKey",
        "kms:EnableKeyRotation", "kms:DisableKey", "kms:DisableKeyRotation", "kms:TagResource",
        "kms:UntagResource", "kms:ScheduleKeyDeletion", "kms:CreateAlias", "kms:DeleteAlias",
    ];
    // On the signing key the account reads the key policy but not the public key (K10).
    let not_on_signing = [
        "kms:GetKeyRotationStatus",
        "kms:GetParametersForImport",
        "kms:GetPublicKey",
    ];
    let envelope: Vec<(&str, &[&str])> = envelope.iter().map(|a| (*a, NO_LIMIT)).collect();
    let signing: Vec<(&str, &[&str])> = envelope
        .iter()
        .filter(|(a, _)| !not_on_signing.contains(a))
        .copied()
        .collect();
    // ANYONE's IAM policy allows everything, so what it gets is exactly what the account
    // statement lets IAM hand out. A window key is administered as the envelope key is.
    for (key, rights) in [
        (ENVELOPE, &envelope),
        (WINDOW, &envelope),
        (SIGNING, &signing),
    ] {
        let what = format!("any account principal on {}", key.policy);
        assert_exactly(&what, decider(ANYONE, key), rights);
    }
}

#[test]
fn k2_only_the_key_policy_admin_changes_key_policies() {
    for key in KEYS {
        for who in PRINCIPALS {
            let put = decider(who, key)(&plain("kms:PutKeyPolicy"));
            assert_eq!(
                put,
                who == POLICY_ADMIN,
                "{who} PutKeyPolicy on {}",
                key.policy
            );
        }
        let admin = [
            ("kms:PutKeyPolicy", NO_LIMIT),
            ("kms:GetKeyPolicy", NO_LIMIT),
        ];
        assert_exactly(key.policy, decider(POLICY_ADMIN, key), &admin);
    }
    // Its IAM policy also lets it create keys (KMS only accepts a key policy from a caller that
    // policy allows PutKeyPolicy), and names no other existing key.
    let iam = iam(POLICY_ADMIN);
    assert!(allows(&iam, None, "*", &plain("kms:CreateKey")));
    let other = "arn:aws:kms:us-east-1:111122223333:key/another-application";
    for ask in KEY_ACTIONS.iter().flat_map(|&a| asks(a)) {
        assert!(!allows(&iam, None, other, &ask), "{ask:?} on another key");
    }
}

#[test]
fn k3_no_statement_grants_create_grant_nor_a_wildcard_reaching_key_policies() {
    let all = all_policies();
    assert!(all.len() >= 10, "{} policies", all.len());
    for (file, doc) in &all {
        for s in statements(doc) {
            let principals = strings(&s["Principal"]["AWS"]);
            assert!(
                s["Principal"] != "*" && !principals.contains(&"*".to_owned()),
                "{file}"
            );
            for action in strings(&s["Action"]) {
                assert!(action != "*" && action != "kms:*", "{file}: {action}");
                for sensitive in ["kms:CreateGrant", "kms:PutKeyPolicy"] {
                    if action_matches(&action, sensitive) {
                        assert_eq!(
                            action, "kms:PutKeyPolicy",
                            "{file}: {action} matches {sensitive}"
                        );
                        let admin = principals == [role(POLICY_ADMIN)]
                            || file == "iam-key-policy-admin.json";
                        assert!(admin, "{file}: PutKeyPolicy for {principals:?}");
                    }
                }
            }
        }
    }
    for key in KEYS {
        for who in PRINCIPALS {
            assert!(
                !decider(who, key)(&plain("kms:CreateGrant")),
                "{who} CreateGrant"
            );
        }
    }
}

#[test]
fn k4_every_key_use_grant_requires_a_purpose_and_exactly_purpose_and_key_id() {
    let mut grants = 0;
    for (file, doc) in all_policies() {
        for s in statements(&doc) {
            let alone = json!({ "Statement": [s] });
            let principal = strings(&s["Principal"]["AWS"]).first().cloned();
            let resource = strings(&s["Resource"])[0].clone();
            let mut allowed = Vec::new();
            for ask in CONTEXT_ACTIONS.iter().flat_map(|&a| asks(a)) {
                if allows(&alone, principal.as_deref(), &resource, &ask) {
                    let purpose = purpose(ask.context);
                    assert!(purpose.is_some(), "{file} {}: {ask:?}", s["Sid"]);
                    allowed.extend(purpose);
                }
            }
            if allowed.is_empty() {
                continue;
            }
            grants += 1;
            assert!(
                allowed.iter().all(|p| ["data", "token"].contains(p)),
                "{file}: {allowed:?}"
            );
            let condition = &s["Condition"];
            assert_eq!(
                condition["ForAllValues:StringEquals"]["kms:EncryptionContextKeys"],
                json!(["purpose", "key_id"])
            );
            assert_eq!(condition["Null"]["kms:EncryptionContext:key_id"], "false");
        }
    }
    assert_eq!(
        grants, 11,
        "four key-use statements in the envelope key policy, three in the window key policy, \
         four in the IAM policies"
    );
}

#[test]
fn k5_the_ingester_seals_and_tokenizes_but_opens_nothing() {
    let envelope = [
        ("kms:GenerateDataKey", &["data"][..]),
        ("kms:Decrypt", &["token"][..]),
        ("kms:DescribeKey", NO_LIMIT),
    ];
    let window = [("kms:GenerateDataKey", &["data"][..])];
    assert_role(INGESTER, &envelope, &window, NOTHING);
    let queue = "arn:aws:sqs:us-east-1:111122223333:login-queue";
    let sqs = [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueUrl",
        "sqs:GetQueueAttributes",
    ];
    let iam = iam(INGESTER);
    for action in sqs {
        assert!(allows(&iam, None, queue, &plain(action)), "{action}");
    }
    for action in [
        "sqs:SendMessage",
        "sqs:PurgeQueue",
        "sqs:SetQueueAttributes",
    ] {
        assert!(!allows(&iam, None, queue, &plain(action)), "{action}");
    }
}

#[test]
fn k6_compliance_unwraps_data_keys_only_and_fetches_the_public_key() {
    let data = [("kms:Decrypt", &["data"][..])];
    let signing = [("kms:GetPublicKey", NO_LIMIT)];
    assert_role(COMPLIANCE, &data, &data, &signing);
}

#[test]
fn k7_the_key_admin_creates_unwraps_and_rewraps_and_shreds_windows() {
    let use_both: &[&str] = &["data", "token"];
    let envelope = [
        ("kms:GenerateDataKey", use_both),
        ("kms:Decrypt", use_both),
        ("kms:ReEncryptFrom", use_both),
        ("kms:ReEncryptTo", use_both),
        ("kms:DescribeKey", NO_LIMIT),
    ];
    let window = [
        ("kms:GenerateDataKey", &["data"][..]),
        ("kms:Decrypt", &["data"][..]),
        ("kms:DescribeKey", NO_LIMIT),
        ("kms:ScheduleKeyDeletion", NO_LIMIT),
    ];
    let signing = [
        ("kms:GetPublicKey", NO_LIMIT),
        ("kms:DescribeKey", NO_LIMIT),
    ];
    assert_role(KEYADMIN, &envelope, &window, &signing);
    assert!(allows(&iam(KEYADMIN), None, "*", &plain("kms:ListAliases")));
}

#[test]
fn k8_only_compliance_and_the_key_admin_unwrap_data_keys_and_nobody_encrypts() {
    let unwrap_data = in_context("kms:Decrypt", DATA_KEY);
    for who in PRINCIPALS {
        for key in [ENVELOPE, WINDOW] {
            let decide = decider(who, key);
            assert_eq!(
                decide(&unwrap_data),
                [COMPLIANCE, KEYADMIN].contains(&who),
                "{who} on {}",
                key.policy
            );
            for ask in asks("kms:Encrypt") {
                assert!(!decide(&ask), "{who} on {}: {ask:?}", key.policy);
            }
        }
    }
}

#[test]
fn k9_the_signer_signs_checkpoints_and_uses_nothing_else() {
    let signing = [
        ("kms:Sign", &["ECDSA_SHA_256"][..]),
        ("kms:GetPublicKey", NO_LIMIT),
    ];
    assert_role(SIGNER, NOTHING, NOTHING, &signing);
}

#[test]
fn k10_only_the_signer_signs_nobody_verifies_in_kms_and_only_verifiers_get_the_public_key() {
    for who in PRINCIPALS {
        for key in KEYS {
            let decide = decider(who, key);
            for ask in asks("kms:Sign") {
                let signs = who == SIGNER && key == SIGNING;
                let want = signs && ask.algorithm == Some("ECDSA_SHA_256");
                assert_eq!(decide(&ask), want, "{who} on {}: {ask:?}", key.policy);
            }
            for ask in asks("kms:Verify") {
                assert!(!decide(&ask), "{who} on {}: {ask:?}", key.policy);
            }
        }
        let public_key = decider(who, SIGNING)(&plain("kms:GetPublicKey"));
        assert_eq!(
            public_key,
            [COMPLIANCE, KEYADMIN, SIGNER, VERIFIER].contains(&who),
            "{who}"
        );
    }
}

#[test]
fn k11_only_the_ingester_and_the_key_admin_unwrap_a_token_key() {
    let token_key: Context = &[("purpose", "token"), ("key_id", "7")];
    let unwrap_token = in_context("kms:Decrypt", token_key);
    for who in PRINCIPALS {
        for key in KEYS {
            let want = key == ENVELOPE && [INGESTER, KEYADMIN].contains(&who);
            assert_eq!(
                decider(who, key)(&unwrap_token),
                want,
                "{who} on {}",
                key.policy
            );
        }
    }
    // Compliance's IAM policy alone would not let it either, were a key policy to delegate.
    assert!(!allows(&iam(COMPLIANCE), None, ENVELOPE.arn, &unwrap_token));
}

#[test]
fn k12_the_key_admin_schedules_the_deletion_of_window_keys_and_of_no_other_key() {
    let schedule = plain("kms:ScheduleKeyDeletion");
    assert!(decider(KEYADMIN, WINDOW)(&schedule));
    for key in [ENVELOPE, SIGNING] {
        assert!(!decider(KEYADMIN, key)(&schedule), "{}", key.policy);
    }
    // The window key policy grants it by name; the key admin's IAM policy grants it nowhere,
    // so a key whose policy hands everything to IAM (AWS's default key policy, as another
    // application's key may have) is out of its reach too.
    let aws_default = json!({ "Statement": [{
        "Effect": "Allow", "Principal": { "AWS": ACCOUNT }, "Action": "kms:*", "Resource": "*"
    }] });
    let other = "arn:aws:kms:us-east-1:111122223333:key/another-application";
    let keyadmin_iam = iam(KEYADMIN);
    assert!(!kms_allows(
        &aws_default,
        other,
        KEYADMIN,
        &keyadmin_iam,
        &schedule
    ));
    // ... while the same key would be deleted by whoever's IAM policy allows it: the model
    // sees the delegation.
    assert!(kms_allows(
        &aws_default,
        other,
        ANYONE,
        &iam(ANYONE),
        &schedule
    ));
}

#[test]
fn k13_only_break_glass_cancels_a_key_deletion() {
    for key in KEYS {
        for who in PRINCIPALS {
            assert_eq!(
                decider(who, key)(&plain("kms:CancelKeyDeletion")),
                who == BREAK_GLASS,
                "{who} on {}",
                key.policy
            );
        }
        // It cancels, enables the key again (a cancelled deletion leaves it disabled) and looks
        // at it; it uses no key.
        let rights = [
            ("kms:CancelKeyDeletion", NO_LIMIT),
            ("kms:EnableKey", NO_LIMIT),
            ("kms:DescribeKey", NO_LIMIT),
        ];
        assert_exactly(key.policy, decider(BREAK_GLASS, key), &rights);
    }
}

#[test]
fn k14_a_window_keys_data_keys_never_leave_it_and_nothing_else_goes_under_it() {
    let decide_all: Vec<_> = PRINCIPALS.iter().map(|w| decider(w, WINDOW)).collect();
    // Nothing is moved out (ReEncryptFrom) or in (ReEncryptTo), nor wrapped from plaintext
    // (Encrypt); only data keys are made under it.
    for action in [
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
        "kms:Encrypt",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:GenerateDataKeyPair",
        "kms:GenerateDataKeyPairWithoutPlaintext",
    ] {
        for ask in asks(action) {
            for (who, decide) in PRINCIPALS.iter().zip(&decide_all) {
                assert!(!decide(&ask), "{who} on the window key: {ask:?}");
            }
        }
    }
    for ask in asks("kms:GenerateDataKey") {
        for (who, decide) in PRINCIPALS.iter().zip(&decide_all) {
            if decide(&ask) {
                assert_eq!(purpose(ask.context), Some("data"), "{who}: {ask:?}");
            }
        }
    }
}

#[test]
fn k15_the_load_generator_sends_login_events_and_touches_no_key() {
    for key in KEYS {
        assert_exactly(key.policy, decider(LOADGEN, key), NOTHING);
    }
    let iam = iam(LOADGEN);
    let queue = "arn:aws:sqs:us-east-1:111122223333:login-queue";
    assert!(allows(&iam, None, queue, &plain("sqs:SendMessage")));
    for action in [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:PurgeQueue",
        "sqs:CreateQueue",
    ] {
        assert!(!allows(&iam, None, queue, &plain(action)), "{action}");
    }
    let dlq = "arn:aws:sqs:us-east-1:111122223333:login-queue-dlq";
    assert!(!allows(&iam, None, dlq, &plain("sqs:SendMessage")));
}

#[test]
fn k16_the_replayer_moves_dead_letters_back_and_touches_no_key() {
    for key in KEYS {
        assert_exactly(key.policy, decider(REPLAYER, key), NOTHING);
    }
    let iam = iam(REPLAYER);
    let queue = "arn:aws:sqs:us-east-1:111122223333:login-queue";
    let dlq = "arn:aws:sqs:us-east-1:111122223333:login-queue-dlq";
    #[rustfmt::skip]
    let sqs = [
        "sqs:SendMessage", "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes", "sqs:GetQueueUrl", "sqs:PurgeQueue", "sqs:SetQueueAttributes",
    ];
    let on_dlq = [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "sqs:GetQueueUrl",
    ];
    let on_queue = [
        "sqs:SendMessage",
        "sqs:GetQueueAttributes",
        "sqs:GetQueueUrl",
    ];
    for action in sqs {
        let ask = plain(action);
        assert_eq!(
            allows(&iam, None, dlq, &ask),
            on_dlq.contains(&action),
            "{action} on the DLQ"
        );
        let want = on_queue.contains(&action);
        assert_eq!(
            allows(&iam, None, queue, &ask),
            want,
            "{action} on login-queue"
        );
    }
}

#[test]
fn k17_the_key_admin_writes_and_reads_erasures_in_the_witness_bucket_and_nothing_else() {
    let iam = iam(KEYADMIN);
    let bucket = "arn:aws:s3:::REPLACE-WITH-WITNESS-BUCKET";
    let erasure = format!("{bucket}/erasures/00001800000000123456.json");
    let checkpoint = format!("{bucket}/checkpoints/00000000000000000001.json");
    for action in ["s3:PutObject", "s3:PutObjectRetention", "s3:GetObject"] {
        assert!(allows(&iam, None, &erasure, &plain(action)), "{action}");
        assert!(!allows(&iam, None, &checkpoint, &plain(action)), "{action}");
    }
    assert!(allows(&iam, None, bucket, &plain("s3:ListBucketVersions")));
    for action in [
        "s3:DeleteObject",
        "s3:DeleteObjectVersion",
        "s3:BypassGovernanceRetention",
        "s3:PutBucketObjectLockConfiguration",
        "s3:PutBucketPolicy",
    ] {
        assert!(!allows(&iam, None, &erasure, &plain(action)), "{action}");
        assert!(!allows(&iam, None, bucket, &plain(action)), "{action}");
    }
}

#[test]
fn k18_the_audit_verifier_reads_the_checkpoints_and_the_public_key_and_nothing_else() {
    let signing = [("kms:GetPublicKey", NO_LIMIT)];
    assert_role(VERIFIER, NOTHING, NOTHING, &signing);
    let verifier = iam(VERIFIER);
    let bucket = "arn:aws:s3:::REPLACE-WITH-WITNESS-BUCKET";
    let checkpoint = format!("{bucket}/checkpoints/00000000000000000001.json");
    let erasure = format!("{bucket}/erasures/00001800000000123456.json");
    for action in [
        "s3:ListBucket",
        "s3:ListBucketVersions",
        "s3:GetBucketObjectLockConfiguration",
    ] {
        assert!(allows(&verifier, None, bucket, &plain(action)), "{action}");
    }
    for action in ["s3:GetObject", "s3:GetObjectVersion"] {
        assert!(
            allows(&verifier, None, &checkpoint, &plain(action)),
            "{action}"
        );
        assert!(
            !allows(&verifier, None, &erasure, &plain(action)),
            "{action}"
        );
    }
    for action in [
        "s3:PutObject",
        "s3:PutObjectRetention",
        "s3:DeleteObject",
        "s3:DeleteObjectVersion",
        "s3:BypassGovernanceRetention",
        "s3:PutBucketObjectLockConfiguration",
        "s3:PutBucketPolicy",
    ] {
        for resource in [bucket, &checkpoint, &erasure] {
            let ask = plain(action);
            assert!(
                !allows(&verifier, None, resource, &ask),
                "{action} on {resource}"
            );
        }
    }
    // It holds every right compliance holds for `verify-audit --witness`, and not the Decrypt.
    let rights = |doc: &serde_json::Value| -> Vec<(Vec<String>, Vec<String>)> {
        let mut rights: Vec<_> = statements(doc)
            .iter()
            .filter(|s| !strings(&s["Action"]).contains(&"kms:Decrypt".to_owned()))
            .map(|s| (strings(&s["Action"]), strings(&s["Resource"])))
            .collect();
        rights.sort();
        rights
    };
    assert_eq!(rights(&verifier), rights(&iam(COMPLIANCE)));
    assert_eq!(rights(&verifier).len(), statements(&verifier).len());
}

/// keys/trust/roles.json: each role's trust policy file (and AWS managed policies).
fn trust_of_roles() -> serde_json::Map<String, serde_json::Value> {
    let path = format!("{}/keys/trust/roles.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let roles: serde_json::Value = serde_json::from_str(&text).expect("roles.json is JSON");
    roles.as_object().expect("an object").clone()
}

#[test]
fn k19_people_assume_their_roles_with_mfa_and_tasks_theirs_in_this_account_only() {
    let roles = trust_of_roles();
    for (file, _) in all_policies() {
        if let Some(duty) = file
            .strip_prefix("iam-")
            .and_then(|f| f.strip_suffix(".json"))
        {
            let role = format!("pii-vault-{duty}");
            assert!(roles.contains_key(&role), "{role} has no trust policy");
        }
    }
    let people = [COMPLIANCE, KEYADMIN, POLICY_ADMIN, BREAK_GLASS];
    let tasks = [INGESTER, SIGNER, VERIFIER, LOADGEN, REPLAYER, KEYADMIN];
    let task_condition = json!({
        "ArnLike": { "aws:SourceArn": "arn:aws:ecs:us-east-1:111122223333:*" },
        "StringEquals": { "aws:SourceAccount": "111122223333" }
    });
    let mfa = json!({ "Bool": { "aws:MultiFactorAuthPresent": "true" } });
    for (role, entry) in &roles {
        let file = format!("trust/{}", entry["trust"].as_str().expect("a trust file"));
        let doc = policy(&file);
        let (mut by_people, mut by_tasks, mut by_services) = (false, false, Vec::new());
        for s in statements(&doc) {
            assert_eq!(s["Action"], "sts:AssumeRole", "{file}");
            assert!(s.get("Resource").is_none(), "{file}");
            let principal = s["Principal"].as_object().expect("a principal");
            assert_eq!(principal.len(), 1, "{file}");
            if let Some(aws) = principal.get("AWS") {
                // The account's own principals only, never `*` nor another account, and
                // only with MFA.
                assert_eq!(strings(aws), [ACCOUNT], "{file}");
                assert_eq!(s["Condition"], mfa, "{file}");
                by_people = true;
            } else {
                let service = principal["Service"].as_str().expect("a service");
                if service == "ecs-tasks.amazonaws.com" && s.get("Condition").is_some() {
                    // A task of this account, not another's (the confused deputy).
                    assert_eq!(s["Condition"], task_condition, "{file}");
                    by_tasks = true;
                } else {
                    by_services.push(service);
                }
            }
        }
        let role = role.as_str();
        assert_eq!(by_people, people.contains(&role), "{role}: people ({file})");
        assert_eq!(
            by_tasks,
            tasks.contains(&role),
            "{role}: ECS tasks ({file})"
        );
        let services: &[&str] = match role {
            // The ECS agent pulls images and hands out secrets; it runs no code of ours.
            TASK_EXECUTION => &["ecs-tasks.amazonaws.com"],
            SCHEDULER => &["scheduler.amazonaws.com"],
            _ => &[],
        };
        assert_eq!(by_services, services, "{role}: other services ({file})");
        if role == SCHEDULER {
            let condition = &statements(&doc)[0]["Condition"];
            assert_eq!(
                condition,
                &json!({ "StringEquals": { "aws:SourceAccount": "111122223333" } })
            );
        }
        let managed = entry
            .get("managed_policies")
            .map(strings)
            .unwrap_or_default();
        let want: &[&str] = match role {
            TASK_EXECUTION => {
                &["arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"]
            }
            _ => &[],
        };
        assert_eq!(managed, want, "{role}: managed policies");
    }
}

#[test]
fn k20_the_scheduler_starts_the_scheduled_jobs_under_their_roles_and_the_ecs_agent_uses_no_key() {
    for who in [SCHEDULER, TASK_EXECUTION] {
        for key in KEYS {
            assert_exactly(key.policy, decider(who, key), NOTHING);
        }
    }
    let doc = iam(SCHEDULER);
    let [run, pass] = statements(&doc) else {
        panic!("iam-scheduler.json: two statements")
    };
    assert_eq!(run["Action"], "ecs:RunTask");
    let families: Vec<String> = [
        "audit-checkpoint",
        "verify-audit",
        "witness-erasures",
        "expire",
        "partitions",
    ]
    .iter()
    .map(|f| format!("arn:aws:ecs:us-east-1:111122223333:task-definition/pii-vault-{f}:*"))
    .collect();
    assert_eq!(strings(&run["Resource"]), families);
    let cluster = "arn:aws:ecs:us-east-1:111122223333:cluster/pii-vault";
    assert_eq!(
        run["Condition"],
        json!({ "ArnEquals": { "ecs:cluster": cluster } })
    );
    // It hands the jobs their roles, and never the officer's, the key-policy admin's, break
    // glass or the ingester's.
    assert_eq!(pass["Action"], "iam:PassRole");
    let passed: Vec<String> = [SIGNER, VERIFIER, KEYADMIN, TASK_EXECUTION]
        .iter()
        .map(|r| role(r))
        .collect();
    assert_eq!(strings(&pass["Resource"]), passed);
    assert_eq!(
        pass["Condition"],
        json!({ "StringEquals": { "iam:PassedToService": "ecs-tasks.amazonaws.com" } })
    );
    // The ECS agent reads the tasks' DATABASE_URL secrets and nothing else of ours.
    let doc = iam(TASK_EXECUTION);
    let [secrets] = statements(&doc) else {
        panic!("iam-task-execution.json: one statement")
    };
    assert_eq!(
        strings(&secrets["Action"]),
        ["secretsmanager:GetSecretValue", "ssm:GetParameters"]
    );
    assert!(
        strings(&secrets["Resource"])
            .iter()
            .all(|r| r.starts_with("REPLACE-WITH-") && r.ends_with("-DATABASE-URL-SECRET")),
        "{:?}",
        secrets["Resource"]
    );
}

/// The model can say yes: a policy as loose as the ones K2 to K4 rule out is allowed through.
#[test]
fn the_model_allows_what_a_looser_policy_would() {
    let loose = json!({ "Statement": [
        { "Effect": "Allow", "Principal": { "AWS": ACCOUNT }, "Action": "kms:Put*", "Resource": "*" },
        {
            "Effect": "Allow",
            "Principal": { "AWS": ACCOUNT },
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": { "StringEquals": { "kms:EncryptionContext:purpose": "data" } }
        }
    ] });
    let allowed = |who: &str, ask: Request| allows(&loose, Some(who), ENVELOPE.arn, &ask);
    assert!(allowed(ACCOUNT, plain("kms:PutKeyPolicy")));
    assert!(!allowed(ACCOUNT, plain("kms:CreateGrant")));
    assert!(!allowed(&role(INGESTER), plain("kms:PutKeyPolicy")));
    // The door's context, one without key_id, and one with PURPOSE: the purpose alone lets all in.
    let (no_key_id, shouted): (Context, Context) = (
        &[("purpose", "data")],
        &[("PURPOSE", "data"), ("key_id", "7")],
    );
    for context in [DATA_KEY, no_key_id, shouted] {
        assert!(allowed(ACCOUNT, in_context("kms:Decrypt", context)));
    }
    let token_key: Context = &[("purpose", "token"), ("key_id", "7")];
    assert!(!allowed(ACCOUNT, in_context("kms:Decrypt", token_key)));
    assert!(glob("kms:get*", "kms:getpublickey") && !glob("kms:get*", "kms:putkeypolicy"));
    assert!(glob("arn:aws:kms:*:key/*", ENVELOPE.arn) && !glob("*:key/x", ENVELOPE.arn));
}
