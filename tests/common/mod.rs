//! Shared helpers for the end-to-end tests: the real `ringport` binary on a
//! manifest in a temporary directory, small real backends on loopback, and
//! polling with a deadline (tests never sleep to wait for a condition).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Poll `cond` until it holds or `within` passes; panic saying `what`.
pub fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// The `ringport run` process under test.
pub struct Proxy {
    child: Child,
    /// The manifest directory ringport watches.
    pub dir: tempfile::TempDir,
    /// Logs and other files, kept out of the watched directory.
    scratch: tempfile::TempDir,
    pub metrics: SocketAddr,
    log: PathBuf,
}

impl Proxy {
    /// Start `ringport run` on `manifest` with 2 unpinned workers (unless
    /// `args` says `--workers`) plus `args`, and wait until it is ready.
    pub fn start(manifest: &str, args: &[&str]) -> Proxy {
        Self::start_with_nofile(manifest, args, None)
    }

    /// `start`, with `RLIMIT_NOFILE` set to `nofile` (soft and hard) through
    /// util-linux's `prlimit`, so that fd-budget tests do not depend on the
    /// machine's limits.
    pub fn start_with_nofile(manifest: &str, args: &[&str], nofile: Option<u64>) -> Proxy {
        Self::start_within(manifest, args, nofile, Duration::from_secs(20))
    }

    /// `start_with_nofile`, ready within `ready_within` (a large manifest).
    pub fn start_within(manifest: &str, args: &[&str], nofile: Option<u64>, ready_within: Duration) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("services.yaml"), manifest).expect("write manifest");
        let scratch = tempfile::tempdir().expect("temp dir");
        let log = scratch.path().join("ringport.log");
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut command = match nofile {
            None => Command::new(env!("CARGO_BIN_EXE_ringport")),
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(env!("CARGO_BIN_EXE_ringport"));
                c
            }
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(dir.path())
            // Two workers unless the test asks for its own number.
            .args(if args.contains(&"--workers") { &[][..] } else { &["--workers", "2"][..] })
            .args(["--no-pin", "--bind-address", "127.0.0.1"])
            // These tests run on the host: they must never touch its rules.
            .args(["--redirect", "none"])
            // Nor leave handover sockets in the host's /run/ringport.
            .args(if args.contains(&"--handover-socket") {
                &[][..]
            } else {
                &["--handover-socket", "none"][..]
            })
            // One admin address serves every route (health and metrics).
            .arg("--healthz-bind-address")
            .arg(metrics.to_string())
            .arg("--metrics-bind-address")
            .arg(metrics.to_string())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn ringport");
        let mut proxy = Proxy { child, dir, scratch, metrics, log };
        let deadline = Instant::now() + ready_within;
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!("ringport exited with {status} before ready:\n{}", proxy.log());
            }
            if proxy.get("/readyz").is_some_and(|(code, _)| code == 200) {
                break;
            }
            assert!(Instant::now() < deadline, "ringport not ready in {ready_within:?}:\n{}", proxy.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for the process to exit on its own; panic after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "ringport still running after {within:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything ringport logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replace the manifest the way an editor does: write aside, rename over.
    pub fn write_manifest(&self, text: &str) {
        let tmp = self.dir.path().join(".services.yaml.tmp");
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.dir.path().join("services.yaml")).expect("rename manifest");
    }

    /// A GET on the metrics address: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1.to_string();
        Some((code, body))
    }

    /// The value of one exposed sample, e.g.
    /// `ringport_connections_accepted_total{namespace="default",service="svc",port=""}`.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (code, body) = self.get("/metrics")?;
        assert_eq!(code, 200, "{body}");
        body.lines().find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let (code, body) = self.get("/debug/snapshot").expect("GET /debug/snapshot");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("snapshot JSON")
    }

    pub fn generation(&self) -> u64 {
        self.snapshot()["generation"].as_u64().expect("generation")
    }

    /// Wait until a snapshot newer than `generation` is served.
    pub fn wait_newer_than(&self, generation: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let snap = self.snapshot();
            if snap["generation"].as_u64().unwrap_or(0) > generation {
                return snap;
            }
            assert!(
                Instant::now() < deadline,
                "no reload past generation {generation} in 10 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:<proxy port>` of a service port (`ns/name:port`).
    pub fn proxy_addr(&self, service_port: &str) -> SocketAddr {
        let snap = self.snapshot();
        let port = snap["service_ports"]
            .as_array()
            .expect("service_ports")
            .iter()
            .find(|p| p["name"] == service_port)
            .and_then(|p| p["proxy_port"].as_u64())
            .unwrap_or_else(|| panic!("no proxy port for {service_port} in {snap:#}"));
        SocketAddr::from(([127, 0, 0, 1], port as u16))
    }

    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// Kernel io_uring worker threads (io-wq) of the process.
    pub fn io_wq_threads(&self) -> usize {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid())).expect("tasks");
        tasks
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("iou-wrk"))
            })
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend on loopback: one thread per connection running `handler`.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl Backend {
    pub fn spawn(bind: &str, handler: fn(TcpStream)) -> Backend {
        // A deep backlog: std's 128 would drop SYNs under a 1000-connection burst.
        let addr: SocketAddr = bind.parse().expect("backend address");
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        socket.bind(&addr.into()).expect("bind backend");
        socket.listen(4096).expect("listen");
        let listener = TcpListener::from(socket);
        let addr = listener.local_addr().expect("backend addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || handler(stream));
            }
        });
        Backend { addr, accepted }
    }

    /// Echo until EOF, then close the write side.
    pub fn echo() -> Backend {
        Backend::echo_at("127.0.0.1:0")
    }

    /// An echo backend on `bind` (e.g. an address a test saw fail before).
    pub fn echo_at(bind: &str) -> Backend {
        Backend::spawn(bind, |s| {
            let mut r = match s.try_clone() {
                Ok(r) => r,
                Err(_) => return,
            };
            let mut w = s;
            let _ = std::io::copy(&mut r, &mut w);
            let _ = w.shutdown(Shutdown::Write);
        })
    }

    /// Say who it is (its own address, one line), then echo until EOF.
    pub fn greeter() -> Backend {
        Backend::greeter_on("127.0.0.1:0")
    }

    /// A greeter on `bind`.
    pub fn greeter_on(bind: &str) -> Backend {
        Backend::spawn(bind, |mut s| {
            let me = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
            if writeln!(s, "{me}").is_err() {
                return;
            }
            let mut r = match s.try_clone() {
                Ok(r) => r,
                Err(_) => return,
            };
            let _ = std::io::copy(&mut r, &mut s);
            let _ = s.shutdown(Shutdown::Write);
        })
    }
}

/// A UDP backend on loopback: it answers each datagram with `reply`, or
/// with the datagram itself (an echo) when `reply` is `None`.
pub fn udp_backend(reply: Option<&'static [u8]>) -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP backend");
    let addr = socket.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(reply.unwrap_or(&buf[..n]), from);
        }
    });
    addr
}

/// One round trip through an echo service at `addr`: connect, send
/// `payload`, half-close, read to the end; what came back, or the error.
pub fn try_echo(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(payload)?;
    c.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    c.read_to_end(&mut back)?;
    Ok(back)
}

/// [`try_echo`], failing the test on an error.
pub fn echo_once(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    try_echo(addr, payload).unwrap_or_else(|e| panic!("echo through {addr}: {e}"))
}

/// One echo exchange through the proxy at `target`: true when the bytes
/// came back whole.
pub fn echo_ok(target: SocketAddr, i: usize) -> bool {
    let msg = format!("message {i:06} through the proxy");
    try_echo(target, msg.as_bytes()).is_ok_and(|back| back == msg.as_bytes())
}

/// Connect to `addr` and read the greeter's first line.
pub fn whoami(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect through proxy");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).expect("read greeting") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).expect("utf-8 greeting")
}

/// A Service with hand-written Endpoints: one unnamed TCP port, one subset
/// per backend (so each backend may have its own port).
pub fn service_with_endpoints(name: &str, backends: &[SocketAddr]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.7.7\n  ports:\n  - {{port: 80, protocol: TCP}}\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: default}}\nsubsets:\n"
    );
    for b in backends {
        yaml += &format!(
            "- addresses: [{{ip: \"{}\"}}]\n  ports: [{{port: {}, protocol: TCP}}]\n",
            b.ip(),
            b.port()
        );
    }
    yaml
}
