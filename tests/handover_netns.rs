//! Restarts behind real nft rules, in network namespaces (issue 12): a
//! client reaches a ClusterIP through the rules while ringport is upgraded
//! five times with a handover, and never sees a failed connection; and
//! after `kill -9` a new instance binds the proxy ports the rules still
//! point at, so the proxy ports and the nft table (handles included) are
//! what they were. Both in each `--proxy-port-mode`: the shared proxy
//! port is handed over, and bound again after a crash, like any other.
//!
//! Needs root and `ip`, `nft`, `python3` (CI has them through
//! scripts/test.sh); without them every test here fails saying so.

mod netns;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use netns::Lab;

const TOOLS: [&str; 4] = ["ip", "nft", "curl", "python3"];
const BACKEND: (&str, &str) = ("be1", "10.200.0.11");
const CLUSTER_IP: &str = "10.96.0.10";
/// A second Service, `api`, on its own backend: a restart must keep the
/// two apart.
const BACKEND2: (&str, &str) = ("be2", "10.200.0.12");
const CLUSTER_IP2: &str = "10.96.0.11";
const SHARED: &str = "shared proxy port";

/// A node namespace with ringport (file source, nft rules) in front of two
/// HTTP backends: `web` on cluster IP 10.96.0.10:80, `api` on 10.96.0.11:80.
struct Node {
    lab: Lab,
    config: PathBuf,
    socket: PathBuf,
    runs: usize,
    /// More `ringport run` flags (`--proxy-port-mode shared`).
    extra: &'static [&'static str],
}

impl Node {
    fn start() -> Node {
        Self::start_with(&[])
    }

    fn start_with(extra: &'static [&'static str]) -> Node {
        netns::require_privileges_and_tools(&TOOLS);
        let mut lab = Lab::new();
        lab.topology(&[BACKEND, BACKEND2]);
        let mut manifest = String::new();
        for ((role, ip), (name, vip)) in
            [BACKEND, BACKEND2].into_iter().zip([("web", CLUSTER_IP), ("api", CLUSTER_IP2)])
        {
            let root = lab.scratch.path().join(role);
            std::fs::create_dir_all(&root).expect("backend dir");
            std::fs::write(root.join("whoami"), role).expect("backend file");
            let log = lab.scratch.path().join(format!("{role}.log"));
            let root = root.to_string_lossy().into_owned();
            lab.spawn(
                role,
                &["python3", "-m", "http.server", "--bind", ip, "8080", "--directory", &root],
                &log,
            );
            lab.eventually(Duration::from_secs(20), "the backend serving", || {
                lab.curl("node", &format!("http://{ip}:8080/whoami")).1 == role
            });
            manifest += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
                 spec:\n  clusterIP: {vip}\n  ports:\n  - {{port: 80, targetPort: 8080, protocol: TCP}}\n\
                 ---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: default}}\n\
                 subsets:\n- addresses: [{{ip: \"{ip}\"}}]\n  ports: [{{port: 8080, protocol: TCP}}]\n"
            );
        }
        let config = lab.scratch.path().join("manifests");
        std::fs::create_dir_all(&config).expect("manifest dir");
        std::fs::write(config.join("services.yaml"), manifest).expect("manifest");
        let socket = lab.scratch.path().join("handover.sock");
        Node { lab, config, socket, runs: 0, extra }
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.lab.scratch.path().join(format!("ringport-{run}.log"))
    }

    fn log(&self, run: usize) -> String {
        std::fs::read_to_string(self.log_path(run)).unwrap_or_default()
    }

    /// Start ringport in the node namespace; (its lab index, its run number).
    fn ringport(&mut self) -> (usize, usize) {
        self.runs += 1;
        let log = self.log_path(self.runs);
        let args = [
            env!("CARGO_BIN_EXE_ringport"),
            "run",
            "--config",
            self.config.to_str().expect("utf-8 path"),
            "--redirect",
            "nft",
            "--workers",
            "2",
            "--no-pin",
            "--drain-timeout",
            "5s",
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--handover-socket",
            self.socket.to_str().expect("utf-8 path"),
        ];
        let args: Vec<&str> = args.iter().chain(self.extra).copied().collect();
        (self.lab.spawn("node", &args, &log), self.runs)
    }

    fn wait_log(&self, run: usize, what: &str) {
        self.lab.eventually(Duration::from_secs(30), &format!("run {run} logs {what:?}"), || {
            self.log(run).contains(what)
        });
    }

    fn wait_ready(&self) {
        self.lab.eventually(Duration::from_secs(30), "ringport ready (rules synced)", || {
            self.lab.curl("node", "http://127.0.0.1:10249/readyz").1 == "ok"
        });
    }

    /// Every service port's proxy ports, as /debug/snapshot shows them,
    /// then the shared proxy ports (named [`SHARED`]); checked against the
    /// mode: in shared mode one shared port per family, and every service
    /// port shows the IPv4 one.
    fn proxy_ports(&self) -> Vec<(String, u64)> {
        let (code, body) = self.lab.curl("node", "http://127.0.0.1:10249/debug/snapshot");
        assert_eq!(code, 0, "{body}");
        let snap: serde_json::Value = serde_json::from_str(&body).expect("snapshot JSON");
        let ports = snap["service_ports"].as_array().expect("service_ports");
        let mut out: Vec<(String, u64)> = ports
            .iter()
            .map(|p| (p["name"].as_str().unwrap_or("").to_owned(), p["proxy_port"].as_u64().unwrap_or(0)))
            .collect();
        let shared = snap["shared_proxy_ports"].as_array().cloned().unwrap_or_default();
        let shared: Vec<u64> = shared
            .iter()
            .filter_map(|a| a.as_str()?.parse::<SocketAddr>().ok())
            .map(|a| u64::from(a.port()))
            .collect();
        assert_eq!(out.len(), 2, "web and api: {out:?}");
        if self.extra.contains(&"shared") {
            // IPv4 first; its IPv6 twin, when the IPv6 proxy address is up.
            assert!(!shared.is_empty() && shared.len() <= 2, "one shared port per family: {body}");
            assert!(out.iter().all(|(_, p)| *p == shared[0]), "every TCP port shows it: {out:?}");
        } else {
            assert!(shared.is_empty(), "no shared port in per-service mode: {body}");
            assert_ne!(out[0].1, out[1].1, "a proxy port each: {out:?}");
        }
        out.extend(shared.into_iter().map(|p| (SHARED.to_owned(), p)));
        out
    }

    /// Wait for lab child `index` to exit; panic after `within`.
    fn wait_exit(&mut self, index: usize, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.lab.exit_status(index) {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {within:?}:\n{}", self.log(self.runs));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn nft_table(&self) -> String {
        self.lab.ok("node", &["nft", "-a", "list", "table", "inet", "ringport"])
    }
}

/// One HTTP GET through the cluster IP of `web`, from the namespace the
/// calling thread is in.
fn get_through_cluster_ip() -> bool {
    get_through(CLUSTER_IP, BACKEND.0)
}

/// One HTTP GET through `vip`:80, answered by backend `want`.
fn get_through(vip: &str, want: &str) -> bool {
    let addr: SocketAddr = format!("{vip}:80").parse().expect("addr");
    let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    if c.write_all(b"GET /whoami HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    c.read_to_string(&mut answer).is_ok() && answer.starts_with("HTTP/1.0 200") && answer.ends_with(want)
}

#[test]
fn five_upgrades_behind_nft_rules_fail_no_cluster_ip_connection() {
    five_upgrades_fail_no_cluster_ip_connection(Node::start());
}

/// The shared proxy port's sockets pass over like any listener's.
#[test]
fn five_upgrades_with_a_shared_proxy_port_fail_no_cluster_ip_connection() {
    five_upgrades_fail_no_cluster_ip_connection(Node::start_with(&["--proxy-port-mode", "shared"]));
}

fn five_upgrades_fail_no_cluster_ip_connection(mut node: Node) {
    let (mut current, mut run) = node.ringport();
    node.wait_ready();
    node.wait_log(run, "a successor can take over here");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let load = netns::spawn_in_namespace(&node.lab.ns("client"), move || {
        let (mut made, mut failed, mut gap, mut last) = (0u64, 0u64, Duration::ZERO, Instant::now());
        let deadline = Instant::now() + Duration::from_secs(120);
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            if get_through_cluster_ip() {
                made += 1;
                gap = gap.max(last.elapsed());
                last = Instant::now();
            } else {
                failed += 1;
            }
        }
        (made, failed, gap)
    });
    let ports = node.proxy_ports();
    for round in 1..=5 {
        let (next, next_run) = node.ringport();
        node.wait_log(next_run, "handover confirmed");
        let status = node.wait_exit(current, Duration::from_secs(20));
        assert!(status.success(), "upgrade {round}: the old exited with {status}:\n{}", node.log(run));
        (current, run) = (next, next_run);
        assert_eq!(node.proxy_ports(), ports, "upgrade {round}: the proxy ports moved with the sockets");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (made, failed, gap) = load.join().expect("load");
    println!(
        "5 upgrades behind nft rules: connections to the cluster IP made {made}, failed {failed}, longest gap {gap:?}"
    );
    assert!(made > 20, "the load ran: {made}");
    assert_eq!(failed, 0, "no connection to the cluster IP failed:\n{}", node.log(run));
}

#[test]
fn after_kill_9_a_new_instance_keeps_the_proxy_ports_and_leaves_the_rules_as_they_were() {
    after_kill_9_the_proxy_ports_and_rules_stay(Node::start());
}

#[test]
fn after_kill_9_a_new_instance_keeps_the_shared_proxy_port_and_leaves_the_rules_as_they_were() {
    after_kill_9_the_proxy_ports_and_rules_stay(Node::start_with(&["--proxy-port-mode", "shared"]));
}

fn after_kill_9_the_proxy_ports_and_rules_stay(mut node: Node) {
    let (first, run) = node.ringport();
    node.wait_ready();
    node.wait_log(run, "redirect rules synced");
    let (ports, table) = (node.proxy_ports(), node.nft_table());
    assert!(ports.iter().all(|(_, p)| *p != 0), "{ports:?}");
    let pid = i32::try_from(node.lab.child_id(first)).expect("pid");
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    node.wait_exit(first, Duration::from_secs(10));
    assert_eq!(node.nft_table(), table, "the rules outlive the process");

    let (_, run) = node.ringport();
    node.wait_ready();
    assert_eq!(node.proxy_ports(), ports, "the proxy ports the rules point at:\n{}", node.log(run));
    assert_eq!(node.nft_table(), table, "the table, handles included, is not rewritten:\n{}", node.log(run));
    assert!(node.log(run).contains("rules of a previous run found"), "{}", node.log(run));
    let ok = netns::in_namespace(&node.lab.ns("client"), get_through_cluster_ip);
    assert!(ok, "the cluster IP answers through the same rules:\n{}", node.log(run));
}

/// After kill -9 of a shared run, the rules send every TCP key to the one
/// shared port: a per-service restart must not make it one Service's own
/// (which would serve every cluster IP as that Service until the sync).
#[test]
fn after_kill_9_of_a_shared_run_a_per_service_restart_keeps_each_service_apart() {
    let mut node = Node::start_with(&["--proxy-port-mode", "shared"]);
    let (first, run) = node.ringport();
    node.wait_ready();
    node.wait_log(run, "redirect rules synced");
    let shared = node.proxy_ports().into_iter().find(|(n, _)| n == SHARED).expect("shared port").1;
    let pid = i32::try_from(node.lab.child_id(first)).expect("pid");
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    node.wait_exit(first, Duration::from_secs(10));

    node.extra = &[];
    let (_, run) = node.ringport();
    node.wait_ready();
    let ports = node.proxy_ports();
    assert!(ports.iter().all(|(_, p)| *p != shared), "no Service took the shared port {shared}: {ports:?}");
    let client = node.lab.ns("client");
    for (vip, want) in [(CLUSTER_IP, BACKEND.0), (CLUSTER_IP2, BACKEND2.0)] {
        let ok = netns::in_namespace(&client, move || get_through(vip, want));
        assert!(ok, "{vip} reaches {want}:\n{}", node.log(run));
    }
}
