//! The control plane at scale: `cargo bench --bench control` (root).
//!
//! Drives `Control` directly, as the engine does, with one worker serving
//! the published snapshots, at 1k, 10k and 100k service ports of ~2.5
//! endpoints each (no endpoint is ever contacted: no traffic at all). It
//! times a full apply, then one endpoint change, one Service added and one
//! Service deleted on top (p50/p99 over `SAMPLES` each), and a full
//! replace carrying one change (a file reload, an API relist), with the
//! time of each stage (join, budget, bind, loops, commit, build, publish).
//!
//! It runs in a private network namespace of its own (no rules are
//! programmed; nothing outside it is touched): there the ephemeral port
//! range is widened, and half the service ports are TCP and half UDP, so
//! 100k proxy ports fit in 127.0.0.1's two 64k port spaces. RLIMIT_NOFILE
//! is raised (soft and hard) to fs.nr_open.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::ArcSwap;
use ringport::balance::BalanceOptions;
use ringport::balance::health::HealthRegistry;
use ringport::budget::Budget;
use ringport::config::{Manifests, parse_str};
use ringport::control::{Control, Stages};
use ringport::dataplane::{DataPlane, WorkerConfig};
use ringport::listen::{Binder, ListenOptions, ProxyPortMode};
use ringport::metrics::Metrics;
use ringport::model::{EndpointSlice, Protocol, Service, ServiceName, SlicePort};
use ringport::snapshot::Snapshot;
use ringport::table::Delta;

const SAMPLES: usize = 60;

const TEMPLATE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: t, namespace: bench}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: p, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: t-1, namespace: bench, labels: {kubernetes.io/service-name: t}}
addressType: IPv4
ports: [{name: p, port: 8080}]
endpoints: [{addresses: [10.1.0.1]}]
";

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench/control.rs: needs root (a private network namespace, RLIMIT_NOFILE)");
        std::process::exit(1);
    }
    // SAFETY: called first thing, before any thread is spawned, so the
    // whole process moves to the new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!("bench/control.rs: unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    let ok = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
    assert!(ok.is_ok_and(|s| s.success()), "ip link set lo up");
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535").expect("port range");
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let lim = libc::rlimit { rlim_cur: nr_open, rlim_max: nr_open };
    // SAFETY: setrlimit only reads the live struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        // Without CAP_SYS_RESOURCE (a container) the hard limit stays.
        let e = std::io::Error::last_os_error();
        let hard = Budget::of_this_process(1, 0).limit;
        println!("setrlimit({nr_open}): {e}; RLIMIT_NOFILE is {hard} (its hard limit)\n");
    }
    let sizes: Vec<usize> = match std::env::var("CONTROL_BENCH_SIZES") {
        Ok(s) => s.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        Err(_) => vec![1_000, 10_000, 100_000],
    };
    println!(
        "| service ports | what | p50 | p99 | max | join | budget | bind | loops | commit | build | publish |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        run(n);
    }
}

fn run(n: usize) {
    let template = parse_str(TEMPLATE, "bench").expect("template");
    let (service, slice) = (template.services[0].clone(), template.slices[0].clone());
    let mut manifests = Manifests::default();
    for i in 0..n {
        let (s, sl) = object(&service, &slice, i, 0);
        manifests.services.push(Arc::new(s));
        manifests.slices.push(Arc::new(sl));
    }
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let config = WorkerConfig { workers: 1, pin: false, ..WorkerConfig::default() };
    let data_plane = DataPlane::start(Arc::clone(&snapshot), config).expect("data plane");
    let binder = Binder::new(ListenOptions {
        bind_address: Ipv4Addr::LOCALHOST.into(),
        bind_address6: None,
        proxy_port_range: None,
        nodeport_addresses: vec![],
        workers: 1,
        redirect_rules: false,
        proxy_port_mode: ProxyPortMode::PerService,
    });
    let metrics = Arc::new(Metrics::new(1));
    let budget = Budget::of_this_process(1, 1024);
    // Past the fd limit, the budget would refuse the whole state: it is
    // left out, and the listeners that do not fit fail to bind (EMFILE),
    // their ports served without one. A reserve of fds stays free for the
    // rest of the process.
    let fits = (n as u64) + 4096 < budget.limit;
    let reserve: Vec<std::fs::File> = if fits {
        Vec::new()
    } else {
        (0..1024).map(|_| std::fs::File::open("/dev/null").expect("/dev/null")).collect()
    };
    let control = Control::new(
        binder,
        BalanceOptions::default(),
        HealthRegistry::default(),
        metrics,
        snapshot,
        Arc::new(AtomicBool::new(false)),
    );
    let mut control = if fits { control.with_budget(budget) } else { control };

    let full = control.replace(manifests.clone(), &data_plane).expect("full apply").expect("a change");
    assert_eq!(full.service_ports, n);
    drop(reserve);
    if !fits {
        println!(
            "| {n} | (RLIMIT_NOFILE {}: {} listeners bound, the other ports fail EMFILE) | | | | | | | | | | |",
            budget.limit, full.listeners
        );
    }
    row(n, "full apply", &[full.stages]);

    let mut endpoint = Vec::new();
    for k in 0..SAMPLES {
        let i = (k * 7919) % n;
        let (_, sl) = object(&service, &slice, i, k + 1);
        let mut delta = Delta::default();
        delta.slices.insert(sl.id.clone(), Some(Arc::new(sl)));
        endpoint.push(control.apply(delta, &data_plane).expect("endpoint change").expect("a change").stages);
    }
    row(n, "one endpoint change", &endpoint);

    let (mut added, mut deleted) = (Vec::new(), Vec::new());
    for k in 0..SAMPLES {
        let (s, sl) = object(&service, &slice, n + k, 0);
        let mut delta = Delta::default();
        delta.services.insert(s.name.clone(), Some(Arc::new(s)));
        delta.slices.insert(sl.id.clone(), Some(Arc::new(sl)));
        let a = control.apply(delta, &data_plane).expect("service add").expect("a change");
        assert_eq!(a.service_ports, n + k + 1);
        added.push(a.stages);
    }
    for k in 0..SAMPLES {
        let (s, sl) = object(&service, &slice, n + k, 0);
        let mut delta = Delta::default();
        delta.services.insert(s.name.clone(), None);
        delta.slices.insert(sl.id.clone(), None);
        deleted.push(control.apply(delta, &data_plane).expect("service delete").expect("a change").stages);
    }
    row(n, "one Service added", &added);
    row(n, "one Service deleted", &deleted);

    // A relist / reload: the whole state again, one slice changed.
    let mut relist = Vec::new();
    for k in 0..SAMPLES.min(10) {
        let i = (k * 104_729) % n;
        let (_, sl) = object(&service, &slice, i, SAMPLES + k + 1);
        let mut m = manifests.clone();
        m.slices[i] = Arc::new(sl);
        relist.push(control.replace(m, &data_plane).expect("relist").expect("a change").stages);
    }
    row(n, "full replace, one change", &relist);
    data_plane.stop();
}

/// Service `i` (TCP for even, UDP for odd `i`) and its slice, with 2 or 3
/// endpoints (2.5 on average); `version` moves its first endpoint.
fn object(service: &Service, slice: &EndpointSlice, i: usize, version: usize) -> (Service, EndpointSlice) {
    let name = ServiceName::new("bench", format!("s{i}"));
    let protocol = if i.is_multiple_of(2) { Protocol::Tcp } else { Protocol::Udp };
    let mut s = service.clone();
    s.name = name.clone();
    s.cluster_ips = vec![IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i as u32))];
    s.ports[0].protocol = protocol;
    let mut sl = slice.clone();
    sl.id = ServiceName::new("bench", format!("s{i}-1"));
    sl.service = name;
    let mut ports = sl.ports.to_vec();
    ports[0].protocol = protocol;
    sl.ports = SlicePort::shared(&ports);
    let base = 0x0a01_0000 + (i as u32) * 4;
    let template = sl.endpoints[0].clone();
    sl.endpoints = (0..2 + i % 2)
        .map(|e| {
            let mut ep = template.clone();
            let ip = base + e as u32 + if e == 0 { (version as u32) << 24 >> 8 } else { 0 };
            ep.set_addresses(IpAddr::V4(Ipv4Addr::from(ip)));
            ep
        })
        .collect();
    (s, sl)
}

fn row(n: usize, what: &str, stages: &[Stages]) {
    let pick = |f: &dyn Fn(&Stages) -> Duration, q: f64| -> Duration {
        let mut v: Vec<Duration> = stages.iter().map(f).collect();
        v.sort();
        v[((v.len() - 1) as f64 * q).round() as usize]
    };
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let total = |s: &Stages| s.total();
    let stage = |f: &dyn Fn(&Stages) -> Duration| ms(pick(f, 0.5));
    println!(
        "| {n} | {what} ({} samples) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        stages.len(),
        ms(pick(&total, 0.5)),
        ms(pick(&total, 0.99)),
        ms(pick(&total, 1.0)),
        stage(&|s| s.join),
        stage(&|s| s.budget),
        stage(&|s| s.bind),
        stage(&|s| s.loops),
        stage(&|s| s.commit),
        stage(&|s| s.build),
        stage(&|s| s.publish),
    );
}
