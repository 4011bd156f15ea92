//! keys/README.md, proved: one test per numbered claim (K1, K2, ...). Each reads the policies in
//! keys/ and asks a small model of KMS authorization what a principal may do, over every KMS
//! action on a key and a set of well- and ill-formed requests, and compares both ways with the
//! claim: what it lists is allowed, everything else is refused.
//!
//! The model (as KMS decides for principals of the key's own account): a request is allowed when
//! the key policy allows the principal by name, or when the key policy's account statement
//! allows it and so does the principal's IAM policy. Where it simplifies, it errs towards
//! allowing (actions and context key names match case-insensitively, `*` matches anywhere); a
//! statement element, condition operator or condition key it does not know makes it panic.

use serde_json::{Value, json};

const ACCOUNT: &str = "arn:aws:iam::111122223333:root";

#[derive(Clone, Copy)]
struct Key {
    policy: &'static str,
    arn: &'static str,
}

/// alias/pii-vault: symmetric, wraps the token and data keys.
const ENVELOPE: Key = Key {
    policy: "kms-key-policy.json",
    arn: "arn:aws:kms:us-east-1:111122223333:key/REPLACE-WITH-KEY-ID",
};
/// alias/pii-vault-audit-signer: ECC_NIST_P256, SIGN_VERIFY, signs audit checkpoints.
const SIGNING: Key = Key {
    policy: "kms-audit-signer-key-policy.json",
    arn: "arn:aws:kms:us-east-1:111122223333:key/REPLACE-WITH-SIGNING-KEY-ID",
};

const INGESTER: &str = "pii-vault-ingester";
const COMPLIANCE: &str = "pii-vault-compliance";
const KEYADMIN: &str = "pii-vault-keyadmin";
const POLICY_ADMIN: &str = "pii-vault-key-policy-admin";
const SIGNER: &str = "pii-vault-audit-signer";
/// Any other principal of the account, whose IAM policy allows every action on every resource.
const ANYONE: &str = "anyone-else";
const PRINCIPALS: [&str; 6] = [INGESTER, COMPLIANCE, KEYADMIN, POLICY_ADMIN, SIGNER, ANYONE];

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

/// One request: an action, with the encryption context or signing algorithm it carries.
#[derive(Debug, Clone, Copy)]
struct Ask {
    action: &'static str,
    context: Context,
    algorithm: Option<&'static str>,
}

fn plain(action: &'static str) -> Ask {
    in_context(action, &[])
}

fn in_context(action: &'static str, context: Context) -> Ask {
    Ask {
        action,
        context,
        algorithm: None,
    }
}

/// The requests to try for `action`.
fn asks(action: &'static str) -> Vec<Ask> {
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
fn purpose(context: Context) -> Option<&'static str> {
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

// ------------------------------------------------------------------------------ the model

fn policy(name: &str) -> Value {
    let path = format!("{}/keys/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let doc: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"));
    assert_eq!(doc["Version"], "2012-10-17", "{name}");
    doc
}

/// Every policy in keys/, by file name.
fn all_policies() -> Vec<(String, Value)> {
    let dir = format!("{}/keys", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".json"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| (name.clone(), policy(&name)))
        .collect()
}

/// A policy's statements, each checked to be of the form this model knows.
fn statements(doc: &Value) -> &[Value] {
    let statements = doc["Statement"].as_array().expect("Statement is a list");
    for s in statements {
        for element in s.as_object().expect("a statement is an object").keys() {
            let known = [
                "Sid",
                "Effect",
                "Principal",
                "Action",
                "Resource",
                "Condition",
            ];
            assert!(
                known.contains(&element.as_str()),
                "{element} is not modelled"
            );
        }
        assert_eq!(s["Effect"], "Allow", "only Allow statements are modelled");
    }
    statements
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

fn role(name: &str) -> String {
    format!("arn:aws:iam::111122223333:role/{name}")
}

/// The IAM policy of a principal: its file in keys/, or everything for ANYONE.
fn iam(who: &str) -> Value {
    if who == ANYONE {
        return json!({ "Statement": [{ "Effect": "Allow", "Action": "*", "Resource": "*" }] });
    }
    policy(&format!(
        "iam-{}.json",
        who.trim_start_matches("pii-vault-")
    ))
}

/// Action names match without regard to case.
fn action_matches(pattern: &str, action: &str) -> bool {
    glob(&pattern.to_ascii_lowercase(), &action.to_ascii_lowercase())
}

/// `*` matches any run of characters, anywhere in the pattern.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            text.starts_with(head) && (head.len()..=text.len()).any(|i| glob(rest, &text[i..]))
        }
    }
}

/// The request's values for a condition key, and whether the key is multivalued.
fn request_values(key: &str, ask: &Ask) -> (Vec<&'static str>, bool) {
    if key == "kms:EncryptionContextKeys" {
        (ask.context.iter().map(|(k, _)| *k).collect(), true)
    } else if let Some(name) = key.strip_prefix("kms:EncryptionContext:") {
        // KMS matches the key named here without regard to case; only the values are exact.
        let values = ask
            .context
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name));
        (values.map(|(_, v)| *v).collect(), false)
    } else if key == "kms:SigningAlgorithm" {
        (ask.algorithm.into_iter().collect(), false)
    } else {
        panic!("condition key {key} is not modelled")
    }
}

fn conditions_hold(conditions: &Value, ask: &Ask) -> bool {
    let Some(conditions) = conditions.as_object() else {
        assert!(conditions.is_null(), "Condition is not an object");
        return true;
    };
    conditions.iter().all(|(operator, tests)| {
        let tests = tests
            .as_object()
            .expect("a condition operator maps keys to values");
        tests.iter().all(|(key, wanted)| {
            let wanted = strings(wanted);
            let (values, multivalued) = request_values(key, ask);
            match operator.as_str() {
                "StringEquals" if !multivalued => {
                    values.len() == 1 && wanted.iter().any(|w| w == values[0])
                }
                "ForAllValues:StringEquals" if multivalued => {
                    values.iter().all(|v| wanted.iter().any(|w| w == v))
                }
                "Null" => wanted == [values.is_empty().to_string()],
                _ => panic!("{operator} on {key} is not modelled"),
            }
        })
    })
}

/// Whether one of `doc`'s statements allows `ask` on `resource`: for `principal` in a key
/// policy, or for whoever holds the policy (principal None) in an IAM policy.
fn allows(doc: &Value, principal: Option<&str>, resource: &str, ask: &Ask) -> bool {
    statements(doc).iter().any(|s| {
        let named = match principal {
            None => s.get("Principal").is_none(),
            Some(p) => {
                s["Principal"] == "*"
                    || strings(&s["Principal"]["AWS"])
                        .iter()
                        .any(|a| a == p || a == "*")
            }
        };
        named
            && strings(&s["Action"])
                .iter()
                .any(|a| action_matches(a, ask.action))
            && strings(&s["Resource"]).iter().any(|r| glob(r, resource))
            && conditions_hold(&s["Condition"], ask)
    })
}

/// KMS's decision for `who` on `key`: the key policy names it, or the account statement and
/// its IAM policy both allow the request.
fn decider(who: &str, key: Key) -> impl Fn(&Ask) -> bool {
    let (key_policy, iam, principal) = (policy(key.policy), iam(who), role(who));
    move |ask| {
        allows(&key_policy, Some(&principal), key.arn, ask)
            || (allows(&key_policy, Some(ACCOUNT), key.arn, ask)
                && allows(&iam, None, key.arn, ask))
    }
}

/// `decide` allows exactly `expected`, each action limited as `covers` reads it, and no other
/// request for any action on a key.
fn assert_exactly(what: &str, decide: impl Fn(&Ask) -> bool, expected: &[(&str, &[&str])]) {
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

/// A role's effective rights on both keys are exactly these, and its IAM policy alone allows
/// the same key use and signing as the key policies give it by name.
fn assert_role(who: &str, envelope: &[(&str, &[&str])], signing: &[(&str, &[&str])]) {
    assert_exactly(
        &format!("{who} on the envelope key"),
        decider(who, ENVELOPE),
        envelope,
    );
    assert_exactly(
        &format!("{who} on the signing key"),
        decider(who, SIGNING),
        signing,
    );
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
        "kms:UntagResource", "kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion",
        "kms:CreateAlias", "kms:DeleteAlias",
    ];
    // On the signing key the account reads the key policy but not the public key (K10).
    let not_on_signing = [
        "kms:GetKeyRotationStatus",
        "kms:GetParametersForImport",
        "kms:GetPublicKey",
    ];
    let signing: Vec<(&str, &[&str])> = envelope
        .iter()
        .filter(|a| !not_on_signing.contains(*a))
        .map(|a| (*a, &[][..]))
        .collect();
    // ANYONE's IAM policy allows everything, so what it gets is exactly what the account
    // statement lets IAM hand out.
    assert_exactly(
        "any account principal on the envelope key",
        decider(ANYONE, ENVELOPE),
        &envelope.map(|a| (a, &[][..])),
    );
    assert_exactly(
        "any account principal on the signing key",
        decider(ANYONE, SIGNING),
        &signing,
    );
}

#[test]
fn k2_only_the_key_policy_admin_changes_key_policies() {
    for key in [ENVELOPE, SIGNING] {
        for who in PRINCIPALS {
            let put = decider(who, key)(&plain("kms:PutKeyPolicy"));
            assert_eq!(
                put,
                who == POLICY_ADMIN,
                "{who} PutKeyPolicy on {}",
                key.policy
            );
        }
        let admin = [("kms:PutKeyPolicy", &[][..]), ("kms:GetKeyPolicy", &[][..])];
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
    assert!(all.len() >= 7, "{} policies", all.len());
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
    for key in [ENVELOPE, SIGNING] {
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
        grants, 8,
        "four key-use statements in the key policy, four in the IAM policies"
    );
}

#[test]
fn k5_the_ingester_seals_and_tokenizes_but_opens_nothing() {
    let envelope = [
        ("kms:GenerateDataKey", &["data"][..]),
        ("kms:Decrypt", &["token"][..]),
        ("kms:DescribeKey", &[][..]),
    ];
    assert_role(INGESTER, &envelope, &[]);
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
fn k6_compliance_unwraps_data_and_token_keys_and_fetches_the_public_key() {
    let envelope = [("kms:Decrypt", &["data", "token"][..])];
    assert_role(COMPLIANCE, &envelope, &[("kms:GetPublicKey", &[])]);
}

#[test]
fn k7_the_key_admin_creates_unwraps_and_rewraps_and_fetches_the_public_key() {
    let use_both: &[&str] = &["data", "token"];
    let envelope = [
        ("kms:GenerateDataKey", use_both),
        ("kms:Decrypt", use_both),
        ("kms:ReEncryptFrom", use_both),
        ("kms:ReEncryptTo", use_both),
        ("kms:DescribeKey", &[][..]),
    ];
    let signing = [("kms:GetPublicKey", &[][..]), ("kms:DescribeKey", &[][..])];
    assert_role(KEYADMIN, &envelope, &signing);
    assert!(allows(&iam(KEYADMIN), None, "*", &plain("kms:ListAliases")));
}

#[test]
fn k8_only_compliance_and_the_key_admin_unwrap_data_keys_and_nobody_encrypts() {
    let unwrap_data = in_context("kms:Decrypt", DATA_KEY);
    for who in PRINCIPALS {
        let decide = decider(who, ENVELOPE);
        assert_eq!(
            decide(&unwrap_data),
            [COMPLIANCE, KEYADMIN].contains(&who),
            "{who}"
        );
        for ask in asks("kms:Encrypt") {
            assert!(!decide(&ask), "{who}: {ask:?}");
        }
    }
}

#[test]
fn k9_the_signer_signs_checkpoints_and_uses_nothing_else() {
    let signing = [
        ("kms:Sign", &["ECDSA_SHA_256"][..]),
        ("kms:GetPublicKey", &[][..]),
    ];
    assert_role(SIGNER, &[], &signing);
}

#[test]
fn k10_only_the_signer_signs_nobody_verifies_in_kms_and_only_verifiers_get_the_public_key() {
    for who in PRINCIPALS {
        for key in [ENVELOPE, SIGNING] {
            let decide = decider(who, key);
            for ask in asks("kms:Sign") {
                let signs = who == SIGNER && key.arn == SIGNING.arn;
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
            [COMPLIANCE, KEYADMIN, SIGNER].contains(&who),
            "{who}"
        );
    }
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
    let allowed = |who: &str, ask: Ask| allows(&loose, Some(who), ENVELOPE.arn, &ask);
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
