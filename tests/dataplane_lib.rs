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
use ringport::dataplane::{DataPlane, WorkerConfig};
use ringport::listen::{Binder, ListenOptions};
use ringport::metrics::Metrics;
use ringport::model::*;
use ringport::snapshot::{BalanceContext, Snapshot};

fn service_port(endpoints: &[SocketAddr]) -> ServicePort {
    let name = ServicePortName { service: ServiceName::new("default", "echo"), port: String::new() };
    let mut sp = ServicePort::new(name, Origin("test".into()), Protocol::Tcp, 80);
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

#[test]
fn snapshot_built_in_code_is_served_by_two_workers() {
    let backend = echo_backend();
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let dp = DataPlane::start(
        Arc::clone(&snapshot),
        WorkerConfig { workers: 2, pin: false, ..WorkerConfig::default() },
    )
    .expect("data plane");
    let mut binder = Binder::new(ListenOptions {
        bind_address: "127.0.0.1".parse().expect("ip"),
        proxy_port_range: None,
        nodeport_addresses: vec![],
        workers: 2,
        redirect_rules: false,
    });
    let ports = vec![service_port(&[backend])];
    let (listeners, errors) = binder.bind(&ports, &[]);
    assert!(errors.is_empty(), "{errors:?}");
    let proxy = listeners[0].addr;
    let (options, registry, metrics) =
        (BalanceOptions::default(), HealthRegistry::default(), Metrics::new(2));
    let ctx = BalanceContext { options: &options, registry: &registry, metrics: &metrics };
    snapshot.store(Arc::new(Snapshot::new(1, ports, listeners, &Snapshot::default(), &ctx)));
    dp.notify();

    for round in 0..20 {
        let mut c = TcpStream::connect(proxy).expect("connect to proxy");
        c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(31) + round) as u8).collect();
        c.write_all(&payload).expect("send");
        c.shutdown(Shutdown::Write).expect("half-close");
        let mut back = Vec::new();
        c.read_to_end(&mut back).expect("echo back, then EOF");
        assert_eq!(back.len(), payload.len());
        assert!(back == payload, "payload corrupted in round {round}");
    }
    dp.stop();
}
