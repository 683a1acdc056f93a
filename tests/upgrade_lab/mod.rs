//! The handover lab of the upgrade tests (`tests/handover*.rs`): real
//! `ringport run` instances sharing one admin address and one handover
//! socket in a tempdir, NodePort manifests with backends on loopback, and
//! bounded TCP and UDP client loops that count what failed.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Backend, echo_ok, eventually, free_port};

/// One `ringport run` of a handover lab.
pub struct Instance {
    pub child: Child,
    pub log: PathBuf,
}

impl Instance {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log says `what`.
    pub fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(what) {
            assert!(Instant::now() < deadline, "no {what:?} logged in 20 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {within:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Instances sharing one admin address and one handover socket, as two
/// pods of a hostNetwork DaemonSet on one node do.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub admin: SocketAddr,
    pub socket: PathBuf,
    pub started: usize,
}

impl Lab {
    pub fn new() -> Lab {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("handover.sock");
        let admin = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Lab { dir, admin, socket, started: 0 }
    }

    /// A manifest directory of its own holding `manifest`.
    pub fn config(&self, manifest: &str) -> PathBuf {
        let dir = self.dir.path().join(format!("config-{}", self.started));
        std::fs::create_dir_all(&dir).expect("config dir");
        std::fs::write(dir.join("services.yaml"), manifest).expect("write manifest");
        dir
    }

    /// Start an instance on `manifest` with `args` (not waiting for it).
    pub fn start(&mut self, manifest: &str, args: &[&str]) -> Instance {
        self.start_limited(manifest, args, None)
    }

    /// As [`Lab::start`], the soft `RLIMIT_NOFILE` lowered to `nofile`
    /// when given (a shell's `ulimit -Sn`, the hard limit unchanged).
    pub fn start_limited(&mut self, manifest: &str, args: &[&str], nofile: Option<u64>) -> Instance {
        self.started += 1;
        let config = self.config(manifest);
        let log = self.dir.path().join(format!("ringport-{}.log", self.started));
        let bin = env!("CARGO_BIN_EXE_ringport");
        let mut cmd = match nofile {
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.arg("-c").arg(format!("ulimit -Sn {n} && exec \"$0\" \"$@\"")).arg(bin);
                sh
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(if args.contains(&"--workers") { &[][..] } else { &["--workers", "2"][..] })
            .args(["--no-pin", "--bind-address", "127.0.0.1", "--redirect", "none"])
            .args(["--nodeport-addresses", "127.0.0.0/8"])
            .arg("--healthz-bind-address")
            .arg(self.admin.to_string())
            .arg("--metrics-bind-address")
            .arg(self.admin.to_string())
            .arg("--handover-socket")
            .arg(&self.socket)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn ringport");
        Instance { child, log }
    }

    /// Start the first instance and wait until it is ready.
    pub fn first(&mut self, manifest: &str, args: &[&str]) -> Instance {
        let i = self.start(manifest, args);
        eventually(Duration::from_secs(20), "the first instance ready", || {
            get(self.admin, "/readyz").is_some_and(|(code, _)| code == 200)
        });
        i.wait_log("a successor can take over here");
        i
    }

    /// Start a successor, wait for its confirmation and for `old` to exit
    /// 0 within `drain`.
    pub fn upgrade(
        &mut self,
        old: &mut Instance,
        manifest: &str,
        args: &[&str],
        drain: Duration,
    ) -> Instance {
        let new = self.start(manifest, args);
        new.wait_log("handover confirmed");
        let status = old.wait_exit(drain + Duration::from_secs(10));
        assert!(status.success(), "the old instance exited with {status}:\n{}", old.log());
        new.wait_log("a successor can take over here");
        new
    }
}

/// A GET on the admin address: (status, body).
pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, response.split_once("\r\n\r\n")?.1.to_string()))
}

/// The proxy port of `service` (`ns/name:port`) as /debug/snapshot shows it.
pub fn proxy_port(admin: SocketAddr, service: &str) -> Option<u64> {
    let (_, body) = get(admin, "/debug/snapshot")?;
    let snap: serde_json::Value = serde_json::from_str(&body).ok()?;
    snap["service_ports"].as_array()?.iter().find(|p| p["name"] == service)?["proxy_port"].as_u64()
}

/// A NodePort Service `name` with a TCP port (and a UDP one when given),
/// served by backends on loopback.
pub fn node_port_service(name: &str, tcp: (u16, SocketAddr), udp: Option<(u16, SocketAddr)>) -> String {
    let mut ports = format!("  - {{name: tcp, port: 80, protocol: TCP, nodePort: {}}}\n", tcp.0);
    let mut endpoints = format!("{{name: tcp, port: {}, protocol: TCP}}", tcp.1.port());
    if let Some((node_port, backend)) = udp {
        ports += &format!("  - {{name: udp, port: 53, protocol: UDP, nodePort: {node_port}}}\n");
        endpoints += &format!(", {{name: udp, port: {}, protocol: UDP}}", backend.port());
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  type: NodePort\n  ports:\n{ports}---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: default}}\n\
         subsets:\n- addresses: [{{ip: \"127.0.0.1\"}}]\n  ports: [{endpoints}]\n"
    )
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// What a TCP client loop saw: connections made, failed, the longest time
/// between two successful ones.
#[derive(Debug, Default)]
pub struct TcpFigures {
    pub made: u64,
    pub failed: u64,
    pub longest_gap: Duration,
}

pub fn tcp_load(target: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<TcpFigures> {
    std::thread::spawn(move || {
        let mut f = TcpFigures::default();
        let mut last = Instant::now();
        // Bounded: the test stops it, and at most 60 s in any case.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if echo_ok(target, f.made as usize) {
                f.made += 1;
                f.longest_gap = f.longest_gap.max(last.elapsed());
                last = Instant::now();
            } else {
                f.failed += 1;
            }
        }
        f
    })
}

/// What the UDP client saw: requests answered, and the most retries one
/// request needed after the first answer.
#[derive(Debug, Default)]
pub struct UdpFigures {
    pub answered: u64,
    pub retries: u64,
    pub most_retries: u64,
    pub longest_gap: Duration,
}

pub fn udp_load(target: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<UdpFigures> {
    std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind client");
        socket.connect(target).expect("connect");
        let mut f = UdpFigures::default();
        // The retry timeout follows the slowest answer seen so far (x4,
        // 0.5 s to 3 s): a starved machine slows answers, it loses none.
        let mut wait = Duration::from_millis(500);
        let mut buf = [0u8; 64];
        let mut last = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let request = format!("request {i}");
            let mut tries = 0;
            let answered = loop {
                let _ = socket.set_read_timeout(Some(wait));
                let _ = socket.send(request.as_bytes());
                let sent = Instant::now();
                // Late answers to earlier requests are skipped.
                let got = loop {
                    match socket.recv(&mut buf) {
                        Ok(n) if &buf[..n] == request.as_bytes() => {
                            let slowest = (sent.elapsed() * 4)
                                .clamp(Duration::from_millis(500), Duration::from_secs(3));
                            wait = wait.max(slowest);
                            break true;
                        }
                        Ok(_) if sent.elapsed() < wait => continue,
                        _ => break false,
                    }
                };
                if got || stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break got;
                }
                tries += 1;
            };
            if answered {
                if f.answered > 0 {
                    f.most_retries = f.most_retries.max(tries);
                    f.retries += tries;
                }
                f.answered += 1;
                f.longest_gap = f.longest_gap.max(last.elapsed());
                last = Instant::now();
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        f
    })
}

/// The second instance of a lab whose handover cannot happen: it logs
/// `why`, binds afresh, and serves (its own proxy port answers).
pub fn serves_after_binding_afresh(lab: &mut Lab, why: &str) -> Instance {
    let echo = Backend::echo();
    let manifest = node_port_service("web", (free_port(), echo.addr), None);
    let new = lab.start(&manifest, &["--handover-timeout", "1s"]);
    new.wait_log(why);
    new.wait_log("handover failed; binding afresh");
    eventually(Duration::from_secs(20), "ready after binding afresh", || {
        get(lab.admin, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    let port = proxy_port(lab.admin, "default/web:tcp").expect("a proxy port");
    assert!(echo_ok(local(port as u16), 1), "serves after binding afresh:\n{}", new.log());
    new
}

pub fn fake_old(path: &Path) -> socket2::Socket {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).expect("socket");
    s.bind(&socket2::SockAddr::unix(path).expect("path")).expect("bind");
    s.listen(8).expect("listen");
    s
}
