//! Result accounting and the final report, with no I/O.
//!
//! Invariant kept: every operation counted as `attempted` ends as exactly one
//! of `completed` or one error kind, so `attempted == completed + errors`
//! holds for every run (operations still in flight at the hard deadline are
//! counted as `aborted`, never dropped). Latencies live in per-worker
//! microsecond histograms merged here.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms track (1 hour, in microseconds).
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A new empty latency histogram with microsecond resolution.
pub fn new_histogram() -> Histogram<u64> {
    // 3 significant digits over [1 us, 1 h] is a fixed, valid configuration.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap_or_else(|_| unreachable!())
}

/// Why an operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Refused,
    Reset,
    Timeout,
    /// The peer closed before the full response arrived.
    Short,
    /// The response arrived but its bytes differ from what was expected.
    Mismatch,
    /// Still in flight when the run's hard deadline passed.
    Aborted,
    Other,
}

impl ErrorKind {
    /// Classifies a positive errno value.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ECONNREFUSED => ErrorKind::Refused,
            libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED => ErrorKind::Reset,
            libc::ETIMEDOUT => ErrorKind::Timeout,
            _ => ErrorKind::Other,
        }
    }
}

/// Error counts by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    pub short: u64,
    pub mismatch: u64,
    pub aborted: u64,
    pub other: u64,
}

impl ErrorCounts {
    pub fn add(&mut self, kind: ErrorKind) {
        let slot = match kind {
            ErrorKind::Refused => &mut self.refused,
            ErrorKind::Reset => &mut self.reset,
            ErrorKind::Timeout => &mut self.timeout,
            ErrorKind::Short => &mut self.short,
            ErrorKind::Mismatch => &mut self.mismatch,
            ErrorKind::Aborted => &mut self.aborted,
            ErrorKind::Other => &mut self.other,
        };
        *slot += 1;
    }

    pub fn total(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.short + self.mismatch + self.aborted + self.other
    }

    fn merge(&mut self, o: &ErrorCounts) {
        self.refused += o.refused;
        self.reset += o.reset;
        self.timeout += o.timeout;
        self.short += o.short;
        self.mismatch += o.mismatch;
        self.aborted += o.aborted;
        self.other += o.other;
    }
}

/// One worker's counters. Only operations started inside the measurement
/// window are counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub attempted: u64,
    pub completed: u64,
    pub errors: ErrorCounts,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// `idle` only: connections that were established.
    pub established: u64,
    /// `idle` only: connections still open at the end of the hold.
    pub held: u64,
}

impl Counts {
    pub fn merge(&mut self, o: &Counts) {
        self.attempted += o.attempted;
        self.completed += o.completed;
        self.errors.merge(&o.errors);
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.established += o.established;
        self.held += o.held;
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
    pub stdev: f64,
}

impl LatencySummary {
    /// Summarises a histogram, or `None` when it holds no sample.
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        Some(LatencySummary {
            count: h.len(),
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
            stdev: (h.stdev() * 10.0).round() / 10.0,
        })
    }
}

/// The whole result of a run, as printed with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub targets: Vec<String>,
    pub sources: usize,
    pub workers: usize,
    pub concurrency: usize,
    pub size: usize,
    /// `open` when `--rate` was given (latency corrected for coordinated
    /// omission), `closed` otherwise.
    pub mode: &'static str,
    pub rate_target: Option<f64>,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub attempted: u64,
    pub completed: u64,
    pub errors: ErrorCounts,
    pub errors_total: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub ops_per_s: f64,
    pub gbit_per_s: f64,
    pub latency_us: Option<LatencySummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub established: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<u64>,
}

/// Operations per second and Gbit/s (both directions added) over `measured`.
pub fn rates(c: &Counts, measured: Duration) -> (f64, f64) {
    let secs = measured.as_secs_f64();
    if secs <= 0.0 {
        return (0.0, 0.0);
    }
    let ops = c.completed as f64 / secs;
    let gbit = (c.bytes_sent + c.bytes_received) as f64 * 8.0 / secs / 1e9;
    (round3(ops), round3(gbit))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Report {
    /// The human-readable table printed without `--json`.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let e = &self.errors;
        let _ = writeln!(
            s,
            "{} against {} ({} workers, {} connections, {} B, {}-loop{})",
            self.scenario,
            self.targets.join(","),
            self.workers,
            self.concurrency,
            self.size,
            self.mode,
            self.rate_target.map(|r| format!(" at {r}/s")).unwrap_or_default()
        );
        let _ = writeln!(s, "  measured     {:.3} s (after {:.3} s warmup)", self.duration_s, self.warmup_s);
        let _ = writeln!(s, "  attempted    {}", self.attempted);
        let _ = writeln!(s, "  completed    {}", self.completed);
        let _ = writeln!(
            s,
            "  errors       {} (refused {}, reset {}, timeout {}, short {}, mismatch {}, aborted {}, other {})",
            self.errors_total, e.refused, e.reset, e.timeout, e.short, e.mismatch, e.aborted, e.other
        );
        if let (Some(est), Some(held)) = (self.established, self.held) {
            let _ = writeln!(s, "  established  {est}\n  held         {held}");
        }
        let _ = writeln!(s, "  bytes        sent {} / received {}", self.bytes_sent, self.bytes_received);
        let _ = writeln!(s, "  rate         {:.1} ops/s, {:.3} Gbit/s", self.ops_per_s, self.gbit_per_s);
        if let Some(l) = &self.latency_us {
            let _ = writeln!(
                s,
                "  latency us   p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.1}",
                l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            );
        }
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_distribution_land_where_expected() {
        let mut h = new_histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let s = LatencySummary::from_histogram(&h).unwrap();
        assert_eq!(s.count, 10_000);
        assert!((4_990..=5_010).contains(&s.p50), "{}", s.p50);
        assert!((8_990..=9_010).contains(&s.p90));
        assert!((9_890..=9_910).contains(&s.p99));
        assert!((9_980..=10_010).contains(&s.p999));
        assert!((9_995..=10_010).contains(&s.max));
        assert!((s.mean - 5_000.5).abs() < 5.0);
    }

    #[test]
    fn merged_worker_histograms_equal_one_histogram_of_all_samples() {
        let (mut a, mut b, mut all) = (new_histogram(), new_histogram(), new_histogram());
        for v in 0..1000u64 {
            let (h, x) = if v % 3 == 0 { (&mut a, v * 7) } else { (&mut b, v * 13) };
            h.record(x).unwrap();
            all.record(x).unwrap();
        }
        a.add(&b).unwrap();
        assert_eq!(LatencySummary::from_histogram(&a), LatencySummary::from_histogram(&all));
    }

    #[test]
    fn an_empty_histogram_has_no_summary() {
        assert_eq!(LatencySummary::from_histogram(&new_histogram()), None);
    }

    #[test]
    fn errors_are_classified_by_errno_and_summed() {
        let mut e = ErrorCounts::default();
        for errno in [libc::ECONNREFUSED, libc::ECONNRESET, libc::EPIPE, libc::ETIMEDOUT, libc::EADDRNOTAVAIL]
        {
            e.add(ErrorKind::from_errno(errno));
        }
        e.add(ErrorKind::Short);
        assert_eq!((e.refused, e.reset, e.timeout, e.other, e.short), (1, 2, 1, 1, 1));
        assert_eq!(e.total(), 6);
    }

    #[test]
    fn merged_counts_keep_attempted_equal_to_completed_plus_errors() {
        let mut a = Counts { attempted: 10, completed: 9, ..Default::default() };
        a.errors.add(ErrorKind::Timeout);
        let mut b = Counts { attempted: 5, completed: 3, ..Default::default() };
        b.errors.add(ErrorKind::Refused);
        b.errors.add(ErrorKind::Aborted);
        a.merge(&b);
        assert_eq!(a.attempted, a.completed + a.errors.total());
    }

    #[test]
    fn rates_count_both_directions_in_gbit() {
        let c = Counts {
            completed: 500,
            bytes_sent: 125_000_000,
            bytes_received: 125_000_000,
            ..Default::default()
        };
        let (ops, gbit) = rates(&c, Duration::from_millis(500));
        assert_eq!(ops, 1000.0);
        assert_eq!(gbit, 4.0);
        assert_eq!(rates(&c, Duration::ZERO), (0.0, 0.0));
    }
}
