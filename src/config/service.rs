//! `v1/Service` -> `model::Service`.
//!
//! Follows the API server's validation and defaulting where ringport depends
//! on it, so that a manifest `kubectl apply` would take means the same here,
//! and one it would refuse is refused with the field named. An empty string
//! counts as absent, as it does for the API server (Go's zero value).
//! Headless and ExternalName Services are valid but skipped: they are DNS
//! only. All errors of a Service are reported, not just the first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    ConfigErrorKind, ConfigErrors, Conversion, Diagnostics, ObjectRef, Skip, WarningKind, ip,
    namespace_of, port_name, port_number, protocol, required_name,
};
use crate::model::{
    self, Affinity, Origin, Protocol, ServiceName, ServicePortSpec, TargetPort,
    TrafficDistribution, TrafficPolicy,
};

/// Annotations under this prefix tune ringport per Service.
const ANNOTATION_PREFIX: &str = "ringport.io/";

/// Validates one Service. `Ok(Conversion::Skipped(_))` for a headless or
/// ExternalName Service; `Err` lists every problem found.
pub fn service_from_k8s(
    svc: &Service,
    origin: Origin,
) -> Result<Conversion<model::Service>, ConfigErrors> {
    let mut diag = Diagnostics::new(origin, ObjectRef::from_meta("Service", &svc.metadata));
    let name = required_name(&mut diag, &svc.metadata);
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
    let ports = ports(&mut diag, spec, service_type);
    let external_ips = ip_list(&mut diag, "spec.externalIPs", spec.external_ips.as_deref());
    let load_balancer_ips = match service_type {
        Some(ServiceType::LoadBalancer) => load_balancer_ips(&mut diag, svc),
        _ => Vec::new(),
    };
    let load_balancer_source_ranges = source_ranges(&mut diag, spec);
    let affinity = affinity(&mut diag, spec);
    let external_policy = policy(
        &mut diag,
        "spec.externalTrafficPolicy",
        &spec.external_traffic_policy,
    );
    let internal_policy = policy(
        &mut diag,
        "spec.internalTrafficPolicy",
        &spec.internal_traffic_policy,
    );
    let distribution = distribution(&mut diag, spec);
    let ringport_annotations = ringport_annotations(svc);

    // Each `None` above comes with a recorded error, so `finish` returns
    // `Err` whenever one of these placeholders was needed.
    let service = model::Service {
        name: ServiceName::new(namespace_of(&svc.metadata), name.unwrap_or_default()),
        origin: diag.origin().clone(),
        cluster_ips,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        ports,
        affinity: affinity.unwrap_or(Affinity::None),
        external_policy: external_policy.unwrap_or_default(),
        internal_policy: internal_policy.unwrap_or_default(),
        distribution,
        ringport_annotations,
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
            ConfigErrorKind::ClusterIpMismatch {
                cluster_ip: single.to_owned(),
                first: list[0].clone(),
            },
        );
    }
    if list.len() > 2 {
        diag.error(
            "spec.clusterIPs",
            ConfigErrorKind::TooManyClusterIps(list.len()),
        );
    }
    let ips = ip_list(diag, "spec.clusterIPs", Some(list));
    if let [a, b] = ips[..]
        && a.is_ipv4() == b.is_ipv4()
    {
        diag.error("spec.clusterIPs", ConfigErrorKind::SameFamilyClusterIps);
    }
    ips
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
    let ranges = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    ranges
        .iter()
        .enumerate()
        .filter_map(|(i, value)| {
            // The API server trims spaces here, so people write them.
            let parsed = value.trim().parse::<IpNet>().map(|net| net.trunc());
            let parsed = parsed.map_err(|source| ConfigErrorKind::InvalidCidr {
                value: value.clone(),
                source,
            });
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
    let mut names: HashMap<String, usize> = HashMap::new();
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
                name: port.name.clone(),
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
    let name = given(&raw.name).unwrap_or_default().to_owned();
    if name.is_empty() && several {
        diag.error(at("name"), ConfigErrorKind::PortNameRequired);
    }
    let port = diag.check(|| at("port"), port_number(raw.port));
    let protocol = diag.check(|| at("protocol"), protocol(given(&raw.protocol)));
    let target_port = match &raw.target_port {
        None => port.map(TargetPort::Number),
        Some(IntOrString::Int(n)) => diag
            .check(|| at("targetPort"), port_number(*n))
            .map(TargetPort::Number),
        Some(IntOrString::String(s)) if s.is_empty() => {
            diag.error(at("targetPort"), ConfigErrorKind::Required);
            None
        }
        Some(IntOrString::String(s)) => diag
            .check(|| at("targetPort"), port_name(s))
            .map(|()| TargetPort::Name(s.clone())),
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
            diag.check(field, timeout)
                .map(|timeout| Affinity::ClientIp { timeout })
        }
        Some(other) => {
            let kind = ConfigErrorKind::UnknownValue {
                value: other.to_owned(),
                expected: "None or ClientIP",
            };
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
            let kind = ConfigErrorKind::UnknownValue {
                value: other.to_owned(),
                expected: "Cluster or Local",
            };
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::testing::{assert_error, errors, manifests};
    use crate::config::{Warning, parse_str};

    const AT: &str = "t.yaml (document 1): Service default/web: ";

    /// A Service `default/web` with the given flow-style `spec`.
    fn svc(spec: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {spec}\n")
    }

    fn service(spec: &str) -> model::Service {
        let mut manifests = manifests(&svc(spec));
        assert_eq!(manifests.services.len(), 1, "{manifests:?}");
        manifests.services.remove(0)
    }

    fn warnings(text: &str) -> Vec<Warning> {
        parse_str(text, "t.yaml").unwrap().warnings
    }

    fn bad(spec: &str, field: &str, problem: &str) {
        assert_error(&svc(spec), &format!("{AT}{field}: "), problem);
    }

    #[test]
    fn minimal_service_gets_the_api_defaults() {
        let s = service("{clusterIP: 10.96.0.10, ports: [{port: 80}]}");
        assert_eq!(s.name, ServiceName::new("default", "web"));
        assert_eq!(s.origin.0, "t.yaml (document 1)");
        assert_eq!(s.cluster_ips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        let port = &s.ports[0];
        assert_eq!(
            (port.name.as_str(), port.protocol, port.port),
            ("", Protocol::Tcp, 80)
        );
        assert_eq!(port.target_port, TargetPort::Number(80));
        assert_eq!(port.node_port, None);
        assert_eq!(s.affinity, Affinity::None);
        assert_eq!(s.external_policy, TrafficPolicy::Cluster);
        assert_eq!(s.internal_policy, TrafficPolicy::Cluster);
        assert_eq!(s.distribution, TrafficDistribution::Any);
    }

    #[test]
    fn missing_name_is_an_error_naming_metadata_name() {
        let text = "apiVersion: v1\nkind: Service\nspec: {ports: [{port: 80}]}\n";
        assert_error(
            text,
            "t.yaml (document 1): Service default/<unnamed>: metadata.name: ",
            "is required",
        );
    }

    #[test]
    fn namespace_is_kept_when_given() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80}]}\n";
        assert_eq!(
            manifests(text).services[0].name,
            ServiceName::new("shop", "web")
        );
    }

    #[test]
    fn unknown_service_type_is_an_error() {
        bad(
            "{type: Magic, ports: [{port: 80}]}",
            "spec.type",
            "unknown value \"Magic\"",
        );
    }

    #[test]
    fn external_name_service_is_skipped_with_the_reason() {
        let text = svc("{type: ExternalName, externalName: example.org}");
        let manifests = manifests(&text);
        assert!(manifests.services.is_empty());
        assert_eq!(
            manifests.warnings[0].kind,
            WarningKind::Skipped(Skip::ExternalName)
        );
        assert!(manifests.warnings[0].to_string().starts_with(AT));
    }

    #[test]
    fn headless_service_is_skipped_through_the_api_conversion_too() {
        let raw: Service =
            serde_yaml::from_str(&svc("{clusterIP: None, ports: [{port: 80}]}")).unwrap();
        let converted = service_from_k8s(&raw, Origin("api".into())).unwrap();
        assert_eq!(converted, Conversion::Skipped(Skip::Headless));
        let listed = svc("{clusterIPs: [None], ports: [{port: 80}]}");
        assert_eq!(
            warnings(&listed)[0].kind,
            WarningKind::Skipped(Skip::Headless)
        );
    }

    #[test]
    fn service_from_k8s_names_the_callers_origin_in_errors() {
        let raw: Service = serde_yaml::from_str(&svc("{ports: [{port: 0}]}")).unwrap();
        let errors = service_from_k8s(&raw, Origin("kube-apiserver".into())).unwrap_err();
        assert_eq!(
            errors.to_string(),
            "kube-apiserver: Service default/web: spec.ports[0].port: 0 is out of range 1-65535"
        );
    }

    #[test]
    fn invalid_cluster_ip_is_an_error() {
        bad(
            "{clusterIP: 10.96.0.300, ports: [{port: 80}]}",
            "spec.clusterIP",
            "\"10.96.0.300\" is not a valid IP address",
        );
        bad(
            "{clusterIPs: [10.96.0.1, 'fd00::x'], ports: [{port: 80}]}",
            "spec.clusterIPs[1]",
            "not a valid IP",
        );
    }

    #[test]
    fn cluster_ips_win_and_cluster_ip_must_equal_their_first_entry() {
        let s = service(
            "{clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 'fd00::1'], ports: [{port: 80}]}",
        );
        assert_eq!(s.cluster_ips.len(), 2);
        bad(
            "{clusterIP: 10.96.0.2, clusterIPs: [10.96.0.1], ports: [{port: 80}]}",
            "spec.clusterIP",
            "must equal spec.clusterIPs[0]",
        );
    }

    #[test]
    fn dual_stack_cluster_ips_need_one_address_of_each_family() {
        bad(
            "{clusterIPs: [10.96.0.1, 10.96.0.2], ports: [{port: 80}]}",
            "spec.clusterIPs",
            "one IPv4 and one IPv6",
        );
        bad(
            "{clusterIPs: [10.96.0.1, 'fd00::1', 10.96.0.2], ports: [{port: 80}]}",
            "spec.clusterIPs",
            "at most two",
        );
    }

    #[test]
    fn absent_cluster_ip_is_allowed() {
        assert!(service("{ports: [{port: 80}]}").cluster_ips.is_empty());
    }

    #[test]
    fn a_service_needs_at_least_one_port() {
        bad(
            "{clusterIP: 10.96.0.1}",
            "spec.ports",
            "at least one port is required",
        );
        bad("{ports: []}", "spec.ports", "at least one port is required");
    }

    #[test]
    fn port_out_of_range_is_an_error() {
        bad(
            "{ports: [{port: 70000}]}",
            "spec.ports[0].port",
            "70000 is out of range 1-65535",
        );
        bad(
            "{ports: [{port: 0}]}",
            "spec.ports[0].port",
            "0 is out of range 1-65535",
        );
    }

    #[test]
    fn sctp_and_unknown_protocols_are_errors() {
        bad(
            "{ports: [{port: 80, protocol: SCTP}]}",
            "spec.ports[0].protocol",
            "SCTP is not supported",
        );
        bad(
            "{ports: [{port: 80, protocol: QUIC}]}",
            "spec.ports[0].protocol",
            "unknown protocol \"QUIC\"",
        );
        assert_eq!(
            service("{ports: [{port: 53, protocol: UDP}]}").ports[0].protocol,
            Protocol::Udp
        );
    }

    #[test]
    fn target_port_is_a_port_number_or_a_port_name() {
        bad(
            "{ports: [{port: 80, targetPort: 70000}]}",
            "spec.ports[0].targetPort",
            "70000 is out of range",
        );
        bad(
            "{ports: [{port: 80, targetPort: ''}]}",
            "spec.ports[0].targetPort",
            "is required",
        );
        bad(
            "{ports: [{port: 80, targetPort: '8080'}]}",
            "spec.ports[0].targetPort",
            "must contain a letter",
        );
        let named = service("{ports: [{port: 80, targetPort: http-web}]}");
        assert_eq!(
            named.ports[0].target_port,
            TargetPort::Name("http-web".into())
        );
        let numbered = service("{ports: [{port: 80, targetPort: 8080}]}");
        assert_eq!(numbered.ports[0].target_port, TargetPort::Number(8080));
    }

    #[test]
    fn node_port_is_only_allowed_for_node_port_and_load_balancer_types() {
        bad(
            "{ports: [{port: 80, nodePort: 30080}]}",
            "spec.ports[0].nodePort",
            "not allowed for type ClusterIP",
        );
        bad(
            "{type: NodePort, ports: [{port: 80, nodePort: 70000}]}",
            "spec.ports[0].nodePort",
            "out of range",
        );
        let s = service("{type: LoadBalancer, ports: [{port: 80, nodePort: 30080}]}");
        assert_eq!(s.ports[0].node_port, Some(30080));
    }

    #[test]
    fn port_names_are_required_and_unique_when_there_are_several() {
        bad(
            "{ports: [{name: a, port: 80}, {port: 81}]}",
            "spec.ports[1].name",
            "is required when the Service has more than one port",
        );
        bad(
            "{ports: [{name: a, port: 80}, {name: a, port: 81, protocol: UDP}]}",
            "spec.ports[1].name",
            "duplicate port name \"a\" (also spec.ports[0].name)",
        );
    }

    #[test]
    fn one_port_number_may_serve_tcp_and_udp_but_not_twice_one_protocol() {
        let s =
            service("{ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]}");
        assert_eq!(s.ports.len(), 2);
        bad(
            "{ports: [{name: a, port: 80}, {name: b, port: 80}]}",
            "spec.ports[1].port",
            "duplicate port 80/TCP",
        );
    }

    #[test]
    fn external_ips_must_be_ip_addresses() {
        bad(
            "{externalIPs: [192.0.2.10, example.org], ports: [{port: 80}]}",
            "spec.externalIPs[1]",
            "\"example.org\" is not a valid IP",
        );
    }

    #[test]
    fn load_balancer_ingress_ips_are_validated_and_used_only_for_load_balancers() {
        let status =
            "status: {loadBalancer: {ingress: [{ip: 192.0.2.7}, {hostname: lb.example.org}]}}\n";
        let lb = format!(
            "{}{status}",
            svc("{type: LoadBalancer, ports: [{port: 80}]}")
        );
        assert_eq!(
            manifests(&lb).services[0].load_balancer_ips,
            ["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        let cluster_ip = format!("{}{status}", svc("{ports: [{port: 80}]}"));
        assert!(
            manifests(&cluster_ip).services[0]
                .load_balancer_ips
                .is_empty()
        );
        let broken = format!(
            "{}status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.999}}]}}}}\n",
            svc("{type: LoadBalancer, ports: [{port: 80}]}")
        );
        assert_error(
            &broken,
            &format!("{AT}status.loadBalancer.ingress[0].ip: "),
            "not a valid IP",
        );
    }

    #[test]
    fn load_balancer_source_ranges_must_be_cidrs() {
        bad(
            "{loadBalancerSourceRanges: [10.0.0.0/33], ports: [{port: 80}]}",
            "spec.loadBalancerSourceRanges[0]",
            "not a valid CIDR",
        );
        let s = service("{loadBalancerSourceRanges: [' 10.1.2.3/8'], ports: [{port: 80}]}");
        assert_eq!(s.load_balancer_source_ranges[0].to_string(), "10.0.0.0/8");
    }

    #[test]
    fn client_ip_affinity_timeout_defaults_to_three_hours() {
        let absent = service("{sessionAffinity: ClientIP, ports: [{port: 80}]}");
        let default = Affinity::ClientIp {
            timeout: Affinity::DEFAULT_TIMEOUT,
        };
        assert_eq!(absent.affinity, default);
        let zero = service(
            "{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}",
        );
        assert_eq!(zero.affinity, default);
        let set = service(
            "{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, ports: [{port: 80}]}",
        );
        assert_eq!(
            set.affinity,
            Affinity::ClientIp {
                timeout: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn affinity_timeout_above_one_day_and_unknown_affinities_are_errors() {
        bad(
            "{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}, ports: [{port: 80}]}",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            "86401 is out of range 1-86400",
        );
        bad(
            "{sessionAffinity: Cookie, ports: [{port: 80}]}",
            "spec.sessionAffinity",
            "unknown value \"Cookie\"",
        );
    }

    #[test]
    fn traffic_policies_accept_only_cluster_and_local() {
        let s = service(
            "{externalTrafficPolicy: Local, internalTrafficPolicy: Local, ports: [{port: 80}]}",
        );
        assert_eq!(
            (s.external_policy, s.internal_policy),
            (TrafficPolicy::Local, TrafficPolicy::Local)
        );
        bad(
            "{externalTrafficPolicy: OnlyLocal, ports: [{port: 80}]}",
            "spec.externalTrafficPolicy",
            "expected Cluster or Local",
        );
        bad(
            "{internalTrafficPolicy: Global, ports: [{port: 80}]}",
            "spec.internalTrafficPolicy",
            "expected Cluster or Local",
        );
    }

    #[test]
    fn prefer_close_is_read_as_prefer_same_zone() {
        let s = service("{trafficDistribution: PreferClose, ports: [{port: 80}]}");
        assert_eq!(s.distribution, TrafficDistribution::PreferSameZone);
        let s = service("{trafficDistribution: PreferSameNode, ports: [{port: 80}]}");
        assert_eq!(s.distribution, TrafficDistribution::PreferSameNode);
    }

    #[test]
    fn unknown_traffic_distribution_is_ignored_with_a_warning() {
        let text = svc("{trafficDistribution: PreferMars, ports: [{port: 80}]}");
        assert_eq!(
            manifests(&text).services[0].distribution,
            TrafficDistribution::Any
        );
        let warning = warnings(&text).remove(0);
        assert_eq!(
            warning.kind,
            WarningKind::UnknownTrafficDistribution("PreferMars".into())
        );
        assert!(
            warning
                .to_string()
                .starts_with(&format!("{AT}spec.trafficDistribution: "))
        );
    }

    #[test]
    fn ringport_annotations_are_stripped_of_their_prefix_and_sorted() {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    ringport.io/scheduler: maglev\n    ringport.io/retries: '3'\n    other.io/x: y\nspec: {ports: [{port: 80}]}\n";
        let annotations = &manifests(text).services[0].ringport_annotations;
        let expected = [("retries", "3"), ("scheduler", "maglev")];
        let expected: Vec<_> = expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(annotations, &expected);
    }

    #[test]
    fn every_error_of_a_service_is_reported_not_just_the_first() {
        let errors = errors(&svc(
            "{type: NodePort, clusterIP: 1.2.3, ports: [{port: 0, protocol: SCTP, nodePort: 99999}]}",
        ));
        assert_eq!(errors.lines().count(), 4, "{errors}");
    }
}
