//! The data plane: one worker thread per core, each with its own io_uring,
//! serving TCP connections from the current snapshot.
//!
//! The control plane talks to workers in one way only: it publishes a new
//! snapshot and calls [`DataPlane::notify`]; each worker then reconciles its
//! listening sockets with the snapshot on its own thread. The data plane
//! never waits on the control plane.
//!
//! A worker that ends with an error (or panics) is logged as an error and
//! recorded in [`Faults`]: `/healthz` fails from then on, and `run` stops
//! the process with a non-zero status so its supervisor (the DaemonSet)
//! restarts it. A worker is not restarted in place: its connections were
//! lost with it, and a fresh process is the state that is known good.

mod accept;
mod conn;
mod driver;
pub(crate) mod fault;
mod listeners;
mod machine;
mod preamble;
mod relay;
mod relay_ring;
mod slots;
pub(crate) mod sys;
mod token;
mod udp;
mod udp_flow;
mod udp_pace;
mod udp_worker;
mod upstream;
mod worker;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub use fault::Faults;
pub use relay::RelayMode;

use crate::snapshot::SharedSnapshot;

/// How workers run.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub workers: usize,
    /// Pin worker `i` to CPU `i % CPUs`.
    pub pin: bool,
    pub relay: RelayMode,
    /// Dial timeout of each attempt; the last repeats for later attempts.
    pub connect_timeouts: Vec<Duration>,
    /// How long open connections may run after a stop is asked.
    pub drain_timeout: Duration,
    pub ring_entries: u32,
    /// A UDP flow idle this long (both ways) is closed.
    pub udp_timeout: Duration,
    /// Most UDP flows, over all workers.
    pub udp_max_flows: usize,
    /// A relayed TCP connection that moves no byte either way this long is
    /// reset (`None`: never).
    pub tcp_idle_timeout: Option<Duration>,
    /// Most TCP connections open at once, over all workers (`None`: no
    /// cap). Worker `i` takes its share ([`WorkerConfig::connection_cap`]);
    /// at its share it stops accepting, so clients wait in the kernel's
    /// backlog instead of being reset.
    pub max_connections: Option<usize>,
    /// Fault injection for tests: a worker fails with an error once it has
    /// accepted this many connections.
    pub fail_after_accepts: Option<u64>,
    /// Peers that may send a PROXY header to a port that accepts one
    /// (empty: any peer); a header from any other is refused unread.
    pub proxy_trusted: Vec<ipnet::IpNet>,
}

impl WorkerConfig {
    /// Worker `index`'s share of `max_connections`: the total split as
    /// evenly as it goes, so the shares add up to exactly the total.
    pub fn connection_cap(&self, index: usize) -> Option<usize> {
        let workers = self.workers.max(1);
        self.max_connections.map(|total| total / workers + usize::from(index < total % workers))
    }
}

/// The default of `--tcp-idle-timeout`: one hour, HAProxy's usual
/// `timeout tunnel`; see docs/architecture.md for the choice.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            pin: true,
            relay: RelayMode::Auto,
            connect_timeouts: vec![
                Duration::from_millis(250),
                Duration::from_millis(500),
                Duration::from_secs(1),
                Duration::from_secs(2),
            ],
            drain_timeout: Duration::from_secs(10),
            ring_entries: 1024,
            udp_timeout: Duration::from_secs(30),
            udp_max_flows: 8192,
            tcp_idle_timeout: Some(TCP_IDLE_TIMEOUT),
            max_connections: None,
            fail_after_accepts: None,
            proxy_trusted: Vec::new(),
        }
    }
}

/// What the workers share: the snapshot, their wake-up eventfds, and the
/// stop flag.
struct Shared {
    snapshot: SharedSnapshot,
    wakers: Vec<OwnedFd>,
    stop: AtomicBool,
    faults: Arc<Faults>,
    /// Each worker's provided buffers out of its ring (held by connections),
    /// stored after every loop turn.
    buffers_out: Vec<std::sync::atomic::AtomicUsize>,
}

/// Running workers.
pub struct DataPlane {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl DataPlane {
    /// Start `config.workers` workers serving from `snapshot`.
    pub fn start(snapshot: SharedSnapshot, config: WorkerConfig) -> io::Result<Self> {
        Self::start_with_faults(snapshot, config, Arc::default())
    }

    /// [`DataPlane::start`], recording workers that fail in `faults`.
    pub fn start_with_faults(
        snapshot: SharedSnapshot,
        config: WorkerConfig,
        faults: Arc<Faults>,
    ) -> io::Result<Self> {
        let n = config.workers.max(1);
        let wakers = (0..n).map(|_| sys::eventfd()).collect::<io::Result<Vec<_>>>()?;
        let buffers_out = (0..n).map(|_| Default::default()).collect();
        let shared = Arc::new(Shared { snapshot, wakers, stop: AtomicBool::new(false), faults, buffers_out });
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut threads = Vec::with_capacity(n);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        for index in 0..n {
            let (shared, config, ready) = (Arc::clone(&shared), config.clone(), ready_tx.clone());
            let pin = config.pin.then_some(index % cpus);
            let thread = std::thread::Builder::new().name(format!("ringport-w{index}")).spawn(move || {
                if let Some(cpu) = pin
                    && let Err(e) = sys::pin_to_cpu(cpu)
                {
                    tracing::warn!(worker = index, cpu, error = %e, "cannot pin worker");
                }
                // The ring is built on its own thread: it is a
                // single-issuer ring, owned by the task that creates it.
                let worker = match worker::Worker::new(index, shared, &config) {
                    Ok(w) => {
                        let _ = ready.send(Ok(()));
                        w
                    }
                    Err(e) => {
                        let _ = ready.send(Err(io::Error::new(
                            e.kind(),
                            format!("worker {index}: io_uring setup: {e}"),
                        )));
                        return Err(e);
                    }
                };
                let faults = Arc::clone(&worker.shared.faults);
                let result = match std::panic::catch_unwind(AssertUnwindSafe(|| worker.run())) {
                    Ok(result) => result,
                    Err(_) => Err(io::Error::other("the worker panicked")),
                };
                if let Err(e) = &result {
                    tracing::error!(worker = index, error = %e, "worker failed; the process will stop");
                    faults.worker_failed();
                }
                result
            })?;
            threads.push(thread);
        }
        drop(ready_tx);
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // Let the workers that did start wind down.
                    shared.stop.store(true, Ordering::Release);
                    shared.wakers.iter().for_each(|w| sys::eventfd_signal(w.as_fd()));
                    return Err(e);
                }
                Err(_) => return Err(io::Error::other("a worker thread died during setup")),
            }
        }
        Ok(Self { shared, threads })
    }

    /// Tell every worker a new snapshot was published.
    pub fn notify(&self) {
        for waker in &self.shared.wakers {
            sys::eventfd_signal(waker.as_fd());
        }
    }

    /// Provided buffers (`--relay ring|auto`) held by connections over all
    /// workers, as of each worker's last loop turn: an idle connection
    /// holds none.
    pub fn buffers_held(&self) -> usize {
        self.shared.buffers_out.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Stop accepting, let open connections drain (up to the drain
    /// timeout), and wait for every worker.
    pub fn stop(self) {
        self.shared.stop.store(true, Ordering::Release);
        self.notify();
        for thread in self.threads {
            match thread.join() {
                Ok(Ok(())) => {}
                // Already logged and recorded by the worker's thread.
                Ok(Err(_)) => {}
                Err(_) => tracing::error!("worker panicked"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_splits_among_workers_adding_up_to_the_total() {
        let config = |workers, max| WorkerConfig { workers, max_connections: max, ..WorkerConfig::default() };
        let shares: Vec<_> = (0..3).map(|i| config(3, Some(10)).connection_cap(i)).collect();
        assert_eq!(shares, [Some(4), Some(3), Some(3)]);
        assert_eq!(config(1, Some(2)).connection_cap(0), Some(2));
        assert_eq!(config(4, None).connection_cap(3), None, "no cap");
    }
}
