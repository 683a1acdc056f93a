//! Restarts by systemd keep the listening sockets (issue 12): with
//! `FileDescriptorStoreMax=`, ringport keeps a copy of every listening
//! socket in the service manager's fd store, and after a restart takes them
//! back from `$LISTEN_FDS`. Between the old process's exit and the new
//! one's start, a client's connection waits in the kernel's accept queue of
//! the kept socket and is served by the new process: never refused.
//!
//! This test plays the service manager with the real binary: it listens on
//! `$NOTIFY_SOCKET`, keeps what ringport stores, and starts the next
//! process with those fds at 3.. as systemd does.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Backend, eventually, free_port};

struct ServiceManager {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    /// The fd store: name -> fds, in arrival order.
    store: BTreeMap<String, Vec<OwnedFd>>,
    /// Every name removed, in order.
    removed: Vec<String>,
}

/// What systemd's `same_fd` compares: the open file behind two fds.
fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    let id = |fd: &OwnedFd| {
        let file = std::fs::File::from(fd.try_clone().expect("dup"));
        let meta = file.metadata().expect("fstat");
        (std::os::unix::fs::MetadataExt::dev(&meta), std::os::unix::fs::MetadataExt::ino(&meta))
    };
    id(a) == id(b)
}

impl ServiceManager {
    /// Read every message that arrived; keep and drop fds as asked.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, fds)) = ringport::handover::recv_with_fds(self.socket.as_fd(), &mut buf) else {
                return;
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let name = text.lines().find_map(|l| l.strip_prefix("FDNAME=")).unwrap_or("").to_owned();
            if text.lines().any(|l| l == "FDSTORE=1") {
                // As systemd: a socket already stored (under any name) is
                // kept once.
                for fd in fds {
                    if !self.store.values().flatten().any(|kept| same_file(kept, &fd)) {
                        self.store.entry(name.clone()).or_default().push(fd);
                    }
                }
            } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                self.store.remove(&name);
                self.removed.push(name);
            }
        }
    }

    /// Start `ringport run` with `args`, passing the store as systemd does.
    fn start(&self, args: &[String], log: &std::path::Path) -> Running {
        let (names, fds): (Vec<&str>, Vec<i32>) = self
            .store
            .iter()
            .flat_map(|(name, fds)| fds.iter().map(move |fd| (name.as_str(), fd.as_raw_fd())))
            .unzip();
        let mut command = Command::new("sh");
        // LISTEN_PID must be the process's own: sh's $$, kept by exec.
        command
            .args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_ringport")])
            .args(args)
            .env("NOTIFY_SOCKET", &self.path)
            .env("FDSTORE", "256")
            .env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log"));
        // SAFETY: between fork and exec only dup2 and close, which are
        // async-signal-safe; the fds are open (owned by self.store).
        unsafe {
            command.pre_exec(move || {
                for (i, fd) in fds.iter().enumerate() {
                    if libc::dup2(*fd, 200 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for i in 0..fds.len() as i32 {
                    if libc::dup2(200 + i, 3 + i) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(200 + i);
                }
                Ok(())
            });
        }
        Running(command.spawn().expect("spawn ringport"))
    }
}

/// A ringport process, killed when dropped: a failing assertion must not
/// leave it running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_restart_through_the_fd_store_refuses_no_connection_and_serves_the_queued_one() {
    let echo = Backend::echo();
    let node_port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("manifests");
    std::fs::create_dir_all(&config).expect("dir");
    std::fs::write(
        config.join("services.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec:\n  type: NodePort\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP, nodePort: {node_port}}}\n\
             ---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: web, namespace: default}}\n\
             subsets:\n- addresses: [{{ip: \"127.0.0.1\"}}]\n  ports: [{{name: tcp, port: {}, protocol: TCP}}]\n",
            echo.addr.port()
        ),
    )
    .expect("manifest");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let args: Vec<String> = [
        "run",
        "--config",
        config.to_str().expect("utf-8"),
        "--workers",
        "2",
        "--no-pin",
        "--bind-address",
        "127.0.0.1",
        "--redirect",
        "none",
        "--nodeport-addresses",
        "127.0.0.0/8",
        "--handover-socket",
        "none",
        "--drain-timeout",
        "1s",
        "--healthz-bind-address",
        &admin.to_string(),
        "--metrics-bind-address",
        &admin.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).expect("bind notify socket");
    socket.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let mut manager = ServiceManager { socket, path, store: BTreeMap::new(), removed: Vec::new() };

    let mut old = manager.start(&args, &dir.path().join("old.log"));
    eventually(Duration::from_secs(20), "the first process ready", || get(admin, "/readyz") == Some(200));
    let stored = |m: &mut ServiceManager| {
        m.drain();
        m.store.keys().any(|k| k.starts_with("n/tcp/default/web"))
            && m.store.keys().any(|k| k.starts_with("admin/"))
    };
    eventually(Duration::from_secs(10), "the NodePort and admin sockets stored", || stored(&mut manager));

    // systemctl restart: SIGTERM, wait for the exit, start the next.
    let status = Command::new("kill").arg("-TERM").arg(old.0.id().to_string()).status().expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while old.0.try_wait().ok().flatten().is_none() {
        assert!(Instant::now() < deadline, "the old process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    // No process: the connection waits in the kept socket's queue.
    let mut queued =
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], node_port)), Duration::from_secs(2))
            .expect("no process runs, yet the connection is not refused");
    queued.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    queued.write_all(b"queued while restarting").expect("send");
    queued.shutdown(Shutdown::Write).expect("half-close");
    manager.drain();

    let new_log = dir.path().join("new.log");
    let new = manager.start(&args, &new_log);
    let mut answer = String::new();
    queued.read_to_string(&mut answer).expect("the queued connection is served");
    assert_eq!(answer, "queued while restarting");
    let log = std::fs::read_to_string(&new_log).unwrap_or_default();
    assert!(log.contains("took the sockets the service manager kept"), "{log}");
    eventually(Duration::from_secs(20), "the new process ready on the kept admin socket", || {
        get(admin, "/readyz") == Some(200)
    });
    // The new process stored its sockets over the kept ones, never
    // emptying the store first: a process killed before its first store
    // would otherwise leave the next start nothing to take.
    manager.drain();
    let node_port_name = manager.store.keys().find(|k| k.starts_with("n/tcp/default/web")).cloned();
    let node_port_name = node_port_name.expect("the NodePort's sockets are still stored");
    assert!(manager.removed.is_empty(), "removed from the store: {:?}", manager.removed);
    assert_eq!(manager.store[&node_port_name].len(), 2, "one socket per worker, each stored once");
    drop(new);
}
