//! What the listeners of a configuration hold, indexed for a change that
//! binds only its own service ports: each port's listeners (reused by
//! key), the addresses they claim, the proxy port numbers in use, and the
//! listeners on each port number (the loop check's own addresses).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use super::{ListenKey, Listener};
use crate::model::{Protocol, ServicePortName};

#[derive(Debug, Default)]
pub struct Held {
    by_port: HashMap<ServicePortName, Vec<Arc<Listener>>>,
    claims: HashMap<(SocketAddr, Protocol), ServicePortName>,
    /// Proxy port numbers in use, with how many listeners use each.
    proxy_ports: HashMap<u16, usize>,
    by_number: HashMap<(Protocol, u16), Vec<Arc<Listener>>>,
}

impl Held {
    /// The index of `listeners`.
    pub fn of(listeners: &[Arc<Listener>]) -> Self {
        let mut held = Self::default();
        held.add(listeners);
        held
    }

    /// A listener of `key`'s service port with that key.
    pub fn listener(&self, key: &ListenKey) -> Option<&Arc<Listener>> {
        self.by_port.get(&key.port)?.iter().find(|l| &l.key == key)
    }

    /// Whether `listener` is one of these (not bound by this update).
    pub fn has(&self, listener: &Listener) -> bool {
        self.of_port(&listener.key.port).iter().any(|l| l.id == listener.id)
    }

    /// The listeners of one service port.
    pub fn of_port(&self, port: &ServicePortName) -> &[Arc<Listener>] {
        self.by_port.get(port).map(Vec::as_slice).unwrap_or_default()
    }

    /// The service port whose listener holds `addr`.
    pub fn claimant(&self, addr: SocketAddr, protocol: Protocol) -> Option<&ServicePortName> {
        self.claims.get(&(addr, protocol))
    }

    pub fn proxy_port_used(&self, port: u16) -> bool {
        self.proxy_ports.contains_key(&port)
    }

    /// The listeners on port number `port`, any address.
    pub fn on_number(&self, protocol: Protocol, port: u16) -> &[Arc<Listener>] {
        self.by_number.get(&(protocol, port)).map(Vec::as_slice).unwrap_or_default()
    }

    /// Every listener, in no particular order.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Listener>> {
        self.by_port.values().flatten()
    }

    /// The listeners of `ports` go; `listeners` come.
    pub fn replace<'a>(
        &mut self,
        ports: impl IntoIterator<Item = &'a ServicePortName>,
        listeners: &[Arc<Listener>],
    ) {
        for port in ports {
            for l in self.by_port.remove(port).unwrap_or_default() {
                let claim = (l.addr, l.key.protocol);
                if self.claims.get(&claim) == Some(&l.key.port) {
                    self.claims.remove(&claim);
                }
                if l.key.role.is_proxy()
                    && let Some(n) = self.proxy_ports.get_mut(&l.addr.port())
                {
                    *n -= 1;
                    if *n == 0 {
                        self.proxy_ports.remove(&l.addr.port());
                    }
                }
                let number = (l.key.protocol, l.addr.port());
                if let Some(on) = self.by_number.get_mut(&number) {
                    on.retain(|o| o.id != l.id);
                    if on.is_empty() {
                        self.by_number.remove(&number);
                    }
                }
            }
        }
        self.add(listeners);
    }

    fn add(&mut self, listeners: &[Arc<Listener>]) {
        for l in listeners {
            self.by_port.entry(l.key.port.clone()).or_default().push(Arc::clone(l));
            self.claims.insert((l.addr, l.key.protocol), l.key.port.clone());
            if l.key.role.is_proxy() {
                *self.proxy_ports.entry(l.addr.port()).or_default() += 1;
            }
            self.by_number.entry((l.key.protocol, l.addr.port())).or_default().push(Arc::clone(l));
        }
    }
}

/// Proxy port numbers taken: those `Held` has, and those bound since.
pub(crate) struct Used<'a> {
    held: &'a Held,
    new: HashSet<u16>,
}

impl<'a> Used<'a> {
    pub(crate) fn new(held: &'a Held) -> Self {
        Self { held, new: HashSet::new() }
    }

    pub(crate) fn contains(&self, port: &u16) -> bool {
        self.held.proxy_port_used(*port) || self.new.contains(port)
    }

    pub(crate) fn insert(&mut self, port: u16) {
        self.new.insert(port);
    }
}
