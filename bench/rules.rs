//! Redirect-rule programming at scale: `cargo bench --bench rules`.
//!
//! Drives the redirect syncer directly (no sockets bound per service) in a
//! private network namespace of its own, so the host's rules are never
//! touched; the namespace and everything in it vanish when it exits.
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and `ip`, `nft`, `iptables`.
//!
//! Measures: a full sync of 1k, 10k and 100k service ports; one service
//! added, removed or changed on top of 100k; the periodic resync at 100k;
//! and the connect latency a new connection pays to reach the proxy
//! through a cluster IP with 10 and with 100k services programmed (nft),
//! against a direct connect, and through iptables' linear chain (REDIRECT
//! in both: `bench/intercept.rs` compares REDIRECT with DNAT).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use ringport::model::{Protocol, ProxyPort, ServiceName, ServicePortName, ServiceVip};
use ringport::redirect::iptables::Iptables;
use ringport::redirect::nft::Nft;
use ringport::redirect::rules::{RuleKey, Rules, Target};
use ringport::redirect::syncer::SyncReport;
use ringport::redirect::{Backend, Intercept, Syncer};

const SAMPLES_CHANGE: usize = 25;
const SAMPLES_CONNECT: usize = 3000;
/// The cluster IP the connect probes use: the last of 100k.
const PROBE_INDEX: u32 = 99_999;

fn main() {
    // cargo bench passes `--bench`; nothing else is accepted.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench/rules.rs: needs root (a private network namespace and nft rules)");
        std::process::exit(1);
    }
    // SAFETY: called first thing, before any thread is spawned, so the
    // whole process (and every child it starts) moves to the new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!("bench/rules.rs: unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    for args in [
        "link set lo up",
        "link add d0 type veth peer name d1",
        "link set d1 up",
        "addr add 10.200.0.1/24 dev d0",
        "link set d0 up",
        "route add 10.96.0.0/12 dev d0",
    ] {
        let ok = Command::new("ip").args(args.split(' ')).status().is_ok_and(|s| s.success());
        assert!(ok, "ip {args} failed");
    }

    println!("| what | backend | rules | median | min | max | of which the rule tool (median) |");
    println!("|---|---|---|---|---|---|---|");
    for n in [1_000, 10_000, 100_000] {
        full_sync("nft", n, || Box::new(Nft { to: Intercept::Redirect }));
    }
    for n in [1_000, 10_000] {
        full_sync("iptables", n, || Box::new(Iptables { to: Intercept::Redirect }));
    }
    // Neither set of iptables rules may sit in the path of the nft figures.
    ringport::redirect::iptables::cleanup().expect("iptables cleanup");
    changes_on_top_of_100k();

    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("proxy port");
    let proxy = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || for _ in listener.incoming() {});
    let probe = |n: u32| SocketAddr::from((vip(PROBE_INDEX.min(n - 1)), 80));
    println!("\n| connect to | rules programmed | median | p99 |\n|---|---|---|---|");
    connect_latency("127.0.0.1:proxy (direct, no rule)", SocketAddr::from(([127, 0, 0, 1], proxy)), 0);
    for n in [10, 100_000] {
        let mut s = Syncer::new(Box::new(Nft { to: Intercept::Redirect }));
        s.sync_rules(rules(n, Some(proxy)), false).expect("nft sync");
        connect_latency("cluster IP via nft map", probe(n), n);
    }
    for n in [10, 10_000] {
        let mut s = Syncer::new(Box::new(Iptables { to: Intercept::Redirect }));
        ringport::redirect::nft::cleanup().expect("nft cleanup");
        s.sync_rules(rules(n, Some(proxy)), false).expect("iptables sync");
        connect_latency("cluster IP via iptables chain (probe last)", probe(n), n);
    }
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

/// `n` service ports on 10.96.0.0 onwards; with `probe`, the rule for
/// [`PROBE_INDEX`] (or the last one) points at that proxy port.
fn rules(n: u32, probe: Option<u16>) -> Rules {
    let service = ServicePortName { service: ServiceName::new("bench", "svc"), port: "http".into() };
    let probe_at = PROBE_INDEX.min(n - 1);
    (0..n)
        .map(|i| {
            let key = RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip(vip(i).into()), dport: 80 };
            let port = match probe {
                Some(p) if i == probe_at => p,
                _ => 20_000 + (i % 40_000) as u16,
            };
            (key, Target { proxy_port: ProxyPort(port), service: service.clone() })
        })
        .collect()
}

fn full_sync(name: &str, n: u32, backend: impl Fn() -> Box<dyn Backend>) {
    let desired = rules(n, None);
    let samples: Vec<SyncReport> = (0..3)
        .map(|_| {
            let mut s = Syncer::new(backend());
            let r = s.sync_rules(desired.clone(), false).expect("full sync");
            assert!(r.full);
            r
        })
        .collect();
    row("full sync", name, n, samples);
}

fn changes_on_top_of_100k() {
    let n = 100_000;
    let mut s = Syncer::new(Box::new(Nft { to: Intercept::Redirect }));
    let base = rules(n, None);
    s.sync_rules(base.clone(), false).expect("full sync");
    let extra = RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip(vip(n).into()), dport: 80 };
    let target = base.values().next().cloned().expect("a rule");
    let mut add = Vec::new();
    let mut remove = Vec::new();
    let mut change = Vec::new();
    for i in 0..SAMPLES_CHANGE {
        let mut plus = base.clone();
        plus.insert(extra, target.clone());
        add.push(s.sync_rules(plus, false).expect("add one"));
        remove.push(s.sync_rules(base.clone(), false).expect("remove one"));
        let mut changed = base.clone();
        let key = RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip(vip(i as u32).into()), dport: 80 };
        changed.insert(key, Target { proxy_port: ProxyPort(65_000), ..target.clone() });
        change.push(s.sync_rules(changed, false).expect("change one"));
        s.sync_rules(base.clone(), false).expect("change back");
    }
    row("one service added", "nft", n, add);
    row("one service removed", "nft", n, remove);
    row("one proxy port changed", "nft", n, change);
    let resync: Vec<SyncReport> = (0..3).map(|_| s.sync_rules(base.clone(), true).expect("resync")).collect();
    row("periodic resync (full rewrite)", "nft", n, resync);
}

fn row(what: &str, backend: &str, n: u32, reports: Vec<SyncReport>) {
    let median = |mut v: Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (mid, min, max) = median(reports.iter().map(|r| r.duration).collect());
    let (tool, _, _) = median(reports.iter().map(|r| r.apply).collect());
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    println!("| {what} | {backend} | {n} | {} | {} | {} | {} |", ms(mid), ms(min), ms(max), ms(tool));
}

fn connect_latency(what: &str, to: SocketAddr, programmed: u32) {
    let mut samples: Vec<Duration> = (0..SAMPLES_CONNECT)
        .map(|_| {
            let t = Instant::now();
            let c = TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect");
            let d = t.elapsed();
            // RST instead of FIN: no TIME_WAIT pile-up over thousands of samples.
            let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
            d
        })
        .collect();
    samples.sort();
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    println!(
        "| {what} | {programmed} | {} | {} |",
        us(samples[samples.len() / 2]),
        us(samples[samples.len() * 99 / 100])
    );
}
