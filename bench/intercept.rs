//! REDIRECT against DNAT to the proxy address, side by side in one run:
//! `cargo bench --bench intercept` (root; `cargo test --bench intercept`
//! runs the same in a debug build).
//!
//! The process moves to a private network namespace (the node) and makes
//! two pod namespaces of its own: a bridge-CNI pod (the node's bridge has
//! an address) and a Calico-style pod (a /32 behind an address-less veth,
//! `default via 169.254.1.1`, proxy ARP). A plain listener on the node's
//! `0.0.0.0:PORT` stands in for a proxy port; one nft map rule sends
//! `10.96.0.10:80` to it, written by ringport's own nft backend, with
//! REDIRECT or with DNAT to 169.254.99.1 on `lo`. The two alternate for
//! several rounds so that load from elsewhere on the machine falls on both.
//!
//! Per (mechanism, client) it prints the median and p99 connect time from
//! the pod (PREROUTING) and from the node itself (OUTPUT), or how many
//! connects got no answer; and the conntrack entries one connection leaves.
//! Traffic stays inside these namespaces; they are removed on exit.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use ringport::model::{Protocol, ProxyPort, ServiceName, ServicePortName, ServiceVip};
use ringport::redirect::nft::Nft;
use ringport::redirect::rules::{RuleKey, Rules, Target};
use ringport::redirect::{DEFAULT_PROXY_ADDRESS, Intercept, Syncer};

const SAMPLES: usize = 2000;
const ROUNDS: usize = 3;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Named pod namespaces, removed when dropped (a panic included).
struct Pods(Vec<String>);

impl Drop for Pods {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &str) {
    let ok = Command::new("ip").args(args.split(' ')).status().is_ok_and(|s| s.success());
    assert!(ok, "ip {args} failed");
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench/intercept.rs: needs root (network namespaces and nft rules)");
        std::process::exit(1);
    }
    // SAFETY: called first thing, before any thread is spawned, so the
    // whole process (and every child it starts) moves to the new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!("bench/intercept.rs: unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    let id = std::process::id();
    let (bridge, cali) = (format!("rpi-{id}-bridge"), format!("rpi-{id}-cali"));
    let _pods = Pods(vec![bridge.clone(), cali.clone()]);
    for ns in [&bridge, &cali] {
        ip(&format!("netns add {ns}"));
        ip(&format!("-n {ns} link set lo up"));
    }
    for args in [
        "link set lo up".to_string(),
        format!("addr add {DEFAULT_PROXY_ADDRESS}/32 dev lo scope host"),
        // The node's uplink (a veth going nowhere) carries the default route.
        "link add up0 type veth peer name up1".into(),
        "addr add 10.100.0.1/24 dev up0".into(),
        "link set up0 up".into(),
        "link set up1 up".into(),
        "route add default via 10.100.0.9".into(),
        // Bridge pod 10.221.0.5 on br0 (10.221.0.1).
        "link add br0 type bridge".into(),
        "addr add 10.221.0.1/24 dev br0".into(),
        "link set br0 up".into(),
        format!("link add vb type veth peer name eth0 netns {bridge}"),
        "link set vb master br0 up".into(),
        format!("-n {bridge} addr add 10.221.0.5/24 dev eth0"),
        format!("-n {bridge} link set eth0 up"),
        format!("-n {bridge} route add default via 10.221.0.1"),
        // Calico pod 10.220.0.5/32 behind caliA (no address, proxy ARP).
        format!("link add caliA type veth peer name eth0 netns {cali}"),
        "link set caliA up".into(),
        "route add 10.220.0.5/32 dev caliA".into(),
        format!("-n {cali} addr add 10.220.0.5/32 dev eth0"),
        format!("-n {cali} link set eth0 up"),
        format!("-n {cali} route add 169.254.1.1 dev eth0 scope link"),
        format!("-n {cali} route add default via 169.254.1.1 dev eth0"),
    ] {
        ip(&args);
    }
    let sysctl = |kv: &str| {
        let ok = Command::new("sysctl").args(["-qw", kv]).status().is_ok_and(|s| s.success());
        assert!(ok, "sysctl {kv}");
    };
    sysctl("net.ipv4.ip_forward=1");
    sysctl("net.ipv4.conf.caliA.proxy_arp=1");

    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("proxy port");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || for _ in listener.incoming() {});
    let service = ServicePortName { service: ServiceName::new("bench", "svc"), port: "".into() };
    let key = RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip(VIP.into()), dport: 80 };
    let rules: Rules = [(key, Target::named(ProxyPort(port), service))].into_iter().collect();

    println!("| mechanism | client | round | median | p99 | no answer |\n|---|---|---|---|---|---|");
    let dnat = Intercept::ProxyAddress { v4: DEFAULT_PROXY_ADDRESS, v6: None };
    for round in 1..=ROUNDS {
        for (name, to) in [("REDIRECT", Intercept::Redirect), ("DNAT to 169.254.99.1", dnat)] {
            Syncer::new(Box::new(Nft { to })).sync_rules(rules.clone(), false).expect("nft sync");
            for (client, ns) in
                [("bridge pod", Some(&bridge)), ("Calico pod", Some(&cali)), ("node (OUTPUT)", None)]
            {
                let line = measure(ns.map(String::as_str));
                println!("| {name} | {client} | {round} | {line} |");
            }
        }
    }
    for (name, to) in [("REDIRECT", Intercept::Redirect), ("DNAT to 169.254.99.1", dnat)] {
        Syncer::new(Box::new(Nft { to })).sync_rules(rules.clone(), false).expect("nft sync");
        println!("conntrack entries per connection, {name}: {}", conntrack_per_connection(&bridge));
    }
}

/// Connect times to the VIP from `ns` (or the node), formatted as table
/// cells. A client that gets no answer is tried 5 times, not `SAMPLES`.
fn measure(ns: Option<&str>) -> String {
    let ns = ns.map(str::to_owned);
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            enter(&ns);
        }
        let to = SocketAddr::from((VIP, 80));
        let mut samples = Vec::with_capacity(SAMPLES);
        let mut failed = 0;
        for _ in 0..SAMPLES {
            let t = Instant::now();
            match TcpStream::connect_timeout(&to, Duration::from_millis(300)) {
                Ok(c) => {
                    samples.push(t.elapsed());
                    // RST instead of FIN: no TIME_WAIT pile-up.
                    let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
                }
                Err(_) => {
                    failed += 1;
                    if failed >= 5 && samples.is_empty() {
                        break;
                    }
                }
            }
        }
        samples.sort();
        let us = |d: Option<&Duration>| d.map_or("-".into(), |d| format!("{:.1} µs", d.as_secs_f64() * 1e6));
        let (median, p99) = (us(samples.get(samples.len() / 2)), us(samples.get(samples.len() * 99 / 100)));
        format!("{median} | {p99} | {failed} of {}", samples.len() + failed)
    })
    .join()
    .expect("measuring thread")
}

/// Move the calling thread into the named network namespace.
fn enter(ns: &str) {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
    // SAFETY: setns on an open namespace fd; it moves only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// New conntrack entries that 100 connections from the bridge pod leave,
/// per connection.
fn conntrack_per_connection(bridge: &str) -> String {
    let count = || {
        let out = Command::new("conntrack").arg("-C").output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse::<i64>().ok()
    };
    let _ = Command::new("conntrack").args(["-F"]).output();
    let Some(before) = count() else { return "conntrack tool missing".into() };
    let bridge = bridge.to_owned();
    std::thread::spawn(move || {
        enter(&bridge);
        for _ in 0..100 {
            if let Ok(c) =
                TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_millis(300))
            {
                let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
            }
        }
    })
    .join()
    .expect("conntrack thread");
    count().map_or("?".into(), |after| format!("{:.2}", (after - before) as f64 / 100.0))
}
