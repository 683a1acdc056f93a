//! What `/debug/snapshot` and `ringport check` show of a snapshot: a
//! serializable view of every service port, its listeners, endpoints and
//! balancers. Built on request, off the hot path.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use super::{Balancers, Snapshot};
use crate::balance::{Balancer, BalancerView};
use crate::model::{EndpointAddr, Protocol, ProxyProtocol, ServicePort};
use crate::source_ip::Source;

impl Snapshot {
    /// A serializable view for `/debug/snapshot` and `ringport check`.
    pub fn view(&self) -> SnapshotView {
        let now = std::time::Instant::now();
        // A TCP port in shared mode has no proxy port of its own: it shows
        // its family's shared one (IPv6 for an IPv6-only port).
        let [v4, v6] = self.shared_proxies();
        let shared = |sp: &ServicePort| {
            let v6_only = !sp.cluster_ips.is_empty() && sp.cluster_ips.iter().all(IpAddr::is_ipv6);
            let ordered = if v6_only { v6.or(v4) } else { v4.or(v6) };
            ordered.map(|a| a.port()).filter(|_| sp.protocol == Protocol::Tcp)
        };
        SnapshotView {
            generation: self.generation,
            shared_proxy_ports: self.shared_proxies().into_iter().flatten().collect(),
            service_ports: self
                .ports
                .iter()
                .map(|p| PortView {
                    name: p.spec.name.to_string(),
                    protocol: p.spec.protocol.to_string(),
                    port: p.spec.port,
                    cluster_ips: p.spec.cluster_ips.iter().map(ToString::to_string).collect(),
                    external_ips: p.spec.external_ips.iter().map(ToString::to_string).collect(),
                    load_balancer_ips: p.spec.load_balancer_ips.iter().map(ToString::to_string).collect(),
                    proxy_port: self.proxy_port(&p.spec.name).map(|p| p.0).or_else(|| shared(&p.spec)),
                    health_check_node_port: p.spec.health_check_node_port,
                    proxy_protocol: p.spec.proxy_protocol,
                    listeners: self
                        .listeners
                        .iter()
                        .filter(|l| l.key.port == p.spec.name)
                        .map(|l| ListenerView { role: l.key.role.to_string(), addr: l.addr })
                        .collect(),
                    endpoints: p
                        .spec
                        .endpoints
                        .iter()
                        .map(|e| EndpointView { source: p.source.of(e.addr), ..EndpointView::from(e) })
                        .collect(),
                    balancers: match &p.balancers {
                        Balancers::One([internal, external]) => {
                            BalancersView::One { internal: internal.view(now), external: external.view(now) }
                        }
                        Balancers::PerFamily(families) => {
                            let [v4, v6] = &**families;
                            let view = |[internal, external]: &[Arc<Balancer>; 2]| FamilyView {
                                internal: internal.view(now),
                                external: external.view(now),
                            };
                            BalancersView::PerFamily { ipv4: view(v4), ipv6: view(v6) }
                        }
                    },
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SnapshotView {
    pub generation: u64,
    /// `--proxy-port-mode shared`: the proxy ports every TCP service port
    /// shares (one per family, each with a socket per worker).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shared_proxy_ports: Vec<SocketAddr>,
    pub service_ports: Vec<PortView>,
}

#[derive(Debug, Serialize)]
pub struct PortView {
    pub name: String,
    pub protocol: String,
    pub port: u16,
    pub cluster_ips: Vec<String>,
    pub external_ips: Vec<String>,
    pub load_balancer_ips: Vec<String>,
    pub proxy_port: Option<u16>,
    /// Served by `service_health` (its Service's, on every port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// The PROXY header sent to endpoints and the one required of clients.
    pub proxy_protocol: ProxyProtocol,
    pub listeners: Vec<ListenerView>,
    pub endpoints: Vec<EndpointView>,
    #[serde(flatten)]
    pub balancers: BalancersView,
}

/// A single-family port's two balancers (`internal`, `external`), or a
/// dual-stack port's per family (`ipv4`, `ipv6`, each with both): only the
/// balancers traffic uses.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum BalancersView {
    One {
        /// Where cluster-IP traffic goes: rotation order, with health.
        internal: BalancerView,
        /// Where node-port / external / load-balancer traffic goes.
        external: BalancerView,
    },
    PerFamily {
        ipv4: FamilyView,
        ipv6: FamilyView,
    },
}

#[derive(Debug, Serialize)]
pub struct FamilyView {
    pub internal: BalancerView,
    pub external: BalancerView,
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
    /// Whose address it sees: `{"source": "client"}`, or `"proxy"` with the
    /// reason of a fallback (`null`: its Service did not ask).
    #[serde(flatten)]
    pub source: Source,
}

impl From<&crate::model::Endpoint> for EndpointView {
    fn from(e: &crate::model::Endpoint) -> Self {
        Self {
            addr: e.addr,
            ready: e.conditions.ready,
            serving: e.conditions.serving,
            terminating: e.conditions.terminating,
            source: Source::Proxy(None),
        }
    }
}
