//! Where a connection to a shared proxy port was going: `(protocol,
//! original destination IP, port) -> (service port, scope, family)`, kept
//! by [`Destinations`] from the service ports (whole by
//! [`Destinations::build`], or a change on top of the previous snapshot's
//! by [`Destinations::with`]), and looked up once per connection a shared
//! proxy port accepts ([`Snapshot::route_to`](super::Snapshot::route_to),
//! with the snapshot's other shared-port queries).
//!
//! Invariants:
//! - Built from exactly the keys the rules DNAT to a shared port, by the
//!   rules' own function (`redirect::rules::redirected_keys`): every
//!   cluster IP (internal scope) and every externalIP and LoadBalancer IP
//!   not local to this node (external scope) of a TCP service port. A
//!   local one is left out here as there: else a Service whose cluster IP
//!   is another's local external IP would be routed to the other.
//! - One key, one service port: when several claim the same key, the first
//!   by name keeps it, as the rules' own clash rule (`redirect::rules`), so
//!   a connection goes where the rule that sent it says. Every claimant is
//!   kept, in name order, so the next takes over when the first goes.
//! - Values are the service ports' states in the snapshot that holds the
//!   map (a port set by a change claims its keys again with its new
//!   state), never a position in some list, so the map stays right when
//!   other ports come and go around it and a connection needs no second
//!   lookup. A key's scope and family are not kept: they follow from the
//!   key and its port (internal for one of the port's cluster IPs).
//! - A change costs what it changes: its ports' old keys lose their claims,
//!   the new ones gain them, in shards shared with the previous snapshot
//!   (`routes::Sharded`). Only a change of the node's addresses (which
//!   decide what is local) or the first shared port rebuilds it whole.

use std::net::{IpAddr, SocketAddr};

use std::sync::Arc;

use super::routes::Sharded;
use super::{PortState, Route};
use crate::balance::eligible::Scope;
use crate::listen::ListenRole;
use crate::model::{IpFamily, Protocol, ServicePort};
use crate::redirect::rules::{Locality, redirected_keys};

/// What a redirected connection's original destination stands for.
#[derive(Clone, Copy, Debug)]
pub struct Destination<'a> {
    /// The service port's state in the snapshot that holds this map.
    pub port: &'a Arc<PortState>,
    /// Internal for a cluster IP, external for an external or LB IP.
    pub scope: Scope,
    /// The address's family: a dual-stack port balances each apart.
    pub family: IpFamily,
}

type Key = (Protocol, IpAddr, u16);

/// The map of every address a shared proxy port may be sent.
#[derive(Debug, Default, Clone)]
pub struct Destinations {
    /// Each key's first claimant by service port name: the one it goes to.
    /// One pointer a key (100k keys hold one each, at 32 bytes an entry).
    map: Sharded<Key, Arc<PortState>>,
    /// The other claimants of a key claimed more than once, in name order
    /// (the next takes the key when the first goes); empty for most.
    rest: Sharded<Key, Vec<Arc<PortState>>>,
    /// The node's addresses the map was built with.
    local: Locality,
}

impl Destinations {
    /// The destinations of `ports`' TCP service ports (UDP ones keep
    /// proxy ports of their own).
    pub fn build<'a>(ports: impl IntoIterator<Item = &'a Arc<PortState>>, local: &Locality) -> Self {
        let mut d = Self { map: Sharded::default(), rest: Sharded::default(), local: local.clone() };
        for port in ports {
            d.claim(port);
        }
        d
    }

    /// These destinations after a change: `old`, the previous versions of
    /// the ports changed or removed, give up their keys; `new`, the ports
    /// set, claim theirs. Rebuilt whole from `all` (every port after the
    /// change) when the node's addresses are no longer those it was built
    /// with.
    pub fn with<'a>(
        &self,
        old: impl IntoIterator<Item = &'a ServicePort>,
        new: impl IntoIterator<Item = &'a Arc<PortState>>,
        local: &Locality,
        all: impl IntoIterator<Item = &'a Arc<PortState>>,
    ) -> Self {
        if *local != self.local {
            return Self::build(all, local);
        }
        let mut next = self.clone();
        for sp in old {
            next.unclaim(sp);
        }
        for port in new {
            next.claim(port);
        }
        next
    }

    /// The keys `sp` asks for, each once (the first scope given wins).
    fn keys<'a>(&'a self, sp: &'a ServicePort) -> impl Iterator<Item = (Key, Scope)> + 'a {
        let tcp = sp.protocol == Protocol::Tcp;
        let keys = redirected_keys(sp, &self.local).filter(move |_| tcp);
        let mut seen: Vec<Key> = Vec::new();
        keys.filter_map(move |(key, external)| {
            let key = (sp.protocol, key.daddr.0.to_canonical(), sp.port);
            let scope = if external { Scope::External } else { Scope::Internal };
            (!seen.contains(&key)).then(|| {
                seen.push(key);
                (key, scope)
            })
        })
    }

    fn claim(&mut self, port: &Arc<PortState>) {
        let name = &port.spec.name;
        let keys: Vec<Key> = self.keys(&port.spec).map(|(key, _)| key).collect();
        for key in keys {
            let Some(first) = self.map.get_mut(&key) else {
                self.map.insert(key, Arc::clone(port));
                continue;
            };
            let other = match first.spec.name.cmp(name) {
                std::cmp::Ordering::Equal => {
                    *first = Arc::clone(port);
                    continue;
                }
                // It comes first by name: the first so far is the next.
                std::cmp::Ordering::Greater => std::mem::replace(first, Arc::clone(port)),
                std::cmp::Ordering::Less => Arc::clone(port),
            };
            let Some(rest) = self.rest.get_mut(&key) else {
                self.rest.insert(key, vec![other]);
                continue;
            };
            match rest.binary_search_by(|p| p.spec.name.cmp(&other.spec.name)) {
                Ok(i) => rest[i] = other,
                Err(i) => rest.insert(i, other),
            }
        }
    }

    fn unclaim(&mut self, sp: &ServicePort) {
        let keys: Vec<Key> = self.keys(sp).map(|(key, _)| key).collect();
        for key in keys {
            let Some(first) = self.map.get_mut(&key) else { continue };
            if first.spec.name != sp.name {
                if let Some(rest) = self.rest.get_mut(&key) {
                    rest.retain(|p| p.spec.name != sp.name);
                    if rest.is_empty() {
                        self.rest.remove(&key);
                    }
                }
                continue;
            }
            // The first goes: the next by name takes the key, if any.
            let next = self.rest.get_mut(&key).map(|rest| rest.remove(0));
            match next {
                Some(next) => {
                    *first = next;
                    if self.rest.get(&key).is_some_and(Vec::is_empty) {
                        self.rest.remove(&key);
                    }
                }
                None => drop(self.map.remove(&key)),
            }
        }
    }

    /// What `to` (a connection's original destination) stands for.
    pub fn get(&self, protocol: Protocol, to: SocketAddr) -> Option<Destination<'_>> {
        let key = (protocol, to.ip().to_canonical(), to.port());
        self.map.get(&key).map(|port| destination(&key, port))
    }

    /// How many addresses it maps.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key with its claimants by name (to compare two maps).
    #[cfg(test)]
    pub(super) fn entries(
        &self,
    ) -> std::collections::HashMap<Key, Vec<(crate::model::ServicePortName, Scope, IpFamily)>> {
        let named = |k: &Key, p| {
            let d = destination(k, p);
            (d.port.spec.name.clone(), d.scope, d.family)
        };
        let claimants = |k: &Key, first| std::iter::once(first).chain(self.rest.get(k).into_iter().flatten());
        self.map.iter().map(|(k, first)| (*k, claimants(k, first).map(|p| named(k, p)).collect())).collect()
    }
}

/// `key` as its claimant `port` sees it: internal for one of its cluster
/// IPs, as `keys` made it (a cluster IP comes first there), else external.
fn destination<'a>(key: &Key, port: &'a Arc<PortState>) -> Destination<'a> {
    let internal = port.spec.cluster_ips.iter().any(|ip| ip.to_canonical() == key.1);
    let scope = if internal { Scope::Internal } else { Scope::External };
    Destination { port, scope, family: IpFamily::of(key.1) }
}

impl super::Snapshot {
    /// The service port a connection a shared proxy port accepted was
    /// going to (`to`, its original destination), its balancer, and the
    /// listener role it stands in for (as the per-service proxy port that
    /// would have taken it): one hash lookup.
    pub fn route_to(&self, protocol: Protocol, to: SocketAddr) -> Option<(Route<'_>, ListenRole)> {
        let d = self.destinations.get(protocol, to)?;
        let port = Some(d.port).filter(|p| p.spec.protocol == protocol)?;
        let role = match (d.scope, d.family) {
            (Scope::Internal, IpFamily::V4) => ListenRole::Proxy,
            (Scope::Internal, IpFamily::V6) => ListenRole::Proxy6,
            (Scope::External, IpFamily::V4) => ListenRole::ExternalProxy,
            (Scope::External, IpFamily::V6) => ListenRole::ExternalProxy6,
        };
        Some((Route { port, balancer: port.balancer(d.scope, d.family) }, role))
    }

    /// Count a connection to a shared port that no rule sent (worker
    /// `worker`'s slot).
    pub fn count_unmatched(&self, worker: usize) {
        if let Some(n) = self.unmatched.get(worker).or_else(|| self.unmatched.last()) {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The shared proxy ports' addresses, `[IPv4, IPv6]` (none in
    /// per-service mode).
    pub fn shared_proxies(&self) -> [Option<SocketAddr>; 2] {
        let mut out = [None; 2];
        for l in self.listeners.iter().filter(|l| l.key.is_shared()) {
            out[usize::from(l.addr.is_ipv6())] = Some(l.addr);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::BalanceOptions;
    use crate::balance::health::HealthRegistry;
    use crate::metrics::Metrics;
    use crate::model::{Origin, ServiceName, ServicePortName};
    use crate::snapshot::BalanceContext;
    use crate::source_ip::SourceOptions;

    /// The served states of `ports`, as a snapshot holds them.
    fn states(ports: &[&ServicePort]) -> Vec<Arc<PortState>> {
        let (options, registry, metrics, source) = (
            BalanceOptions::default(),
            HealthRegistry::default(),
            Arc::new(Metrics::new(1)),
            SourceOptions::default(),
        );
        let ctx =
            BalanceContext { options: &options, registry: &registry, metrics: &metrics, source: &source };
        ports.iter().map(|sp| Arc::new(PortState::build(Arc::new((*sp).clone()), None, &ctx))).collect()
    }

    fn sp(name: &str, protocol: Protocol, port: u16) -> ServicePort {
        let name = ServicePortName { service: ServiceName::new("default", name), port: "".into() };
        ServicePort::new(name, Origin::new("test"), protocol, port)
    }

    fn to(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cluster_ips_are_internal_external_and_lb_ips_external_and_udp_ports_are_left_out() {
        let mut web = sp("web", Protocol::Tcp, 80);
        web.cluster_ips = vec!["10.96.0.10".parse().unwrap(), "fd00:96::10".parse().unwrap()];
        web.external_ips = vec!["10.97.0.1".parse().unwrap()];
        web.load_balancer_ips = vec!["10.98.0.1".parse().unwrap()];
        let mut dns = sp("dns", Protocol::Udp, 53);
        dns.cluster_ips = vec!["10.96.0.53".parse().unwrap()];
        let d = Destinations::build(&states(&[&web, &dns]), &Locality::default());
        assert_eq!(d.len(), 4);
        let got = |s| {
            d.get(Protocol::Tcp, to(s)).map(|d| (d.port.spec.name.service.name.clone(), d.scope, d.family))
        };
        assert_eq!(got("10.96.0.10:80"), Some(("web".into(), Scope::Internal, IpFamily::V4)));
        assert_eq!(got("[fd00:96::10]:80"), Some(("web".into(), Scope::Internal, IpFamily::V6)));
        assert_eq!(got("[::ffff:10.96.0.10]:80"), Some(("web".into(), Scope::Internal, IpFamily::V4)));
        assert_eq!(got("10.97.0.1:80").map(|g| g.1), Some(Scope::External));
        assert_eq!(got("10.98.0.1:80").map(|g| g.1), Some(Scope::External));
        assert_eq!(got("10.96.0.10:81"), None, "another port of the same address");
        assert!(d.get(Protocol::Udp, to("10.96.0.53:53")).is_none());
    }

    #[test]
    fn a_shared_port_routes_by_destination_always_serves_and_counts_what_maps_to_nothing() {
        use crate::balance::BalanceOptions;
        use crate::balance::health::HealthRegistry;
        use crate::listen::ProxyPortMode;
        use crate::metrics::Metrics;
        use crate::model::{Endpoint, EndpointAddr};
        use crate::snapshot::tests::loopback_binder;
        use crate::snapshot::{BalanceContext, Snapshot};
        use crate::source_ip::SourceOptions;
        let mut web = sp("web", Protocol::Tcp, 80);
        web.cluster_ips = vec!["10.96.0.10".parse().unwrap()];
        web.external_ips = vec!["10.97.0.10".parse().unwrap()];
        web.endpoints = vec![Endpoint::ready(EndpointAddr(to("10.0.0.1:8080")))];
        let mut empty = sp("empty", Protocol::Tcp, 80);
        empty.cluster_ips = vec!["10.96.0.20".parse().unwrap()];
        let mut binder = loopback_binder(2, true, ProxyPortMode::Shared, false);
        let ports = vec![web, empty];
        let (listeners, errors) = binder.bind(&ports, &[]);
        assert!(errors.iter().all(|e| e.is_benign()), "only the non-local externalIP: {errors:?}");
        let (options, registry, metrics, source) = (
            BalanceOptions::default(),
            HealthRegistry::default(),
            Arc::new(Metrics::new(2)),
            SourceOptions::default(),
        );
        let ctx =
            BalanceContext { options: &options, registry: &registry, metrics: &metrics, source: &source };
        let snap = Snapshot::new(1, ports, listeners, &Snapshot::default(), &ctx);
        let [v4, v6] = snap.shared_proxies();
        let (shared, v6) = (v4.expect("a shared IPv4 port"), v6);
        assert!(v6.is_none());
        let id = snap.listeners.iter().find(|l| l.addr == shared).map(|l| l.id).expect("listener");
        assert!(snap.route(id).is_none(), "a shared port has no route of its own");
        assert!(snap.serves(id), "never paused, even with an empty service port behind it");
        let routed = |s| {
            snap.route_to(Protocol::Tcp, to(s)).map(|(r, role)| (r.port.spec.name.service.name.clone(), role))
        };
        assert_eq!(routed("10.96.0.10:80"), Some(("web".into(), ListenRole::Proxy)));
        assert_eq!(routed("10.97.0.10:80"), Some(("web".into(), ListenRole::ExternalProxy)));
        assert_eq!(routed("10.96.0.20:80"), Some(("empty".into(), ListenRole::Proxy)));
        assert_eq!(routed(&shared.to_string()), None, "straight to the shared port: nothing");
        snap.count_unmatched(1);
        snap.count_unmatched(7);
        let counted: u64 =
            metrics.unmatched.iter().map(|n| n.load(std::sync::atomic::Ordering::Relaxed)).sum();
        assert_eq!(counted, 2);
    }

    #[test]
    fn the_first_of_two_ports_on_one_key_keeps_it() {
        let (mut a, mut b) = (sp("a", Protocol::Tcp, 80), sp("b", Protocol::Tcp, 80));
        a.cluster_ips = vec!["10.96.0.1".parse().unwrap()];
        b.cluster_ips = vec!["10.96.0.1".parse().unwrap()];
        let d = Destinations::build(&states(&[&a, &b]), &Locality::default());
        assert_eq!(
            d.get(Protocol::Tcp, to("10.96.0.1:80")).map(|d| d.port.spec.name.service.name.as_str()),
            Some("a")
        );
    }

    #[test]
    fn claimants_of_one_key_come_and_go_in_name_order_and_one_alone_is_the_maps_alone() {
        // Pinned: 100k keys hold one each, most of them one claimant: a
        // key and a pointer, nothing else.
        assert_eq!(std::mem::size_of::<(Key, Arc<PortState>)>(), 32);
        let mut ports: Vec<ServicePort> = ["c", "a", "b"].map(|n| sp(n, Protocol::Tcp, 80)).into();
        for p in &mut ports {
            p.cluster_ips = vec!["10.96.0.1".parse().unwrap()];
        }
        let states = states(&ports.iter().collect::<Vec<_>>());
        let (local, key) = (Locality::default(), (Protocol::Tcp, "10.96.0.1".parse().unwrap(), 80));
        let names = |d: &Destinations| -> Vec<String> {
            let entries = d.entries();
            entries.get(&key).into_iter().flatten().map(|(n, _, _)| n.service.name.to_string()).collect()
        };
        let gone =
            |d: &Destinations, i: usize| d.with([&*states[i].spec], std::iter::empty(), &local, &states);
        let d = Destinations::build(&states, &local);
        assert_eq!(names(&d), ["a", "b", "c"], "each once, in name order");
        let d = d.with([&*states[2].spec], [&states[2]], &local, &states);
        assert_eq!(names(&d), ["a", "b", "c"], "set again: still once");
        let first =
            |d: &Destinations| d.get(Protocol::Tcp, to("10.96.0.1:80")).map(|d| d.port.spec.name.clone());
        assert_eq!(first(&d), Some(ports[1].name.clone()));
        let d = gone(&gone(&d, 2), 1);
        assert_eq!(names(&d), ["c"], "the first goes: the next takes the key");
        assert_eq!(first(&d), Some(ports[0].name.clone()));
        assert_eq!(d.rest.len(), 0, "one left: in the map alone");
        let d = gone(&d, 1);
        assert_eq!(names(&d), ["c"], "not a claimant: c stays");
        assert!(gone(&d, 0).is_empty(), "the last one goes: the key goes");
    }

    #[test]
    fn a_cluster_ip_that_is_another_ports_local_external_ip_goes_where_the_rules_send_it() {
        use crate::redirect::rules::{PortRules, desired};
        let vip: IpAddr = "10.200.0.1".parse().unwrap();
        // "a" sorts first and lists vip as a local externalIP: the data
        // plane listens there itself and no rule redirects it. "b"'s cluster
        // IP is the same address: the rule DNATs it, for b.
        let (mut a, mut b) = (sp("a", Protocol::Tcp, 80), sp("b", Protocol::Tcp, 80));
        a.cluster_ips = vec!["10.96.0.1".parse().unwrap()];
        a.external_ips = vec![vip];
        b.cluster_ips = vec![vip];
        let local = Locality::from_addrs([vip]);
        let d = Destinations::build(&states(&[&a, &b]), &local);
        let routed = d
            .get(Protocol::Tcp, SocketAddr::new(vip, 80))
            .map(|d| (d.port.spec.name.service.name.as_str(), d.scope));
        assert_eq!(routed, Some(("b", Scope::Internal)));
        let shared: SocketAddr = "127.0.0.1:30000".parse().unwrap();
        let rules = |sp| PortRules { shared: true, ..PortRules::new(sp, shared) };
        let (a, b) = (Arc::new(a), Arc::new(b));
        let want = desired([rules(&a), rules(&b)], &local);
        let key = want.rules.redirects.keys().find(|k| k.daddr.0 == vip).expect("a rule for vip");
        assert_eq!(want.rules.redirects[key].name(), &b.name, "the rule and the map agree");
    }
}
