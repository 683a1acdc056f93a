//! Open-loop request schedule and coordinated-omission correction, with no I/O.
//!
//! In open-loop mode each connection owns a fixed timetable: request `k` is
//! *intended* to leave at `first + k * interval`, whatever happened before.
//! Latency is measured from that intended time, not from when the request
//! actually left (the wrk2 correction). So when the server stalls, every
//! request that should have been sent during the stall is charged the time it
//! waited, and a 1 s stall at 1000 req/s shows up as ~1000 slow samples
//! instead of one outlier. Times are offsets from the run's epoch, passed in,
//! so this module can be driven by a synthetic clock in tests.

use std::time::Duration;

/// One connection's open-loop timetable.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    first: Duration,
    interval: Duration,
    next: u64,
}

impl OpenLoop {
    /// A timetable for connection `index` of `conns` sharing `total_rate`
    /// requests per second. Connections are staggered evenly across one
    /// interval so they do not fire in lock-step.
    pub fn new(start: Duration, total_rate: f64, index: usize, conns: usize) -> Self {
        let conns = conns.max(1);
        let per_conn = (total_rate / conns as f64).max(1e-6);
        let interval = Duration::from_secs_f64(1.0 / per_conn);
        let offset = interval.mul_f64((index % conns) as f64 / conns as f64);
        OpenLoop { first: start + offset, interval, next: 0 }
    }

    /// When the next request is intended to leave.
    pub fn next_intended(&self) -> Duration {
        self.first + self.interval.mul_f64(self.next as f64)
    }

    /// Claims the next slot of the timetable and returns its intended time.
    /// The caller sends at `max(now, intended)` and measures from `intended`.
    pub fn take(&mut self) -> Duration {
        let t = self.next_intended();
        self.next += 1;
        t
    }

    /// The spacing between two requests of this connection.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// The latency charged to a request: from when it was intended to leave
/// (open loop) or actually left (closed loop) to when its response completed.
pub fn corrected_latency(origin: Duration, completed: Duration) -> Duration {
    completed.saturating_sub(origin)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use hdrhistogram::Histogram;

    fn us(d: Duration) -> u64 {
        d.as_micros() as u64
    }

    /// Drives one connection at `rate` for `total`, with a fixed service time
    /// and one stall: a request sent in `[stall_at, stall_at + stall)` is
    /// answered only at `stall_at + stall`. Returns (corrected, uncorrected).
    fn simulate(rate: f64, total: Duration, stall_at: Duration, stall: Duration) -> [Histogram<u64>; 2] {
        let service = Duration::from_micros(100);
        let mut sched = OpenLoop::new(Duration::ZERO, rate, 0, 1);
        let mut corrected = Histogram::<u64>::new(3).unwrap();
        let mut uncorrected = Histogram::<u64>::new(3).unwrap();
        let mut now = Duration::ZERO;
        while sched.next_intended() < total {
            let intended = sched.take();
            let sent = now.max(intended);
            let done = if sent >= stall_at && sent < stall_at + stall {
                stall_at + stall + service
            } else {
                sent + service
            };
            corrected.record(us(corrected_latency(intended, done))).unwrap();
            uncorrected.record(us(corrected_latency(sent, done))).unwrap();
            now = done;
        }
        [corrected, uncorrected]
    }

    #[test]
    fn schedule_sends_exactly_rate_requests_per_second() {
        let mut s = OpenLoop::new(Duration::ZERO, 1000.0, 0, 1);
        let mut n = 0;
        while s.take() < Duration::from_secs(1) {
            n += 1;
        }
        assert_eq!(n, 1000);
    }

    #[test]
    fn connections_share_the_total_rate_and_are_staggered() {
        let a = OpenLoop::new(Duration::ZERO, 1000.0, 0, 4);
        let b = OpenLoop::new(Duration::ZERO, 1000.0, 1, 4);
        assert_eq!(a.interval(), Duration::from_millis(4));
        assert_eq!(b.next_intended(), Duration::from_millis(1));
    }

    #[test]
    fn a_one_second_stall_at_1000_per_second_is_charged_to_a_thousand_requests() {
        let [c, u] =
            simulate(1000.0, Duration::from_secs(10), Duration::from_secs(3), Duration::from_secs(1));
        assert_eq!(c.len(), 10_000);
        // ~1000 samples spread linearly from 1 s down to ~0 (a few more while
        // the backlog drains at 100 us per request).
        let over_500ms = c.count_between(500_000, u64::MAX);
        assert!((500..=600).contains(&over_500ms), "{over_500ms}");
        let over_1ms = c.count_between(1_000, u64::MAX);
        assert!((1000..=1200).contains(&over_1ms), "{over_1ms}");
        // The top 1% are all at least 0.85 s: p99 is the stall, not a fluke.
        assert!(c.value_at_quantile(0.99) >= 850_000, "{}", c.value_at_quantile(0.99));
        assert!(c.max() >= 999_000 && c.max() <= 1_002_000);
        // Without the correction, the stall is a single outlier.
        assert_eq!(u.count_between(500_000, u64::MAX), 1);
        assert!(u.value_at_quantile(0.99) < 1_000);
    }

    #[test]
    fn closed_loop_latency_is_measured_from_the_actual_send() {
        let sent = Duration::from_millis(5);
        assert_eq!(corrected_latency(sent, Duration::from_millis(7)), Duration::from_millis(2));
        assert_eq!(corrected_latency(sent, Duration::ZERO), Duration::ZERO);
    }
}
