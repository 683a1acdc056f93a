//! What a service port's rules are made from besides its spec, as the
//! desired rules keep it per port: small, as a large node keeps one per
//! service port. The proxy ports the rules send to are not kept: they
//! follow from the port's own proxy listeners and the shared proxy ports,
//! which stay the same for as long as the entries do (a change of the
//! shared ports starts the desired rules anew).

use std::net::SocketAddr;

use super::ListenerChanges;
use crate::listen::ListenRole;
use crate::model::{IpFamily, Protocol, ServicePort, ServicePortName};
use crate::redirect::rules::Locality;
use crate::snapshot::{Emptiness, PortState};

/// The roles of a port's own proxy listeners, in the order kept.
const PROXY_ROLES: [ListenRole; 4] =
    [ListenRole::Proxy, ListenRole::Proxy6, ListenRole::ExternalProxy, ListenRole::ExternalProxy6];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Inputs {
    /// What most ports of a node with shared proxy ports have none of (no
    /// allocation then, and an entry of 48 bytes: an allocator size class).
    rare: Option<Box<RareInputs>>,
    pub(super) emptiness: [Emptiness; 2],
}

/// Never all empty: then there is none (so equal inputs compare equal).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RareInputs {
    /// The port's own proxy listeners, by `PROXY_ROLES`.
    listeners: [Option<SocketAddr>; 4],
    /// Per external IP, then per LB IP: not on this node (so redirected).
    remote: Box<[bool]>,
}

fn rare(listeners: [Option<SocketAddr>; 4], remote: Box<[bool]>) -> Option<Box<RareInputs>> {
    let any = listeners.iter().any(Option::is_some) || !remote.is_empty();
    any.then(|| Box::new(RareInputs { listeners, remote }))
}

impl Inputs {
    /// A known port's inputs again: its proxy listeners carried over (and
    /// changed by `changes` unless `same_proxies`), with the emptiness
    /// given and the locality of its addresses judged anew.
    pub(super) fn again(
        &self,
        port: &PortState,
        emptiness: [Emptiness; 2],
        local: &Locality,
        same_proxies: bool,
        changes: &ListenerChanges<'_>,
    ) -> Self {
        let again = Self { rare: rare(self.listeners(), remote(&port.spec, local)), emptiness };
        match same_proxies {
            true => again,
            false => again.with_changes(&port.spec.name, changes),
        }
    }

    /// A new port's inputs.
    pub(super) fn new(port: &PortState, local: &Locality, changes: &ListenerChanges<'_>) -> Self {
        let fresh = Self { rare: rare([None; 4], remote(&port.spec, local)), emptiness: emptiness(port) };
        fresh.with_changes(&port.spec.name, changes)
    }

    /// With the proxy listeners of `name` that went removed and those that
    /// came added.
    fn with_changes(mut self, name: &ServicePortName, changes: &ListenerChanges<'_>) -> Self {
        let mut all = self.listeners();
        let at = |role: &ListenRole| PROXY_ROLES.iter().position(|r| r == role);
        for i in changes.went.get(name).into_iter().flatten().filter_map(at) {
            all[i] = None;
        }
        for (i, role) in PROXY_ROLES.iter().enumerate() {
            if let Some(addr) = changes.came.get(&(name, *role)) {
                all[i] = Some(*addr);
            }
        }
        let remote = self.rare.take().map(|r| r.remote).unwrap_or_default();
        self.rare = rare(all, remote);
        self
    }

    fn listeners(&self) -> [Option<SocketAddr>; 4] {
        self.rare.as_ref().map_or([None; 4], |r| r.listeners)
    }

    fn listener(&self, i: usize) -> Option<SocketAddr> {
        self.rare.as_ref().and_then(|r| r.listeners[i])
    }

    /// The external proxy ports, per family.
    pub(super) fn external_proxy(&self) -> [Option<SocketAddr>; 2] {
        [self.listener(2), self.listener(3)]
    }

    /// The proxy ports the port's rules send to, per family, and whether
    /// they are the shared ones: a TCP port goes to the shared proxy ports
    /// when there are any (it has none of its own then), as
    /// `rules::from_snapshot` does.
    pub(super) fn proxy(
        &self,
        spec: &ServicePort,
        shared: Option<[Option<SocketAddr>; 2]>,
    ) -> ([Option<SocketAddr>; 2], bool) {
        match shared.filter(|_| spec.protocol == Protocol::Tcp) {
            Some(proxy) => (proxy, true),
            None => ([self.listener(0), self.listener(1)], false),
        }
    }
}

pub(super) fn emptiness(port: &PortState) -> [Emptiness; 2] {
    [IpFamily::V4, IpFamily::V6].map(|f| port.emptiness(f))
}

fn remote(spec: &ServicePort, local: &Locality) -> Box<[bool]> {
    spec.external_ips.iter().chain(&spec.load_balancer_ips).map(|ip| !local.is_local(*ip)).collect()
}
