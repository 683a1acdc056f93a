//! `loadgen serve`: the backend side. TCP echo, sink, source and a tiny
//! HTTP/1.1 responder on io_uring worker threads, and UDP echo on blocking
//! threads.
//!
//! Why io_uring for TCP: it is the same audited [`Ring`] the load side uses,
//! so the server adds no second event-loop stack and no extra `unsafe`; each
//! connection costs one in-flight op and one arena buffer, so thousands of
//! connections are cheap, and every worker posts its own accepts on the
//! shared listeners, which spreads connections across cores without
//! `SO_REUSEPORT`. UDP echo uses one blocking thread per socket and worker:
//! a datagram costs one `recvfrom` and one `sendto` either way, and the
//! threads need no per-connection state.
//!
//! Identity: every listener answers as `"<id> <bound addr>"`. HTTP puts it
//! in the body (with a newline) and in an `X-Backend` header; with `--greet`
//! the TCP modes send it as one line on accept; UDP echo answers an empty
//! datagram with it. Shutdown: workers poll a stop flag (set by SIGINT,
//! SIGTERM or `--duration`) at least every 100 ms.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::sys::{BufId, Completion, OpId, Ring};

/// What a TCP listener does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Echo,
    Sink,
    Source,
    Http,
    UdpEcho,
}

/// A failure to set `serve` up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up io_uring")]
    Ring(#[source] io::Error),
    #[error("cannot start a thread")]
    Spawn(#[source] io::Error),
}

/// One bound listener, as reported on the first line of stdout.
#[derive(Debug, Clone, Serialize)]
pub struct Bound {
    pub mode: Mode,
    pub addr: SocketAddr,
    pub identity: String,
}

struct TcpListener {
    mode: Mode,
    fd: OwnedFd,
    identity: String,
}

/// Listeners bound and ready to serve.
pub struct Listeners {
    tcp: Vec<TcpListener>,
    udp: Vec<(UdpSocket, String)>,
    pub bound: Vec<Bound>,
}

const LISTEN_BACKLOG: i32 = 4096;
const ACCEPTS_PER_LISTENER: usize = 4;
const CONN_BUF: usize = 64 * 1024;
const POLL: Duration = Duration::from_millis(100);
const TAG_ACCEPT: u64 = 0;
const TAG_SEND: u64 = 1;
const TAG_RECV: u64 = 2;
const TAG_GREET: u64 = 3;

/// Binds every listener (port 0 picks a free port; the bound one is reported).
pub fn bind(tcp: &[(Mode, SocketAddr)], udp: &[SocketAddr], id: &str) -> Result<Listeners, ServeError> {
    let mut out = Listeners { tcp: Vec::new(), udp: Vec::new(), bound: Vec::new() };
    for &(mode, addr) in tcp {
        let err = |source| ServeError::Bind { addr, source };
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))
            .map_err(err)?;
        sock.set_reuse_address(true).map_err(err)?;
        sock.bind(&SockAddr::from(addr)).map_err(err)?;
        sock.listen(LISTEN_BACKLOG).map_err(err)?;
        let local = sock.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(addr);
        let identity = format!("{id} {local}");
        out.bound.push(Bound { mode, addr: local, identity: identity.clone() });
        out.tcp.push(TcpListener { mode, fd: OwnedFd::from(sock), identity });
    }
    for &addr in udp {
        let err = |source| ServeError::Bind { addr, source };
        let sock = UdpSocket::bind(addr).map_err(err)?;
        sock.set_read_timeout(Some(POLL)).map_err(err)?;
        let local = sock.local_addr().map_err(err)?;
        let identity = format!("{id} {local}");
        out.bound.push(Bound { mode: Mode::UdpEcho, addr: local, identity: identity.clone() });
        out.udp.push((sock, identity));
    }
    Ok(out)
}

/// Serves until `stop` is set or `deadline` passes.
pub fn run(
    l: Listeners,
    workers: usize,
    greet: bool,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> Result<(), ServeError> {
    let tcp = Arc::new(l.tcp);
    let mut handles = Vec::new();
    for w in 0..workers.max(1) {
        for (sock, identity) in &l.udp {
            let sock = sock.try_clone().map_err(ServeError::Spawn)?;
            let (identity, stop) = (identity.clone(), Arc::clone(&stop));
            handles.push(spawn(format!("udp-echo-{w}"), move || {
                udp_echo(&sock, &identity, &stop, deadline);
                Ok(())
            })?);
        }
        if !tcp.is_empty() {
            let (tcp, stop) = (Arc::clone(&tcp), Arc::clone(&stop));
            handles.push(spawn(format!("serve-{w}"), move || {
                TcpWorker::new(&tcp, greet)?.run(&stop, deadline)
            })?);
        }
    }
    let mut result = Ok(());
    for h in handles {
        let r = h.join().unwrap_or(Ok(()));
        if r.is_err() {
            // One failed worker stops the others so the error is reported.
            stop.store(true, Ordering::Relaxed);
            result = result.and(r);
        }
    }
    result
}

type Handle = std::thread::JoinHandle<Result<(), ServeError>>;

fn spawn(
    name: String,
    f: impl FnOnce() -> Result<(), ServeError> + Send + 'static,
) -> Result<Handle, ServeError> {
    std::thread::Builder::new().name(name).spawn(f).map_err(ServeError::Spawn)
}

fn udp_echo(sock: &UdpSocket, identity: &str, stop: &AtomicBool, deadline: Instant) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let reply: &[u8] = if n == 0 { identity.as_bytes() } else { &buf[..n] };
        // A lost reply is what UDP promises; the client counts it.
        let _ = sock.send_to(reply, peer);
    }
}

struct ServerConn {
    fd: OwnedFd,
    mode: Mode,
    listener: usize,
    buf: BufId,
    /// Bytes of `buf` holding received data not yet answered.
    filled: usize,
    /// Bytes of the current reply already sent, and its length.
    out_sent: usize,
    out_len: usize,
    /// HTTP: the request being answered is this long; close after it?
    consumed: usize,
    close_after: bool,
    op: Option<OpId>,
}

struct TcpWorker<'a> {
    ring: Ring,
    listeners: &'a [TcpListener],
    greetings: Vec<BufId>,
    responses: Vec<BufId>,
    source: BufId,
    greet: bool,
    conns: Vec<Option<ServerConn>>,
    free: Vec<usize>,
}

/// The HTTP response naming the instance.
pub fn http_response(identity: &str) -> String {
    let body = format!("{identity}\n");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Backend: {identity}\r\n\r\n{body}",
        body.len()
    )
}

impl<'a> TcpWorker<'a> {
    fn new(listeners: &'a [TcpListener], greet: bool) -> Result<Self, ServeError> {
        let mut ring = Ring::new(4096).map_err(ServeError::Ring)?;
        let fill = |ring: &mut Ring, bytes: &[u8]| {
            let id = ring.alloc_buf(bytes.len());
            ring.buf_mut(id).copy_from_slice(bytes);
            id
        };
        let greetings =
            listeners.iter().map(|l| fill(&mut ring, format!("{}\n", l.identity).as_bytes())).collect();
        let responses =
            listeners.iter().map(|l| fill(&mut ring, http_response(&l.identity).as_bytes())).collect();
        let pattern: Vec<u8> = (0..CONN_BUF).map(|i| (i % 251) as u8).collect();
        let source = fill(&mut ring, &pattern);
        Ok(TcpWorker {
            ring,
            listeners,
            greetings,
            responses,
            source,
            greet,
            conns: Vec::new(),
            free: Vec::new(),
        })
    }

    fn run(mut self, stop: &AtomicBool, deadline: Instant) -> Result<(), ServeError> {
        for (i, l) in self.listeners.iter().enumerate() {
            for _ in 0..ACCEPTS_PER_LISTENER {
                self.ring.accept(&l.fd, ((i as u64) << 8) | TAG_ACCEPT).map_err(ServeError::Ring)?;
            }
        }
        let mut done: Vec<Completion> = Vec::with_capacity(1024);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            self.ring.wait(POLL).map_err(ServeError::Ring)?;
            self.ring.drain(&mut done);
            for c in done.drain(..) {
                self.on_completion(c);
            }
        }
        Ok(())
    }

    fn on_completion(&mut self, c: Completion) {
        let slot = (c.user >> 8) as usize;
        match c.user & 0xff {
            TAG_ACCEPT => {
                if let Some(fd) = c.accepted {
                    self.accepted(slot, fd);
                }
                let l = &self.listeners[slot];
                // A failed re-arm leaves the other accepts of this listener.
                let _ = self.ring.accept(&l.fd, c.user);
            }
            tag => {
                if let Some(conn) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) {
                    conn.op = None;
                }
                if c.result <= 0 && !(tag == TAG_SEND && c.result == 0) {
                    return self.close(slot);
                }
                self.step(slot, tag, c.result as usize);
            }
        }
    }

    fn accepted(&mut self, listener: usize, fd: OwnedFd) {
        let mode = self.listeners[listener].mode;
        let buf = self.ring.alloc_buf(if mode == Mode::Source { 1 } else { CONN_BUF });
        let conn = ServerConn {
            fd,
            mode,
            listener,
            buf,
            filled: 0,
            out_sent: 0,
            out_len: 0,
            consumed: 0,
            close_after: false,
            op: None,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s] = Some(conn);
                s
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        if self.greet {
            let len = self.ring.buf(self.greetings[listener]).len();
            self.conn(slot).out_len = len;
            self.send_out(slot, TAG_GREET);
        } else {
            self.start(slot);
        }
    }

    fn conn(&mut self, slot: usize) -> &mut ServerConn {
        // Slots are only addressed while their connection lives.
        self.conns[slot].as_mut().unwrap_or_else(|| unreachable!("dead slot {slot}"))
    }

    /// The first op of a connection's mode (after any greeting).
    fn start(&mut self, slot: usize) {
        let mode = self.conn(slot).mode;
        if mode == Mode::Source {
            let len = self.ring.buf(self.source).len();
            let c = self.conn(slot);
            (c.out_sent, c.out_len) = (0, len);
            self.send_out(slot, TAG_SEND);
        } else {
            self.recv(slot);
        }
    }

    fn recv(&mut self, slot: usize) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        let len = self.ring.buf(c.buf).len();
        let from = if c.mode == Mode::Http { c.filled } else { 0 };
        match self.ring.recv(&c.fd, c.buf, from..len, ((slot as u64) << 8) | TAG_RECV) {
            Ok(op) => c.op = Some(op),
            Err(_) => self.close(slot),
        }
    }

    /// Sends the rest of the current reply: a greeting, the echoed bytes,
    /// the source pattern or the HTTP response.
    fn send_out(&mut self, slot: usize, tag: u64) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        let buf = match (tag, c.mode) {
            (TAG_GREET, _) => self.greetings[c.listener],
            (_, Mode::Http) => self.responses[c.listener],
            (_, Mode::Source) => self.source,
            _ => c.buf,
        };
        match self.ring.send(&c.fd, buf, c.out_sent..c.out_len, ((slot as u64) << 8) | tag) {
            Ok(op) => c.op = Some(op),
            Err(_) => self.close(slot),
        }
    }

    fn step(&mut self, slot: usize, tag: u64, n: usize) {
        let source_len = self.ring.buf(self.source).len();
        let c = self.conn(slot);
        let mode = c.mode;
        if tag == TAG_SEND || tag == TAG_GREET {
            c.out_sent += n;
            if c.out_sent < c.out_len {
                return self.send_out(slot, tag);
            }
            c.out_sent = 0;
            return match (tag, mode) {
                (TAG_GREET, _) => self.start(slot),
                (_, Mode::Source) => {
                    c.out_len = source_len;
                    self.send_out(slot, TAG_SEND)
                }
                (_, Mode::Http) => self.http_answered(slot),
                _ => self.recv(slot),
            };
        }
        match mode {
            Mode::Echo => {
                (c.out_sent, c.out_len) = (0, n);
                self.send_out(slot, TAG_SEND);
            }
            Mode::Http => {
                c.filled += n;
                self.http_next(slot);
            }
            _ => self.recv(slot),
        }
    }

    /// Answers the next complete request in the buffer, or reads more.
    fn http_next(&mut self, slot: usize) {
        let c = self.conns[slot].as_mut().unwrap_or_else(|| unreachable!());
        let data = &self.ring.buf(c.buf)[..c.filled];
        match parse_request(data) {
            Request::Complete { len, close } => {
                (c.consumed, c.close_after) = (len, close);
                c.out_len = self.ring.buf(self.responses[c.listener]).len();
                c.out_sent = 0;
                self.send_out(slot, TAG_SEND);
            }
            Request::Partial if c.filled < CONN_BUF => self.recv(slot),
            // Too large for this tiny responder, or not HTTP: hang up.
            _ => self.close(slot),
        }
    }

    fn http_answered(&mut self, slot: usize) {
        let c = self.conns[slot].as_mut().unwrap_or_else(|| unreachable!());
        if c.close_after {
            return self.close(slot);
        }
        let (consumed, filled) = (c.consumed, c.filled);
        self.ring.buf_mut(c.buf).copy_within(consumed..filled, 0);
        c.filled = filled - consumed;
        self.http_next(slot);
    }

    fn close(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        if c.as_ref().is_some_and(|c| c.op.is_some()) {
            return;
        }
        if let Some(conn) = c.take() {
            self.ring.free_buf(conn.buf);
            self.free.push(slot);
        }
    }
}

/// The state of the bytes received on an HTTP connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A full request of `len` bytes (head and body) is buffered.
    Complete {
        len: usize,
        close: bool,
    },
    Partial,
    Invalid,
}

/// Finds the first complete HTTP/1.1 request in `data` (head plus a
/// `Content-Length` body; chunked bodies are not supported).
pub fn parse_request(data: &[u8]) -> Request {
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Request::Partial;
    };
    let Ok(head) = std::str::from_utf8(&data[..end]) else {
        return Request::Invalid;
    };
    let mut body = 0usize;
    let mut close = false;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse() {
                Ok(v) => body = v,
                Err(_) => return Request::Invalid,
            }
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    let len = end + 4 + body;
    if data.len() >= len { Request::Complete { len, close } } else { Request::Partial }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_get_without_body_is_complete_at_the_blank_line() {
        let r = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /next";
        assert_eq!(parse_request(r), Request::Complete { len: 27, close: false });
    }

    #[test]
    fn a_body_is_waited_for_and_connection_close_is_seen() {
        let r = b"POST / HTTP/1.1\r\ncontent-length: 4\r\nConnection: Close\r\n\r\nab";
        assert_eq!(parse_request(r), Request::Partial);
        let mut full = r.to_vec();
        full.extend_from_slice(b"cd");
        assert_eq!(parse_request(&full), Request::Complete { len: full.len(), close: true });
    }

    #[test]
    fn a_bad_content_length_is_invalid() {
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), Request::Invalid);
    }

    #[test]
    fn the_http_response_names_the_instance_in_header_and_body() {
        let r = http_response("backend-1 127.0.0.1:8080");
        assert!(r.contains("\r\nX-Backend: backend-1 127.0.0.1:8080\r\n"));
        assert!(r.ends_with("\r\n\r\nbackend-1 127.0.0.1:8080\n"));
        assert!(r.contains("Content-Length: 25\r\n"));
    }
}
