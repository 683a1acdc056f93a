//! Endpoint selection through the real binary: retries around dead and
//! black-holed endpoints, passive health, affinity across workers, refusal
//! without endpoints, traffic policy Local and the terminating fallback.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{Backend, Proxy, eventually, free_port, service_with_endpoints, whoami};

const SVC: &str = "default/svc";

/// A Service with one unnamed port and one EndpointSlice per endpoint, so
/// each endpoint may have its own port, node and conditions.
fn service_with_slices(extra_spec: &str, endpoints: &[(SocketAddr, &str, &str)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.7.7\n{extra_spec}  ports:\n  - {{port: 80, protocol: TCP}}\n"
    );
    for (i, (addr, node, conditions)) in endpoints.iter().enumerate() {
        y += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: svc-{i}, namespace: default, labels: {{kubernetes.io/service-name: svc}}}}\n\
             addressType: IPv4\nports: [{{port: {}, protocol: TCP}}]\n\
             endpoints:\n- addresses: [\"{}\"]\n  nodeName: {node}\n  conditions: {conditions}\n",
            addr.port(),
            addr.ip()
        );
    }
    y
}

const READY: &str = "{ready: true}";

/// A connection through `target` and the backend's greeting, or the error.
fn try_whoami(target: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(target)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn refused_at_once(target: SocketAddr) -> bool {
    matches!(TcpStream::connect(target), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

/// The health view of `endpoint` in the snapshot's cluster-IP balancer.
fn health(proxy: &Proxy, endpoint: SocketAddr) -> serde_json::Value {
    let snap = proxy.snapshot();
    let port = snap["service_ports"].as_array().and_then(|p| p.iter().find(|p| p["name"] == SVC)).cloned();
    let endpoints = port.map(|p| p["internal"]["endpoints"].clone()).unwrap_or_default();
    endpoints
        .as_array()
        .and_then(|e| e.iter().find(|pair| pair[0] == endpoint.to_string()))
        .map(|pair| pair[1].clone())
        .unwrap_or_else(|| panic!("{endpoint} not in {snap:#}"))
}

#[test]
fn a_dead_endpoint_costs_clients_nothing_over_10000_connections() {
    let (a, b) = (Backend::greeter(), Backend::greeter());
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let proxy = Proxy::start(&service_with_endpoints("svc", &[a.addr, dead, b.addr]), &[]);
    let target = proxy.proxy_addr(SVC);
    let mut failures = Vec::new();
    for i in 0..10_000 {
        if let Err(e) = try_whoami(target) {
            failures.push((i, e));
        }
    }
    assert!(failures.is_empty(), "{} client-visible failures, first: {:?}", failures.len(), failures.first());
    assert_eq!(
        a.accepted.load(std::sync::atomic::Ordering::SeqCst)
            + b.accepted.load(std::sync::atomic::Ordering::SeqCst),
        10_000
    );
    let h = health(&proxy, dead);
    println!("dead endpoint after 10000 connections: {h}");
    assert!(
        h["attempts"].as_u64().expect("attempts") < 100,
        "passive health kept the dead endpoint out: {h}"
    );
}

#[test]
fn a_black_holed_endpoint_is_ejected_and_stops_costing_the_connect_timeout() {
    let (a, b) = (Backend::greeter(), Backend::greeter());
    // A listener that never accepts, with its tiny backlog filled: the
    // kernel then drops further SYNs to it, silently.
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    hole.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
    hole.listen(0).expect("listen");
    let hole_addr = hole.local_addr().expect("addr").as_socket().expect("inet");
    let hole = TcpListener::from(hole);
    let mut fillers = Vec::new();
    while TcpStream::connect_timeout(&hole_addr, Duration::from_millis(300)).map(|s| fillers.push(s)).is_ok()
    {
        assert!(fillers.len() < 64, "the backlog never filled");
    }
    let proxy = Proxy::start(&service_with_endpoints("svc", &[a.addr, hole_addr, b.addr]), &[]);
    let target = proxy.proxy_addr(SVC);

    let mut times = Vec::new();
    for i in 0..300 {
        let t = Instant::now();
        let who = try_whoami(target).unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        times.push((t.elapsed(), who));
    }
    drop((hole, fillers));
    // The distribution, first 10 connections vs the other 290.
    let slow =
        |xs: &[(Duration, String)]| xs.iter().filter(|(d, _)| *d >= Duration::from_millis(250)).count();
    let pct = |xs: &[(Duration, String)], p: f64| {
        let mut v: Vec<_> = xs.iter().map(|(d, _)| *d).collect();
        v.sort();
        v[((v.len() - 1) as f64 * p) as usize]
    };
    let (head, tail) = times.split_at(10);
    println!(
        "connect+greeting: first 10: {} ≥250ms, p50 {:?}, max {:?}; next 290: {} ≥250ms, p50 {:?}, p99 {:?}, max {:?}",
        slow(head),
        pct(head, 0.5),
        pct(head, 1.0),
        slow(tail),
        pct(tail, 0.5),
        pct(tail, 0.99),
        pct(tail, 1.0)
    );
    let h = health(&proxy, hole_addr);
    println!("black-holed endpoint after 300 connections: {h}");
    assert!(h["failures"].as_u64().expect("failures") >= 3, "it was tried and failed: {h}");
    assert!(
        h["attempts"].as_u64().expect("attempts") <= 8,
        "after ejection it is tried once per back-off at most, not every third connection: {h}"
    );
}

#[test]
fn affinity_holds_across_two_workers_for_ten_client_addresses() {
    let backends = [Backend::greeter(), Backend::greeter(), Backend::greeter()];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let manifest = service_with_endpoints("svc", &addrs)
        .replace("  clusterIP: 10.96.7.7\n", "  clusterIP: 10.96.7.7\n  sessionAffinity: ClientIP\n");
    assert!(manifest.contains("ClientIP"));
    let proxy = Proxy::start(&manifest, &[]);
    let target = proxy.proxy_addr(SVC);
    let mut seen: HashMap<u8, HashSet<String>> = HashMap::new();
    for round in 0..20 {
        for last in 2..=11u8 {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
            socket.bind(&SocketAddr::from(([127, 0, 0, last], 0)).into()).expect("bind client address");
            socket.connect(&target.into()).unwrap_or_else(|e| panic!("round {round} client {last}: {e}"));
            let mut s = TcpStream::from(socket);
            s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            let mut line = String::new();
            let mut byte = [0u8; 1];
            while s.read(&mut byte).expect("greeting") == 1 && byte[0] != b'\n' {
                line.push(byte[0] as char);
            }
            seen.entry(last).or_default().insert(line);
        }
    }
    for (client, endpoints) in &seen {
        assert_eq!(endpoints.len(), 1, "127.0.0.{client} saw {endpoints:?}");
    }
    let used: HashSet<_> = seen.values().flatten().collect();
    assert!(used.len() > 1, "clients spread over more than one endpoint: {used:?}");
}

#[test]
fn no_endpoints_is_refused_at_once_and_an_endpoint_brings_it_back() {
    let a = Backend::greeter();
    let proxy = Proxy::start(&service_with_endpoints("svc", &[]), &[]);
    let target = proxy.proxy_addr(SVC);
    for _ in 0..20 {
        assert!(refused_at_once(target), "a connection without endpoints must be refused, never accepted");
    }
    let g = proxy.generation();
    proxy.write_manifest(&service_with_endpoints("svc", &[a.addr]));
    proxy.wait_newer_than(g);
    assert_eq!(proxy.proxy_addr(SVC), target, "the proxy port was kept while paused");
    eventually(Duration::from_secs(5), "the proxy port to accept again", || {
        try_whoami(target).is_ok_and(|w| w == a.addr.to_string())
    });
    let g = proxy.generation();
    proxy.write_manifest(&service_with_endpoints("svc", &[]));
    proxy.wait_newer_than(g);
    eventually(Duration::from_secs(5), "refusal once the endpoints are gone again", || {
        refused_at_once(target)
    });
}

#[test]
fn traffic_policy_local_uses_only_this_nodes_endpoints() {
    let (here, there) = (Backend::greeter(), Backend::greeter());
    let policy = "  internalTrafficPolicy: Local\n";
    let manifest = service_with_slices(policy, &[(here.addr, "n1", READY), (there.addr, "n2", READY)]);
    let proxy = Proxy::start(&manifest, &["--node-name", "n1"]);
    let target = proxy.proxy_addr(SVC);
    for _ in 0..20 {
        assert_eq!(whoami(target), here.addr.to_string());
    }
    let g = proxy.generation();
    proxy
        .write_manifest(&service_with_slices(policy, &[(here.addr, "n2", READY), (there.addr, "n2", READY)]));
    proxy.wait_newer_than(g);
    eventually(Duration::from_secs(5), "refusal with no local endpoint", || refused_at_once(target));
}

#[test]
fn terminating_endpoints_still_serving_carry_traffic_and_not_serving_ones_never() {
    let a = Backend::greeter();
    let draining = "{ready: false, serving: true, terminating: true}";
    let proxy = Proxy::start(&service_with_slices("", &[(a.addr, "n1", draining)]), &[]);
    let target = proxy.proxy_addr(SVC);
    assert_eq!(whoami(target), a.addr.to_string());
    let g = proxy.generation();
    let gone = "{ready: false, serving: false, terminating: true}";
    proxy.write_manifest(&service_with_slices("", &[(a.addr, "n1", gone)]));
    proxy.wait_newer_than(g);
    eventually(Duration::from_secs(5), "refusal when nothing is serving", || refused_at_once(target));
}

/// 1,200 sequential connections through `proxy`, each counted by the
/// greeting's endpoint; panics on any client-visible failure.
fn spread(proxy: &Proxy, connections: usize) -> HashMap<String, usize> {
    let target = proxy.proxy_addr(SVC);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for i in 0..connections {
        let who = try_whoami(target).unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        *seen.entry(who).or_default() += 1;
    }
    seen
}

/// Four endpoints, the third dead (nothing listens): each survivor's share.
fn dead_one_of_four(args: &[&str]) -> (Proxy, SocketAddr, HashMap<String, usize>, Vec<Backend>) {
    let live = vec![Backend::greeter(), Backend::greeter(), Backend::greeter()];
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let endpoints = [live[0].addr, live[1].addr, dead, live[2].addr];
    let proxy = Proxy::start(&service_with_endpoints("svc", &endpoints), args);
    let seen = spread(&proxy, 1200);
    (proxy, dead, seen, live)
}

fn assert_fair_over_survivors(seen: &HashMap<String, usize>, live: &[Backend], what: &str) {
    println!("{what}: 1200 connections gave {seen:?}");
    assert_eq!(seen.len(), 3, "{what}: only the survivors served: {seen:?}");
    for b in live {
        let n = seen.get(&b.addr.to_string()).copied().unwrap_or(0);
        assert!((380..=420).contains(&n), "{what}: {} took {n}, not 400 ± 5%: {seen:?}", b.addr);
    }
}

#[test]
fn a_dead_endpoints_share_is_spread_over_the_survivors_by_retries() {
    // Never ejected: a quarter of the connections fail over by retry.
    let (proxy, dead, seen, live) = dead_one_of_four(&["--eject-after", "0"]);
    assert_fair_over_survivors(&seen, &live, "dead, retried");
    let h = health(&proxy, dead);
    assert!(h["failures"].as_u64().unwrap_or(0) >= 250, "every fourth pick tried it: {h}");
}

#[test]
fn an_ejected_endpoints_share_is_spread_over_the_survivors_by_skips() {
    let (proxy, dead, seen, live) =
        dead_one_of_four(&["--eject-after", "3", "--eject-backoff", "60s", "--eject-max", "60s"]);
    assert_fair_over_survivors(&seen, &live, "ejected, skipped");
    let h = health(&proxy, dead);
    assert_eq!(h["ejected"], true, "{h}");
    assert_eq!(h["attempts"], 3, "after ejection it is skipped, never tried: {h}");
}

#[test]
fn udp_failures_on_an_address_leave_its_tcp_service_untouched() {
    // Greeters on ports of their own; the UDP Service's endpoint is the
    // first one's address and port, where nothing listens for UDP.
    let backends: Vec<Backend> = (0..3).map(|_| Backend::greeter()).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let shared = addrs[0];
    let udp = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {{port: 53, protocol: UDP}}\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: dns, namespace: default}}\nsubsets:\n\
         - addresses: [{{ip: \"{}\"}}]\n  ports: [{{port: {}, protocol: UDP}}]\n",
        shared.ip(),
        shared.port()
    );
    let proxy = Proxy::start(&(service_with_endpoints("svc", &addrs) + &udp), &[]);
    let endpoint_health = |service: &str| -> serde_json::Value {
        let snap = proxy.snapshot();
        let port =
            snap["service_ports"].as_array().and_then(|p| p.iter().find(|p| p["name"] == service)).cloned();
        let endpoints = port.map(|p| p["internal"]["endpoints"].clone()).unwrap_or_default();
        endpoints
            .as_array()
            .and_then(|e| e.iter().find(|pair| pair[0] == shared.to_string()))
            .map(|pair| pair[1].clone())
            .unwrap_or_else(|| panic!("{shared} not in {service}: {snap:#}"))
    };
    // Nothing listens for UDP on the shared address: each datagram's flow
    // gets ICMP port unreachable, until the UDP endpoint is ejected.
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP client");
    let dns = proxy.proxy_addr("default/dns");
    eventually(Duration::from_secs(10), "the UDP endpoint to be ejected", || {
        client.send_to(b"ping", dns).expect("send datagram");
        std::thread::sleep(Duration::from_millis(20));
        endpoint_health("default/dns")["ejected"] == true
    });
    let udp_view = endpoint_health("default/dns");
    assert!(udp_view["failures"].as_u64().unwrap_or(0) >= 3, "{udp_view}");

    let web = proxy.proxy_addr(SVC);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let who = try_whoami(web).unwrap_or_else(|e| panic!("through {web}: {e}\n{}", proxy.log()));
        *seen.entry(who).or_default() += 1;
    }
    println!("30 connections after UDP failures on {shared}: {seen:?}; UDP view {udp_view}");
    assert_eq!(seen.get(&shared.to_string()), Some(&10), "the shared endpoint keeps its share: {seen:?}");
    let tcp_view = endpoint_health(SVC);
    assert_eq!(tcp_view["failures"], 0, "no UDP failure counted on the TCP endpoint: {tcp_view}");
    assert_eq!(tcp_view["ejected"], false, "{tcp_view}");
}
