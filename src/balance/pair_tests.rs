//! [`Balancer::build_pair`]: when a service port's internal and external
//! traffic share one balancer, and how a pair splits and rejoins.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::eligible::Locality;
use super::health::HealthRegistry;
use super::{BalanceOptions, Balancer};
use crate::model::{
    Affinity, ClientAddr, Conditions, Endpoint, EndpointAddr, Origin, Protocol, ServiceName, ServicePort,
    ServicePortName, TrafficPolicy,
};

fn ep(n: u8) -> EndpointAddr {
    EndpointAddr(SocketAddr::from(([10, 0, 0, n], 80)))
}

fn client(n: u8) -> ClientAddr {
    ClientAddr(SocketAddr::from(([127, 0, 1, n], 40_000)))
}

/// A port with endpoints `1..=n`; the odd ones on this node (`here`).
fn port(n: u8, external_policy: TrafficPolicy, affinity: Affinity) -> ServicePort {
    let name = ServicePortName { service: ServiceName::new("default", "s"), port: String::new() };
    let mut sp = ServicePort::new(name, Origin("t".into()), Protocol::Tcp, 80);
    sp.external_policy = external_policy;
    sp.affinity = affinity;
    sp.endpoints = (1..=n)
        .map(|i| Endpoint {
            node_name: Some(if i % 2 == 1 { "here" } else { "there" }.to_owned()),
            conditions: Conditions::default(),
            ..Endpoint::ready(ep(i))
        })
        .collect();
    sp
}

fn options() -> BalanceOptions {
    BalanceOptions { locality: Locality { node_name: Some("here".into()), zone: None }, ..Default::default() }
}

fn sticky() -> Affinity {
    Affinity::ClientIp { timeout: Affinity::DEFAULT_TIMEOUT }
}

#[test]
fn internal_and_external_traffic_share_one_balancer_when_their_inputs_are_equal() {
    let (opts, registry) = (options(), HealthRegistry::default());
    let [internal, external] =
        Balancer::build_pair(&port(3, TrafficPolicy::Cluster, sticky()), &opts, &registry, None);
    assert!(Arc::ptr_eq(&internal, &external), "both policies Cluster: one balancer");
    // One rotation and one pin table: a client pinned through one scope is
    // pinned through the other.
    let now = Instant::now();
    let i = internal.next_candidate(&mut internal.pick(client(1), now, 4), now).expect("a candidate");
    internal.connected(client(1), i, now);
    assert_eq!(external.pin(client(1).0.ip(), now), internal.endpoint(i));
}

#[test]
fn a_local_external_policy_gets_a_balancer_of_its_own() {
    let (opts, registry) = (options(), HealthRegistry::default());
    let [internal, external] =
        Balancer::build_pair(&port(4, TrafficPolicy::Local, Affinity::None), &opts, &registry, None);
    assert!(!Arc::ptr_eq(&internal, &external), "the policies differ: two balancers");
    let mut local: Vec<EndpointAddr> = external.endpoints().collect();
    local.sort();
    assert_eq!(local, [ep(1), ep(3)], "external traffic stays on this node");
    assert_eq!(internal.endpoints().count(), 4);
}

#[test]
fn a_pair_that_splits_keeps_the_internal_balancer_and_copies_the_pins() {
    let (opts, registry) = (options(), HealthRegistry::default());
    let now = Instant::now();
    let shared = Balancer::build_pair(&port(3, TrafficPolicy::Cluster, sticky()), &opts, &registry, None);
    // Pin two clients, then check both after the split.
    let first = shared[0].next_candidate(&mut shared[0].pick(client(1), now, 4), now).expect("a candidate");
    shared[0].connected(client(1), first, now);
    shared[0].connected(client(2), 0, now);
    let pinned = |b: &Balancer, c: u8| b.pin(client(c).0.ip(), now);
    let (pin1, pin2) = (pinned(&shared[0], 1), pinned(&shared[0], 2));
    assert!(pin1.is_some() && pin2.is_some());

    let split =
        Balancer::build_pair(&port(3, TrafficPolicy::Local, sticky()), &opts, &registry, Some(&shared));
    assert!(Arc::ptr_eq(&split[0], &shared[0]), "internal inputs unchanged: the same balancer");
    assert!(!Arc::ptr_eq(&split[0], &split[1]));
    let local = |p: Option<EndpointAddr>| p.filter(|e| [ep(1), ep(3)].contains(e));
    assert_eq!(pinned(&split[1], 1), local(pin1), "external keeps the pins to endpoints it still has");
    assert_eq!(pinned(&split[0], 1), pin1, "internal keeps all of its pins");
    assert_eq!(pinned(&split[0], 2), pin2);
    // Their tables are apart now: a repin through one leaves the other.
    split[1].connected(client(1), 0, now);
    let moved = split[1].endpoint(0);
    assert_eq!(pinned(&split[1], 1), moved);
    if moved != pin1 {
        assert_eq!(pinned(&split[0], 1), pin1, "the internal pin stays");
    }

    let rejoined =
        Balancer::build_pair(&port(3, TrafficPolicy::Cluster, sticky()), &opts, &registry, Some(&split));
    assert!(Arc::ptr_eq(&rejoined[0], &split[0]), "internal unchanged again");
    assert!(Arc::ptr_eq(&rejoined[0], &rejoined[1]), "equal inputs again: one balancer");
}

#[test]
fn a_large_endpoint_set_finds_its_pins_through_the_index() {
    let (opts, registry) = (options(), HealthRegistry::default());
    let now = Instant::now();
    let [b, _] = Balancer::build_pair(&port(40, TrafficPolicy::Cluster, sticky()), &opts, &registry, None);
    assert!(b.index.is_some(), "40 endpoints are indexed");
    let first = b.next_candidate(&mut b.pick(client(9), now, 4), now).expect("a candidate");
    b.connected(client(9), first, now);
    for _ in 0..20 {
        assert_eq!(b.next_candidate(&mut b.pick(client(9), now, 4), now), Some(first), "the pin holds");
    }
    let [small, _] = Balancer::build_pair(&port(3, TrafficPolicy::Cluster, sticky()), &opts, &registry, None);
    assert!(small.index.is_none(), "3 endpoints are scanned");
}
