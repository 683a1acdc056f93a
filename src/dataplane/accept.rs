//! A worker's listening sockets: following the snapshot (take new ones,
//! drop those that left, pause those with no usable endpoint), and the
//! multishot accepts on them.
//!
//! Invariants:
//! - A listener's slot is freed only when no accept of it is in flight; a
//!   pending back-off timer counts as one (`armed`), and its token carries
//!   the listener's generation, so a timer or accept that outlives its
//!   listener never acts on the one that reused the slot.
//! - An accepted fd is owned the moment its completion is read, so one
//!   that arrives for a listener that is gone is closed, never leaked.
//! - Accepting pauses with an exponential back-off (20 ms to 1 s) when the
//!   process or host is out of fds or memory, and the warning is logged at
//!   most once a second: exhaustion never turns into a spin or a log flood.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use socket2::SockRef;

use super::fault::ACCEPT_BACKOFF;
use super::fault::Blame;
use super::listeners::Accepting;
use super::slots::Key;
use super::sys;
use super::token::Token;
use super::udp_pace::ReadPace;
use super::worker::Worker;
use crate::listen::{self, Listener, ListenerId};
use crate::model::Protocol;
use crate::snapshot::Snapshot;

/// Whether a listener's socket should accept: a UDP socket is never
/// paused (datagrams without an endpoint are dropped and counted).
fn wanted(snapshot: &Snapshot, l: &Listener) -> bool {
    l.key.protocol == Protocol::Udp || snapshot.serves(l.id)
}

impl Worker {
    /// Bring this worker's accepting sockets in line with the snapshot:
    /// take new listeners, drop those that left, and pause (resume) those
    /// whose service port has no (again has a) usable endpoint.
    pub(super) fn reconcile(&mut self) -> io::Result<()> {
        let stop_now = self.shared.stop.load(Ordering::Acquire) && !self.stopping;
        if stop_now {
            self.begin_stop()?;
        }
        let snapshot = self.shared.snapshot.load_full();
        // Woken with no new snapshot (and no stop begun): the listeners
        // are as last followed; only flows may have to follow.
        if snapshot.generation == self.followed && !stop_now {
            return self.reconcile_flows(&snapshot);
        }
        // One generation on from the last one followed, built from a
        // change: only the listeners it names can differ (`Snapshot`'s
        // invariants). Otherwise every listener is looked at.
        let one_on = snapshot.generation == self.followed + 1 && !snapshot.full;
        self.followed = snapshot.generation;
        if one_on && !self.stopping {
            for &id in &snapshot.changed_listeners {
                let wanted = snapshot.listener(id).map(|l| wanted(&snapshot, l));
                match (self.by_id.get(&id).copied(), snapshot.listener(id)) {
                    (Some(key), _) => self.follow(key, wanted)?,
                    (None, Some(listener)) => self.take(listener, wanted.unwrap_or(false))?,
                    (None, None) => {}
                }
            }
            return self.reconcile_flows(&snapshot);
        }
        let wanted: HashMap<ListenerId, bool> = if self.stopping {
            HashMap::new()
        } else {
            snapshot.listeners.iter().map(|l| (l.id, wanted(&snapshot, l))).collect()
        };
        for key in self.listeners.keys() {
            let id = match self.listeners.get(key) {
                Some(a) => a.id,
                None => continue,
            };
            self.follow(key, wanted.get(&id).copied())?;
        }
        for listener in snapshot.listeners.iter() {
            let Some(&serving) = wanted.get(&listener.id) else { continue };
            if !self.by_id.contains_key(&listener.id) {
                self.take(listener, serving)?;
            }
        }
        self.reconcile_flows(&snapshot)
    }

    /// Bring one accepting socket in line: close it (`None`: its listener
    /// left), pause it (`Some(false)`: no usable endpoint) or resume it.
    fn follow(&mut self, key: Key, wanted: Option<bool>) -> io::Result<()> {
        let Some(a) = self.listeners.get_mut(key) else { return Ok(()) };
        let Some(fd) = a.fd.as_ref() else { return Ok(()) };
        match wanted {
            None => {
                a.fd = None;
                let token = match a.protocol {
                    Protocol::Tcp => Token::Accept(key),
                    Protocol::Udp => Token::UdpListen(key),
                };
                if a.armed {
                    self.cancel(token)?;
                } else {
                    self.forget_listener(key)?;
                }
            }
            Some(false) if !a.paused => {
                // shutdown(SHUT_RD) stops a listening socket but keeps
                // its port; listen() later resumes it on the same port.
                let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Read);
                a.paused = true;
                if a.armed {
                    self.cancel(Token::Accept(key))?;
                }
            }
            Some(true) if a.paused => {
                if let Err(e) = SockRef::from(fd).listen(listen::BACKLOG) {
                    tracing::error!(worker = self.index, error = %e, "cannot resume listening");
                    return Ok(());
                }
                a.paused = false;
                if !a.armed {
                    self.arm_accept(key)?;
                }
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Take this worker's socket of a new listener (once).
    fn take(&mut self, listener: &Listener, serving: bool) -> io::Result<()> {
        let Some(fd) = listener.take_socket(self.index) else { return Ok(()) };
        let protocol = listener.key.protocol;
        // The control side binds TCP sockets without listening, so a
        // port with no endpoint refuses from its very first moment; a
        // worker listens only once it serves the port.
        let serving = serving
            && (protocol == Protocol::Udp
                || SockRef::from(&fd)
                    .listen(listen::BACKLOG)
                    .map_err(|e| tracing::error!(worker = self.index, error = %e, "cannot start listening"))
                    .is_ok());
        if !serving && protocol == Protocol::Tcp {
            // A socket handed over by the previous instance already
            // listens: stop it as a pause does (a fresh one does not
            // listen, and the call fails harmlessly).
            let _ = SockRef::from(&fd).shutdown(std::net::Shutdown::Read);
        }
        let a = Accepting {
            id: listener.id,
            role: listener.key.role,
            protocol,
            shared: listener.key.is_shared(),
            fd: Some(fd),
            paused: !serving,
            armed: false,
            pace: ReadPace::new(sys::BATCH),
        };
        let key = self.listeners.insert(a);
        self.by_id.insert(listener.id, key);
        match protocol {
            Protocol::Udp => self.arm_udp_listener(key),
            Protocol::Tcp if serving => self.arm_accept(key),
            Protocol::Tcp => Ok(()),
        }
    }

    pub(super) fn arm_accept(&mut self, key: Key) -> io::Result<()> {
        let Some(a) = self.listeners.get_mut(key) else { return Ok(()) };
        let Some(fd) = a.fd.as_ref() else {
            return self.forget_listener(key);
        };
        // Paused, or at the connection cap: clients wait in the backlog.
        if a.paused || self.at_cap {
            return Ok(());
        }
        a.armed = true;
        self.driver.accept(fd.as_fd(), Token::Accept(key))
    }

    /// An accept's back-off timer ran out: accept again (or let go of a
    /// listener that left meanwhile).
    pub(super) fn on_accept_retry(&mut self, key: Key) -> io::Result<()> {
        let Some(a) = self.listeners.get_mut(key) else { return Ok(()) };
        a.armed = false;
        self.arm_accept(key)
    }

    pub(super) fn forget_listener(&mut self, key: Key) -> io::Result<()> {
        if let Some(a) = self.listeners.remove(key) {
            self.by_id.remove(&a.id);
        }
        Ok(())
    }

    pub(super) fn on_accept(&mut self, key: Key, result: i32, more: bool) -> io::Result<()> {
        // Owned at once: dropped (closed) on every path that does not use it.
        let client = sys::accepted(result);
        let Some(a) = self.listeners.get_mut(key) else { return Ok(()) };
        // A client the kernel already accepted for us is served even when
        // its listener is closing (a stop, a handover to a successor): the
        // accept completed before the cancel, so no other process can take
        // it. (`on_client` resets it if its service port is gone.)
        let open = !a.paused;
        if !more {
            a.armed = false;
        }
        if let Some(client) = client {
            self.accept_backoff = 0;
            if open {
                self.on_client(key, client)?;
            }
        } else if open && result != -libc::ECANCELED {
            let e = io::Error::from_raw_os_error(-result);
            let delay = if Blame::of_local_resources(&e) {
                let step = self.accept_backoff;
                self.accept_backoff = (step + 1).min(ACCEPT_BACKOFF.len() - 1);
                step
            } else {
                0
            };
            if let Some(held_back) = self.accept_warnings.allow(Instant::now()) {
                tracing::warn!(worker = self.index, error = %e, retry_in = ?ACCEPT_BACKOFF[delay], held_back, "accept failed");
            }
            if !more {
                if let Some(a) = self.listeners.get_mut(key) {
                    a.armed = true;
                }
                let ts = self.accept_retry[delay];
                return self.driver.timeout(ts, Token::AcceptRetry(key));
            }
        }
        if more {
            return Ok(());
        }
        match self.listeners.get(key) {
            Some(a) if a.fd.is_none() => self.forget_listener(key),
            Some(a) if !a.paused && !a.armed => self.arm_accept(key),
            _ => Ok(()),
        }
    }
}
