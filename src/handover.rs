//! Upgrades that lose nothing: a running ringport hands its listening
//! sockets to its successor over a unix socket (`--handover-socket`), as
//! HAProxy's `-x` does, and the same socket objects, with their kernel
//! accept queues and UDP receive buffers, go on being served.
//!
//! The exchange, one JSON message per `SOCK_SEQPACKET` packet:
//! 1. new -> old `hello {version}`; old -> new `welcome` (once the old
//!    instance has published its first configuration: until then the
//!    successor waits, up to its `--handover-timeout`) or `refuse`.
//! 2. old -> new one `listener {key, addr}` per listener, carrying its
//!    sockets (`SCM_RIGHTS`, one per worker), one `admin {name, addr}` per
//!    admin server, then `end`.
//! 3. The new instance adopts the sockets whose key its configuration
//!    wants (`listen::Binder::adopt`), binds the rest, closes the others,
//!    publishes, and sends `confirm`.
//! 4. On `confirm` the old instance answers `stopping`, stops accepting
//!    and drains as on SIGTERM. Until then it serves as before (and applies
//!    updates), so nothing is ever without a server: before `confirm` both
//!    serve the same sockets. A successor that gets no `stopping` exits
//!    non-zero rather than serve beside the old instance.
//!
//! Invariants:
//! - Every failure ends in the new instance binding afresh, logged once
//!   with its cause: no old instance, a stale path, no answer within
//!   `--handover-timeout`, another version, or a refusal.
//! - The old instance sends from its handover thread what its current
//!   snapshot serves, so its engine goes on applying updates; it waits for
//!   `confirm` until the successor's connection ends, then serves on.
//! - Two new instances that race are served one after the other: the
//!   second finds the old one gone mid-handover and takes over from the
//!   first once that one listens on the path, within its timeout.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::dataplane::sys::fdpass::{self, MAX_FDS};
/// The fd-passing calls (safe wrappers of `sendmsg`/`recvmsg` with
/// `SCM_RIGHTS`), for tests and tools that speak the handover or the
/// service manager's protocol.
pub use crate::dataplane::sys::fdpass::{recv_with_fds, send_with_fds};
use crate::listen::{ListenKey, Listener};

mod store;
pub use store::{admin_store_name, store_name};

/// The version of the exchange. A peer speaking another is refused.
pub const VERSION: u32 = 1;
/// The directory of the default handover socket.
pub const DEFAULT_DIR: &str = "/run/ringport";
/// Room for one message (a listener's key and address).
const MESSAGE_BYTES: usize = 16 * 1024;

/// Where and how long to try.
#[derive(Clone, Debug)]
pub struct HandoverOptions {
    pub path: PathBuf,
    /// How long the new instance waits for each answer of the old one.
    pub timeout: Duration,
    /// Once handed over and drained, wait for SIGTERM instead of exiting
    /// (`--wait-after-handover`): a DaemonSet's old pod must not exit on
    /// its own, or the kubelet restarts it and it takes over again.
    pub wait_after: bool,
}

/// The default socket path for an instance whose health server listens on
/// `health`: one per network namespace and health port, so that only the
/// instance that would clash with this one on its ports is taken over
/// (tests and unrelated instances on one host never hand over to each
/// other).
pub fn default_path(health: SocketAddr) -> PathBuf {
    let netns = std::fs::read_link("/proc/self/ns/net")
        .ok()
        .and_then(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("net:[").and_then(|r| r.strip_suffix(']')).map(str::to_owned)
        })
        .unwrap_or_else(|| "0".into());
    Path::new(DEFAULT_DIR).join(format!("handover-{netns}-{}.sock", health.port()))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "camelCase")]
enum Msg {
    Hello { version: u32 },
    Welcome { version: u32, pid: u32 },
    Refuse { version: u32, reason: String },
    Listener { key: ListenKey, addr: SocketAddr },
    Admin { name: String, addr: SocketAddr },
    End { sockets: usize },
    Confirm,
    Stopping,
}

impl Msg {
    fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Welcome { .. } => "welcome",
            Msg::Refuse { .. } => "refuse",
            Msg::Listener { .. } => "listener",
            Msg::Admin { .. } => "admin",
            Msg::End { .. } => "end",
            Msg::Confirm => "confirm",
            Msg::Stopping => "stopping",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("no instance to take over from ({path} does not exist)")]
    NoOld { path: PathBuf },
    #[error("stale handover socket {path}: nothing listens on it")]
    Stale { path: PathBuf },
    #[error("no answer from the other instance within {0:?}")]
    Timeout(Duration),
    #[error("the other instance closed the handover before it ended")]
    Closed,
    #[error("the other instance speaks handover version {theirs}, this one {VERSION}")]
    Version { theirs: u32 },
    #[error("the other instance refused: {0}")]
    Refused(String),
    #[error("the other end of the handover runs as uid {uid}, neither root nor this instance's uid")]
    Peer { uid: u32 },
    #[error("handover directory {path} is writable by others and not sticky; refusing to use it")]
    UnsafeDir { path: PathBuf },
    #[error("unexpected message {got:?} from the other instance")]
    Unexpected { got: &'static str },
    #[error("malformed message from the other instance")]
    Malformed(#[source] serde_json::Error),
    #[error("handover socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A socket the old instance handed over, with what it was for.
pub struct Handed {
    pub key: ListenKey,
    pub addr: SocketAddr,
    pub sockets: Vec<OwnedFd>,
}

/// An admin server's listening socket handed over.
pub struct HandedAdmin {
    pub name: String,
    pub addr: SocketAddr,
    pub socket: OwnedFd,
}

/// One end of a handover connection.
struct Conn {
    sock: Socket,
    path: PathBuf,
}

impl Conn {
    fn io(&self, source: io::Error) -> HandoverError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => match self.sock.read_timeout() {
                Ok(Some(t)) => HandoverError::Timeout(t),
                _ => HandoverError::Io { path: self.path.clone(), source },
            },
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => HandoverError::Closed,
            _ => HandoverError::Io { path: self.path.clone(), source },
        }
    }

    /// Ok when the peer runs as root or as our own user: only those may
    /// take our sockets or give us theirs.
    fn trusted(&self) -> Result<(), HandoverError> {
        let uid = fdpass::peer_uid(self.sock.as_fd()).map_err(|e| self.io(e))?;
        if uid == 0 || uid == fdpass::effective_uid() { Ok(()) } else { Err(HandoverError::Peer { uid }) }
    }

    fn send(&self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> Result<(), HandoverError> {
        let bytes = serde_json::to_vec(msg).map_err(HandoverError::Malformed)?;
        fdpass::send_with_fds(self.sock.as_fd(), &bytes, fds).map_err(|e| self.io(e))
    }

    /// The next message, waiting up to `timeout` (`None`: until one comes
    /// or the connection ends).
    fn recv(&self, timeout: Option<Duration>) -> Result<(Msg, Vec<OwnedFd>), HandoverError> {
        self.sock.set_read_timeout(timeout).map_err(|e| self.io(e))?;
        let mut buf = vec![0u8; MESSAGE_BYTES];
        let (n, fds) = fdpass::recv_with_fds(self.sock.as_fd(), &mut buf).map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(HandoverError::Closed);
        }
        let msg = serde_json::from_slice(&buf[..n]).map_err(HandoverError::Malformed)?;
        Ok((msg, fds))
    }
}

fn seqpacket() -> io::Result<Socket> {
    Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)
}

/// What the new instance received; [`Taken::confirm`] once it serves.
pub struct Taken {
    /// The old instance, to confirm to; none for sockets the service
    /// manager kept (`Taken::from_service_manager`).
    conn: Option<Conn>,
    /// How long to wait for the old instance's `stopping`.
    timeout: Duration,
    pub from_pid: u32,
    pub listeners: Vec<Handed>,
    pub admin: Vec<HandedAdmin>,
}

impl Taken {
    /// Tell the old instance to stop accepting and drain, and wait for its
    /// `stopping`. An error means the old instance may serve on: the caller
    /// stops rather than serve beside it.
    pub fn confirm(self) -> Result<(), HandoverError> {
        let Some(conn) = self.conn else { return Ok(()) };
        conn.send(&Msg::Confirm, &[])?;
        match conn.recv(Some(self.timeout))? {
            (Msg::Stopping, _) => {
                tracing::info!(
                    old_pid = self.from_pid,
                    "handover confirmed: the old instance stops accepting and drains"
                );
                Ok(())
            }
            (other, _) => Err(HandoverError::Unexpected { got: other.name() }),
        }
    }
}

/// Take over from the instance listening on `opts.path`, if any. Every
/// failure is logged once and gives `None`: bind afresh.
pub fn take_over(opts: &HandoverOptions) -> Option<Taken> {
    let deadline = Instant::now() + opts.timeout;
    let mut lost = false;
    loop {
        let e = match attempt(opts) {
            Ok(taken) => {
                let sockets: usize = taken.listeners.iter().map(|h| h.sockets.len()).sum();
                tracing::info!(old_pid = taken.from_pid, listeners = taken.listeners.len(), sockets, admin = taken.admin.len(), path = %opts.path.display(), "handover: took the old instance's sockets");
                return Some(taken);
            }
            Err(e) => e,
        };
        // The old instance went away mid-handover: most likely another new
        // instance took over first, and will listen on the path soon.
        let closed = matches!(e, HandoverError::Closed);
        let gone = matches!(e, HandoverError::Stale { .. } | HandoverError::NoOld { .. });
        if Instant::now() < deadline && (closed || (lost && gone)) {
            if closed && !lost {
                tracing::info!(path = %opts.path.display(), "handover: the old instance went away mid-handover (another new instance took over?); trying again");
            }
            lost = true;
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match e {
            HandoverError::NoOld { .. } => tracing::info!(reason = %e, "handover: none; binding afresh"),
            _ => tracing::warn!(reason = %e, path = %opts.path.display(), "handover failed; binding afresh"),
        }
        return None;
    }
}

fn attempt(opts: &HandoverOptions) -> Result<Taken, HandoverError> {
    let path = opts.path.clone();
    let sock = seqpacket().map_err(|source| HandoverError::Io { path: path.clone(), source })?;
    let addr = SockAddr::unix(&path).map_err(|source| HandoverError::Io { path: path.clone(), source })?;
    if let Err(e) = sock.connect(&addr) {
        return Err(match e.raw_os_error() {
            Some(libc::ENOENT) => HandoverError::NoOld { path },
            Some(libc::ECONNREFUSED) => HandoverError::Stale { path },
            _ => HandoverError::Io { path, source: e },
        });
    }
    let conn = Conn { sock, path };
    conn.trusted()?;
    conn.send(&Msg::Hello { version: VERSION }, &[])?;
    let from_pid = match conn.recv(Some(opts.timeout))?.0 {
        Msg::Welcome { version: VERSION, pid } => pid,
        Msg::Welcome { version, .. } => return Err(HandoverError::Version { theirs: version }),
        Msg::Refuse { version, .. } if version != VERSION => {
            return Err(HandoverError::Version { theirs: version });
        }
        Msg::Refuse { reason, .. } => return Err(HandoverError::Refused(reason)),
        other => return Err(HandoverError::Unexpected { got: other.name() }),
    };
    let (mut listeners, mut admin): (Vec<Handed>, Vec<HandedAdmin>) = (Vec::new(), Vec::new());
    loop {
        match conn.recv(Some(opts.timeout))? {
            (Msg::Listener { key, addr }, fds) => match listeners.iter_mut().find(|h| h.key == key) {
                // A listener with more sockets than one message carries.
                Some(h) => h.sockets.extend(fds),
                None => listeners.push(Handed { key, addr, sockets: fds }),
            },
            (Msg::Admin { name, addr }, fds) => {
                if let Some(socket) = fds.into_iter().next() {
                    admin.push(HandedAdmin { name, addr, socket });
                }
            }
            (Msg::End { .. }, _) => break,
            (other, _) => return Err(HandoverError::Unexpected { got: other.name() }),
        }
    }
    Ok(Taken { conn: Some(conn), timeout: opts.timeout, from_pid, listeners, admin })
}

/// The old instance's side: listens on the path for successors.
pub struct Server {
    sock: Socket,
    path: PathBuf,
}

/// The socket file a [`Server`] made; removed on a stop without successor.
pub struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl SocketFile {
    /// Remove the file if it is still ours (a successor binds its own in
    /// its place).
    pub fn remove(self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A successor that said hello in our version, waiting for the sockets.
pub struct Incoming {
    conn: Conn,
}

impl Server {
    /// Listen on `path`, replacing whatever was there (a stale socket, or
    /// the instance this one took over from, which no longer needs it).
    pub fn listen(path: &Path) -> Result<Server, HandoverError> {
        let err = |source| HandoverError::Io { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            safe_dir(dir)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        let sock = seqpacket().map_err(err)?;
        sock.bind(&SockAddr::unix(path).map_err(err)?).map_err(err)?;
        // Only root (or this user) may take our sockets.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(err)?;
        sock.listen(8).map_err(err)?;
        Ok(Server { sock, path: path.to_owned() })
    }

    /// The socket file, to remove on a stop without successor.
    pub fn file(&self) -> Option<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::symlink_metadata(&self.path).ok()?.ino();
        Some(SocketFile { path: self.path.clone(), ino })
    }

    /// Accept successors on a thread of its own, check their hello, and
    /// give each to `deliver` on that thread (false: stop).
    pub fn spawn(
        self,
        timeout: Duration,
        deliver: impl Fn(Incoming) -> bool + Send + 'static,
    ) -> io::Result<()> {
        std::thread::Builder::new().name("ringport-handover".into()).spawn(move || {
            loop {
                let sock = match self.sock.accept() {
                    Ok((sock, _)) => sock,
                    Err(e) => {
                        tracing::warn!(error = %e, "handover: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let conn = Conn { sock, path: self.path.clone() };
                if let Err(e) = conn.trusted() {
                    tracing::warn!(error = %e, "handover: refused a connection");
                    continue;
                }
                match conn.recv(Some(timeout)) {
                    Ok((Msg::Hello { version: VERSION }, _)) => {}
                    Ok((Msg::Hello { version }, _)) => {
                        tracing::warn!(
                            theirs = version,
                            ours = VERSION,
                            "handover: refused a successor of another version; it binds afresh"
                        );
                        let reason = format!("handover version {VERSION} only");
                        let _ = conn.send(&Msg::Refuse { version: VERSION, reason }, &[]);
                        continue;
                    }
                    Ok((other, _)) => {
                        tracing::warn!(got = other.name(), "handover: unexpected first message");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "handover: no hello from a successor");
                        continue;
                    }
                }
                if !deliver(Incoming { conn }) {
                    return;
                }
            }
        })?;
        Ok(())
    }
}

/// Create `dir` (mode 0700) if missing; refuse one that others may write
/// to unless it is sticky (as `/tmp`), where our socket could be replaced.
fn safe_dir(dir: &Path) -> Result<(), HandoverError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| HandoverError::Io { path: dir.to_owned(), source };
    if !dir.as_os_str().is_empty() && !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    }
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let mode = std::fs::metadata(dir).map_err(err)?.permissions().mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(HandoverError::UnsafeDir { path: dir.to_owned() });
    }
    Ok(())
}

impl Incoming {
    /// Refuse the successor (it binds afresh).
    pub fn refuse(self, reason: &str) {
        tracing::warn!(reason, "handover: refused a successor; it binds afresh");
        let _ = self.conn.send(&Msg::Refuse { version: VERSION, reason: reason.into() }, &[]);
    }

    /// Welcome the successor, send every open socket of `listeners` and of
    /// the admin servers, and `end`; the number of sockets sent.
    pub fn send_sockets(
        &self,
        listeners: &[Arc<Listener>],
        admin: &[HandedAdmin],
    ) -> Result<usize, HandoverError> {
        self.conn.send(&Msg::Welcome { version: VERSION, pid: std::process::id() }, &[])?;
        let mut sockets = 0;
        for l in listeners {
            let open = l.open_sockets();
            for chunk in open.chunks(MAX_FDS) {
                let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|fd| fd.as_fd()).collect();
                self.conn.send(&Msg::Listener { key: l.key.clone(), addr: l.addr }, &fds)?;
                sockets += fds.len();
            }
        }
        for a in admin {
            self.conn.send(&Msg::Admin { name: a.name.clone(), addr: a.addr }, &[a.socket.as_fd()])?;
        }
        self.conn.send(&Msg::End { sockets }, &[])?;
        Ok(sockets)
    }

    /// Wait for the successor's `confirm` until its connection ends, and
    /// answer `stopping`. Ok once confirmed: stop accepting and drain.
    pub fn await_confirm(self) -> Result<(), HandoverError> {
        match self.conn.recv(None)? {
            (Msg::Confirm, _) => self.conn.send(&Msg::Stopping, &[]),
            (other, _) => Err(HandoverError::Unexpected { got: other.name() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listen::ListenRole;
    use crate::model::{Protocol, ServiceName, ServicePortName};

    #[test]
    fn the_socket_directory_is_made_private_and_an_open_one_refused_unless_sticky() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let made = tmp.path().join("a/b");
        assert!(safe_dir(&made).is_ok());
        assert_eq!(std::fs::metadata(&made).unwrap().permissions().mode() & 0o7777, 0o700);
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(safe_dir(&open), Err(HandoverError::UnsafeDir { .. })));
        assert!(matches!(Server::listen(&open.join("h.sock")), Err(HandoverError::UnsafeDir { .. })));
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(safe_dir(&open).is_ok());
    }

    /// The wire format of one `listener` message: a change here (a field of
    /// `ListenKey`, `ServicePortName` or `ListenRole`) breaks handovers
    /// between releases, so it must come with a [`VERSION`] bump and a new
    /// golden text.
    #[test]
    fn a_listener_message_is_exactly_the_golden_json_of_this_version() {
        let ip = "127.0.0.1".parse().unwrap();
        let key = ListenKey {
            port: ServicePortName { service: ServiceName::new("default", "web"), port: "http".into() },
            protocol: Protocol::Tcp,
            role: ListenRole::NodePort(ip),
            wanted_port: 30080,
        };
        let msg = Msg::Listener { key, addr: "127.0.0.1:30080".parse().unwrap() };
        let golden = r#"{"msg":"listener","key":{"port":{"service":{"namespace":"default","name":"web"},"port":"http"},"protocol":"TCP","role":{"NodePort":"127.0.0.1"},"wanted_port":30080},"addr":"127.0.0.1:30080"}"#;
        assert_eq!(VERSION, 1, "a new version: write this test's golden text anew");
        assert_eq!(serde_json::to_string(&msg).unwrap(), golden);
    }
}
