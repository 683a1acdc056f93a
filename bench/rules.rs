//! Redirect-rule programming at scale: `cargo bench --bench rules`.
//!
//! Drives the redirect syncer directly (no sockets bound per service) in a
//! private network namespace of its own, so the host's rules are never
//! touched; the namespace and everything in it vanish when it exits.
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and `ip`, `nft`, `iptables`.
//!
//! Measures: a full sync of 1k, 10k and 100k service ports; one service
//! added, removed or changed on top of 100k, given as a whole rule set and
//! given as a snapshot (the path `run` takes: one service port's state
//! replaced, the rest kept, or every port rebuilt); the periodic resync at
//! 100k, untouched and after someone else flushed a chain of ours; one
//! element written by a process per write against a long-lived `nft -i`
//! session; and the connect latency a new connection pays to reach the
//! proxy through a cluster IP with 10 and with 100k services programmed
//! (nft), against a direct connect, and through iptables' linear chain
//! (REDIRECT in both: `bench/intercept.rs` compares REDIRECT with DNAT).
//!
//! Times are wall-clock around the syncer's call; CPU is this process's
//! and its waited-for children's (the rule tools), user and system.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringport::balance::BalanceOptions;
use ringport::balance::health::HealthRegistry;
use ringport::listen::{ListenKey, ListenRole, Listener, ListenerId};
use ringport::metrics::Metrics;
use ringport::model::{
    Endpoint, EndpointAddr, Origin, Protocol, ProxyPort, ServiceName, ServicePort, ServicePortName,
    ServiceVip,
};
use ringport::redirect::iptables::Iptables;
use ringport::redirect::nft::Nft;
use ringport::redirect::rules::{RuleKey, Rules, Target};
use ringport::redirect::syncer::SyncReport;
use ringport::redirect::{Backend, Intercept, Syncer};
use ringport::snapshot::{BalanceContext, Ports, Snapshot};
use ringport::source_ip::SourceOptions;

const SAMPLES_CHANGE: usize = 25;
const SAMPLES_RESYNC: usize = 10;
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

    println!(
        "| what | backend | rules | samples | p50 | p99 | max | CPU p50 (ours + tool) | rule tool p50 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // `cargo bench --bench rules -- resync`: only the rule-set changes and
    // resyncs on top of 100k.
    if std::env::args().any(|a| a == "resync") {
        changes_on_top_of_100k();
        return;
    }
    for n in [1_000, 10_000, 100_000] {
        full_sync("nft", n, || Box::new(Nft { to: Intercept::Redirect }));
    }
    for n in [1_000, 10_000] {
        full_sync("iptables", n, || Box::new(Iptables { to: Intercept::Redirect }));
    }
    // Neither set of iptables rules may sit in the path of the nft figures.
    ringport::redirect::iptables::cleanup().expect("iptables cleanup");
    changes_on_top_of_100k();
    snapshot_changes_on_top_of_100k();
    process_against_session();

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
    // One spec for every rule, as the rules of one service port share it.
    let named = Target::named(ProxyPort(0), service);
    let probe_at = PROBE_INDEX.min(n - 1);
    (0..n)
        .map(|i| {
            let key = RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip(vip(i).into()), dport: 80 };
            let port = match probe {
                Some(p) if i == probe_at => p,
                _ => 20_000 + (i % 40_000) as u16,
            };
            (key, Target { proxy_port: ProxyPort(port), ..named.clone() })
        })
        .collect()
}

fn full_sync(name: &str, n: u32, backend: impl Fn() -> Box<dyn Backend>) {
    let desired = rules(n, None);
    let samples: Vec<Sample> = (0..3)
        .map(|_| {
            let mut s = Syncer::new(backend());
            let desired = desired.clone();
            measure(|| {
                let r = s.sync_rules(desired, false).expect("full sync");
                assert!(r.full);
                r
            })
        })
        .collect();
    row("full sync", name, n, samples);
}

/// Whole rule sets handed to the syncer (`Syncer::sync_rules`).
fn changes_on_top_of_100k() {
    let n = 100_000;
    let mut s = Syncer::new(Box::new(Nft { to: Intercept::Redirect }));
    let base = rules(n, None);
    s.sync_rules(base.clone(), false).expect("full sync");
    let extra = RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip(vip(n).into()), dport: 80 };
    let target = base.values().next().cloned().expect("a rule");
    let (mut add, mut remove, mut change) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..SAMPLES_CHANGE {
        let mut plus = base.clone();
        plus.insert(extra, target.clone());
        add.push(measure(|| s.sync_rules(plus, false).expect("add one")));
        let again = base.clone();
        remove.push(measure(|| s.sync_rules(again, false).expect("remove one")));
        let mut changed = base.clone();
        let key = RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip(vip(i as u32).into()), dport: 80 };
        changed.insert(key, Target { proxy_port: ProxyPort(65_000), ..target.clone() });
        change.push(measure(|| s.sync_rules(changed, false).expect("change one")));
        s.sync_rules(base.clone(), false).expect("change back");
    }
    row("one service added (rule set)", "nft", n, add);
    row("one service removed (rule set)", "nft", n, remove);
    row("one proxy port changed (rule set)", "nft", n, change);
    let resync: Vec<Sample> = (0..SAMPLES_RESYNC)
        .map(|_| {
            let again = base.clone();
            measure(|| s.sync_rules(again, true).expect("resync"))
        })
        .collect();
    row("periodic resync, table untouched", "nft", n, resync);
    // Someone (iptables-nft, a CNI, firewalld) commits to another table:
    // the generation id moves, our table's handles do not.
    let elsewhere: Vec<Sample> = (0..SAMPLES_RESYNC)
        .map(|i| {
            let rule = format!("add table inet elsewhere{i}");
            let wrote = Command::new("nft").args(rule.split(' ')).status();
            assert!(wrote.is_ok_and(|s| s.success()), "nft {rule}");
            let again = base.clone();
            measure(|| s.sync_rules(again, true).expect("resync"))
        })
        .collect();
    row("periodic resync after a foreign write elsewhere", "nft", n, elsewhere);
    let repaired: Vec<Sample> = (0..3)
        .map(|_| {
            let flushed =
                Command::new("nft").args(["flush", "chain", "inet", "ringport", "prerouting"]).status();
            assert!(flushed.is_ok_and(|s| s.success()), "nft flush chain");
            let again = base.clone();
            measure(|| s.sync_rules(again, true).expect("resync"))
        })
        .collect();
    row("periodic resync after an outside `nft flush chain`", "nft", n, repaired);
}

/// `n` service ports as `run` would have them, one proxy listener each
/// (no socket: the rules only read its address).
fn service_ports(n: u32) -> (Vec<ServicePort>, Vec<Arc<Listener>>) {
    let ports = (0..n).map(|i| {
        let name = ServicePortName {
            service: ServiceName::new("bench", format!("svc-{i:06}")),
            port: "http".into(),
        };
        let mut sp = ServicePort::new(name, Origin::new("bench"), Protocol::Tcp, 80);
        sp.cluster_ips = vec![vip(i).into()];
        // 2.5 endpoints per service port on average.
        let count = 2 + i % 2;
        sp.endpoints = (0..count)
            .map(|e| {
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i * 3 + e);
                Endpoint::ready(EndpointAddr(SocketAddr::from((ip, 8080))))
            })
            .collect();
        sp
    });
    let ports: Vec<ServicePort> = ports.collect();
    let listeners = ports
        .iter()
        .zip(0u64..)
        .map(|(sp, i)| {
            let key = ListenKey {
                port: sp.name.clone(),
                protocol: Protocol::Tcp,
                role: ListenRole::Proxy,
                wanted_port: 0,
            };
            let addr = SocketAddr::from(([0, 0, 0, 0], 20_000 + (i % 40_000) as u16));
            Arc::new(Listener::without_sockets(ListenerId(i), key, addr))
        })
        .collect();
    (ports, listeners)
}

/// Snapshots handed to the syncer (`Syncer::sync`, what `run` does): one
/// service port's state replaced and the others' kept (the same `Arc`s),
/// one removed and added back, and every port's state rebuilt.
fn snapshot_changes_on_top_of_100k() {
    let n = 100_000;
    let (options, registry, metrics, source) = (
        BalanceOptions::default(),
        HealthRegistry::default(),
        Arc::new(Metrics::new(1)),
        SourceOptions::default(),
    );
    let ctx = BalanceContext { options: &options, registry: &registry, metrics: &metrics, source: &source };
    let (specs, listeners) = service_ports(n);
    let base = Arc::new(Snapshot::new(1, specs.clone(), listeners.clone(), &Snapshot::default(), &ctx));
    let mut s = Syncer::new(Box::new(Nft { to: Intercept::Redirect }));
    let first = measure(|| s.sync(&base, false).expect("full sync"));
    row("full sync (snapshot)", "nft", n, vec![first]);
    let kept = |ports: Vec<_>, listeners: Vec<_>, generation| {
        let mut snap = Snapshot::default();
        (snap.generation, snap.ports, snap.listeners) = (generation, Ports::from(ports), Arc::new(listeners));
        Arc::new(snap)
    };
    let (mut endpoint, mut removed, mut added, mut rebuilt) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut generation = 1;
    for i in 0..SAMPLES_CHANGE {
        let k = i * 3_989 % n as usize;
        let mut spec = specs[k].clone();
        spec.endpoints.pop();
        let one = Snapshot::new(0, vec![spec], vec![Arc::clone(&listeners[k])], &base, &ctx);
        let mut ports = base.ports.iter().cloned().collect::<Vec<_>>();
        ports[k] = Arc::clone(&one.ports[0]);
        generation += 1;
        let snap = kept(ports, base.listeners.to_vec(), generation);
        endpoint.push(measure(|| s.sync(&snap, false).expect("endpoint change")));
        let (mut ports, mut ls) = (base.ports.iter().cloned().collect::<Vec<_>>(), base.listeners.to_vec());
        ports.remove(k);
        ls.remove(k);
        generation += 1;
        let snap = kept(ports, ls, generation);
        removed.push(measure(|| s.sync(&snap, false).expect("remove one")));
        generation += 1;
        let snap = kept(base.ports.iter().cloned().collect::<Vec<_>>(), base.listeners.to_vec(), generation);
        added.push(measure(|| s.sync(&snap, false).expect("add one back")));
    }
    for i in 0..5 {
        let mut changed = specs.clone();
        changed[i * 7_919].endpoints.pop();
        generation += 1;
        let snap = Arc::new(Snapshot::new(generation, changed, listeners.clone(), &base, &ctx));
        rebuilt.push(measure(|| s.sync(&snap, false).expect("rebuilt snapshot")));
        generation += 1;
        let snap = Arc::new(Snapshot::new(generation, specs.clone(), listeners.clone(), &base, &ctx));
        s.sync(&snap, false).expect("rebuilt back");
    }
    let mut resync = Vec::new();
    for _ in 0..SAMPLES_RESYNC {
        generation += 1;
        let snap = kept(base.ports.iter().cloned().collect::<Vec<_>>(), base.listeners.to_vec(), generation);
        resync.push(measure(|| s.sync(&snap, true).expect("periodic resync")));
    }
    row("periodic resync, table untouched (snapshot)", "nft", n, resync);
    row("one endpoint change, no rule changes (snapshot, other ports kept)", "nft", n, endpoint);
    row("one service removed (snapshot, other ports kept)", "nft", n, removed);
    row("one service added (snapshot, other ports kept)", "nft", n, added);
    row("one endpoint change (snapshot, every port rebuilt)", "nft", n, rebuilt);
}

/// One map element added then deleted, 25 times: a `nft -f -` process per
/// write, against one long-lived `nft -i` session fed a line per write.
fn process_against_session() {
    let element = "inet ringport svc4 { tcp . 10.111.0.1 . 80";
    let lines = [format!("add element {element} : 1 }}"), format!("delete element {element} }}")];
    let mut by_process = Vec::new();
    for _ in 0..SAMPLES_CHANGE {
        for line in &lines {
            let t = Instant::now();
            let mut child = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().expect("nft");
            child.stdin.take().expect("stdin").write_all(format!("{line}\n").as_bytes()).expect("write");
            assert!(child.wait().expect("wait").success(), "{line}");
            by_process.push(t.elapsed());
        }
    }
    let mut session = Command::new("nft")
        .arg("-i")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft -i");
    let mut input = session.stdin.take().expect("stdin");
    let mut output = BufReader::new(session.stdout.take().expect("stdout"));
    let mut by_session = Vec::new();
    for _ in 0..SAMPLES_CHANGE {
        for line in &lines {
            let t = Instant::now();
            // `list tables` answers once the write before it is done.
            input.write_all(format!("{line}\nlist tables\n").as_bytes()).expect("write");
            let mut answer = String::new();
            while !answer.contains("table inet ringport") {
                answer.clear();
                assert!(output.read_line(&mut answer).expect("read") > 0, "nft -i ended");
            }
            by_session.push(t.elapsed());
        }
    }
    drop(input);
    let out = session.wait_with_output().expect("nft -i");
    assert!(out.stderr.is_empty(), "nft -i: {}", String::from_utf8_lossy(&out.stderr));
    println!("\n| one element written by | writes | p50 | p99 | max |\n|---|---|---|---|---|");
    for (what, samples) in
        [("a `nft -f -` process per write", by_process), ("one `nft -i` session", by_session)]
    {
        let (p50, p99, max) = percentiles(samples);
        println!("| {what} | {} | {} | {} | {} |", SAMPLES_CHANGE * 2, ms(p50), ms(p99), ms(max));
    }
}

/// One measured call: wall time, CPU (this process's and the rule tools'
/// it waited for) and the rule tool's share as the syncer saw it.
struct Sample {
    wall: Duration,
    cpu: Duration,
    tool: Duration,
}

fn measure(f: impl FnOnce() -> SyncReport) -> Sample {
    let (cpu0, t0) = (cpu(), Instant::now());
    let report = f();
    Sample { wall: t0.elapsed(), cpu: cpu().saturating_sub(cpu0), tool: report.apply }
}

fn cpu() -> Duration {
    let used = |who| {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the rusage it is given, which lives until
        // it returns; `who` is one of the two constants below.
        if unsafe { libc::getrusage(who, usage.as_mut_ptr()) } != 0 {
            return Duration::ZERO;
        }
        // SAFETY: getrusage succeeded, so it wrote the whole struct (and
        // zeroed() had made every field valid before).
        let u = unsafe { usage.assume_init() };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(u.ru_utime) + tv(u.ru_stime)
    };
    used(libc::RUSAGE_SELF) + used(libc::RUSAGE_CHILDREN)
}

/// p50, p99 (nearest rank) and max.
fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (rank(0.5), rank(0.99), v[v.len() - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn row(what: &str, backend: &str, n: u32, samples: Vec<Sample>) {
    let (p50, p99, max) = percentiles(samples.iter().map(|s| s.wall).collect());
    let (cpu, _, _) = percentiles(samples.iter().map(|s| s.cpu).collect());
    let (tool, _, _) = percentiles(samples.iter().map(|s| s.tool).collect());
    let (count, p50, p99, max) = (samples.len(), ms(p50), ms(p99), ms(max));
    println!("| {what} | {backend} | {n} | {count} | {p50} | {p99} | {max} | {} | {} |", ms(cpu), ms(tool));
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
