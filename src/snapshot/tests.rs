//! Snapshots: routes, balancer reuse, dual stack, and what an update
//! shares with the previous snapshot.

use super::*;
use crate::listen::{Binder, ListenOptions};
use crate::model::{ClientAddr, Endpoint, EndpointAddr, Origin, Protocol, ServiceName};
use std::net::SocketAddr;
use std::time::Instant;

/// A binder on 127.0.0.1 (and `::1` with `v6`), no port range, no node
/// port addresses: what these tests and their neighbours bind with.
pub(super) fn loopback_binder(
    workers: usize,
    rules: bool,
    mode: crate::listen::ProxyPortMode,
    v6: bool,
) -> Binder {
    Binder::new(ListenOptions {
        bind_address: std::net::Ipv4Addr::LOCALHOST.into(),
        bind_address6: v6.then_some(std::net::Ipv6Addr::LOCALHOST.into()),
        proxy_port_range: None,
        nodeport_addresses: vec![],
        workers,
        redirect_rules: rules,
        proxy_port_mode: mode,
    })
}

fn port(name: &str, eps: &[u8]) -> ServicePort {
    let name = ServicePortName { service: ServiceName::new("default", name), port: "".into() };
    let mut sp = ServicePort::new(name, Origin::new("t"), Protocol::Tcp, 80);
    sp.endpoints =
        eps.iter().map(|n| Endpoint::ready(EndpointAddr(SocketAddr::from(([10, 0, 0, *n], 80))))).collect();
    sp
}

#[test]
fn source_ranges_admit_by_family_and_leave_an_ip_open_when_none_is_of_its_family() {
    let mut sp = port("lb", &[1]);
    let lb = ListenRole::LoadBalancer("10.98.0.1".parse().unwrap());
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    sp.load_balancer_source_ranges = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
    assert!(admits(lb, &sp, ip("10.1.2.3")));
    assert!(admits(lb, &sp, ip("::ffff:10.1.2.3")));
    assert!(!admits(lb, &sp, ip("192.168.1.1")));
    sp.load_balancer_source_ranges = vec!["fd00::/8".parse().unwrap()];
    assert!(admits(lb, &sp, ip("192.168.1.1")), "no IPv4 range: the IPv4 client is let in");
    assert!(!admits(lb, &sp, ip("fe80::1")));
}

fn build(
    ports: Vec<ServicePort>,
    previous: &Snapshot,
    binder: &mut Binder,
    registry: &HealthRegistry,
) -> Snapshot {
    let (listeners, errors) = binder.bind(&ports, &previous.listeners);
    assert!(errors.is_empty(), "{errors:?}");
    let (options, metrics) = (BalanceOptions::default(), Arc::new(Metrics::new(1)));
    let source = SourceOptions::default();
    let ctx = BalanceContext { options: &options, registry, metrics: &metrics, source: &source };
    Snapshot::new(previous.generation + 1, ports, listeners, previous, &ctx)
}

fn first(snap: &Snapshot, name: &str) -> EndpointAddr {
    let p = snap.ports.iter().find(|p| p.spec.name.service.name == name).expect("port");
    let client = ClientAddr(SocketAddr::from(([127, 0, 0, 9], 1)));
    let now = Instant::now();
    let b = p.balancer(Scope::Internal, IpFamily::V4);
    let i = b.next_candidate(&mut b.pick(client, now, 4), now).expect("candidate");
    b.endpoint(i).expect("endpoint")
}

/// Userspace scenarios 1, 6 and 10: an unknown listener has no route;
/// removing service foo leaves bar's rotation (and pins) where they were.
#[test]
fn removing_another_service_leaves_this_ones_rotation_untouched() {
    let registry = HealthRegistry::default();
    let mut binder = loopback_binder(1, false, crate::listen::ProxyPortMode::PerService, false);
    let s1 = build(
        vec![port("bar", &[1, 2, 3]), port("foo", &[4, 5])],
        &Snapshot::default(),
        &mut binder,
        &registry,
    );
    let rotation: Vec<_> = (0..3).map(|_| first(&s1, "bar")).collect();
    let next_before = first(&s1, "bar");
    assert_eq!(next_before, rotation[0]);
    let s2 = build(vec![port("bar", &[1, 2, 3])], &s1, &mut binder, &registry);
    let internal = |s: &Snapshot| Arc::clone(s.ports[0].balancer(Scope::Internal, IpFamily::V4));
    assert!(Arc::ptr_eq(&internal(&s1), &internal(&s2)), "bar keeps its balancer");
    assert_eq!(first(&s2, "bar"), rotation[1], "bar carries on where it left off");
    assert!(s2.route(ListenerId(u64::MAX)).is_none(), "an unknown listener has no route");
    let foo_listener = s1.listeners.iter().find(|l| l.key.port.service.name == "foo").expect("foo listener");
    assert!(s2.route(foo_listener.id).is_none(), "removed foo has no route any more");
}

/// A dual-stack service port gets an IPv6 proxy port on its IPv4 twin's
/// number, and each listener balances over its own family's endpoints.
#[test]
fn a_dual_stack_port_has_an_ipv6_twin_on_the_same_number_balancing_ipv6_endpoints_only() {
    let registry = HealthRegistry::default();
    let mut binder = loopback_binder(1, true, crate::listen::ProxyPortMode::PerService, true);
    let mut dual = port("dual", &[1, 2]);
    dual.cluster_ips = vec!["10.96.0.1".parse().unwrap(), "fd00:96::1".parse().unwrap()];
    dual.endpoints.push(Endpoint::ready(EndpointAddr("[fd00::7]:80".parse().unwrap())));
    let snap = build(vec![dual], &Snapshot::default(), &mut binder, &registry);
    let role = |r| snap.listeners.iter().find(|l| l.key.role == r).expect("listener");
    let (v4, v6) = (role(ListenRole::Proxy), role(ListenRole::Proxy6));
    assert_eq!((v6.addr.ip(), v6.addr.port()), ("::1".parse().unwrap(), v4.addr.port()));
    let endpoints = |id| -> Vec<_> { snap.route(id).expect("route").balancer.endpoints().collect() };
    assert_eq!(endpoints(v6.id), [EndpointAddr("[fd00::7]:80".parse().unwrap())]);
    assert_eq!(endpoints(v4.id).len(), 2, "the IPv4 ClusterIP's listener: IPv4 endpoints only");
    assert!(endpoints(v4.id).iter().all(|e| e.0.is_ipv4()));
}

/// An update builds only the ports it changes: the others are the same
/// `Arc` (readers tell changes by pointer), the listener list is shared
/// while none comes or goes, and the changed listeners are named.
#[test]
fn an_update_keeps_unchanged_ports_pointer_equal_and_names_changed_listeners() {
    let registry = HealthRegistry::default();
    let mut binder = loopback_binder(1, false, crate::listen::ProxyPortMode::PerService, false);
    let s1 = build(
        vec![port("a", &[1]), port("b", &[2]), port("c", &[3])],
        &Snapshot::default(),
        &mut binder,
        &registry,
    );
    let (options, metrics, source) =
        (BalanceOptions::default(), Arc::new(Metrics::new(1)), SourceOptions::default());
    let ctx = BalanceContext { options: &options, registry: &registry, metrics: &metrics, source: &source };
    let of = |s: &Snapshot, name: &str| -> Vec<Arc<Listener>> {
        s.listeners.iter().filter(|l| l.key.port.service.name == name).cloned().collect()
    };

    // b's endpoints change: its listener is kept, a and c are untouched.
    let b = of(&s1, "b");
    let update = PortUpdate {
        set: vec![Arc::new(port("b", &[2, 4]))],
        removed: &[],
        listeners: b.clone(),
        old_listeners: b.iter().map(|l| l.id).collect(),
    };
    let s2 = Snapshot::update(&s1, 2, update, &ctx);
    assert!(Arc::ptr_eq(&s1.ports[0], &s2.ports[0]) && Arc::ptr_eq(&s1.ports[2], &s2.ports[2]));
    assert!(!Arc::ptr_eq(&s1.ports[1], &s2.ports[1]));
    assert_eq!(s2.ports[1].spec.endpoints.len(), 2);
    assert!(Arc::ptr_eq(&s1.listeners, &s2.listeners), "no listener came or went");
    assert_eq!(s2.changed_listeners, [b[0].id]);
    let route = s2.route(b[0].id).expect("b's route");
    assert!(Arc::ptr_eq(route.port, &s2.ports[1]), "b's listener routes to its new state");
    assert!(!s2.full);

    // c goes: its listener leaves the list and its route goes.
    let c = of(&s2, "c");
    let removed = [s2.ports[2].spec.name.clone()];
    let update = PortUpdate {
        set: vec![],
        removed: &removed,
        listeners: vec![],
        old_listeners: c.iter().map(|l| l.id).collect(),
    };
    let s3 = Snapshot::update(&s2, 3, update, &ctx);
    assert_eq!(s3.ports.len(), 2);
    assert!(Arc::ptr_eq(&s2.ports[0], &s3.ports[0]) && Arc::ptr_eq(&s2.ports[1], &s3.ports[1]));
    assert_eq!(s3.listeners.len(), 2);
    assert!(s3.route(c[0].id).is_none() && s3.listener(c[0].id).is_none());
    assert_eq!(s3.changed_listeners, [c[0].id]);
}
