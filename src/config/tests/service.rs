//! `v1/Service` validation: one test per rule, each asserting the file,
//! object and field the error names.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;

use super::{assert_error, errors, manifests};
use crate::config::{Conversion, Skip, Warning, WarningKind, parse_str, service_from_k8s};
use crate::model::{
    self, Affinity, Origin, Protocol, ServiceName, TargetPort, TrafficDistribution, TrafficPolicy,
};

const AT: &str = "t.yaml (document 1): Service default/web: ";

/// A Service `default/web` with the given flow-style `spec`.
fn svc(spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {spec}\n")
}

fn service(spec: &str) -> model::Service {
    let manifests = manifests(&svc(spec));
    assert_eq!(manifests.services.len(), 1, "{manifests:?}");
    model::Service::clone(&manifests.services[0])
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
    assert_eq!(s.origin.to_string(), "t.yaml (document 1)");
    assert_eq!(s.cluster_ips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
    let port = &s.ports[0];
    assert_eq!((port.name.as_str(), port.protocol, port.port), ("", Protocol::Tcp, 80));
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
    assert_error(text, "t.yaml (document 1): Service default/<unnamed>: metadata.name: ", "is required");
}

#[test]
fn namespace_is_kept_when_given() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80}]}\n";
    assert_eq!(manifests(text).services[0].name, ServiceName::new("shop", "web"));
}

#[test]
fn unknown_service_type_is_an_error() {
    bad("{type: Magic, ports: [{port: 80}]}", "spec.type", "unknown value \"Magic\"");
}

#[test]
fn external_name_service_is_skipped_with_the_reason() {
    let text = svc("{type: ExternalName, externalName: example.org}");
    let manifests = manifests(&text);
    assert!(manifests.services.is_empty());
    assert_eq!(manifests.warnings[0].kind, WarningKind::Skipped(Skip::ExternalName));
    assert!(manifests.warnings[0].to_string().starts_with(AT));
}

#[test]
fn headless_service_is_skipped_through_the_api_conversion_too() {
    let raw: Service = serde_norway::from_str(&svc("{clusterIP: None, ports: [{port: 80}]}")).unwrap();
    let converted = service_from_k8s(&raw, Origin::new("api")).unwrap();
    assert_eq!(converted, Conversion::Skipped(Skip::Headless));
    let listed = svc("{clusterIPs: [None], ports: [{port: 80}]}");
    assert_eq!(warnings(&listed)[0].kind, WarningKind::Skipped(Skip::Headless));
}

#[test]
fn service_from_k8s_names_the_callers_origin_in_errors() {
    let raw: Service = serde_norway::from_str(&svc("{ports: [{port: 0}]}")).unwrap();
    let errors = service_from_k8s(&raw, Origin::new("kube-apiserver")).unwrap_err();
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
    bad("{clusterIPs: [10.96.0.1, 'fd00::x'], ports: [{port: 80}]}", "spec.clusterIPs[1]", "not a valid IP");
    // As the API server: an IPv4 address in IPv6 clothes is refused.
    let mapped = "\"::ffff:10.96.0.1\" is an IPv4-mapped IPv6 address; write the IPv4 address itself";
    bad("{clusterIP: '::ffff:10.96.0.1', ports: [{port: 80}]}", "spec.clusterIP", mapped);
    bad("{externalIPs: ['::ffff:10.97.0.1'], ports: [{port: 80}]}", "spec.externalIPs[0]", "IPv4-mapped");
}

#[test]
fn cluster_ips_win_and_cluster_ip_must_equal_their_first_entry() {
    let s = service("{clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 'fd00::1'], ports: [{port: 80}]}");
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
    bad("{clusterIP: 10.96.0.1}", "spec.ports", "at least one port is required");
    bad("{ports: []}", "spec.ports", "at least one port is required");
}

#[test]
fn port_out_of_range_is_an_error() {
    bad("{ports: [{port: 70000}]}", "spec.ports[0].port", "70000 is out of range 1-65535");
    bad("{ports: [{port: 0}]}", "spec.ports[0].port", "0 is out of range 1-65535");
}

#[test]
fn sctp_and_unknown_protocols_are_errors() {
    bad("{ports: [{port: 80, protocol: SCTP}]}", "spec.ports[0].protocol", "SCTP is not supported");
    bad("{ports: [{port: 80, protocol: QUIC}]}", "spec.ports[0].protocol", "unknown protocol \"QUIC\"");
    assert_eq!(service("{ports: [{port: 53, protocol: UDP}]}").ports[0].protocol, Protocol::Udp);
}

#[test]
fn target_port_is_a_port_number_or_a_port_name() {
    bad("{ports: [{port: 80, targetPort: 70000}]}", "spec.ports[0].targetPort", "70000 is out of range");
    bad("{ports: [{port: 80, targetPort: ''}]}", "spec.ports[0].targetPort", "is required");
    bad("{ports: [{port: 80, targetPort: '8080'}]}", "spec.ports[0].targetPort", "must contain a letter");
    let named = service("{ports: [{port: 80, targetPort: http-web}]}");
    assert_eq!(named.ports[0].target_port, TargetPort::Name("http-web".into()));
    let numbered = service("{ports: [{port: 80, targetPort: 8080}]}");
    assert_eq!(numbered.ports[0].target_port, TargetPort::Number(8080));
}

#[test]
fn node_port_is_only_allowed_for_node_port_and_load_balancer_types() {
    bad("{ports: [{port: 80, nodePort: 30080}]}", "spec.ports[0].nodePort", "not allowed for type ClusterIP");
    bad("{type: NodePort, ports: [{port: 80, nodePort: 70000}]}", "spec.ports[0].nodePort", "out of range");
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
    let s = service("{ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]}");
    assert_eq!(s.ports.len(), 2);
    bad("{ports: [{name: a, port: 80}, {name: b, port: 80}]}", "spec.ports[1].port", "duplicate port 80/TCP");
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
    let status = "status: {loadBalancer: {ingress: [{ip: 192.0.2.7}, {hostname: lb.example.org}]}}\n";
    let lb = format!("{}{status}", svc("{type: LoadBalancer, ports: [{port: 80}]}"));
    assert_eq!(manifests(&lb).services[0].load_balancer_ips, ["192.0.2.7".parse::<IpAddr>().unwrap()]);
    let cluster_ip = format!("{}{status}", svc("{ports: [{port: 80}]}"));
    assert!(manifests(&cluster_ip).services[0].load_balancer_ips.is_empty());
    let broken = format!(
        "{}status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.999}}]}}}}\n",
        svc("{type: LoadBalancer, ports: [{port: 80}]}")
    );
    assert_error(&broken, &format!("{AT}status.loadBalancer.ingress[0].ip: "), "not a valid IP");
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
    let default = Affinity::ClientIp { timeout: Affinity::DEFAULT_TIMEOUT };
    assert_eq!(absent.affinity, default);
    let zero = service(
        "{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}",
    );
    assert_eq!(zero.affinity, default);
    let set = service(
        "{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, ports: [{port: 80}]}",
    );
    assert_eq!(set.affinity, Affinity::ClientIp { timeout: Duration::from_secs(60) });
}

#[test]
fn affinity_timeout_above_one_day_and_unknown_affinities_are_errors() {
    bad(
        "{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}, ports: [{port: 80}]}",
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        "86401 is out of range 1-86400",
    );
    bad("{sessionAffinity: Cookie, ports: [{port: 80}]}", "spec.sessionAffinity", "unknown value \"Cookie\"");
}

#[test]
fn traffic_policies_accept_only_cluster_and_local() {
    let s = service("{externalTrafficPolicy: Local, internalTrafficPolicy: Local, ports: [{port: 80}]}");
    assert_eq!((s.external_policy, s.internal_policy), (TrafficPolicy::Local, TrafficPolicy::Local));
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
    assert_eq!(manifests(&text).services[0].distribution, TrafficDistribution::Any);
    let warning = warnings(&text).remove(0);
    assert_eq!(warning.kind, WarningKind::UnknownTrafficDistribution("PreferMars".into()));
    assert!(warning.to_string().starts_with(&format!("{AT}spec.trafficDistribution: ")));
}

#[test]
fn ringport_annotations_are_stripped_of_their_prefix_and_sorted() {
    let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    ringport.io/scheduler: maglev\n    ringport.io/retries: '3'\n    other.io/x: y\nspec: {ports: [{port: 80}]}\n";
    let annotations = &manifests(text).services[0].ringport_annotations;
    let expected = [("retries", "3"), ("scheduler", "maglev")];
    let expected: Vec<_> = expected.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(annotations, &expected);
}

#[test]
fn every_error_of_a_service_is_reported_not_just_the_first() {
    let errors = errors(&svc(
        "{type: NodePort, clusterIP: 1.2.3, ports: [{port: 0, protocol: SCTP, nodePort: 99999}]}",
    ));
    assert_eq!(errors.lines().count(), 4, "{errors}");
}

#[test]
fn health_check_node_port_is_only_allowed_for_local_load_balancers() {
    let s = service(
        "{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32000, \
          ports: [{port: 80, nodePort: 30080}]}",
    );
    assert_eq!(s.health_check_node_port, Some(32000));
    assert_eq!(service("{type: LoadBalancer, ports: [{port: 80}]}").health_check_node_port, None);
    let not_allowed = "is only allowed for type LoadBalancer with externalTrafficPolicy Local";
    bad(
        "{type: LoadBalancer, healthCheckNodePort: 32000, ports: [{port: 80}]}",
        "spec.healthCheckNodePort",
        not_allowed,
    );
    bad(
        "{type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{port: 80}]}",
        "spec.healthCheckNodePort",
        not_allowed,
    );
    bad(
        "{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 70000, ports: [{port: 80}]}",
        "spec.healthCheckNodePort",
        "out of range",
    );
}

#[test]
fn ip_families_default_to_the_cluster_ips_and_are_kept_in_order() {
    use crate::model::IpFamily;
    let s = service("{clusterIPs: [\"fd00:96::1\", 10.96.0.1], ports: [{port: 80}]}");
    assert_eq!(s.ip_families, [IpFamily::V6, IpFamily::V4]);
    let s = service(
        "{ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv4, IPv6], clusterIPs: [10.96.0.1, \"fd00:96::1\"], ports: [{port: 80}]}",
    );
    assert_eq!(s.ip_families, [IpFamily::V4, IpFamily::V6]);
    // No cluster IP yet (an edge Service): ipFamilies alone says which.
    let s = service("{ipFamilies: [IPv6], ports: [{port: 80}]}");
    assert_eq!(s.ip_families, [IpFamily::V6]);
    assert!(service("{ports: [{port: 80}]}").ip_families.is_empty(), "nothing said: any family");
}

#[test]
fn ip_families_that_contradict_the_cluster_ips_are_errors_naming_the_field() {
    bad(
        "{ipFamilies: [IPv4], clusterIP: \"fd00:96::1\", ports: [{port: 80}]}",
        "spec.ipFamilies[0]",
        "is IPv4, but spec.clusterIPs[0] (fd00:96::1) is not",
    );
    bad(
        "{ipFamilies: [IPv6, IPv4], clusterIPs: [10.96.0.1, \"fd00:96::1\"], ports: [{port: 80}]}",
        "spec.ipFamilies[0]",
        "is IPv6, but spec.clusterIPs[0] (10.96.0.1) is not",
    );
    bad(
        "{ipFamilies: [IPv4], clusterIPs: [10.96.0.1, \"fd00:96::1\"], ports: [{port: 80}]}",
        "spec.clusterIPs[1]",
        "fd00:96::1 has no spec.ipFamilies entry of its own",
    );
    bad("{ipFamilies: [IPv4, IPv4], ports: [{port: 80}]}", "spec.ipFamilies[1]", "IPv4 is given twice");
    bad("{ipFamilies: [IPv4, IPv6, IPv4], ports: [{port: 80}]}", "spec.ipFamilies", "3 families given");
    bad("{ipFamilies: [IPv5], ports: [{port: 80}]}", "spec.ipFamilies[0]", "unknown value \"IPv5\"");
    bad(
        "{clusterIPs: [10.96.0.1, 10.96.0.2], ports: [{port: 80}]}",
        "spec.clusterIPs",
        "both addresses are of one family",
    );
}

#[test]
fn ip_family_policy_is_checked_against_the_families_given() {
    bad(
        "{ipFamilyPolicy: SingleStack, clusterIPs: [10.96.0.1, \"fd00:96::1\"], ports: [{port: 80}]}",
        "spec.ipFamilyPolicy",
        "SingleStack allows one family, but 2 are given (spec.clusterIPs)",
    );
    bad(
        "{ipFamilyPolicy: RequireDualStack, clusterIP: 10.96.0.1, ports: [{port: 80}]}",
        "spec.ipFamilyPolicy",
        "RequireDualStack needs two families, but only IPv4 is given (spec.clusterIPs)",
    );
    bad(
        "{ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv6], ports: [{port: 80}]}",
        "spec.ipFamilyPolicy",
        "RequireDualStack needs two families, but only IPv6 is given (spec.ipFamilies)",
    );
    bad("{ipFamilyPolicy: Both, ports: [{port: 80}]}", "spec.ipFamilyPolicy", "unknown value \"Both\"");
    let fine = "{ipFamilyPolicy: PreferDualStack, clusterIP: 10.96.0.1, ports: [{port: 80}]}";
    assert_eq!(service(fine).cluster_ips.len(), 1, "PreferDualStack with one family is fine");
}

#[test]
fn source_ip_annotation_is_read_and_an_unknown_value_names_the_service_and_annotation() {
    let text = |v: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    ringport.io/source-ip: {v}\nspec: {{ports: [{{port: 80}}]}}\n"
        )
    };
    assert_eq!(manifests(&text("preserve")).services[0].source_ip, Some(crate::model::SourceIp::Preserve));
    assert_eq!(manifests(&text("proxy")).services[0].source_ip, Some(crate::model::SourceIp::Proxy));
    assert_eq!(service("{ports: [{port: 80}]}").source_ip, None);
    let errors = errors(&text("client"));
    assert!(errors.contains("web"), "{errors}");
    assert!(
        errors.contains("metadata.annotations[\"ringport.io/source-ip\"]: unknown source-ip mode \"client\""),
        "{errors}"
    );
}

#[test]
fn proxy_protocol_annotations_are_typed_and_unknown_values_name_the_annotation() {
    use crate::model::{AcceptProxy, ProxyProtocol, ProxyVersion};
    let with = |send: &str, accept: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    \
             ringport.io/proxy-protocol: '{send}'\n    ringport.io/accept-proxy-protocol: '{accept}'\n\
             spec: {{ports: [{{port: 80}}]}}\n"
        )
    };
    let s = manifests(&with("v2", "any")).services.remove(0);
    assert_eq!(
        s.proxy_protocol,
        ProxyProtocol { send: Some(ProxyVersion::V2), accept: Some(AcceptProxy::Any) }
    );
    let s = manifests(&with("v1", "v1")).services.remove(0);
    assert_eq!(
        s.proxy_protocol,
        ProxyProtocol { send: Some(ProxyVersion::V1), accept: Some(AcceptProxy::V1) }
    );
    assert_eq!(service("{ports: [{port: 80}]}").proxy_protocol, ProxyProtocol::default());
    assert_error(
        &with("v3", "v2"),
        &format!("{AT}metadata.annotations[\"ringport.io/proxy-protocol\"]: "),
        "unknown PROXY protocol version \"v3\" (expected v1 or v2)",
    );
    assert_error(
        &with("v1", "yes"),
        &format!("{AT}metadata.annotations[\"ringport.io/accept-proxy-protocol\"]: "),
        "unknown PROXY protocol version \"yes\" (expected v1, v2 or any)",
    );
}

#[test]
fn proxy_protocol_on_udp_ports_warns_naming_the_annotation_and_the_ports_show_what_they_do() {
    use crate::model::{AcceptProxy, ProxyProtocol, ProxyVersion};
    let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n    \
                ringport.io/proxy-protocol: v1\n    ringport.io/accept-proxy-protocol: any\n\
                spec: {ports: [{name: tcp, port: 80}, {name: dns, port: 53, protocol: UDP}]}\n";
    let found = warnings(text);
    let lines: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert_eq!(found.len(), 2, "{lines:?}");
    assert_eq!(found[0].kind, WarningKind::AcceptProxyOnUdp);
    assert!(
        lines[0].starts_with(&format!("{AT}metadata.annotations[\"ringport.io/accept-proxy-protocol\"]: "))
    );
    assert_eq!(found[1].kind, WarningKind::ProxyV1OnUdp);
    assert!(lines[1].starts_with(&format!("{AT}metadata.annotations[\"ringport.io/proxy-protocol\"]: ")));

    let m = manifests(text);
    let (ports, _) = crate::config::join(&m.services, &m.slices);
    let of = |name: &str| ports.iter().find(|p| p.name.port == name).map(|p| p.proxy_protocol);
    let tcp = ProxyProtocol { send: Some(ProxyVersion::V1), accept: Some(AcceptProxy::Any) };
    assert_eq!(of("tcp"), Some(tcp));
    assert_eq!(of("dns"), Some(ProxyProtocol { send: Some(ProxyVersion::V2), accept: None }));

    // A TCP-only Service warns of nothing.
    assert!(warnings(&text.replace(", protocol: UDP", "")).is_empty());
}
