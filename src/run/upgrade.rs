//! `run`'s side of upgrades and restarts: successors that take our
//! sockets over the handover socket (`crate::handover`), and the copies of
//! them systemd's fd store keeps across a restart (`crate::systemd`).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::signal::unix::{SignalKind, signal};

use super::{Engine, RunError};
use crate::handover::{self, HandedAdmin, HandoverError, HandoverOptions, Incoming, Taken};
use crate::listen::ListenerId;
use crate::snapshot::{SharedSnapshot, Snapshot};

/// Hand our sockets over to successors that say hello on the handover
/// socket, from a thread of its own so that the engine keeps applying
/// updates meanwhile. The receiver yields once a successor confirmed: then
/// stop accepting and drain.
pub(super) fn listen_for_successors(
    opts: Option<&HandoverOptions>,
    snapshot: SharedSnapshot,
    handing_over: Arc<AtomicBool>,
    admin: &[HandedAdmin],
) -> (tokio::sync::mpsc::UnboundedReceiver<()>, Option<handover::SocketFile>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut file = None;
    if let Some(h) = opts {
        let admin: Vec<HandedAdmin> = admin
            .iter()
            .filter_map(|a| {
                let socket = a.socket.try_clone().ok()?;
                Some(HandedAdmin { name: a.name.clone(), addr: a.addr, socket })
            })
            .collect();
        let started = handover::Server::listen(&h.path).and_then(|server| {
            file = server.file();
            server
                .spawn(h.timeout, move |successor| {
                    match hand_over(successor, &snapshot, &admin, &handing_over) {
                        Ok(()) => {
                            let _ = tx.send(());
                            false
                        }
                        Err(e) => {
                            handing_over.store(false, Ordering::Release);
                            tracing::warn!(error = %e, "handover: the successor did not confirm; serving on");
                            true
                        }
                    }
                })
                .map_err(|source| handover::HandoverError::Io { path: h.path.clone(), source })
        });
        match started {
            Ok(()) => tracing::info!(path = %h.path.display(), "handover: a successor can take over here"),
            Err(e) => {
                tracing::warn!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "handover: no successor can take over; a restart will bind afresh")
            }
        }
    }
    (rx, file)
}

/// Hold a successor until our first configuration is published (it waits
/// up to its own `--handover-timeout`), send it every socket the current
/// snapshot serves, and wait until it confirms or goes away.
/// From the sockets' sending on, /readyz says 503 (`handing_over`).
fn hand_over(
    successor: Incoming,
    snapshot: &SharedSnapshot,
    admin: &[HandedAdmin],
    handing_over: &AtomicBool,
) -> Result<(), HandoverError> {
    let mut held = false;
    while snapshot.load().generation == 0 {
        if !held {
            tracing::info!("handover: a successor waits until this instance serves its first configuration");
            held = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let current = snapshot.load_full();
    handing_over.store(true, Ordering::Release);
    let sockets = successor.send_sockets(&current.listeners, admin)?;
    tracing::info!(
        listeners = current.listeners.len(),
        sockets,
        "handover: sockets sent; waiting for the successor to confirm"
    );
    successor.await_confirm()
}

/// The sockets to start with: a running instance's (the handover), else
/// those systemd's fd store kept for us across a restart.
pub(super) async fn predecessor(opts: Option<HandoverOptions>) -> Result<Option<Taken>, RunError> {
    let taken = match opts {
        Some(h) => tokio::task::spawn_blocking(move || handover::take_over(&h))
            .await
            .map_err(|_| RunError::ControlPanicked)?,
        None => None,
    };
    // Taken in any case: fds passed to us are ours to close.
    let kept = crate::systemd::listen_fds();
    Ok(taken.or_else(|| Taken::from_service_manager(kept)))
}

/// Once drained: with no successor, remove our handover socket; handed
/// over with `--wait-after-handover`, wait for SIGTERM (or SIGINT).
pub(super) async fn after_drain(
    handed_over: bool,
    socket_file: Option<handover::SocketFile>,
    wait_after: bool,
) -> Result<(), RunError> {
    match (handed_over, socket_file) {
        (false, Some(file)) => file.remove(),
        (true, _) if wait_after => {
            tracing::info!("handed over and drained; waiting for SIGTERM (--wait-after-handover)");
            let mut int = signal(SignalKind::interrupt()).map_err(RunError::Runtime)?;
            let mut term = signal(SignalKind::terminate()).map_err(RunError::Runtime)?;
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {}
    }
    Ok(())
}

/// The store names of what systemd passed back (`taking` from the service
/// manager) and of our admin sockets: replaced once we store ours.
pub(super) fn kept_names(taking: Option<&Taken>, admin: &[HandedAdmin]) -> Vec<String> {
    match taking {
        Some(t) if t.from_pid == 0 => t
            .listeners
            .iter()
            .map(|h| handover::store_name(&h.key, h.addr))
            .chain(t.admin.iter().chain(admin).map(|a| handover::admin_store_name(&a.name)))
            .collect(),
        _ => Vec::new(),
    }
}

/// What we keep in systemd's fd store.
#[derive(Default)]
pub(super) struct FdStore {
    /// The store name of each listener whose sockets are kept there.
    names: HashMap<ListenerId, String>,
    /// What a previous run stored, until our first store: then the names
    /// we no longer use are removed.
    inherited: Option<Vec<String>>,
}

impl Engine {
    /// With systemd's fd store: store the admin sockets; the listeners
    /// follow each publish. What a previous run stored (`kept`) stays until
    /// ours is stored: systemd keeps one copy of a socket stored twice, so
    /// the sockets we took from it are never out of the store, and a
    /// process killed before its first store loses nothing.
    pub(super) fn start_store(&mut self, kept: Vec<String>) {
        if crate::systemd::fd_store() {
            self.stored = Some(FdStore { names: HashMap::new(), inherited: Some(kept) });
            for a in &self.admin_sockets {
                crate::systemd::store_fds(&handover::admin_store_name(&a.name), &[a.socket.as_fd()]);
            }
        }
    }

    /// Keep systemd's fd store in line with the listeners of `current`:
    /// drop the sockets of listeners that left, store those of new ones.
    pub(super) fn store(&mut self, current: &Snapshot) {
        let Some(store) = self.stored.as_mut() else { return };
        let ids: HashSet<ListenerId> = current.listeners.iter().map(|l| l.id).collect();
        store.names.retain(|id, name| {
            let keep = ids.contains(id);
            if !keep {
                crate::systemd::remove_fds(name);
            }
            keep
        });
        for l in current.listeners.iter() {
            if store.names.contains_key(&l.id) {
                continue;
            }
            let name = handover::store_name(&l.key, l.addr);
            let open = l.open_sockets();
            let fds: Vec<BorrowedFd<'_>> = open.iter().map(|fd| fd.as_fd()).collect();
            crate::systemd::store_fds(&name, &fds);
            store.names.insert(l.id, name);
        }
        if let Some(inherited) = store.inherited.take() {
            let ours: HashSet<String> = store
                .names
                .values()
                .cloned()
                .chain(self.admin_sockets.iter().map(|a| handover::admin_store_name(&a.name)))
                .collect();
            for name in inherited.iter().filter(|n| !ours.contains(*n)) {
                crate::systemd::remove_fds(name);
            }
        }
    }
}
