//! The scale benchmark: `cargo bench --bench scale [-- --quick | --sizes
//! 1000,10000]` (root). Issue 13's "scale benchmark".
//!
//! For each size N (default 1k, 5k, 9k, 10k, 100k service ports; `--quick`:
//! 1k) and each proxy-port mode the binary has (`per-service`; `shared`
//! when `ringport run --help` lists `--proxy-port-mode`), in a fresh
//! private network namespace: N Services with one TCP port each and 2 or 3
//! placeholder endpoints (2.5 on average, never contacted; with
//! `--node-ports M` the first M are NodePort Services), in JSON
//! manifest files of 5,000 Services each, served by the real `ringport run --source file --redirect
//! nft --workers 2` under the hard RLIMIT_NOFILE. Reports: time from start
//! to /readyz 200, fds, RSS, the namespace's socket figures, the snapshot
//! build time and the first full rule sync, then (unless `--quick` or
//! `--no-idle`) the CPU of the non-worker threads over 32 s left alone,
//! which hold one periodic rule resync. A size that does not fit the fd
//! limit is refused by ringport's fd budget: that refusal is the row.
//! Every run is bounded (180 s) and its ringport killed at its end.

#[path = "node/mod.rs"]
mod node;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

const BOUND: Duration = Duration::from_secs(180);
/// How long a ready ringport is left alone: one periodic resync and a margin.
const IDLE: Duration = Duration::from_secs(32);
/// Services per manifest file.
const PER_FILE: usize = 5_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut sizes = vec![1_000, 5_000, 9_000, 10_000, 100_000];
    let mut idle = true;
    let mut keep = false;
    let mut node_ports = 0;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--quick" => (sizes, idle) = (vec![1_000], false),
            "--no-idle" => idle = false,
            "--keep" => keep = true,
            "--node-ports" => {
                i += 1;
                node_ports = args.get(i).and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
                if node_ports > NODE_PORTS {
                    eprintln!(
                        "bench/scale.rs: --node-ports takes 0..={NODE_PORTS} (the default node-port range)"
                    );
                    std::process::exit(2);
                }
            }
            "--sizes" => {
                i += 1;
                sizes = args
                    .get(i)
                    .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
                    .unwrap_or_default();
            }
            other => {
                eprintln!(
                    "bench/scale.rs: unknown argument {other} (--quick, --sizes N,N, --node-ports N, --no-idle, --keep)"
                );
                std::process::exit(2);
            }
        }
        i += 1;
    }
    let bin = node::bin_dir();
    let version = node::version(&bin);
    let modes = node::proxy_port_modes(&bin);
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| mode | service ports | ready | RSS MB | fds | sockets used | TCP inuse | TCP mem pages | snapshot build ms | full rule sync ms | idle 32 s: control CPU ms, rule syncs (mean ms) | note |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    print!("{table}");
    let started = Instant::now();
    let load = node::loadavg();
    for &n in &sizes {
        let config = scratch.path().join(format!("services-{n}"));
        write_manifests(&config, n, node_ports);
        for mode in &modes {
            let row = run_one(&bin, &config, n, mode, &modes, scratch.path(), idle);
            print!("{row}");
            table.push_str(&row);
        }
    }
    let elapsed = started.elapsed().as_secs();
    let head = format!(
        "# Scale benchmark\n\n{version}; `cargo bench --bench scale -- {}`; 2 workers, --redirect nft, --source file, \
         RLIMIT_NOFILE {}; took {elapsed} s; load average at start {load}.\n\n",
        args.join(" "),
        node::nofile_hard()
    );
    let out = node::results_path("scale", &node::short_commit(&version));
    let quick = sizes == [1_000];
    if !quick {
        std::fs::write(&out, format!("{head}{table}")).expect("write results");
        eprintln!("bench/scale.rs: results in {}", out.display());
    }
    eprintln!("bench/scale.rs: took {elapsed} s");
    if keep {
        let kept = scratch.keep();
        eprintln!("bench/scale.rs: manifests and logs kept in {}", kept.display());
    }
}

/// How many node ports the default range (30000-32767) holds.
const NODE_PORTS: usize = 2_768;

/// N Services and their EndpointSlices as concatenated JSON objects, in a
/// directory of files of [`PER_FILE`] Services each (one file of 100k would
/// pass ringport's 16 MiB limit per manifest file). The first `node_ports`
/// Services are of type NodePort (30000, 30001, ...).
fn write_manifests(dir: &std::path::Path, n: usize, node_ports: usize) {
    std::fs::create_dir_all(dir).expect("manifest dir");
    for start in (0..n).step_by(PER_FILE) {
        let mut text = String::with_capacity(PER_FILE * 600);
        for i in start..(start + PER_FILE).min(n) {
            let mut service = node::service(i);
            if i < node_ports {
                service["spec"]["type"] = "NodePort".into();
                service["spec"]["ports"][0]["nodePort"] = (30_000 + i).into();
            }
            text.push_str(&service.to_string());
            text.push('\n');
            text.push_str(&node::slice(i, &node::placeholder_endpoints(i, 0), None).to_string());
            text.push('\n');
        }
        std::fs::write(dir.join(format!("part-{:03}.json", start / PER_FILE)), text)
            .expect("write manifests");
    }
}

fn run_one(
    bin: &std::path::Path,
    config: &std::path::Path,
    n: usize,
    mode: &str,
    modes: &[&str],
    scratch: &std::path::Path,
    idle: bool,
) -> String {
    // A fresh namespace per run: no rules, sockets or conntrack left over.
    node::enter_private_netns("bench/scale.rs");
    let log = scratch.join(format!("ringport-{n}-{mode}.log"));
    let mut args = vec!["--source", "file", "--config", config.to_str().expect("utf-8 path")];
    if modes.len() > 1 {
        args.extend(["--proxy-port-mode", mode]);
    }
    let started = Instant::now();
    let mut rp = node::spawn_ringport(bin, 2, &args, &log);
    let ready = node::wait_ready(&mut rp, started, BOUND);
    let pid = rp.pid();
    // `prlimit` and `setpriv` exec into ringport: the pid is ringport's.
    let (fds, rss) = (node::fd_count(pid), node::rss_kb(pid));
    let (used, inuse, mem) = node::sockstat();
    let metrics = node::http_get(node::METRICS, "/metrics").map(|(_, b)| b).unwrap_or_default();
    let resync = match (&ready, idle) {
        (Ok(_), true) => idle_window(pid, &metrics),
        _ => "-".into(),
    };
    drop(rp);
    let hist = node::histograms(&metrics);
    let snapshot = snapshot_build_ms(&hist);
    let rules = node::log_duration_ms(&log, "redirect rules synced", "full=true")
        .map_or("-".into(), |v| format!("{v:.1}"));
    let note = start_note(&log);
    match ready {
        Ok(t) => format!(
            "| {mode} | {n} | {} ms | {:.1} | {fds} | {used} | {inuse} | {mem} | {snapshot} | {rules} | {resync} | {note} |\n",
            node::ms(t),
            rss as f64 / 1024.0
        ),
        Err(why) => format!(
            "| {mode} | {n} | never ({why}) | - | - | {used} | {inuse} | {mem} | - | - | - | {} |\n",
            node::last_error(&log).replace('|', "/")
        ),
    }
}

/// Where the start went before the first apply, from ringport's own
/// "manifests read" line (binaries that log it): reading and parsing.
fn start_note(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.contains("manifests read")) else { return String::new() };
    let field = |name: &str| -> Option<f64> {
        line.split(&format!("{name}=")).nth(1)?.split_whitespace().next()?.parse().ok()
    };
    match (field("read_ms"), field("parse_ms")) {
        (Some(read), Some(parse)) => format!("read {read:.0} ms, parse {parse:.0} ms"),
        _ => String::new(),
    }
}

/// The first apply's duration: a snapshot-build histogram when the binary
/// has one (any `*snapshot*_seconds`), else kube-proxy's sync duration,
/// which ringport records as "time to take an update into the snapshot".
fn snapshot_build_ms(h: &std::collections::BTreeMap<String, node::Histogram>) -> String {
    let named = h.iter().find(|(k, _)| k.contains("snapshot") && k.ends_with("_seconds"));
    let (name, hist) = match named.or_else(|| h.get_key_value("kubeproxy_sync_proxy_rules_duration_seconds"))
    {
        Some(x) => x,
        None => return "-".into(),
    };
    if hist.count <= 0.0 {
        return "-".into();
    }
    let short = if name.contains("snapshot") { " (snapshot metric)" } else { "" };
    format!("{:.1}{short}", hist.sum / hist.count * 1e3)
}

/// ringport left alone for [`IDLE`] after ready, which holds one periodic
/// rule resync ([`ringport::redirect::syncer::RESYNC`], 30 s): CPU of every
/// thread but the workers plus the rule tool processes it ran, and the rule
/// syncs in the window (count, mean).
fn idle_window(pid: u32, metrics_at_ready: &str) -> String {
    let before = node::task_cpu(pid);
    let children = node::children_cpu(pid);
    let syncs = |text: &str| node::histograms(text).remove("ringport_sync_duration_seconds");
    let at_ready = syncs(metrics_at_ready);
    std::thread::sleep(IDLE);
    let after = node::task_cpu(pid);
    let metrics = node::http_get(node::METRICS, "/metrics").map(|(_, b)| b).unwrap_or_default();
    let cpu: f64 = node::cpu_by_name(&before, &after)
        .iter()
        .filter(|(name, _)| !name.starts_with("ringport-w"))
        .map(|(_, (t, _))| t)
        .sum::<f64>()
        + (node::children_cpu(pid) - children);
    let synced = match syncs(&metrics) {
        Some(h) => {
            let d = h.since(at_ready.as_ref());
            if d.count > 0.0 { format!("{} ({:.1})", d.count, d.sum / d.count * 1e3) } else { "0".into() }
        }
        None => "-".into(),
    };
    format!("{:.0}, {synced}", cpu * 1e3)
}
