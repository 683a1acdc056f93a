//! Health state on demand (`health.rs`'s header): a balancer makes an
//! endpoint's state at its first use only, and still shares the one state
//! of each address with every other balancer, across reloads too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::health::{EndpointState, HealthRegistry};
use super::tests::{client, ep, inputs, seeded};
use super::*;

/// The state `b` holds for `addr`, if it made or took one.
fn held(b: &Balancer, addr: EndpointAddr) -> Option<*const EndpointState> {
    let i = b.position(addr)?;
    b.health.existing(i).map(std::ptr::from_ref)
}

#[test]
fn a_new_balancer_makes_no_state_until_an_endpoint_is_tried() {
    let registry = HealthRegistry::default();
    let now = Instant::now();
    let b = seeded(inputs(&[1, 2, 3], Scheduler::Lc, Affinity::None), &registry, None, 1);
    let mut c = b.pick(client(1), now, 4);
    let first = b.next_candidate(&mut c, now).expect("a candidate");
    assert_eq!(registry.len(), 0, "built and picked: no state yet");
    assert!(!b.health.made(), "nor room for one");
    assert!(b.view(now).endpoints.iter().all(|(_, h)| *h == HealthView::default()), "zeros without state");
    assert_eq!(b.view(now).endpoints.len(), 3, "every endpoint is shown");
    b.attempting(first);
    b.connected(client(1), first, now);
    assert_eq!(registry.len(), 1, "the endpoint tried has a state, the others none");
    let shown = b.view(now).endpoints.into_iter().find(|(a, _)| Some(*a) == b.endpoint(first));
    assert_eq!(shown.map(|(_, h)| (h.attempts, h.active)), Some((1, 1)));
}

#[test]
fn balancers_sharing_an_address_made_lazily_from_two_threads_share_one_state() {
    for round in 0..500 {
        let registry = HealthRegistry::default();
        let now = Instant::now();
        // Two service ports with endpoint 1 in common, each on its own
        // worker thread, both trying endpoint 1 first at the same moment.
        let a = seeded(inputs(&[1, 2], Scheduler::Rr, Affinity::None), &registry, None, round);
        let b = seeded(inputs(&[1, 3, 4], Scheduler::Rr, Affinity::None), &registry, None, round);
        let arrived = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for (balancer, c) in [(&a, client(1)), (&b, client(2))] {
                let arrived = &arrived;
                scope.spawn(move || {
                    let i = balancer.position(ep(1)).expect("endpoint 1");
                    arrived.fetch_add(1, Ordering::AcqRel);
                    while arrived.load(Ordering::Acquire) < 2 {
                        std::hint::spin_loop();
                    }
                    balancer.attempting(i);
                    balancer.failed(c, i, now);
                });
            }
        });
        let (from_a, from_b) = (held(&a, ep(1)), held(&b, ep(1)));
        assert!(from_a.is_some() && from_a == from_b, "round {round}: one state for both");
        let i = a.position(ep(1)).expect("endpoint 1");
        assert_eq!(a.view(now).endpoints[i].1.failures, 2, "round {round}: both failures in it");
        assert_eq!(registry.len(), 1, "round {round}: endpoints never tried have none");
    }
}

#[test]
fn workers_racing_on_one_balancer_fill_its_cell_once() {
    let registry = HealthRegistry::default();
    let b = seeded(inputs(&[1], Scheduler::Rr, Affinity::None), &registry, None, 1);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| (0..100).for_each(|_| b.attempting(0)));
        }
    });
    assert_eq!(b.view(Instant::now()).endpoints[0].1.attempts, 400, "no attempt counted in a lost state");
    assert_eq!(registry.len(), 1);
}

#[test]
fn an_endpoint_ejected_under_one_balancer_is_still_ejected_in_its_successor() {
    let t0 = Instant::now();
    let registry = HealthRegistry::new(health::HealthPolicy::default(), t0);
    let a = seeded(inputs(&[1, 2, 3], Scheduler::Lc, Affinity::None), &registry, None, 1);
    let two = a.position(ep(2)).expect("endpoint 2");
    for _ in 0..3 {
        a.attempting(two);
        a.failed(client(1), two, t0);
    }
    let one = a.position(ep(1)).expect("endpoint 1");
    a.attempting(one);
    a.connected(client(1), one, t0);
    // A reload adds endpoint 4: a new balancer, after which the old one goes.
    let b = seeded(inputs(&[1, 2, 3, 4], Scheduler::Lc, Affinity::None), &registry, Some(&a), 2);
    drop(a);
    registry.prune();
    let view = b.view(t0).endpoints;
    let health = |n: u8| &view[b.position(ep(n)).expect("endpoint")].1;
    assert!(health(2).ejected && health(2).ejections_total == 1, "the ejection survives: {:?}", health(2));
    assert_eq!(health(1).active, 1, "the open connection still counts");
    for n in 0..20 {
        let first = b.next_candidate(&mut b.pick(client(n), t0, 4), t0);
        assert_ne!(first.and_then(|i| b.endpoint(i)), Some(ep(2)), "an ejected endpoint is not chosen");
    }
    assert_eq!(registry.len(), 2, "the successor holds the states it took, and made none");
}

#[test]
fn a_balancer_costs_64_bytes_besides_its_endpoints() {
    // One or two per service port: the rotation is in the endpoints'
    // slots, a Maglev table out of line, the health states one pointer
    // until they matter, and the affinity is its pins'. With the `Arc`'s
    // counts, 80 B: an allocator size class.
    assert_eq!(std::mem::size_of::<Balancer>(), 64);
}

/// Two balancers of one address (the scopes of a `Local` policy, or two
/// Services on one pod): an endpoint ejected through one shows ejected
/// through the other too, which has not used it yet.
#[test]
fn an_endpoint_ejected_through_one_balancer_shows_ejected_through_another_that_never_used_it() {
    let registry = HealthRegistry::default();
    let now = Instant::now();
    let used = seeded(inputs(&[1, 2], Scheduler::Rr, Affinity::None), &registry, None, 1);
    let idle = seeded(inputs(&[1, 3], Scheduler::Rr, Affinity::None), &registry, None, 2);
    let i = used.position(ep(1)).expect("endpoint 1");
    for _ in 0..3 {
        used.attempting(i);
        used.failed(client(1), i, now);
    }
    let shown = |b: &Balancer| b.view(now).endpoints.into_iter().find(|(a, _)| *a == ep(1)).map(|(_, h)| h);
    assert!(shown(&used).is_some_and(|h| h.ejected), "ejected where it failed");
    assert!(held(&idle, ep(1)).is_none(), "the other balancer made no state");
    assert_eq!(shown(&idle), shown(&used), "and shows the one the registry holds");
}
