//! The handover's edge cases found in review (issue 12), through the real
//! `ringport` binary in the lab of `tests/upgrade_lab`: a successor
//! started with a low soft fd limit, a successor that never confirms, a
//! handed-over port the new configuration does not serve, a successor that
//! races one still waiting for its first list from the API.
//!
//! Real sockets on loopback only; every loop is bounded in count and time;
//! every path and port is this test's own (tempdirs, ephemeral ports).

mod common;
mod fake_api;
mod upgrade_lab;

use std::time::Duration;

use common::{Backend, echo_ok, free_port};
use upgrade_lab::*;

/// The `sockets=N` a successor logged when it took the old sockets.
fn sockets_taken(log: &str) -> Option<usize> {
    let line = log.lines().find(|l| l.contains("took the old instance's sockets"))?;
    let at = line.find("sockets=")? + "sockets=".len();
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[test]
fn a_successor_with_a_low_soft_fd_limit_takes_more_sockets_than_the_limit() {
    let echoes: Vec<Backend> = (0..5).map(|_| Backend::echo()).collect();
    let ports: Vec<u16> = echoes.iter().map(|_| free_port()).collect();
    let manifest = echoes
        .iter()
        .zip(&ports)
        .enumerate()
        .map(|(i, (e, p))| node_port_service(&format!("web{i}"), (*p, e.addr), None))
        .collect::<Vec<_>>()
        .join("---\n");
    let mut lab = Lab::new();
    let args = ["--workers", "8", "--drain-timeout", "1s"];
    let mut old = lab.first(&manifest, &args);
    let new = lab.start_limited(&manifest, &args, Some(64));
    new.wait_log("handover confirmed");
    let taken = sockets_taken(&new.log());
    assert!(
        taken.is_some_and(|n| n > 64),
        "more than 64 sockets taken under `ulimit -Sn 64`: {taken:?}\n{}",
        new.log()
    );
    assert!(!new.log().contains("handover failed"), "{}", new.log());
    assert!(old.wait_exit(Duration::from_secs(15)).success(), "{}", old.log());
    for (i, p) in ports.iter().enumerate() {
        assert!(echo_ok(local(*p), i), "port {p} serves after the upgrade:\n{}", new.log());
    }
}

/// A successor speaking the handover by hand: says hello and takes the
/// sockets (closing them), then does what the test wants.
fn fake_successor(path: &std::path::Path) -> (socket2::Socket, Vec<String>) {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).expect("socket");
    s.connect(&socket2::SockAddr::unix(path).expect("path")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    send(&s, br#"{"msg":"hello","version":1}"#);
    let mut got = Vec::new();
    while !got.last().is_some_and(|m: &String| m.contains(r#""msg":"end""#)) {
        got.push(recv(&s).expect("a message of the handover"));
    }
    (s, got)
}

fn send(s: &socket2::Socket, msg: &[u8]) {
    use std::os::fd::AsFd;
    ringport::handover::send_with_fds(s.as_fd(), msg, &[]).expect("send");
}

fn recv(s: &socket2::Socket) -> Option<String> {
    use std::os::fd::AsFd;
    let mut buf = vec![0u8; 16 * 1024];
    let (n, _fds) = ringport::handover::recv_with_fds(s.as_fd(), &mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn a_successor_that_never_confirms_leaves_the_old_serving_and_applying_updates() {
    let (echo, added) = (Backend::echo(), Backend::echo());
    let (port, added_port) = (free_port(), free_port());
    let manifest = node_port_service("web", (port, echo.addr), None);
    let mut lab = Lab::new();
    let mut old = lab.first(&manifest, &["--drain-timeout", "1s"]);
    let (fake, got) = fake_successor(&lab.socket);
    assert!(got[0].contains(r#""msg":"welcome""#), "{got:?}");
    old.wait_log("waiting for the successor to confirm");
    // The fake closed the sockets it got: the old one answers, 503.
    let ready = get(lab.admin, "/readyz");
    assert!(ready.as_ref().is_some_and(|(c, b)| *c == 503 && b.contains("handing over")), "{ready:?}");

    // The old engine is free meanwhile: it applies an update.
    let both = format!("{manifest}---\n{}", node_port_service("added", (added_port, added.addr), None));
    let config = lab.dir.path().join("config-1").join("services.yaml");
    std::fs::write(&config, both).expect("update the manifest");
    common::eventually(Duration::from_secs(20), "the old instance serves the added port", || {
        echo_ok(local(added_port), 1)
    });

    // The successor goes away without confirming: the old serves on.
    drop(fake);
    old.wait_log("the successor did not confirm; serving on");
    assert!(old.running() && echo_ok(local(port), 2), "{}", old.log());
    let ready = get(lab.admin, "/readyz");
    assert!(
        ready.as_ref().is_some_and(|(c, _)| *c == 200),
        "ready again after the successor left: {ready:?}"
    );
    // And a real successor takes over afterwards.
    let new = lab.upgrade(
        &mut old,
        &std::fs::read_to_string(&config).expect("manifest"),
        &[],
        Duration::from_secs(1),
    );
    assert!(echo_ok(local(port), 3) && echo_ok(local(added_port), 4), "{}", new.log());
}

#[test]
fn a_successor_whose_confirmation_gets_no_answer_exits_non_zero() {
    let echo = Backend::echo();
    let manifest = node_port_service("web", (free_port(), echo.addr), None);
    let mut lab = Lab::new();
    let old = fake_old(&lab.socket);
    let answer = std::thread::spawn(move || {
        let (conn, _) = old.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let hello = recv(&conn).expect("hello");
        send(&conn, br#"{"msg":"welcome","version":1,"pid":1}"#);
        send(&conn, br#"{"msg":"end","sockets":0}"#);
        // Read the confirmation, never answer it; hold the connection.
        let confirm = recv(&conn);
        std::thread::sleep(Duration::from_secs(3));
        (hello, confirm)
    });
    let mut new = lab.start(&manifest, &["--handover-timeout", "1s"]);
    let status = new.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "exits non-zero:\n{}", new.log());
    assert!(new.log().contains("did not answer our handover confirmation"), "{}", new.log());
    let (hello, confirm) = answer.join().expect("fake old");
    assert!(hello.contains(r#""msg":"hello""#) && confirm.is_some_and(|c| c.contains("confirm")));
}

#[test]
fn a_handed_over_port_without_endpoints_in_the_new_configuration_refuses() {
    let echo = Backend::echo();
    let port = free_port();
    let manifest = node_port_service("web", (port, echo.addr), None);
    // The same Service, with no Endpoints object: its ports refuse.
    let no_endpoints = manifest.split("---\n").next().expect("the Service").to_owned();
    let mut lab = Lab::new();
    let mut old = lab.first(&manifest, &[]);
    let new = lab.upgrade(&mut old, &no_endpoints, &[], Duration::from_secs(10));
    let refused = std::net::TcpStream::connect_timeout(&local(port), Duration::from_secs(1));
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "the handed-over NodePort without endpoints refuses: {refused:?}\n{}",
        new.log()
    );
}

#[test]
fn a_successor_racing_one_that_has_not_published_yet_is_held_and_takes_over_from_it() {
    use fake_api::{FakeApi, node, service, slice};
    let (echo, backend) = (Backend::echo(), Backend::echo());
    let port = free_port();
    let api = FakeApi::start_with_slices_held(vec![
        service(
            "kweb",
            serde_json::json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": backend.addr.port(), "protocol": "TCP"}]}),
        ),
        slice("kweb-1", "kweb", backend.addr.port(), &[("127.0.0.1", "node-1", "zone-a")]),
        node("node-1", "zone-a", serde_json::json!({}), serde_json::json!({})),
    ]);
    let mut lab = Lab::new();
    let kubeconfig = api.kubeconfig(lab.dir.path()).display().to_string();
    let kube = [
        "--source",
        "kube",
        "--kubeconfig",
        &kubeconfig,
        "--node-name",
        "node-1",
        "--drain-timeout",
        "1s",
        "--handover-timeout",
        "20s",
    ];
    let mut old = lab.first(&node_port_service("web", (port, echo.addr), None), &["--drain-timeout", "1s"]);
    // The first successor takes the sockets, then waits for its first list.
    let mut first = lab.start("", &kube);
    first.wait_log("took the old instance's sockets");
    first.wait_log("a successor can take over here");
    // The second finds it there before it published: held, not refused.
    let mut second = lab.start("", &kube);
    first.wait_log("a successor waits until this instance serves its first configuration");
    api.release_slices();
    assert!(old.wait_exit(Duration::from_secs(20)).success(), "{}", old.log());
    second.wait_log("handover confirmed");
    assert!(first.wait_exit(Duration::from_secs(20)).success(), "{}", first.log());
    assert!(!second.log().contains("binding afresh"), "{}", second.log());
    let proxy = upgrade_lab::get(lab.admin, "/debug/snapshot")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|s| s["service_ports"][0]["proxy_port"].as_u64());
    let proxy = proxy.expect("a proxy port in /debug/snapshot");
    assert!(second.running() && echo_ok(local(proxy as u16), 1), "{}", second.log());
}
