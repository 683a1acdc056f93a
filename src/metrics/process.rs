//! The standard `process_*` figures, read from `/proc/self` at scrape (as
//! Prometheus's Go client does): CPU time, memory, file descriptors and
//! start time.
//!
//! Invariant: any file that cannot be read or parsed yields `None`, never
//! a made-up figure.

use std::fs;

/// The kernel's clock ticks per second as `/proc` reports them (USER_HZ,
/// fixed at 100 on Linux whatever the kernel's HZ: Go's procfs assumes the
/// same).
const USER_HZ: f64 = 100.0;

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Process {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub start_time_seconds: f64,
}

pub(super) fn read() -> Option<Process> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let boot = fs::read_to_string("/proc/stat").ok()?;
    let open_fds = fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    parse(&stat, &status, &limits, &boot, open_fds)
}

fn parse(stat: &str, status: &str, limits: &str, boot: &str, open_fds: u64) -> Option<Process> {
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'. Field 3 (state) is index 0 here.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let (utime, stime, start_ticks) = (field(14)?, field(15)?, field(22)?);
    let kib = |key: &str| {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|k| k * 1024)
    };
    let max_fds = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse::<u64>()
        .ok()?;
    let btime = boot.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse::<u64>().ok()?;
    Some(Process {
        cpu_seconds: (utime + stime) as f64 / USER_HZ,
        resident_bytes: kib("VmRSS:")?,
        virtual_bytes: kib("VmSize:")?,
        open_fds,
        max_fds,
        start_time_seconds: btime as f64 + start_ticks as f64 / USER_HZ,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_reads_as_running_with_memory_and_descriptors() {
        let p = read().expect("/proc/self is readable on Linux");
        assert!(p.resident_bytes > 0 && p.virtual_bytes >= p.resident_bytes, "{p:?}");
        assert!(p.open_fds >= 3 && p.max_fds >= p.open_fds, "{p:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(p.start_time_seconds > 1e9 && p.start_time_seconds <= now + 1.0, "{p:?}");
    }

    #[test]
    fn a_command_name_with_spaces_and_parentheses_parses() {
        let stat = "42 (a b) c) S 1 1 1 0 -1 0 0 0 0 0 250 150 0 0 20 0 1 0 5000 0 0";
        let status = "VmSize:\t  2000 kB\nVmRSS:\t  1000 kB\n";
        let limits = "Max open files            1024                 4096                 files\n";
        let p = parse(stat, status, limits, "cpu 1\nbtime 1000\n", 5).unwrap();
        assert_eq!(p.cpu_seconds, 4.0);
        assert_eq!((p.resident_bytes, p.virtual_bytes), (1000 * 1024, 2000 * 1024));
        assert_eq!((p.open_fds, p.max_fds), (5, 1024));
        assert_eq!(p.start_time_seconds, 1050.0);
    }

    #[test]
    fn a_truncated_stat_is_no_figure() {
        assert_eq!(parse("42 (x) S 1", "", "", "", 0), None);
    }
}
