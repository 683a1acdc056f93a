//! The model's compact representations: origins print as the text they
//! replaced, and the sizes of the types held hundreds of thousands of times
//! are pinned, so that a field that makes them grow is a decision, not an
//! accident. (Before the shared names: `SliceEndpoint` 128 bytes and
//! `Endpoint` 136, plus a heap allocation for each address list, name, zone
//! and hint.)

use std::mem::size_of;
use std::net::IpAddr;

use std::sync::Arc;

use super::{
    Addresses, Endpoint, EndpointSlice, Hints, Name, Origin, Placement, Protocol, Service, ServiceExtras,
    ServiceName, ServicePort, ServicePortName, ServiceSettings, SliceEndpoint, SliceKind,
};

#[test]
fn origins_print_as_the_file_document_and_item() {
    let file = Name::interned("examples/web.yaml");
    assert_eq!(Origin::document(file.clone(), 2).to_string(), "examples/web.yaml (document 2)");
    assert_eq!(Origin::item(file.clone(), 2, 0).to_string(), "examples/web.yaml (document 2, items[0])");
    assert_eq!(Origin::item(file.clone(), 1, 17).to_string(), "examples/web.yaml (document 1, items[17])");
    assert_eq!(Origin::new("kube-apiserver").to_string(), "kube-apiserver");
    assert_eq!(
        serde_json::to_string(&Origin::document(file.clone(), 3)).unwrap(),
        r#""examples/web.yaml (document 3)""#
    );
    assert!(Origin::document(file.clone(), 1).place().shares(&file), "the place is shared, not copied");
}

#[test]
fn addresses_hold_one_inline_and_any_other_count_boxed() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let one = Addresses::from(vec![ip("10.0.0.1")]);
    assert!(matches!(one, Addresses::One(_)));
    assert_eq!(one.as_slice(), [ip("10.0.0.1")]);
    let two = Addresses::from(vec![ip("10.0.0.1"), ip("10.0.0.2")]);
    assert_eq!(two.iter().copied().collect::<Vec<_>>(), [ip("10.0.0.1"), ip("10.0.0.2")]);
    assert!(Addresses::from(Vec::new()).is_empty());
    assert_eq!(serde_json::to_string(&one).unwrap(), r#"["10.0.0.1"]"#);
}

#[test]
fn endpoints_without_hints_carry_no_hint_allocation() {
    assert_eq!(Hints::new(Vec::new(), Vec::new()), None);
    let hints = Hints::new(vec!["z1".into()], Vec::new()).unwrap();
    let mut e = Endpoint::ready(super::EndpointAddr("10.0.0.1:80".parse().unwrap()));
    assert_eq!((e.hints_zones(), e.hints_nodes()), (&[][..], &[][..]));
    e.hints = Some(hints);
    assert_eq!((e.hints_zones(), e.hints_nodes()), (&[Name::from("z1")][..], &[][..]));
}

#[test]
fn names_are_one_shared_pointer_each() {
    assert_eq!(size_of::<Name>(), 16);
    assert_eq!(size_of::<Option<Name>>(), 16);
    assert_eq!(size_of::<ServiceName>(), 32);
    assert_eq!(size_of::<ServicePortName>(), 48);
}

#[test]
fn origin_is_no_larger_than_the_string_it_replaced() {
    assert_eq!(size_of::<Origin>(), 24);
}

#[test]
fn endpoints_keep_one_address_inline_and_node_zone_hints_behind_one_pointer() {
    // Node, zone and hints inline were 40 bytes: 72 and 80 bytes each. A
    // slice endpoint's address list of its own was another 8 (40 bytes).
    assert_eq!(size_of::<Addresses>(), 24);
    assert_eq!(size_of::<SliceEndpoint>(), 32);
    assert_eq!(size_of::<Endpoint>(), 48);
}

#[test]
fn an_endpoint_without_node_zone_or_hints_shares_the_one_empty_placement() {
    let e = Endpoint::ready(super::EndpointAddr("10.0.0.1:80".parse().unwrap()));
    assert!(Arc::ptr_eq(&e.place, &Placement::none()));
    assert!(Arc::ptr_eq(&Placement::default().shared(), &Placement::none()));
    let mut on_node = e.clone();
    on_node.node_name = Some(Name::from("n1"));
    assert!(!Arc::ptr_eq(&on_node.place, &Placement::none()), "a write copies the shared value");
    assert_eq!((e.node_name.as_deref(), on_node.node_name.as_deref()), (None, Some("n1")));
    assert_eq!(Placement::none().node_name, None);
}

#[test]
fn a_service_and_its_ports_share_one_copy_of_its_settings() {
    // Each held its own copy: a `Service` was 256 bytes, a `ServicePort` 280,
    // and each port two more allocations (cluster IPs, families); then a
    // `ServicePort` 120, its `Option<u16>` nodePort 4 bytes.
    // A Service points to one shared copy of its port list (it was 96
    // bytes and a 40-byte allocation for a list of one: with its reference
    // counts, 112 + 40 bytes of heap), and keeps its PROXY protocol with
    // its settings: 96 bytes of heap.
    assert_eq!(size_of::<Service>(), 80);
    assert_eq!(size_of::<ServicePort>(), 112);
}

#[test]
fn settings_almost_every_service_leaves_empty_are_one_shared_pointer() {
    // External and load-balancer addresses, source ranges and annotations
    // were 96 bytes of empty lists in each Service's settings; affinity,
    // the health-check node port and a list of families another 48 (88
    // bytes: with the reference counts, a 112-byte allocation, now 56).
    assert_eq!(size_of::<ServiceSettings>(), 40);
    let none = ServiceExtras::default().shared();
    assert!(Arc::ptr_eq(&none, &ServiceExtras::none()), "no allocation for a Service without any");
    let some = ServiceExtras { external_ips: vec!["192.0.2.1".parse().unwrap()], ..ServiceExtras::default() };
    assert!(!Arc::ptr_eq(&some.shared(), &ServiceExtras::none()));
}

#[test]
fn settings_serialize_as_one_flat_list_in_their_old_order() {
    let name = ServicePortName { service: ServiceName::new("default", "web"), port: Name::from("http") };
    let mut port = ServicePort::new(name, Origin::new("test"), Protocol::Tcp, 80);
    port.affinity = super::Affinity::ClientIp { timeout: std::time::Duration::from_secs(60) };
    port.health_check_node_port = Some(32000);
    port.ip_families = [super::IpFamily::V4].into_iter().collect();
    // What the derived serialization printed when all were fields of the
    // settings, in this order.
    let settings = concat!(
        r#""cluster_ips":[],"ip_families":["V4"],"external_ips":[],"load_balancer_ips":[],"#,
        r#""load_balancer_source_ranges":[],"ringport_annotations":[],"#,
        r#""affinity":{"ClientIp":{"timeout":{"secs":60,"nanos":0}}},"external_policy":"Cluster","#,
        r#""internal_policy":"Cluster","distribution":"Any","scheduler":null,"source_ip":null,"#,
        r#""health_check_node_port":32000,"#,
    );
    let json = serde_json::to_string(&port).unwrap();
    assert!(json.contains(settings), "{json}");
}

#[test]
fn a_setting_written_through_a_holder_changes_that_holder_only() {
    let name = ServicePortName { service: ServiceName::new("default", "web"), port: Name::from("http") };
    let mut port = ServicePort::new(name, Origin::new("test"), Protocol::Tcp, 80);
    port.cluster_ips = vec!["10.96.0.1".parse().unwrap()];
    let mut other = port.clone();
    assert!(Arc::ptr_eq(&port.settings, &other.settings), "a clone shares the settings");
    other.external_ips.push("192.0.2.1".parse().unwrap());
    assert!(port.external_ips.is_empty(), "the write copied the shared settings first");
    assert!(ServiceExtras::none().external_ips.is_empty(), "and the shared empty extras");
    assert_eq!(other.external_ips, ["192.0.2.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(other.cluster_ips, port.cluster_ips);
}

#[test]
fn a_slice_holds_its_lists_at_their_length_and_its_kind_in_8_bytes() {
    // Two `Vec`s and a `usize` subset index: 168 bytes.
    assert_eq!(size_of::<SliceKind>(), 8);
    assert_eq!(size_of::<EndpointSlice>(), 144);
}

/// The Service as it was laid out before its fields moved (settings out of
/// line, extras out of line, PROXY protocol last), with derived `Debug` and
/// serialization: what a Service must still print as.
mod old {
    use std::net::IpAddr;

    use ipnet::IpNet;
    use serde::Serialize;

    use crate::model::{
        Affinity, IpFamily, Origin, ProxyProtocol, Scheduler, ServiceName, ServicePortSpec, SourceIp,
        TrafficDistribution, TrafficPolicy,
    };

    #[derive(Debug, Serialize)]
    pub struct ServiceExtras {
        pub external_ips: Vec<IpAddr>,
        pub load_balancer_ips: Vec<IpAddr>,
        pub load_balancer_source_ranges: Vec<IpNet>,
        pub ringport_annotations: Vec<(String, String)>,
    }

    #[derive(Debug, Serialize)]
    pub struct ServiceSettings {
        pub cluster_ips: Vec<IpAddr>,
        pub ip_families: Vec<IpFamily>,
        #[serde(flatten)]
        pub extras: ServiceExtras,
        pub affinity: Affinity,
        pub external_policy: TrafficPolicy,
        pub internal_policy: TrafficPolicy,
        pub distribution: TrafficDistribution,
        pub scheduler: Option<Scheduler>,
        pub source_ip: Option<SourceIp>,
        pub health_check_node_port: Option<u16>,
    }

    #[derive(Debug, Serialize)]
    pub struct Service {
        pub name: ServiceName,
        pub origin: Origin,
        #[serde(flatten)]
        pub settings: ServiceSettings,
        pub ports: Vec<ServicePortSpec>,
        pub proxy_protocol: ProxyProtocol,
    }
}

#[test]
fn a_service_prints_and_serializes_as_it_did_before_its_fields_moved() {
    use super::{
        Affinity, IpFamily, ProxyProtocol, ProxyVersion, Scheduler, ServicePortSpec, SourceIp, TargetPort,
        TrafficDistribution, TrafficPolicy,
    };
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let port = ServicePortSpec {
        name: Name::from("http"),
        protocol: Protocol::Tcp,
        port: 80,
        target_port: TargetPort::Name(Name::from("web")),
        node_port: Some(30080),
    };
    let affinity = Affinity::ClientIp { timeout: std::time::Duration::from_secs(60) };
    let proxy_protocol = ProxyProtocol { send: Some(ProxyVersion::V2), accept: None };
    let annotations = vec![("scheduler".to_owned(), "lc".to_owned())];
    let ranges = vec!["10.0.0.0/8".parse().unwrap()];
    let service = Service {
        name: ServiceName::new("default", "web"),
        origin: Origin::document(Name::interned("t.yaml"), 3),
        settings: Arc::new(ServiceSettings {
            cluster_ips: vec![ip("10.96.0.1"), ip("fd00::1")],
            ip_families: [IpFamily::V4, IpFamily::V6].into_iter().collect(),
            extras: Arc::new(ServiceExtras {
                external_ips: vec![ip("192.0.2.1")],
                load_balancer_ips: vec![ip("192.0.2.2")],
                load_balancer_source_ranges: ranges.clone(),
                ringport_annotations: annotations.clone(),
                affinity,
                health_check_node_port: Some(32000),
            }),
            external_policy: TrafficPolicy::Local,
            internal_policy: TrafficPolicy::Cluster,
            distribution: TrafficDistribution::PreferSameZone,
            scheduler: Some(Scheduler::Lc),
            source_ip: Some(SourceIp::Proxy),
            proxy_protocol,
        }),
        ports: vec![port.clone()].into(),
    };
    let before = old::Service {
        name: ServiceName::new("default", "web"),
        origin: Origin::document(Name::interned("t.yaml"), 3),
        settings: old::ServiceSettings {
            cluster_ips: vec![ip("10.96.0.1"), ip("fd00::1")],
            ip_families: vec![IpFamily::V4, IpFamily::V6],
            extras: old::ServiceExtras {
                external_ips: vec![ip("192.0.2.1")],
                load_balancer_ips: vec![ip("192.0.2.2")],
                load_balancer_source_ranges: ranges,
                ringport_annotations: annotations,
            },
            affinity,
            external_policy: TrafficPolicy::Local,
            internal_policy: TrafficPolicy::Cluster,
            distribution: TrafficDistribution::PreferSameZone,
            scheduler: Some(Scheduler::Lc),
            source_ip: Some(SourceIp::Proxy),
            health_check_node_port: Some(32000),
        },
        ports: vec![port],
        proxy_protocol,
    };
    assert_eq!(format!("{service:?}"), format!("{before:?}"));
    assert_eq!(format!("{service:#?}"), format!("{before:#?}"));
    assert_eq!(serde_json::to_string(&service).unwrap(), serde_json::to_string(&before).unwrap());
}
