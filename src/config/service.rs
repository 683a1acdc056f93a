//! `v1/Service` -> `model::Service`.
//!
//! Follows the API server's validation and defaulting for the fields
//! ringport uses, so that they mean here what they mean in a cluster (the
//! node-port range and fields ringport ignores are not checked). An empty
//! string counts as absent, as it does for the API server (Go's zero value).
//! Headless and ExternalName Services are valid but skipped: they are DNS
//! only. All errors of a Service are reported, not just the first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    ConfigErrorKind, ConfigErrors, Conversion, Diagnostics, NameRule, ObjectRef, Skip, WarningKind,
    check_name, ip, namespace_of, port_name, port_number, protocol, required_name,
};
use crate::model::{
    self, Affinity, IpFamilies, IpFamily, Name, Origin, Protocol, ProxyProtocol, Scheduler, ServiceName,
    ServicePortSpec, SourceIp, TargetPort, TrafficDistribution, TrafficPolicy,
};

/// Annotations under this prefix tune ringport per Service.
const ANNOTATION_PREFIX: &str = "ringport.io/";
/// `ringport.io/scheduler`: the service's endpoint scheduler.
const SCHEDULER_ANNOTATION: &str = "scheduler";
/// `ringport.io/source-ip`: `preserve` (the client's address reaches the
/// endpoint) or `proxy` (the node's).
const SOURCE_IP_ANNOTATION: &str = "source-ip";
/// `ringport.io/proxy-protocol`: the PROXY header sent to endpoints.
const PROXY_PROTOCOL_ANNOTATION: &str = "proxy-protocol";
/// `ringport.io/accept-proxy-protocol`: the PROXY header required of clients.
const ACCEPT_PROXY_PROTOCOL_ANNOTATION: &str = "accept-proxy-protocol";

/// Validates one Service. `Ok(Conversion::Skipped(_))` for a headless or
/// ExternalName Service; `Err` lists every problem found.
pub fn service_from_k8s(svc: &Service, origin: Origin) -> Result<Conversion<model::Service>, ConfigErrors> {
    let mut diag = Diagnostics::new(origin, ObjectRef::from_meta("Service", &svc.metadata));
    let name = required_name(&mut diag, &svc.metadata, NameRule::Dns1035Label);
    let default_spec = ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);

    let service_type = service_type(&mut diag, spec);
    let skip = match service_type {
        Some(ServiceType::ExternalName) => Some(Skip::ExternalName),
        _ if is_headless(spec) => Some(Skip::Headless),
        _ => None,
    };
    if let Some(skip) = skip {
        return diag.into_result(()).map(|_| Conversion::Skipped(skip));
    }

    let cluster_ips = cluster_ips(&mut diag, spec);
    let ip_families = ip_families(&mut diag, spec, &cluster_ips);
    let ports = ports(&mut diag, spec, service_type);
    let external_ips = ip_list(&mut diag, "spec.externalIPs", spec.external_ips.as_deref());
    let load_balancer_ips = match service_type {
        Some(ServiceType::LoadBalancer) => load_balancer_ips(&mut diag, svc),
        _ => Vec::new(),
    };
    let load_balancer_source_ranges = source_ranges(&mut diag, spec);
    let affinity = affinity(&mut diag, spec);
    let external_policy = policy(&mut diag, "spec.externalTrafficPolicy", &spec.external_traffic_policy);
    let internal_policy = policy(&mut diag, "spec.internalTrafficPolicy", &spec.internal_traffic_policy);
    let distribution = distribution(&mut diag, spec);
    let health_check_node_port = health_check_node_port(&mut diag, spec, service_type, external_policy);
    let ringport_annotations = ringport_annotations(svc);
    let scheduler = annotation(&mut diag, &ringport_annotations, SCHEDULER_ANNOTATION, |v| {
        v.parse::<Scheduler>().map_err(ConfigErrorKind::UnknownScheduler)
    });
    let source_ip = annotation(&mut diag, &ringport_annotations, SOURCE_IP_ANNOTATION, |v| {
        v.parse::<SourceIp>().map_err(ConfigErrorKind::UnknownSourceIp)
    });
    let proxy_protocol = ProxyProtocol {
        send: annotation(&mut diag, &ringport_annotations, PROXY_PROTOCOL_ANNOTATION, |v| {
            ProxyProtocol::parse_send(v).map_err(ConfigErrorKind::UnknownProxyProtocol)
        }),
        accept: annotation(&mut diag, &ringport_annotations, ACCEPT_PROXY_PROTOCOL_ANNOTATION, |v| {
            ProxyProtocol::parse_accept(v).map_err(ConfigErrorKind::UnknownProxyProtocol)
        }),
    };

    udp_proxy_protocol(&mut diag, &ports, proxy_protocol);

    // Each `None` above comes with a recorded error, so `finish` returns
    // `Err` whenever one of these placeholders was needed.
    let service = model::Service {
        name: ServiceName::new(namespace_of(&svc.metadata), name.unwrap_or_default()),
        origin: diag.origin().clone(),
        settings: Arc::new(model::ServiceSettings {
            cluster_ips,
            ip_families,
            extras: model::ServiceExtras {
                external_ips,
                load_balancer_ips,
                load_balancer_source_ranges,
                ringport_annotations,
                affinity: affinity.unwrap_or(Affinity::None),
                health_check_node_port,
            }
            .shared(),
            external_policy: external_policy.unwrap_or_default(),
            internal_policy: internal_policy.unwrap_or_default(),
            distribution,
            scheduler,
            source_ip,
            proxy_protocol,
        }),
        ports: ports.into(),
    };
    diag.finish(service)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

impl ServiceType {
    fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        }
    }
}

/// An empty string is the same as absent (the API's zero value).
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

fn service_type(diag: &mut Diagnostics, spec: &ServiceSpec) -> Option<ServiceType> {
    let parsed = match given(&spec.type_) {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            diag.error(
                "spec.type",
                ConfigErrorKind::UnknownValue {
                    value: other.to_owned(),
                    expected: "ClusterIP, NodePort, LoadBalancer or ExternalName",
                },
            );
            return None;
        }
    };
    Some(parsed)
}

fn is_headless(spec: &ServiceSpec) -> bool {
    let first = spec.cluster_ips.as_ref().and_then(|ips| ips.first());
    given(&spec.cluster_ip) == Some("None") || first.map(String::as_str) == Some("None")
}

/// `spec.clusterIPs` wins; `spec.clusterIP`, when also given, must be its
/// first entry (the API keeps the two in step).
fn cluster_ips(diag: &mut Diagnostics, spec: &ServiceSpec) -> Vec<IpAddr> {
    let single = given(&spec.cluster_ip);
    let Some(list) = spec.cluster_ips.as_deref().filter(|list| !list.is_empty()) else {
        let parsed = single.and_then(|s| diag.check(|| "spec.clusterIP".to_owned(), ip(s)));
        return parsed.into_iter().collect();
    };
    if let Some(single) = single
        && single != list[0]
    {
        diag.error(
            "spec.clusterIP",
            ConfigErrorKind::ClusterIpMismatch { cluster_ip: single.to_owned(), first: list[0].clone() },
        );
    }
    if list.len() > 2 {
        diag.error("spec.clusterIPs", ConfigErrorKind::TooManyClusterIps(list.len()));
    }
    let ips = ip_list(diag, "spec.clusterIPs", Some(list));
    if let [a, b] = ips[..]
        && a.is_ipv4() == b.is_ipv4()
    {
        diag.error("spec.clusterIPs", ConfigErrorKind::SameFamilyClusterIps);
    }
    ips
}

/// `spec.ipFamilies` checked against `spec.ipFamilyPolicy` and the cluster
/// IPs, as the API server does: at most two, not twice the same, in the
/// order of `clusterIPs`; SingleStack with one, RequireDualStack with two.
/// The families served are the cluster IPs' when there are any (a
/// PreferDualStack Service given one IPv4 cluster IP serves IPv4 alone,
/// whatever `ipFamilies` hoped for), else `ipFamilies`.
fn ip_families(diag: &mut Diagnostics, spec: &ServiceSpec, cluster_ips: &[IpAddr]) -> IpFamilies {
    let raw = spec.ip_families.as_deref().unwrap_or_default();
    let mut families = Vec::with_capacity(raw.len());
    for (i, value) in raw.iter().enumerate() {
        let family = match value.as_str() {
            "IPv4" => IpFamily::V4,
            "IPv6" => IpFamily::V6,
            other => {
                let kind =
                    ConfigErrorKind::UnknownValue { value: other.to_owned(), expected: "IPv4 or IPv6" };
                diag.error(format!("spec.ipFamilies[{i}]"), kind);
                continue;
            }
        };
        if families.contains(&family) {
            diag.error(format!("spec.ipFamilies[{i}]"), ConfigErrorKind::SameIpFamilies(family));
            continue;
        }
        if let Some(ip) = cluster_ips.get(i).copied()
            && IpFamily::of(ip) != family
        {
            let kind = ConfigErrorKind::IpFamilyMismatch { family, index: i, ip };
            diag.error(format!("spec.ipFamilies[{i}]"), kind);
        }
        families.push(family);
    }
    if raw.len() > 2 {
        diag.error("spec.ipFamilies", ConfigErrorKind::TooManyIpFamilies(raw.len()));
    }
    if !raw.is_empty() {
        for (i, ip) in cluster_ips.iter().enumerate().skip(raw.len()) {
            diag.error(format!("spec.clusterIPs[{i}]"), ConfigErrorKind::NoIpFamilyFor(*ip));
        }
    }
    // The families the policy is checked against: ipFamilies, else the
    // addresses'.
    let of_ips: Vec<IpFamily> = cluster_ips.iter().map(|ip| IpFamily::of(*ip)).collect();
    let (declared, from) =
        if raw.is_empty() { (of_ips.clone(), "spec.clusterIPs") } else { (families, "spec.ipFamilies") };
    let (count, field) = (declared.len(), from);
    match given(&spec.ip_family_policy) {
        None | Some("PreferDualStack") => {}
        Some("SingleStack") if count > 1 => {
            diag.error("spec.ipFamilyPolicy", ConfigErrorKind::SingleStackWithTwo { count, field });
        }
        Some("SingleStack") => {}
        Some("RequireDualStack") => {
            // No cluster IP and no ipFamilies (an edge Service): nothing
            // says which families it has, so nothing contradicts.
            if let [family] = declared[..] {
                diag.error("spec.ipFamilyPolicy", ConfigErrorKind::DualStackRequired { family, field: from });
            }
        }
        Some(other) => {
            let kind = ConfigErrorKind::UnknownValue {
                value: other.to_owned(),
                expected: "SingleStack, PreferDualStack or RequireDualStack",
            };
            diag.error("spec.ipFamilyPolicy", kind);
        }
    }
    // The families served: the cluster IPs' (one listener each), else
    // ipFamilies (a Service without cluster IPs that names them).
    // Each family once: a list that repeats one (two cluster IPs of one
    // family, a repeated `ipFamilies` entry) was an error above.
    if of_ips.is_empty() { declared.into_iter().collect() } else { of_ips.into_iter().collect() }
}

/// Parses a list of IPs, naming each bad entry `field[i]`.
fn ip_list(diag: &mut Diagnostics, field: &str, values: Option<&[String]>) -> Vec<IpAddr> {
    let values = values.unwrap_or_default();
    values
        .iter()
        .enumerate()
        .filter_map(|(i, value)| diag.check(|| format!("{field}[{i}]"), ip(value)))
        .collect()
}

/// `status.loadBalancer.ingress[].ip`; entries with only a hostname carry
/// nothing ringport can listen for.
fn load_balancer_ips(diag: &mut Diagnostics, svc: &Service) -> Vec<IpAddr> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    ingress
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            let value = given(&entry.ip)?;
            diag.check(|| format!("status.loadBalancer.ingress[{i}].ip"), ip(value))
        })
        .collect()
}

fn source_ranges(diag: &mut Diagnostics, spec: &ServiceSpec) -> Vec<IpNet> {
    let ranges = spec.load_balancer_source_ranges.as_deref().unwrap_or_default();
    ranges
        .iter()
        .enumerate()
        .filter_map(|(i, value)| {
            // The API server trims spaces here, so people write them.
            let parsed = value.trim().parse::<IpNet>().map(|net| net.trunc());
            let parsed =
                parsed.map_err(|source| ConfigErrorKind::InvalidCidr { value: value.clone(), source });
            diag.check(|| format!("spec.loadBalancerSourceRanges[{i}]"), parsed)
        })
        .collect()
}

fn ports(
    diag: &mut Diagnostics,
    spec: &ServiceSpec,
    service_type: Option<ServiceType>,
) -> Vec<ServicePortSpec> {
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        diag.error("spec.ports", ConfigErrorKind::NoPorts);
        return Vec::new();
    }
    let mut names: HashMap<Name, usize> = HashMap::new();
    let mut numbers: HashMap<(u16, Protocol), usize> = HashMap::new();
    let mut out = Vec::with_capacity(ports.len());
    for (i, raw) in ports.iter().enumerate() {
        let Some(port) = service_port(diag, i, raw, ports.len() > 1, service_type) else {
            continue;
        };
        if !port.name.is_empty()
            && let Some(first) = names.insert(port.name.clone(), i)
        {
            let kind = ConfigErrorKind::DuplicatePortName {
                name: port.name.to_string(),
                first: format!("spec.ports[{first}].name"),
            };
            diag.error(format!("spec.ports[{i}].name"), kind);
        }
        if let Some(first) = numbers.insert((port.port, port.protocol), i) {
            let kind = ConfigErrorKind::DuplicatePort {
                port: port.port,
                protocol: port.protocol,
                first: format!("spec.ports[{first}].port"),
            };
            diag.error(format!("spec.ports[{i}].port"), kind);
        }
        out.push(port);
    }
    out
}

/// One `spec.ports[i]`; `None` when any of its fields is invalid (each such
/// field has an error recorded).
fn service_port(
    diag: &mut Diagnostics,
    i: usize,
    raw: &ServicePort,
    several: bool,
    service_type: Option<ServiceType>,
) -> Option<ServicePortSpec> {
    let at = |field: &str| format!("spec.ports[{i}].{field}");
    let name = Name::interned(given(&raw.name).unwrap_or_default());
    if name.is_empty() && several {
        diag.error(at("name"), ConfigErrorKind::PortNameRequired);
    }
    // The API server's rule for a service port's name (a named targetPort
    // follows IANA_SVC_NAME instead).
    if !name.is_empty() {
        diag.check(|| at("name"), check_name(&name, NameRule::Dns1123Label))?;
    }
    let port = diag.check(|| at("port"), port_number(raw.port));
    let protocol = diag.check(|| at("protocol"), protocol(given(&raw.protocol)));
    let target_port = match &raw.target_port {
        None => port.map(TargetPort::Number),
        Some(IntOrString::Int(n)) => diag.check(|| at("targetPort"), port_number(*n)).map(TargetPort::Number),
        Some(IntOrString::String(s)) if s.is_empty() => {
            diag.error(at("targetPort"), ConfigErrorKind::Required);
            None
        }
        Some(IntOrString::String(s)) => {
            diag.check(|| at("targetPort"), port_name(s)).map(|()| TargetPort::Name(Name::interned(s)))
        }
    };
    let node_port = match (raw.node_port, service_type) {
        (None, _) => Some(None),
        // An unknown type already has its error; do not pile on.
        (Some(_), None) => None,
        (Some(n), Some(ServiceType::NodePort | ServiceType::LoadBalancer)) => {
            diag.check(|| at("nodePort"), port_number(n)).map(Some)
        }
        (Some(_), Some(other)) => {
            let kind = ConfigErrorKind::NodePortNotAllowed(other.as_str().to_owned());
            diag.error(at("nodePort"), kind);
            None
        }
    };
    Some(ServicePortSpec {
        name,
        protocol: protocol?,
        port: port?,
        target_port: target_port?,
        node_port: node_port?,
    })
}

/// `spec.healthCheckNodePort`, as the API server allows it: only on a
/// LoadBalancer whose externalTrafficPolicy is Local.
fn health_check_node_port(
    diag: &mut Diagnostics,
    spec: &ServiceSpec,
    service_type: Option<ServiceType>,
    external_policy: Option<TrafficPolicy>,
) -> Option<u16> {
    let value = spec.health_check_node_port?;
    let field = || "spec.healthCheckNodePort".to_owned();
    match (service_type, external_policy) {
        (Some(ServiceType::LoadBalancer), Some(TrafficPolicy::Local)) => {
            diag.check(field, port_number(value))
        }
        // An unknown type or policy already has its error.
        (None, _) | (_, None) => None,
        _ => {
            diag.error(field(), ConfigErrorKind::HealthCheckNodePortNotAllowed);
            None
        }
    }
}

fn affinity(diag: &mut Diagnostics, spec: &ServiceSpec) -> Option<Affinity> {
    match given(&spec.session_affinity) {
        None | Some("None") => Some(Affinity::None),
        Some("ClientIP") => {
            let seconds = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            let max = Affinity::MAX_TIMEOUT.as_secs();
            let timeout = match seconds {
                None | Some(0) => Ok(Affinity::DEFAULT_TIMEOUT),
                Some(s) => match u64::try_from(s) {
                    Ok(s) if s <= max => Ok(Duration::from_secs(s)),
                    _ => Err(ConfigErrorKind::OutOfRange {
                        value: s.into(),
                        min: 1,
                        max: max.try_into().unwrap_or(i64::MAX),
                    }),
                },
            };
            let field = || "spec.sessionAffinityConfig.clientIP.timeoutSeconds".to_owned();
            diag.check(field, timeout).map(|timeout| Affinity::ClientIp { timeout })
        }
        Some(other) => {
            let kind =
                ConfigErrorKind::UnknownValue { value: other.to_owned(), expected: "None or ClientIP" };
            diag.error("spec.sessionAffinity", kind);
            None
        }
    }
}

fn policy(diag: &mut Diagnostics, field: &str, value: &Option<String>) -> Option<TrafficPolicy> {
    match given(value) {
        None | Some("Cluster") => Some(TrafficPolicy::Cluster),
        Some("Local") => Some(TrafficPolicy::Local),
        Some(other) => {
            let kind =
                ConfigErrorKind::UnknownValue { value: other.to_owned(), expected: "Cluster or Local" };
            diag.error(field, kind);
            None
        }
    }
}

/// Unknown values are ignored with a warning, as kube-proxy does: newer API
/// servers may add values older proxies do not know.
fn distribution(diag: &mut Diagnostics, spec: &ServiceSpec) -> TrafficDistribution {
    match given(&spec.traffic_distribution) {
        None => TrafficDistribution::Any,
        Some("PreferClose" | "PreferSameZone") => TrafficDistribution::PreferSameZone,
        Some("PreferSameNode") => TrafficDistribution::PreferSameNode,
        Some(other) => {
            let kind = WarningKind::UnknownTrafficDistribution(other.to_owned());
            diag.warn("spec.trafficDistribution", kind);
            TrafficDistribution::Any
        }
    }
}

/// The typed value of annotation `ringport.io/<key>`, if given; a value
/// `parse` refuses is an error naming the annotation.
fn annotation<T>(
    diag: &mut Diagnostics,
    annotations: &[(String, String)],
    key: &str,
    parse: impl FnOnce(&str) -> Result<T, ConfigErrorKind>,
) -> Option<T> {
    let (_, value) = annotations.iter().find(|(k, _)| k == key)?;
    diag.check(|| format!("metadata.annotations[\"{ANNOTATION_PREFIX}{key}\"]"), parse(value))
}

/// Warn (once per parse of the Service) where its PROXY protocol
/// annotations do not apply as written to its UDP ports
/// (`ProxyProtocol::for_protocol` says what they do there).
fn udp_proxy_protocol(diag: &mut Diagnostics, ports: &[ServicePortSpec], pp: ProxyProtocol) {
    if !ports.iter().any(|p| p.protocol == Protocol::Udp) {
        return;
    }
    let field = |key: &str| format!("metadata.annotations[\"{ANNOTATION_PREFIX}{key}\"]");
    if pp.accept.is_some() {
        diag.warn(field(ACCEPT_PROXY_PROTOCOL_ANNOTATION), WarningKind::AcceptProxyOnUdp);
    }
    if pp.send == Some(crate::model::ProxyVersion::V1) {
        diag.warn(field(PROXY_PROTOCOL_ANNOTATION), WarningKind::ProxyV1OnUdp);
    }
}

/// `ringport.io/*` annotations, prefix stripped; sorted because the source
/// is a `BTreeMap`.
fn ringport_annotations(svc: &Service) -> Vec<(String, String)> {
    let Some(annotations) = &svc.metadata.annotations else {
        return Vec::new();
    };
    annotations
        .iter()
        .filter_map(|(key, value)| {
            let key = key.strip_prefix(ANNOTATION_PREFIX)?;
            (!key.is_empty()).then(|| (key.to_owned(), value.clone()))
        })
        .collect()
}
