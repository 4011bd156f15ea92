//! Micro-benchmarks of the per-record work: parse + validate, tokenize, seal, and the whole
//! transform of a message into a row. `cargo bench --bench transform`

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pii_vault::event;
use pii_vault::ingest::batch::{self, login_place};
use pii_vault::ingest::source::{Message, Receipt};
use pii_vault::synth::Generator;
use pii_vault::vault::erasure::ErasedUsers;
use pii_vault::vault::seal::Sealer;
use pii_vault::vault::token::{Field, Tokenizer};
use pii_vault::vault::{KeyId, SecretKey};

const BODY: &str = r#"{"user_id": "424cdd21-063a-43a7-b91b-7ca1a833afae", "app_version": "2.3.0", "device_type": "android", "ip": "199.172.111.135", "locale": "RU", "device_id": "593-47-5928"}"#;

fn keys() -> (Tokenizer, Sealer) {
    let key = |byte| SecretKey::take_from(&mut [byte; 32]).unwrap();
    (
        Tokenizer::new(KeyId(1), &key(1)),
        Sealer::new(KeyId(2), &key(2)),
    )
}

fn per_record(c: &mut Criterion) {
    let (tokenizer, sealer) = keys();
    let mut group = c.benchmark_group("per record");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse + validate", |b| {
        b.iter(|| event::parse(black_box(BODY.as_bytes())).unwrap())
    });
    let ip = "199.172.111.135".parse().unwrap();
    group.bench_function("tokenize (ip + device_id)", |b| {
        b.iter(|| {
            (
                tokenizer.ip(black_box(ip)),
                tokenizer.device_id(black_box("593-47-5928")),
            )
        })
    });
    let (ip_place, device_place) = (
        login_place(Field::Ip, "m-1", "u-1"),
        login_place(Field::DeviceId, "m-1", "u-1"),
    );
    group.bench_function("seal (ip + device_id)", |b| {
        b.iter(|| {
            (
                sealer.seal(&ip_place, black_box(b"199.172.111.135")),
                sealer.seal(&device_place, black_box(b"593-47-5928")),
            )
        })
    });
    group.bench_function("crypto: 2 tokens + 2 seals", |b| {
        b.iter(|| {
            (
                tokenizer.ip(black_box(ip)),
                tokenizer.device_id(black_box("593-47-5928")),
                sealer.seal(&ip_place, black_box(b"199.172.111.135")),
                sealer.seal(&device_place, black_box(b"593-47-5928")),
            )
        })
    });
    group.finish();

    // The whole transform, as the batcher runs it: 500 generated messages per batch.
    let mut generator = Generator::new(1, 0.2, 0.01);
    let bodies: Vec<Vec<u8>> = (0..500)
        .map(|_| generator.next_message().body.into_bytes())
        .collect();
    let mut group = c.benchmark_group("batch of 500");
    group.throughput(Throughput::Elements(bodies.len() as u64));
    group.bench_function("whole transform", |b| {
        b.iter_batched(
            || {
                bodies
                    .iter()
                    .enumerate()
                    .map(|(i, body)| Message {
                        id: format!("m-{i}"),
                        body: body.clone(),
                        sent_at: None,
                        receipt: Receipt(String::new()),
                        read_at: Instant::now(),
                    })
                    .collect::<Vec<_>>()
            },
            |messages| {
                batch::build(
                    messages,
                    &tokenizer,
                    &sealer,
                    &ErasedUsers::default(),
                    false,
                )
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, per_record);
criterion_main!(benches);
