//! The immutable state the data plane serves from, published through one
//! `ArcSwap`.
//!
//! A snapshot is built off the hot path from a validated configuration
//! (the service ports) and the listeners bound for it. On the hot path a
//! worker only `load()`s it, once per new connection, and never waits.
//!
//! Invariants:
//! - A snapshot never changes after it is published; a new configuration
//!   is a new snapshot swapped in whole (one swap, so listeners, endpoints
//!   and balancers always agree).
//! - A service port whose endpoints did not change keeps its `Balancer`
//!   (the same `Arc`), so a reload does not restart its rotation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::balance::{self, Balancer};
use crate::dataplane::listen::{ListenRole, Listener, ListenerId};
use crate::model::{EndpointAddr, ProxyPort, ServicePort, ServicePortName};

/// One service port as served: its spec and its selection state.
#[derive(Debug)]
pub struct PortState {
    pub spec: ServicePort,
    pub balancer: Arc<Balancer>,
}

/// The whole served state.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one per published snapshot.
    pub generation: u64,
    /// Sorted by service port name.
    pub ports: Vec<Arc<PortState>>,
    pub listeners: Vec<Arc<Listener>>,
    /// Which port each listener serves (index into `ports`).
    routes: HashMap<ListenerId, usize>,
}

impl Snapshot {
    /// Assemble a snapshot; balancers of unchanged endpoint sets are taken
    /// over from `previous`.
    pub fn new(
        generation: u64,
        ports: Vec<ServicePort>,
        listeners: Vec<Arc<Listener>>,
        previous: &Snapshot,
    ) -> Self {
        let old: HashMap<&ServicePortName, &Arc<PortState>> =
            previous.ports.iter().map(|p| (&p.spec.name, p)).collect();
        let ports: Vec<Arc<PortState>> = ports
            .into_iter()
            .map(|spec| {
                let usable = balance::usable(&spec.endpoints);
                let balancer = match old.get(&spec.name) {
                    Some(p) if p.balancer.endpoints() == usable.as_slice() => Arc::clone(&p.balancer),
                    _ => Arc::new(Balancer::new(usable)),
                };
                Arc::new(PortState { spec, balancer })
            })
            .collect();
        let index: HashMap<&ServicePortName, usize> =
            ports.iter().enumerate().map(|(i, p)| (&p.spec.name, i)).collect();
        let routes = listeners.iter().filter_map(|l| index.get(&l.key.port).map(|i| (l.id, *i))).collect();
        Self { generation, ports, listeners, routes }
    }

    /// The service port a listener serves.
    pub fn route(&self, listener: ListenerId) -> Option<&Arc<PortState>> {
        self.routes.get(&listener).and_then(|i| self.ports.get(*i))
    }

    /// The proxy port of a service port, if it is bound.
    pub fn proxy_port(&self, name: &ServicePortName) -> Option<ProxyPort> {
        self.listeners
            .iter()
            .find(|l| &l.key.port == name && l.key.role == ListenRole::Proxy)
            .map(|l| ProxyPort(l.addr.port()))
    }

    /// A serializable view for `/debug/snapshot` and `ringport check`.
    pub fn view(&self) -> SnapshotView {
        SnapshotView {
            generation: self.generation,
            service_ports: self
                .ports
                .iter()
                .map(|p| PortView {
                    name: p.spec.name.to_string(),
                    protocol: p.spec.protocol.to_string(),
                    port: p.spec.port,
                    cluster_ips: p.spec.cluster_ips.iter().map(ToString::to_string).collect(),
                    proxy_port: self.proxy_port(&p.spec.name).map(|p| p.0),
                    listeners: self
                        .listeners
                        .iter()
                        .filter(|l| l.key.port == p.spec.name)
                        .map(|l| ListenerView { role: l.key.role.to_string(), addr: l.addr })
                        .collect(),
                    endpoints: p.spec.endpoints.iter().map(EndpointView::from).collect(),
                    balancing: p.balancer.endpoints().to_vec(),
                })
                .collect(),
        }
    }
}

/// The current snapshot, shared by the control plane (writer) and every
/// worker (readers).
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

#[derive(Debug, Serialize)]
pub struct SnapshotView {
    pub generation: u64,
    pub service_ports: Vec<PortView>,
}

#[derive(Debug, Serialize)]
pub struct PortView {
    pub name: String,
    pub protocol: String,
    pub port: u16,
    pub cluster_ips: Vec<String>,
    pub proxy_port: Option<u16>,
    pub listeners: Vec<ListenerView>,
    pub endpoints: Vec<EndpointView>,
    /// The endpoints traffic goes to, in rotation order.
    pub balancing: Vec<EndpointAddr>,
}

#[derive(Debug, Serialize)]
pub struct ListenerView {
    pub role: String,
    pub addr: SocketAddr,
}

#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub addr: EndpointAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl From<&crate::model::Endpoint> for EndpointView {
    fn from(e: &crate::model::Endpoint) -> Self {
        Self {
            addr: e.addr,
            ready: e.conditions.ready,
            serving: e.conditions.serving,
            terminating: e.conditions.terminating,
        }
    }
}
