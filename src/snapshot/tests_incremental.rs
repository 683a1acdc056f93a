//! Incremental snapshots against whole ones: after any sequence of random
//! changes, a snapshot built change by change (`Snapshot::update`) holds
//! the same ports in the same order, the same destinations (with every
//! claimant of a clashing address), the same routes and the same
//! health-checked ports as one built whole
//! from the same service ports, and it shares what it did not change.

use super::*;
use crate::listen::ProxyPortMode;
use crate::model::{Endpoint, EndpointAddr, Origin, Protocol, ServiceName};
use crate::snapshot::tests::loopback_binder;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// xorshift, seeded from the process id (printed, to replay a failure).
fn rng() -> impl FnMut(u64) -> u64 {
    crate::test_rng::xorshift(0x9e37_79b9_7f4a_7c15)
}

/// A random service port named `s<i>`: few addresses to pick from, so two
/// ports often claim the same one; 127.0.0.1 as an external IP is local
/// (left out of the destinations); one in eight is UDP (left out too).
fn random_port(i: u64, next: &mut impl FnMut(u64) -> u64) -> ServicePort {
    let name = ServicePortName { service: ServiceName::new("default", format!("s{i:03}")), port: "".into() };
    let protocol = if next(8) == 0 { Protocol::Udp } else { Protocol::Tcp };
    let mut sp = ServicePort::new(name, Origin::new("t"), protocol, 80 + next(2) as u16);
    let ip = |s: String| s.parse::<IpAddr>().expect("ip");
    sp.cluster_ips = vec![ip(format!("10.96.0.{}", next(6)))];
    if next(4) == 0 {
        sp.cluster_ips.push(ip(format!("fd00:96::{}", next(3))));
    }
    sp.external_ips = (0..next(3)).map(|_| ip(format!("10.97.0.{}", next(3)))).collect();
    if next(4) == 0 {
        sp.external_ips.push(ip("127.0.0.1".into()));
    }
    sp.load_balancer_ips = (0..next(2)).map(|_| ip(format!("10.98.0.{}", next(2)))).collect();
    if next(4) == 0 {
        sp.health_check_node_port = Some(30_000 + next(3) as u16);
    }
    sp.endpoints = (0..next(4))
        .map(|e| Endpoint::ready(EndpointAddr(SocketAddr::from(([10, 1, i as u8, e as u8], 8080)))))
        .collect();
    sp
}

#[test]
fn random_changes_give_the_ports_destinations_and_routes_of_the_same_state_built_whole() {
    const NAMES: u64 = 60;
    const STEPS: usize = 150;
    let mut next = rng();
    let mut binder = loopback_binder(1, true, ProxyPortMode::Shared, false);
    let (options, registry, metrics, source) = (
        BalanceOptions::default(),
        HealthRegistry::default(),
        Arc::new(Metrics::new(1)),
        SourceOptions::default(),
    );
    let ctx = BalanceContext { options: &options, registry: &registry, metrics: &metrics, source: &source };
    let mut state: BTreeMap<ServicePortName, ServicePort> = BTreeMap::new();
    for i in 0..NAMES / 2 {
        let sp = random_port(i * 2, &mut next);
        state.insert(sp.name.clone(), sp);
    }
    let first: Vec<ServicePort> = state.values().cloned().collect();
    // Only the shared proxy port is bound (for one plain port): the
    // listeners of the random ones do not matter here.
    let mut plain = random_port(NAMES, &mut next);
    (plain.protocol, plain.external_ips, plain.load_balancer_ips) = (Protocol::Tcp, vec![], vec![]);
    let (shared, errors) = binder.bind(&[plain], &[]);
    assert!(errors.iter().all(|e| e.is_benign()), "{errors:?}");
    assert!(shared.iter().any(|l| l.key.is_shared()), "a shared proxy port: {shared:?}");
    let mut snap = Snapshot::new(1, first, shared.clone(), &Snapshot::default(), &ctx);
    assert!(snap.ports.len() > 4, "several chunks from the start");
    for step in 0..STEPS {
        // One to three ports set or removed, now and then many at once.
        let count = if next(20) == 0 { 25 } else { 1 + next(3) };
        // The last thing done to each name: set (Some) or removed (None).
        let mut last: BTreeMap<ServicePortName, Option<ServicePort>> = BTreeMap::new();
        for _ in 0..count {
            let sp = random_port(next(NAMES), &mut next);
            let gone = next(3) == 0;
            match gone {
                true => state.remove(&sp.name),
                false => state.insert(sp.name.clone(), sp.clone()),
            };
            last.insert(sp.name.clone(), (!gone).then_some(sp));
        }
        let removed: Vec<ServicePortName> =
            last.iter().filter(|(_, sp)| sp.is_none()).map(|(n, _)| n.clone()).collect();
        let set: BTreeMap<ServicePortName, ServicePort> =
            last.into_iter().filter_map(|(n, sp)| Some((n, sp?))).collect();
        let changed: Vec<ServicePortName> = set.keys().chain(&removed).cloned().collect();
        let update = PortUpdate {
            set: set.into_values().map(Arc::new).collect(),
            removed: &removed,
            listeners: vec![],
            old_listeners: vec![],
        };
        let updated = Snapshot::update(&snap, snap.generation + 1, update, &ctx);
        let whole =
            Snapshot::new(0, state.values().cloned().collect(), shared.clone(), &Snapshot::default(), &ctx);

        let names =
            |s: &Snapshot| -> Vec<String> { s.ports.iter().map(|p| p.spec.name.to_string()).collect() };
        assert_eq!(names(&updated), names(&whole), "step {step}: the ports, in name order");
        let specs =
            |s: &Snapshot| -> Vec<String> { s.ports.iter().map(|p| format!("{:?}", p.spec)).collect() };
        assert!(specs(&updated) == specs(&whole), "step {step}: the same specs");
        assert_eq!(updated.ports.len(), state.len(), "step {step}");
        updated.ports.check();
        for name in state.keys() {
            assert!(updated.port(name).is_some_and(|p| p.spec.name == *name), "step {step}: {name} by name");
        }
        for name in &removed {
            assert!(updated.port(name).is_none(), "step {step}: {name} is gone");
        }
        let unchanged = snap.ports.iter().filter(|p| !changed.contains(&p.spec.name));
        for p in unchanged {
            let kept = updated.port(&p.spec.name).expect("kept port");
            assert!(Arc::ptr_eq(p, kept), "step {step}: {} keeps its state", p.spec.name);
        }
        assert_eq!(updated.destinations.entries(), whole.destinations.entries(), "step {step}: destinations");
        for (key, _) in whole.destinations.entries() {
            let to = SocketAddr::new(key.1, key.2);
            let name = |s: &Snapshot| s.route_to(key.0, to).map(|(r, role)| (r.port.spec.name.clone(), role));
            assert_eq!(name(&updated), name(&whole), "step {step}: route to {to}");
            let (route, _) = updated.route_to(key.0, to).expect("a route");
            let port = updated.port(&route.port.spec.name).expect("port");
            assert!(Arc::ptr_eq(route.port, port), "step {step}: the current state of the port");
        }
        assert_eq!(updated.shared, whole.shared);
        let checked =
            |s: &Snapshot| -> Vec<String> { s.health_checked().map(|p| format!("{:?}", p.spec)).collect() };
        assert!(checked(&updated) == checked(&whole), "step {step}: the health-checked ports");
        let walked: Vec<String> = whole
            .ports
            .iter()
            .filter(|p| p.spec.health_check_node_port.is_some())
            .map(|p| format!("{:?}", p.spec))
            .collect();
        assert!(checked(&whole) == walked, "step {step}: every health-checked port, in name order");
        updated.health_checked.check();
        for p in updated.health_checked() {
            assert!(Arc::ptr_eq(p, updated.port(&p.spec.name).expect("port")), "step {step}: current state");
        }
        snap = updated;
    }
    assert!(snap.ports.chunk_count() > 1);
}

#[test]
fn a_one_port_change_copies_one_chunk_of_ports_and_shares_the_rest() {
    let mut next = rng();
    let (options, registry, metrics, source) = (
        BalanceOptions::default(),
        HealthRegistry::default(),
        Arc::new(Metrics::new(1)),
        SourceOptions::default(),
    );
    let ctx = BalanceContext { options: &options, registry: &registry, metrics: &metrics, source: &source };
    let ports: Vec<ServicePort> = (0..100).map(|i| random_port(i, &mut next)).collect();
    let s1 = Snapshot::new(1, ports.clone(), vec![], &Snapshot::default(), &ctx);
    let mut changed = ports[37].clone();
    changed.endpoints.clear();
    let update =
        PortUpdate { set: vec![Arc::new(changed)], removed: &[], listeners: vec![], old_listeners: vec![] };
    let s2 = Snapshot::update(&s1, 2, update, &ctx);
    assert_eq!(s2.ports.chunk_count(), s1.ports.chunk_count());
    assert_eq!(s2.ports.shared_chunks(&s1.ports), s1.ports.chunk_count() - 1, "one chunk copied");
    assert!(s2.ports[37].spec.endpoints.is_empty());
}

#[test]
fn a_health_checked_port_change_copies_one_chunk_of_the_health_checked_ports() {
    let mut next = rng();
    let (options, registry, metrics, source) = (
        BalanceOptions::default(),
        HealthRegistry::default(),
        Arc::new(Metrics::new(1)),
        SourceOptions::default(),
    );
    let ctx = BalanceContext { options: &options, registry: &registry, metrics: &metrics, source: &source };
    let mut ports: Vec<ServicePort> = (0..100).map(|i| random_port(i, &mut next)).collect();
    for (i, p) in ports.iter_mut().enumerate() {
        p.health_check_node_port = (i % 10 != 0).then_some(30_000 + i as u16);
    }
    let s1 = Snapshot::new(1, ports.clone(), vec![], &Snapshot::default(), &ctx);
    let chunks = s1.health_checked.chunk_count();
    assert!(chunks > 2 && s1.health_checked.len() == 90);
    let update = |s: &Snapshot, generation, set: ServicePort| {
        let set = vec![Arc::new(set)];
        Snapshot::update(
            s,
            generation,
            PortUpdate { set, removed: &[], listeners: vec![], old_listeners: vec![] },
            &ctx,
        )
    };
    // A health-checked port changes: one chunk copied.
    let mut changed = ports[37].clone();
    changed.endpoints.clear();
    let s2 = update(&s1, 2, changed);
    assert_eq!(s2.health_checked.shared_chunks(&s1.health_checked), chunks - 1, "one chunk copied");
    assert!(s2.health_checked().any(|p| p.spec.name == ports[37].name && p.spec.endpoints.is_empty()));
    // A port without one changes: every chunk shared.
    let mut other = ports[40].clone();
    other.endpoints.clear();
    let s3 = update(&s2, 3, other);
    assert_eq!(s3.health_checked.shared_chunks(&s2.health_checked), chunks, "nothing copied");
    // A port loses its healthCheckNodePort: it goes, one chunk copied.
    let mut unchecked = ports[55].clone();
    unchecked.health_check_node_port = None;
    let s4 = update(&s3, 4, unchecked);
    assert_eq!(s4.health_checked.len(), 89);
    assert!(s4.health_checked.shared_chunks(&s3.health_checked) >= chunks - 1, "one chunk copied");
    assert!(s4.health_checked().all(|p| p.spec.name != ports[55].name));
    s4.health_checked.check();
}
