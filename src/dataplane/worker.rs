//! One worker: a thread pinned to a core, with its own io_uring, its own
//! listening sockets and its own connections. Workers share nothing but the
//! snapshot (read) and the balancers' atomics.
//!
//! The event loop submits only ops that never block in the kernel (polls,
//! multishot accepts, timeouts, cancels) and makes the actual transfers as
//! non-blocking syscalls when a poll says they can progress. So no op ever
//! parks an io-wq thread, however many connections sit idle.
//!
//! What a connection or flow does next is decided by its I/O-free machine
//! (`machine.rs`, `udp_flow.rs`); the worker runs the actions it asks for
//! (`drive`), and every op reaches the ring through the worker's
//! [`Driver`] (`driver.rs`).
//!
//! Invariants:
//! - A completion's `user_data` is a [`Token`] whose key carries the
//!   object's generation; a connection's slot is freed only on its
//!   machine's `Free`, once none of its ops is in flight, and a completion
//!   for a freed object finds nothing (see `slots.rs`).
//! - At its share of `--max-connections` the worker arms no accept, so new
//!   clients wait in the kernel's backlog; it accepts again below it.
//! - The worker reconciles its listeners with the snapshot whenever it is
//!   woken (see `accept.rs`), and never blocks on the control plane.
//! - A connection that outlives the drain timeout, or stays idle past
//!   `--tcp-idle-timeout`, is reset (RST), never closed with a FIN: a cut-off
//!   transfer must never look complete to either peer.
//! - An error this loop cannot handle ends the worker with that error; the
//!   thread that runs it reports it (see `mod.rs` and `fault.rs`).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, types};
use socket2::SockRef;

use super::conn::{self, Conn, ConnError, Dial};
use super::driver::Driver;
use super::fault::Throttle;
use super::listeners::{self, Accepting};
use super::machine::{Action, Dialed, Dir, HeaderRead, Op};
use super::relay::{Pool, RelayMode};
use super::relay_ring::{RING_BUFFER_BYTES, RING_BUFFERS, Received};
use super::slots::{Key, Slots};
use super::sys::RecvBatch;
use super::token::Token;
use super::udp::Flows;
use super::{Shared, WorkerConfig, sys};
use crate::listen::ListenerId;
use crate::model::{ClientAddr, Protocol};

/// Period of the worker's housekeeping (one timer per worker, never one per
/// connection or packet).
const TICK: Duration = Duration::from_secs(1);
/// A recurring warning (accept failed, out of local resources) is logged at
/// most this often.
const WARN_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Worker {
    pub(super) index: usize,
    /// Declared first: dropped (ending every op) before anything an op
    /// could point to.
    pub(super) driver: Driver,
    pub(super) shared: Arc<Shared>,
    pub(super) listeners: Slots<Accepting>,
    pub(super) by_id: HashMap<ListenerId, Key>,
    /// The snapshot generation the listeners last followed.
    pub(super) followed: u64,
    conns: Slots<Conn>,
    pool: Pool,
    relay: RelayMode,
    /// Ring receives that found no free buffer, re-armed when one returns.
    starved: Vec<(Key, Dir)>,
    /// Timespecs handed to the kernel by pointer: boxed so they never move.
    connect_timeouts: Vec<&'static types::Timespec>,
    pub(super) accept_retry: Vec<&'static types::Timespec>,
    /// The step of `accept_retry` the next failed accept waits.
    pub(super) accept_backoff: usize,
    pub(super) accept_warnings: Throttle,
    local_warnings: Throttle,
    tick: &'static types::Timespec,
    drain_timeout: &'static types::Timespec,
    /// A relayed connection that moves no byte this long is reset.
    idle_timeout: Option<Duration>,
    /// Most connections this worker holds; at the cap it stops accepting.
    pub(super) max_conns: Option<usize>,
    /// At the cap: no accept is armed until a connection is freed.
    pub(super) at_cap: bool,
    cap_warnings: Throttle,
    /// Refused PROXY headers are logged (at debug) at most this often.
    header_logs: Throttle,
    /// Peers that may send a PROXY header (empty: any).
    proxy_trusted: Vec<ipnet::IpNet>,
    /// Fault injection for tests: fail after this many accepted clients.
    fail_after_accepts: Option<u64>,
    accepted: u64,
    /// Directions that yielded with work left, pumped again this turn.
    yielded: Vec<(Key, Dir)>,
    pub(super) stopping: bool,
    pub(super) flows: Flows,
    pub(super) batch: RecvBatch,
}

impl Worker {
    pub(super) fn new(index: usize, shared: Arc<Shared>, config: &WorkerConfig) -> io::Result<Self> {
        Ok(Self {
            index,
            driver: Driver::new(
                config.ring_entries,
                config.relay.uses_ring().then_some((RING_BUFFERS, RING_BUFFER_BYTES)),
            )?,
            shared,
            listeners: Slots::default(),
            by_id: HashMap::new(),
            followed: 0,
            conns: Slots::with_capacity(1024),
            pool: Pool::new(config.relay),
            relay: config.relay,
            starved: Vec::new(),
            connect_timeouts: config.connect_timeouts.iter().map(|d| sys::timespec(*d)).collect(),
            accept_retry: listeners::backoff_timespecs(),
            accept_backoff: 0,
            accept_warnings: Throttle::new(WARN_EVERY),
            local_warnings: Throttle::new(WARN_EVERY),
            // Frequent enough to expire UDP flows and idle connections
            // within half their timeout.
            tick: sys::timespec(
                [Some(TICK), Some(config.udp_timeout / 2), config.tcp_idle_timeout.map(|t| t / 2)]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(TICK)
                    .max(Duration::from_millis(50)),
            ),
            drain_timeout: sys::timespec(config.drain_timeout),
            idle_timeout: config.tcp_idle_timeout,
            max_conns: config.connection_cap(index),
            at_cap: false,
            cap_warnings: Throttle::new(WARN_EVERY),
            header_logs: Throttle::new(WARN_EVERY),
            proxy_trusted: config.proxy_trusted.clone(),
            fail_after_accepts: config.fail_after_accepts,
            accepted: 0,
            yielded: Vec::new(),
            stopping: false,
            flows: Flows::new(config.udp_max_flows / config.workers.max(1), config.udp_timeout),
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
            // Wait only when no direction yielded with work left.
            self.driver.turn(self.yielded.is_empty(), &mut completions)?;
            for &(data, result, flags) in &completions {
                match Token::decode(data) {
                    Some(Token::Drain) => {
                        self.reset_all();
                        return Ok(());
                    }
                    Some(token) => self.complete(token, result, flags)?,
                    None => tracing::error!(data, "completion with an unknown token"),
                }
            }
            for (key, dir) in std::mem::take(&mut self.yielded) {
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.machine.resume(dir);
                    self.drive(key)?;
                }
            }
            if let Some(out) = self.shared.buffers_out.get(self.index) {
                out.store(self.driver.buffers_out(), std::sync::atomic::Ordering::Relaxed);
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
                self.expire_idle_conns()?;
                self.arm_tick()
            }
            Token::Accept(key) => self.on_accept(key, result, cqueue::more(flags)),
            Token::AcceptRetry(key) => self.on_accept_retry(key),
            Token::Conn(key, op) => self.on_conn_op(key, op, result, flags),
            Token::UdpListen(slot) => self.on_udp_listener(slot),
            Token::UdpFlow(key) => self.on_udp_flow(key, result),
            Token::UdpSent(id) => self.on_udp_sent(id, result),
            Token::Cancel | Token::Drain => Ok(()),
        }
    }

    // ---- listeners -------------------------------------------------------

    fn arm_wake(&mut self) -> io::Result<()> {
        self.driver.poll(self.shared.wakers[self.index].as_fd(), libc::POLLIN, Token::Wake)
    }

    fn arm_tick(&mut self) -> io::Result<()> {
        self.driver.timeout(self.tick, Token::Tick)
    }

    // ---- connections -----------------------------------------------------

    pub(super) fn on_client(&mut self, listener_key: Key, client: OwnedFd) -> io::Result<()> {
        self.accepted += 1;
        if self.fail_after_accepts.is_some_and(|n| self.accepted >= n) {
            return Err(io::Error::other(format!(
                "injected fault after {} accepted connections (--fail-worker-after-accepts)",
                self.accepted
            )));
        }
        let Some((listener, role, shared)) =
            self.listeners.get(listener_key).map(|a| (a.id, a.role, a.shared))
        else {
            return Ok(());
        };
        let sock = SockRef::from(&client);
        let Some(peer) = sock.peer_addr().ok().and_then(|a| a.as_socket()) else {
            return Ok(()); // the client is already gone
        };
        // Best effort: a socket without keepalive still relays correctly.
        let _ = conn::tune(SockRef::from(&client));
        let snapshot = self.shared.snapshot.load();
        // A shared proxy port answers only what the rules sent it: the
        // original destination names the service port (one getsockopt and
        // one lookup). Not redirected, or to no service port: reset.
        // A shared port's family is its role's: no getsockname.
        let v6 = role == crate::listen::ListenRole::Proxy6;
        let original = shared.then(|| super::preamble::original_destination(&client, v6)).flatten();
        let routed = match original {
            Some(to) => snapshot.route_to(Protocol::Tcp, to),
            None if shared => None,
            None => snapshot.route(listener).map(|route| (route, role)),
        };
        let Some((route, role)) = routed else {
            if shared {
                snapshot.count_unmatched(self.index);
                tracing::debug!(worker = self.index, client = %peer, to = ?original, "shared proxy port: no service port at this destination; reset");
            }
            let _ = sock.set_linger(Some(Duration::ZERO));
            return Ok(());
        };
        let proxy_protocol = route.port.spec.proxy_protocol;
        // With a PROXY header to come, the client it names is checked and
        // balanced, once it is read.
        let header_first = proxy_protocol.accept.is_some();
        if header_first && !super::preamble::trusted(&self.proxy_trusted, peer.ip()) {
            let counters = route.port.metrics.slot(self.index);
            counters.add(&counters.proxy_headers_refused, 1);
            let refusal = super::preamble::HeaderRefusal::UntrustedPeer(peer.ip());
            log_refused_header(&mut self.header_logs, &route.port.spec.name, peer, &refusal);
            let _ = sock.set_linger(Some(Duration::ZERO));
            return Ok(());
        }
        if !header_first && !crate::snapshot::admits(role, &route.port.spec, peer.ip()) {
            log_outside_ranges(&route.port.spec.name, peer);
            let _ = sock.set_linger(Some(Duration::ZERO));
            return Ok(());
        }
        let client_addr = ClientAddr(peer);
        let now = Instant::now();
        let candidates =
            (!header_first).then(|| route.balancer.pick(client_addr, now, self.connect_timeouts.len()));
        // Only read when a header is sent or received: one syscall fewer
        // otherwise.
        let destination = match proxy_protocol.send.is_some() || header_first {
            true => original.or_else(|| super::preamble::client_destination(&client)),
            false => None,
        };
        let role = match (header_first, destination) {
            (true, Some(to)) => crate::snapshot::header_role(role, &route.port.spec, to.ip()),
            _ => role,
        };
        let mut conn =
            Conn::new(client, client_addr, &route, candidates, self.index, now, self.connect_timeouts.len())
                .relaying_in(self.relay);
        if proxy_protocol != crate::model::ProxyProtocol::default() {
            // Without a destination the socket is gone; the first read or
            // send fails and resets it.
            conn = conn.with_proxy_protocol(role, destination.unwrap_or(peer), now);
        }
        let key = self.conns.insert(conn);
        if self.max_conns.is_some_and(|max| self.conns.len() >= max) {
            self.reach_cap(now)?;
        }
        self.drive(key)
    }

    /// The worker holds its share of `--max-connections`: stop accepting,
    /// so new clients wait in the kernel's backlog rather than being reset.
    fn reach_cap(&mut self, now: Instant) -> io::Result<()> {
        if std::mem::replace(&mut self.at_cap, true) {
            return Ok(());
        }
        if let Some(held_back) = self.cap_warnings.allow(now) {
            tracing::warn!(worker = self.index, max = ?self.max_conns, held_back, "connection cap reached; accepting paused");
        }
        for key in self.listeners.keys() {
            if self
                .listeners
                .get(key)
                .is_some_and(|a| a.armed && a.protocol == Protocol::Tcp && a.fd.is_some())
            {
                self.cancel(Token::Accept(key))?;
            }
        }
        Ok(())
    }

    /// A connection was freed: below the cap again, accept again.
    fn leave_cap(&mut self) -> io::Result<()> {
        if !self.at_cap || self.max_conns.is_some_and(|max| self.conns.len() >= max) {
            return Ok(());
        }
        self.at_cap = false;
        for key in self.listeners.keys() {
            if self.listeners.get(key).is_some_and(|a| !a.armed && a.protocol == Protocol::Tcp) {
                self.arm_accept(key)?;
            }
        }
        Ok(())
    }

    /// Run the actions a connection's machine wants until it wants none:
    /// the one place that turns its decisions into syscalls and SQEs.
    fn drive(&mut self, key: Key) -> io::Result<()> {
        loop {
            let Some(conn) = self.conns.get_mut(key) else { return Ok(()) };
            let Some(action) = conn.machine.poll_action() else { return Ok(()) };
            match action {
                Action::ReadHeader => {
                    let read = conn.read_header(Instant::now()).unwrap_or_else(|e| {
                        log_refused_header(
                            &mut self.header_logs,
                            &conn.port.spec.name,
                            conn.client_addr.0,
                            &e,
                        );
                        HeaderRead::Refused
                    });
                    conn.machine.header_read(read);
                }
                Action::SendPreamble => {
                    let sent = conn.send_preamble(Instant::now());
                    conn.machine.preamble_sent(sent);
                }
                Action::Dial => {
                    let dialed = dial(conn, &mut self.local_warnings, self.index);
                    conn.machine.dialed(dialed);
                }
                Action::ArmConnect { timeout } => {
                    let ts = self.connect_timeouts[usize::from(timeout).min(self.connect_timeouts.len() - 1)];
                    match conn.upstream.as_ref() {
                        Some(fd) => self.driver.connect(fd.as_fd(), ts, key)?,
                        // Cannot happen (a dial in progress has its socket);
                        // if it did, the attempt fails as a timeout would.
                        None => {
                            conn.machine.completed(Op::ConnectTimeout, -libc::ECANCELED);
                            conn.machine.completed(Op::Connect, -libc::ECANCELED);
                        }
                    }
                }
                Action::CheckConnect { timed_out } => {
                    let connected = conn.check_connect(timed_out, Instant::now());
                    conn.machine.connect_checked(connected);
                }
                Action::Connected => conn.attempt_succeeded(Instant::now()),
                Action::ArmPoll(op) => {
                    let events = if matches!(op, Op::Writable(_)) { libc::POLLOUT } else { libc::POLLIN };
                    match conn.poll_fd(op) {
                        Some(fd) => self.driver.poll(fd, events, Token::Conn(key, op))?,
                        // No upstream to watch (cannot happen while
                        // relaying): the poll ends at once, as a hang-up.
                        None => conn.machine.completed(op, libc::POLLHUP as i32),
                    }
                }
                Action::Start(op) => self.start(key, op)?,
                Action::Pump(dir) => {
                    let buffer = self.driver.buffer_size() as usize;
                    let (moved, outcome) = conn.pump(dir, &mut self.pool, buffer);
                    conn.machine.pumped(dir, moved, outcome);
                }
                Action::PumpLater(dir) => self.yielded.push((key, dir)),
                Action::Cancel(op) => self.cancel(Token::Conn(key, op))?,
                Action::Close { reset } => conn.begin_close(reset, &mut self.pool),
                Action::Free => {
                    let mut returned = false;
                    for bid in conn.take_held() {
                        self.driver.give_back(bid);
                        returned = true;
                    }
                    if let Some(conn) = self.conns.remove(key) {
                        let (up, down) = conn.delivered();
                        tracing::trace!(service = %conn.port.spec.name, up, down, "connection closed");
                    }
                    if returned {
                        self.feed_starved()?;
                    }
                    return self.leave_cap();
                }
            }
        }
    }

    fn on_conn_op(&mut self, key: Key, op: Op, result: i32, flags: u32) -> io::Result<()> {
        let bid = cqueue::buffer_select(flags);
        if let Some(bid) = bid {
            self.driver.received(bid);
        }
        let buffer = self.driver.buffer_size() as usize;
        let Some(conn) = self.conns.get_mut(key) else {
            tracing::error!(?key, ?op, "completion for a connection that is gone");
            if let Some(bid) = bid {
                self.driver.give_back(bid);
            }
            return Ok(());
        };
        let mut returned = false;
        match op {
            Op::Recv(dir) => match conn.received(dir, result, bid, buffer) {
                Received::Bytes(_) => {}
                Received::Starved => self.starved.push((key, dir)),
                // A buffer that came with no bytes goes straight back.
                Received::Eof | Received::Nothing | Received::Failed => {
                    if let Some(bid) = bid {
                        self.driver.give_back(bid);
                        returned = true;
                    }
                }
            },
            Op::Send(dir) => {
                if let Some(sent) = conn.sent(dir, result) {
                    self.driver.sent_held(sent.bid);
                    if sent.done {
                        self.driver.give_back(sent.bid);
                        returned = true;
                    }
                }
            }
            _ => {}
        }
        conn.machine.completed_more(op, result, cqueue::more(flags));
        self.drive(key)?;
        if returned { self.feed_starved() } else { Ok(()) }
    }

    /// Submit ring op `op` of connection `key`: a one-shot receive into a
    /// provided buffer, or a send of the direction's first held buffer.
    fn start(&mut self, key: Key, op: Op) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(key) else { return Ok(()) };
        let token = Token::Conn(key, op);
        let submitted = match (op, conn.poll_fd(op)) {
            (Op::Recv(_), Some(fd)) => {
                self.driver.recv(fd, token)?;
                true
            }
            (Op::Send(dir), Some(fd)) => match conn.next_send(dir) {
                Some((bid, range)) => self.driver.send_held(fd, bid, range, token)?,
                None => false,
            },
            _ => false,
        };
        if !submitted {
            // Nothing to do after all (cannot happen while relaying): the op
            // ends at once, as cancelled.
            conn.machine.completed(op, -libc::ECANCELED);
        }
        Ok(())
    }

    /// Buffers went back to the ring: re-arm the receives that found none.
    fn feed_starved(&mut self) -> io::Result<()> {
        for (key, dir) in std::mem::take(&mut self.starved) {
            if let Some(conn) = self.conns.get_mut(key)
                && conn.unstarve(dir)
            {
                conn.machine.resume(dir);
                self.drive(key)?;
            }
        }
        Ok(())
    }

    /// Reset relayed connections that moved no byte for the idle timeout:
    /// an upstream that accepts and never answers cannot hold one forever.
    fn expire_idle_conns(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for key in self.conns.keys() {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            let awaiting_header = conn.machine.awaits_header();
            if !conn.machine.tick(now, self.idle_timeout) {
                continue;
            }
            if awaiting_header {
                let counters = conn.port.metrics.slot(self.index);
                counters.add(&counters.proxy_headers_refused, 1);
                let refusal = super::preamble::HeaderRefusal::TimedOut;
                log_refused_header(&mut self.header_logs, &conn.port.spec.name, conn.client_addr.0, &refusal);
            } else {
                tracing::debug!(service = %conn.port.spec.name, client = %conn.client_addr.0, endpoint = ?conn.endpoint, idle = ?self.idle_timeout, "idle connection reset");
            }
            self.drive(key)?;
        }
        Ok(())
    }

    pub(super) fn cancel(&mut self, target: Token) -> io::Result<()> {
        self.driver.cancel(target)
    }

    // ---- shutdown --------------------------------------------------------

    /// Stop accepting and give open connections the drain timeout to end.
    pub(super) fn begin_stop(&mut self) -> io::Result<()> {
        self.stopping = true;
        self.driver.timeout(self.drain_timeout, Token::Drain)
    }

    /// The drain timeout passed: every connection still open is cut short,
    /// so each will close with RST when the worker drops it.
    fn reset_all(&mut self) {
        if !self.conns.is_empty() {
            tracing::info!(
                worker = self.index,
                connections = self.conns.len(),
                "drain timeout: resetting open connections"
            );
        }
        for conn in self.conns.values_mut() {
            // Only the close itself: the worker ends now, and dropping the
            // ring and then the connections closes every fd with RST.
            conn.machine.reset();
            conn.begin_close(true, &mut self.pool);
        }
    }
}

/// A client outside its Service's loadBalancerSourceRanges was reset
/// (whether its address came from the socket or from a PROXY header).
fn log_outside_ranges(service: &dyn std::fmt::Display, client: std::net::SocketAddr) {
    tracing::debug!(%service, %client, "client outside loadBalancerSourceRanges");
}

/// Log a refused PROXY header: at debug, at most once a second (a flood of
/// bad headers must not flood the log), except a client the header names
/// outside loadBalancerSourceRanges, logged as any other such client.
fn log_refused_header(
    logs: &mut Throttle,
    service: &dyn std::fmt::Display,
    client: std::net::SocketAddr,
    e: &super::preamble::HeaderRefusal,
) {
    if let super::preamble::HeaderRefusal::OutsideSourceRanges(_) = e {
        return log_outside_ranges(service, client);
    }
    if let Some(held_back) = logs.allow(Instant::now()) {
        tracing::debug!(%service, %client, error = %e, held_back, "PROXY header refused; client reset");
    }
}

/// Start a connect to `conn`'s next candidate. When none is left, say why:
/// a shortage of local resources as a rate-limited warning (no endpoint is
/// to blame), a refusal at debug.
fn dial(conn: &mut Conn, local_warnings: &mut Throttle, worker: usize) -> Dialed {
    let now = Instant::now();
    match conn.dial_next(now) {
        Dial::Connected => Dialed::Connected,
        Dial::InProgress { attempt } => Dialed::InProgress { attempt },
        Dial::Exhausted(e) => {
            if let ConnError::Local { .. } = e {
                if let Some(held_back) = local_warnings.allow(now) {
                    tracing::warn!(worker, service = %conn.port.spec.name, error = %e, source = %std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default(), held_back, "out of local resources; connection reset, endpoint not blamed");
                }
            } else {
                tracing::debug!(service = %conn.port.spec.name, client = %conn.client_addr.0, error = %e, "connection refused to client");
            }
            Dialed::Exhausted
        }
    }
}
