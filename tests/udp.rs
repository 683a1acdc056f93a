//! UDP through the real binary: a real DNS server and client, the largest
//! datagram, a thousand concurrent flows, idle expiry, a dead endpoint, and
//! affinity. Loopback only; backends and clients started here.

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Proxy, eventually, free_port};
use sha2::{Digest, Sha256};

const SVC: &str = "default/dns";

/// A UDP Service on one unnamed port, with hand-written Endpoints.
fn udp_service(endpoints: &[SocketAddr], extra_spec: &str) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.0.10\n{extra_spec}  ports:\n  - {{port: 53, protocol: UDP}}\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: dns, namespace: default}}\nsubsets:\n"
    );
    for e in endpoints {
        y += &format!(
            "- addresses: [{{ip: \"{}\"}}]\n  ports: [{{port: {}, protocol: UDP}}]\n",
            e.ip(),
            e.port()
        );
    }
    y
}

/// A UDP echo server; with `greet`, it answers every datagram with its own
/// address instead.
fn udp_backend(greet: bool) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind UDP backend");
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(8 << 20);
    let addr = socket.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        let me = addr.to_string();
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let reply = if greet { me.as_bytes() } else { &buf[..n] };
            let _ = socket.send_to(reply, from);
        }
    });
    addr
}

fn client() -> UdpSocket {
    let c = UdpSocket::bind("127.0.0.1:0").expect("bind client");
    c.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    c
}

/// Send and wait for the reply, resending up to 5 times (UDP may drop).
fn exchange(c: &UdpSocket, target: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    for _ in 0..5 {
        c.send_to(msg, target).expect("send");
        if let Ok((n, _)) = c.recv_from(&mut buf) {
            return buf[..n].to_vec();
        }
    }
    panic!("no reply from {target} after 5 tries");
}

struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dns_queries_through_the_proxy_get_the_right_answers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "10.1.2.3 web.ringport.test\n10.1.2.4 db.ringport.test\n").expect("hosts file");
    let port = free_port();
    let dnsmasq = Command::new("dnsmasq")
        .args(["--no-daemon", "--bind-interfaces", "--listen-address=127.0.0.1", "--no-resolv", "--no-hosts"])
        .arg(format!("--port={port}"))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .arg("--pid-file=")
        .arg("--user=root")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (scripts/test.sh installs it)");
    let _dnsmasq = Dnsmasq(dnsmasq);
    let proxy = Proxy::start(&udp_service(&[SocketAddr::from(([127, 0, 0, 1], port))], ""), &[]);
    let target = proxy.proxy_addr(SVC);
    let dig = |name: &str| {
        let out = Command::new("dig")
            .args(["+short", "+tries=3", "+time=1", "-p", &target.port().to_string(), "@127.0.0.1", name])
            .output()
            .expect("dig (scripts/test.sh installs bind9-dnsutils)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    eventually(Duration::from_secs(10), "dnsmasq to answer through the proxy", || {
        dig("web.ringport.test") == "10.1.2.3"
    });
    assert_eq!(dig("db.ringport.test"), "10.1.2.4");
    assert_eq!(dig("web.ringport.test"), "10.1.2.3");
}

#[test]
fn the_largest_datagram_round_trips_unchanged() {
    let echo = udp_backend(false);
    let proxy = Proxy::start(&udp_service(&[echo], ""), &[]);
    let target = proxy.proxy_addr(SVC);
    let c = client();
    let payload: Vec<u8> = (0..65_507u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let back = exchange(&c, target, &payload);
    assert_eq!(back.len(), 65_507);
    assert_eq!(Sha256::digest(&back), Sha256::digest(&payload), "checksums match");
}

#[test]
fn thousand_flows_each_get_their_own_replies() {
    let echo = udp_backend(false);
    let proxy = Proxy::start(&udp_service(&[echo], ""), &["--udp-max-flows", "4000"]);
    let target = proxy.proxy_addr(SVC);
    let clients: Vec<UdpSocket> = (0..1000).map(|_| client()).collect();
    for c in &clients {
        c.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    }
    let mut buf = [0u8; 64];
    let mut resent = 0;
    for round in 0..100 {
        for (i, c) in clients.iter().enumerate() {
            c.send_to(format!("{i}:{round}").as_bytes(), target).expect("send");
        }
        for (i, c) in clients.iter().enumerate() {
            let want = format!("{i}:{round}");
            // A lost datagram is resent; a misrouted one would show up as
            // another client's payload here. A resend whose first copy was
            // only late is answered twice: that late answer of an earlier
            // round of this same client is skipped.
            let mut tries = 0;
            let earlier = |got: &str| {
                got.split_once(':')
                    .is_some_and(|(who, r)| who == i.to_string() && r.parse::<u32>().is_ok_and(|r| r < round))
            };
            let n = loop {
                match c.recv_from(&mut buf) {
                    Ok((n, _)) if earlier(std::str::from_utf8(&buf[..n]).unwrap_or("")) => continue,
                    Ok((n, _)) => break n,
                    Err(_) if tries < 3 => {
                        tries += 1;
                        resent += 1;
                        c.send_to(want.as_bytes(), target).expect("resend");
                    }
                    Err(e) => panic!("client {i} round {round}: no reply: {e}"),
                }
            };
            assert_eq!(std::str::from_utf8(&buf[..n]).expect("utf-8"), want, "reply to the wrong client");
        }
    }
    println!("1000 flows x 100 exchanges: {resent} datagrams resent after a loss");
    let label = "{namespace=\"default\",service=\"dns\",port=\"\"}";
    assert_eq!(proxy.metric(&format!("ringport_udp_flows_created_total{label}")), Some(1000.0));
}

#[test]
fn idle_flows_expire_and_their_sockets_close() {
    let echo = udp_backend(false);
    let proxy = Proxy::start(&udp_service(&[echo], ""), &["--udp-timeout", "1s"]);
    let target = proxy.proxy_addr(SVC);
    let baseline = proxy.fd_count();
    let clients: Vec<UdpSocket> = (0..50).map(|_| client()).collect();
    for c in &clients {
        exchange(c, target, b"ping");
    }
    // Each flow holds a socket while active (some may already have expired
    // on a slow machine; all 50 are checked through the counters below).
    let during = proxy.fd_count();
    assert!(during > baseline, "flows hold sockets while active: {baseline} then {during}");
    eventually(Duration::from_secs(10), "the flows to expire and the fd count to return to baseline", || {
        proxy.fd_count() <= baseline
    });
    let label = "{namespace=\"default\",service=\"dns\",port=\"\"}";
    assert_eq!(proxy.metric(&format!("ringport_udp_flows_expired_total{label}")), Some(50.0));
    assert_eq!(proxy.metric(&format!("ringport_udp_flows_active{label}")), Some(0.0));
}

#[test]
fn a_dead_endpoints_flows_are_repicked_after_icmp_errors() {
    let live = udp_backend(true);
    let dead: SocketAddr = {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr") // closed when `s` drops: ICMP port unreachable
    };
    let proxy = Proxy::start(&udp_service(&[live, dead], ""), &[]);
    let target = proxy.proxy_addr(SVC);
    for i in 0..20 {
        let c = client();
        let who = exchange(&c, target, format!("hello {i}").as_bytes());
        assert_eq!(
            String::from_utf8_lossy(&who),
            live.to_string(),
            "client {i} recovered onto the live endpoint"
        );
    }
    let snap = proxy.snapshot();
    let dead_health = snap["service_ports"][0]["internal"]["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|p| p[0] == dead.to_string()))
        .map(|p| p[1].clone())
        .expect("dead endpoint in the snapshot");
    assert!(
        dead_health["failures"].as_u64().unwrap_or(0) >= 1,
        "ICMP errors counted for health: {dead_health}"
    );
}

#[test]
fn affinity_keeps_a_client_address_on_one_endpoint_across_flows() {
    let backends = [udp_backend(true), udp_backend(true), udp_backend(true)];
    let proxy = Proxy::start(&udp_service(&backends, "  sessionAffinity: ClientIP\n"), &[]);
    let target = proxy.proxy_addr(SVC);
    let mut used = HashSet::new();
    for last in 2..=6u8 {
        let mut seen = HashSet::new();
        for _ in 0..10 {
            // A new source port each time: a new flow from the same address.
            let c = UdpSocket::bind(SocketAddr::from(([127, 0, 0, last], 0))).expect("bind client address");
            c.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
            seen.insert(exchange(&c, target, b"who"));
        }
        assert_eq!(seen.len(), 1, "127.0.0.{last} saw {} endpoints", seen.len());
        used.extend(seen);
    }
    assert!(used.len() > 1, "client addresses spread over endpoints");
}

/// A sink that records which numbered datagrams (first 4 bytes, big
/// endian) arrive, with a large buffer of its own so that losses, if any,
/// are ringport's.
fn numbered_sink() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<HashSet<u32>>>) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind sink");
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(32 << 20);
    let addr = socket.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = socket.recv(&mut buf) {
            if let Some(id) = buf.get(..n.min(4)).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
                record.lock().expect("sink").insert(u32::from_be_bytes(id));
            }
        }
    });
    (addr, seen)
}

fn numbered(id: u32) -> Vec<u8> {
    let mut d = vec![0xa5u8; 32 << 10];
    d[..4].copy_from_slice(&id.to_be_bytes());
    d
}

/// 200 datagrams of 32 KiB sent back to back through one listener: far
/// past a wake-up's 64 KiB budget, so most are read on the pacing timer.
/// Every one arrives (both buffers hold the whole burst: 6.5 MiB).
#[test]
fn a_burst_of_large_datagrams_is_paced_through_and_every_one_arrives() {
    let (sink, seen) = numbered_sink();
    let proxy = Proxy::start(&udp_service(&[sink], ""), &["--workers", "1"]);
    let target = proxy.proxy_addr(SVC);
    let c = client();
    for id in 0..200 {
        c.send_to(&numbered(id), target).expect("send");
    }
    eventually(Duration::from_secs(10), "all 200 datagrams at the sink", || {
        seen.lock().expect("sink").len() == 200
    });
    let label = "{namespace=\"default\",service=\"dns\",port=\"\"}";
    assert_eq!(proxy.metric(&format!("ringport_udp_flows_created_total{label}")), Some(1.0));
}

/// The Service goes away while its listener is paced (a timer armed on
/// it): the timer is cancelled with the listener, and ringport keeps
/// serving the other Service.
#[test]
fn a_service_removed_mid_burst_cancels_its_pacing_and_ringport_keeps_serving() {
    let (sink, seen) = numbered_sink();
    let echo = udp_backend(false);
    let other =
        udp_service(&[echo], "").replace("name: dns", "name: other").replace("10.96.0.10", "10.96.0.11");
    let proxy = Proxy::start(&format!("{}---\n{other}", udp_service(&[sink], "")), &["--workers", "1"]);
    let target = proxy.proxy_addr(SVC);
    let generation = proxy.generation();
    let c = client();
    // The burst flows first (the file source applies a change at once, so
    // a removal written first could land before any datagram passed).
    let mut id = 0;
    let started = std::time::Instant::now();
    while seen.lock().expect("sink").is_empty() && started.elapsed() < Duration::from_secs(5) {
        for _ in 0..50 {
            let _ = c.send_to(&numbered(id), target);
            id += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Bursts of 50 until the removal lands: bounded in count and time.
    proxy.write_manifest(&other);
    let started = std::time::Instant::now();
    while id < 8000 && started.elapsed() < Duration::from_secs(5) {
        for _ in 0..50 {
            let _ = c.send_to(&numbered(id), target); // refused once the port is gone
            id += 1;
        }
        if proxy.generation() > generation {
            break;
        }
    }
    proxy.wait_newer_than(generation);
    assert!(!seen.lock().expect("sink").is_empty(), "the burst went through before the removal");
    let c = client();
    let back = exchange(&c, proxy.proxy_addr("default/other"), b"still here");
    assert_eq!(back, b"still here");
    let log = proxy.log();
    assert!(!log.contains("panicked"), "{log}");
}
