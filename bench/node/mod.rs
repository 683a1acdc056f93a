//! What the node-scale benchmarks (`bench/scale.rs`, `bench/churn.rs`)
//! share: a private network namespace for the whole bench process, the real
//! `ringport` binary started in it under a raised fd limit and killed with
//! the bench, generated Services and EndpointSlices, and the readings taken
//! from /proc and from ringport's /metrics.
//!
//! Invariants: nothing is created outside the private namespace (it has only
//! loopback; cluster IPs are 127.96.0.0/14 addresses no interface holds, so
//! ringport programs nft rules for them and loadgen, which talks to loopback
//! only, can reach them); every child process dies with the bench
//! (`setpriv --pdeathsig KILL`, and a kill on drop); every wait is bounded.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Where ringport serves /readyz and /metrics inside the private namespace.
pub const METRICS: &str = "127.0.0.1:10249";
pub const HEALTHZ: &str = "127.0.0.1:10256";
/// Every Service's port; endpoints' target port.
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;

/// Moves the whole process into a fresh network namespace with only `lo`
/// (up). Must run before any thread is spawned; calling it again replaces
/// the namespace (the old one vanishes with its rules once nothing uses it).
pub fn enter_private_netns(who: &str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("{who}: needs root (a private network namespace and nft rules)");
        std::process::exit(1);
    }
    // SAFETY: unshare moves the calling thread; the benches call it while
    // single-threaded, so every later thread and child starts inside.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!("{who}: unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    run_ok("ip", &["link", "set", "lo", "up"]);
    // Connection tracking is on here (nat rules exist): short-lived bench
    // connections must not fill its table with TIME_WAIT entries.
    let _ = std::fs::write("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait", "1");
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000");
    // The node-port range stays out of that range, as on a node (Kubernetes
    // asks for it): else a socket's ephemeral port, the shared proxy port's
    // among them, can take a node port before its listener is bound.
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_local_reserved_ports", "30000-32767");
}

pub fn run_ok(cmd: &str, args: &[&str]) {
    let ok = Command::new(cmd).args(args).status().is_ok_and(|s| s.success());
    assert!(ok, "{cmd} {args:?} failed");
}

/// The directory holding `ringport` and `loadgen`: `RINGPORT_BENCH_BIN_DIR`,
/// else the one cargo built this bench's ringport into.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("RINGPORT_BENCH_BIN_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_BIN_EXE_ringport")).parent().expect("bin dir").to_path_buf()
}

/// `ringport --version`'s commit, for result file names.
pub fn version(bin: &Path) -> String {
    let out = Command::new(bin.join("ringport")).arg("--version").output().expect("ringport --version");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn short_commit(version: &str) -> String {
    version.split("commit ").nth(1).map(|c| c.chars().take(7).collect()).unwrap_or_else(|| "unknown".into())
}

/// The proxy-port modes this binary has: `per-service` always (today's
/// shape, no flag), `shared` when `run --help` lists `--proxy-port-mode`.
pub fn proxy_port_modes(bin: &Path) -> Vec<&'static str> {
    let out =
        Command::new(bin.join("ringport")).args(["run", "--help"]).output().expect("ringport run --help");
    if String::from_utf8_lossy(&out.stdout).contains("--proxy-port-mode") {
        vec!["per-service", "shared"]
    } else {
        vec!["per-service"]
    }
}

/// The hard RLIMIT_NOFILE, which the runs raise the soft limit to.
pub fn nofile_hard() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// A child that dies with the bench: killed on drop, and by the kernel
/// (`setpriv --pdeathsig KILL`) if the bench itself is killed.
pub struct Guarded {
    pub child: Child,
}

impl Guarded {
    pub fn spawn(args: &[&str], stdout: Stdio, log: &Path) -> Guarded {
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
        Guarded { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `ports` per-service proxy ports with `workers` workers fit the
/// hard fd limit, by ringport's own budget (`src/budget.rs`: a socket per
/// port per worker, 1,024 for connections, about 150 for the rest).
pub fn per_service_fits(ports: usize, workers: usize) -> bool {
    (ports * workers + 1_024 + 160) as u64 <= nofile_hard()
}

/// `ringport run` with `args` after the common ones (redirect nft,
/// `workers` unpinned workers, admin on [`METRICS`]/[`HEALTHZ`], no
/// handover socket), under `prlimit` at the hard fd limit.
pub fn spawn_ringport(bin: &Path, workers: usize, args: &[&str], log: &Path) -> Guarded {
    let nofile = format!("--nofile={0}:{0}", nofile_hard());
    let ringport = bin.join("ringport");
    let workers = workers.to_string();
    let mut all = vec!["prlimit", &nofile, "--", ringport.to_str().expect("utf-8 path"), "run"];
    all.extend([
        "--redirect",
        "nft",
        "--workers",
        &workers,
        "--no-pin",
        "--metrics-bind-address",
        METRICS,
        "--healthz-bind-address",
        HEALTHZ,
        "--handover-socket",
        "none",
        "--per-service-metrics",
        "off",
    ]);
    all.extend(args);
    Guarded::spawn(&all, Stdio::null(), log)
}

/// Polls /readyz until 200: the time since `started`, or why not (the
/// process exited, or `bound` passed).
pub fn wait_ready(rp: &mut Guarded, started: Instant, bound: Duration) -> Result<Duration, String> {
    loop {
        if http_get(METRICS, "/readyz").is_some_and(|(code, _)| code == 200) {
            return Ok(started.elapsed());
        }
        if rp.exited() {
            return Err("exited before ready".into());
        }
        if started.elapsed() > bound {
            return Err(format!("not ready within {} s", bound.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A bounded HTTP/1.0 GET: (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// VmRSS in kB.
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// From this namespace's /proc/net/sockstat: (sockets used, TCP inuse, TCP
/// mem pages). `TCP mem` (pages of socket buffers) is counted over the
/// whole kernel; the two counts per namespace.
pub fn sockstat() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let field = |line: &str, key: &str| -> u64 {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.windows(2).find(|w| w[0] == key).and_then(|w| w[1].parse().ok()).unwrap_or(0)
    };
    let line = |p: &str| text.lines().find(|l| l.starts_with(p)).unwrap_or("").to_string();
    (field(&line("sockets:"), "used"), field(&line("TCP:"), "inuse"), field(&line("TCP:"), "mem"))
}

/// utime + stime (seconds) per thread, keyed by (name, tid): threads come
/// and go (blocking pools), so a difference is only taken per thread.
pub fn task_cpu(pid: u32) -> BTreeMap<(String, u32), f64> {
    let tick = 100.0; // USER_HZ
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in dir.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // Fields 14 and 15 of stat(5): rest[0] is field 3.
        let ticks: f64 = [11, 12].iter().filter_map(|&i| rest.get(i)?.parse::<f64>().ok()).sum();
        out.insert((name, tid), ticks / tick);
    }
    out
}

/// utime + stime (seconds) of `pid`'s waited-for children (`cutime`,
/// `cstime`): the `nft` / `iptables-restore` processes a rule sync runs.
pub fn children_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else { return 0.0 };
    let rest: Vec<&str> = stat.get(close + 2..).unwrap_or("").split_whitespace().collect();
    // Fields 16 and 17 of stat(5): rest[0] is field 3.
    [13, 14].iter().filter_map(|&i| rest.get(i)?.parse::<f64>().ok()).sum::<f64>() / 100.0
}

/// CPU seconds per thread name between two [`task_cpu`] readings (a thread
/// that started in between counts from zero; one that ended is lost).
pub fn cpu_by_name(
    before: &BTreeMap<(String, u32), f64>,
    after: &BTreeMap<(String, u32), f64>,
) -> BTreeMap<String, (f64, usize)> {
    let mut out: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (key, t) in after {
        let slot = out.entry(key.0.clone()).or_default();
        slot.0 += t - before.get(key).copied().unwrap_or(0.0);
        slot.1 += 1;
    }
    out
}

/// A Prometheus histogram read from /metrics: cumulative buckets.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// `self - earlier`: what was observed in between.
    pub fn since(&self, earlier: Option<&Histogram>) -> Histogram {
        let Some(e) = earlier else { return self.clone() };
        let buckets = self.buckets.iter().zip(&e.buckets).map(|((le, a), (_, b))| (*le, a - b)).collect();
        Histogram { buckets, sum: self.sum - e.sum, count: self.count - e.count }
    }

    /// The bucket bound at quantile `q` (upper bound of the bucket it falls
    /// in: histograms say no more than that).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        self.buckets.iter().find(|(_, n)| *n >= rank).map(|(le, _)| *le)
    }
}

/// Every unlabelled histogram family in a /metrics text (labelled series
/// are summed per bound).
pub fn histograms(text: &str) -> BTreeMap<String, Histogram> {
    let mut out: BTreeMap<String, Histogram> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let name = series.split('{').next().unwrap_or(series);
        if let Some(base) = name.strip_suffix("_bucket") {
            let le = series.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("+Inf");
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
            let h = out.entry(base.to_string()).or_default();
            match h.buckets.iter_mut().find(|(b, _)| *b == le) {
                Some(slot) => slot.1 += value,
                None => h.buckets.push((le, value)),
            }
        } else if let Some(base) = name.strip_suffix("_sum") {
            out.entry(base.to_string()).or_default().sum += value;
        } else if let Some(base) = name.strip_suffix("_count") {
            out.entry(base.to_string()).or_default().count += value;
        }
    }
    out.retain(|_, h| !h.buckets.is_empty());
    for h in out.values_mut() {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// Service `i`'s cluster IP: 127.96.0.1 onwards (loopback, on no interface).
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 96, 0, 1)) + i as u32)
}

pub fn service_name(i: usize) -> String {
    format!("s{i}")
}

/// Service `i`: one TCP port [`SERVICE_PORT`] -> [`TARGET_PORT`], on its
/// cluster IP.
pub fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"namespace": "default", "name": service_name(i)},
           "spec": {"clusterIP": cluster_ip(i).to_string(),
                    "ports": [{"name": "p", "port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}]}})
}

/// Placeholder endpoints of Service `i` at generation `gen`: 2 or 3 of them
/// (alternating, 2.5 on average), in 10.64.0.0/10, never contacted.
pub fn placeholder_endpoints(i: usize, generation: usize) -> Vec<(String, u16)> {
    let count = 2 + (i + generation) % 2;
    (0..count)
        .map(|k| {
            let n = (i * 3 + k + generation * 7) as u32 % (1 << 22);
            (Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + n).to_string(), TARGET_PORT)
        })
        .collect()
}

/// The one EndpointSlice of Service `i`: ready `endpoints` (address,
/// port; one port for all), and `trigger` as its last-change-trigger-time.
pub fn slice(i: usize, endpoints: &[(String, u16)], trigger: Option<std::time::SystemTime>) -> Value {
    let port = endpoints.first().map_or(TARGET_PORT, |e| e.1);
    let eps: Vec<Value> =
        endpoints.iter().map(|(a, _)| json!({"addresses": [a], "conditions": {"ready": true}})).collect();
    let mut s = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": format!("{}-1", service_name(i)),
                     "labels": {"kubernetes.io/service-name": service_name(i)}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": port, "protocol": "TCP"}],
        "endpoints": eps});
    if let Some(t) = trigger {
        let stamp = humantime::format_rfc3339_nanos(t).to_string();
        s["metadata"]["annotations"] = json!({"endpoints.kubernetes.io/last-change-trigger-time": stamp});
    }
    s
}

/// Writes `text` to `path` atomically: a temp file named `.<name>.tmp`
/// beside it (skipped by ringport's directory reader), then a rename.
pub fn write_atomic(path: &Path, text: &[u8]) {
    let name = path.file_name().and_then(|n| n.to_str()).expect("file name");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write temp manifest");
    std::fs::rename(&tmp, path).expect("rename manifest");
}

/// The `duration_ms` of the first log line containing `what` and `also`.
pub fn log_duration_ms(log: &Path, what: &str, also: &str) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.contains(what) && l.contains(also))?;
    line.split("duration_ms=").nth(1)?.split_whitespace().next()?.parse().ok()
}

/// The last line of a log (why ringport exited: its error), shortened.
pub fn last_error(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    line.chars().take(400).collect()
}

pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// Results go to bench/results/<date>-<commit>-<what>.md.
pub fn results_path(what: &str, commit: &str) -> PathBuf {
    let date = Command::new("date").args(["-u", "+%Y-%m-%d"]).output().expect("date");
    let date = String::from_utf8_lossy(&date.stdout).trim().to_string();
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results").join(format!("{date}-{commit}-{what}.md"))
}

/// The 1, 5 and 15 minute load averages: how busy the shared machine was.
pub fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
