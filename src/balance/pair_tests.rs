//! [`Balancer::build_pair`]: when a service port's internal and external
//! traffic share one balancer, and how a pair splits and rejoins.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::eligible::Locality;
use super::health::HealthRegistry;
use super::{BalanceOptions, Balancer};
use crate::model::{
    Affinity, ClientAddr, Conditions, Endpoint, EndpointAddr, Origin, Placement, Protocol, ServiceName,
    ServicePort, ServicePortName, TrafficPolicy,
};

fn ep(n: u8) -> EndpointAddr {
    EndpointAddr(SocketAddr::from(([10, 0, 0, n], 80)))
}

fn client(n: u8) -> ClientAddr {
    ClientAddr(SocketAddr::from(([127, 0, 1, n], 40_000)))
}

/// A port with endpoints `1..=n`; the odd ones on this node (`here`).
fn port(n: u8, external_policy: TrafficPolicy, affinity: Affinity) -> ServicePort {
    let name = ServicePortName { service: ServiceName::new("default", "s"), port: "".into() };
    let mut sp = ServicePort::new(name, Origin::new("t"), Protocol::Tcp, 80);
    sp.external_policy = external_policy;
    sp.affinity = affinity;
    sp.endpoints = (1..=n)
        .map(|i| Endpoint {
            place: Placement {
                node_name: Some(if i % 2 == 1 { "here" } else { "there" }.into()),
                ..Placement::default()
            }
            .shared(),
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
fn a_large_endpoint_set_finds_its_pins() {
    let (opts, registry) = (options(), HealthRegistry::default());
    let now = Instant::now();
    let [b, _] = Balancer::build_pair(&port(40, TrafficPolicy::Cluster, sticky()), &opts, &registry, None);
    let first = b.next_candidate(&mut b.pick(client(9), now, 4), now).expect("a candidate");
    b.connected(client(9), first, now);
    for _ in 0..20 {
        assert_eq!(b.next_candidate(&mut b.pick(client(9), now, 4), now), Some(first), "the pin holds");
    }
}

/// `sp` with `internalTrafficPolicy` set to `policy`.
fn with_internal(mut sp: ServicePort, policy: TrafficPolicy) -> ServicePort {
    sp.internal_policy = policy;
    sp
}

/// Pin `c` to `e` through `b`, as a connection that reached `e` does.
fn pin_to(b: &Balancer, c: u8, e: EndpointAddr, now: Instant) {
    let i = b.position(e).expect("the endpoint is in the balancer");
    b.connected(client(c), i, now);
    assert_eq!(b.pin(client(c).0.ip(), now), Some(e));
}

#[test]
fn a_split_by_the_internal_policy_keeps_the_external_balancer_and_its_pins() {
    let (opts, registry) = (options(), HealthRegistry::default());
    let now = Instant::now();
    let cluster = port(4, TrafficPolicy::Cluster, sticky());
    let shared = Balancer::build_pair(&cluster, &opts, &registry, None);
    assert!(Arc::ptr_eq(&shared[0], &shared[1]));
    pin_to(&shared[1], 1, ep(2), now); // a node-port client, pinned off this node
    pin_to(&shared[1], 2, ep(3), now);

    let split =
        Balancer::build_pair(&with_internal(cluster, TrafficPolicy::Local), &opts, &registry, Some(&shared));
    assert_eq!(split[1].endpoints().count(), 4);
    assert_eq!(split[1].pin(client(1).0.ip(), now), Some(ep(2)), "the external pin stays");
    assert!(
        Arc::ptr_eq(&split[1], &shared[1]),
        "external inputs unchanged: the same balancer, rotation and pins"
    );
    assert!(!Arc::ptr_eq(&split[0], &split[1]));
    let pinned = |c: u8| split[0].pin(client(c).0.ip(), now);
    assert_eq!(pinned(1), None, "internal traffic no longer has 10.0.0.2");
    assert_eq!(pinned(2), Some(ep(3)), "internal starts from a copy of the pins to its endpoints");
}

#[test]
fn a_rejoin_by_the_internal_policy_keeps_the_external_balancer_and_merges_the_pins() {
    let (opts, registry) = (options(), HealthRegistry::default());
    let now = Instant::now();
    let cluster = port(4, TrafficPolicy::Cluster, sticky());
    let split =
        Balancer::build_pair(&with_internal(cluster.clone(), TrafficPolicy::Local), &opts, &registry, None);
    assert!(!Arc::ptr_eq(&split[0], &split[1]));
    let later = now + std::time::Duration::from_secs(1);
    pin_to(&split[1], 1, ep(2), now);
    pin_to(&split[0], 2, ep(1), now); // only internal has a pin for client 2
    // Client 3 is pinned apart in the two scopes; the later pin wins.
    pin_to(&split[1], 3, ep(4), now);
    pin_to(&split[0], 3, ep(3), later);
    pin_to(&split[0], 4, ep(1), now);
    pin_to(&split[1], 4, ep(2), later);

    let rejoined = Balancer::build_pair(&cluster, &opts, &registry, Some(&split));
    assert!(Arc::ptr_eq(&rejoined[0], &rejoined[1]), "equal inputs again: one balancer");
    let pinned = |c: u8| rejoined[0].pin(client(c).0.ip(), later);
    assert_eq!(pinned(1), Some(ep(2)), "the external pin stays");
    assert_eq!(pinned(2), Some(ep(1)), "the internal pin joins");
    assert_eq!(pinned(3), Some(ep(3)), "the internal pin was used later");
    assert_eq!(pinned(4), Some(ep(2)), "the external pin was used later");
    assert!(Arc::ptr_eq(&rejoined[1], &split[1]), "external inputs unchanged: its balancer is kept");
}

#[test]
fn a_rejoin_by_the_external_policy_keeps_the_pins_made_through_the_external_scope() {
    let (opts, registry) = (options(), HealthRegistry::default());
    let now = Instant::now();
    let split = Balancer::build_pair(&port(4, TrafficPolicy::Local, sticky()), &opts, &registry, None);
    assert!(!Arc::ptr_eq(&split[0], &split[1]));
    pin_to(&split[1], 1, ep(3), now);
    pin_to(&split[0], 2, ep(4), now);

    let rejoined =
        Balancer::build_pair(&port(4, TrafficPolicy::Cluster, sticky()), &opts, &registry, Some(&split));
    assert!(Arc::ptr_eq(&rejoined[0], &rejoined[1]), "equal inputs again: one balancer");
    assert_eq!(rejoined[1].pin(client(1).0.ip(), now), Some(ep(3)), "the external pin stays");
    assert_eq!(rejoined[1].pin(client(2).0.ip(), now), Some(ep(4)), "the internal pin stays");
    assert!(Arc::ptr_eq(&rejoined[0], &split[0]), "internal inputs unchanged: its balancer is kept");
}

#[test]
fn a_split_that_changes_both_sides_copies_the_pins_before_either_drops_any() {
    let (opts, registry) = (options(), HealthRegistry::default());
    let now = Instant::now();
    let shared = Balancer::build_pair(&port(4, TrafficPolicy::Cluster, sticky()), &opts, &registry, None);
    pin_to(&shared[0], 1, ep(2), now);
    pin_to(&shared[0], 2, ep(4), now);
    // 10.0.0.4 goes and internal traffic turns Local in one update.
    let changed = with_internal(port(3, TrafficPolicy::Cluster, sticky()), TrafficPolicy::Local);
    let split = Balancer::build_pair(&changed, &opts, &registry, Some(&shared));
    assert!(!Arc::ptr_eq(&split[0], &split[1]));
    assert_eq!(split[1].endpoints().count(), 3);
    assert_eq!(split[1].pin(client(1).0.ip(), now), Some(ep(2)), "external still has 10.0.0.2");
    assert_eq!(split[1].pin(client(2).0.ip(), now), None, "10.0.0.4 is gone");
    assert_eq!(split[0].pin(client(1).0.ip(), now), None, "internal no longer has 10.0.0.2");
}
