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

/// A node namespace with ringport (file source, nft rules) in front of one
/// HTTP backend behind cluster IP 10.96.0.10:80.
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
        lab.topology(&[BACKEND]);
        let (role, ip) = BACKEND;
        let root = lab.scratch.path().join(role);
        std::fs::create_dir_all(&root).expect("backend dir");
        std::fs::write(root.join("whoami"), role).expect("backend file");
        let log = lab.scratch.path().join("backend.log");
        let root = root.to_string_lossy().into_owned();
        lab.spawn(role, &["python3", "-m", "http.server", "--bind", ip, "8080", "--directory", &root], &log);
        lab.eventually(Duration::from_secs(20), "the backend serving", || {
            lab.curl("node", &format!("http://{ip}:8080/whoami")).1 == role
        });
        let config = lab.scratch.path().join("manifests");
        std::fs::create_dir_all(&config).expect("manifest dir");
        let manifest = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec:\n  clusterIP: {CLUSTER_IP}\n  ports:\n  - {{port: 80, targetPort: 8080, protocol: TCP}}\n\
             ---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: web, namespace: default}}\n\
             subsets:\n- addresses: [{{ip: \"{ip}\"}}]\n  ports: [{{port: 8080, protocol: TCP}}]\n"
        );
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

    /// Every service port's proxy ports, as /debug/snapshot shows them.
    fn proxy_ports(&self) -> Vec<(String, u64)> {
        let (code, body) = self.lab.curl("node", "http://127.0.0.1:10249/debug/snapshot");
        assert_eq!(code, 0, "{body}");
        let snap: serde_json::Value = serde_json::from_str(&body).expect("snapshot JSON");
        let ports = snap["service_ports"].as_array().expect("service_ports");
        ports
            .iter()
            .map(|p| (p["name"].as_str().unwrap_or("").to_owned(), p["proxy_port"].as_u64().unwrap_or(0)))
            .collect()
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

/// One HTTP GET through the cluster IP, from the namespace the calling
/// thread is in.
fn get_through_cluster_ip() -> bool {
    let addr: SocketAddr = format!("{CLUSTER_IP}:80").parse().expect("addr");
    let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    if c.write_all(b"GET /whoami HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    c.read_to_string(&mut answer).is_ok() && answer.starts_with("HTTP/1.0 200") && answer.ends_with(BACKEND.0)
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
