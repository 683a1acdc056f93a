//! Network-namespace labs for the privileged end-to-end tests: a node
//! namespace (where ringport runs and its rules live), a client and
//! backends, all on a bridge inside the node namespace with addresses that
//! exist only in these namespaces. Nothing is created in the host's own
//! namespace, so the host's network and rules are never touched.
//!
//! A [`Lab`] removes every process and namespace it made when dropped,
//! including when the test panics; deleting a namespace removes its links,
//! nft tables and iptables chains with it.
#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The node's address on the lab bridge; peers are on the same /24.
pub const NODE_IP: &str = "10.200.0.1";
pub const CLIENT_IP: &str = "10.200.0.2";
/// The node's IPv6 address on the lab bridge ([`Lab::add_ipv6`]); a peer
/// at `10.200.0.N` gets `fd10:200::N` (N as written, in hex).
pub const NODE_IP6: &str = "fd10:200::1";
pub const CLIENT_IP6: &str = "fd10:200::2";

/// The IPv6 twin of a lab peer's IPv4 address: `10.200.0.N` -> `fd10:200::N`.
pub fn ipv6_of(ipv4: &str) -> String {
    let last = ipv4.rsplit('.').next().unwrap_or_default();
    format!("fd10:200::{last}")
}

/// Fail loudly, saying why, when this machine cannot run the lab.
pub fn require_privileges_and_tools(tools: &[&str]) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test builds network namespaces and nft/iptables rules: it must run as root (CI does); \
         run `sudo scripts/test.sh`"
    );
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(found, "this test needs `{tool}`; scripts/test.sh installs it (apt-get)");
    }
}

/// A set of namespaces and the processes running in them.
pub struct Lab {
    /// `rp-<pid>-<n>`: unique per test, prefix of every namespace name.
    pub id: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    pub scratch: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Lab {
        let id = format!("rp-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        Lab {
            id,
            namespaces: Vec::new(),
            children: Vec::new(),
            scratch: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The full name of the namespace `role`.
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.id)
    }

    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Create namespace `role` with its loopback up.
    pub fn add_ns(&mut self, role: &str) -> String {
        let ns = self.ns(role);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// The standard lab: `node` with a bridge at [`NODE_IP`]/24, a `client`
    /// at [`CLIENT_IP`], and one namespace per `(role, ip)` backend. Peers
    /// route everything via the node; the node routes the service ranges
    /// (10.96.0.0/12, which holds no address) onto the bridge, so its own
    /// connections to cluster IPs pass its OUTPUT hook.
    pub fn topology(&mut self, backends: &[(&str, &str)]) {
        let node = self.add_ns("node");
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &node, "addr", "add", &format!("{NODE_IP}/24"), "dev", "br0"]);
        ip(&["-n", &node, "link", "set", "br0", "up"]);
        ip(&["-n", &node, "route", "add", "10.96.0.0/12", "dev", "br0"]);
        let peers: Vec<(&str, &str)> =
            std::iter::once(("client", CLIENT_IP)).chain(backends.iter().copied()).collect();
        for (role, addr) in peers {
            let peer = self.add_ns(role);
            let port = format!("p-{role}");
            ip(&[
                "link", "add", &port, "netns", &node, "type", "veth", "peer", "name", "eth0", "netns", &peer,
            ]);
            ip(&["-n", &node, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &peer, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ip(&["-n", &peer, "link", "set", "eth0", "up"]);
            ip(&["-n", &peer, "route", "add", "default", "via", NODE_IP]);
        }
    }

    /// Make the standard lab dual-stack: [`NODE_IP6`]/64 on the bridge,
    /// each peer its [`ipv6_of`] address and a default route via the node,
    /// and the node routes the IPv6 service ranges (`fd10:96::/112` for
    /// cluster IPs, `fd10:97::/64` and `fd10:98::/64` for external and LB
    /// IPs) onto the bridge, as it does 10.96.0.0/12. Addresses are added
    /// `nodad`, so they work at once (no duplicate address detection wait).
    pub fn add_ipv6(&self, peers: &[(&str, &str)]) {
        let node = self.ns("node");
        ip(&["-n", &node, "-6", "addr", "add", &format!("{NODE_IP6}/64"), "dev", "br0", "nodad"]);
        for range in ["fd10:96::/112", "fd10:97::/64", "fd10:98::/64"] {
            ip(&["-n", &node, "-6", "route", "add", range, "dev", "br0"]);
        }
        let all = std::iter::once(("client", CLIENT_IP)).chain(peers.iter().copied());
        for (role, v4) in all {
            let peer = self.ns(role);
            ip(&["-n", &peer, "-6", "addr", "add", &format!("{}/64", ipv6_of(v4)), "dev", "eth0", "nodad"]);
            ip(&["-n", &peer, "-6", "route", "add", "default", "via", NODE_IP6]);
        }
    }

    /// Run `args` in namespace `role` to completion.
    pub fn exec(&self, role: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {role} {args:?}: {e}"))
    }

    /// Run `args` in `role` and return its stdout; panic on failure.
    pub fn ok(&self, role: &str, args: &[&str]) -> String {
        let out = self.exec(role, args);
        assert!(
            out.status.success(),
            "in {role}: {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Start `args` in `role` in the background, stderr to `log`; the lab
    /// kills it on drop. Returns its index for [`Lab::child`].
    pub fn spawn(&mut self, role: &str, args: &[&str], log: &std::path::Path) -> usize {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn in {role} {args:?}: {e}"));
        self.children.push(child);
        self.children.len() - 1
    }

    /// `ringport run` in `role`'s namespace as the namespace tests run it:
    /// manifests at `config`, `--redirect redirect`, 2 workers, unpinned,
    /// health on 127.0.0.1:10256 and metrics on 127.0.0.1:10249 (inside the
    /// namespace), then `extra`. `prefix` runs in front of it (e.g. setpriv).
    pub fn spawn_ringport(
        &mut self,
        role: &str,
        prefix: &[&str],
        config: &std::path::Path,
        redirect: &str,
        extra: &[&str],
        log: &std::path::Path,
    ) -> usize {
        let config = config.to_str().expect("utf-8 path");
        let own = [
            env!("CARGO_BIN_EXE_ringport"),
            "run",
            "--config",
            config,
            "--redirect",
            redirect,
            "--workers",
            "2",
            "--no-pin",
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            // A killed ringport leaves its socket file in the host's /run.
            "--handover-socket",
            "none",
        ];
        let args: Vec<&str> = prefix.iter().chain(&own).chain(extra).copied().collect();
        self.spawn(role, &args, log)
    }

    /// Waits (20 s) until the ringport started by [`Lab::spawn_ringport`] as
    /// child `index` in `role` answers /readyz with ok, i.e. its rules are
    /// synced; panics with its log if it exits or times out first.
    pub fn wait_ready(&self, role: &str, index: usize, log: &std::path::Path) {
        let log = || std::fs::read_to_string(log).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.curl(role, "http://127.0.0.1:10249/readyz").1 != "ok" {
            self.assert_alive(index, &log());
            assert!(Instant::now() < deadline, "{}: ringport not ready in 20 s:\n{}", self.id, log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics, showing `log`, when child `index` has exited (a zombie still
    /// in /proc counts: `try_wait` would need `&mut`).
    pub fn assert_alive(&self, index: usize, log: &str) {
        let pid = self.child_id(index);
        assert!(
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")),
            "ringport exited:\n{log}"
        );
    }

    pub fn child_id(&self, index: usize) -> u32 {
        self.children[index].id()
    }

    /// How child `index` exited, once it has; `None` while it runs.
    pub fn exit_status(&mut self, index: usize) -> Option<std::process::ExitStatus> {
        self.children[index].try_wait().ok().flatten()
    }

    /// SIGTERM a child and wait (bounded) for it to exit; SIGKILL after 15 s.
    pub fn stop(&mut self, index: usize) {
        let child = &mut self.children[index];
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) on our own child's pid; it has not been reaped
            // yet (we still hold its Child), so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `curl` from `role`: (exit code, body). Never through a proxy; bounded.
    pub fn curl(&self, role: &str, url: &str) -> (i32, String) {
        let (code, body, _) = self.curl_err(role, url);
        (code, body)
    }

    /// `curl` from `role`: (exit code, body, curl's complaint).
    pub fn curl_err(&self, role: &str, url: &str) -> (i32, String, String) {
        let out = self
            .exec(role, &["curl", "-sS", "--noproxy", "*", "--connect-timeout", "2", "--max-time", "5", url]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    }

    /// Open a TCP connection from `role` and say how it went, as one word:
    /// `refused` (RST to the SYN), `reset` (accepted, then RST), `eof`
    /// (accepted, then closed), `data`, `timeout` (3 s) or `error <errno>`.
    pub fn probe(&self, role: &str, ip: &str, port: u16) -> String {
        const PROBE: &str = "import socket, sys\n\
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n\
s.settimeout(3)\n\
try:\n    s.connect((sys.argv[1], int(sys.argv[2])))\n    d = s.recv(1)\n    print('eof' if d == b'' else 'data')\n\
except ConnectionRefusedError: print('refused')\n\
except ConnectionResetError: print('reset')\n\
except socket.timeout: print('timeout')\n\
except OSError as e: print('error', e.errno)\n";
        self.ok(role, &["python3", "-c", PROBE, ip, &port.to_string()]).trim().to_string()
    }

    /// Poll `cond` until it holds or `within` passes; panic saying `what`.
    pub fn eventually(&self, within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !cond() {
            assert!(Instant::now() < deadline, "{}: timed out after {within:?} waiting for: {what}", self.id);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first: a namespace lives on while a process is in it.
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

/// Run `f` on a thread of its own inside the named network namespace (its
/// full name), e.g. to bind a server there; the rest of the test process
/// stays where it is.
pub fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
    std::thread::spawn(move || {
        // SAFETY: setns on an open namespace fd; it moves only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread in the namespace panicked")
}

/// [`in_namespace`] without waiting: `f` runs on a thread in the named
/// namespace; join the handle for its result.
pub fn spawn_in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
    std::thread::spawn(move || {
        // SAFETY: setns on an open namespace fd; it moves only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// `ip args`, which must succeed.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(out.status.success(), "ip {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Names of the namespaces that exist now.
pub fn existing_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}
