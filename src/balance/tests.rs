//! The selection module's tests: kube-proxy userspace mode's own scenarios
//! (`USERSPACE-SEMANTICS.md`), each scheduler, pin expiry on a fake clock,
//! and seeded random simulations that check invariants after every step.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::health::HealthPolicy;
use super::*;
use crate::model::{Conditions, Endpoint, Origin, Placement, Protocol, ServiceName, ServicePortName};

pub(super) fn ep(n: u8) -> EndpointAddr {
    EndpointAddr(SocketAddr::from(([10, 0, 0, n], 80)))
}

pub(super) fn client(n: u8) -> ClientAddr {
    ClientAddr(SocketAddr::from(([127, 0, 1, n], 40_000)))
}

pub(super) fn inputs(eps: &[u8], scheduler: Scheduler, affinity: Affinity) -> Inputs {
    let mut endpoints: Vec<_> = eps.iter().map(|n| ep(*n)).collect();
    endpoints.sort();
    Inputs { endpoints, protocol: Protocol::Tcp, scheduler, affinity }
}

/// The first candidate of a fresh pick.
fn first_of(b: &Balancer, c: ClientAddr, now: Instant) -> Option<usize> {
    b.next_candidate(&mut b.pick(c, now, 4), now)
}

/// Every candidate of one pick, failing each as the worker would.
fn all_failing(b: &Balancer, c: ClientAddr, now: Instant) -> Vec<usize> {
    let mut cands = b.pick(c, now, 4);
    std::iter::from_fn(|| b.next_candidate(&mut cands, now))
        .inspect(|&i| {
            b.failed(c, i, now);
        })
        .collect()
}

/// A balancer shuffled with a fixed seed.
pub(super) fn seeded(
    i: Inputs,
    registry: &HealthRegistry,
    previous: Option<&Balancer>,
    seed: u64,
) -> Balancer {
    let pins = previous.and_then(|p| p.pins.clone());
    Balancer::new(i, registry, previous, pins, &mut fastrand::Rng::with_seed(seed))
}

fn rr(eps: &[u8]) -> Balancer {
    seeded(inputs(eps, Scheduler::Rr, Affinity::None), &HealthRegistry::default(), None, 7)
}

fn sticky(eps: &[u8], registry: &HealthRegistry, previous: Option<&Balancer>) -> Balancer {
    let affinity = Affinity::ClientIp { timeout: Affinity::DEFAULT_TIMEOUT };
    seeded(inputs(eps, Scheduler::Rr, affinity), registry, previous, 11)
}

/// Pick, connect to the first candidate, and return it.
fn next(b: &Balancer, c: ClientAddr, now: Instant) -> Option<EndpointAddr> {
    let i = first_of(b, c, now)?;
    b.connected(c, i, now);
    b.endpoint(i)
}

// ---- the userspace scenarios --------------------------------------------

#[test]
fn no_endpoints_yield_no_candidate() {
    let b = rr(&[]);
    assert_eq!(first_of(&b, client(1), Instant::now()), None);
}

#[test]
fn single_endpoint_is_returned_every_time() {
    let b = rr(&[1]);
    let now = Instant::now();
    assert!((0..5).all(|_| next(&b, client(1), now) == Some(ep(1))));
}

#[test]
fn three_endpoints_rotate_each_once_then_repeat() {
    let b = rr(&[1, 2, 3]);
    let now = Instant::now();
    let got: Vec<_> = (0..6).filter_map(|_| next(&b, client(1), now)).collect();
    assert_eq!(got.iter().take(3).collect::<HashSet<_>>().len(), 3, "{got:?}");
    assert_eq!(got[..3], got[3..], "the rotation repeats in the same order");
}

#[test]
fn two_ports_of_one_service_rotate_independently() {
    let (http, admin) = (rr(&[1, 2, 3]), rr(&[1, 2, 3]));
    let now = Instant::now();
    let first_admin = next(&admin, client(1), now);
    for _ in 0..5 {
        next(&http, client(1), now);
    }
    assert_eq!(next(&rr(&[1, 2, 3]), client(1), now), first_admin, "same seed, untouched by http's picks");
}

#[test]
fn replacing_the_endpoint_set_restarts_the_rotation() {
    let registry = HealthRegistry::default();
    let old = seeded(inputs(&[1, 2, 3], Scheduler::Rr, Affinity::None), &registry, None, 3);
    let now = Instant::now();
    next(&old, client(1), now);
    let new = seeded(inputs(&[4, 5, 6], Scheduler::Rr, Affinity::None), &registry, Some(&old), 3);
    let first = new.endpoints().next().expect("an endpoint");
    assert_eq!(next(&new, client(1), now), Some(first), "index restarts at 0");
    let empty = seeded(inputs(&[], Scheduler::Rr, Affinity::None), &registry, Some(&new), 3);
    assert_eq!(first_of(&empty, client(1), now), None);
}

#[test]
fn affinity_keeps_each_of_three_clients_on_its_endpoint_across_interleaved_calls() {
    let registry = HealthRegistry::default();
    let b = sticky(&[1, 2, 3], &registry, None);
    let now = Instant::now();
    let first: Vec<_> = (1..=3).map(|c| next(&b, client(c), now)).collect();
    assert_eq!(first.iter().collect::<HashSet<_>>().len(), 3, "new clients take the next endpoints");
    for round in 0..5 {
        for c in 1..=3u8 {
            let t = now + Duration::from_secs(round);
            assert_eq!(next(&b, client(c), t), first[usize::from(c) - 1]);
        }
    }
}

#[test]
fn affinity_pins_ipv6_clients_by_address_whatever_their_port_and_apart_from_each_other() {
    let registry = HealthRegistry::default();
    let b = sticky(&[1, 2, 3], &registry, None);
    let now = Instant::now();
    let v6 = |n: u16, port: u16| ClientAddr(SocketAddr::from(([0xfd10, 0x200, 0, 0, 0, 0, 0, n], port)));
    let first: Vec<_> = (1..=3).map(|n| next(&b, v6(n, 40_000), now)).collect();
    assert_eq!(first.iter().collect::<HashSet<_>>().len(), 3, "three IPv6 clients, three endpoints");
    for round in 1..5u16 {
        for n in 1..=3u16 {
            let t = now + Duration::from_secs(u64::from(round));
            assert_eq!(next(&b, v6(n, 40_000 + round), t), first[usize::from(n) - 1], "client {n}");
        }
    }
}

#[test]
fn affinity_repins_only_the_client_of_a_removed_endpoint_and_survives_additions() {
    let registry = HealthRegistry::default();
    let b = sticky(&[1, 2, 3], &registry, None);
    let now = Instant::now();
    let pins: Vec<_> = (1..=3).map(|c| next(&b, client(c), now).unwrap()).collect();
    // Remove the endpoint client 1 is pinned to.
    let remaining: Vec<u8> = [1, 2, 3].into_iter().filter(|n| ep(*n) != pins[0]).collect();
    let b2 = sticky(&remaining, &registry, Some(&b));
    assert_eq!(b2.pin(client(1).0.ip(), now), None, "the pin to the removed endpoint is dropped");
    assert_eq!(next(&b2, client(2), now), Some(pins[1]));
    assert_eq!(next(&b2, client(3), now), Some(pins[2]));
    assert!(next(&b2, client(1), now).is_some_and(|e| e != pins[0]));
    // Add an endpoint: every pin survives.
    let mut more = remaining.clone();
    more.push(9);
    let b3 = sticky(&more, &registry, Some(&b2));
    assert_eq!(next(&b3, client(2), now), Some(pins[1]));
    assert_eq!(next(&b3, client(3), now), Some(pins[2]));
}

#[test]
fn affinity_after_a_full_replacement_repins_in_rotation_from_the_start() {
    let registry = HealthRegistry::default();
    let b = sticky(&[1, 2, 3], &registry, None);
    let now = Instant::now();
    for c in 1..=3 {
        next(&b, client(c), now);
    }
    let b2 = sticky(&[4, 5, 6], &registry, Some(&b));
    let rotation: Vec<_> = b2.endpoints().collect();
    let got: Vec<_> = (1..=3).filter_map(|c| next(&b2, client(c), now)).collect();
    assert_eq!(got, rotation, "clients take the new endpoints in rotation order from index 0");
    let empty = sticky(&[], &registry, Some(&b2));
    assert_eq!(first_of(&empty, client(1), now), None);
}

#[test]
fn a_failure_bypasses_the_pin_and_the_next_candidate_becomes_the_pin() {
    let registry = HealthRegistry::default();
    let b = sticky(&[1, 2, 3], &registry, None);
    let now = Instant::now();
    let pinned = next(&b, client(1), now).unwrap();
    let mut c = b.pick(client(1), now, 4);
    let first = b.next_candidate(&mut c, now).unwrap();
    assert_eq!(b.endpoint(first), Some(pinned));
    b.failed(client(1), first, now);
    let second = b.next_candidate(&mut c, now).unwrap();
    assert_ne!(b.endpoint(second), Some(pinned), "the retry goes elsewhere");
    b.connected(client(1), second, now);
    assert_eq!(b.pin(client(1).0.ip(), now), b.endpoint(second), "the pin is overwritten");
}

#[test]
fn pins_slide_and_expire_on_a_fake_clock() {
    let registry = HealthRegistry::default();
    let two = Affinity::ClientIp { timeout: Duration::from_secs(2) };
    let b = seeded(inputs(&[1, 2, 3], Scheduler::Rr, two), &registry, None, 5);
    let t0 = Instant::now();
    let pinned = next(&b, client(1), t0);
    // Used every 1.5 s: the window slides, the pin holds past 2 s.
    for k in 1..=4u64 {
        assert_eq!(next(&b, client(1), t0 + Duration::from_millis(1500 * k)), pinned);
    }
    let idle = t0 + Duration::from_millis(6000 + 3000);
    assert_eq!(b.pin(client(1).0.ip(), idle), None, "3 s idle > 2 s timeout: the pin is gone");
    // Another client moved the rotation on, so re-pinning picks afresh.
    next(&b, client(2), idle);
    assert!(next(&b, client(1), idle).is_some());
}

// ---- schedulers --------------------------------------------------------

#[test]
fn least_connections_prefers_the_emptiest_endpoint() {
    let registry = HealthRegistry::default();
    let b = seeded(inputs(&[1, 2, 3], Scheduler::Lc, Affinity::None), &registry, None, 1);
    let now = Instant::now();
    // Load endpoints 0 and 1 of the rotation with two connections each.
    for i in [0, 0, 1, 1] {
        b.connected(client(9), i, now);
    }
    for _ in 0..5 {
        assert_eq!(first_of(&b, client(1), now), Some(2));
    }
    b.closed(0);
    b.closed(0);
    b.connected(client(9), 2, now);
    assert_eq!(first_of(&b, client(1), now), Some(0), "now endpoint 0 is the emptiest");
}

#[test]
fn p2c_never_picks_the_busier_of_two_when_one_is_idle() {
    let registry = HealthRegistry::default();
    let b = seeded(inputs(&[1, 2], Scheduler::P2c, Affinity::None), &registry, None, 1);
    let now = Instant::now();
    b.connected(client(9), 0, now);
    assert!((0..50).all(|_| first_of(&b, client(1), now) == Some(1)));
}

#[test]
fn source_hash_and_maglev_keep_a_client_on_one_endpoint_across_rebuilds() {
    for scheduler in [Scheduler::Sh, Scheduler::Maglev] {
        let registry = HealthRegistry::default();
        let now = Instant::now();
        let a = seeded(inputs(&[1, 2, 3, 4], scheduler, Affinity::None), &registry, None, 1);
        let b = seeded(inputs(&[1, 2, 3, 4], scheduler, Affinity::None), &registry, None, 99);
        let mut spread = HashSet::new();
        for c in 1..=40 {
            let x = next(&a, client(c), now);
            assert_eq!(x, next(&a, client(c), now), "{scheduler}: stable");
            assert_eq!(x, next(&b, client(c), now), "{scheduler}: independent of the shuffle seed");
            spread.insert(x);
        }
        assert!(spread.len() > 1, "{scheduler}: clients spread over endpoints");
    }
}

#[test]
fn maglev_removing_one_of_five_moves_only_its_clients() {
    let registry = HealthRegistry::default();
    let now = Instant::now();
    let before = seeded(inputs(&[1, 2, 3, 4, 5], Scheduler::Maglev, Affinity::None), &registry, None, 1);
    let after = seeded(inputs(&[1, 2, 4, 5], Scheduler::Maglev, Affinity::None), &registry, Some(&before), 1);
    let mut moved = 0;
    for c in 0..=255u8 {
        let (x, y) = (next(&before, client(c), now), next(&after, client(c), now));
        if x != y {
            assert_eq!(x, Some(ep(3)), "client {c} moved although its endpoint stayed");
            moved += 1;
        }
    }
    assert!((30..=80).contains(&moved), "about 1/5 of 256 clients moved: {moved}");
}

// ---- passive health ----------------------------------------------------

#[test]
fn an_ejected_endpoint_is_skipped_until_its_backoff_ends() {
    let registry = HealthRegistry::default();
    let b = seeded(inputs(&[1, 2, 3], Scheduler::Rr, Affinity::None), &registry, None, 2);
    let t0 = Instant::now();
    for _ in 0..3 {
        b.failed(client(1), 0, t0);
    }
    let firsts: HashSet<_> = (0..30).filter_map(|_| first_of(&b, client(1), t0)).collect();
    assert!(!firsts.contains(&0), "ejected: never first");
    let mut c = b.pick(client(1), t0, 4);
    assert!(std::iter::from_fn(|| b.next_candidate(&mut c, t0)).all(|i| i != 0), "nor a retry");
    let later = t0 + Duration::from_millis(1100);
    let firsts: HashSet<_> = (0..30).filter_map(|_| first_of(&b, client(1), later)).collect();
    assert!(firsts.contains(&0), "readmitted after 1 s");
}

#[test]
fn when_every_endpoint_is_ejected_all_are_tried() {
    let registry = HealthRegistry::default();
    let b = seeded(inputs(&[1, 2, 3], Scheduler::Rr, Affinity::None), &registry, None, 2);
    let t0 = Instant::now();
    for i in 0..3 {
        for _ in 0..3 {
            b.failed(client(1), i, t0);
        }
    }
    let mut c = b.pick(client(1), t0, 4);
    let tried: HashSet<_> = std::iter::from_fn(|| b.next_candidate(&mut c, t0)).collect();
    assert_eq!(tried.len(), 3);
}

// ---- a fair share after a failure ---------------------------------------

/// 1,200 connections through rr over four endpoints, one of which (`dead`)
/// fails every connect; the worker retries as `conn.rs` does. Returns the
/// connections each endpoint took and the ones no candidate served.
fn spread_with_one_dead(b: &Balancer, dead: usize, now: Instant) -> (HashMap<usize, usize>, usize) {
    let (mut served, mut lost) = (HashMap::new(), 0);
    for k in 0..1200u32 {
        let c = client((k % 200) as u8);
        let mut cands = b.pick(c, now, 4);
        let ok = std::iter::from_fn(|| b.next_candidate(&mut cands, now)).find(|&i| {
            let up = i != dead;
            if up {
                b.connected(c, i, now);
            } else {
                b.failed(c, i, now);
            }
            up
        });
        match ok {
            Some(i) => *served.entry(i).or_default() += 1,
            None => lost += 1,
        }
    }
    (served, lost)
}

#[test]
fn a_dead_endpoints_share_spreads_evenly_over_the_survivors() {
    // Never ejected: every fourth pick fails over by retry.
    let never = HealthPolicy { failures: 0, ..HealthPolicy::default() };
    let t0 = Instant::now();
    let b = seeded(
        inputs(&[1, 2, 3, 4], Scheduler::Rr, Affinity::None),
        &HealthRegistry::new(never, t0),
        None,
        3,
    );
    let (served, lost) = spread_with_one_dead(&b, 2, t0);
    assert_eq!(lost, 0);
    assert_eq!(served.get(&2), None);
    assert!(served.values().all(|&n| n == 400), "retries take the next rotation index: {served:?}");
}

#[test]
fn an_ejected_endpoints_share_spreads_evenly_over_the_survivors() {
    let t0 = Instant::now();
    let b = seeded(
        inputs(&[1, 2, 3, 4], Scheduler::Rr, Affinity::None),
        &HealthRegistry::new(HealthPolicy::default(), t0),
        None,
        3,
    );
    let (served, lost) = spread_with_one_dead(&b, 1, t0);
    assert!(b.ejected(1, t0), "three failures eject it");
    assert_eq!(lost, 0);
    assert!(
        served.values().all(|&n| (399..=401).contains(&n)),
        "skips take the next rotation index: {served:?}"
    );
    assert_eq!(served.values().sum::<usize>(), 1200);
}

#[test]
fn hashing_schedulers_spread_a_dead_endpoints_clients_over_the_survivors() {
    for scheduler in [Scheduler::Sh, Scheduler::Maglev] {
        let t0 = Instant::now();
        let b = seeded(inputs(&[1, 2, 3, 4], scheduler, Affinity::None), &HealthRegistry::default(), None, 1);
        let ejected = first_of(&b, client(1), t0).unwrap();
        for _ in 0..3 {
            b.failed(client(1), ejected, t0);
        }
        let mut moved: HashMap<usize, usize> = HashMap::new();
        for n in 0..=255u8 {
            let c = ClientAddr(SocketAddr::from(([10, 9, 8, n], 1)));
            let now = first_of(&b, c, t0).unwrap();
            let again = first_of(&b, c, t0).unwrap();
            assert_eq!(now, again, "{scheduler:?}: a client keeps its endpoint");
            assert_ne!(now, ejected);
            let before =
                seeded(inputs(&[1, 2, 3, 4], scheduler, Affinity::None), &HealthRegistry::default(), None, 1);
            if first_of(&before, c, t0) == Some(ejected) {
                *moved.entry(now).or_default() += 1;
            }
        }
        assert_eq!(moved.len(), 3, "{scheduler:?}: every survivor takes some of its clients: {moved:?}");
    }
}

#[test]
fn retries_cycle_the_healthy_endpoints_before_repeating_any() {
    let now = Instant::now();
    let never = HealthPolicy { failures: 0, ..HealthPolicy::default() };
    let b = seeded(inputs(&[1], Scheduler::Rr, Affinity::None), &HealthRegistry::new(never, now), None, 1);
    assert_eq!(all_failing(&b, client(1), now), [0, 0, 0, 0], "one endpoint: tried 4 times");
    let b = seeded(inputs(&[1, 2], Scheduler::Rr, Affinity::None), &HealthRegistry::new(never, now), None, 1);
    let tried = all_failing(&b, client(1), now);
    assert_eq!((tried[0], tried[1]), (tried[2], tried[3]), "two: each, then again: {tried:?}");
    assert_ne!(tried[0], tried[1]);
    for scheduler in [Scheduler::Random, Scheduler::Lc, Scheduler::P2c, Scheduler::Sh, Scheduler::Maglev] {
        let b =
            seeded(inputs(&[1, 2, 3], scheduler, Affinity::None), &HealthRegistry::new(never, now), None, 1);
        let tried = all_failing(&b, client(1), now);
        assert_eq!(tried[..3].iter().collect::<HashSet<_>>().len(), 3, "{scheduler:?}: {tried:?}");
    }
}

// ---- health per protocol ------------------------------------------------

#[test]
fn udp_failures_leave_the_tcp_service_on_the_same_endpoint_untouched() {
    let registry = HealthRegistry::default();
    let t0 = Instant::now();
    let affinity = Affinity::ClientIp { timeout: Affinity::DEFAULT_TIMEOUT };
    let tcp = seeded(inputs(&[1, 2, 3], Scheduler::Lc, affinity), &registry, None, 4);
    let mut udp_inputs = inputs(&[1], Scheduler::Lc, Affinity::None);
    udp_inputs.protocol = Protocol::Udp;
    let udp = seeded(udp_inputs, &registry, None, 4);
    // Pin client 1 (TCP) to endpoint 1, and open a UDP flow to it.
    let shared = tcp.position(ep(1)).expect("endpoint 1");
    tcp.connected(client(1), shared, t0);
    udp.flow_opened(client(2), 0, t0);
    for _ in 0..5 {
        udp.failed(client(2), 0, t0);
    }
    assert!(udp.view(t0).endpoints[0].1.ejected);
    let view = &tcp.view(t0).endpoints[shared].1;
    assert!(!view.ejected && view.failures == 0 && view.active == 1, "{view:?}");
    assert_eq!(tcp.pin(client(1).0.ip(), t0), Some(ep(1)), "the TCP pin holds");
    assert_eq!(first_of(&tcp, client(1), t0), Some(shared));
    // lc counts only TCP connections: the UDP flow weighs nothing here.
    tcp.closed(shared);
    let firsts: HashSet<_> = (3..9).filter_map(|n| first_of(&tcp, client(n), t0)).collect();
    assert!(firsts.contains(&shared), "{firsts:?}");
}

// ---- the builder and eligibility ----------------------------------------

fn port(eps: &[(u8, bool)]) -> ServicePort {
    let name = ServicePortName { service: ServiceName::new("default", "s"), port: "".into() };
    let mut sp = ServicePort::new(name, Origin::new("t"), Protocol::Tcp, 80);
    sp.endpoints = eps
        .iter()
        .map(|&(n, ready)| Endpoint {
            addr: ep(n),
            conditions: Conditions { ready, serving: ready, terminating: false },
            place: Placement::none(),
        })
        .collect();
    sp
}

#[test]
fn build_reuses_the_balancer_while_its_inputs_are_unchanged() {
    let (opts, registry) = (BalanceOptions::default(), HealthRegistry::default());
    let a = Balancer::build(&port(&[(1, true), (2, true)]), Scope::Internal, &opts, &registry, None);
    let same = Balancer::build(
        &port(&[(1, true), (2, true), (3, false)]),
        Scope::Internal,
        &opts,
        &registry,
        Some(&a),
    );
    assert!(Arc::ptr_eq(&a, &same), "a not-ready endpoint changes nothing eligible");
    let changed = Balancer::build(&port(&[(1, true)]), Scope::Internal, &opts, &registry, Some(&a));
    assert!(!Arc::ptr_eq(&a, &changed));
}

// ---- seeded simulations --------------------------------------------------

/// Random picks, outcomes, closes, endpoint changes and clock jumps under
/// 256 seeds, with affinity; invariants checked after every step.
#[test]
fn simulation_keeps_pins_health_and_candidates_consistent() {
    for seed in 0..256u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let registry = HealthRegistry::default();
        let timeout = Duration::from_secs(rng.u64(1..20));
        let affinity = Affinity::ClientIp { timeout };
        let mut set: Vec<u8> = (1..=rng.u8(1..6)).collect();
        let mut b = seeded(inputs(&set, Scheduler::Rr, affinity), &registry, None, seed);
        let mut now = Instant::now();
        let mut open: Vec<(usize, Arc<Balancer>)> = Vec::new();
        let mut b_arc = Arc::new(b);
        for step in 0..300 {
            let c = client(rng.u8(1..8));
            match rng.u8(0..10) {
                0 => now += Duration::from_millis(rng.u64(0..5000)),
                1 => {
                    // Change the endpoint set: drop or add one.
                    if set.len() > 1 && rng.bool() {
                        set.remove(rng.usize(..set.len()));
                    } else {
                        set.push(rng.u8(10..30));
                        set.sort();
                        set.dedup();
                    }
                    b = seeded(inputs(&set, Scheduler::Rr, affinity), &registry, Some(&b_arc), seed + step);
                    b_arc = Arc::new(b);
                }
                2 if !open.is_empty() => {
                    let (i, owner) = open.swap_remove(rng.usize(..open.len()));
                    owner.closed(i);
                }
                _ => {
                    let pinned = b_arc.pin(c.0.ip(), now);
                    let mut cands = b_arc.pick(c, now, 4);
                    let first =
                        b_arc.next_candidate(&mut cands, now).expect("a candidate while endpoints exist");
                    let first_addr = b_arc.endpoint(first).expect("candidate in range");
                    assert!(
                        set.iter().any(|n| ep(*n) == first_addr),
                        "seed {seed}: picked a removed endpoint"
                    );
                    if let Some(p) = pinned
                        && !registry.state(Protocol::Tcp, p).is_ejected(now)
                    {
                        assert_eq!(first_addr, p, "seed {seed} step {step}: a live, healthy pin comes first");
                    }
                    if rng.u8(0..4) == 0 {
                        b_arc.failed(c, first, now);
                        assert_ne!(b_arc.pin(c.0.ip(), now), Some(first_addr), "seed {seed}: failure unpins");
                    } else {
                        b_arc.connected(c, first, now);
                        assert_eq!(b_arc.pin(c.0.ip(), now), Some(first_addr), "seed {seed}: success pins");
                        open.push((first, Arc::clone(&b_arc)));
                    }
                }
            }
            // Active counts equal the connections the simulation holds open.
            let mut expected: HashMap<EndpointAddr, u32> = HashMap::new();
            for (i, owner) in &open {
                *expected.entry(owner.endpoint(*i).expect("in range")).or_default() += 1;
            }
            for (addr, n) in expected {
                assert_eq!(
                    registry.state(Protocol::Tcp, addr).active(),
                    n,
                    "seed {seed}: active count of {addr}"
                );
            }
        }
    }
}

/// With every endpoint healthy, round robin gives each endpoint the same
/// count across threads sharing one balancer.
#[test]
fn round_robin_is_fair_across_workers() {
    let b = Arc::new(rr(&[1, 2, 3]));
    let now = Instant::now();
    let counts: Vec<HashMap<usize, usize>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let b = Arc::clone(&b);
                s.spawn(move || {
                    let mut seen = HashMap::new();
                    for _ in 0..3000 {
                        *seen.entry(first_of(&b, client(1), now).unwrap()).or_default() += 1;
                    }
                    seen
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut total: HashMap<usize, usize> = HashMap::new();
    for c in counts {
        for (k, v) in c {
            *total.entry(k).or_default() += v;
        }
    }
    assert_eq!(total.values().copied().collect::<HashSet<_>>(), HashSet::from([2000]), "{total:?}");
}

#[test]
fn stable_hash_never_changes() {
    // A pinned value: a change here would re-map every sh/maglev client
    // across an upgrade.
    assert_eq!(hash_ip(IpAddr::from([10, 0, 0, 1])), 16_692_434_313_525_488_564);
}

#[test]
fn more_endpoints_than_a_u16_counts_are_each_chosen_by_their_own_index() {
    // Indices past 65 535 were squeezed into 0: round robin over 70 000
    // endpoints must still reach every one of them.
    const N: u32 = 70_000;
    let endpoints: Vec<EndpointAddr> = (0..N)
        .map(|i| EndpointAddr(SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 80))))
        .collect();
    let i = Inputs { endpoints, protocol: Protocol::Tcp, scheduler: Scheduler::Rr, affinity: Affinity::None };
    let b = seeded(i, &HealthRegistry::default(), None, 3);
    let now = Instant::now();
    let chosen: HashSet<usize> = (0..N).filter_map(|_| first_of(&b, client(1), now)).collect();
    assert_eq!(chosen.len(), N as usize);
    assert!(chosen.iter().all(|&i| b.endpoint(i).is_some()));
}
