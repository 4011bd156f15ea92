//! The fixed texts Rust hands the database, held to the lists the database keeps: each value a
//! CHECK constraint allows, `audit_reveal_purposes()` returns or a door's body accepts is in the
//! Rust enum's `ALL`, and nothing more (in the same order, where the database keeps an ordered
//! list). A value added on one side alone fails here, before it fails a caller.
//!
//! The database's side is read from the catalogs of a freshly migrated database: constraints
//! through `pg_get_constraintdef`, door bodies through `pg_get_functiondef`.

use std::collections::BTreeSet;

use sqlx::PgPool;

use crate::common::TestEnv;
use pii_vault::unmask::{QuestionKind, RequestOutcome, RevealOutcome, RevealPurpose};
use pii_vault::vault::handed_out::DoorOperation;
use pii_vault::vault::key_table::{KeyState, Purpose};
use pii_vault::vault::retention::WindowState;

async fn constraint(pool: &PgPool, name: &str) -> String {
    sqlx::query_scalar("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no constraint {name}"))
}

async fn function(pool: &PgPool, name: &str) -> String {
    sqlx::query_scalar::<_, Option<String>>("SELECT pg_get_functiondef(to_regproc($1))")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no function {name}"))
}

/// The single-quoted literals of `sql`, in order.
fn quoted(sql: &str) -> Vec<String> {
    sql.split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The literals `column` is compared with in `body`: `column = 'a'`, `column IN ('a', 'b')`
/// and `column NOT IN (...)`.
fn compared_with(body: &str, column: &str) -> Vec<String> {
    let mut found = BTreeSet::new();
    for (at, _) in body.match_indices(column) {
        let rest = body[at + column.len()..].trim_start();
        let rest = rest.strip_prefix("NOT ").unwrap_or(rest);
        if let Some(value) = rest.strip_prefix("= '") {
            found.insert(value[..value.find('\'').unwrap()].to_owned());
        } else if let Some(list) = rest.strip_prefix("IN (") {
            found.extend(quoted(&list[..list.find(')').unwrap()]));
        }
    }
    found.into_iter().collect()
}

/// What `vault_reveal_request` may answer: each refusal (every one is named `refused-…`), and
/// the outcomes of the `outcome := …` statement.
fn reveal_request_outcomes(body: &str) -> Vec<String> {
    let mut found: BTreeSet<String> = body
        .lines()
        .flat_map(quoted)
        .filter(|literal| literal.starts_with("refused-"))
        .collect();
    let assignment = &body[body.find("outcome := ").expect("the outcome is assigned")..];
    found.extend(quoted(&assignment[..assignment.find(';').unwrap()]));
    found.into_iter().collect()
}

fn texts<T: Copy>(all: &[T], as_str: fn(T) -> &'static str) -> Vec<String> {
    all.iter().map(|value| as_str(*value).to_owned()).collect()
}

/// The lists that differ, each said in full.
#[derive(Default)]
struct Mismatches(Vec<String>);

impl Mismatches {
    /// An ordered list: the same values in the same order.
    fn list(&mut self, what: &str, database: Vec<String>, rust: Vec<String>) {
        if database != rust {
            self.0.push(format!(
                "{what}: the database has {database:?}, Rust {rust:?}"
            ));
        }
    }

    /// Values scattered through a body: the same values.
    fn set(&mut self, what: &str, database: Vec<String>, mut rust: Vec<String>) {
        rust.sort();
        self.list(what, database, rust);
    }
}

#[tokio::test]
async fn every_list_the_database_keeps_is_the_one_rust_hands_it() {
    let env = TestEnv::new(30).await;
    let pool = &env.pool;
    let mut wrong = Mismatches::default();

    let states = quoted(&constraint(pool, "vault_keys_state_check").await);
    wrong.list(
        "vault_keys.state, KeyState",
        states,
        texts(KeyState::ALL, KeyState::as_str),
    );
    let purposes = quoted(&constraint(pool, "vault_keys_purpose_check").await);
    wrong.list(
        "vault_keys.purpose, Purpose",
        purposes,
        texts(Purpose::ALL, Purpose::as_str),
    );
    let windows = quoted(&constraint(pool, "retention_windows_state_check").await);
    let rust = texts(WindowState::ALL, WindowState::as_str);
    wrong.list("retention_windows.state, WindowState", windows, rust);

    let purposes: Vec<String> = sqlx::query_scalar("SELECT unnest(audit_reveal_purposes())")
        .fetch_all(pool)
        .await
        .unwrap();
    let rust = texts(RevealPurpose::ALL, RevealPurpose::as_str);
    wrong.list("audit_reveal_purposes(), RevealPurpose", purposes, rust);

    let request = function(pool, "vault_reveal_request").await;
    let questions = compared_with(&request, "p_question");
    let rust = texts(QuestionKind::ALL, QuestionKind::as_str);
    wrong.set(
        "vault_reveal_request's questions, QuestionKind",
        questions,
        rust,
    );
    let answers = reveal_request_outcomes(&request);
    let rust = texts(RequestOutcome::ALL, RequestOutcome::as_str);
    wrong.set(
        "vault_reveal_request's outcomes, RequestOutcome",
        answers,
        rust,
    );

    let outcome = function(pool, "vault_reveal_outcome").await;
    let outcomes = compared_with(&outcome, "p_outcome");
    let rust = texts(RevealOutcome::ALL, RevealOutcome::as_str);
    wrong.set(
        "vault_reveal_outcome's outcomes, RevealOutcome",
        outcomes,
        rust,
    );

    for door in ["vault_rotation_request", "vault_quarantine_request"] {
        let operations = compared_with(&function(pool, door).await, "p_operation");
        let rust = texts(DoorOperation::ALL, DoorOperation::as_str);
        wrong.set(
            &format!("{door}'s operations, DoorOperation"),
            operations,
            rust,
        );
    }

    assert!(wrong.0.is_empty(), "{}", wrong.0.join("\n"));
    env.cleanup().await;
}

/// The readers above find what they are meant to, so an empty list on both sides cannot pass.
#[test]
fn the_readers_find_literals_where_the_schema_writes_them() {
    let check = "CHECK ((state = ANY (ARRAY['active'::text, 'expired'::text])))";
    assert_eq!(quoted(check), ["active", "expired"]);
    let body = "IF p_op = 'b' THEN x; ELSIF p_op IN ('a', 'c') THEN y;
                ELSIF p_op NOT IN ('d') THEN z; END IF; r.op <> p_op; f(p_op, 'e');";
    assert_eq!(compared_with(body, "p_op"), ["a", "b", "c", "d"]);
    let request = "refusal := 'refused-x';\n VALUES ('reveal', 'refused-y', 'z');
                   outcome := coalesce(refusal, CASE WHEN n = 0 THEN 'none' ELSE 'some' END);
                   RAISE LOG 'by %: refused-z', x;";
    assert_eq!(
        reveal_request_outcomes(request),
        ["none", "refused-x", "refused-y", "some"]
    );
}
