//! EndpointSlice and Endpoints validation and their condition defaults.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{assert_error, manifests};
use crate::config::{Conversion, Skip, WarningKind, slice_from_k8s};
use crate::model::{self, Conditions, Name, Origin, Protocol, ServiceName, SliceKind, SlicePort};

const AT: &str = "t.yaml (document 1): EndpointSlice default/web-abc: ";

/// An IPv4 slice `default/web-abc` of Service `web` with the given
/// flow-style `ports` and `endpoints`.
fn slice_text(ports: &str, endpoints: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-abc, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n"
    )
}

fn slice(ports: &str, endpoints: &str) -> model::EndpointSlice {
    model::EndpointSlice::clone(&manifests(&slice_text(ports, endpoints)).slices[0])
}

fn bad(ports: &str, endpoints: &str, field: &str, problem: &str) {
    assert_error(&slice_text(ports, endpoints), &format!("{AT}{field}: "), problem);
}

#[test]
fn slice_belongs_to_the_labelled_service_in_its_own_namespace() {
    let text = slice_text("[{name: http, port: 8080}]", "[{addresses: [127.0.0.1]}]")
        .replace("name: web-abc,", "name: web-abc, namespace: shop,");
    let s = manifests(&text).slices.remove(0);
    assert_eq!(s.id, ServiceName::new("shop", "web-abc"));
    assert_eq!(s.service, ServiceName::new("shop", "web"));
    assert_eq!(s.kind, SliceKind::EndpointSlice);
    let port = SlicePort { name: "http".into(), port: 8080, protocol: Protocol::Tcp };
    assert_eq!(*s.ports, [port]);
}

#[test]
fn slices_with_the_same_ports_share_one_list() {
    let web = slice("[{name: http, port: 8080}]", "[]");
    let api = slice("[{name: http, port: 8080}]", "[{addresses: [127.0.0.1]}]");
    assert!(std::sync::Arc::ptr_eq(&web.ports, &api.ports), "one allocation for the two");
    let other = slice("[{name: http, port: 8081}]", "[]");
    assert_eq!(other.ports[0].port, 8081);
    assert!(!std::sync::Arc::ptr_eq(&web.ports, &other.ports));
}

#[test]
fn missing_service_name_label_is_an_error_naming_metadata_labels() {
    let text = slice_text("[]", "[]").replace("labels: {kubernetes.io/service-name: web}", "labels: {}");
    assert_error(&text, &format!("{AT}metadata.labels: "), "kubernetes.io/service-name label is required");
}

#[test]
fn conditions_default_to_ready_serving_follows_ready_terminating_false() {
    let s = slice(
        "[{port: 80}]",
        "[{addresses: [127.0.0.1]}, {addresses: [127.0.0.2], conditions: {ready: false}}, \
          {addresses: [127.0.0.3], conditions: {ready: false, serving: true, terminating: true}}]",
    );
    let conditions: Vec<_> = s.endpoints.iter().map(|e| e.conditions()).collect();
    let c = |ready, serving, terminating| Conditions { ready, serving, terminating };
    assert_eq!(conditions, [c(true, true, false), c(false, false, false), c(false, true, true)]);
}

#[test]
fn node_zone_and_hints_are_kept() {
    let s = slice(
        "[{port: 80}]",
        "[{addresses: [127.0.0.1], nodeName: node-a, zone: zone-1, \
           hints: {forZones: [{name: zone-1}], forNodes: [{name: node-a}]}}]",
    );
    let e = &s.endpoints[0];
    assert_eq!((e.node_name.as_deref(), e.zone.as_deref()), (Some("node-a"), Some("zone-1")));
    let hints = e.hints.as_deref().unwrap();
    assert_eq!(
        (&hints.zones[..], &hints.nodes[..]),
        (&[Name::from("zone-1")][..], &[Name::from("node-a")][..])
    );
}

#[test]
fn a_slice_keeps_no_spare_room_for_its_endpoints_or_ports() {
    let s = slice(
        "[{name: a, port: 80}, {name: b, port: 81}]",
        "[{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]",
    );
    // Boxed slices (their size is pinned in model::tests): no room beyond
    // their length, by their type.
    assert_eq!((s.endpoints.len(), s.ports.len()), (2, 2));
}

#[test]
fn endpoints_share_their_node_zone_and_port_names() {
    let s = slice(
        "[{name: http, port: 80}]",
        "[{addresses: [127.0.0.1], nodeName: node-a, zone: zone-1, hints: {forZones: [{name: zone-1}]}}, \
          {addresses: [127.0.0.2], nodeName: node-a, zone: zone-1}]",
    );
    let [a, b] = &s.endpoints[..] else { panic!("two endpoints: {:?}", s.endpoints) };
    let shared = |x: &Option<Name>, y: &Option<Name>| x.as_ref().unwrap().shares(y.as_ref().unwrap());
    assert!(shared(&a.node_name, &b.node_name) && shared(&a.zone, &b.zone));
    assert!(a.hints.as_ref().unwrap().zones[0].shares(a.zone.as_ref().unwrap()));
    assert!(b.hints.is_none(), "no hints, no allocation");
    assert!(s.ports[0].name.shares(&Name::interned("http")));
}

#[test]
fn fqdn_slices_are_skipped_with_a_warning() {
    let text = slice_text("[{port: 80}]", "[{addresses: [db.example.org]}]").replace("IPv4", "FQDN");
    let manifests = manifests(&text);
    assert!(manifests.slices.is_empty());
    assert_eq!(manifests.warnings[0].kind, WarningKind::Skipped(Skip::FqdnAddressType));
}

#[test]
fn unknown_address_type_is_an_error() {
    let text = slice_text("[{port: 80}]", "[]").replace("IPv4", "IPv5");
    assert_error(&text, &format!("{AT}addressType: "), "unknown value \"IPv5\"");
    let missing = slice_text("[{port: 80}]", "[]").replace("addressType: IPv4\n", "");
    assert_error(&missing, &format!("{AT}addressType: "), "is required");
}

#[test]
fn addresses_must_parse_and_match_the_address_type() {
    bad(
        "[{port: 80}]",
        "[{addresses: [127.0.0.1, '::1']}]",
        "endpoints[0].addresses[1]",
        "::1 is not an IPv4 address",
    );
    bad(
        "[{port: 80}]",
        "[{addresses: [127.0.0.256]}]",
        "endpoints[0].addresses[0]",
        "not a valid IP address",
    );
    bad("[{port: 80}]", "[{addresses: []}]", "endpoints[0].addresses", "at least one address is required");
    let mapped = slice_text("[{port: 80}]", "[{addresses: ['::ffff:10.0.0.1']}]").replace("IPv4", "IPv6");
    assert_error(&mapped, &format!("{AT}endpoints[0].addresses[0]: "), "IPv4-mapped");
    let v6 = slice_text("[{port: 80}]", "[{addresses: ['::1']}]").replace("IPv4", "IPv6");
    assert_eq!(manifests(&v6).slices[0].endpoints[0].addresses()[..], ["::1".parse::<IpAddr>().unwrap()]);
}

#[test]
fn slice_ports_need_a_port_in_range_and_a_known_protocol() {
    bad("[{name: http}]", "[]", "ports[0].port", "port is required");
    bad("[{name: http, port: null}]", "[]", "ports[0].port", "port is required");
    bad("[{name: http, port: 65536}]", "[]", "ports[0].port", "65536 is out of range 1-65535");
    bad("[{name: http, port: 80, protocol: SCTP}]", "[]", "ports[0].protocol", "SCTP is not supported");
    bad("[{name: http, port: 80, protocol: tcp}]", "[]", "ports[0].protocol", "unknown protocol");
}

#[test]
fn slice_port_names_are_unique_and_absent_means_empty() {
    bad("[{name: a, port: 80}, {name: a, port: 81}]", "[]", "ports[1].name", "duplicate port name \"a\"");
    bad("[{port: 80}, {port: 81}]", "[]", "ports[1].name", "duplicate port name \"\"");
    assert_eq!(slice("[{port: 80}]", "[]").ports[0].name, "");
}

const ENDPOINTS: &str = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: legacy}\nsubsets:\n";

#[test]
fn endpoints_become_one_slice_with_ready_and_not_ready_addresses() {
    let text = format!(
        "{ENDPOINTS}- addresses: [{{ip: 127.0.0.1, nodeName: node-a}}]\n  \
         notReadyAddresses: [{{ip: 127.0.0.2}}]\n  ports: [{{port: 9000}}]\n"
    );
    let s = manifests(&text).slices.remove(0);
    assert_eq!(
        (s.kind, &s.id, &s.service),
        (SliceKind::Endpoints { subset: 0 }, &ServiceName::new("default", "legacy"), &s.id)
    );
    assert_eq!(*s.ports, [SlicePort { name: "".into(), port: 9000, protocol: Protocol::Tcp }]);
    let ready = &s.endpoints[0];
    assert_eq!((ready.conditions(), ready.node_name.as_deref()), (Conditions::default(), Some("node-a")));
    let not_ready = Conditions { ready: false, serving: false, terminating: false };
    assert_eq!(s.endpoints[1].conditions(), not_ready);
}

#[test]
fn each_endpoints_subset_becomes_a_slice_with_its_own_ports() {
    let text = format!(
        "{ENDPOINTS}- addresses: [{{ip: 127.0.0.1}}]\n  ports: [{{port: 9000}}]\n\
         - addresses: [{{ip: 127.0.0.2}}]\n  ports: [{{port: 9001}}]\n"
    );
    let slices = manifests(&text).slices;
    let got: Vec<_> =
        slices.iter().map(|s| (s.kind, s.ports[0].port, s.endpoints[0].addresses()[0])).collect();
    assert_eq!(
        got,
        [
            (SliceKind::Endpoints { subset: 0 }, 9000, "127.0.0.1".parse().unwrap()),
            (SliceKind::Endpoints { subset: 1 }, 9001, "127.0.0.2".parse().unwrap()),
        ]
    );
}

#[test]
fn endpoints_errors_name_the_subset_list_and_port() {
    let text = format!(
        "{ENDPOINTS}- notReadyAddresses: [{{ip: 127.0.0.x}}]\n  ports: [{{port: 0, protocol: SCTP}}]\n"
    );
    let at = "t.yaml (document 1): Endpoints default/legacy: ";
    assert_error(&text, &format!("{at}subsets[0].notReadyAddresses[0].ip: "), "not a valid IP");
    assert_error(&text, &format!("{at}subsets[0].ports[0].port: "), "out of range");
    assert_error(&text, &format!("{at}subsets[0].ports[0].protocol: "), "SCTP is not supported");
}

#[test]
fn slice_from_k8s_takes_an_api_object_and_its_origin() {
    let raw: EndpointSlice =
        serde_norway::from_str(&slice_text("[{port: 80}]", "[{addresses: [127.0.0.1]}]")).unwrap();
    let Conversion::Accepted { value, warnings } = slice_from_k8s(&raw, Origin::new("api")).unwrap() else {
        panic!("skipped");
    };
    assert_eq!((value.origin.to_string().as_str(), warnings.len()), ("api", 0));
}
