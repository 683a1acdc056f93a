//! The one accept loop behind every HTTP server ringport runs: the admin
//! health and metrics servers and the `healthCheckNodePort` servers. Each
//! server has a [`Gate`] that bounds what outside clients can hold, so a
//! flood from the network can neither take the data plane's fds nor keep
//! kubelet's probes (from this node) or a load balancer's (from a few
//! sources) waiting.
//!
//! Invariants:
//! - A permit of the server's gate is taken *before* accepting: with none
//!   free, clients wait in the kernel's accept queue holding none of our
//!   fds. A gate never holds more than [`GATE_CONNECTIONS`] connections,
//!   and [`super::MAX_CONNECTIONS`] bounds all gates together.
//! - Sources outside the node together hold at most
//!   `GATE_CONNECTIONS - RESERVED_LOCAL`, each at most [`PER_SOURCE`]; the
//!   last [`RESERVED_LOCAL`] permits are only for the node itself (loopback,
//!   or a source address equal to the address it connected to). An outside
//!   connection beyond its share is closed as soon as it is accepted.
//! - A connection's request headers must arrive within its
//!   [`Http::header_timeout`] (this also bounds an idle keep-alive), and it
//!   never lives past [`Http::lifetime`].
//! - A failed accept (most likely out of fds) backs off, doubling up to 1 s,
//!   and is logged at most once a second with the count held back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::dataplane::fault::{ACCEPT_BACKOFF, Throttle};

/// Connections one server (one gate) holds at once.
pub const GATE_CONNECTIONS: usize = 32;
/// Of those, the permits only the node itself may take.
pub const RESERVED_LOCAL: usize = 8;
/// The most connections one outside source address holds on one server.
pub const PER_SOURCE: usize = 8;

/// How one server speaks HTTP/1.
#[derive(Clone, Copy, Debug)]
pub struct Http {
    /// Request headers must be complete this soon after the connection
    /// opens or the previous response ends.
    pub header_timeout: Duration,
    /// No connection lives longer than this.
    pub lifetime: Duration,
    /// Serve more than one request per connection.
    pub keep_alive: bool,
    /// Header names as Go writes them (`Content-Type`), for answers that
    /// must match kube-proxy's byte for byte.
    pub title_case_headers: bool,
}

/// Whether a connection from `peer` to `local` comes from this node.
pub fn from_this_node(peer: IpAddr, local: IpAddr) -> bool {
    peer.to_canonical().is_loopback() || peer.to_canonical() == local.to_canonical()
}

/// The connection limits of one server, shared by its listeners.
pub struct Gate {
    name: &'static str,
    permits: Arc<Semaphore>,
    outside: Mutex<Outside>,
    is_local: fn(IpAddr, IpAddr) -> bool,
}

#[derive(Default)]
struct Outside {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// One admitted connection's share of its gate; given back on drop.
struct Ticket {
    gate: Arc<Gate>,
    outside: Option<IpAddr>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(source) = self.outside else { return };
        let mut o = self.gate.outside.lock().unwrap_or_else(PoisonError::into_inner);
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.per_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.per_source.remove(&source);
            }
        }
    }
}

impl Gate {
    /// A gate for the server `name` (for logs), telling the node's own
    /// connections by [`from_this_node`].
    pub fn new(name: &'static str) -> Arc<Self> {
        Self::with_locality(name, from_this_node)
    }

    /// A gate telling the node's own connections by `is_local(peer, local)`.
    pub fn with_locality(name: &'static str, is_local: fn(IpAddr, IpAddr) -> bool) -> Arc<Self> {
        Arc::new(Self {
            name,
            permits: Arc::new(Semaphore::new(GATE_CONNECTIONS)),
            outside: Mutex::new(Outside::default()),
            is_local,
        })
    }

    /// Admit an accepted connection holding `permit`, or `None` when an
    /// outside source is over its share.
    fn admit(self: &Arc<Self>, permit: OwnedSemaphorePermit, peer: IpAddr, local: IpAddr) -> Option<Ticket> {
        if (self.is_local)(peer, local) {
            return Some(Ticket { gate: Arc::clone(self), outside: None, _permit: permit });
        }
        let source = peer.to_canonical();
        let mut o = self.outside.lock().unwrap_or_else(PoisonError::into_inner);
        let held = o.per_source.get(&source).copied().unwrap_or(0);
        if o.total >= GATE_CONNECTIONS - RESERVED_LOCAL || held >= PER_SOURCE {
            return None;
        }
        o.total += 1;
        *o.per_source.entry(source).or_default() += 1;
        drop(o);
        Some(Ticket { gate: Arc::clone(self), outside: Some(source), _permit: permit })
    }
}

/// Accept on `listener` while `gate` has a permit free, and serve each
/// connection with `router` on its own task. Runs until aborted.
pub async fn serve(listener: TcpListener, router: Router, gate: Arc<Gate>, http: Http) {
    let mut failures = Throttle::new(Duration::from_secs(1));
    let mut refusals = Throttle::new(Duration::from_secs(1));
    let mut step = 0;
    loop {
        let Ok(permit) = Arc::clone(&gate.permits).acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of fds, most likely: wait for some to come back rather
                // than spin on the error.
                let backoff = ACCEPT_BACKOFF[step];
                if let Some(held_back) = failures.allow(Instant::now()) {
                    tracing::warn!(server = gate.name, error = %e, retry_in = ?backoff, held_back, "accept failed");
                }
                drop(permit);
                tokio::time::sleep(backoff).await;
                step = (step + 1).min(ACCEPT_BACKOFF.len() - 1);
                continue;
            }
        };
        step = 0;
        let local = stream.local_addr().map_or(peer.ip(), |a| a.ip());
        let Some(ticket) = gate.admit(permit, peer.ip(), local) else {
            if let Some(held_back) = refusals.allow(Instant::now()) {
                tracing::debug!(server = gate.name, %peer, held_back, "outside connection over its share closed");
            }
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(http.header_timeout)
                .keep_alive(http.keep_alive)
                .title_case_headers(http.title_case_headers)
                .serve_connection(TokioIo::new(stream), service);
            // A timeout or a client error ends only this connection.
            let _ = tokio::time::timeout(http.lifetime, connection).await;
            drop(ticket);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};

    /// In these tests only 127.0.0.1 is "this node"; other loopback
    /// addresses stand for outside sources.
    fn only_127_0_0_1(peer: IpAddr, _local: IpAddr) -> bool {
        peer == IpAddr::from([127, 0, 0, 1])
    }

    const HTTP: Http = Http {
        header_timeout: Duration::from_secs(30),
        lifetime: Duration::from_secs(60),
        keep_alive: true,
        title_case_headers: false,
    };

    /// A server on 127.0.0.1 on its own runtime thread (which lives as
    /// long as the test process).
    fn server() -> SocketAddr {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                tx.send(listener.local_addr().expect("addr")).expect("send");
                let router = Router::new().fallback(|| async { "ok\n" });
                serve(listener, router, Gate::with_locality("test", only_127_0_0_1), HTTP).await;
            });
        });
        rx.recv().expect("the server's address")
    }

    fn connect_from(source: [u8; 4], to: SocketAddr) -> socket2::Socket {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        s.bind(&SocketAddr::from((source, 0)).into()).expect("bind the source");
        s.connect(&to.into()).expect("connect");
        s
    }

    /// A GET from `source`: the answer's status line, or `None`.
    fn probe(source: [u8; 4], to: SocketAddr) -> Option<String> {
        let mut s: TcpStream = connect_from(source, to).into();
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.lines().next().map(str::to_owned)
    }

    #[test]
    fn idle_outside_connections_cannot_keep_the_node_or_other_sources_waiting() {
        let addr = server();
        // Four outside sources each open twice their share, idle: together
        // more than every permit of the gate.
        let idle: Vec<socket2::Socket> = (2..6u8)
            .flat_map(|host| (0..2 * PER_SOURCE).map(move |_| connect_from([127, 0, 0, host], addr)))
            .collect();
        assert!(idle.len() > GATE_CONNECTIONS);
        // The node's own probe is answered at once, several times over.
        for _ in 0..3 {
            assert_eq!(probe([127, 0, 0, 1], addr).as_deref(), Some("HTTP/1.1 200 OK"));
        }
        drop(idle);
        // With the flood gone, a fresh outside source is served again.
        let served = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            probe([127, 0, 0, 9], addr).as_deref() == Some("HTTP/1.1 200 OK")
        });
        assert!(served, "an outside probe after the flood");
    }

    #[test]
    fn one_outside_source_holds_at_most_its_share() {
        let addr = server();
        let idle: Vec<socket2::Socket> =
            (0..3 * PER_SOURCE).map(|_| connect_from([127, 0, 0, 2], addr)).collect();
        // Another outside source is still answered: the first holds only
        // PER_SOURCE of the outside permits.
        for _ in 0..3 {
            assert_eq!(probe([127, 0, 0, 3], addr).as_deref(), Some("HTTP/1.1 200 OK"));
        }
        // The connections past the share were closed by the server as it
        // accepted them (before it accepted the probes above).
        let closed = idle
            .iter()
            .filter(|s| {
                s.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
                let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 8];
                match s.recv(&mut buf) {
                    Ok(n) => n == 0,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                }
            })
            .count();
        assert_eq!(closed, 2 * PER_SOURCE, "connections of one source beyond its share are closed");
    }
}
