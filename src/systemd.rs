//! systemd's readiness protocol (`Type=notify`): tell the service manager
//! `READY=1` once ringport serves, and `STOPPING=1` when it drains. The
//! datagram goes to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace); without the variable this does nothing.
//!
//! The service manager's file-descriptor store (`FileDescriptorStoreMax=`,
//! systemd 254+, which then sets `$FDSTORE`): ringport keeps a copy of each
//! listening socket there (`FDSTORE=1`, named after its listener), removes
//! it when the listener goes (`FDSTOREREMOVE=1`), and after a restart gets
//! them back (`$LISTEN_FDS`, `$LISTEN_FDNAMES`): the sockets, and the
//! connections queued on them, outlive the process.
//!
//! Invariant: notification never fails the proxy; an unreachable socket is
//! logged and ignored.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

/// Send `state` (e.g. `READY=1`) to the service manager, if there is one.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(e) = send(&path, state) {
        tracing::warn!(error = %e, socket = ?path, "cannot notify systemd");
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    send_with_fds(path, state, &[])
}

/// `state` to the socket at `path` (`@name`: abstract), carrying `fds`.
fn send_with_fds(path: &std::ffi::OsStr, state: &str, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.connect_addr(&addr)?;
    } else {
        socket.connect(path)?;
    }
    crate::dataplane::sys::fdpass::send_with_fds(socket.as_fd(), state.as_bytes(), fds)
}

/// Whether the service manager keeps a file-descriptor store for us.
pub fn fd_store() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
        && std::env::var("FDSTORE").ok().and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > 0)
}

/// Keep copies of `fds` in the store under `name` (a name may hold several).
pub fn store_fds(name: &str, fds: &[BorrowedFd<'_>]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    for chunk in fds.chunks(crate::dataplane::sys::fdpass::MAX_FDS) {
        if let Err(e) = send_with_fds(&path, &format!("FDSTORE=1\nFDNAME={name}"), chunk) {
            tracing::warn!(error = %e, name, "cannot store sockets with the service manager; a restart refuses connections meanwhile");
        }
    }
}

/// Drop the store's copies named `name`.
pub fn remove_fds(name: &str) {
    notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
}

/// The fds the service manager passed us (`$LISTEN_FDS`, for this pid), with
/// their names; empty without. Call once, at start.
pub fn listen_fds() -> Vec<(String, OwnedFd)> {
    let ours =
        std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<i32>().ok()).unwrap_or(0);
    if !ours || count <= 0 {
        return Vec::new();
    }
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    (0..count)
        .filter_map(|i| {
            let name = names.next().unwrap_or("unknown").to_owned();
            crate::dataplane::sys::take_inherited_fd(3 + i).map(|fd| (name, fd))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_reaches_a_path_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        send(path.as_os_str(), "READY=1").expect("send");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn a_state_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("ringport-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind");
        send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
