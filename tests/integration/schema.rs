//! schema/current.sql, the one file where the current schema is read, is what migrations/
//! make: `scripts/schema-dump --check` migrates a scratch database with this build's
//! `rotate-keys init` and compares its dump with the committed file. The file itself is held to
//! the catalogs of a migrated database, so that what the script leaves out of pg_dump's text
//! (run-to-run noise) can never be an object, a body, an owner or a grant.

use std::path::Path;
use std::process::{Command, Output};

use sqlx::PgPool;

use crate::common::{self, Scratch, output_of, stderr, stdout};

const ROTATE_KEYS: &str = env!("CARGO_BIN_EXE_rotate-keys");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/schema-dump");
const CURRENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schema/current.sql");
const REGENERATE: &str = "scripts/schema-dump --write";

/// `scripts/schema-dump --check [file]` with this build's rotate-keys.
fn check(file: Option<&Path>) -> Output {
    let mut command = Command::new(SCRIPT);
    command.arg("--check").env("ROTATE_KEYS", ROTATE_KEYS);
    if let Some(file) = file {
        command.arg(file);
    }
    output_of(&mut command)
}

fn committed() -> String {
    std::fs::read_to_string(CURRENT)
        .unwrap_or_else(|e| panic!("reading {CURRENT} ({e}); make it with `{REGENERATE}`"))
}

#[test]
fn the_committed_schema_is_what_the_migrations_make() {
    let output = check(None);
    match output.status.code() {
        Some(0) => {}
        Some(1) => panic!(
            "schema/current.sql is not what migrations/ make; regenerate it with `{REGENERATE}` \
             and commit it. The difference (committed -, from migrations/ +):\n{}{}",
            stdout(&output),
            stderr(&output)
        ),
        _ => panic!(
            "scripts/schema-dump could not make the schema ({}):\n{}{}",
            output.status,
            stdout(&output),
            stderr(&output)
        ),
    }
}

#[test]
fn the_check_shows_a_changed_door_and_how_to_regenerate() {
    let current = committed();
    let definer = current
        .lines()
        .find(|line| line.contains("SECURITY DEFINER") && !line.starts_with("--"))
        .expect("a SECURITY DEFINER function in schema/current.sql");
    let tampered_line = definer.replace("SECURITY DEFINER", "SECURITY INVOKER");
    let tampered = std::env::temp_dir().join(format!("schema-{}.sql", common::unique_suffix()));
    std::fs::write(&tampered, current.replacen(definer, &tampered_line, 1)).unwrap();

    let output = check(Some(&tampered));
    std::fs::remove_file(&tampered).unwrap();
    let (diff, said) = (stdout(&output), stderr(&output));
    assert_eq!(output.status.code(), Some(1), "{diff}{said}");
    assert!(
        diff.lines().any(|line| line == format!("-{tampered_line}"))
            && diff.lines().any(|line| line == format!("+{definer}")),
        "the diff names the changed line:\n{diff}"
    );
    assert!(said.contains(REGENERATE), "{said}");
}

/// What must be in the file: each line of one query's result.
async fn expected(pool: &PgPool, sql: &str) -> Vec<String> {
    let found: Vec<String> = sqlx::query_scalar(sql).fetch_all(pool).await.unwrap();
    assert!(!found.is_empty(), "no rows from {sql}");
    found
}

/// The file's text from the `-- Name: {name}` header on to the next object's.
fn section<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let start = text.find(&format!("\n-- Name: {name}"))? + 1;
    let rest = &text[start..];
    let end = rest[1..].find("\n-- Name: ").map_or(rest.len(), |i| i + 1);
    Some(&rest[..end])
}

#[tokio::test]
async fn every_object_body_owner_and_grant_of_a_migrated_database_is_in_the_committed_schema() {
    let text = committed();
    let db = Scratch::new().await;
    let pool = db.pool.clone();
    // The month partitions are data (which exist depends on the day), left out of the file as
    // scripts/schema-dump leaves them out; their parents, indexes and grants are checked.
    let months: Vec<String> = sqlx::query_scalar(
        "SELECT inhrelid::regclass::text FROM pg_inherits
          WHERE inhparent IN ('user_logins'::regclass, 'login_vault'::regclass)",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(months.len() >= 8, "this month and three ahead: {months:?}");
    for month in months {
        sqlx::query(&format!("DROP TABLE {month}"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let mut missing = Vec::new();
    let mut expect = |what: String| {
        if !text.contains(&what) {
            missing.push(what);
        }
    };

    // Tables, sequences and indexes of their own, with their owners.
    for line in expected(
        &pool,
        "SELECT format('-- Name: %s; Type: %s; Schema: public; Owner: %s', c.relname,
                       CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'i' THEN 'INDEX' ELSE 'TABLE' END,
                       pg_get_userbyid(c.relowner))
           FROM pg_class c
          WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'S', 'i')
            AND NOT EXISTS (SELECT FROM pg_constraint k WHERE k.conindid = c.oid)",
    )
    .await
    {
        expect(line);
    }
    // Constraints: checks inside their tables, the rest as objects of their own.
    for line in expected(
        &pool,
        "SELECT CASE k.contype
                  WHEN 'c' THEN format('CONSTRAINT %s CHECK ', k.conname)
                  WHEN 'f' THEN format('-- Name: %s %s; Type: FK CONSTRAINT;', t.relname, k.conname)
                  ELSE format('-- Name: %s %s; Type: CONSTRAINT;', t.relname, k.conname) END
           FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid
          WHERE k.connamespace = 'public'::regnamespace",
    )
    .await
    {
        expect(line);
    }
    for line in expected(
        &pool,
        "SELECT format('-- Name: %s %s; Type: TRIGGER;', c.relname, t.tgname)
           FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal",
    )
    .await
    {
        expect(line);
    }
    for line in expected(
        &pool,
        "SELECT format('COMMENT ON COLUMN public.%s.%s IS %L;', c.relname, a.attname, d.description)
           FROM pg_description d
           JOIN pg_class c ON c.oid = d.objoid AND d.classoid = 'pg_class'::regclass
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.objsubid
          WHERE c.relnamespace = 'public'::regnamespace",
    )
    .await
    {
        expect(line);
    }
    // Table and column grants: one line per grantee and object.
    for line in expected(
        &pool,
        "WITH acls AS (
             SELECT c.oid, c.relacl AS acl FROM pg_class c
             UNION ALL
             SELECT t.attrelid, t.attacl FROM pg_attribute t WHERE t.attnum > 0
         )
         SELECT DISTINCT format(' ON %s public.%s TO %s;',
                                CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
                                c.relname, pg_get_userbyid(a.grantee))
           FROM pg_class c JOIN acls USING (oid) CROSS JOIN aclexplode(acls.acl) a
          WHERE c.relnamespace = 'public'::regnamespace AND a.grantee <> c.relowner",
    )
    .await
    {
        expect(line);
    }
    // The group roles, which pg_dump leaves out.
    for line in expected(
        &pool,
        "SELECT DISTINCT format('CREATE ROLE %s WITH ', r.rolname)
           FROM pg_shdepend d JOIN pg_roles r ON r.oid = d.refobjid
          WHERE d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND r.rolname LIKE 'pii\\_vault\\_%'",
    )
    .await
    {
        expect(line);
    }

    // Functions: each with its owner, its whole body, SECURITY DEFINER where it is a door, and
    // a line for each role granted EXECUTE. pg_dump names our own argument types with their
    // schema (`door_logins(public.door_requests)`). pg_dump prints no grant for a function everyone
    // may call (its privileges are the default ones), so the file's summary must say it.
    let functions: Vec<(String, String, String, bool, Vec<String>, String)> = sqlx::query_as(
        "SELECT format('%s(%s); Type: FUNCTION; Schema: public; Owner: %s', p.proname,
                       array_to_string(ARRAY(SELECT CASE WHEN ty.typnamespace = 'public'::regnamespace
                                                         THEN 'public.' ELSE '' END
                                                    || format_type(a.t, NULL)
                                             FROM unnest(p.proargtypes) WITH ORDINALITY a(t, n)
                                             JOIN pg_type ty ON ty.oid = a.t
                                             ORDER BY a.n), ', '),
                       pg_get_userbyid(p.proowner)),
                p.proname::text, p.prosrc, p.prosecdef,
                ARRAY(SELECT CASE a.grantee WHEN 0 THEN 'PUBLIC'
                                  ELSE pg_get_userbyid(a.grantee)::text END
                        FROM aclexplode(p.proacl) a WHERE a.grantee <> p.proowner
                         AND NOT d.is_default),
                CASE WHEN d.is_default THEN p.oid::regprocedure::text ELSE '' END
           FROM pg_proc p
          CROSS JOIN LATERAL (SELECT acldefault('f', p.proowner) AS acl) def
          CROSS JOIN LATERAL (SELECT coalesce(p.proacl @> def.acl AND p.proacl <@ def.acl, true)
                                     AS is_default) d
          WHERE p.pronamespace = 'public'::regnamespace",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        functions.iter().filter(|f| f.3).count() > 10,
        "{functions:?}"
    );
    let public = text
        .split_once("\n-- PUBLIC\n")
        .and_then(|(_, rest)| rest.split_once("\n--\n"))
        .map_or("", |(block, _)| block);
    for (header, proname, body, definer, grantees, callable_by_all) in &functions {
        if !callable_by_all.is_empty()
            && !public
                .lines()
                .any(|line| line.starts_with(&format!("--   {callable_by_all}")))
        {
            missing.push(format!("{callable_by_all}: under PUBLIC in the summary"));
        }
        let Some(section) = section(&text, header) else {
            missing.push(format!("-- Name: {header}"));
            continue;
        };
        if section.contains("SECURITY DEFINER") != *definer {
            missing.push(format!("{proname}: SECURITY DEFINER = {definer}"));
        }
        // A body in SQL-standard form (RETURN ...) is kept parsed, not as text.
        if !body.trim().is_empty() && !section.contains(body.as_str()) {
            missing.push(format!("{proname}: its body"));
        }
        for grantee in grantees {
            let granted = text.lines().any(|line| {
                line.starts_with(&format!("GRANT ALL ON FUNCTION public.{proname}("))
                    && line.ends_with(&format!(" TO {grantee};"))
            });
            if !granted {
                missing.push(format!("{proname}: EXECUTE to {grantee}"));
            }
        }
    }

    pool.close().await;
    assert!(
        missing.is_empty(),
        "schema/current.sql lacks what a migrated database has (regenerate it with \
         `{REGENERATE}`; if that does not help, scripts/schema-dump drops too much):\n{}",
        missing.join("\n")
    );
    db.drop().await;
}

const CHECKED_QUERIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.sqlx");

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The build checks each `query_as!` against .sqlx/ (offline: .cargo/config.toml), and this
/// holds .sqlx/ to what the migrations make: each query, described by a migrated database as
/// a login that runs it in production (a door's role, not a superuser), has the columns, types,
/// parameters and nullability recorded, under its own hash; and no file is left of a query the
/// code no longer has.
#[tokio::test]
async fn the_checked_queries_metadata_is_what_the_migrations_make() {
    use sha2::{Digest, Sha256};
    use sqlx::Executor;

    let regenerate = "regenerate .sqlx/ with `scripts/schema-dump --write`";
    let db = Scratch::new().await;
    let logins = ["compliance", "keyadmin", "ingester"];
    let mut pools = Vec::new();
    for login in logins {
        pools.push(db.pool_as(login).await);
    }
    let mut files: Vec<_> = std::fs::read_dir(CHECKED_QUERIES)
        .unwrap_or_else(|e| panic!("reading {CHECKED_QUERIES} ({e}): {regenerate}"))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    let stored: Vec<(String, serde_json::Value)> = files
        .iter()
        .map(|file| {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(file).unwrap();
            (name, serde_json::from_str(&text).unwrap())
        })
        .collect();
    let mut wrong = Vec::new();
    for (name, stored) in &stored {
        let query = stored["query"].as_str().expect("a query text");
        let hash = hex::encode(Sha256::digest(query.as_bytes()));
        if *name != format!("query-{hash}.json") || stored["hash"] != hash.as_str() {
            wrong.push(format!("{name}: not named by its query's hash"));
        }
        // The first login allowed to run it describes it; the others' refusals are kept, to
        // say why when none is.
        let mut refusals = Vec::new();
        let mut described = None;
        for (login, pool) in logins.iter().zip(&pools) {
            match pool.describe(query).await {
                Ok(describe) => {
                    described = Some((login, serde_json::to_value(&describe).unwrap()));
                    break;
                }
                Err(e) => refusals.push(format!("{login}: {e}")),
            }
        }
        match described {
            None => wrong.push(format!(
                "{name}: no login can run it ({})",
                refusals.join("; ")
            )),
            Some((login, describe)) if describe != stored["describe"] => wrong.push(format!(
                "{name}: described as {login}, the database says {describe}, the file {}",
                stored["describe"]
            )),
            Some(_) => {}
        }
    }
    // The comparison sees a column's type: the key door's `format` read as int4 is refused.
    let (_, key_door) = stored
        .iter()
        .find(|(_, stored)| {
            stored["query"]
                .as_str()
                .is_some_and(|query| query.contains("FROM vault_key_hand_out($1)"))
        })
        .expect("the key door's hand-out is a checked query");
    let retyped = key_door["query"]
        .as_str()
        .unwrap()
        .replace("format AS", "format::int4 AS");
    let keyadmin = &pools[1];
    let describe = serde_json::to_value(keyadmin.describe(retyped.as_str()).await.unwrap());
    assert_ne!(describe.unwrap(), key_door["describe"], "{retyped}");
    let in_code: usize = rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            ["query!(", "query_as!(", "query_scalar!("]
                .iter()
                .map(|mac| text.matches(&format!("sqlx::{mac}")).count())
                .sum::<usize>()
        })
        .sum();
    for pool in pools {
        pool.close().await;
    }
    assert!(in_code > 0, "no checked query found in src/");
    assert_eq!(
        files.len(),
        in_code,
        "one .sqlx/ file per checked query in src/: {regenerate}"
    );
    assert!(wrong.is_empty(), "{regenerate}:\n{}", wrong.join("\n"));
    db.drop().await;
}
