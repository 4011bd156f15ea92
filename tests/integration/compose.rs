//! docker-compose.yaml without a Docker engine: `scripts/check-compose` runs the compose
//! file's PostgreSQL init scripts (docker/postgres/) on a scratch cluster as the postgres image
//! runs them, then these binaries with each service's environment from the compose file, and
//! the LocalStack hook against the emulator. Here it runs against the binaries of this build.

use std::path::Path;
use std::process::Command;

use crate::common;

const UNMASK: &str = env!("CARGO_BIN_EXE_unmask");

#[test]
fn the_compose_services_run_on_a_cluster_set_up_by_docker_postgres_with_no_superuser_login() {
    let bin_dir = Path::new(UNMASK).parent().expect("the binaries' directory");
    for binary in [
        env!("CARGO_BIN_EXE_ingest"),
        env!("CARGO_BIN_EXE_rotate-keys"),
    ] {
        assert_eq!(Path::new(binary).parent(), Some(bin_dir), "{binary}");
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check-compose");
    let output = Command::new(script)
        .env("PII_VAULT_BIN_DIR", bin_dir)
        .env("CHECK_COMPOSE_ENDPOINT", common::aws_endpoint())
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    let out = String::from_utf8_lossy(&output.stdout);
    let report = format!("{out}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "scripts/check-compose failed:\n{report}"
    );

    // What the compose file promises, each a line the script prints only once it held.
    for promise in [
        "is valid under the Compose Specification schema",
        "the schema check refuses a service with an unknown key",
        "the superuser postgres is refused over TCP by pg_hba.conf",
        "pii_vault owns the database and is neither superuser nor CREATEROLE nor the door",
        "init's `rotate-keys init` migrated the scratch database as pii_vault",
        "after init the window is closed",
        "audit-checkpoint's loop ran `unmask audit-checkpoint` as compliance",
        "audit-checkpoint's loop ends with status 0 on SIGTERM",
        "ingest's `ingest --drain` consumed the queue as ingester",
        "analyst reads 99 logins in user_logins",
        "rotate-keys's `rotate-keys status` runs as keyadmin",
        "unmask as the owner pii_vault is refused (exit 3)",
        "as compliance reveals the sample's ip",
        "the Object Lock witness bucket and 100 messages",
    ] {
        assert!(
            out.lines()
                .any(|line| line.starts_with("ok ") && line.contains(promise)),
            "no `ok` line with {promise:?}:\n{report}"
        );
    }
    assert!(
        out.lines()
            .any(|line| line.starts_with("check-compose: ") && line.ends_with(" 0 failed")),
        "{report}"
    );
}
