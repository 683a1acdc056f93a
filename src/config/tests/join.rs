//! Joining Services with their slices, and the cross-object checks.

use super::manifests;
use crate::config::{Joined, WarningKind, join, join_with_warnings};
use crate::model::{self, Conditions, ServiceName, ServicePort};

/// Loads `text` as `t.yaml` and joins it.
fn joined(text: &str) -> Joined {
    let m = manifests(text);
    join_with_warnings(&m.services, &m.slices)
}

fn error_lines(j: &Joined) -> Vec<String> {
    j.errors.iter().map(ToString::to_string).collect()
}

fn addrs(port: &ServicePort) -> Vec<String> {
    port.endpoints.iter().map(|e| e.addr.to_string()).collect()
}

fn service(name: &str, spec: &str) -> String {
    format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n")
}

fn slice(name: &str, service: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n"
    )
}

fn endpoints(name: &str, ip: &str, port: u16) -> String {
    format!(
        "---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}}}\n\
         subsets: [{{addresses: [{{ip: {ip}}}], ports: [{{port: {port}}}]}}]\n"
    )
}

#[test]
fn named_target_port_resolves_through_slice_port_name() {
    let text = service(
        "web",
        "{clusterIP: 10.96.0.10, sessionAffinity: ClientIP, ports: [{name: http, port: 80, targetPort: http-web}, \
          {name: metrics, port: 9100, targetPort: 9100}]}",
    ) + &slice(
        "web-1",
        "web",
        "[{name: http-web, port: 18080}, {name: metrics, port: 19100}]",
        "[{addresses: [127.0.0.2]}, {addresses: [127.0.0.1]}]",
    );
    let j = joined(&text);
    assert!(j.errors.is_empty(), "{:?}", error_lines(&j));
    let [http, metrics] = &j.ports[..] else { panic!("{:?}", j.ports) };
    assert_eq!(http.name.to_string(), "default/web:http");
    assert_eq!(addrs(http), ["127.0.0.1:18080", "127.0.0.2:18080"]);
    assert_eq!(addrs(metrics), ["127.0.0.1:19100", "127.0.0.2:19100"]);
    assert_eq!((http.port, metrics.port), (80, 9100));
    assert_eq!(http.cluster_ips, ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(http.affinity, model::Affinity::ClientIp { timeout: model::Affinity::DEFAULT_TIMEOUT });
}

#[test]
fn service_port_name_wins_over_target_port_name() {
    let text = service("web", "{ports: [{name: http, port: 80, targetPort: web}]}")
        + &slice(
            "web-1",
            "web",
            "[{name: web, port: 1111}, {name: http, port: 2222}]",
            "[{addresses: [127.0.0.1]}]",
        );
    assert_eq!(addrs(&joined(&text).ports[0]), ["127.0.0.1:2222"]);
}

#[test]
fn the_protocol_of_the_slice_port_must_match() {
    let text = service("dns", "{ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]}")
        + &slice(
            "dns-1",
            "dns",
            "[{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5354, protocol: TCP}]",
            "[{addresses: [127.0.0.1]}]",
        );
    let j = joined(&text);
    assert!(j.errors.is_empty(), "{:?}", error_lines(&j));
    assert_eq!(addrs(&j.ports[0]), ["127.0.0.1:5353"]);
    assert_eq!(addrs(&j.ports[1]), ["127.0.0.1:5354"]);
    let udp_only = text.replace("protocol: TCP}", "protocol: UDP}");
    let lines = error_lines(&joined(&udp_only));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("spec.ports[1].targetPort: no EndpointSlice or Endpoints port"), "{lines:?}");
}

#[test]
fn unknown_target_port_name_is_an_error_naming_service_and_field() {
    let text = service("web", "{ports: [{name: http, port: 80, targetPort: http-web}]}")
        + &slice("web-1", "web", "[{name: grpc, port: 9000}]", "[{addresses: [127.0.0.1]}]");
    let j = joined(&text);
    let lines = error_lines(&j);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("t.yaml (document 1): Service default/web: spec.ports[0].targetPort: "),
        "{lines:?}"
    );
    assert!(lines[0].contains("\"http-web\" (the targetPort)"), "{lines:?}");
    assert!(j.ports[0].endpoints.is_empty());
}

#[test]
fn numeric_target_port_without_a_slice_port_of_that_name_is_an_error_explaining_the_rule() {
    let text = service("web", "{ports: [{name: http, port: 80, targetPort: 8080}]}")
        + &slice("web-1", "web", "[{name: web, port: 8080}]", "[{addresses: [127.0.0.1]}]");
    let lines = error_lines(&joined(&text));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("t.yaml (document 1): Service default/web: spec.ports[0].targetPort: "),
        "{lines:?}"
    );
    assert!(lines[0].contains("matched to a service port by the port's name"), "{lines:?}");
}

#[test]
fn a_service_without_slices_or_with_portless_slices_has_no_endpoints_and_no_error() {
    let text = service("web", "{ports: [{port: 80}]}") + &slice("web-1", "web", "[]", "[]");
    let j = joined(&text);
    assert!(j.errors.is_empty(), "{:?}", error_lines(&j));
    assert!(j.ports[0].endpoints.is_empty());
    let j = joined(&service("web", "{ports: [{port: 80}]}"));
    assert!(j.errors.is_empty() && j.ports[0].endpoints.is_empty());
}

#[test]
fn duplicate_node_port_is_an_error_naming_both_services() {
    let text = service("a", "{type: NodePort, ports: [{port: 80, nodePort: 30080}]}")
        + &service("b", "{type: NodePort, ports: [{port: 81, nodePort: 30080}]}");
    let lines = error_lines(&joined(&text));
    assert_eq!(
        lines,
        [
            "t.yaml (document 2): Service default/b: spec.ports[0].nodePort: nodePort 30080/TCP is already used \
          by Service default/a (spec.ports[0].nodePort, t.yaml (document 1))"
        ]
    );
}

#[test]
fn duplicate_node_port_within_one_service_is_an_error_but_not_across_protocols() {
    let text = service(
        "dns",
        "{type: NodePort, ports: [{name: a, port: 53, protocol: UDP, nodePort: 30053}, \
          {name: b, port: 53, nodePort: 30053}, {name: c, port: 54, nodePort: 30053}]}",
    );
    let lines = error_lines(&joined(&text));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("Service default/dns: spec.ports[2].nodePort: nodePort 30053/TCP is already used by Service default/dns (spec.ports[1].nodePort"), "{lines:?}");
}

#[test]
fn a_service_defined_twice_is_an_error_and_the_first_wins() {
    let text = service("web", "{ports: [{port: 80}]}") + &service("web", "{ports: [{port: 81}]}");
    let j = joined(&text);
    assert_eq!(
        error_lines(&j),
        [
            "t.yaml (document 2): Service default/web: defined twice (first at t.yaml (document 1)); the second is ignored"
        ]
    );
    assert_eq!(j.ports.len(), 1);
    assert_eq!(j.ports[0].port, 80);
}

#[test]
fn a_slice_defined_twice_is_an_error_but_an_endpoints_of_the_same_name_is_not() {
    let one = slice("web", "web", "[{port: 80}]", "[{addresses: [127.0.0.1]}]");
    let text = service("web", "{ports: [{port: 80}]}") + &one + &one + &endpoints("web", "127.0.0.9", 80);
    let lines = error_lines(&joined(&text));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("t.yaml (document 3): EndpointSlice default/web: defined twice"),
        "{lines:?}"
    );
}

#[test]
fn endpoint_slices_take_precedence_over_endpoints_with_a_warning() {
    let text = service("web", "{ports: [{port: 80}]}")
        + &endpoints("web", "127.0.0.9", 80)
        + &slice("web-1", "web", "[{port: 8080}]", "[{addresses: [127.0.0.1]}]");
    let j = joined(&text);
    assert_eq!(addrs(&j.ports[0]), ["127.0.0.1:8080"]);
    assert_eq!(j.warnings.len(), 1);
    assert_eq!(j.warnings[0].kind, WarningKind::EndpointsShadowed);
    assert!(j.warnings[0].to_string().starts_with("t.yaml (document 2): Endpoints default/web: "));
}

#[test]
fn endpoints_alone_serve_a_selectorless_service() {
    let text = service("legacy", "{ports: [{port: 7000, targetPort: 17000}]}")
        + &endpoints("legacy", "127.0.0.1", 17000);
    assert_eq!(addrs(&joined(&text).ports[0]), ["127.0.0.1:17000"]);
}

#[test]
fn a_slice_whose_service_is_missing_is_only_a_warning() {
    let text = slice("ghost-1", "ghost", "[{port: 80}]", "[{addresses: [127.0.0.1]}]");
    let j = joined(&text);
    assert!(j.errors.is_empty() && j.ports.is_empty());
    assert_eq!(j.warnings[0].kind, WarningKind::NoSuchService(ServiceName::new("default", "ghost")));
    assert_eq!(
        j.warnings[0].to_string(),
        "t.yaml (document 1): EndpointSlice default/ghost-1: ignored: its Service default/ghost is not defined"
    );
}

#[test]
fn endpoints_are_sorted_deduplicated_and_keep_not_ready_ones() {
    let text = service("web", "{ports: [{port: 80}]}")
        + &slice(
            "web-a",
            "web",
            "[{port: 80}]",
            "[{addresses: [127.0.0.3], conditions: {ready: false}}, {addresses: [127.0.0.2], conditions: {ready: false}}]",
        )
        + &slice("web-b", "web", "[{port: 80}]", "[{addresses: [127.0.0.3]}, {addresses: [127.0.0.1]}]");
    let port = &joined(&text).ports[0];
    assert_eq!(addrs(port), ["127.0.0.1:80", "127.0.0.2:80", "127.0.0.3:80"]);
    let ready: Vec<_> = port.endpoints.iter().map(|e| e.conditions.ready).collect();
    assert_eq!(ready, [true, false, true], "the ready copy of 127.0.0.3 wins");
    let not_ready = Conditions { ready: false, serving: false, terminating: false };
    assert_eq!(port.endpoints[1].conditions, not_ready);
}

#[test]
fn output_is_sorted_by_service_port_name() {
    let text = service("zeta", "{ports: [{port: 80}]}")
        + &service("alpha", "{ports: [{name: b, port: 81}, {name: a, port: 80}]}");
    let names: Vec<_> = joined(&text).ports.iter().map(|p| p.name.to_string()).collect();
    assert_eq!(names, ["default/alpha:a", "default/alpha:b", "default/zeta"]);
}

#[test]
fn join_returns_the_same_ports_and_errors_as_join_with_warnings() {
    let text = service("web", "{ports: [{name: http, port: 80, targetPort: nope}]}")
        + &slice("web-1", "web", "[{name: grpc, port: 1}]", "[]");
    let m = manifests(&text);
    let (ports, errors) = join(&m.services, &m.slices);
    assert_eq!((ports.len(), errors.len()), (1, 1));
}

#[test]
fn health_check_node_port_clashing_with_a_node_port_or_another_health_check_is_an_error() {
    let local = |hc: u16, np: u16| {
        format!(
            "{{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: {hc}, \
             ports: [{{port: 80, nodePort: {np}}}]}}"
        )
    };
    let text = service("a", &local(32000, 30080))
        + &service("b", &local(30080, 30081))
        + &service("c", &local(32000, 30082))
        // A UDP nodePort does not clash with a (TCP) health check.
        + &service("d", "{type: NodePort, ports: [{port: 53, protocol: UDP, nodePort: 32000}]}");
    let lines = error_lines(&joined(&text));
    assert_eq!(
        lines,
        [
            "t.yaml (document 2): Service default/b: spec.healthCheckNodePort: nodePort 30080/TCP is already used \
             by Service default/a (spec.ports[0].nodePort, t.yaml (document 1))",
            "t.yaml (document 3): Service default/c: spec.healthCheckNodePort: nodePort 32000/TCP is already used \
             by Service default/a (spec.healthCheckNodePort, t.yaml (document 1))",
        ]
    );
}

#[test]
fn endpoints_of_a_family_the_service_does_not_serve_are_not_used_and_each_such_slice_is_warned_about() {
    let v6_slice = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv6\nports: [{port: 8080}]\nendpoints: [{addresses: [\"fd00::5\"]}]\n";
    let v4_slice = slice("web-v4", "web", "[{port: 8080}]", "[{addresses: [10.0.0.5]}]");
    // IPv4-only: the IPv6 slice is left out, as kube-proxy's IPv4 proxier does.
    let text = service("web", "{clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: 8080}]}")
        + &v4_slice
        + v6_slice;
    let j = joined(&text);
    assert_eq!(addrs(&j.ports[0]), ["10.0.0.5:8080"]);
    let warned: Vec<String> = j.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].contains("EndpointSlice default/web-v6")
            && warned[0].contains("its IPv6 endpoints are not used: Service default/web serves IPv4 only"),
        "{warned:?}"
    );
    // Dual-stack: both are kept (each ClusterIP then balances over its own
    // family, in the snapshot); no warning.
    let dual = "{clusterIPs: [10.96.0.1, \"fd00:96::1\"], ports: [{port: 80, targetPort: 8080}]}";
    let j = joined(&(service("web", dual) + &v4_slice + v6_slice));
    assert_eq!(addrs(&j.ports[0]), ["10.0.0.5:8080", "[fd00::5]:8080"]);
    assert!(j.warnings.is_empty(), "{:?}", j.warnings);
    // No cluster IP and no ipFamilies (an edge Service): any family.
    let j = joined(&(service("web", "{ports: [{port: 80, targetPort: 8080}]}") + &v4_slice + v6_slice));
    assert_eq!(j.ports[0].endpoints.len(), 2);
    assert!(j.ports[0].ip_families.is_empty());
    // PreferDualStack hoping for both families but given one IPv4 cluster
    // IP: IPv4 only (its one listener is IPv4), so the IPv6 endpoint would
    // sit behind an IPv4 VIP; it is not used.
    let hoping = "{ipFamilyPolicy: PreferDualStack, ipFamilies: [IPv4, IPv6], clusterIP: 10.96.0.1, \
                  ports: [{port: 80, targetPort: 8080}]}";
    let j = joined(&(service("web", hoping) + &v4_slice + v6_slice));
    assert!(j.errors.is_empty(), "{:?}", error_lines(&j));
    assert_eq!(addrs(&j.ports[0]), ["10.0.0.5:8080"]);
    assert_eq!(j.ports[0].ip_families, [model::IpFamily::V4]);
    // Without cluster IPs, ipFamilies says which families it serves.
    let named = "{ipFamilies: [IPv6], ports: [{port: 80, targetPort: 8080}]}";
    let j = joined(&(service("web", named) + &v4_slice + v6_slice));
    assert_eq!(addrs(&j.ports[0]), ["[fd00::5]:8080"]);
    assert_eq!(j.ports[0].ip_families, [model::IpFamily::V6]);
}
