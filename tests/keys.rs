//! The KMS key policy and IAM policies in keys/ parse and grant each role exactly the KMS
//! operations its duty needs, conditioned on the encryption context's purpose.

use serde_json::Value;

fn policy(name: &str) -> Value {
    let path = format!("{}/keys/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

/// KMS actions that read a key's metadata and use no key material: no purpose to condition on.
const METADATA_ONLY: [&str; 1] = ["kms:DescribeKey"];

/// (actions, purposes allowed by the condition) for each KMS statement, optionally only those
/// whose principal names `principal`.
fn kms_grants(doc: &Value, principal: Option<&str>) -> Vec<(Vec<String>, Vec<String>)> {
    assert_eq!(doc["Version"], "2012-10-17");
    doc["Statement"]
        .as_array()
        .expect("Statement is a list")
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .filter(|s| {
            principal.is_none_or(|p| {
                strings(&s["Principal"]["AWS"])
                    .iter()
                    .any(|a| a.ends_with(p))
            })
        })
        .map(|s| {
            let actions: Vec<String> = strings(&s["Action"])
                .into_iter()
                .filter(|a| a.starts_with("kms:") && !METADATA_ONLY.contains(&a.as_str()))
                .collect();
            let purposes =
                strings(&s["Condition"]["StringEquals"]["kms:EncryptionContext:purpose"]);
            (actions, purposes)
        })
        .filter(|(actions, _)| !actions.is_empty())
        .collect()
}

/// The purposes for which `grants` allow `action`.
fn allowed(grants: &[(Vec<String>, Vec<String>)], action: &str) -> Vec<String> {
    let mut purposes: Vec<String> = grants
        .iter()
        .filter(|(actions, _)| actions.iter().any(|a| a == action))
        .flat_map(|(_, purposes)| purposes.clone())
        .collect();
    purposes.sort();
    purposes.dedup();
    purposes
}

fn assert_role(grants: &[(Vec<String>, Vec<String>)], expected: [(&str, &[&str]); 3]) {
    for (_, purposes) in grants {
        assert!(
            !purposes.is_empty(),
            "every key-use grant is conditioned on the purpose"
        );
    }
    for (action, purposes) in expected {
        assert_eq!(allowed(grants, action), purposes, "{action}");
    }
    for (actions, _) in grants {
        assert!(
            actions
                .iter()
                .all(|a| !a.contains('*') && a != "kms:Encrypt"),
            "no wildcards, no raw Encrypt: {actions:?}"
        );
    }
}

#[test]
fn ingester_creates_data_keys_and_unwraps_only_the_token_key() {
    let expected = [
        ("kms:GenerateDataKey", &["data"][..]),
        ("kms:Decrypt", &["token"][..]),
        ("kms:ReEncryptFrom", &[][..]),
    ];
    assert_role(&kms_grants(&policy("iam-ingester.json"), None), expected);
    assert_role(
        &kms_grants(
            &policy("kms-key-policy.json"),
            Some("role/pii-vault-ingester"),
        ),
        expected,
    );
    for doc in ["iam-ingester.json", "kms-key-policy.json"] {
        let describes = policy(doc)["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["Effect"] == "Allow" && strings(&s["Action"]) == ["kms:DescribeKey"]);
        assert!(describes, "{doc}: the ingester's /readyz may DescribeKey");
    }
    let sqs: Vec<String> = strings(&policy("iam-ingester.json")["Statement"][0]["Action"]);
    assert!(
        sqs.contains(&"sqs:ReceiveMessage".to_owned())
            && sqs.contains(&"sqs:DeleteMessage".to_owned())
    );
}

#[test]
fn only_compliance_and_key_admin_unwrap_data_keys() {
    let expected = [
        ("kms:GenerateDataKey", &[][..]),
        ("kms:Decrypt", &["data", "token"][..]),
        ("kms:ReEncryptFrom", &[][..]),
    ];
    assert_role(&kms_grants(&policy("iam-compliance.json"), None), expected);
    assert_role(
        &kms_grants(
            &policy("kms-key-policy.json"),
            Some("role/pii-vault-compliance"),
        ),
        expected,
    );
    let admin = [
        ("kms:GenerateDataKey", &["data", "token"][..]),
        ("kms:Decrypt", &["data", "token"][..]),
        ("kms:ReEncryptFrom", &["data", "token"][..]),
    ];
    let key_policy_admin = kms_grants(
        &policy("kms-key-policy.json"),
        Some("role/pii-vault-keyadmin"),
    );
    assert_role(&key_policy_admin, admin);
    // IAM for the key admin also lists DescribeKey/ListAliases, which carry no condition.
    let iam_admin: Vec<_> = kms_grants(&policy("iam-keyadmin.json"), None)
        .into_iter()
        .filter(|(actions, _)| {
            actions
                .iter()
                .any(|a| a != "kms:DescribeKey" && a != "kms:ListAliases")
        })
        .collect();
    assert_role(&iam_admin, admin);
}

#[test]
fn the_account_administers_the_key_but_cannot_use_it() {
    let doc = policy("kms-key-policy.json");
    let root = kms_grants(&doc, Some(":root"));
    assert_eq!(root.len(), 1);
    let actions = &root[0].0;
    for forbidden in [
        "kms:Decrypt",
        "kms:Encrypt",
        "kms:GenerateDataKey",
        "kms:ReEncryptFrom",
        "kms:*",
    ] {
        assert!(!actions.iter().any(|a| a == forbidden), "{forbidden}");
    }
    assert!(
        actions
            .iter()
            .all(|a| !a.starts_with("kms:GenerateDataKey") && !a.starts_with("kms:ReEncrypt"))
    );
}
