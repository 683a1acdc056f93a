//! Upgrades that lose nothing (issue 12), through the real `ringport`
//! binary: a new instance takes the listening sockets of the running one
//! over `--handover-socket`, the old one drains and exits 0, and clients
//! never see a refused or reset connection (long transfers: in
//! `tests/handover_transfers.rs`). Then each failure case: no
//! answer, a stale path, another version, differing configurations, and two
//! successors racing; each ends with the new instance serving.
//!
//! Real sockets on loopback only; every loop is bounded in count and time;
//! every path and port is this test's own (tempdirs, ephemeral ports).

mod common;
mod upgrade_lab;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Backend, echo_ok, eventually, free_port, udp_backend};
use upgrade_lab::*;

#[test]
fn five_upgrades_in_a_row_fail_no_tcp_connection_and_leave_no_udp_request_unanswered() {
    let (echo, udp) = (Backend::echo(), udp_backend(None));
    let (tcp_port, udp_port) = (free_port(), free_udp_port());
    let manifest = node_port_service("web", (tcp_port, echo.addr), Some((udp_port, udp)));
    let mut lab = Lab::new();
    let args = ["--drain-timeout", "5s"];
    let mut current = lab.first(&manifest, &args);
    let proxy_ports = (proxy_port(lab.admin, "default/web:tcp"), proxy_port(lab.admin, "default/web:udp"));

    let stop = Arc::new(AtomicBool::new(false));
    let tcp: Vec<_> = (0..2).map(|_| tcp_load(local(tcp_port), Arc::clone(&stop))).collect();
    let udp = udp_load(local(udp_port), Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(300));
    for round in 1..=5 {
        current = lab.upgrade(&mut current, &manifest, &args, Duration::from_secs(5));
        let now = (proxy_port(lab.admin, "default/web:tcp"), proxy_port(lab.admin, "default/web:udp"));
        assert_eq!(now, proxy_ports, "upgrade {round}: the proxy ports moved with the sockets");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let tcp: Vec<TcpFigures> = tcp.into_iter().map(|t| t.join().expect("tcp client")).collect();
    let udp = udp.join().expect("udp client");
    let made: u64 = tcp.iter().map(|f| f.made).sum();
    let failed: u64 = tcp.iter().map(|f| f.failed).sum();
    let gap = tcp.iter().map(|f| f.longest_gap).max().unwrap_or_default();
    println!(
        "5 upgrades: TCP connections made {made}, failed {failed}, longest gap {gap:?}; \
         UDP requests answered {}, retries {}, most retries of one request {}, longest gap {:?}",
        udp.answered, udp.retries, udp.most_retries, udp.longest_gap
    );
    assert!(made > 50, "the TCP load ran: {tcp:?}");
    assert_eq!(failed, 0, "no TCP connection failed across 5 upgrades: {tcp:?}\n{}", current.log());
    assert!(udp.answered > 10, "the UDP stream ran: {udp:?}");
    assert!(udp.most_retries <= 1, "no UDP request needed more than one retry: {udp:?}");
}

#[test]
fn connections_queued_in_the_old_backlog_are_served_by_the_successor() {
    let echo = Backend::echo();
    let port = free_port();
    let manifest = node_port_service("web", (port, echo.addr), None);
    let mut lab = Lab::new();
    // One worker holding at most one connection: with one open, the old
    // instance accepts no more, and the next clients wait in the backlog.
    let old_args = ["--workers", "1", "--max-connections", "1", "--drain-timeout", "2s"];
    let mut old = lab.first(&manifest, &old_args);
    let mut held = TcpStream::connect(local(port)).expect("connect");
    held.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    held.write_all(b"hold").expect("send");
    let mut back = [0u8; 4];
    held.read_exact(&mut back).expect("the held connection is served");
    let queued: Vec<TcpStream> = (0..5)
        .map(|i| {
            let mut c = TcpStream::connect(local(port)).expect("the kernel completes the handshake");
            c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            c.write_all(format!("queued {i}").as_bytes()).expect("send");
            c.shutdown(Shutdown::Write).expect("half-close");
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(old.log().contains("connection cap"), "the old instance is at its cap:\n{}", old.log());

    let _new = lab.upgrade(&mut old, &manifest, &["--workers", "1"], Duration::from_secs(2));
    for (i, mut c) in queued.into_iter().enumerate() {
        let mut answer = String::new();
        c.read_to_string(&mut answer).expect("a queued client is answered, not reset");
        assert_eq!(answer, format!("queued {i}"), "served by the successor from the same backlog");
    }
}

#[test]
fn a_stale_socket_path_binds_afresh() {
    let mut lab = Lab::new();
    drop(fake_old(&lab.socket));
    assert!(lab.socket.exists(), "the path stays behind");
    serves_after_binding_afresh(&mut lab, "stale handover socket");
}

#[test]
fn an_old_instance_that_never_answers_times_out_and_binds_afresh() {
    let mut lab = Lab::new();
    // Listening, never accepting: the hello waits in the backlog.
    let _hung = fake_old(&lab.socket);
    serves_after_binding_afresh(&mut lab, "no answer from the other instance within 1s");
}

#[test]
fn an_old_instance_of_another_version_is_refused_and_the_new_binds_afresh() {
    let mut lab = Lab::new();
    let old = fake_old(&lab.socket);
    let answer = std::thread::spawn(move || {
        let (mut conn, _) = old.accept().expect("accept");
        let mut hello = [0u8; 256];
        let n = conn.read(&mut hello).expect("hello");
        conn.write_all(br#"{"msg":"welcome","version":99,"pid":1}"#).expect("welcome");
        String::from_utf8_lossy(&hello[..n]).into_owned()
    });
    serves_after_binding_afresh(&mut lab, "speaks handover version 99");
    assert!(answer.join().expect("fake old").contains(r#""version":1"#));
}

#[test]
fn a_successor_of_another_version_is_refused_and_the_old_serves_on() {
    let echo = Backend::echo();
    let port = free_port();
    let manifest = node_port_service("web", (port, echo.addr), None);
    let mut lab = Lab::new();
    let mut old = lab.first(&manifest, &[]);
    let mut s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).expect("socket");
    s.connect(&socket2::SockAddr::unix(&lab.socket).expect("path")).expect("connect");
    s.write_all(br#"{"msg":"hello","version":99}"#).expect("hello");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut answer = [0u8; 256];
    let n = s.read(&mut answer).expect("an answer");
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.contains(r#""msg":"refuse""#), "{answer}");
    old.wait_log("refused a successor of another version");
    assert!(old.running() && echo_ok(local(port), 1), "the old instance serves on:\n{}", old.log());
}

#[test]
fn differing_configurations_adopt_what_matches_bind_the_rest_and_close_the_others() {
    let (kept, dropped, added) = (Backend::echo(), Backend::echo(), Backend::echo());
    let (kept_port, dropped_port, added_port) = (free_port(), free_port(), free_port());
    let old_manifest = format!(
        "{}---\n{}",
        node_port_service("kept", (kept_port, kept.addr), None),
        node_port_service("dropped", (dropped_port, dropped.addr), None)
    );
    let new_manifest = format!(
        "{}---\n{}",
        node_port_service("kept", (kept_port, kept.addr), None),
        node_port_service("added", (added_port, added.addr), None)
    );
    let mut lab = Lab::new();
    let mut old = lab.first(&old_manifest, &[]);
    let kept_proxy = proxy_port(lab.admin, "default/kept:tcp");
    let new = lab.upgrade(&mut old, &new_manifest, &[], Duration::from_secs(10));
    assert_eq!(proxy_port(lab.admin, "default/kept:tcp"), kept_proxy, "the matching proxy port was adopted");
    assert!(
        echo_ok(local(kept_port), 1) && echo_ok(local(added_port), 2),
        "kept and added serve:\n{}",
        new.log()
    );
    let refused = TcpStream::connect_timeout(&local(dropped_port), Duration::from_secs(1));
    assert!(
        matches!(&refused, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "the port the new configuration dropped is closed: {refused:?}"
    );
    assert!(new.log().contains("a socket this configuration does not want; closed"), "{}", new.log());
}

#[test]
fn two_successors_racing_take_over_one_after_the_other() {
    let echo = Backend::echo();
    let port = free_port();
    let manifest = node_port_service("web", (port, echo.addr), None);
    let mut lab = Lab::new();
    let mut old = lab.first(&manifest, &["--drain-timeout", "2s"]);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tcp_load(local(port), Arc::clone(&stop));
    let mut a = lab.start(&manifest, &["--drain-timeout", "2s"]);
    let mut b = lab.start(&manifest, &["--drain-timeout", "2s"]);
    assert!(old.wait_exit(Duration::from_secs(20)).success(), "{}", old.log());
    // The later one takes over from the earlier one, which then exits 0.
    eventually(Duration::from_secs(20), "one successor left", || a.running() != b.running());
    let (mut gone, mut left) = if a.running() { (b, a) } else { (a, b) };
    assert!(gone.wait_exit(Duration::from_secs(1)).success(), "{}", gone.log());
    assert!(left.log().contains("handover confirmed"), "{}", left.log());
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let f = load.join().expect("load");
    println!("two racing successors: TCP connections made {}, failed {}", f.made, f.failed);
    assert_eq!(f.failed, 0, "{f:?}");
    assert!(left.running() && echo_ok(local(port), 1), "{}", left.log());
}

#[test]
fn with_wait_after_handover_the_old_instance_waits_for_sigterm_and_a_plain_stop_removes_the_socket() {
    let echo = Backend::echo();
    let port = free_port();
    let manifest = node_port_service("web", (port, echo.addr), None);
    let mut lab = Lab::new();
    let args = ["--wait-after-handover", "--drain-timeout", "1s"];
    let mut old = lab.first(&manifest, &args);
    let mut new = lab.start(&manifest, &args);
    new.wait_log("handover confirmed");
    old.wait_log("waiting for SIGTERM");
    assert!(old.running(), "drained, and still there: a DaemonSet pod must not exit on its own");
    assert!(echo_ok(local(port), 1), "the successor serves:\n{}", new.log());
    let kill = |i: &Instance| Command::new("kill").arg("-TERM").arg(i.child.id().to_string()).status();
    assert!(kill(&old).expect("kill").success());
    assert!(old.wait_exit(Duration::from_secs(5)).success(), "{}", old.log());
    assert!(lab.socket.exists(), "the successor's socket stays");

    // The successor stops with no one to hand over to: it removes its socket.
    assert!(kill(&new).expect("kill").success());
    assert!(new.wait_exit(Duration::from_secs(10)).success(), "{}", new.log());
    assert!(!lab.socket.exists(), "a plain stop leaves no stale socket behind");
}
