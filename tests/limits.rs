//! `--max-connections` through the real `ringport` binary: at the cap the
//! worker stops accepting, so a further client waits in the kernel's accept
//! queue (not reset, not dialed upstream), and is served once a connection
//! closes.
//!
//! Real sockets on loopback only; every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Backend, Proxy, eventually, service_with_endpoints};

const SVC: &str = "default/svc";

/// The accept queue length of the IPv4 socket listening on `addr`, from
/// /proc/net/tcp (for a listening socket, `rx_queue` is that length).
fn accept_queue(addr: SocketAddr) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 listener expected") };
    let local = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port());
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // f[1] local address, f[3] state (0A: LISTEN), f[4] tx_queue:rx_queue.
        if f.len() > 4 && f[1] == local && f[3] == "0A" {
            f[4].split_once(':').and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
        } else {
            None
        }
    })
}

/// Send `msg` and read its echo (the connection stays open).
fn echo_once(c: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    c.write_all(msg).expect("write through the proxy");
    let mut back = vec![0; msg.len()];
    c.read_exact(&mut back).expect("read the echo");
    back
}

#[test]
fn at_the_connection_cap_clients_wait_in_the_backlog_and_are_served_below_it() {
    let backend = Backend::echo();
    let manifest = service_with_endpoints("svc", &[backend.addr]);
    let proxy = Proxy::start(&manifest, &["--workers", "1", "--max-connections", "2"]);
    let target = proxy.proxy_addr(SVC);
    let connect = || {
        let c = TcpStream::connect(target).expect("connect to the proxy");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        c
    };
    let (mut first, mut second) = (connect(), connect());
    assert_eq!(echo_once(&mut first, b"one"), b"one");
    assert_eq!(echo_once(&mut second, b"two"), b"two");
    assert_eq!(accept_queue(target), Some(0), "both taken by the worker");

    // The third completes its handshake with the kernel, and waits there.
    let mut third = connect();
    third.write_all(b"three").expect("write while waiting");
    eventually(Duration::from_secs(10), "the third client to wait in the accept queue", || {
        accept_queue(target) == Some(1)
    });
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 2, "no upstream dialed for the waiting client");
    assert!(proxy.log().contains("connection cap reached"), "the cap is logged:\n{}", proxy.log());

    // One closes: the worker accepts again and serves the waiting client.
    first.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).expect("the first connection ends cleanly");
    let mut back = vec![0; 5];
    third.read_exact(&mut back).expect("the waiting client is served, not reset");
    assert_eq!(back, b"three");
    assert_eq!(accept_queue(target), Some(0));
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 3);
    assert_eq!(echo_once(&mut second, b"still"), b"still", "the others kept relaying");
}

#[test]
fn a_cap_below_the_worker_count_is_refused_with_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringport"))
        .args(["run", "--config", "/nonexistent", "--redirect", "none", "--workers", "2"])
        .args(["--max-connections", "1"])
        .output()
        .expect("run ringport");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-connections (1) must be 0 or at least --workers (2)"), "{err}");
}
