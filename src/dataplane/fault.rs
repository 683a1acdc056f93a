//! What the data plane does with errors it did not cause and cannot fix:
//! whom an error blames, how often a recurring one is logged, and how a
//! worker that fails makes itself known.
//!
//! Invariants:
//! - An error is classified where it is created ([`Blame`]); only
//!   [`Blame::Endpoint`] errors ever reach passive health, so running out
//!   of fds or ephemeral ports never ejects a healthy endpoint.
//! - A recurring warning is logged at most once per [`Throttle`] period,
//!   with the count of those it held back.
//! - A worker that ends with an error is recorded in [`Faults`] before its
//!   thread exits: `/healthz` then fails and the process stops with a
//!   non-zero status (see `run.rs`); nothing dies silently.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Which side an error is the fault of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The client: it reset, or went away.
    Client,
    /// The endpoint: it refused, reset, or did not answer in time. Counts
    /// toward passive health before any byte has flowed.
    Endpoint,
    /// This process or host: no fds, buffers, memory or local ports left.
    /// Never counts against an endpoint.
    Local,
}

impl Blame {
    /// Whether `e`, from creating or connecting a socket, is a shortage of
    /// this host's resources rather than a fault of the peer.
    pub fn of_local_resources(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
        )
    }

    /// The blame of an error creating or connecting a socket to an endpoint.
    pub fn of_connect(e: &io::Error) -> Blame {
        if Blame::of_local_resources(e) { Blame::Local } else { Blame::Endpoint }
    }
}

/// The back-off of an accept that failed for lack of resources, in the
/// data plane and the admin servers alike: the first delay, doubled on each
/// further failure up to the last, and back to the first on a success.
pub const ACCEPT_BACKOFF: [Duration; 7] = [
    Duration::from_millis(20),
    Duration::from_millis(40),
    Duration::from_millis(80),
    Duration::from_millis(160),
    Duration::from_millis(320),
    Duration::from_millis(640),
    Duration::from_secs(1),
];

/// Logs a recurring warning at most once per period.
#[derive(Debug)]
pub struct Throttle {
    period: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    pub const fn new(period: Duration) -> Self {
        Self { period, last: None, held_back: 0 }
    }

    /// `Some(n)` when this occurrence may be logged, `n` being how many
    /// were held back since the last one logged; `None` to stay quiet.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.period => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// Workers that ended with an error, shared with the control thread and the
/// admin server.
#[derive(Debug, Default)]
pub struct Faults {
    failed: AtomicUsize,
    notify: tokio::sync::Notify,
}

impl Faults {
    /// Record that a worker failed, and wake whoever waits in
    /// [`Faults::failed`].
    pub fn worker_failed(&self) {
        self.failed.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// How many workers failed.
    pub fn count(&self) -> usize {
        self.failed.load(Ordering::Acquire)
    }

    /// Wait until a worker has failed.
    pub async fn failed(&self) {
        loop {
            // Registered from creation: a failure between the check below
            // and the await still wakes it.
            let notified = self.notify.notified();
            if self.count() > 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_fds_or_ports_is_local_not_the_endpoints_fault() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM, libc::EADDRNOTAVAIL] {
            assert_eq!(
                Blame::of_connect(&io::Error::from_raw_os_error(errno)),
                Blame::Local,
                "errno {errno}"
            );
        }
        for errno in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EHOSTUNREACH, libc::ECONNRESET] {
            assert_eq!(
                Blame::of_connect(&io::Error::from_raw_os_error(errno)),
                Blame::Endpoint,
                "errno {errno}"
            );
        }
    }

    #[test]
    fn a_throttle_logs_once_per_period_and_counts_the_rest() {
        let mut t = Throttle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(t.allow(t0), Some(0));
        for ms in [1, 10, 500, 999] {
            assert_eq!(t.allow(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(t.allow(t0 + Duration::from_millis(1000)), Some(4));
        assert_eq!(t.allow(t0 + Duration::from_millis(1001)), None);
    }

    #[test]
    fn a_failed_worker_wakes_the_waiter_even_if_it_failed_first() {
        let faults = Faults::default();
        faults.worker_failed();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), faults.failed()).await.expect("woken");
        });
        assert_eq!(faults.count(), 1);
    }
}
