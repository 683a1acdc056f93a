//! Tests of the desired rules kept per service port: each step is checked
//! against the whole snapshot's rules and the diff against the rules it
//! turns into.

use super::*;
use crate::balance::BalanceOptions;
use crate::balance::health::HealthRegistry;
use crate::listen::{ListenKey, ListenerId};
use crate::metrics::Metrics;
use crate::model::{Endpoint, EndpointAddr, Origin, Protocol, ServiceName};
use crate::snapshot::{BalanceContext, PortUpdate};
use crate::source_ip::SourceOptions;

fn spec(name: &str, protocol: Protocol, vip: &str, endpoints: usize) -> ServicePort {
    let name = ServicePortName { service: ServiceName::new("default", name), port: "".into() };
    let mut sp = ServicePort::new(name, Origin::new("test"), protocol, 80);
    sp.cluster_ips = vec![vip.parse().unwrap()];
    sp.endpoints = (0..endpoints)
        .map(|i| Endpoint::ready(EndpointAddr(SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)))))
        .collect();
    sp
}

/// A snapshot of `specs`, each with a proxy listener (no socket) on
/// port 31000 + its index in `all` (so a port keeps its number).
fn snapshot(generation: u64, specs: &[ServicePort], previous: &Snapshot) -> Arc<Snapshot> {
    snapshot_with(generation, specs, previous, &[])
}

/// [`snapshot`] with `extra` listeners besides the service ports' own.
fn snapshot_with(
    generation: u64,
    specs: &[ServicePort],
    previous: &Snapshot,
    extra: &[Arc<Listener>],
) -> Arc<Snapshot> {
    let listeners = specs
        .iter()
        .map(|sp| {
            let n =
                sp.name.service.name.bytes().fold(0u16, |a, b| a.wrapping_mul(31).wrapping_add(u16::from(b)));
            let key = ListenKey {
                port: sp.name.clone(),
                protocol: sp.protocol,
                role: ListenRole::Proxy,
                wanted_port: 0,
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], 20_000 + n % 10_000));
            // The same key keeps its listener, as the Binder does.
            previous.listeners.iter().find(|l| l.key == key).cloned().unwrap_or_else(|| {
                Arc::new(Listener::without_sockets(
                    ListenerId(u64::from(n) + generation * 100_000),
                    key,
                    addr,
                ))
            })
        })
        .chain(extra.iter().cloned())
        .collect();
    let (options, registry, metrics, source) = (
        BalanceOptions::default(),
        HealthRegistry::default(),
        Arc::new(Metrics::new(1)),
        SourceOptions::default(),
    );
    let ctx = BalanceContext { options: &options, registry: &registry, metrics: &metrics, source: &source };
    Arc::new(Snapshot::new(generation, specs.to_vec(), listeners, previous, &ctx))
}

/// `diff` applied to `old`, as a backend applies it; an add's service
/// (which the diff does not carry) read from `new`.
fn applied(old: &RuleSet, diff: &Diff, new: &RuleSet) -> RuleSet {
    let mut r = old.clone();
    for k in &diff.remove {
        assert!(r.redirects.remove(k).is_some(), "removed {k:?} was not there");
    }
    for (k, p) in &diff.add {
        let service =
            new.redirects.get(k).map(|t| t.service.clone()).expect("an added key is in the new rules");
        let t = Target { proxy_port: *p, service };
        assert!(r.redirects.insert(*k, t).is_none(), "added {k:?} was there");
    }
    for k in &diff.unreject {
        assert!(r.reject.remove(k));
    }
    for k in &diff.reject {
        assert!(r.reject.insert(*k));
    }
    for k in &diff.undrop {
        assert!(r.dropped.remove(k));
    }
    for k in &diff.drop {
        assert!(r.dropped.insert(*k));
    }
    r
}

/// Update `d` to `snap`; its rules must be the whole snapshot's, and
/// the diff must turn the previous rules into them.
fn step(d: &mut DesiredRules, snap: &Arc<Snapshot>) -> Update {
    let local = Locality::from_addrs(["10.200.0.1".parse().unwrap()]);
    let before = d.rules().clone();
    let update = d.update(snap, &local);
    let whole = rules::from_snapshot(snap, &local);
    assert_eq!(d.rules().redirects, whole.rules.redirects);
    assert_eq!(d.rules().reject, whole.rules.reject);
    assert_eq!(d.rules().dropped, whole.rules.dropped);
    assert_eq!(d.rules().firewall, whole.rules.firewall);
    let mut after = applied(&before, &update.diff, d.rules());
    after.firewall = d.rules().firewall.clone();
    after.transparent = d.rules().transparent;
    assert_eq!(&after, d.rules(), "the diff turns the old rules into the new");
    assert_eq!(update.wrong_family, whole.wrong_family);
    update
}

#[test]
fn a_clashing_key_stays_with_the_first_by_name_and_passes_to_the_next_when_the_owner_goes() {
    let (a, b) = (spec("a", Protocol::Tcp, "10.96.0.1", 2), spec("b", Protocol::Tcp, "10.96.0.1", 2));
    let mut d = DesiredRules::default();
    let s1 = snapshot(1, &[a.clone(), b.clone()], &Snapshot::default());
    let u = step(&mut d, &s1);
    let key = RuleKey {
        protocol: Protocol::Tcp,
        daddr: crate::model::ServiceVip("10.96.0.1".parse().unwrap()),
        dport: 80,
    };
    assert_eq!(u.clashes, vec![(key, a.name.clone(), b.name.clone())]);
    assert_eq!(d.rules().redirects[&key].name(), &a.name);
    let a_port = d.rules().redirects[&key].proxy_port;
    // The owner goes: the loser takes the key, to its own proxy port.
    let s2 = snapshot(2, std::slice::from_ref(&b), &s1);
    let u = step(&mut d, &s2);
    assert_eq!(d.rules().redirects[&key].name(), &b.name);
    let b_port = d.rules().redirects[&key].proxy_port;
    assert_ne!(a_port, b_port);
    assert_eq!(u.diff.remove, vec![key]);
    assert_eq!(u.diff.add, vec![(key, b_port)]);
    assert!(u.clashes.is_empty());
    // It comes back first by name and takes the key again.
    let s3 = snapshot(3, &[a.clone(), b], &s2);
    let u = step(&mut d, &s3);
    assert_eq!(d.rules().redirects[&key].name(), &a.name);
    assert_eq!(u.clashes.len(), 1);
}

#[test]
fn an_unchanged_snapshot_changes_nothing_and_keeps_every_entry() {
    let mut specs = [spec("a", Protocol::Tcp, "10.96.0.1", 2), spec("b", Protocol::Udp, "10.96.0.2", 0)];
    specs[0].cluster_ips.push("10.96.0.3".parse().unwrap());
    let mut d = DesiredRules::default();
    let s1 = snapshot(1, &specs, &Snapshot::default());
    step(&mut d, &s1);
    let entries: Vec<*const PortState> = d.entries.iter().map(|e| Arc::as_ptr(&e.port)).collect();
    // The claims of an entry made again are new ones (claims of two keys
    // or more are a box of their own; one is inline, with no address).
    let boxed = |d: &DesiredRules| -> Vec<_> {
        let many = |e: &Entry| match &e.claims.keys {
            Keys::Many(keys) => Some(keys.as_ptr()),
            Keys::One(_) => None,
        };
        d.entries.iter().filter_map(many).collect()
    };
    let claims = boxed(&d);
    assert_eq!(claims.len(), 1, "a's two keys");
    let rules = d.rules().clone();
    // Again, as a periodic resync does.
    let u = step(&mut d, &s1);
    assert_eq!((u.ports_changed, u.rewrite), (0, false));
    assert!(u.diff.add.is_empty() && u.diff.remove.is_empty() && u.diff.reject.is_empty());
    assert_eq!(d.rules(), &rules);
    assert_eq!(d.entries.iter().map(|e| Arc::as_ptr(&e.port)).collect::<Vec<_>>(), entries);
    assert_eq!(boxed(&d), claims);
    // A change after it is still seen.
    let s2 = snapshot(2, &specs[..1], &s1);
    let u = step(&mut d, &s2);
    assert_eq!(u.ports_changed, 1);
}

#[test]
fn only_service_ports_whose_inputs_changed_are_made_again_and_the_rules_match_the_whole_snapshots() {
    let mut specs: Vec<ServicePort> = (0..20)
        .map(|i| {
            spec(
                &format!("s{i:02}"),
                if i % 3 == 0 { Protocol::Udp } else { Protocol::Tcp },
                &format!("10.96.0.{}", i + 1),
                2,
            )
        })
        .collect();
    specs[4].external_ips = vec!["10.97.0.4".parse().unwrap(), "10.200.0.1".parse().unwrap()];
    specs[5].load_balancer_ips = vec!["10.98.0.5".parse().unwrap()];
    specs[5].load_balancer_source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    let mut d = DesiredRules::default();
    let s1 = snapshot(1, &specs, &Snapshot::default());
    assert_eq!(step(&mut d, &s1).ports_changed, 20);
    // The same port states in a new snapshot: nothing is made again.
    let mut same = Snapshot::default();
    (same.ports, same.listeners) = (s1.ports.clone(), s1.listeners.clone());
    let u = step(&mut d, &Arc::new(same));
    assert_eq!((u.ports_changed, u.diff.is_empty(), u.rewrite), (0, true, false));
    // Every port rebuilt with the same specs: equal inputs, nothing made again.
    let s2 = snapshot(2, &specs, &s1);
    assert_eq!(step(&mut d, &s2).ports_changed, 0);
    // A UDP port loses its endpoints: rejected; a TCP one: still redirected.
    specs[0].endpoints.clear();
    specs[1].endpoints.clear();
    let s3 = snapshot(3, &specs, &s2);
    let u = step(&mut d, &s3);
    assert_eq!(u.ports_changed, 2);
    assert_eq!((u.diff.remove.len(), u.diff.reject.len(), u.diff.add.len()), (1, 1, 0));
    // Removed, added, source ranges changed (a rewrite), a clash made.
    specs.remove(7);
    specs.push(spec("zz", Protocol::Tcp, "10.96.0.2", 1));
    specs[5].load_balancer_source_ranges = vec!["10.1.0.0/16".parse().unwrap()];
    let s4 = snapshot(4, &specs, &s3);
    let u = step(&mut d, &s4);
    assert!(u.rewrite, "the firewall changed");
    assert_eq!(u.ports_changed, 3);
    assert_eq!(u.clashes.len(), 1);
    // The node gains an address: the external IP is local, no rule.
    let mut d2 = DesiredRules::default();
    d2.update(&s4, &Locality::default());
    let key = RuleKey {
        protocol: Protocol::Tcp,
        daddr: crate::model::ServiceVip("10.200.0.1".parse().unwrap()),
        dport: 80,
    };
    assert!(d2.rules().redirects.contains_key(&key));
    let u = d2.update(&s4, &Locality::from_addrs(["10.200.0.1".parse().unwrap()]));
    assert_eq!((u.ports_changed, u.diff.remove.clone()), (1, vec![key]));
}

#[test]
fn rules_given_whole_or_read_back_are_diffed_whole_by_the_next_snapshot() {
    let specs = [spec("a", Protocol::Tcp, "10.96.0.1", 1), spec("b", Protocol::Tcp, "10.96.0.2", 1)];
    let s1 = snapshot(1, &specs, &Snapshot::default());
    let mut fresh = DesiredRules::default();
    fresh.update(&s1, &Locality::default());
    // A previous run's rules, without names, one of them stale.
    let mut read_back = fresh.rules().clone();
    for t in read_back.redirects.values_mut() {
        t.service = None;
    }
    let stale = RuleKey {
        protocol: Protocol::Tcp,
        daddr: crate::model::ServiceVip("10.96.9.9".parse().unwrap()),
        dport: 80,
    };
    read_back.redirects.insert(stale, Target::named(ProxyPort(1), specs[0].name.clone()));
    let mut d = DesiredRules::orphaned(read_back);
    let u = d.update(&s1, &Locality::default());
    assert_eq!((u.diff.remove, u.diff.add.len()), (vec![stale], 0), "only the stale rule goes");
    assert_eq!(d.rules(), fresh.rules());
    let u = d.replace_with(RuleSet::default());
    assert_eq!(u.diff.remove.len(), 2);
    let u = d.update(&s1, &Locality::default());
    assert_eq!(u.diff.add.len(), 2, "after a whole set, the next snapshot is diffed whole");
}

#[test]
fn tcp_ports_follow_the_shared_proxy_ports_and_are_rejected_there_without_endpoints() {
    let mut specs =
        vec![spec("tcp", Protocol::Tcp, "10.96.0.1", 2), spec("udp", Protocol::Udp, "10.96.0.2", 2)];
    let mut d = DesiredRules::default();
    let s1 = snapshot(1, &specs, &Snapshot::default());
    step(&mut d, &s1);
    // Shared proxy ports appear: every TCP port moves to them.
    let shared = Arc::new(Listener::without_sockets(
        ListenerId(999_999),
        ListenKey::shared(ListenRole::Proxy),
        "127.0.0.1:29999".parse().unwrap(),
    ));
    let s2 = snapshot_with(2, &specs, &s1, std::slice::from_ref(&shared));
    step(&mut d, &s2);
    let key = |ip: &str, protocol| RuleKey {
        protocol,
        daddr: crate::model::ServiceVip(ip.parse().unwrap()),
        dport: 80,
    };
    assert_eq!(d.rules().redirects[&key("10.96.0.1", Protocol::Tcp)].proxy_port, ProxyPort(29999));
    assert_ne!(d.rules().redirects[&key("10.96.0.2", Protocol::Udp)].proxy_port, ProxyPort(29999));
    // No endpoint left on a shared TCP port: nothing to pause, so rejected.
    specs[0].endpoints.clear();
    let s3 = snapshot_with(3, &specs, &s2, std::slice::from_ref(&shared));
    let u = step(&mut d, &s3);
    assert_eq!((u.ports_changed, u.diff.reject.clone()), (1, vec![key("10.96.0.1", Protocol::Tcp)]));
}

#[test]
fn the_rules_keep_the_listeners_of_the_last_snapshot_alive_not_the_snapshot() {
    let specs = [spec("a", Protocol::Tcp, "10.96.0.1", 1), spec("b", Protocol::Udp, "10.96.0.2", 1)];
    let s1 = snapshot(1, &specs, &Snapshot::default());
    let mut d = DesiredRules::default();
    step(&mut d, &s1);
    let s2 = snapshot(2, &specs[..1], &s1);
    step(&mut d, &s2);
    let (weak1, weak2) = (Arc::downgrade(&s1), Arc::downgrade(&s2));
    drop((s1, s2));
    assert!(weak1.upgrade().is_none() && weak2.upgrade().is_none(), "no snapshot is kept");
    // And the next step still sees which listeners went.
    let s3 = snapshot(3, &specs[..0], &Snapshot::default());
    let u = step(&mut d, &s3);
    assert_eq!(u.ports_changed, 1);
    assert!(d.rules().redirects.is_empty() && d.rules().reject.is_empty());
}

#[test]
fn a_tcp_port_on_the_shared_proxy_ports_that_becomes_udp_under_the_same_name_leaves_them() {
    let mut x = spec("x", Protocol::Tcp, "10.96.0.1", 1);
    x.cluster_ips.push("fd00::1".parse().unwrap());
    x.endpoints.push(Endpoint::ready(EndpointAddr("[fd00::10]:8080".parse().unwrap())));
    let shared: Vec<Arc<Listener>> =
        [(ListenRole::Proxy, "127.0.0.1:29999"), (ListenRole::Proxy6, "[::1]:29999")]
            .into_iter()
            .enumerate()
            .map(|(i, (role, addr))| {
                Arc::new(Listener::without_sockets(
                    ListenerId(900_000 + i as u64),
                    ListenKey::shared(role),
                    addr.parse().unwrap(),
                ))
            })
            .collect();
    let mut d = DesiredRules::default();
    let s1 = snapshot_with(1, std::slice::from_ref(&x), &Snapshot::default(), &shared);
    step(&mut d, &s1);
    let v6 = RuleKey {
        protocol: Protocol::Tcp,
        daddr: crate::model::ServiceVip("fd00::1".parse().unwrap()),
        dport: 80,
    };
    assert_eq!(d.rules().redirects[&v6].proxy_port, ProxyPort(29999));
    // The same name, now UDP: its own (IPv4) proxy port only, never the
    // shared TCP ones (step compares with rules::from_snapshot).
    x.protocol = Protocol::Udp;
    let s2 = snapshot_with(2, std::slice::from_ref(&x), &s1, &shared);
    step(&mut d, &s2);
    assert!(d.rules().redirects.values().all(|t| t.proxy_port != ProxyPort(29999)), "{:?}", d.rules());
}

/// xorshift, seeded from the process id (printed, to replay a failure).
fn rng() -> impl FnMut(u64) -> u64 {
    crate::test_rng::xorshift(0x2545_f491_4f6c_dd1d)
}

/// A random service port `s<i>`: few addresses, so ports often clash;
/// 10.200.0.1 (local to `step`) among the external IPs now and then.
fn random_port(i: u64, next: &mut impl FnMut(u64) -> u64) -> ServicePort {
    let protocol = if next(4) == 0 { Protocol::Udp } else { Protocol::Tcp };
    let mut sp = spec(&format!("s{i:03}"), protocol, &format!("10.96.0.{}", next(5)), next(3) as usize);
    let ip = |s: String| s.parse::<std::net::IpAddr>().expect("ip");
    sp.external_ips = (0..next(3)).map(|_| ip(format!("10.97.0.{}", next(3)))).collect();
    if next(5) == 0 {
        sp.external_ips.push(ip("10.200.0.1".into()));
    }
    sp.load_balancer_ips = (0..next(2)).map(|_| ip(format!("10.98.0.{}", next(2)))).collect();
    if next(3) == 0 {
        sp.load_balancer_source_ranges = vec![format!("10.{}.0.0/16", next(3)).parse().expect("range")];
    }
    sp
}

/// The proxy listener (no socket) of a UDP port (TCP ones use the shared
/// ports): the previous one of the same key, else a new one.
fn own_listener(sp: &ServicePort, previous: &Snapshot, id: &mut u64) -> Option<Arc<Listener>> {
    if sp.protocol != Protocol::Udp {
        return None;
    }
    let key =
        ListenKey { port: sp.name.clone(), protocol: sp.protocol, role: ListenRole::Proxy, wanted_port: 0 };
    let kept = previous.listeners.iter().find(|l| l.key == key).cloned();
    Some(kept.unwrap_or_else(|| {
        *id += 1;
        let addr = SocketAddr::from(([127, 0, 0, 1], 20_000 + (*id % 10_000) as u16));
        Arc::new(Listener::without_sockets(ListenerId(*id), key, addr))
    }))
}

#[test]
fn random_changes_synced_now_and_then_give_the_rules_of_the_whole_snapshot_looking_at_changed_chunks_only() {
    const NAMES: u64 = 60;
    const STEPS: usize = 200;
    let mut next = rng();
    let (options, registry, metrics, source) = (
        BalanceOptions::default(),
        HealthRegistry::default(),
        Arc::new(Metrics::new(1)),
        SourceOptions::default(),
    );
    let ctx = BalanceContext { options: &options, registry: &registry, metrics: &metrics, source: &source };
    let mut id = 1_000u64;
    let shared = vec![Arc::new(Listener::without_sockets(
        ListenerId(1),
        ListenKey::shared(ListenRole::Proxy),
        "127.0.0.1:29999".parse().unwrap(),
    ))];
    let mut state: BTreeMap<ServicePortName, ServicePort> = BTreeMap::new();
    for i in (0..NAMES).step_by(2) {
        let sp = random_port(i, &mut next);
        state.insert(sp.name.clone(), sp);
    }
    let mut listeners = shared.clone();
    listeners.extend(state.values().filter_map(|sp| own_listener(sp, &Snapshot::default(), &mut id)));
    let mut snap =
        Arc::new(Snapshot::new(1, state.values().cloned().collect(), listeners, &Snapshot::default(), &ctx));
    let mut d = DesiredRules::default();
    step(&mut d, &snap);
    let (mut behind, mut small_syncs) = (0, 0);
    for round in 0..STEPS {
        // One port set or removed, now and then a whole rebuild.
        let sp = random_port(next(NAMES), &mut next);
        let gone = next(3) == 0;
        let name = sp.name.clone();
        let old_listeners: Vec<ListenerId> =
            snap.listeners.iter().filter(|l| l.key.port == name).map(|l| l.id).collect();
        let generation = snap.generation + 1;
        snap = Arc::new(if next(25) == 0 {
            match gone {
                true => state.remove(&name),
                false => state.insert(name.clone(), sp),
            };
            let mut listeners = shared.clone();
            listeners.extend(state.values().filter_map(|sp| own_listener(sp, &snap, &mut id)));
            behind = usize::MAX / 2;
            Snapshot::new(generation, state.values().cloned().collect(), listeners, &snap, &ctx)
        } else if gone {
            state.remove(&name);
            let removed = [name];
            let update = PortUpdate { set: vec![], removed: &removed, listeners: vec![], old_listeners };
            Snapshot::update(&snap, generation, update, &ctx)
        } else {
            let listeners = own_listener(&sp, &snap, &mut id).into_iter().collect();
            state.insert(name, sp.clone());
            let update = PortUpdate { set: vec![Arc::new(sp)], removed: &[], listeners, old_listeners };
            Snapshot::update(&snap, generation, update, &ctx)
        });
        behind += 1;
        // The syncer runs now and then, often several snapshots behind.
        if next(3) != 0 {
            continue;
        }
        let u = step(&mut d, &snap);
        d.entries.check();
        assert_eq!(d.entries.len(), state.len(), "round {round}");
        // Tiny chunks (at most 8 ports): a few changes look at a few chunks.
        if behind <= 2 {
            assert!(u.examined <= 9 * behind, "round {round}: {} looked at, {behind} behind", u.examined);
            small_syncs += 1;
        }
        behind = 0;
    }
    assert!(small_syncs > 10, "the incremental path ran ({small_syncs} times)");
}

#[test]
fn an_entry_stays_small() {
    // One per service port (100k on a large node), each boxed: the inputs
    // are an optional box, the claims one key inline (most ports claim
    // one) or a boxed slice, the target proxy ports derived. 56 B is an
    // allocator size class, and spares most ports a 24 B allocation.
    assert_eq!(std::mem::size_of::<Keys>(), 24);
    assert_eq!(std::mem::size_of::<Entry>(), 56);
}

#[test]
fn a_rule_holds_its_ports_newest_spec_and_keeps_no_older_one_alive() {
    // Rules name their port by its spec (shared, 8 bytes). A new version
    // of the port making the same rules (its endpoints changed) keeps its
    // claims, and its rule moves to the new spec: the old one, with its
    // endpoints, goes with the snapshot that held it.
    let mut a = spec("a", Protocol::Tcp, "10.96.0.1", 2);
    let mut d = DesiredRules::default();
    let s1 = snapshot(1, std::slice::from_ref(&a), &Snapshot::default());
    step(&mut d, &s1);
    let old = Arc::downgrade(&s1.port(&a.name).expect("a").spec);
    a.endpoints.push(Endpoint::ready(EndpointAddr(SocketAddr::from(([10, 0, 0, 9], 8080)))));
    let s2 = snapshot(2, std::slice::from_ref(&a), &s1);
    assert_eq!(step(&mut d, &s2).ports_changed, 0, "the same rules: claims kept");
    drop(s1);
    assert!(old.upgrade().is_none(), "the old spec is dropped with its snapshot");
    let key = RuleKey {
        protocol: Protocol::Tcp,
        daddr: crate::model::ServiceVip("10.96.0.1".parse().unwrap()),
        dport: 80,
    };
    let held = d.rules().redirects[&key].service.as_ref().expect("named");
    assert!(Arc::ptr_eq(held, &s2.port(&a.name).expect("a").spec));
    // A version with other rules (a second cluster IP) is claimed again:
    // the rule it keeps as it was moves to the new spec too.
    let old = Arc::downgrade(&s2.port(&a.name).expect("a").spec);
    a.cluster_ips.push("10.96.0.2".parse().unwrap());
    let s3 = snapshot(3, std::slice::from_ref(&a), &s2);
    assert_eq!(step(&mut d, &s3).ports_changed, 1);
    drop(s2);
    assert!(old.upgrade().is_none(), "the old spec is dropped with its snapshot");
}
