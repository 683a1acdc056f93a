//! Raw Kubernetes objects -> validated `model` types.
//!
//! The raw layer is `k8s-openapi` (`v1/Service`, `v1/Endpoints`,
//! `discovery.k8s.io/v1/EndpointSlice`), so manifest files and the
//! Kubernetes API feed the very same conversions. Three steps:
//!
//! - `load`: files -> documents -> typed k8s objects (dispatch on
//!   `apiVersion`/`kind`);
//! - `service` and `slice`: one object -> one validated model object, or a
//!   [`Skip`] saying why there is nothing to proxy;
//! - `join`: validated Services + slices -> one [`model::ServicePort`] per
//!   service port, with the checks that need more than one object.
//!
//! Invariants: every error names where the object came from ([`Origin`]),
//! which object ([`ObjectRef`]) and which field (a path such as
//! `spec.ports[0].port`), and keeps its source error. Validation never stops
//! at the first error: an object, a file and a directory report all of theirs.
//! Nothing here panics on input.

pub(crate) mod join;
mod load;
mod names;
mod service;
mod slice;

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{self, Origin, Protocol, ServiceName, SliceKind};

pub use join::{Joined, join, join_with_warnings};
pub use load::{
    Documents, MAX_FILE_BYTES, MAX_FLOW_DEPTH, ManifestFiles, Parsed, hash_text, is_manifest_name, load_path,
    manifest_files, parse_changed, parse_str, read_manifest, too_deep,
};
pub use names::{AddressUse, NameRule, check_name, endpoint_address};
pub use service::service_from_k8s;
pub use slice::{TRIGGER_TIME_ANNOTATION, slice_from_endpoints, slice_from_k8s, trigger_time};

/// Everything read from manifest files: validated, not yet joined. Each
/// object is shared (`Arc`): the file loader's per-file state, a whole
/// state or a delta made of it, and the table hold one copy between them.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub services: Vec<Arc<model::Service>>,
    pub slices: Vec<Arc<model::EndpointSlice>>,
    /// Non-fatal findings (skipped objects, ignored values) for the caller to
    /// print; each was also logged with `tracing::warn!`.
    pub warnings: Vec<Warning>,
}

/// The outcome of converting one Kubernetes object that is valid.
#[derive(Clone, Debug, PartialEq)]
pub enum Conversion<T> {
    /// Serve it. `warnings` are non-fatal findings, e.g. an unknown
    /// `trafficDistribution` that was ignored.
    Accepted { value: T, warnings: Vec<Warning> },
    /// A valid object with nothing for a proxy to do.
    Skipped(Skip),
}

/// Why a valid object produces nothing to proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// `spec.clusterIP: None`: DNS returns the pod IPs.
    Headless,
    /// `spec.type: ExternalName`: a DNS CNAME.
    ExternalName,
    /// An EndpointSlice with `addressType: FQDN`.
    FqdnAddressType,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Skip::Headless => "headless Service (clusterIP: None) is DNS only, nothing to proxy",
            Skip::ExternalName => "ExternalName Service is a DNS CNAME, nothing to proxy",
            Skip::FqdnAddressType => "addressType FQDN is not supported, only IPv4 and IPv6",
        })
    }
}

/// The Kubernetes object an error or warning is about: `Service default/web`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: String,
    /// Empty when the object has no `metadata.name`.
    pub name: String,
}

impl ObjectRef {
    /// The namespace defaults to `default`, as `kubectl apply` does.
    pub fn from_meta(kind: impl Into<String>, meta: &ObjectMeta) -> Self {
        Self {
            kind: kind.into(),
            namespace: namespace_of(meta).to_owned(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    fn of(kind: impl fmt::Display, name: &ServiceName) -> Self {
        Self { kind: kind.to_string(), namespace: name.namespace.to_string(), name: name.name.to_string() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A name is shown before it is validated: bound what is repeated.
        let namespace = names::shown(&self.namespace);
        if self.name.is_empty() {
            write!(f, "{} {namespace}/<unnamed>", self.kind)
        } else {
            write!(f, "{} {namespace}/{}", self.kind, names::shown(&self.name))
        }
    }
}

/// One invalid thing: where, which object, which field, and what is wrong.
///
/// Display is self-contained (`origin: object: field: problem`, including
/// the message of any underlying YAML/JSON/IO error), because the CLI prints
/// these one per line; `source()` still returns that underlying error.
#[derive(Debug)]
pub struct ConfigError {
    pub origin: Origin,
    pub object: Option<ObjectRef>,
    /// A path such as `spec.ports[1].port`, relative to the object.
    pub field: Option<String>,
    pub kind: ConfigErrorKind,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_location(f, &self.origin, self.object.as_ref(), self.field.as_deref())?;
        self.kind.fmt(f)
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

fn write_location(
    f: &mut fmt::Formatter<'_>,
    origin: &Origin,
    object: Option<&ObjectRef>,
    field: Option<&str>,
) -> fmt::Result {
    write!(f, "{origin}: ")?;
    if let Some(object) = object {
        write!(f, "{object}: ")?;
    }
    if let Some(field) = field {
        write!(f, "{field}: ")?;
    }
    Ok(())
}

/// What is wrong. Variants wrapping a foreign error print its message too
/// (see [`ConfigError`]).
#[derive(Debug, thiserror::Error)]
pub enum ConfigErrorKind {
    #[error("{0}")]
    UnknownScheduler(#[source] crate::model::UnknownScheduler),
    #[error("{0}")]
    UnknownSourceIp(#[source] crate::model::UnknownSourceIp),
    #[error("{0}")]
    UnknownProxyProtocol(#[source] crate::model::UnknownProxyProtocol),
    #[error("cannot read: {0}")]
    Io(#[source] io::Error),
    #[error("file is {size} bytes; at most {max} are read")]
    TooLarge { size: u64, max: u64 },
    #[error("YAML flow collections ([ or {{) nest deeper than {max} levels; not parsed")]
    TooDeep { max: usize },
    #[error("is a symbolic link to nothing (dangling); its objects are not served")]
    DanglingLink,
    #[error("invalid YAML: {0}")]
    Yaml(#[source] serde_norway::Error),
    #[error("invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The document is YAML but not the shape of its `kind`.
    #[error("{0}")]
    Decode(#[source] serde_norway::Error),
    #[error("not a Kubernetes object: expected a mapping with apiVersion and kind")]
    NotAnObject,
    #[error("must be a list")]
    NotAList,
    #[error("is required")]
    Required,
    #[error("is required when the Service has more than one port")]
    PortNameRequired,
    #[error("at least one port is required")]
    NoPorts,
    #[error("at least one address is required")]
    NoAddresses,
    #[error("the kubernetes.io/service-name label is required: it names the slice's Service")]
    MissingServiceLabel,
    #[error("port is required (a null port means \"all ports\", which ringport cannot serve)")]
    SlicePortRequired,
    #[error("{value} is out of range {min}-{max}")]
    OutOfRange { value: i64, min: i64, max: i64 },
    #[error("SCTP is not supported")]
    SctpUnsupported,
    #[error("unknown protocol {0:?} (expected TCP or UDP)")]
    UnknownProtocol(String),
    #[error("unknown value {value:?} (expected {expected})")]
    UnknownValue { value: String, expected: &'static str },
    #[error("{value:?} is an IPv4-mapped IPv6 address; write the IPv4 address itself")]
    Ipv4MappedIp { value: String },
    #[error("{value:?} is not a valid IP address")]
    InvalidIp {
        value: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("{value:?} is not a valid CIDR")]
    InvalidCidr {
        value: String,
        #[source]
        source: ipnet::AddrParseError,
    },
    #[error("{ip} is not an {address_type} address")]
    WrongFamily { ip: IpAddr, address_type: &'static str },
    #[error("{cluster_ip:?} must equal spec.clusterIPs[0] ({first:?})")]
    ClusterIpMismatch { cluster_ip: String, first: String },
    #[error("{0} addresses given; at most two (one IPv4, one IPv6)")]
    TooManyClusterIps(usize),
    #[error("both addresses are of one family; dual-stack needs one IPv4 and one IPv6")]
    SameFamilyClusterIps,
    #[error("{0} families given; at most two (IPv4 and IPv6)")]
    TooManyIpFamilies(usize),
    #[error("{0} is given twice; dual-stack needs one IPv4 and one IPv6")]
    SameIpFamilies(crate::model::IpFamily),
    #[error("is {family}, but spec.clusterIPs[{index}] ({ip}) is not: they must match in order")]
    IpFamilyMismatch { family: crate::model::IpFamily, index: usize, ip: IpAddr },
    #[error("{0} has no spec.ipFamilies entry of its own: the two lists must match in order")]
    NoIpFamilyFor(IpAddr),
    #[error("SingleStack allows one family, but {count} are given ({field})")]
    SingleStackWithTwo { count: usize, field: &'static str },
    #[error("RequireDualStack needs two families, but only {family} is given ({field})")]
    DualStackRequired { family: crate::model::IpFamily, field: &'static str },
    #[error("is not allowed for type {0} (only NodePort and LoadBalancer)")]
    NodePortNotAllowed(String),
    #[error("is only allowed for type LoadBalancer with externalTrafficPolicy Local")]
    HealthCheckNodePortNotAllowed,
    #[error("{name:?} is not {rule}")]
    InvalidName { name: String, rule: &'static str },
    #[error("{0} cannot be an endpoint (unspecified, multicast or broadcast)")]
    UnusableEndpointAddress(IpAddr),
    #[error("{name:?} is not a valid port name: {reason}")]
    InvalidPortName { name: String, reason: &'static str },
    #[error("duplicate port name {name:?} (also {first})")]
    DuplicatePortName { name: String, first: String },
    #[error("duplicate port {port}/{protocol} (also {first})")]
    DuplicatePort { port: u16, protocol: Protocol, first: String },
    #[error(
        "no EndpointSlice or Endpoints port of this Service is named {port_name:?} \
         (the service port's name) or {target:?} (the targetPort), with protocol {protocol}"
    )]
    TargetPortNameNotFound { target: String, port_name: String, protocol: Protocol },
    #[error(
        "no EndpointSlice or Endpoints port of this Service is named {port_name:?} with \
         protocol {protocol}: endpoints are matched to a service port by the port's name \
         (the EndpointSlice controller names slice ports after service ports), \
         and the numeric targetPort {target} is not used for matching"
    )]
    ServicePortNotFound { port_name: String, target: u16, protocol: Protocol },
    #[error("nodePort {node_port}/{protocol} is already used by {other} ({other_field}, {other_origin})")]
    DuplicateNodePort {
        node_port: u16,
        protocol: Protocol,
        other: ObjectRef,
        other_field: String,
        other_origin: Origin,
    },
    #[error("{endpoint} is ringport's own {role} listener {listen}: proxying to it would loop")]
    EndpointLoop { endpoint: std::net::SocketAddr, role: String, listen: String },
    #[error("{0}")]
    FdBudget(#[source] crate::budget::BudgetError),
    #[error("defined twice (first at {first_origin}); the second is ignored")]
    DuplicateObject { first_origin: Origin },
}

/// A non-empty list of [`ConfigError`]s. Display prints one per line.
#[derive(Debug)]
pub struct ConfigErrors(Vec<ConfigError>);

impl ConfigErrors {
    /// `None` when `errors` is empty: no errors is not a failure.
    pub fn from_vec(errors: Vec<ConfigError>) -> Option<Self> {
        if errors.is_empty() { None } else { Some(Self(errors)) }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false; here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<ConfigError> {
        self.0
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            error.fmt(f)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A non-fatal finding, located like a [`ConfigError`].
#[derive(Clone, Debug, PartialEq)]
pub struct Warning {
    pub origin: Origin,
    pub object: Option<ObjectRef>,
    pub field: Option<String>,
    pub kind: WarningKind,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_location(f, &self.origin, self.object.as_ref(), self.field.as_deref())?;
        self.kind.fmt(f)
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WarningKind {
    #[error("{api_version}/{kind} is not something ringport serves; skipped")]
    UnknownKind { api_version: String, kind: String },
    #[error("skipped: {0}")]
    Skipped(Skip),
    #[error("unknown field, ignored")]
    UnknownField,
    #[error("unknown value {0:?} ignored (expected PreferClose, PreferSameZone or PreferSameNode)")]
    UnknownTrafficDistribution(String),
    #[error("ignored: the Service also has EndpointSlices, which take precedence (as in kube-proxy)")]
    EndpointsShadowed,
    #[error("ignored: its Service {0} is not defined")]
    NoSuchService(ServiceName),
    #[error("no *.yaml, *.yml or *.json files here")]
    EmptyDirectory,
    #[error("{0} is link-local (e.g. the cloud metadata service); is this endpoint meant?")]
    LinkLocalEndpoint(IpAddr),
    #[error(
        "its {family} endpoints are not used: Service {service} serves {served} only \
         (spec.ipFamilies / spec.clusterIPs), as kube-proxy does"
    )]
    EndpointFamilyNotServed { family: crate::model::IpFamily, service: ServiceName, served: String },
    #[error("ignored on the Service's UDP ports: accepting a PROXY header is built for TCP only")]
    AcceptProxyOnUdp,
    #[error("v1 has no datagram form: the Service's UDP ports send v2")]
    ProxyV1OnUdp,
    #[error("is empty: taken as a write in progress, its last good objects keep serving")]
    EmptyFileKept,
    #[error(
        "is gone: taken as a write in progress until the next reload, its last good objects keep serving"
    )]
    VanishedFileKept,
    #[error(
        "is invalid, but was written a moment ago: taken as a write in progress until the next reload, its last good objects keep serving"
    )]
    UnsettledFileKept,
}

/// Collects the errors and warnings of one object while it is validated, so
/// that all of them are reported, not just the first.
pub(crate) struct Diagnostics {
    origin: Origin,
    object: ObjectRef,
    errors: Vec<ConfigError>,
    warnings: Vec<Warning>,
}

impl Diagnostics {
    pub(crate) fn new(origin: Origin, object: ObjectRef) -> Self {
        Self { origin, object, errors: Vec::new(), warnings: Vec::new() }
    }

    pub(crate) fn error(&mut self, field: impl Into<String>, kind: ConfigErrorKind) {
        self.errors.push(ConfigError {
            origin: self.origin.clone(),
            object: Some(self.object.clone()),
            field: Some(field.into()),
            kind,
        });
    }

    pub(crate) fn warn(&mut self, field: impl Into<String>, kind: WarningKind) {
        let warning = Warning {
            origin: self.origin.clone(),
            object: Some(self.object.clone()),
            field: Some(field.into()),
            kind,
        };
        tracing::warn!(%warning, "manifest warning");
        self.warnings.push(warning);
    }

    /// The value on success; on failure records the error against `field`.
    pub(crate) fn check<T>(
        &mut self,
        field: impl FnOnce() -> String,
        result: Result<T, ConfigErrorKind>,
    ) -> Option<T> {
        result.map_err(|kind| self.error(field(), kind)).ok()
    }

    pub(crate) fn origin(&self) -> &Origin {
        &self.origin
    }

    /// `value` with the warnings, unless an error was recorded.
    pub(crate) fn into_result<T>(self, value: T) -> Result<(T, Vec<Warning>), ConfigErrors> {
        match ConfigErrors::from_vec(self.errors) {
            Some(errors) => Err(errors),
            None => Ok((value, self.warnings)),
        }
    }

    pub(crate) fn finish<T>(self, value: T) -> Result<Conversion<T>, ConfigErrors> {
        self.into_result(value).map(|(value, warnings)| Conversion::Accepted { value, warnings })
    }
}

/// `metadata.namespace`, defaulting to `default`.
pub(crate) fn namespace_of(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => "default",
    }
}

/// `metadata.name`, which every object needs, following `rule`; and
/// `metadata.namespace`, when given, a DNS-1123 label.
pub(crate) fn required_name<'a>(
    diag: &mut Diagnostics,
    meta: &'a ObjectMeta,
    rule: NameRule,
) -> Option<&'a str> {
    if let Some(ns) = meta.namespace.as_deref().filter(|ns| !ns.is_empty()) {
        diag.check(|| "metadata.namespace".to_owned(), check_name(ns, NameRule::Dns1123Label));
    }
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => {
            diag.check(|| "metadata.name".to_owned(), check_name(name, rule))?;
            Some(name)
        }
        _ => {
            diag.error("metadata.name", ConfigErrorKind::Required);
            None
        }
    }
}

/// A port number in 1-65535.
pub(crate) fn port_number(value: i32) -> Result<u16, ConfigErrorKind> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(ConfigErrorKind::OutOfRange { value: value.into(), min: 1, max: 65535 }),
    }
}

/// `protocol`, defaulting to TCP.
pub(crate) fn protocol(value: Option<&str>) -> Result<Protocol, ConfigErrorKind> {
    match value {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Err(ConfigErrorKind::SctpUnsupported),
        Some(other) => Err(ConfigErrorKind::UnknownProtocol(other.to_owned())),
    }
}

/// An IP address as the API server accepts it: not an IPv4-mapped IPv6
/// one (`::ffff:10.0.0.1`), which names an IPv4 host in IPv6's clothes and
/// would land in the wrong family's rules and balancers.
pub(crate) fn ip(value: &str) -> Result<IpAddr, ConfigErrorKind> {
    let ip: IpAddr =
        value.parse().map_err(|source| ConfigErrorKind::InvalidIp { value: value.to_owned(), source })?;
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Err(ConfigErrorKind::Ipv4MappedIp { value: value.to_owned() })
        }
        _ => Ok(ip),
    }
}

/// The Kubernetes rule for a port name (IANA_SVC_NAME): at most 15
/// lowercase letters, digits and inner single dashes, with at least one
/// letter, so that it can never be mistaken for a number.
pub(crate) fn port_name(name: &str) -> Result<(), ConfigErrorKind> {
    let reason = if name.len() > 15 {
        Some("longer than 15 characters")
    } else if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        Some("only lowercase letters, digits and '-' are allowed")
    } else if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        Some("it must contain a letter (write a port number without quotes)")
    } else if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        Some("'-' may not start or end it, nor repeat")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ConfigErrorKind::InvalidPortName { name: name.to_owned(), reason }),
        None => Ok(()),
    }
}

/// The object reference of a validated slice, for join's errors.
pub(crate) fn slice_ref(kind: SliceKind, id: &ServiceName) -> ObjectRef {
    ObjectRef::of(kind, id)
}

/// The object reference of a validated Service, for join's errors.
pub fn service_ref(name: &ServiceName) -> ObjectRef {
    ObjectRef::of("Service", name)
}

#[cfg(test)]
mod tests;
