//! The standard process collector's families (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, …), as the Go and Python clients
//! name them, read from `/proc/self` at each scrape. prometheus-client has no process
//! collector, and the `procfs` crate would be a large dependency for six numbers.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;

use super::collect::gauge;

#[derive(Debug, Default)]
pub(super) struct Process;

/// The figures of this process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Figures {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
}

/// Reads `/proc/self`; `None` where it is not there (not Linux, no procfs).
pub(crate) fn read() -> Option<Figures> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let mut f = parse_stat(&stat, &boot)?;
    f.open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    f.max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    Some(f)
}

/// Parses `/proc/self/stat` (`proc(5)`: fields 14, 15, 22, 23 and 24) with the boot time
/// from `/proc/stat`.
fn parse_stat(stat: &str, proc_stat: &str) -> Option<Figures> {
    // The command name (field 2) may hold spaces and parentheses: fields after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let page = rustix::param::page_size() as u64;
    let btime: u64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(Figures {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        start_time_seconds: btime as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page),
        open_fds: 0,
        max_fds: 0,
    })
}

impl Collector for Process {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(f) = read() else {
            return Ok(());
        };
        {
            let m = e.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(f.cpu_seconds).encode(m)?;
        }
        gauge(
            &mut e,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            f.resident_bytes,
        )?;
        gauge(
            &mut e,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            f.virtual_bytes,
        )?;
        gauge(
            &mut e,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            f.start_time_seconds,
        )?;
        gauge(
            &mut e,
            "process_open_fds",
            "Number of open file descriptors",
            f.open_fds,
        )?;
        gauge(
            &mut e,
            "process_max_fds",
            "Maximum number of open file descriptors",
            f.max_fds,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_is_skipped() {
        let mut fields = vec!["S".to_string()];
        // Fields 4 to 24; 14 and 15 are 300 and 100 ticks, 22 is 500, 23 and 24 sizes.
        for n in 4..=24 {
            fields.push(
                match n {
                    14 => "300",
                    15 => "100",
                    22 => "500",
                    23 => "4096000",
                    24 => "10",
                    _ => "0",
                }
                .to_string(),
            );
        }
        let stat = format!("1234 (a (b) c) {}", fields.join(" "));
        let f = parse_stat(&stat, "cpu 1 2 3\nbtime 1000\n").unwrap();
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        assert_eq!(f.cpu_seconds, 400.0 / ticks);
        assert_eq!(f.start_time_seconds, 1000.0 + 500.0 / ticks);
        assert_eq!(f.virtual_bytes, 4_096_000);
        assert_eq!(f.resident_bytes, 10 * rustix::param::page_size() as u64);
    }

    #[test]
    fn this_process_reads() {
        let f = read().unwrap();
        assert!(f.resident_bytes > 0 && f.open_fds > 0 && f.max_fds >= f.open_fds);
    }
}
