//! Micro-benchmarks of the per-record work: parse + validate, tokenize, seal, and the whole
//! transform of a message into a row. `cargo bench --bench transform`
//!
//! A plain timing loop (like the other benches) rather than criterion, which as a dev-dependency
//! was compiled into every `cargo test`: each case is calibrated to about 10 ms a sample and
//! timed over 50 samples after a warm-up; the median and the fastest sample are printed, per
//! element. Without `--bench` (`cargo test --benches`), each case runs once, as a smoke test.

use std::hint::black_box;
use std::time::{Duration, Instant};

use pii_vault::event;
use pii_vault::ingest::batch;
use pii_vault::ingest::source::{Message, Receipt};
use pii_vault::synth::Generator;
use pii_vault::vault::erasure::ErasedUsers;
use pii_vault::vault::place::login_place;
use pii_vault::vault::seal::{SealFormat, Sealer};
use pii_vault::vault::token::{Field, Tokenizer};
use pii_vault::vault::{KeyId, SecretKey};

const BODY: &str = r#"{"user_id": "424cdd21-063a-43a7-b91b-7ca1a833afae", "app_version": "2.3.0", "device_type": "android", "ip": "199.172.111.135", "locale": "RU", "device_id": "593-47-5928"}"#;

const SAMPLES: usize = 50;
const SAMPLE_TIME: Duration = Duration::from_millis(10);
const WARM_UP: Duration = Duration::from_millis(500);

fn keys() -> (Tokenizer, Sealer) {
    let key = |byte| SecretKey::take_from(&mut [byte; 32]).unwrap();
    (
        Tokenizer::new(KeyId(1), &key(1)),
        Sealer::new(KeyId(2), &key(2), SealFormat::CURRENT),
    )
}

struct Bench {
    /// `cargo bench` passes `--bench`; anything else (`cargo test --benches`) only smoke-tests.
    measure: bool,
}

impl Bench {
    /// Times `sample(n)` (n calls, `elements` records each) and prints the figures per record.
    fn measure(
        &self,
        group: &str,
        name: &str,
        elements: u64,
        mut sample: impl FnMut(u64) -> Duration,
    ) {
        if !self.measure {
            sample(1);
            println!("{group}/{name}: ok");
            return;
        }
        // Warm up, and find how many calls make a sample of about SAMPLE_TIME.
        let (mut calls, mut spent, started) = (0u64, Duration::ZERO, Instant::now());
        while started.elapsed() < WARM_UP {
            spent += sample(1);
            calls += 1;
        }
        let per_sample = (SAMPLE_TIME.as_nanos() * u128::from(calls) / spent.as_nanos().max(1))
            .clamp(1, u128::from(u32::MAX)) as u64;
        let mut nanos: Vec<f64> = (0..SAMPLES)
            .map(|_| sample(per_sample).as_nanos() as f64 / (per_sample * elements) as f64)
            .collect();
        nanos.sort_by(f64::total_cmp);
        let median = nanos[SAMPLES / 2];
        println!(
            "{group}/{name}: median {} per element (fastest {}), {:.3} M elements/s",
            shown(median),
            shown(nanos[0]),
            1e3 / median
        );
    }

    fn run<O>(&self, group: &str, name: &str, mut routine: impl FnMut() -> O) {
        self.measure(group, name, 1, |calls| {
            let started = Instant::now();
            for _ in 0..calls {
                black_box(routine());
            }
            started.elapsed()
        });
    }

    /// Like [`Bench::run`] with `setup`'s output as input, setup excluded from the time.
    fn run_batched<I, O>(
        &self,
        group: &str,
        name: &str,
        elements: u64,
        mut setup: impl FnMut() -> I,
        mut routine: impl FnMut(I) -> O,
    ) {
        self.measure(group, name, elements, |calls| {
            let mut spent = Duration::ZERO;
            for _ in 0..calls {
                let input = setup();
                let started = Instant::now();
                black_box(routine(black_box(input)));
                spent += started.elapsed();
            }
            spent
        });
    }
}

fn shown(nanos: f64) -> String {
    if nanos < 1_000.0 {
        format!("{nanos:.1} ns")
    } else {
        format!("{:.2} µs", nanos / 1e3)
    }
}

fn main() {
    let bench = Bench {
        measure: std::env::args().any(|arg| arg == "--bench"),
    };
    let (tokenizer, sealer) = keys();
    let group = "per record";
    bench.run(group, "parse + validate", || {
        event::parse(black_box(BODY.as_bytes())).unwrap()
    });
    let ip = "199.172.111.135".parse().unwrap();
    bench.run(group, "tokenize (ip + device_id)", || {
        (
            tokenizer.ip(black_box(ip)),
            tokenizer.device_id(black_box("593-47-5928")),
        )
    });
    let (ip_place, device_place) = (
        login_place(Field::Ip, "m-1", "u-1"),
        login_place(Field::DeviceId, "m-1", "u-1"),
    );
    bench.run(group, "seal (ip + device_id)", || {
        (
            sealer.seal(&ip_place, black_box(b"199.172.111.135")),
            sealer.seal(&device_place, black_box(b"593-47-5928")),
        )
    });
    bench.run(group, "crypto: 2 tokens + 2 seals", || {
        (
            tokenizer.ip(black_box(ip)),
            tokenizer.device_id(black_box("593-47-5928")),
            sealer.seal(&ip_place, black_box(b"199.172.111.135")),
            sealer.seal(&device_place, black_box(b"593-47-5928")),
        )
    });

    // The whole transform, as the batcher runs it: 500 generated messages per batch.
    let mut generator = Generator::new(1, 0.2, 0.01);
    let bodies: Vec<Vec<u8>> = (0..500)
        .map(|_| generator.next_message().body.into_bytes())
        .collect();
    bench.run_batched(
        "batch of 500",
        "whole transform",
        bodies.len() as u64,
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
    );
}
