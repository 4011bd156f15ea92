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

/// Whether the database keeps the values as a list (the order counts) or scattered through a
/// body (only the values do).
#[derive(Clone, Copy, PartialEq)]
enum Kept {
    InOrder,
    Scattered,
}
use Kept::{InOrder, Scattered};

#[tokio::test]
async fn every_list_the_database_keeps_is_the_one_rust_hands_it() {
    let env = TestEnv::new(30).await;
    let pool = &env.pool;
    let check = |name| constraint(pool, name);
    let request = function(pool, "vault_reveal_request").await;
    let outcome = function(pool, "vault_reveal_outcome").await;
    let rotation = function(pool, "vault_rotation_request").await;
    let quarantine = function(pool, "vault_quarantine_request").await;
    let purposes: Vec<String> = sqlx::query_scalar("SELECT unnest(audit_reveal_purposes())")
        .fetch_all(pool)
        .await
        .unwrap();
    let operations = texts(DoorOperation::ALL, DoorOperation::as_str);
    let lists = [
        (
            "vault_keys.state, KeyState",
            InOrder,
            quoted(&check("vault_keys_state_check").await),
            texts(KeyState::ALL, KeyState::as_str),
        ),
        (
            "vault_keys.purpose, Purpose",
            InOrder,
            quoted(&check("vault_keys_purpose_check").await),
            texts(Purpose::ALL, Purpose::as_str),
        ),
        (
            "retention_windows.state, WindowState",
            InOrder,
            quoted(&check("retention_windows_state_check").await),
            texts(WindowState::ALL, WindowState::as_str),
        ),
        (
            "audit_reveal_purposes(), RevealPurpose",
            InOrder,
            purposes,
            texts(RevealPurpose::ALL, RevealPurpose::as_str),
        ),
        (
            "vault_reveal_request's questions, QuestionKind",
            Scattered,
            compared_with(&request, "p_question"),
            texts(QuestionKind::ALL, QuestionKind::as_str),
        ),
        (
            "vault_reveal_request's outcomes, RequestOutcome",
            Scattered,
            reveal_request_outcomes(&request),
            texts(RequestOutcome::ALL, RequestOutcome::as_str),
        ),
        (
            "vault_reveal_outcome's outcomes, RevealOutcome",
            Scattered,
            compared_with(&outcome, "p_outcome"),
            texts(RevealOutcome::ALL, RevealOutcome::as_str),
        ),
        (
            "vault_rotation_request's operations, DoorOperation",
            Scattered,
            compared_with(&rotation, "p_operation"),
            operations.clone(),
        ),
        (
            "vault_quarantine_request's operations, DoorOperation",
            Scattered,
            compared_with(&quarantine, "p_operation"),
            operations,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, kept, database, mut rust) in lists {
        if kept == Scattered {
            rust.sort(); // as `compared_with` and `reveal_request_outcomes` answer
        }
        if database != rust {
            wrong.push(format!(
                "{what}: the database has {database:?}, Rust {rust:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
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
