//! The state of one proxied TCP connection, from accept to close.
//!
//! A connection first *connects*: it walks the candidates its balancer
//! picked, one non-blocking connect at a time, each bounded by a timeout
//! (the worker arms a poll linked to a timeout). It then *relays*: two
//! [`Half`]s move the bytes, one per direction, until both have forwarded
//! end of file. Any failure before a byte has flowed moves on to the next
//! candidate; any failure after resets both sides.
//!
//! What happens when is decided by the connection's I/O-free [`Machine`]
//! (`machine.rs`); this file holds what it acts on: the sockets, the
//! balancer's bookkeeping, the counters and the two relay halves.
//!
//! Invariants:
//! - The machine counts every io_uring op in flight for this connection;
//!   the worker removes the connection (closing its fds) only on the
//!   machine's `Free`, so no completion ever refers to a recycled slot.
//! - Both sockets are non-blocking, `TCP_NODELAY`, and run TCP keepalive
//!   ([`tune`]), so a peer that vanished without a FIN or RST is found.
//! - A failure is classified where it is created ([`Blame`]): only the
//!   endpoint's own failures reach passive health; a shortage of local fds or
//!   ports ends the connection without blaming anyone.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{SockRef, Socket, Type};

use super::fault::Blame;
pub use super::machine::{Dir, Op};
use super::machine::{HeaderRead, Machine, PreambleSent, Preambles, Pumped};
use super::preamble::{self, HeaderRefusal, Inbound};
use super::relay::{End, Half, Pool, PumpCtx, RelayError, RelayMode, Wait};
use super::relay_ring::{Received, Sent};
use super::upstream;
use crate::balance::{Balancer, Candidates};
use crate::listen::ListenRole;
use crate::model::{ClientAddr, EndpointAddr, ProxyVersion};
use crate::proxy_protocol::{self, Transport};
use crate::snapshot::{PortState, Route};
use crate::source_ip::Decision;

/// Why a connection could not be connected (for logs).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("no endpoint to connect to")]
    NoEndpoint,
    #[error("every endpoint attempt failed; last {endpoint}")]
    ConnectFailed {
        endpoint: EndpointAddr,
        #[source]
        source: io::Error,
    },
    /// This host ran out of fds, buffers or local ports: no endpoint is to
    /// blame, and no other would fare better now.
    #[error("no local resources for a connection to {endpoint}")]
    Local {
        endpoint: EndpointAddr,
        #[source]
        source: io::Error,
    },
}

/// Keepalive on both sockets of a connection: probes after 15 s of silence,
/// every 15 s, 9 of them. These are Go's `net` defaults, which the
/// userspace kube-proxy ran with on both its accepted and dialed sockets; a
/// dead peer is found in under 2.5 minutes.
pub const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(15))
    .with_interval(Duration::from_secs(15))
    .with_retries(9);

/// Options every proxied TCP socket gets, on either side.
pub fn tune(socket: SockRef<'_>) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&KEEPALIVE)
}

pub struct Conn {
    pub client: OwnedFd,
    pub client_addr: ClientAddr,
    pub upstream: Option<OwnedFd>,
    pub port: Arc<PortState>,
    /// The balancer of the listener's traffic scope.
    balancer: Arc<Balancer>,
    /// `None` until the client's PROXY header is read (on ports that
    /// accept one), since its address picks them.
    candidates: Option<Candidates>,
    /// The candidate being tried, or connected to.
    current: Option<usize>,
    /// Whether `current` counts this connection as active.
    counted: bool,
    last_error: Option<io::Error>,
    /// This connection's worker: the counter slot it writes.
    worker: usize,
    accepted_at: Instant,
    pub endpoint: Option<EndpointAddr>,
    /// What happens next, and which ops are in flight.
    pub machine: Machine,
    halves: [Half; 2],
    /// A failure that was this host's, not the endpoint's: dialing stops.
    local_failure: Option<io::Error>,
    /// Whose address the current attempt's socket has (counted once
    /// connected).
    source: crate::source_ip::Source,
    connect_timeouts: usize,
    /// The PROXY protocol steps of this connection, if any.
    proxy: Option<Box<Proxied>>,
}

/// A connection's PROXY protocol state.
struct Proxied {
    /// Which listener accepted it: source ranges are checked against the
    /// client the header names.
    role: ListenRole,
    /// The header still being read from the client.
    inbound: Option<Box<Inbound>>,
    /// The header each endpoint gets, and how much of it the current one took.
    send: Option<ProxyVersion>,
    sent: usize,
    /// Where the client connected (the header's destination).
    destination: std::net::SocketAddr,
    /// Whether the client's address came from the header: anyone could
    /// write any address there, so it is never a transparent source.
    named_client: bool,
}

/// What to do after trying to open the next upstream connection.
pub enum Dial {
    /// Connected at once; start relaying.
    Connected,
    /// In progress; poll it for writable, with the timeout of this attempt.
    InProgress { attempt: usize },
    /// No candidate is left.
    Exhausted(ConnError),
}

impl Conn {
    pub fn new(
        client: OwnedFd,
        client_addr: ClientAddr,
        route: &Route<'_>,
        candidates: Option<Candidates>,
        worker: usize,
        now: Instant,
        connect_timeouts: usize,
    ) -> Self {
        let (port, balancer) = (Arc::clone(route.port), Arc::clone(route.balancer));
        let counters = port.metrics.slot(worker);
        counters.add(&counters.accepted, 1);
        Self {
            client,
            client_addr,
            upstream: None,
            port,
            balancer,
            candidates,
            current: None,
            counted: false,
            last_error: None,
            worker,
            accepted_at: now,
            endpoint: None,
            machine: Machine::new(now, connect_timeouts),
            halves: [Half::default(), Half::default()],
            local_failure: None,
            source: crate::source_ip::Source::Proxy(None),
            connect_timeouts,
            proxy: None,
        }
    }

    /// Give this connection its Service's PROXY protocol steps: read a
    /// header from the client first (the candidates are picked after it),
    /// and write one to each endpoint. `destination`: where the client
    /// connected, as the header sent onward names it.
    pub fn with_proxy_protocol(
        mut self,
        role: ListenRole,
        destination: std::net::SocketAddr,
        now: Instant,
    ) -> Self {
        let pp = self.port.spec.proxy_protocol;
        let inbound = pp.accept.map(Inbound::new);
        let preambles = Preambles { accept: inbound.is_some(), send: pp.send.is_some() };
        if preambles != Preambles::default() {
            self.machine = Machine::with_preambles(now, self.connect_timeouts, preambles);
            self.proxy = Some(Box::new(Proxied {
                role,
                inbound,
                send: pp.send,
                sent: 0,
                destination,
                named_client: false,
            }));
        }
        self
    }

    /// Read what has arrived of the client's PROXY header. Once whole, its
    /// addresses stand for the client's from then on (affinity, source
    /// ranges, the header sent onward; LOCAL and UNKNOWN keep the
    /// connection's own) and the candidates are picked.
    pub fn read_header(&mut self, now: Instant) -> Result<HeaderRead, HeaderRefusal> {
        let proxy = self.proxy.as_mut().ok_or(HeaderRefusal::NotAwaited)?;
        let inbound = proxy.inbound.as_mut().ok_or(HeaderRefusal::NotAwaited)?;
        let header = match inbound.read(self.client.as_fd()) {
            Ok(None) => return Ok(HeaderRead::More),
            Ok(Some(header)) => header,
            Err(e) => {
                let counters = self.port.metrics.slot(self.worker);
                counters.add(&counters.proxy_headers_refused, 1);
                return Err(e);
            }
        };
        proxy.inbound = None;
        if let Some(addresses) = header.addresses {
            self.client_addr = ClientAddr(addresses.source);
            proxy.destination = addresses.destination;
            proxy.named_client = true;
        }
        let client = self.client_addr.0.ip();
        if !crate::snapshot::admits(proxy.role, &self.port.spec, client) {
            let counters = self.port.metrics.slot(self.worker);
            counters.add(&counters.proxy_headers_refused, 1);
            return Err(HeaderRefusal::OutsideSourceRanges(client));
        }
        self.candidates = Some(self.balancer.pick(self.client_addr, now, self.connect_timeouts));
        Ok(HeaderRead::Done)
    }

    /// Write (the rest of) the PROXY header to the connected endpoint. A
    /// failure counts against the endpoint, which is then skipped.
    pub fn send_preamble(&mut self, now: Instant) -> PreambleSent {
        let (Some(proxy), Some(upstream)) = (self.proxy.as_mut(), self.upstream.as_ref()) else {
            return PreambleSent::All;
        };
        let Some(version) = proxy.send else { return PreambleSent::All };
        let header =
            proxy_protocol::encode(version, Transport::Stream, self.client_addr.0, proxy.destination);
        match preamble::send(upstream, header.as_bytes(), proxy.sent) {
            Ok(sent) => {
                proxy.sent = sent;
                if sent >= header.as_bytes().len() { PreambleSent::All } else { PreambleSent::Partial }
            }
            Err(e) => {
                self.attempt_failed(e, now);
                PreambleSent::Failed
            }
        }
    }

    /// Relay in `mode` (splice unless said).
    pub fn relaying_in(mut self, mode: RelayMode) -> Self {
        self.halves = [Half::new(mode), Half::new(mode)];
        self
    }

    /// Start a non-blocking connect to the next candidate, skipping (and
    /// recording) those that fail at once.
    pub fn dial_next(&mut self, now: Instant) -> Dial {
        self.upstream = None;
        if let Some(proxy) = self.proxy.as_mut() {
            proxy.sent = 0;
        }
        loop {
            if let Some(source) = self.local_failure.take() {
                let counters = self.port.metrics.slot(self.worker);
                counters.add(&counters.refused, 1);
                return Dial::Exhausted(match self.endpoint {
                    Some(endpoint) => ConnError::Local { endpoint, source },
                    None => ConnError::NoEndpoint,
                });
            }
            let next = self.candidates.as_mut().and_then(|c| self.balancer.next_candidate(c, now));
            let Some(i) = next else {
                let counters = self.port.metrics.slot(self.worker);
                counters.add(&counters.refused, 1);
                return Dial::Exhausted(match (self.endpoint, self.last_error.take()) {
                    (Some(endpoint), Some(source)) => ConnError::ConnectFailed { endpoint, source },
                    _ => ConnError::NoEndpoint,
                });
            };
            let Some(endpoint) = self.balancer.endpoint(i) else { continue };
            self.endpoint = Some(endpoint);
            // The socket first: failing to make one is this host's fault,
            // and must not count as an attempt on the endpoint.
            let from_header = self.proxy.as_ref().is_some_and(|p| p.named_client);
            let decision = self.port.source.decide(endpoint, self.client_addr, from_header);
            let socket = match new_socket(endpoint.0, decision) {
                Ok((socket, source)) => {
                    self.source = source;
                    socket
                }
                Err(e) => {
                    self.local_failure = Some(e);
                    continue;
                }
            };
            self.current = Some(i);
            self.balancer.attempting(i);
            let attempts = self.candidates.as_ref().map_or(0, Candidates::attempts);
            if attempts > 1 {
                let counters = self.port.metrics.slot(self.worker);
                counters.add(&counters.retries, 1);
            }
            match start_connect(&socket, endpoint.0) {
                Ok(done) => {
                    self.upstream = Some(socket.into());
                    return if done {
                        Dial::Connected
                    } else {
                        Dial::InProgress { attempt: attempts.saturating_sub(1) }
                    };
                }
                Err(e) => self.attempt_failed(e, now),
            }
        }
    }

    /// The current attempt failed. An endpoint's failure goes to passive
    /// health and affinity; a local one (no fds, no ephemeral port) stops
    /// dialing without blaming the endpoint.
    pub fn attempt_failed(&mut self, error: io::Error, now: Instant) {
        if Blame::of_connect(&error) == Blame::Local {
            self.current = None;
            self.local_failure = Some(error);
            return;
        }
        if let Some(i) = self.current.take() {
            let counters = self.port.metrics.slot(self.worker);
            counters.add(&counters.connect_failures, 1);
            tracing::debug!(service = %self.port.spec.name, endpoint = ?self.endpoint, error = %error, "connect failed");
            if self.balancer.failed(self.client_addr, i, now) {
                counters.add(&counters.ejections, 1);
                tracing::warn!(service = %self.port.spec.name, endpoint = ?self.endpoint, "endpoint ejected after consecutive connect failures");
            }
        }
        self.last_error = Some(error);
    }

    /// The current attempt connected: it counts as active until release.
    pub fn attempt_succeeded(&mut self, now: Instant) {
        if let Some(i) = self.current {
            if self.balancer.connected(self.client_addr, i, now) {
                let counters = self.port.metrics.slot(self.worker);
                counters.add(&counters.readmissions, 1);
            }
            self.counted = true;
            let counters = self.port.metrics.slot(self.worker);
            counters.connect_duration.observe(now.saturating_duration_since(self.accepted_at));
            counters.source(self.source);
        }
    }

    /// The connection is gone: stop counting it as active.
    pub fn release(&mut self) {
        if let (true, Some(i)) = (std::mem::take(&mut self.counted), self.current) {
            self.balancer.closed(i);
        }
    }

    /// Whether the attempt whose poll completed connected (`timed_out`:
    /// its timeout fired). A failure is counted against the endpoint, or
    /// as local, where it is found.
    pub fn check_connect(&mut self, timed_out: bool, now: Instant) -> bool {
        let outcome =
            if timed_out { Err(io::Error::from(io::ErrorKind::TimedOut)) } else { self.connect_result() };
        match outcome {
            Ok(()) => true,
            Err(e) => {
                self.attempt_failed(e, now);
                false
            }
        }
    }

    /// The result of a finished non-blocking connect.
    fn connect_result(&self) -> io::Result<()> {
        let Some(upstream) = self.upstream.as_ref() else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        match SockRef::from(upstream).take_error()? {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Run one direction as far as it goes without blocking: the bytes it
    /// moved, and what it waits for now (a failure is logged with whom it
    /// blames).
    /// `buffer` is the size of one provided buffer (0 without a ring).
    pub fn pump(&mut self, dir: Dir, pool: &mut Pool, buffer: usize) -> (u64, Pumped) {
        let Some(upstream) = self.upstream.as_ref() else {
            return (0, Pumped::Wait(Wait::Finished));
        };
        let (source, sink) = ends(dir, self.client.as_fd(), upstream.as_fd());
        let half = &mut self.halves[dir as usize];
        let ctx = PumpCtx { pool, recv_armed: self.machine.is_armed(Op::Recv(dir)), buffer };
        let wait = half.pump(source, sink, ctx);
        // Ring sends completed since the last pump count here too.
        let moved = half.take_moved();
        if moved > 0 {
            let counters = self.port.metrics.slot(self.worker);
            let counter = match dir {
                Dir::Up => &counters.bytes_to_endpoint,
                Dir::Down => &counters.bytes_to_client,
            };
            counters.add(counter, moved);
        }
        let outcome = match wait {
            Ok(wait) => Pumped::Wait(wait),
            Err(e) => {
                let blame = relay_blame(dir, &e);
                tracing::debug!(service = %self.port.spec.name, ?dir, ?blame, error = %e, source = %e.source, "connection reset");
                Pumped::Failed
            }
        };
        (moved, outcome)
    }

    /// The fd an op works on.
    pub fn poll_fd(&self, op: Op) -> Option<BorrowedFd<'_>> {
        let upstream = self.upstream.as_ref().map(|u| u.as_fd());
        match op {
            Op::Connect => upstream,
            Op::ConnectTimeout => None,
            Op::Readable(Dir::Up) | Op::Writable(Dir::Down) | Op::Recv(Dir::Up) | Op::Send(Dir::Down) => {
                Some(self.client.as_fd())
            }
            Op::Readable(Dir::Down) | Op::Writable(Dir::Up) | Op::Recv(Dir::Down) | Op::Send(Dir::Up) => {
                upstream
            }
        }
    }

    /// A ring receive of `dir` completed (`buffer`: one buffer's size).
    pub fn received(&mut self, dir: Dir, result: i32, bid: Option<u16>, buffer: usize) -> Received {
        self.halves[dir as usize].received(result, bid, buffer)
    }

    /// A ring send of `dir` completed.
    pub fn sent(&mut self, dir: Dir, result: i32) -> Option<Sent> {
        self.halves[dir as usize].sent(result)
    }

    /// The buffer and bytes `dir`'s next send takes.
    pub fn next_send(&self, dir: Dir) -> Option<(u16, std::ops::Range<u32>)> {
        self.halves[dir as usize].ring_front()
    }

    /// A buffer went back to the ring: whether `dir` was waiting for one.
    pub fn unstarve(&mut self, dir: Dir) -> bool {
        self.halves[dir as usize].ring().unstarve()
    }

    /// Every provided buffer this connection still holds (call only once
    /// nothing of it is in flight).
    pub fn take_held(&mut self) -> Vec<u16> {
        self.halves.iter_mut().flat_map(|h| h.ring().take_held().collect::<Vec<_>>()).collect()
    }

    /// Begin closing: give back empty chunks and, for a reset, make the
    /// coming close send RST on both sockets (SO_LINGER with a zero timeout).
    pub fn begin_close(&mut self, reset: bool, pool: &mut Pool) {
        for half in &mut self.halves {
            half.close(pool);
        }
        if reset {
            let _ = SockRef::from(&self.client).set_linger(Some(Duration::ZERO));
            if let Some(u) = self.upstream.as_ref() {
                let _ = SockRef::from(u).set_linger(Some(Duration::ZERO));
            }
        }
    }

    /// Bytes delivered each way: (to the endpoint, to the client).
    pub fn delivered(&self) -> (u64, u64) {
        (self.halves[0].delivered, self.halves[1].delivered)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.release();
        let counters = self.port.metrics.slot(self.worker);
        counters.add(&counters.closed, 1);
    }
}

/// Whom a failed transfer blames: the socket that failed, or this host
/// when it was a shortage of fds or memory (a pipe that could not be made).
pub fn relay_blame(dir: Dir, e: &RelayError) -> Blame {
    if Blame::of_local_resources(&e.source) {
        return Blame::Local;
    }
    match (dir, e.end) {
        (Dir::Up, End::Source) | (Dir::Down, End::Sink) => Blame::Client,
        (Dir::Up, End::Sink) | (Dir::Down, End::Source) => Blame::Endpoint,
    }
}

/// `(source, sink)` of a direction.
fn ends<'a>(dir: Dir, client: BorrowedFd<'a>, upstream: BorrowedFd<'a>) -> (BorrowedFd<'a>, BorrowedFd<'a>) {
    match dir {
        Dir::Up => (client, upstream),
        Dir::Down => (upstream, client),
    }
}

/// A tuned, non-blocking socket for `addr`, bound as `decision` says.
/// Every error here is local.
fn new_socket(addr: SocketAddr, decision: Decision) -> io::Result<(Socket, crate::source_ip::Source)> {
    let (socket, source) = upstream::open(addr, Type::STREAM, decision)?;
    tune(SockRef::from(&socket))?;
    Ok((socket, source))
}

/// A non-blocking connect. `true`: already connected (possible on loopback).
fn start_connect(socket: &Socket, addr: SocketAddr) -> io::Result<bool> {
    match socket.connect(&addr.into()) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_transfer_blames_the_socket_that_failed_or_this_host() {
        let err = |end, errno| RelayError { end, source: io::Error::from_raw_os_error(errno) };
        assert_eq!(relay_blame(Dir::Up, &err(End::Source, libc::ECONNRESET)), Blame::Client);
        assert_eq!(relay_blame(Dir::Down, &err(End::Sink, libc::EPIPE)), Blame::Client);
        assert_eq!(relay_blame(Dir::Up, &err(End::Sink, libc::EPIPE)), Blame::Endpoint);
        assert_eq!(relay_blame(Dir::Down, &err(End::Source, libc::ECONNRESET)), Blame::Endpoint);
        assert_eq!(
            relay_blame(Dir::Up, &err(End::Source, libc::EMFILE)),
            Blame::Local,
            "no pipe for the chunk"
        );
    }
}
