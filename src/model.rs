//! Pure types of the service model: what a Service and its endpoints *are*,
//! once validated. No I/O, no async, no Kubernetes wire types.
//!
//! Every address role has its own type (`ServiceVip`, `EndpointAddr`,
//! `ClientAddr`, `ProxyPort`) so that a function signature says which address
//! it wants, and passing the wrong one does not compile.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

mod addresses;
mod families;
mod name;
mod origin;
mod settings;
mod slice_endpoint;
mod specs;
#[cfg(test)]
mod tests;

use addresses::serialize_hints;
pub use addresses::{Addresses, Hints};
pub use families::IpFamilies;
pub use name::Name;
pub use origin::Origin;
pub use settings::{ServiceExtras, ServiceSettings};
pub use slice_endpoint::SliceEndpoint;
pub use specs::PortSpecs;

/// `namespace/name` of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
pub struct ServiceName {
    pub namespace: Name,
    pub name: Name,
}

impl ServiceName {
    /// The namespace is interned: few namespaces hold many Services.
    pub fn new(namespace: impl AsRef<str>, name: impl Into<Name>) -> Self {
        Self { namespace: Name::interned(namespace.as_ref()), name: name.into() }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No Service has an empty namespace: ringport's own names (the
        // shared proxy port's) print without one.
        if self.namespace.is_empty() {
            return f.write_str(&self.name);
        }
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of a Service: `namespace/name:port-name` (the port name may be
/// empty for a single-port Service, as in Kubernetes). Each service port is
/// balanced on its own.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
pub struct ServicePortName {
    pub service: ServiceName,
    pub port: Name,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// A virtual address a Service answers on and that no interface carries
/// (cluster IP, non-local external or load-balancer IP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceVip(pub IpAddr);

/// Where a backend pod (or external endpoint) listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct EndpointAddr(pub SocketAddr);

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The peer address of an accepted client connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// A local port ringport listens on for one service port's cluster-IP
/// traffic (the target of the REDIRECT rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ProxyPort(pub u16);

/// `sessionAffinity`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Affinity {
    #[default]
    None,
    /// Pin a client IP to one endpoint for `timeout`, sliding on each use.
    ClientIp { timeout: Duration },
}

impl Affinity {
    /// Kubernetes' default `timeoutSeconds` (3 hours).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10_800);
    /// Kubernetes' maximum `timeoutSeconds` (1 day).
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
}

/// How a service port picks the endpoint of a new connection
/// (`ringport.io/scheduler` annotation, `--scheduler` by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Round robin over a shuffled order, fair across all workers.
    #[default]
    Rr,
    /// Uniformly random.
    Random,
    /// Least active connections, counted over all workers.
    Lc,
    /// Power of two random choices on active connections.
    P2c,
    /// Source-IP hash.
    Sh,
    /// Maglev consistent hashing on the client IP.
    Maglev,
}

impl Scheduler {
    pub const ALL: [Scheduler; 6] =
        [Scheduler::Rr, Scheduler::Random, Scheduler::Lc, Scheduler::P2c, Scheduler::Sh, Scheduler::Maglev];

    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Random => "random",
            Scheduler::Lc => "lc",
            Scheduler::P2c => "p2c",
            Scheduler::Sh => "sh",
            Scheduler::Maglev => "maglev",
        }
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown scheduler name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduler {0:?} (expected rr, random, lc, p2c, sh or maglev)")]
pub struct UnknownScheduler(pub String);

impl std::str::FromStr for Scheduler {
    type Err = UnknownScheduler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scheduler::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| UnknownScheduler(s.to_owned()))
    }
}

/// An address family: an entry of `spec.ipFamilies`, or what a ClusterIP
/// or an EndpointSlice's `addressType` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        if ip.to_canonical().is_ipv6() { IpFamily::V6 } else { IpFamily::V4 }
    }

    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

/// `ringport.io/source-ip`: whose address an endpoint sees as the
/// connection's source (docs/source-ip.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceIp {
    /// The client's own address (transparent mode, `IP_TRANSPARENT`), where
    /// the replies are sure to come back through this node.
    Preserve,
    /// The node's address (plain proxying).
    Proxy,
}

/// An unknown `ringport.io/source-ip` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown source-ip mode {0:?} (expected preserve or proxy)")]
pub struct UnknownSourceIp(pub String);

impl std::str::FromStr for SourceIp {
    type Err = UnknownSourceIp;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "preserve" => Ok(SourceIp::Preserve),
            "proxy" => Ok(SourceIp::Proxy),
            _ => Err(UnknownSourceIp(s.to_owned())),
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub use crate::proxy_protocol::Version as ProxyVersion;

/// Which PROXY protocol versions a service port accepts from a load
/// balancer in front of ringport (`ringport.io/accept-proxy-protocol`):
/// the codec's own type, so that what is configured is what is decoded.
pub use crate::proxy_protocol::Accept as AcceptProxy;

/// The PROXY protocol of a Service's ports: the header sent to endpoints
/// (`ringport.io/proxy-protocol`) and the one required from clients
/// (`ringport.io/accept-proxy-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ProxyProtocol {
    pub send: Option<ProxyVersion>,
    pub accept: Option<AcceptProxy>,
}

/// An unknown `ringport.io/proxy-protocol` or `ringport.io/accept-proxy-protocol` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown PROXY protocol version {value:?} (expected {expected})")]
pub struct UnknownProxyProtocol {
    pub value: String,
    pub expected: &'static str,
}

impl ProxyProtocol {
    /// `ringport.io/proxy-protocol`: `v1` or `v2`.
    pub fn parse_send(value: &str) -> Result<ProxyVersion, UnknownProxyProtocol> {
        match value {
            "v1" => Ok(ProxyVersion::V1),
            "v2" => Ok(ProxyVersion::V2),
            _ => Err(UnknownProxyProtocol { value: value.to_owned(), expected: "v1 or v2" }),
        }
    }

    /// What a port of `protocol` does with these annotations: a UDP port
    /// accepts no header (not built) and sends v2 whichever version is
    /// asked (v1 has no datagram form).
    pub fn for_protocol(self, protocol: Protocol) -> Self {
        match protocol {
            Protocol::Tcp => self,
            Protocol::Udp => Self { send: self.send.map(|_| ProxyVersion::V2), accept: None },
        }
    }

    /// `ringport.io/accept-proxy-protocol`: `v1`, `v2` or `any`.
    pub fn parse_accept(value: &str) -> Result<AcceptProxy, UnknownProxyProtocol> {
        match value {
            "v1" => Ok(AcceptProxy::V1),
            "v2" => Ok(AcceptProxy::V2),
            "any" => Ok(AcceptProxy::Any),
            _ => Err(UnknownProxyProtocol { value: value.to_owned(), expected: "v1, v2 or any" }),
        }
    }
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// `trafficDistribution`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum TrafficDistribution {
    #[default]
    Any,
    PreferSameZone,
    PreferSameNode,
}

/// EndpointSlice `conditions`. Absent conditions read as `true`, except
/// `terminating`, which reads as `false` (the Kubernetes API contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Default for Conditions {
    fn default() -> Self {
        Self { ready: true, serving: true, terminating: false }
    }
}

/// One validated port of a validated [`Service`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ServicePortSpec {
    /// `ports[].name`; empty for an unnamed single port.
    pub name: Name,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

/// `ports[].targetPort`: a number, or the name of a port the endpoints carry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(Name),
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetPort::Number(n) => write!(f, "{n}"),
            TargetPort::Name(s) => f.write_str(s),
        }
    }
}

/// A validated `v1/Service` that the proxy serves (never headless, never
/// ExternalName: those are dropped during validation). What it sets for
/// all its ports is in [`ServiceSettings`], shared with its joined service
/// ports (and read through `Deref`: `service.cluster_ips`).
/// (Its PROXY protocol annotations are among them: `service.proxy_protocol`.)
#[derive(Clone, PartialEq, Eq)]
pub struct Service {
    pub name: ServiceName,
    pub origin: Origin,
    pub settings: Arc<ServiceSettings>,
    /// Shared with every Service that has the same list.
    pub ports: PortSpecs,
}

/// Shared settings serialize as the fields of their holder (serde's `rc`
/// feature is off).
fn serialize_shared<T: Serialize + ?Sized, S: serde::Serializer>(
    shared: &Arc<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    shared.serialize(s)
}

/// `none()`, one shared empty value of a type most holders leave empty,
/// and `shared()`, a value behind an `Arc`: that one if it is empty.
macro_rules! shared_if_empty {
    ($ty:ty) => {
        impl $ty {
            /// The shared empty value.
            pub fn none() -> Arc<Self> {
                static NONE: std::sync::LazyLock<Arc<$ty>> = std::sync::LazyLock::new(Arc::default);
                Arc::clone(&NONE)
            }

            /// This, shared if empty.
            pub fn shared(self) -> Arc<Self> {
                if self == Self::default() { Self::none() } else { Arc::new(self) }
            }
        }
    };
}

/// Reading a setting through the Service or service port that holds it;
/// writing one copies the settings first if they are shared
/// (`Arc::make_mut`), so a write never reaches another holder.
macro_rules! settings_deref {
    ($holder:ty, $field:ident, $target:ty) => {
        impl std::ops::Deref for $holder {
            type Target = $target;

            fn deref(&self) -> &$target {
                &self.$field
            }
        }

        impl std::ops::DerefMut for $holder {
            fn deref_mut(&mut self) -> &mut $target {
                Arc::make_mut(&mut self.$field)
            }
        }
    };
}

settings_deref!(Service, settings, ServiceSettings);
settings_deref!(ServicePort, settings, ServiceSettings);
settings_deref!(ServiceSettings, extras, ServiceExtras);
shared_if_empty!(ServiceExtras);

/// A port an [`EndpointSlice`] carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct SlicePort {
    /// Matches the Service port of the same name.
    pub name: Name,
    pub port: u16,
    pub protocol: Protocol,
}

impl SlicePort {
    /// The one shared copy of a slice's port list: slices of many Services
    /// carry the same list (one `http` port on 8080), so each held its own
    /// copy of the same 24 bytes. Interned like names (the interner keeps
    /// only what is held elsewhere, plus as much garbage again).
    pub fn shared(ports: &[SlicePort]) -> Arc<[SlicePort]> {
        static LISTS: std::sync::LazyLock<std::sync::Mutex<name::Interner<[SlicePort]>>> =
            std::sync::LazyLock::new(|| std::sync::Mutex::new(name::Interner::new()));
        LISTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(ports)
    }
}

/// Where an endpoint runs and where it is hinted to serve, behind one
/// pointer: a slice endpoint and every [`Endpoint`] joined from it (one
/// per address and port) share it, and an endpoint with none of them
/// shares one empty value (they were 40 bytes in each).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub node_name: Option<Name>,
    pub zone: Option<Name>,
    #[serde(serialize_with = "serialize_hints")]
    pub hints: Option<Arc<Hints>>,
}

shared_if_empty!(Placement);

settings_deref!(Endpoint, place, Placement);

/// Which Kubernetes object an [`EndpointSlice`] was built from. kube-proxy
/// ignores a Service's `v1/Endpoints` once it has EndpointSlices, and an
/// Endpoints object may share its `namespace/name` with an EndpointSlice, so
/// the join needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum SliceKind {
    /// `discovery.k8s.io/v1/EndpointSlice`.
    EndpointSlice,
    /// One subset of a `v1/Endpoints`, converted into the slice shape (each
    /// subset has its own ports, so each becomes its own slice).
    Endpoints { subset: u32 },
}

impl fmt::Display for SliceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SliceKind::EndpointSlice => "EndpointSlice",
            SliceKind::Endpoints { .. } => "Endpoints",
        })
    }
}

/// A validated `discovery.k8s.io/v1/EndpointSlice`, or a `v1/Endpoints`
/// converted into the same shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    /// `namespace/name` of the slice object itself (unique per source and
    /// [`SliceKind`]).
    pub id: ServiceName,
    /// The object this slice was built from.
    pub kind: SliceKind,
    /// The Service it belongs to (`kubernetes.io/service-name` label, or the
    /// Endpoints object's own name).
    pub service: ServiceName,
    pub origin: Origin,
    /// Both lists at their exact length (there are 100k slices at scale);
    /// the ports shared with every slice that has the same
    /// ([`SlicePort::shared`]).
    #[serde(serialize_with = "serialize_shared")]
    pub ports: Arc<[SlicePort]>,
    pub endpoints: Box<[SliceEndpoint]>,
    /// Its `endpoints.kubernetes.io/last-change-trigger-time`, when it
    /// carries a readable one: when the change that made it happened, for
    /// the network programming latency.
    #[serde(skip)]
    pub trigger: Option<std::time::SystemTime>,
}

/// One endpoint of one service port, after Service and slices are joined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addr: EndpointAddr,
    pub conditions: Conditions,
    /// Read through `Deref`: `endpoint.node_name`.
    #[serde(flatten, serialize_with = "serialize_shared")]
    pub place: Arc<Placement>,
}

impl Endpoint {
    /// A ready endpoint with no node, zone or hints.
    pub fn ready(addr: EndpointAddr) -> Self {
        Self { addr, conditions: Conditions::default(), place: Placement::none() }
    }

    /// `hints.forZones`; empty when it has none.
    pub fn hints_zones(&self) -> &[Name] {
        self.hints.as_deref().map_or(&[], |h| &h.zones)
    }

    /// `hints.forNodes`; empty when it has none.
    pub fn hints_nodes(&self) -> &[Name] {
        self.hints.as_deref().map_or(&[], |h| &h.nodes)
    }

    /// Whether it could serve (kube-proxy's `hasEndpoints` counts it):
    /// ready, or serving while terminating.
    pub fn usable(&self) -> bool {
        self.conditions.ready || self.conditions.serving
    }
}

/// One service port with everything the data plane needs: the unit that
/// gets listeners, a balancer and (later) redirect rules. Its Service's
/// settings (addresses, policies, annotations; [`ServiceSettings`]) are the
/// Service's own, shared, read through `Deref`: `port.cluster_ips`.
/// `ip_families` there: node ports listen on node addresses of these
/// families only; empty, every family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub origin: Origin,
    pub protocol: Protocol,
    pub port: u16,
    /// Never 0 (validated), so `None` takes no room of its own: the port
    /// fits 112 bytes, where 120 (with the `Arc` header: 136) fell in the
    /// allocator's 160-byte class.
    pub node_port: Option<std::num::NonZeroU16>,
    /// The Service's, as this port's protocol takes it
    /// ([`ProxyProtocol::for_protocol`]).
    pub proxy_protocol: ProxyProtocol,
    #[serde(flatten, serialize_with = "serialize_shared")]
    pub settings: Arc<ServiceSettings>,
    /// Sorted by address, deduplicated.
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// A service port with no addresses, no endpoints and every policy at
    /// its Kubernetes default; callers fill in what they need.
    pub fn new(name: ServicePortName, origin: Origin, protocol: Protocol, port: u16) -> Self {
        Self {
            name,
            origin,
            protocol,
            port,
            node_port: None,
            proxy_protocol: ProxyProtocol::default(),
            settings: Arc::default(),
            endpoints: Vec::new(),
        }
    }
}
