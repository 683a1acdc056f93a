//! [`ServiceSettings`] and [`ServiceExtras`]: what a Service sets for all
//! its ports, held once and shared with its joined service ports; the rare
//! settings out of line, one shared empty value for the Services without
//! any.
//!
//! Their fields moved to make the shared value small (100k of them at
//! scale); serialization and `Debug` show them where they were before, so
//! the snapshot's JSON and any printed value read as they did.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use super::Origin;
#[cfg(doc)]
use super::ServicePort;
use super::{
    Affinity, IpFamilies, PortSpecs, ProxyProtocol, Scheduler, Service, ServiceName, SourceIp,
    TrafficDistribution, TrafficPolicy,
};

/// What a Service sets for all its ports, held once: a [`Service`] and
/// each of its joined [`ServicePort`]s share one (there are 100k of each
/// at scale; a copy per port was ~200 bytes and two allocations). Kept
/// within 40 bytes, so that with its reference counts it fills a 56-byte
/// allocation: what most Services leave unset is in [`ServiceExtras`].
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceSettings {
    /// `spec.clusterIPs` (or `spec.clusterIP`); may be empty for a Service
    /// that has none yet, which is then served on node ports and external
    /// addresses only.
    pub cluster_ips: Vec<IpAddr>,
    /// The families it serves (those of its cluster IPs, else
    /// `spec.ipFamilies`), primary first. Endpoints of another family are not used, as
    /// kube-proxy does; empty (no cluster IP, no `ipFamilies`: an edge
    /// Service) takes endpoints of any family.
    pub ip_families: IpFamilies,
    /// Read through `Deref` too: `settings.external_ips`.
    pub extras: Arc<ServiceExtras>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    pub distribution: TrafficDistribution,
    /// `ringport.io/scheduler`; `None` means the process default.
    pub scheduler: Option<Scheduler>,
    /// `ringport.io/source-ip`; `None` means the process default
    /// (`--transparent`).
    pub source_ip: Option<SourceIp>,
    /// The Service's `ringport.io/proxy-protocol` and
    /// `ringport.io/accept-proxy-protocol` (each port takes what its
    /// protocol allows, and a [`ServicePort`] has its own field for that,
    /// which is the one its snapshot shows).
    pub proxy_protocol: ProxyProtocol,
}

impl Default for ServiceSettings {
    /// No addresses, and every policy at its Kubernetes default.
    fn default() -> Self {
        Self {
            cluster_ips: Vec::new(),
            ip_families: IpFamilies::default(),
            extras: ServiceExtras::none(),
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            distribution: TrafficDistribution::Any,
            scheduler: None,
            source_ip: None,
            proxy_protocol: ProxyProtocol::default(),
        }
    }
}

/// The settings that almost every Service leaves empty, out of line: a
/// Service without any shares one empty value, so they cost it a pointer
/// (they were 96 bytes of empty lists in each, and session affinity and the
/// health-check node port another 24 bytes of settings).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceExtras {
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (LoadBalancer only).
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// Annotations under `ringport.io/` (e.g. `ringport.io/scheduler`),
    /// without the prefix, sorted by key.
    pub ringport_annotations: Vec<(String, String)>,
    pub affinity: Affinity,
    /// `spec.healthCheckNodePort` (LoadBalancer with
    /// `externalTrafficPolicy: Local` only): where load balancers ask
    /// whether this node has a local endpoint.
    pub health_check_node_port: Option<u16>,
}

/// The settings serialize as one flat list of fields, in the order they
/// had before affinity and the health-check node port moved into the
/// extras (the snapshot's JSON is read by people and scripts).
impl Serialize for ServiceSettings {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let extras = &*self.extras;
        let mut fields = s.serialize_struct("ServiceSettings", 13)?;
        fields.serialize_field("cluster_ips", &self.cluster_ips)?;
        fields.serialize_field("ip_families", &self.ip_families)?;
        fields.serialize_field("external_ips", &extras.external_ips)?;
        fields.serialize_field("load_balancer_ips", &extras.load_balancer_ips)?;
        fields.serialize_field("load_balancer_source_ranges", &extras.load_balancer_source_ranges)?;
        fields.serialize_field("ringport_annotations", &extras.ringport_annotations)?;
        fields.serialize_field("affinity", &extras.affinity)?;
        fields.serialize_field("external_policy", &self.external_policy)?;
        fields.serialize_field("internal_policy", &self.internal_policy)?;
        fields.serialize_field("distribution", &self.distribution)?;
        fields.serialize_field("scheduler", &self.scheduler)?;
        fields.serialize_field("source_ip", &self.source_ip)?;
        fields.serialize_field("health_check_node_port", &extras.health_check_node_port)?;
        fields.end()
    }
}

impl fmt::Debug for ServiceSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extras = &*self.extras;
        f.debug_struct("ServiceSettings")
            .field("cluster_ips", &self.cluster_ips)
            .field("ip_families", &self.ip_families)
            .field("extras", &ListedExtras(extras))
            .field("affinity", &extras.affinity)
            .field("external_policy", &self.external_policy)
            .field("internal_policy", &self.internal_policy)
            .field("distribution", &self.distribution)
            .field("scheduler", &self.scheduler)
            .field("source_ip", &self.source_ip)
            .field("health_check_node_port", &extras.health_check_node_port)
            .finish()
    }
}

/// The extras as they printed when they were the four lists alone.
struct ListedExtras<'a>(&'a ServiceExtras);

impl fmt::Debug for ListedExtras<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceExtras")
            .field("external_ips", &self.0.external_ips)
            .field("load_balancer_ips", &self.0.load_balancer_ips)
            .field("load_balancer_source_ranges", &self.0.load_balancer_source_ranges)
            .field("ringport_annotations", &self.0.ringport_annotations)
            .finish()
    }
}

/// A Service prints and serializes with its PROXY protocol last, where its
/// own field was, not among its settings.
impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("settings", &self.settings)
            .field("ports", &self.ports)
            .field("proxy_protocol", &self.settings.proxy_protocol)
            .finish()
    }
}

impl Serialize for Service {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Fields<'a> {
            name: &'a ServiceName,
            origin: &'a Origin,
            #[serde(flatten)]
            settings: &'a ServiceSettings,
            ports: &'a PortSpecs,
            proxy_protocol: ProxyProtocol,
        }
        let settings = &*self.settings;
        Fields {
            name: &self.name,
            origin: &self.origin,
            settings,
            ports: &self.ports,
            proxy_protocol: settings.proxy_protocol,
        }
        .serialize(s)
    }
}
