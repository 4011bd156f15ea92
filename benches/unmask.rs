//! How long `unmask` takes for a user with 1,000 logins under one data key, with the time spent
//! in KMS measured apart (target: <= 100 ms excluding KMS, 2 KMS calls: the data key and the
//! token key that checks each value). Needs the local services: `scripts/services up`.
//!
//! Run: `cargo bench --bench unmask`

#[path = "../tests/integration/common/mod.rs"]
#[allow(dead_code)] // the tests' set-up, of which a bench uses a part
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pii_vault::unmask::{self, Question, Request, RevealPurpose};
use pii_vault::vault::keyring::Keyring;
use pii_vault::vault::kms::{AwsKms, KeyWrapper, KmsError};
use pii_vault::vault::{EncryptionContext, SecretKey, WrappedKey};

/// AWS KMS, with the time spent waiting for it added up.
struct TimedKms {
    inner: Arc<AwsKms>,
    nanos: AtomicU64,
}

impl TimedKms {
    async fn timed<T>(&self, call: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let result = call.await;
        self.nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }
}

impl KeyWrapper for TimedKms {
    async fn generate_key(
        &self,
        kms_key_id: &str,
        context: EncryptionContext,
    ) -> Result<(SecretKey, WrappedKey), KmsError> {
        self.timed(self.inner.generate_key(kms_key_id, context))
            .await
    }

    async fn unwrap_key(
        &self,
        wrapped: &WrappedKey,
        context: EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        self.timed(self.inner.unwrap_key(wrapped, context)).await
    }

    async fn rewrap_key(
        &self,
        wrapped: &WrappedKey,
        context: EncryptionContext,
        new_kms_key_id: &str,
    ) -> Result<WrappedKey, KmsError> {
        self.timed(self.inner.rewrap_key(wrapped, context, new_kms_key_id))
            .await
    }

    async fn check_key(&self, kms_key_id: &str) -> Result<String, KmsError> {
        self.timed(self.inner.check_key(kms_key_id)).await
    }

    async fn schedule_deletion(&self, kms_key_id: &str) -> Result<(), KmsError> {
        self.timed(self.inner.schedule_deletion(kms_key_id)).await
    }
}

const LOGINS: usize = 1_000;
const RUNS: usize = 10;

#[tokio::main]
async fn main() {
    let env = common::TestEnv::new(30).await;
    env.init_token_key().await;
    let bodies: Vec<String> = (0..LOGINS)
        .map(|i| {
            common::login(
                "bench-user",
                &format!("10.2.{}.{}", i / 256, i % 256),
                &format!("{i:03}-42-0000"),
            )
        })
        .collect();
    let summary = env.ingest_bodies(&bodies).await;
    assert_eq!(summary.stored as usize, LOGINS);

    let compliance = sqlx::PgPool::connect(&env.url_as("compliance"))
        .await
        .unwrap();
    let request = Request {
        question: Question::UserId("bench-user".into()),
        purpose: RevealPurpose::SecurityIncident,
        reason: "benchmark".into(),
        actor: "bench".into(),
    };
    let mut excluding_kms = Vec::new();
    let mut kms_calls = 0;
    for _ in 0..RUNS {
        let kms = Arc::new(TimedKms {
            inner: env.kms.clone(),
            nanos: AtomicU64::new(0),
        });
        let keyring = Keyring::new(compliance.clone(), kms.clone(), &env.kms_key_id, "bench");
        let calls_before = env.kms.calls();
        let started = Instant::now();
        let revealed = unmask::unmask(&compliance, &keyring, &request)
            .await
            .unwrap();
        let total = started.elapsed();
        assert_eq!(revealed.len(), LOGINS);
        kms_calls = env.kms.calls() - calls_before;
        excluding_kms.push(total - Duration::from_nanos(kms.nanos.load(Ordering::Relaxed)));
    }
    excluding_kms.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "unmask, {LOGINS} logins, one data key: excluding KMS median {:.1} ms, max {:.1} ms over {RUNS} runs; KMS calls per run: {kms_calls}",
        ms(excluding_kms[RUNS / 2]),
        ms(excluding_kms[RUNS - 1])
    );
    println!(
        "{{\"logins\": {LOGINS}, \"unmask_ms_excluding_kms_median\": {:.2}, \"kms_calls\": {kms_calls}}}",
        ms(excluding_kms[RUNS / 2])
    );
    compliance.close().await;
    env.cleanup().await;
}
