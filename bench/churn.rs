//! The churn benchmark: `cargo bench --bench churn [-- --quick] [--source
//! file,dir,api] [--services N] [--rate R] [--seconds S] [--crr-conns C]`
//! (root). Issue 13's "churn benchmark".
//!
//! In a private network namespace (only loopback): N Services (default
//! 10k, one TCP port, 2 or 3 placeholder endpoints), served by the real
//! `ringport run --redirect nft`, in shared proxy-port mode when the binary
//! has it (else per-service, with 1 worker where 2 would not fit the fd
//! limit: `--mode`, `--workers` override), fed by (a) one manifest file,
//! (b) a directory of files of 100 Services each, or (c) the fake API
//! server of `tests/fake_api` (`--source kube`). Then, for S seconds
//! (default 60), R EndpointSlice changes per second (default 100; files are
//! rewritten atomically, temp + rename; every changed slice carries its
//! `endpoints.kubernetes.io/last-change-trigger-time`), while:
//! - `loadgen tcp-crr` runs closed-loop (C connections, default 10, one
//!   loadgen worker: about one core of load) against the 10 Services that
//!   never change, through their cluster IPs and the nft rules, to a real
//!   `loadgen serve` echo: failed connections, goal 0;
//! - a probe Service's one endpoint flips between two real backends that
//!   greet with their identity (`loadgen serve --greet`): the network
//!   programming latency measured from outside is the time from just
//!   before the write/apply of a flip to the first new connection answered
//!   by the new backend (each flip waits up to 10 s, then counts as unseen,
//!   and the next flip waits, uncounted, until the pending one shows);
//! - ringport's own network-programming histogram is read before and after
//!   (`ringport_network_programming_duration_seconds` when the binary has
//!   it, else kube-proxy's coarse-bucket `kubeproxy_...` one);
//! - CPU per thread of ringport (/proc/PID/task/*/stat) over the window:
//!   the control plane is every thread not named `ringport-w*` (workers),
//!   plus the rule tool processes (`nft`) it ran (`cutime`/`cstime`).
//!
//! Every loop is bounded in count and time; every process dies with the
//! bench; the namespace vanishes with its last process.

#[path = "../tests/fake_api/mod.rs"]
mod fake_api;
#[path = "node/mod.rs"]
mod node;
#[path = "node/sink.rs"]
mod sink;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sink::Sink;

/// Services that never change (0..STABLE) carry the loadgen traffic.
const STABLE: usize = 10;
const READY_BOUND: Duration = Duration::from_secs(180);
/// How long one probe flip may take to show before it counts as unseen.
const FLIP_BOUND: Duration = Duration::from_secs(10);
/// How long an unseen flip may take to show before the probe gives up.
const PENDING_BOUND: Duration = Duration::from_secs(30);
/// Pause between a flip seen and the next one.
const FLIP_GAP: Duration = Duration::from_millis(300);

#[derive(Clone)]
struct Opts {
    services: usize,
    rate: u32,
    seconds: u64,
    crr_conns: u32,
    sources: Vec<String>,
    /// `--proxy-port-mode` to pass (None: the binary has no such flag).
    mode: Option<String>,
    workers: Option<usize>,
    args: String,
}

fn parse() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut o = Opts {
        services: 10_000,
        rate: 100,
        seconds: 60,
        crr_conns: STABLE as u32,
        sources: vec!["file".into(), "dir".into(), "api".into()],
        mode: None,
        workers: None,
        args: args.join(" "),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--quick" => (o.services, o.seconds) = (1_000, 10),
            "--services" => o.services = value().parse().unwrap_or(o.services),
            "--rate" => o.rate = value().parse().unwrap_or(o.rate),
            "--seconds" => o.seconds = value().parse().unwrap_or(o.seconds),
            "--crr-conns" => o.crr_conns = value().parse().unwrap_or(o.crr_conns),
            "--source" => o.sources = value().split(',').map(str::to_owned).collect(),
            "--mode" => o.mode = Some(value()),
            "--workers" => o.workers = value().parse().ok(),
            other => {
                eprintln!("bench/churn.rs: unknown argument {other} (see the header of bench/churn.rs)");
                std::process::exit(2);
            }
        }
    }
    o.services = o.services.max(STABLE + 10);
    o.rate = o.rate.max(1);
    o
}

fn main() {
    let mut o = parse();
    let bin = node::bin_dir();
    // Shared proxy ports when the binary has them; per-service ports need a
    // socket per Service per worker: with fewer workers when 2 do not fit.
    let modes = node::proxy_port_modes(&bin);
    if o.mode.is_none() && modes.contains(&"shared") {
        o.mode = Some("shared".into());
    }
    let per_service = o.mode.as_deref().is_none_or(|m| m == "per-service");
    let workers =
        o.workers.unwrap_or(if per_service && !node::per_service_fits(o.services + 1, 2) { 1 } else { 2 });
    o.workers = Some(workers);
    let version = node::version(&bin);
    let started = Instant::now();
    let load = node::loadavg();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| source | services | changes (per s) | probe flips seen | external p50 / p99 / max ms | ringport histogram p50 / p99 ms (n) | reloads (mean ms) | rule syncs (mean ms) | control-plane CPU s | loadgen completed | loadgen failed |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|---|---|");
    let mut notes = String::new();
    for source in &o.sources {
        let (row, note) = run(&o, &bin, source);
        print!("{row}");
        eprintln!("{note}");
        table.push_str(&row);
        notes.push_str(&note);
    }
    let elapsed = started.elapsed().as_secs();
    eprintln!("bench/churn.rs: took {elapsed} s");
    if o.seconds >= 60 {
        let head = format!(
            "# Churn benchmark\n\n{version}; `cargo bench --bench churn -- {}`; {} Services, {} changes/s for {} s, \
             closed-loop loadgen tcp-crr (-c {}, 1 worker) on {STABLE} unchanged Services; proxy-port mode {}, {workers} worker(s), --redirect nft; took {elapsed} s; load average at start {load}.\n\n",
            o.args,
            o.services,
            o.rate,
            o.seconds,
            o.crr_conns,
            o.mode.as_deref().unwrap_or("per-service (no --proxy-port-mode)")
        );
        let out = node::results_path("churn", &node::short_commit(&version));
        std::fs::write(&out, format!("{head}{table}\n{notes}")).expect("write results");
        eprintln!("bench/churn.rs: results in {}", out.display());
    }
}

/// A `loadgen serve` backend: (process, its first listener's address).
fn backend(
    bin: &Path,
    id: &str,
    addr: &str,
    greet: bool,
    scratch: &Path,
    bound: u64,
) -> (node::Guarded, SocketAddr) {
    let loadgen = bin.join("loadgen");
    let duration = format!("{bound}s");
    let mut args = vec![loadgen.to_str().expect("utf-8"), "serve", "--id", id, "--workers", "1"];
    args.extend(["--tcp-echo", addr, "--duration", &duration]);
    if greet {
        args.push("--greet");
    }
    let mut g = node::Guarded::spawn(&args, Stdio::piped(), &scratch.join(format!("serve-{id}.log")));
    let mut line = String::new();
    let stdout = g.child.stdout.take().expect("stdout");
    BufReader::new(stdout).read_line(&mut line).expect("loadgen serve output");
    let bound: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("loadgen serve said {line:?}: {e}"));
    let addr = bound["listening"][0]["addr"].as_str().expect("listening addr").parse().expect("addr");
    (g, addr)
}

/// One probe connection to `vip`: the greeting's first word, if any.
fn greeting(vip: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    String::from_utf8_lossy(&buf[..n]).split_whitespace().next().map(str::to_owned)
}

/// The probe: asks the writer for a flip (to A or B), gets the write's
/// start, then connects until the new backend answers. Latencies (None:
/// not seen within [`FLIP_BOUND`]).
fn probe(
    vip: SocketAddr,
    until: Instant,
    ask: mpsc::Sender<&'static str>,
    told: mpsc::Receiver<Instant>,
) -> Vec<Option<Duration>> {
    let mut out = Vec::new();
    let mut next = "B";
    while Instant::now() + FLIP_GAP < until {
        if ask.send(next).is_err() {
            break;
        }
        let Ok(written) = told.recv_timeout(Duration::from_secs(5)) else { break };
        let mut seen = None;
        while written.elapsed() < FLIP_BOUND {
            if greeting(vip).as_deref() == Some(next) {
                seen = Some(written.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        out.push(seen);
        // An unseen flip is still pending: until it shows, the next flip
        // back would be "seen" at once. Wait for it (bounded), uncounted.
        if seen.is_none() && !answers_within(vip, next, PENDING_BOUND) {
            break;
        }
        next = if next == "A" { "B" } else { "A" };
        std::thread::sleep(FLIP_GAP);
    }
    out
}

/// Whether `vip` answers with `who` within `bound`.
fn answers_within(vip: SocketAddr, who: &str, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if greeting(vip).as_deref() == Some(who) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

struct Sample {
    cpu: BTreeMap<(String, u32), f64>,
    /// CPU of the rule tool processes ringport ran and reaped.
    children: f64,
    hist: BTreeMap<String, node::Histogram>,
}

fn sample(pid: u32) -> Sample {
    let metrics = node::http_get(node::METRICS, "/metrics").map(|(_, b)| b).unwrap_or_default();
    Sample { cpu: node::task_cpu(pid), children: node::children_cpu(pid), hist: node::histograms(&metrics) }
}

fn run(o: &Opts, bin: &Path, source: &str) -> (String, String) {
    node::enter_private_netns("bench/churn.rs");
    let scratch = tempfile::tempdir().expect("temp dir");
    let bound = o.seconds + 600;
    let (_echo, echo) = backend(bin, "stable", "127.0.0.1:0", false, scratch.path(), bound);
    let (_a, a) = backend(bin, "A", "127.0.0.2:0", true, scratch.path(), bound);
    let (_b, b) = backend(bin, "B", "127.0.0.3:0", true, scratch.path(), bound);
    let ep = |s: SocketAddr| vec![(s.ip().to_string(), s.port())];
    let n = o.services;
    // Index n is the probe Service; 0..STABLE the unchanged ones.
    let mut world: Vec<Vec<(String, u16)>> = (0..n).map(|i| node::placeholder_endpoints(i, 0)).collect();
    for w in world.iter_mut().take(STABLE) {
        *w = ep(echo);
    }
    world.push(ep(a));
    let mut sink = Sink::new(source, &world, scratch.path());
    let log = scratch.path().join("ringport.log");
    let mut args = sink.ringport_args(scratch.path());
    if let Some(m) = &o.mode {
        args.extend(["--proxy-port-mode".to_string(), m.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut rp = node::spawn_ringport(bin, o.workers.unwrap_or(2), &args, &log);
    if let Err(why) = node::wait_ready(&mut rp, started, READY_BOUND) {
        let row = format!("| {source} | {n} | not ready: {why} | | | | | | | | |\n");
        return (row, format!("{source}: {}\n", node::last_error(&log)));
    }
    let ready = started.elapsed();
    let pid = rp.pid();
    let vip = SocketAddr::from((node::cluster_ip(n), node::SERVICE_PORT));
    // The probe answers A before anything changes.
    if !answers_within(vip, "A", Duration::from_secs(10)) {
        eprintln!("bench/churn.rs: {source}: the probe Service does not answer A before the churn starts");
    }

    let targets: Vec<String> =
        (0..STABLE).map(|i| format!("{}:{}", node::cluster_ip(i), node::SERVICE_PORT)).collect();
    let loadgen = bin.join("loadgen");
    let (d, c) = (format!("{}s", o.seconds), o.crr_conns.to_string());
    let crr_args = [
        loadgen.to_str().expect("utf-8"),
        "tcp-crr",
        "-t",
        &targets.join(","),
        "-c",
        &c,
        "-d",
        &d,
        "-w",
        "1",
        "--timeout",
        "2s",
        "--json",
    ];
    let before = sample(pid);
    let mut crr = node::Guarded::spawn(&crr_args, Stdio::piped(), &scratch.path().join("crr.log"));
    let window = Instant::now();
    let until = window + Duration::from_secs(o.seconds);
    let (ask_tx, ask_rx) = mpsc::channel();
    let (told_tx, told_rx) = mpsc::channel();
    let prober = std::thread::spawn(move || probe(vip, until, ask_tx, told_rx));

    // The writer: change k is due at window + k/rate. Whatever is due is
    // set in memory and written at once, so a writer that falls behind (a
    // big single file) batches instead of slowing the change rate. Probe
    // flips ride along; each is timed from just before its write.
    let total = o.rate as u64 * o.seconds;
    let churned = n - STABLE;
    let mut generation = vec![0usize; n];
    let (mut done, mut writes) = (0u64, 0u64);
    let flip = |sink: &mut Sink, to: &str| {
        let t = Instant::now();
        sink.set(n, &ep(if to == "A" { a } else { b }));
        t
    };
    while done < total && Instant::now() <= until + Duration::from_secs(10) {
        let due = ((window.elapsed().as_secs_f64() * f64::from(o.rate)) as u64 + 1).min(total);
        if due <= done {
            let at = window + Duration::from_secs_f64(done as f64 / f64::from(o.rate));
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            continue;
        }
        let flips: Vec<Instant> = ask_rx.try_iter().map(|to| flip(&mut sink, to)).collect();
        for k in done..due {
            let i = STABLE + (k as usize % churned);
            generation[i] += 1;
            sink.set(i, &node::placeholder_endpoints(i, generation[i]));
        }
        writes += sink.flush();
        for t in flips {
            let _ = told_tx.send(t);
        }
        done = due;
    }
    let wrote_for = window.elapsed();
    // Answer flips until the probe is done (it stops asking at `until`).
    while !prober.is_finished() {
        if let Ok(to) = ask_rx.recv_timeout(Duration::from_millis(50)) {
            let t = flip(&mut sink, to);
            writes += sink.flush();
            let _ = told_tx.send(t);
        }
    }
    let flips = prober.join().expect("probe thread");
    let after = sample(pid);
    let cpu_window = window.elapsed();
    let crr_out = wait_output(&mut crr, Duration::from_secs(30));
    drop(rp);

    let row = render(o, source, n, (done, writes), wrote_for, &flips, &before, &after, &crr_out);
    let note = notes(source, ready, cpu_window, &before, &after, &crr_out, &log);
    (row, note)
}

/// A child's stdout once it exits (bounded; killed after `bound`).
fn wait_output(g: &mut node::Guarded, bound: Duration) -> Value {
    let deadline = Instant::now() + bound;
    while !g.exited() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = g.child.kill();
    let mut text = String::new();
    if let Some(mut out) = g.child.stdout.take() {
        let _ = out.read_to_string(&mut text);
    }
    serde_json::from_str(text.trim()).unwrap_or(Value::Null)
}

fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    let idx = ((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1);
    sorted.get(idx.min(sorted.len().saturating_sub(1))).copied()
}

fn fmt_ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), node::ms)
}

/// Mean (ms) and count of a histogram between two samples.
fn hist_delta(name: &str, before: &Sample, after: &Sample) -> Option<node::Histogram> {
    Some(after.hist.get(name)?.since(before.hist.get(name)))
}

fn control_cpu(before: &Sample, after: &Sample) -> f64 {
    node::cpu_by_name(&before.cpu, &after.cpu)
        .iter()
        .filter(|(name, _)| !name.starts_with("ringport-w"))
        .map(|(_, (t, _))| t)
        .sum::<f64>()
        + (after.children - before.children)
}

#[allow(clippy::too_many_arguments)]
fn render(
    o: &Opts,
    source: &str,
    n: usize,
    (done, writes): (u64, u64),
    wrote_for: Duration,
    flips: &[Option<Duration>],
    before: &Sample,
    after: &Sample,
    crr: &Value,
) -> String {
    let mut seen: Vec<Duration> = flips.iter().flatten().copied().collect();
    seen.sort();
    let external = format!(
        "{} / {} / {}",
        fmt_ms(percentile(&seen, 0.5)),
        fmt_ms(percentile(&seen, 0.99)),
        fmt_ms(seen.last().copied())
    );
    let name =
        ["ringport_network_programming_duration_seconds", "kubeproxy_network_programming_duration_seconds"]
            .into_iter()
            .find(|n| after.hist.contains_key(*n))
            .unwrap_or("-");
    let internal = match hist_delta(name, before, after) {
        Some(h) if h.count > 0.0 => format!(
            "{} / {} ({}; {})",
            h.quantile(0.5).map_or("-".into(), |v| format!("<= {:.0}", v * 1e3)),
            h.quantile(0.99).map_or("-".into(), |v| format!("<= {:.0}", v * 1e3)),
            h.count,
            name.split('_').next().unwrap_or("")
        ),
        _ => "none recorded".into(),
    };
    let mean = |name: &str| match hist_delta(name, before, after) {
        Some(h) if h.count > 0.0 => format!("{} ({:.1})", h.count, h.sum / h.count * 1e3),
        _ => "0".into(),
    };
    let _ = o;
    format!(
        "| {source} | {n} | {done} ({:.1}/s), {writes} file writes | {} of {} | {external} | {internal} | {} | {} | {:.2} | {} | {} |\n",
        done as f64 / wrote_for.as_secs_f64().max(1e-9),
        seen.len(),
        flips.len(),
        mean("kubeproxy_sync_proxy_rules_duration_seconds"),
        mean("ringport_sync_duration_seconds"),
        control_cpu(before, after),
        crr["completed"].as_u64().map_or("-".into(), |v| v.to_string()),
        crr["errors_total"]
            .as_u64()
            .map_or("- (no loadgen output)".into(), |v| format!("{v} {}", crr["errors"])),
    )
}

/// Per-source details: ready time, CPU by thread name, log summary.
fn notes(
    source: &str,
    ready: Duration,
    window: Duration,
    before: &Sample,
    after: &Sample,
    crr: &Value,
    log: &Path,
) -> String {
    let mut s = format!(
        "- `{source}`: ready in {} ms; CPU over the {:.1} s window by thread name:",
        node::ms(ready),
        window.as_secs_f64()
    );
    for (name, (used, threads)) in node::cpu_by_name(&before.cpu, &after.cpu) {
        let role = if name.starts_with("ringport-w") { "worker" } else { "control" };
        let _ = write!(s, " `{name}` x{threads} {used:.2} s ({role});");
    }
    let _ = write!(s, " rule tool processes {:.2} s (control);", after.children - before.children);
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let count = |what: &str| text.lines().filter(|l| l.contains(what)).count();
    let _ = writeln!(
        s,
        " log: {} \"reloaded\", {} \"redirect rules synced\", {} errors; loadgen p99 {} us.",
        count("reloaded"),
        count("redirect rules synced"),
        count("ERROR"),
        crr["latency_us"]["p99"]
    );
    s
}
