//! The standard `process_*` metrics of the Prometheus client libraries, read from `/proc` at
//! each scrape (Linux only: elsewhere they are left out).
//!
//! Read by hand rather than through a crate: the `metrics-process` crate would bring `procfs`,
//! `rustix` and `linux-raw-sys` (some 90,000 lines) for the six numbers below.

use std::fs;
use std::time::{SystemTime, UNIX_EPOCH};

use super::exposition::{Family, Kind};

pub const CPU_SECONDS: &str = "process_cpu_seconds_total";
pub const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
pub const OPEN_FDS: &str = "process_open_fds";
pub const MAX_FDS: &str = "process_max_fds";
pub const START_TIME: &str = "process_start_time_seconds";

/// The kernel's clock ticks per second as `/proc` reports times (USER_HZ). It is part of the
/// kernel's user-space ABI and 100 on every Linux architecture Rust targets; reading
/// `sysconf(_SC_CLK_TCK)` would take `unsafe` for a constant (the Go client assumes it too).
const TICKS_PER_SECOND: f64 = 100.0;

/// This process's figures, each `None` where `/proc` did not give it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Figures {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
    pub start_time_seconds: Option<f64>,
}

impl Figures {
    /// Reads this process's figures now.
    pub fn read() -> Figures {
        let stat = fs::read_to_string("/proc/self/stat").ok();
        let stat = stat.as_deref().and_then(Stat::parse);
        let boot_time = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| boot_time(&text));
        Figures {
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / TICKS_PER_SECOND),
            resident_bytes: fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|text| resident_bytes(&text)),
            virtual_bytes: stat.map(|s| s.vsize as f64),
            open_fds: fs::read_dir("/proc/self/fd")
                .ok()
                .map(|entries| entries.count() as f64),
            max_fds: fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|text| max_open_files(&text)),
            start_time_seconds: stat
                .zip(boot_time)
                .map(|(s, boot)| boot + s.starttime as f64 / TICKS_PER_SECOND),
        }
    }

    /// Appends the figures that were read, in the Prometheus text format.
    pub fn write_prometheus(&self, out: &mut String) {
        let families = [
            (
                CPU_SECONDS,
                Kind::Counter,
                "Total user and system CPU time spent in seconds.",
                self.cpu_seconds,
            ),
            (
                RESIDENT_MEMORY,
                Kind::Gauge,
                "Resident memory size in bytes.",
                self.resident_bytes,
            ),
            (
                VIRTUAL_MEMORY,
                Kind::Gauge,
                "Virtual memory size in bytes.",
                self.virtual_bytes,
            ),
            (
                OPEN_FDS,
                Kind::Gauge,
                "Number of open file descriptors.",
                self.open_fds,
            ),
            (
                MAX_FDS,
                Kind::Gauge,
                "Maximum number of open file descriptors.",
                self.max_fds,
            ),
            (
                START_TIME,
                Kind::Gauge,
                "Start time of the process since unix epoch in seconds.",
                self.start_time_seconds,
            ),
        ];
        for (name, kind, help, value) in families {
            if let Some(value) = value {
                Family::new(name, kind, help).sample(&[], value).write(out);
            }
        }
    }
}

/// When this process started, as `/proc` says (`None` off Linux).
pub fn start_time() -> Option<SystemTime> {
    let seconds = Figures::read().start_time_seconds?;
    UNIX_EPOCH.checked_add(std::time::Duration::from_secs_f64(seconds))
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    /// Clock ticks after boot.
    starttime: u64,
    vsize: u64,
}

impl Stat {
    /// `pid (comm) state ppid ...`: the command name may hold spaces and parentheses, so the
    /// fields are counted from its last `)`. Field numbers are proc(5)'s.
    fn parse(text: &str) -> Option<Stat> {
        let (_, after_comm) = text.rsplit_once(')')?;
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // `fields[0]` is field 3 (state).
        let field = |number: usize| fields.get(number - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
            vsize: field(23)?,
        })
    }
}

/// `btime` of `/proc/stat`: boot time, seconds after the epoch.
fn boot_time(proc_stat: &str) -> Option<f64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// `VmRSS:  1234 kB` of `/proc/self/status`, in bytes (in kB whatever the page size).
fn resident_bytes(status: &str) -> Option<f64> {
    let kilobytes: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kilobytes * 1024.0)
}

/// The soft limit of `Max open files` in `/proc/self/limits` (`unlimited` counts as absent).
fn max_open_files(limits: &str) -> Option<f64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Seconds after the epoch, now.
pub(super) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and a parenthesis, as a process may call itself.
        let line = "4242 (in (gest) x) S 1 4242 4242 0 -1 4194560 9150 0 0 0 \
                    250 75 0 0 20 0 9 0 123456 987654321 2222 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 17475 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            Stat::parse(line),
            Some(Stat {
                utime: 250,
                stime: 75,
                starttime: 123456,
                vsize: 987654321,
            })
        );
        assert_eq!(Stat::parse("4242 (cut short) S 1"), None);
    }

    #[test]
    fn status_limits_and_boot_time_are_read_in_their_units() {
        let status = "Name:\tingest\nVmSize:\t  100 kB\nVmRSS:\t    2048 kB\nThreads:\t9\n";
        assert_eq!(resident_bytes(status), Some(2048.0 * 1024.0));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             63451                63451                processes\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024.0));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_open_files(unlimited), None);
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000.0)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_read_whole_and_plausible() {
        let figures = Figures::read();
        let start = figures.start_time_seconds.expect("start time");
        let now = unix_now();
        assert!(start <= now + 1.0 && start > now - 86_400.0, "{figures:?}");
        assert!(figures.resident_bytes.unwrap() > 1e5, "{figures:?}");
        assert!(figures.virtual_bytes.unwrap() >= figures.resident_bytes.unwrap());
        assert!(figures.open_fds.unwrap() >= 3.0, "{figures:?}");
        assert!(figures.max_fds.unwrap() >= figures.open_fds.unwrap());
        assert!(figures.cpu_seconds.unwrap() >= 0.0);

        let mut out = String::new();
        figures.write_prometheus(&mut out);
        for name in [
            CPU_SECONDS,
            RESIDENT_MEMORY,
            VIRTUAL_MEMORY,
            OPEN_FDS,
            MAX_FDS,
            START_TIME,
        ] {
            assert!(out.contains(&format!("\n{name} ")), "{name} in\n{out}");
        }
        assert!(out.contains("# TYPE process_cpu_seconds_total counter\n"));
    }
}
