//! Synthetic login messages in the sample's shape, for the load generator, tests and
//! benchmarks: deterministic for a seed, with chosen rates of repeated personal values and of
//! malformed bodies.

/// SplitMix64: tiny, fast, and plenty for test data (not for anything secret).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// How many earlier values a repeat may pick from.
const REPEAT_POOL: usize = 1_000;

/// Generates message bodies.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: SplitMix64,
    dup_rate: f64,
    bad_rate: f64,
    ips: Vec<String>,
    device_ids: Vec<String>,
    serial: u64,
}

/// One generated body and whether it is meant to be quarantined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub body: String,
    pub malformed: bool,
}

impl Generator {
    /// `dup_rate`: chance that a valid message reuses an earlier ip, and independently an
    /// earlier device_id. `bad_rate`: chance that a message is malformed.
    pub fn new(seed: u64, dup_rate: f64, bad_rate: f64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            dup_rate,
            bad_rate,
            ips: Vec::new(),
            device_ids: Vec::new(),
            serial: 0,
        }
    }

    pub fn next_message(&mut self) -> Generated {
        self.serial += 1;
        if self.rng.unit() < self.bad_rate {
            return Generated {
                body: self.malformed(),
                malformed: true,
            };
        }
        let ip = self.repeat_or_new(
            |g| &mut g.ips,
            |rng| {
                format!(
                    "{}.{}.{}.{}",
                    rng.below(256),
                    rng.below(256),
                    rng.below(256),
                    rng.below(256)
                )
            },
        );
        let device_id = self.repeat_or_new(
            |g| &mut g.device_ids,
            |rng| {
                format!(
                    "{:03}-{:02}-{:04}",
                    rng.below(1000),
                    rng.below(100),
                    rng.below(10_000)
                )
            },
        );
        let r = &mut self.rng;
        let user_id = format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            r.next_u64() as u32,
            r.below(1 << 16),
            r.below(1 << 12),
            0x8000 | r.below(1 << 14),
            r.below(1 << 48)
        );
        let app_version = match r.below(3) {
            0 => format!("{}.{}.{}", r.below(10), r.below(10), r.below(10)),
            1 => format!("{}.{:02}", r.below(10), r.below(100)),
            _ => format!("{}.{}", r.below(10), r.below(10)),
        };
        let device_type = ["android", "ios"][r.below(2) as usize];
        let locale = if r.unit() < 0.3 {
            "null".to_owned()
        } else {
            let locales = ["RU", "PH", "ID", "FR", "PT", "US", "BR", "CN", "DE", "NG"];
            format!("\"{}\"", locales[r.below(locales.len() as u64) as usize])
        };
        Generated {
            body: format!(
                r#"{{"user_id": "{user_id}", "app_version": "{app_version}", "device_type": "{device_type}", "ip": "{ip}", "locale": {locale}, "device_id": "{device_id}"}}"#
            ),
            malformed: false,
        }
    }

    fn repeat_or_new(
        &mut self,
        pool: fn(&mut Self) -> &mut Vec<String>,
        fresh: impl FnOnce(&mut SplitMix64) -> String,
    ) -> String {
        let repeat = self.rng.unit() < self.dup_rate;
        let len = pool(self).len();
        if repeat && len > 0 {
            let i = self.rng.below(len as u64) as usize;
            return pool(self)[i].clone();
        }
        let value = fresh(&mut self.rng);
        let replace_at = (self.serial as usize) % REPEAT_POOL;
        let values = pool(self);
        if values.len() < REPEAT_POOL {
            values.push(value.clone());
        } else {
            values[replace_at] = value.clone();
        }
        value
    }

    fn malformed(&mut self) -> String {
        let n = self.serial;
        match self.rng.below(4) {
            0 => format!(r#"{{"foo": "oops_wrong_msg_type", "bar": "{n}"}}"#),
            1 => format!("not json {n}"),
            2 => format!(
                r#"{{"user_id": "bad-{n}", "app_version": "1.2", "device_type": "ios", "ip": "999.0.0.{}", "locale": null, "device_id": "000-00-0000"}}"#,
                n % 10
            ),
            _ => format!(
                r#"{{"user_id": "bad-{n}", "app_version": "one", "device_type": "ios", "ip": "10.0.0.1", "locale": null, "device_id": "000-00-0000"}}"#
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event;
    use std::collections::HashSet;

    #[test]
    fn same_seed_same_messages() {
        let a: Vec<_> = {
            let mut g = Generator::new(7, 0.2, 0.01);
            (0..50).map(|_| g.next_message()).collect()
        };
        let mut g = Generator::new(7, 0.2, 0.01);
        let b: Vec<_> = (0..50).map(|_| g.next_message()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn rates_are_honoured_and_labels_match_validation() {
        let mut g = Generator::new(1, 0.2, 0.05);
        let (mut bad, mut devices) = (0, HashSet::new());
        let total = 10_000;
        for _ in 0..total {
            let m = g.next_message();
            let parsed = event::parse(m.body.as_bytes());
            assert_eq!(parsed.is_err(), m.malformed, "{}", m.body);
            if let Ok(e) = parsed {
                devices.insert(e.device_id.to_string());
            } else {
                bad += 1;
            }
        }
        let bad_rate = bad as f64 / total as f64;
        assert!((0.04..0.06).contains(&bad_rate), "bad rate {bad_rate}");
        let repeated = 1.0 - devices.len() as f64 / (total - bad) as f64;
        assert!((0.17..0.23).contains(&repeated), "repeat rate {repeated}");
    }
}
