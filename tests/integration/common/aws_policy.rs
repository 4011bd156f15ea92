//! A small model of AWS authorization over the policies in keys/, shared by the claims about
//! them (`keys.rs`) and by the test that holds every API call the binaries make to the policy
//! of the role that runs it (`api_calls.rs`).
//!
//! For KMS, as KMS decides for principals of the key's own account: a request is allowed when
//! the key policy allows the principal by name, or when the key policy's account statement
//! allows it and so does the principal's IAM policy. For SQS and S3 (no resource policies
//! here), the IAM policy alone decides. Where it simplifies, it errs towards allowing (actions
//! and context key names match case-insensitively, `*` matches anywhere); a statement element,
//! condition operator or condition key it does not know makes it panic.

use serde_json::{Value, json};

pub const ACCOUNT: &str = "arn:aws:iam::111122223333:root";

/// A KMS key: the file of its key policy in keys/, and the ARN its policies are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub policy: &'static str,
    pub arn: &'static str,
}

/// alias/pii-vault: symmetric, wraps the token key and the data keys outside windows.
pub const ENVELOPE: Key = Key {
    policy: "kms-key-policy.json",
    arn: "arn:aws:kms:us-east-1:111122223333:key/REPLACE-WITH-KEY-ID",
};
/// alias/pii-vault-audit-signer: ECC_NIST_P256, SIGN_VERIFY, signs audit checkpoints.
pub const SIGNING: Key = Key {
    policy: "kms-audit-signer-key-policy.json",
    arn: "arn:aws:kms:us-east-1:111122223333:key/REPLACE-WITH-SIGNING-KEY-ID",
};
/// A retention window's key (one a month): symmetric, wraps that month's data keys only.
pub const WINDOW: Key = Key {
    policy: "kms-window-key-policy.json",
    arn: "arn:aws:kms:us-east-1:111122223333:key/A-WINDOW-KEY-ID",
};

pub const INGESTER: &str = "pii-vault-ingester";
pub const COMPLIANCE: &str = "pii-vault-compliance";
pub const KEYADMIN: &str = "pii-vault-keyadmin";
pub const POLICY_ADMIN: &str = "pii-vault-key-policy-admin";
pub const SIGNER: &str = "pii-vault-audit-signer";
/// The scheduled `unmask verify-audit --witness`: the public key and the witness, no Decrypt.
pub const VERIFIER: &str = "pii-vault-audit-verifier";
pub const BREAK_GLASS: &str = "pii-vault-break-glass";
pub const LOADGEN: &str = "pii-vault-loadgen";
pub const REPLAYER: &str = "pii-vault-replayer";
/// Any other principal of the account, whose IAM policy allows every action on every resource.
pub const ANYONE: &str = "anyone-else";

/// One request: an action, with the encryption context or signing algorithm it carries.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub action: &'a str,
    pub context: &'a [(&'a str, &'a str)],
    pub algorithm: Option<&'a str>,
}

/// A request that carries neither an encryption context nor a signing algorithm.
pub fn plain(action: &str) -> Ask<'_> {
    in_context(action, &[])
}

pub fn in_context<'a>(action: &'a str, context: &'a [(&'a str, &'a str)]) -> Ask<'a> {
    Ask {
        action,
        context,
        algorithm: None,
    }
}

pub fn policy(name: &str) -> Value {
    let path = format!("{}/keys/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let doc: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"));
    assert_eq!(doc["Version"], "2012-10-17", "{name}");
    doc
}

/// Every policy in keys/, by file name.
pub fn all_policies() -> Vec<(String, Value)> {
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
pub fn statements(doc: &Value) -> &[Value] {
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

pub fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

pub fn role(name: &str) -> String {
    format!("arn:aws:iam::111122223333:role/{name}")
}

/// The IAM policy of a principal: its file in keys/ (`iam-<role without pii-vault->.json`),
/// or everything for ANYONE.
pub fn iam(who: &str) -> Value {
    if who == ANYONE {
        return json!({ "Statement": [{ "Effect": "Allow", "Action": "*", "Resource": "*" }] });
    }
    policy(&format!(
        "iam-{}.json",
        who.trim_start_matches("pii-vault-")
    ))
}

/// Action names match without regard to case.
pub fn action_matches(pattern: &str, action: &str) -> bool {
    glob(&pattern.to_ascii_lowercase(), &action.to_ascii_lowercase())
}

/// `*` matches any run of characters, anywhere in the pattern.
pub fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            text.starts_with(head) && (head.len()..=text.len()).any(|i| glob(rest, &text[i..]))
        }
    }
}

/// The request's values for a condition key, and whether the key is multivalued.
fn request_values<'a>(key: &str, ask: &Ask<'a>) -> (Vec<&'a str>, bool) {
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
pub fn allows(doc: &Value, principal: Option<&str>, resource: &str, ask: &Ask) -> bool {
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

/// KMS's decision on a key with `key_policy` at `arn`, for `who` whose IAM policy is `iam`:
/// the key policy names it, or the account statement and the IAM policy both allow.
pub fn kms_allows(key_policy: &Value, arn: &str, who: &str, iam: &Value, ask: &Ask) -> bool {
    allows(key_policy, Some(&role(who)), arn, ask)
        || (allows(key_policy, Some(ACCOUNT), arn, ask) && allows(iam, None, arn, ask))
}

/// KMS's decision for `who` on `key`.
pub fn decider(who: &str, key: Key) -> impl Fn(&Ask) -> bool {
    let (key_policy, iam) = (policy(key.policy), iam(who));
    let who = who.to_owned();
    move |ask| kms_allows(&key_policy, key.arn, &who, &iam, ask)
}
