//! One worker: a thread pinned to a core, with its own io_uring, its own
//! listening sockets and its own connections. Workers share nothing but the
//! snapshot (read) and the balancers' atomics.
//!
//! The event loop submits only ops that never block in the kernel (polls,
//! multishot accepts, timeouts, cancels) and makes the actual transfers as
//! non-blocking syscalls when a poll says they can progress. So no op ever
//! parks an io-wq thread, however many connections sit idle.
//!
//! Invariants:
//! - A completion's `user_data` is a [`Token`]; a connection's slab slot is
//!   freed only once none of its ops is in flight (see `conn.rs`).
//! - The worker reconciles its listeners with the snapshot whenever it is
//!   woken, and never blocks on the control plane.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, types};
use slab::Slab;
use socket2::SockRef;

use super::conn::{Conn, Dial, Dir, Op, Phase};
use super::listen::{self, ListenRole, ListenerId};
use super::relay::{Pool, Wait};
use super::sys::RecvBatch;
use super::udp::Flows;
use super::udp_worker::SendTag;
use super::{Shared, WorkerConfig, sys};
use crate::model::ClientAddr;
use crate::model::Protocol;

/// What a completion belongs to: `kind << 56 | key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Token {
    Wake,
    Tick,
    Drain,
    Cancel,
    Accept(usize),
    AcceptRetry(usize),
    Conn(usize, Op),
    /// A UDP listening socket is readable.
    UdpListen(usize),
    /// A UDP flow's endpoint socket is readable.
    UdpFlow(usize),
    /// A datagram to an endpoint was sent.
    UdpSent(usize),
}

impl Token {
    pub(super) fn encode(self) -> u64 {
        let (kind, key): (u64, usize) = match self {
            Token::Wake => (1, 0),
            Token::Tick => (6, 0),
            Token::Drain => (2, 0),
            Token::Cancel => (3, 0),
            Token::Accept(k) => (4, k),
            Token::AcceptRetry(k) => (5, k),
            Token::Conn(k, op) => (8 + op_index(op), k),
            Token::UdpListen(k) => (20, k),
            Token::UdpFlow(k) => (21, k),
            Token::UdpSent(k) => (22, k),
        };
        kind << 56 | key as u64
    }

    fn decode(v: u64) -> Option<Token> {
        let key = (v & ((1 << 56) - 1)) as usize;
        Some(match v >> 56 {
            1 => Token::Wake,
            2 => Token::Drain,
            3 => Token::Cancel,
            4 => Token::Accept(key),
            5 => Token::AcceptRetry(key),
            6 => Token::Tick,
            k @ 8..=13 => Token::Conn(key, Op::ALL[(k - 8) as usize]),
            20 => Token::UdpListen(key),
            21 => Token::UdpFlow(key),
            22 => Token::UdpSent(key),
            _ => return None,
        })
    }
}

fn op_index(op: Op) -> u64 {
    Op::ALL.iter().position(|o| *o == op).unwrap_or(0) as u64
}

/// A listening socket this worker accepts on (TCP) or receives on (UDP).
pub(super) struct Accepting {
    pub(super) id: ListenerId,
    pub(super) role: ListenRole,
    pub(super) protocol: Protocol,
    /// `None` once the listener left the snapshot: its accept is being
    /// cancelled, and the slot is freed when that completes.
    pub(super) fd: Option<OwnedFd>,
    /// Not listening, because its service port has no usable endpoint:
    /// the kernel refuses connections at once, and the port stays bound.
    /// (TCP only: a UDP socket is never paused.)
    paused: bool,
    /// A multishot accept (TCP) or a readable poll (UDP) is in flight.
    pub(super) armed: bool,
}

/// Delay before re-arming an accept that failed for lack of fds.
const ACCEPT_RETRY: Duration = Duration::from_millis(20);
/// Period of the worker's housekeeping (one timer per worker, never one per
/// connection or packet).
const TICK: Duration = Duration::from_secs(1);

pub(super) struct Worker {
    pub(super) index: usize,
    pub(super) ring: IoUring,
    pub(super) shared: Arc<Shared>,
    pub(super) listeners: Slab<Accepting>,
    by_id: HashMap<ListenerId, usize>,
    conns: Slab<Conn>,
    pool: Pool,
    /// Timespecs handed to the kernel by pointer: boxed so they never move.
    connect_timeouts: Vec<&'static types::Timespec>,
    accept_retry: &'static types::Timespec,
    tick: &'static types::Timespec,
    drain_timeout: &'static types::Timespec,
    /// Directions that yielded with work left, pumped again this turn.
    yielded: Vec<(usize, Dir)>,
    stopping: bool,
    pub(super) flows: Flows,
    /// Datagrams on their way to endpoints, owned until their send
    /// completes. Declared after `ring`, so the ring is dropped first.
    pub(super) sends: sys::Sends<SendTag>,
    pub(super) batch: RecvBatch,
}

impl Worker {
    pub(super) fn new(index: usize, shared: Arc<Shared>, config: &WorkerConfig) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(config.ring_entries * 4)
            .build(config.ring_entries)?;
        Ok(Self {
            index,
            ring,
            shared,
            listeners: Slab::new(),
            by_id: HashMap::new(),
            conns: Slab::with_capacity(1024),
            pool: Pool::new(config.relay),
            connect_timeouts: config.connect_timeouts.iter().map(|d| sys::timespec(*d)).collect(),
            accept_retry: sys::timespec(ACCEPT_RETRY),
            // Frequent enough to expire UDP flows within half a timeout.
            tick: sys::timespec(TICK.min(config.udp_timeout / 2).max(Duration::from_millis(50))),
            drain_timeout: sys::timespec(config.drain_timeout),
            yielded: Vec::new(),
            stopping: false,
            flows: Flows::new(config.udp_max_flows / config.workers.max(1), config.udp_timeout),
            sends: sys::Sends::default(),
            batch: RecvBatch::new(),
        })
    }

    /// Serve until told to stop and drained (or the drain timeout passes).
    pub(super) fn run(mut self) -> io::Result<()> {
        self.arm_wake()?;
        self.arm_tick()?;
        self.reconcile()?;
        let mut completions: Vec<(u64, i32, u32)> = Vec::with_capacity(256);
        loop {
            if self.stopping && self.conns.is_empty() && self.listeners.is_empty() {
                return Ok(());
            }
            let wait = if self.yielded.is_empty() { 1 } else { 0 };
            match self.ring.submit_and_wait(wait) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            completions.clear();
            completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
            for &(data, result, flags) in &completions {
                match Token::decode(data) {
                    Some(Token::Drain) => return Ok(()),
                    Some(token) => self.complete(token, result, flags)?,
                    None => tracing::error!(data, "completion with an unknown token"),
                }
            }
            for (key, dir) in std::mem::take(&mut self.yielded) {
                self.pump(key, dir)?;
            }
        }
    }

    fn complete(&mut self, token: Token, result: i32, flags: u32) -> io::Result<()> {
        match token {
            Token::Wake => {
                sys::eventfd_drain(self.shared.wakers[self.index].as_fd());
                self.arm_wake()?;
                self.reconcile()
            }
            Token::Tick => {
                self.pool.trim();
                self.expire_flows()?;
                self.arm_tick()
            }
            Token::Accept(slot) => self.on_accept(slot, result, cqueue::more(flags)),
            Token::AcceptRetry(slot) => self.arm_accept(slot),
            Token::Conn(key, op) => self.on_conn_op(key, op, result),
            Token::UdpListen(slot) => self.on_udp_listener(slot),
            Token::UdpFlow(key) => self.on_udp_flow(key, result),
            Token::UdpSent(id) => self.on_udp_sent(id, result),
            Token::Cancel | Token::Drain => Ok(()),
        }
    }

    // ---- listeners -------------------------------------------------------

    fn arm_wake(&mut self) -> io::Result<()> {
        let fd = self.shared.wakers[self.index].as_raw_fd();
        sys::poll(&mut self.ring, fd, libc::POLLIN, Token::Wake.encode())
    }

    fn arm_tick(&mut self) -> io::Result<()> {
        sys::timeout(&mut self.ring, self.tick, Token::Tick.encode())
    }

    /// Bring this worker's accepting sockets in line with the snapshot:
    /// take new listeners, drop those that left, and pause (resume) those
    /// whose service port has no (again has a) usable endpoint.
    fn reconcile(&mut self) -> io::Result<()> {
        if self.shared.stop.load(Ordering::Acquire) && !self.stopping {
            self.begin_stop()?;
        }
        let snapshot = self.shared.snapshot.load_full();
        let wanted: HashMap<ListenerId, bool> = if self.stopping {
            HashMap::new()
        } else {
            // A UDP socket is never paused: datagrams without an endpoint
            // are dropped and counted.
            let serving = |id| snapshot.route(id).is_some_and(|r| !r.balancer.is_empty());
            snapshot
                .listeners
                .iter()
                .map(|l| (l.id, l.key.protocol == Protocol::Udp || serving(l.id)))
                .collect()
        };
        let slots: Vec<usize> = self.listeners.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            let a = &mut self.listeners[slot];
            let Some(fd) = a.fd.as_ref() else { continue };
            match wanted.get(&a.id) {
                None => {
                    a.fd = None;
                    let token = match a.protocol {
                        Protocol::Tcp => Token::Accept(slot),
                        Protocol::Udp => Token::UdpListen(slot),
                    };
                    if a.armed {
                        self.cancel(token)?;
                    } else {
                        self.forget_listener(slot)?;
                    }
                }
                Some(false) if !a.paused => {
                    // shutdown(SHUT_RD) stops a listening socket but keeps
                    // its port; listen() later resumes it on the same port.
                    let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Read);
                    a.paused = true;
                    if a.armed {
                        self.cancel(Token::Accept(slot))?;
                    }
                }
                Some(true) if a.paused => {
                    if let Err(e) = SockRef::from(fd).listen(listen::BACKLOG) {
                        tracing::error!(worker = self.index, error = %e, "cannot resume listening");
                        continue;
                    }
                    a.paused = false;
                    if !a.armed {
                        self.arm_accept(slot)?;
                    }
                }
                Some(_) => {}
            }
        }
        for listener in &snapshot.listeners {
            let Some(&serving) = wanted.get(&listener.id) else { continue };
            if self.by_id.contains_key(&listener.id) {
                continue;
            }
            if let Some(fd) = listener.take_socket(self.index) {
                if !serving {
                    let _ = SockRef::from(&fd).shutdown(std::net::Shutdown::Read);
                }
                let protocol = listener.key.protocol;
                let a = Accepting {
                    id: listener.id,
                    role: listener.key.role,
                    protocol,
                    fd: Some(fd),
                    paused: !serving,
                    armed: false,
                };
                let slot = self.listeners.insert(a);
                self.by_id.insert(listener.id, slot);
                match protocol {
                    Protocol::Udp => self.arm_udp_listener(slot)?,
                    Protocol::Tcp if serving => self.arm_accept(slot)?,
                    Protocol::Tcp => {}
                }
            }
        }
        self.reconcile_flows(&snapshot)
    }

    fn arm_accept(&mut self, slot: usize) -> io::Result<()> {
        let Some(a) = self.listeners.get_mut(slot) else { return Ok(()) };
        let Some(fd) = a.fd.as_ref().map(|fd| fd.as_raw_fd()) else {
            return self.forget_listener(slot);
        };
        if a.paused {
            return Ok(());
        }
        a.armed = true;
        sys::accept_multi(&mut self.ring, fd, Token::Accept(slot).encode())
    }

    pub(super) fn forget_listener(&mut self, slot: usize) -> io::Result<()> {
        if let Some(a) = self.listeners.try_remove(slot) {
            self.by_id.remove(&a.id);
        }
        Ok(())
    }

    fn on_accept(&mut self, slot: usize, result: i32, more: bool) -> io::Result<()> {
        let Some(a) = self.listeners.get_mut(slot) else { return Ok(()) };
        let open = a.fd.is_some() && !a.paused;
        if !more {
            a.armed = false;
        }
        if let Some(client) = sys::accepted(result) {
            if open {
                self.on_client(slot, client)?;
            }
        } else if open && result != -libc::ECANCELED {
            let e = io::Error::from_raw_os_error(-result);
            tracing::warn!(worker = self.index, error = %e, "accept failed");
            if !more {
                return sys::timeout(&mut self.ring, self.accept_retry, Token::AcceptRetry(slot).encode());
            }
        }
        if more {
            return Ok(());
        }
        match self.listeners.get(slot) {
            Some(a) if a.fd.is_none() => self.forget_listener(slot),
            Some(a) if !a.paused => self.arm_accept(slot),
            _ => Ok(()),
        }
    }

    // ---- connections -----------------------------------------------------

    fn on_client(&mut self, slot: usize, client: OwnedFd) -> io::Result<()> {
        let Some((listener, role)) = self.listeners.get(slot).map(|a| (a.id, a.role)) else { return Ok(()) };
        let sock = SockRef::from(&client);
        let Some(peer) = sock.peer_addr().ok().and_then(|a| a.as_socket()) else {
            return Ok(()); // the client is already gone
        };
        let _ = sock.set_tcp_nodelay(true);
        let snapshot = self.shared.snapshot.load();
        let Some(route) = snapshot.route(listener) else {
            let _ = sock.set_linger(Some(Duration::ZERO));
            return Ok(());
        };
        let ranges = &route.port.spec.load_balancer_source_ranges;
        if matches!(role, ListenRole::LoadBalancer(_))
            && !ranges.is_empty()
            && !ranges.iter().any(|r| r.contains(&peer.ip()))
        {
            tracing::debug!(service = %route.port.spec.name, client = %peer, "client outside loadBalancerSourceRanges");
            let _ = sock.set_linger(Some(Duration::ZERO));
            return Ok(());
        }
        let client_addr = ClientAddr(peer);
        let now = Instant::now();
        let candidates = route.balancer.pick(client_addr, now, self.connect_timeouts.len());
        let conn = Conn::new(
            client,
            client_addr,
            Arc::clone(route.port),
            Arc::clone(route.balancer),
            candidates,
            self.index,
            now,
        );
        let key = self.conns.insert(conn);
        self.dial(key, now)
    }

    fn dial(&mut self, key: usize, now: Instant) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(key) else { return Ok(()) };
        match conn.dial_next(now) {
            Dial::Connected => self.start_relay(key),
            Dial::InProgress { attempt } => {
                let fd = conn.upstream.as_ref().map(|u| u.as_raw_fd()).unwrap_or(-1);
                let timeout = self.connect_timeouts[attempt.min(self.connect_timeouts.len() - 1)];
                conn.arm(Op::Connect);
                conn.arm(Op::ConnectTimeout);
                let (poll, limit) = (Token::Conn(key, Op::Connect), Token::Conn(key, Op::ConnectTimeout));
                sys::poll_with_timeout(
                    &mut self.ring,
                    fd,
                    libc::POLLOUT,
                    poll.encode(),
                    timeout,
                    limit.encode(),
                )
            }
            Dial::Exhausted(e) => {
                tracing::debug!(service = %conn.port.spec.name, client = %conn.client_addr.0, error = %e, "connection refused to client");
                self.close(key, true)
            }
        }
    }

    fn on_conn_op(&mut self, key: usize, op: Op, result: i32) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(key) else {
            tracing::error!(key, ?op, "completion for a connection that is gone");
            return Ok(());
        };
        conn.disarm(op);
        if conn.phase == Phase::Closing {
            return self.finish_close(key);
        }
        match op {
            Op::ConnectTimeout => Ok(()),
            Op::Connect => {
                let outcome = if result == -libc::ECANCELED {
                    Err(io::Error::from(io::ErrorKind::TimedOut))
                } else {
                    conn.connect_result()
                };
                let now = Instant::now();
                match outcome {
                    Ok(()) => self.start_relay(key),
                    Err(e) => {
                        conn.attempt_failed(e, now);
                        self.dial(key, now)
                    }
                }
            }
            Op::Readable(dir) | Op::Writable(dir) => self.pump(key, dir),
        }
    }

    fn start_relay(&mut self, key: usize) -> io::Result<()> {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.phase = Phase::Relaying;
            conn.attempt_succeeded(Instant::now());
        }
        self.pump(key, Dir::Up)?;
        self.pump(key, Dir::Down)
    }

    fn pump(&mut self, key: usize, dir: Dir) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(key) else {
            return Ok(());
        };
        if conn.phase != Phase::Relaying {
            return Ok(());
        }
        match conn.pump(dir, &mut self.pool) {
            Ok(Wait::SourceReadable) => self.arm_poll(key, Op::Readable(dir), libc::POLLIN),
            Ok(Wait::SinkWritable) => self.arm_poll(key, Op::Writable(dir), libc::POLLOUT),
            Ok(Wait::Yield) => {
                self.yielded.push((key, dir));
                Ok(())
            }
            Ok(Wait::Finished) if conn.both_finished() => self.close(key, false),
            Ok(Wait::Finished) => Ok(()),
            Err(e) => {
                tracing::debug!(service = %conn.port.spec.name, ?dir, error = %e, source = %e.source, "connection reset");
                self.close(key, true)
            }
        }
    }

    fn arm_poll(&mut self, key: usize, op: Op, events: i16) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(key) else {
            return Ok(());
        };
        if conn.is_armed(op) {
            return Ok(());
        }
        let Some(fd) = conn.poll_fd(op).map(|fd| fd.as_raw_fd()) else {
            return Ok(());
        };
        conn.arm(op);
        sys::poll(&mut self.ring, fd, events, Token::Conn(key, op).encode())
    }

    /// Close a connection: cancel its in-flight ops, then free it.
    fn close(&mut self, key: usize, reset: bool) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(key) else {
            return Ok(());
        };
        conn.begin_close(reset, &mut self.pool);
        let armed: Vec<Op> = Op::ALL.into_iter().filter(|op| conn.is_armed(*op)).collect();
        for op in armed {
            // The linked timeout goes with its poll.
            if op != Op::ConnectTimeout {
                self.cancel(Token::Conn(key, op))?;
            }
        }
        self.finish_close(key)
    }

    fn finish_close(&mut self, key: usize) -> io::Result<()> {
        if self.conns.get(key).is_some_and(|c| c.phase == Phase::Closing && !c.in_flight()) {
            let conn = self.conns.remove(key);
            let (up, down) = conn.delivered();
            tracing::trace!(service = %conn.port.spec.name, up, down, "connection closed");
        }
        Ok(())
    }

    pub(super) fn cancel(&mut self, target: Token) -> io::Result<()> {
        sys::cancel(&mut self.ring, target.encode(), Token::Cancel.encode())
    }

    // ---- shutdown --------------------------------------------------------

    /// Stop accepting and give open connections the drain timeout to end.
    fn begin_stop(&mut self) -> io::Result<()> {
        self.stopping = true;
        sys::timeout(&mut self.ring, self.drain_timeout, Token::Drain.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let tokens = [
            Token::Wake,
            Token::Tick,
            Token::Drain,
            Token::Cancel,
            Token::Accept(7),
            Token::AcceptRetry(9),
            Token::Conn(123_456, Op::Connect),
            Token::Conn(1, Op::ConnectTimeout),
            Token::Conn(2, Op::Readable(Dir::Down)),
            Token::Conn(3, Op::Writable(Dir::Up)),
            Token::UdpListen(4),
            Token::UdpFlow(5),
            Token::UdpSent(6),
        ];
        for t in tokens {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
    }
}
