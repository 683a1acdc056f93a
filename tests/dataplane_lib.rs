//! The data plane driven through the library: a snapshot built in code,
//! real workers, real sockets on loopback. Checks the relay and the worker
//! loop without the manifest layer in the way.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ringport::balance::BalanceOptions;
use ringport::balance::health::HealthRegistry;
use ringport::dataplane::{DataPlane, RelayMode, WorkerConfig};
use ringport::listen::{Binder, ListenOptions};
use ringport::metrics::Metrics;
use ringport::model::*;
use ringport::snapshot::{BalanceContext, Snapshot};

fn service_port(endpoints: &[SocketAddr]) -> ServicePort {
    let name = ServicePortName { service: ServiceName::new("default", "echo"), port: "".into() };
    let mut sp = ServicePort::new(name, Origin::new("test"), Protocol::Tcp, 80);
    sp.endpoints = endpoints.iter().map(|a| Endpoint::ready(EndpointAddr(*a))).collect();
    sp
}

/// An echo server that answers one line-less blob per connection:
/// it echoes until EOF, then closes.
fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = stream;
                let mut r = s.try_clone().expect("clone");
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// Workers of `config` serving one service port in front of an echo
/// backend, from a snapshot built in code; also the proxy's address.
fn serve(config: WorkerConfig) -> (DataPlane, SocketAddr, Arc<ArcSwap<Snapshot>>) {
    serve_backend(config, echo_backend())
}

/// [`serve`] in front of `backend`.
fn serve_backend(
    config: WorkerConfig,
    backend: SocketAddr,
) -> (DataPlane, SocketAddr, Arc<ArcSwap<Snapshot>>) {
    let workers = config.workers;
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let dp = DataPlane::start(Arc::clone(&snapshot), config).expect("data plane");
    let mut binder = Binder::new(ListenOptions {
        bind_address: "127.0.0.1".parse().expect("ip"),
        bind_address6: None,
        proxy_port_range: None,
        nodeport_addresses: vec![],
        workers,
        redirect_rules: false,
        proxy_port_mode: ringport::listen::ProxyPortMode::PerService,
    });
    let ports = vec![service_port(&[backend])];
    let (listeners, errors) = binder.bind(&ports, &[]);
    assert!(errors.is_empty(), "{errors:?}");
    let proxy = listeners[0].addr;
    let (options, registry, metrics) =
        (BalanceOptions::default(), HealthRegistry::default(), Arc::new(Metrics::new(workers)));
    let source = ringport::source_ip::SourceOptions::default();
    let ctx = BalanceContext { options: &options, registry: &registry, metrics: &metrics, source: &source };
    let next = Snapshot::new(1, ports, listeners, &Snapshot::default(), &ctx);
    next.listen_where_served();
    snapshot.store(Arc::new(next));
    dp.notify();
    (dp, proxy, snapshot)
}

/// Send `payload`, half-close, and read the echo to EOF.
fn echo(proxy: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(proxy).expect("connect to proxy");
    c.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    c.write_all(payload).expect("send");
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    c.read_to_end(&mut back).expect("echo back, then EOF");
    back
}

#[test]
fn snapshot_built_in_code_is_served_by_two_workers() {
    let (dp, proxy, _snapshot) = serve(WorkerConfig { workers: 2, pin: false, ..WorkerConfig::default() });
    for round in 0..20 {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(31) + round) as u8).collect();
        let back = echo(proxy, &payload);
        assert_eq!(back.len(), payload.len());
        assert!(back == payload, "payload corrupted in round {round}");
    }
    dp.stop();
}

#[test]
fn a_two_entry_ring_serves_two_hundred_concurrent_connections() {
    // A submission queue of 2 and a completion queue of 8: nearly every
    // push finds the queue full and completions overflow, so the driver's
    // submit-on-full and backlog paths carry the load.
    let config = WorkerConfig { workers: 1, pin: false, ring_entries: 2, ..WorkerConfig::default() };
    let (dp, proxy, _snapshot) = serve(config);
    let clients: Vec<_> = (0..200u32)
        .map(|n| {
            std::thread::spawn(move || {
                let payload: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(7) + n) as u8).collect();
                echo(proxy, &payload) == payload
            })
        })
        .collect();
    let intact = clients.into_iter().map(|c| c.join().unwrap_or(false)).filter(|ok| *ok).count();
    assert_eq!(intact, 200, "every connection echoed intact");
    dp.stop();
}

/// One request of `n` bytes echoed back on a kept-alive connection.
fn round_trip(c: &mut TcpStream, n: usize, seed: u8) {
    let payload: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)).collect();
    let mut writer = c.try_clone().expect("clone");
    let sender = std::thread::spawn(move || writer.write_all(&payload).map(|()| payload));
    let mut back = vec![0u8; n];
    c.read_exact(&mut back).expect("echo");
    let payload = sender.join().expect("sender thread").expect("send");
    assert!(back == payload, "{n}-byte message corrupted");
}

#[test]
fn ring_relay_holds_no_buffer_for_idle_connections_and_gives_a_blocked_ones_back() {
    let config = WorkerConfig { workers: 1, pin: false, relay: RelayMode::Ring, ..WorkerConfig::default() };
    let (dp, proxy, _snapshot) = serve(config);
    let mut idle: Vec<TcpStream> = (0..200u8)
        .map(|i| {
            let mut c = TcpStream::connect(proxy).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            round_trip(&mut c, 64, i);
            c
        })
        .collect();
    // Every exchange is done: every buffer is back in the ring.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while dp.buffers_held() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} buffers held by idle connections",
            dp.buffers_held()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A client that sends 16 MiB and reads nothing yet: its echo backs up,
    // so the proxy holds buffers (at most HELD_MAX per direction, see
    // relay_ring.rs). Its small
    // receive buffer keeps the kernel from absorbing the whole echo (with
    // autotuning, loopback buffers reach megabytes).
    const BLOCKED: usize = 16 << 20;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(64 << 10).expect("SO_RCVBUF");
    socket.connect(&proxy.into()).expect("connect");
    let mut blocked = TcpStream::from(socket);
    blocked.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut writer = blocked.try_clone().expect("clone");
    writer.set_write_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let sender = std::thread::spawn(move || writer.write_all(&vec![7u8; BLOCKED]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dp.buffers_held() == 0 {
        assert!(std::time::Instant::now() < deadline, "a blocked transfer never held a buffer");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Once the client reads, the whole echo arrives and every buffer goes
    // back to the ring; the idle connections were served all along.
    let mut back = vec![0u8; BLOCKED];
    blocked.read_exact(&mut back).expect("the whole echo once read");
    assert!(back.iter().all(|b| *b == 7));
    sender.join().expect("sender thread").expect("send");
    for (i, c) in idle.iter_mut().enumerate() {
        round_trip(c, 64, i as u8);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while dp.buffers_held() != 0 {
        assert!(std::time::Instant::now() < deadline, "{} buffers never came back", dp.buffers_held());
        std::thread::sleep(Duration::from_millis(20));
    }
    dp.stop();
}

#[test]
fn auto_relay_keeps_bytes_in_order_across_switches_both_ways() {
    let config = WorkerConfig { workers: 1, pin: false, relay: RelayMode::Auto, ..WorkerConfig::default() };
    let (dp, proxy, _snapshot) = serve(config);
    let mut c = TcpStream::connect(proxy).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    // Small (ring), bulk (to splice), small again (back to the ring), bulk.
    for (phase, (count, size)) in [(40, 64), (1, 8 << 20), (40, 100), (1, 3 << 20)].into_iter().enumerate() {
        for i in 0..count {
            round_trip(&mut c, size, (phase * 50 + i) as u8);
        }
    }
    // Half-close after the switches: the rest and then EOF come back.
    c.write_all(b"last words").expect("send");
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("echo, then EOF");
    assert_eq!(rest, b"last words");
    dp.stop();
}

/// Buffers that two blocked connections may hold between them, plus a
/// margin for the small exchanges in flight: two directions each at
/// `HELD_MAX` (8, `relay_ring.rs`), and a few buffers of the exchanges.
const HELD_BOUND: usize = 2 * 2 * 8 + 4;

/// Two clients that send 16 MiB to an echo and never read the echo (a small
/// receive window, so the kernel cannot absorb it): their echoes back up in
/// the proxy. Meanwhile 100 other connections on the same worker must each
/// finish small exchanges, and the ring buffers held stay bounded. (In
/// `auto` such bulk echoes leave for splice; see the next test.)
fn blocked_readers_hold_a_bounded_share(relay: RelayMode) {
    let config = WorkerConfig { workers: 1, pin: false, relay, ..WorkerConfig::default() };
    let (dp, proxy, _snapshot) = serve(config);
    const BLOCKED: usize = 16 << 20;
    let blocked: Vec<_> = (0..2)
        .map(|_| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
            socket.set_recv_buffer_size(64 << 10).expect("SO_RCVBUF");
            socket.connect(&proxy.into()).expect("connect");
            let client = TcpStream::from(socket);
            let mut writer = client.try_clone().expect("clone");
            writer.set_write_timeout(Some(Duration::from_secs(30))).expect("timeout");
            let sender = std::thread::spawn(move || writer.write_all(&vec![7u8; BLOCKED]));
            (client, sender)
        })
        .collect();
    // Let the echoes back up until the proxy holds buffers for them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dp.buffers_held() == 0 {
        assert!(std::time::Instant::now() < deadline, "a blocked transfer never held a buffer");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut most = dp.buffers_held();
    for i in 0..100u8 {
        let mut c = TcpStream::connect(proxy).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        for round in 0..3u8 {
            round_trip(&mut c, 64, i.wrapping_add(round));
            most = most.max(dp.buffers_held());
        }
    }
    eprintln!("{relay:?}: at most {most} ring buffers held");
    assert!(most <= HELD_BOUND, "{most} ring buffers held with two blocked readers (bound {HELD_BOUND})");
    // The blocked clients go; so do their transfers and buffers.
    for (client, sender) in blocked {
        let _ = client.shutdown(Shutdown::Both);
        drop(client);
        let _ = sender.join().expect("sender thread");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dp.buffers_held() != 0 {
        assert!(std::time::Instant::now() < deadline, "{} buffers never came back", dp.buffers_held());
        std::thread::sleep(Duration::from_millis(20));
    }
    dp.stop();
}

#[test]
fn ring_relay_blocked_readers_hold_a_bounded_share_and_others_are_served() {
    blocked_readers_hold_a_bounded_share(RelayMode::Ring);
}

/// A backend that, on each connection, writes 4000-byte messages every
/// millisecond (4 MiB at most, ending at the first failed write) and
/// echoes nothing: a response of small messages that a client may not read.
fn talker_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = stream;
                let _ = s.set_nodelay(true);
                let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
                for _ in 0..1024 {
                    if s.write_all(&[5u8; 4000]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
    });
    addr
}

/// Enough clients that never read a stream of small messages to take the
/// whole ring in `auto` (each direction holds up to its share, 8 of 256):
/// the ring runs dry, and other connections on the worker must still be
/// served, through splice, while the readers stay blocked.
#[test]
fn auto_relay_serves_others_when_blocked_readers_hold_the_whole_ring() {
    let config = WorkerConfig { workers: 1, pin: false, relay: RelayMode::Auto, ..WorkerConfig::default() };
    let (dp, talker, _snapshot) = serve_backend(config, talker_backend());
    let blocked: Vec<TcpStream> = (0..40)
        .map(|_| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
            socket.set_recv_buffer_size(4 << 10).expect("SO_RCVBUF");
            socket.connect(&talker.into()).expect("connect");
            TcpStream::from(socket)
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while dp.buffers_held() < 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "40 blocked readers held only {} ring buffers",
            dp.buffers_held()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Others on the same worker (and port) read what the talker sends.
    for i in 0..100 {
        let mut c = TcpStream::connect(talker).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut got = vec![0u8; 64 << 10];
        c.read_exact(&mut got).unwrap_or_else(|e| {
            panic!("connection {i} got no reply with {} ring buffers held: {e}", dp.buffers_held())
        });
        assert!(got.iter().all(|b| *b == 5));
    }
    drop(blocked);
    dp.stop();
}
