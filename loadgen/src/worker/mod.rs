//! One load worker: a single thread driving its share of the connections
//! through its own io_uring [`Ring`].
//!
//! The loop is: fire due timers, start queued transactions, submit and wait
//! (bounded by the next timer), then handle completions. Nothing blocks
//! except that wait, and every run ends by itself: new work stops at the end
//! of the measurement window, and at the hard deadline whatever is still in
//! flight is counted as `aborted` and cancelled.
//!
//! Accounting invariant (see `report`): a transaction started inside the
//! measurement window is counted `attempted` exactly once and then ends in
//! exactly one of `completed` or an error kind. Transactions started during
//! warmup are neither counted nor recorded.

mod flow;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::report::{Counts, ErrorKind, new_histogram};
use crate::schedule::OpenLoop;
use crate::sys::{AddrId, BufId, Completion, OpId, Ring};

/// What the connections of a run do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    TcpCrr,
    TcpRr,
    TcpStream(Direction),
    Idle,
    UdpRr,
}

/// Which way bulk data flows in `tcp-stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Write to a sink.
    Send,
    /// Read from a source.
    Recv,
    /// Write and read at once through an echo server.
    Both,
}

/// The instants bounding a run, shared by every worker.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    pub measure_start: Instant,
    pub measure_end: Instant,
    pub hard_deadline: Instant,
}

/// One worker's share of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub targets: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
    /// Global index of this worker's first connection.
    pub first_conn: usize,
    pub conns: usize,
    pub total_conns: usize,
    pub size: usize,
    /// Total requests per second over all connections (open loop).
    pub rate: Option<f64>,
    /// Most transactions this worker may count.
    pub budget: Option<u64>,
    pub timeout: Duration,
    pub clock: Clock,
}

/// Counters the main thread reads while the run goes (progress, ready file).
#[derive(Debug, Default)]
pub struct Progress {
    pub completed: AtomicU64,
    pub established: AtomicU64,
    /// Connections whose first connect has succeeded or failed (`idle`).
    pub resolved: AtomicU64,
}

/// A worker that could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot set up io_uring")]
    Ring(#[source] io::Error),
    #[error("io_uring submission failed")]
    Submit(#[source] io::Error),
}

/// What one worker measured.
#[derive(Debug)]
pub struct Outcome {
    pub counts: Counts,
    pub hist: Histogram<u64>,
    /// When the last counted transaction completed, if any did.
    pub last_done: Option<Instant>,
}

const TAG_CONNECT: u64 = 0;
const TAG_SEND: u64 = 1;
const TAG_RECV: u64 = 2;
/// At most this many connects in flight per worker (`idle`, `tcp-stream`),
/// so a burst of SYNs does not overflow the target's listen backlog.
const CONNECT_WINDOW: usize = 256;
/// Pause before retrying after a failure that happened without any I/O
/// (e.g. out of file descriptors), so a broken setup cannot spin.
const SYNC_FAILURE_BACKOFF: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    Connecting,
    Sending,
    Receiving,
    Waiting,
    Holding,
    Streaming,
    /// Ops were cancelled (timeout or end of run); waiting for them to end.
    Cancelling,
    Done,
}

struct Conn {
    fd: Option<OwnedFd>,
    addr: AddrId,
    target: SocketAddr,
    source: Option<IpAddr>,
    tx: BufId,
    rx: BufId,
    phase: Phase,
    op: Option<OpId>,
    op2: Option<OpId>,
    sent: usize,
    got: usize,
    origin: Instant,
    counted: bool,
    deadline: Option<Instant>,
    wake: Option<Instant>,
    sched: Option<OpenLoop>,
    timed_out: bool,
    established: bool,
    seq: u64,
}

/// The state of one worker thread.
pub struct Worker {
    plan: Plan,
    ring: Ring,
    conns: Vec<Conn>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    runq: Vec<usize>,
    counts: Counts,
    hist: Histogram<u64>,
    progress: Arc<Progress>,
    started: u64,
    connecting: usize,
    next_connect: usize,
    stopped: bool,
    last_done: Option<Instant>,
}

/// Runs one worker to completion.
pub fn run(plan: Plan, progress: Arc<Progress>) -> Result<Outcome, WorkerError> {
    let entries = (plan.conns * 2 + 64).next_power_of_two().clamp(256, 16_384) as u32;
    let mut w = Worker::new(plan, Ring::new(entries).map_err(WorkerError::Ring)?, progress);
    w.event_loop()?;
    Ok(Outcome {
        counts: w.counts.clone(),
        hist: std::mem::replace(&mut w.hist, new_histogram()),
        last_done: w.last_done,
    })
}

impl Worker {
    fn new(plan: Plan, mut ring: Ring, progress: Arc<Progress>) -> Worker {
        let addr_ids: Vec<AddrId> = plan.targets.iter().map(|t| ring.add_addr(SockAddr::from(*t))).collect();
        let rx_len = match plan.scenario {
            Scenario::UdpRr => 65_536,
            Scenario::Idle => 4096,
            _ => plan.size.clamp(1, 1 << 20),
        };
        let mut conns = Vec::with_capacity(plan.conns);
        for i in 0..plan.conns {
            let index = plan.first_conn + i;
            let t = index % plan.targets.len();
            let tx = ring.alloc_buf(plan.size.max(1));
            for (k, b) in ring.buf_mut(tx).iter_mut().enumerate() {
                *b = (k.wrapping_mul(31).wrapping_add(index) % 251) as u8;
            }
            let sched = plan.rate.map(|r| {
                OpenLoop::new(plan.clock.measure_start - plan.clock.start, r, index, plan.total_conns)
            });
            conns.push(Conn {
                fd: None,
                addr: addr_ids[t],
                target: plan.targets[t],
                source: (!plan.sources.is_empty()).then(|| plan.sources[index % plan.sources.len()]),
                tx,
                rx: ring.alloc_buf(rx_len),
                phase: Phase::Queued,
                op: None,
                op2: None,
                sent: 0,
                got: 0,
                origin: plan.clock.start,
                counted: false,
                deadline: None,
                wake: None,
                sched,
                timed_out: false,
                established: false,
                seq: 0,
            });
        }
        Worker {
            runq: Vec::new(),
            timers: BinaryHeap::new(),
            counts: Counts::default(),
            hist: new_histogram(),
            started: 0,
            connecting: 0,
            next_connect: 0,
            stopped: false,
            last_done: None,
            plan,
            ring,
            conns,
            progress,
        }
    }

    fn event_loop(&mut self) -> Result<(), WorkerError> {
        if matches!(self.plan.scenario, Scenario::TcpCrr | Scenario::TcpRr | Scenario::UdpRr) {
            self.runq.extend((0..self.conns.len()).rev());
        }
        self.fill_connect_window();
        let mut done = Vec::with_capacity(1024);
        loop {
            let now = Instant::now();
            if now >= self.plan.clock.hard_deadline {
                self.abort_in_flight();
                return Ok(());
            }
            if !self.stopped && now >= self.plan.clock.measure_end {
                self.stop(now);
            }
            self.fire_timers(now);
            while let Some(slot) = self.runq.pop() {
                self.begin(slot, Instant::now());
            }
            self.fill_connect_window();
            if self.stopped && self.ring.in_flight() == 0 && self.runq.is_empty() {
                return Ok(());
            }
            let mut until = self.plan.clock.hard_deadline;
            if !self.stopped {
                until = until.min(self.plan.clock.measure_end);
            }
            if let Some(Reverse((t, _))) = self.timers.peek() {
                until = until.min(*t);
            }
            let wait = until.saturating_duration_since(Instant::now());
            if !wait.is_zero() || self.ring.in_flight() > 0 {
                self.ring.wait(wait).map_err(WorkerError::Submit)?;
            }
            self.ring.drain(&mut done);
            let now = Instant::now();
            for c in done.drain(..) {
                self.on_completion(c, now);
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, slot))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let c = &mut self.conns[slot];
            if c.wake.is_some_and(|w| w <= now) && matches!(c.phase, Phase::Waiting | Phase::Queued) {
                c.wake = None;
                self.runq.push(slot);
            } else if c.deadline.is_some_and(|d| d <= now)
                && matches!(c.phase, Phase::Connecting | Phase::Sending | Phase::Receiving)
            {
                c.deadline = None;
                c.timed_out = true;
                self.cancel_ops(slot);
            }
        }
    }

    /// Cancels the slot's ops; its completion handler finishes the job.
    fn cancel_ops(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        c.phase = Phase::Cancelling;
        for op in [c.op, c.op2].into_iter().flatten() {
            // A failed cancel submission only means the op ends on its own.
            let _ = self.ring.cancel(op);
        }
    }

    /// The end of the measurement window: no new transaction starts;
    /// long-lived connections (`idle`, `tcp-stream`) are wound down.
    fn stop(&mut self, now: Instant) {
        self.stopped = true;
        for slot in 0..self.conns.len() {
            let phase = self.conns[slot].phase;
            match phase {
                Phase::Queued | Phase::Waiting => self.finish(slot),
                Phase::Holding | Phase::Streaming => self.cancel_ops(slot),
                _ => {}
            }
        }
        let _ = now;
    }

    fn abort_in_flight(&mut self) {
        for c in &mut self.conns {
            if matches!(c.phase, Phase::Connecting | Phase::Sending | Phase::Receiving | Phase::Cancelling)
                && c.counted
            {
                self.counts.errors.add(ErrorKind::Aborted);
                c.counted = false;
            }
        }
    }

    /// May a new counted transaction start now?
    fn may_start(&self, now: Instant) -> bool {
        !self.stopped
            && now < self.plan.clock.measure_end
            && self.plan.budget.is_none_or(|b| self.started < b)
    }

    fn in_window(&self, now: Instant) -> bool {
        now >= self.plan.clock.measure_start && now < self.plan.clock.measure_end
    }

    fn set_deadline(&mut self, slot: usize, now: Instant) {
        let d = now + self.plan.timeout;
        self.conns[slot].deadline = Some(d);
        self.timers.push(Reverse((d, slot)));
    }

    fn set_wake(&mut self, slot: usize, at: Instant) {
        self.conns[slot].wake = Some(at);
        self.timers.push(Reverse((at, slot)));
    }

    /// Opens a socket for the slot, bound to its source address if any.
    fn open_socket(&self, slot: usize, ty: Type, proto: Protocol) -> io::Result<OwnedFd> {
        let c = &self.conns[slot];
        let sock = Socket::new(Domain::for_address(c.target), ty.cloexec(), Some(proto))?;
        if proto == Protocol::TCP {
            sock.set_tcp_nodelay(true)?;
        }
        if let Some(src) = c.source {
            if src.is_ipv4() && proto == Protocol::TCP {
                crate::sys::set_bind_address_no_port(&sock)?;
            }
            sock.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
        }
        if proto == Protocol::UDP {
            sock.connect(&SockAddr::from(c.target))?;
        }
        Ok(OwnedFd::from(sock))
    }

    /// Records a failure of the slot's current transaction, closes a TCP
    /// connection, and queues the next transaction.
    fn fail(&mut self, slot: usize, kind: ErrorKind, now: Instant) {
        let c = &mut self.conns[slot];
        if c.counted {
            self.counts.errors.add(kind);
            c.counted = false;
        }
        c.deadline = None;
        c.timed_out = false;
        match self.plan.scenario {
            Scenario::Idle | Scenario::TcpStream(_) => {
                if !c.established && self.plan.scenario == Scenario::Idle {
                    self.progress.resolved.fetch_add(1, Ordering::Relaxed);
                }
                c.phase = Phase::Done;
                for op in [c.op, c.op2].into_iter().flatten() {
                    let _ = self.ring.cancel(op);
                }
                if c.op.is_none() && c.op2.is_none() {
                    c.fd = None;
                }
            }
            _ => {
                if self.plan.scenario != Scenario::UdpRr {
                    c.fd = None;
                }
                c.phase = Phase::Queued;
                if self.may_start(now) {
                    self.runq.push(slot);
                } else {
                    self.finish(slot);
                }
            }
        }
    }

    /// The slot will do no more work: close it.
    fn finish(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        c.phase = Phase::Done;
        c.wake = None;
        c.deadline = None;
        if c.op.is_none() && c.op2.is_none() {
            c.fd = None;
        }
    }

    fn on_completion(&mut self, c: Completion, now: Instant) {
        let slot = (c.user >> 3) as usize;
        let tag = c.user & 7;
        {
            let conn = &mut self.conns[slot];
            if tag == TAG_RECV
                && conn.op2.is_some()
                && self.plan.scenario == Scenario::TcpStream(Direction::Both)
            {
                conn.op2 = None;
            } else {
                conn.op = None;
            }
        }
        if tag == TAG_CONNECT {
            self.connecting = self.connecting.saturating_sub(1);
        }
        let (phase, idle) = {
            let conn = &self.conns[slot];
            (conn.phase, conn.op.is_none() && conn.op2.is_none())
        };
        match phase {
            Phase::Cancelling => {
                if !idle {
                    return;
                }
                if self.conns[slot].timed_out {
                    self.fail(slot, ErrorKind::Timeout, now);
                } else {
                    self.wind_down(slot);
                }
            }
            Phase::Done => {
                if idle {
                    self.conns[slot].fd = None;
                }
            }
            _ => self.advance(slot, tag, c.result, now),
        }
    }

    /// A long-lived connection reached the end of the run in good health.
    fn wind_down(&mut self, slot: usize) {
        if self.conns[slot].counted {
            self.counts.completed += 1;
            if self.plan.scenario == Scenario::Idle {
                self.counts.held += 1;
            }
            self.conns[slot].counted = false;
        }
        self.finish(slot);
    }

    /// A failure without I/O (socket creation, a refused submission):
    /// count it, and back off so a persistently broken setup cannot spin.
    fn sync_fail(&mut self, slot: usize, kind: ErrorKind, now: Instant) {
        self.fail(slot, kind, now);
        if self.conns[slot].phase == Phase::Queued {
            self.runq.retain(|s| *s != slot);
            self.set_wake(slot, now + SYNC_FAILURE_BACKOFF);
        }
    }

    fn tag(slot: usize, tag: u64) -> u64 {
        ((slot as u64) << 3) | tag
    }

    fn record_latency(&mut self, slot: usize, now: Instant) {
        let c = &mut self.conns[slot];
        if c.counted {
            let us = now.saturating_duration_since(c.origin).as_micros() as u64;
            self.hist.saturating_record(us);
            self.counts.completed += 1;
            self.progress.completed.fetch_add(1, Ordering::Relaxed);
            self.last_done = Some(now);
            c.counted = false;
        }
    }
}
