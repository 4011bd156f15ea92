//! How long `unmask` takes for a user with 1,000 logins under one data key, KMS left out
//! (target: <= 100 ms; one KMS call, for the data key). KMS is the test kit's in-memory one
//! (`pii_vault::testing::MemoryKms`), whose share is microseconds: what is timed is pii-vault
//! and PostgreSQL. Needs PostgreSQL: `scripts/services up`.
//!
//! Run: `cargo bench --bench unmask`

#[path = "../tests/integration/common/mod.rs"]
#[allow(dead_code)] // the tests' set-up, of which a bench uses a part
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use pii_vault::ingest::{self, Settings};
use pii_vault::testing::{MemoryKms, Scratch, TEST_KMS_KEY};
use pii_vault::unmask::{self, Question, Request, RevealPurpose};
use pii_vault::vault::keyring::Keyring;

const LOGINS: usize = 1_000;
const RUNS: usize = 10;

/// Every request made of `kms` so far.
fn kms_calls(kms: &MemoryKms) -> usize {
    [
        "GenerateDataKey",
        "Decrypt",
        "ReEncrypt",
        "DescribeKey",
        "ScheduleKeyDeletion",
    ]
    .into_iter()
    .map(|operation| kms.calls(operation))
    .sum()
}

#[tokio::main]
async fn main() {
    let db = Scratch::new().await;
    let kms = Arc::new(MemoryKms::new());
    let keyring =
        |pool: &sqlx::PgPool| Keyring::new(pool.clone(), kms.clone(), TEST_KMS_KEY, "bench");
    keyring(&db.pool).init_token_key().await.unwrap();
    let bodies: Vec<String> = (0..LOGINS)
        .map(|i| {
            common::login(
                "bench-user",
                &format!("10.2.{}.{}", i / 256, i % 256),
                &format!("{i:03}-42-0000"),
            )
        })
        .collect();
    let settings = Settings {
        drain: true,
        flush_interval: Duration::from_millis(20),
        ..Settings::default()
    };
    let summary = ingest::run(
        common::VecSource::new(&bodies),
        db.pool.clone(),
        keyring(&db.pool),
        settings,
        Arc::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.stored as usize, LOGINS);

    let compliance = db.pool_as("compliance").await;
    let request = Request {
        question: Question::UserId("bench-user".into()),
        purpose: RevealPurpose::SecurityIncident,
        reason: "benchmark".into(),
        actor: "bench".into(),
    };
    let mut times = Vec::new();
    let mut calls = 0;
    for _ in 0..RUNS {
        let keyring = keyring(&compliance);
        let calls_before = kms_calls(&kms);
        let started = Instant::now();
        let revealed = unmask::unmask(&compliance, &keyring, &request)
            .await
            .unwrap();
        times.push(started.elapsed());
        assert_eq!(revealed.len(), LOGINS);
        calls = kms_calls(&kms) - calls_before;
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "unmask, {LOGINS} logins, one data key, KMS in memory: median {:.1} ms, max {:.1} ms over {RUNS} runs; KMS calls per run: {calls}",
        ms(times[RUNS / 2]),
        ms(times[RUNS - 1])
    );
    println!(
        "{{\"logins\": {LOGINS}, \"unmask_ms_excluding_kms_median\": {:.2}, \"kms_calls\": {calls}}}",
        ms(times[RUNS / 2])
    );
    compliance.close().await;
    db.drop().await;
}
