//! The desired interception rules of a snapshot, and the difference between
//! two sets of them. Pure: no I/O except [`Locality::from_interfaces`].
//!
//! A redirect is `(protocol, daddr, dport) -> proxy port`. Only addresses
//! that no interface of this node carries need one: every cluster IP, and
//! the externalIPs and LoadBalancer ingress IPs that are not local (the data
//! plane listens on local ones itself, and on node ports). Cluster IPs go to
//! the service port's proxy port (internal scope); external and LB IPs go to
//! its external proxy port, so `externalTrafficPolicy` applies to them too.
//! Besides the redirects, a [`RuleSet`] holds the keys to reject (no
//! endpoints at all: UDP with ICMP port unreachable, TCP on a shared proxy
//! port with a reset), the keys to drop (TCP and UDP: endpoints exist, but
//! none in the traffic's scope, i.e. a `Local` traffic policy and none on
//! this node, as kube-proxy drops them) and each LoadBalancer IP's
//! `loadBalancerSourceRanges` (the firewall).
//!
//! Invariants:
//! - One key maps to one target: when two service ports claim the same
//!   `(protocol, daddr, dport)`, the first by name keeps it and the clash
//!   is reported.
//! - A key is redirected, rejected or dropped: one of the three, decided by
//!   the endpoints of its own family for a dual-stack service port.
//! - A rule's family matches its proxy port's: an IPv4 proxy port cannot
//!   accept traffic sent to `::1`. Each address goes to the proxy port of
//!   its family (a service port has one per family when the rules DNAT both
//!   to proxy addresses); an address with none of its family is skipped and
//!   counted, not redirected to nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock};

use ipnet::IpNet;

use crate::listen::ListenRole;
use crate::model::{Endpoint, IpFamily, Protocol, ProxyPort, ServicePort, ServicePortName, ServiceVip};
use crate::snapshot::{Emptiness, Snapshot};

/// What a rule matches: a packet's protocol, destination address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey {
    pub protocol: Protocol,
    pub daddr: ServiceVip,
    pub dport: u16,
}

impl RuleKey {
    pub fn is_ipv6(&self) -> bool {
        IpFamily::of(self.daddr.0) == IpFamily::V6
    }

    pub fn is_udp(&self) -> bool {
        self.protocol == Protocol::Udp
    }
}

/// Where a rule sends the packet, and for whom (kept for comments).
/// Targets are equal when they name the same proxy port and service port.
#[derive(Clone)]
pub struct Target {
    pub proxy_port: ProxyPort,
    /// The service port's spec, shared, for its name: 8 bytes in each of
    /// 100k rules, where a copy of the name took 48. None for a rule read
    /// back from a previous run (no name). The desired rules keep it the
    /// spec their entry holds, so a rule never keeps an older version of
    /// its port alive (`desired.rs`).
    pub service: Option<Arc<ServicePort>>,
}

/// What a rule with no service port names (read back from a previous
/// run's table).
static UNNAMED: LazyLock<ServicePortName> =
    LazyLock::new(|| ServicePortName { service: crate::model::ServiceName::new("", ""), port: "".into() });

impl Target {
    pub fn new(proxy_port: ProxyPort, service: &Arc<ServicePort>) -> Self {
        Self { proxy_port, service: Some(Arc::clone(service)) }
    }

    /// A target for a service port known by its name alone (a rule set
    /// made whole, not from a snapshot: tests, tools): a spec carrying the
    /// name is made for it.
    pub fn named(proxy_port: ProxyPort, name: ServicePortName) -> Self {
        let spec = ServicePort::new(name, crate::model::Origin::new(""), Protocol::Tcp, 0);
        Self { proxy_port, service: Some(Arc::new(spec)) }
    }

    /// A rule's target without a name (read back).
    pub fn unnamed(proxy_port: ProxyPort) -> Self {
        Self { proxy_port, service: None }
    }

    /// The service port it is for (empty when read back).
    pub fn name(&self) -> &ServicePortName {
        self.service.as_ref().map_or(&UNNAMED, |s| &s.name)
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.proxy_port == other.proxy_port && self.name() == other.name()
    }
}

impl Eq for Target {}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("proxy_port", &self.proxy_port).field("service", self.name()).finish()
    }
}

/// A full set of redirects, ordered so that rendered text is stable.
pub type Rules = BTreeMap<RuleKey, Target>;

/// Everything the backends program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub redirects: Rules,
    /// Keys with no endpoints in scope: UDP rejected with ICMP port
    /// unreachable, as kube-proxy does; TCP (shared ports only) reset.
    pub reject: BTreeSet<RuleKey>,
    /// Keys whose service port has endpoints, but none in scope (a `Local`
    /// policy and none on this node): dropped, TCP and UDP, as kube-proxy.
    pub dropped: BTreeSet<RuleKey>,
    /// LoadBalancer IP keys with `loadBalancerSourceRanges` of their family:
    /// packets from any other source are dropped.
    pub firewall: BTreeMap<RuleKey, Vec<IpNet>>,
    /// Transparent mode's reply mark, when some endpoint gets its client's
    /// address: the backend marks packets of transparent sockets with it.
    pub transparent: Option<u32>,
}

impl RuleSet {
    pub fn from_redirects(redirects: Rules) -> Self {
        Self { redirects, ..Self::default() }
    }

    /// Every UDP key the set intercepts (redirected, rejected or dropped).
    pub fn udp_keys(&self) -> impl Iterator<Item = RuleKey> + '_ {
        self.redirects.keys().chain(&self.reject).chain(&self.dropped).copied().filter(RuleKey::is_udp)
    }
}

/// The addresses of this node's interfaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    addrs: HashSet<IpAddr>,
}

impl Locality {
    /// The addresses on this node's interfaces right now (of the network
    /// namespace ringport runs in). An error reads as "none local", which
    /// errs towards a rule the data plane would not have needed.
    pub fn from_interfaces() -> Self {
        Self::from_addrs(if_addrs::get_if_addrs().unwrap_or_default().into_iter().map(|i| i.ip()))
    }

    pub fn from_addrs(addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        Self { addrs: addrs.into_iter().collect() }
    }

    pub fn is_local(&self, ip: IpAddr) -> bool {
        self.addrs.contains(&ip)
    }
}

/// One service port as the rules see it. Every array is per family,
/// `[IPv4, IPv6]`: each address goes to the proxy port of its family, and is
/// judged by its family's endpoints.
#[derive(Clone, Copy, Debug)]
pub struct PortRules<'a> {
    pub spec: &'a Arc<ServicePort>,
    /// Its proxy ports (internal scope: cluster IPs), where bound.
    pub proxy: [Option<SocketAddr>; 2],
    /// Its external proxy ports (external scope: non-local external and LB
    /// IPs); the family's proxy port serves them when there is none.
    pub external_proxy: [Option<SocketAddr>; 2],
    /// Whether each family's endpoints can take traffic.
    pub emptiness: [Emptiness; 2],
    /// Its proxy ports are shared (`--proxy-port-mode shared`): none can
    /// be paused, so a TCP key with no endpoint is rejected (TCP reset).
    pub shared: bool,
}

impl<'a> PortRules<'a> {
    /// A service port with endpoints in both scopes and one proxy port.
    pub fn new(spec: &'a Arc<ServicePort>, proxy: SocketAddr) -> Self {
        let full = Emptiness { internal: false, external: false, has_endpoints: has_endpoints(spec) };
        Self { spec, proxy: [None; 2], external_proxy: [None; 2], emptiness: [full; 2], shared: false }
            .with_proxy(proxy)
    }

    /// With `addr` as the proxy port of its family.
    pub fn with_proxy(mut self, addr: SocketAddr) -> Self {
        self.proxy[family(addr.ip())] = Some(addr);
        self
    }

    /// With `addr` as the external proxy port of its family.
    pub fn with_external_proxy(mut self, addr: SocketAddr) -> Self {
        self.external_proxy[family(addr.ip())] = Some(addr);
        self
    }

    /// `(no endpoint in scope, endpoints at all)` for traffic to `ip`.
    fn emptiness(&self, ip: IpAddr, external: bool) -> (bool, bool) {
        let e = self.emptiness[family(ip)];
        (if external { e.external } else { e.internal }, e.has_endpoints)
    }

    /// The proxy port for traffic to `ip` in one scope: of `ip`'s family,
    /// the external one falling back to the internal one as above.
    fn target(&self, ip: IpAddr, external: bool) -> Option<SocketAddr> {
        let family = family(ip);
        let internal = self.proxy[family];
        if external { self.external_proxy[family].or(internal) } else { internal }
    }
}

/// The index of `ip`'s family in [`PortRules`]' arrays.
fn family(ip: IpAddr) -> usize {
    usize::from(IpFamily::of(ip) == IpFamily::V6)
}

/// Whether a service port has any endpoint that could serve (kube-proxy's
/// `hasEndpoints`): ready, or serving while terminating.
pub fn has_endpoints(spec: &ServicePort) -> bool {
    spec.endpoints.iter().any(Endpoint::usable)
}

/// The rules a snapshot wants, and what could not be expressed.
#[derive(Debug, Default)]
pub struct Desired {
    pub rules: RuleSet,
    /// `(key, kept, dropped)`: two service ports claimed one key.
    pub clashes: Vec<(RuleKey, ServicePortName, ServicePortName)>,
    /// Addresses of the other family than their proxy port's.
    pub wrong_family: usize,
    /// LoadBalancer IPs left open because every `loadBalancerSourceRanges`
    /// entry is of the other family.
    pub open_without_ranges: Vec<(RuleKey, ServicePortName)>,
}

/// The rules for `ports`.
pub fn desired<'a>(ports: impl IntoIterator<Item = PortRules<'a>>, local: &Locality) -> Desired {
    let mut out = Desired::default();
    let mut owner: HashMap<RuleKey, &ServicePortName> = HashMap::new();
    for p in ports {
        let sp = p.spec;
        for (key, external) in redirected_keys(sp, local) {
            let ip = &key.daddr.0;
            let (empty, has_endpoints) = p.emptiness(*ip, external);
            let Some(proxy) = p.target(*ip, external) else {
                out.wrong_family += 1;
                continue;
            };
            match owner.get(&key) {
                Some(kept) if **kept != sp.name => {
                    out.clashes.push((key, (*kept).clone(), sp.name.clone()));
                    continue;
                }
                Some(_) => continue,
                None => {
                    owner.insert(key, &sp.name);
                }
            }
            // Endpoints elsewhere, none in scope: dropped, as kube-proxy.
            // None at all: UDP rejected; TCP too on a shared port, else a
            // paused proxy port answers SYN with RST.
            if empty && has_endpoints {
                out.rules.dropped.insert(key);
            } else if empty && (key.is_udp() || p.shared) {
                out.rules.reject.insert(key);
            } else {
                let target = Target::new(ProxyPort(proxy.port()), sp);
                out.rules.redirects.insert(key, target);
            }
        }
        // A port that accepts PROXY headers is reached from the load
        // balancer, not the client: ranges listing the clients would drop
        // the balancer. ringport judges the client its header names
        // instead (`snapshot::admits`), and `--proxy-protocol-trusted-cidrs`
        // the balancer.
        if !sp.load_balancer_source_ranges.is_empty() && !accepts_headers(sp) {
            for ip in &sp.load_balancer_ips {
                let key = RuleKey { protocol: sp.protocol, daddr: ServiceVip(*ip), dport: sp.port };
                let same_family: Vec<IpNet> = sp
                    .load_balancer_source_ranges
                    .iter()
                    .filter(|r| IpFamily::of(r.addr()) == IpFamily::of(*ip))
                    .copied()
                    .collect();
                // As kube-proxy: ranges are filtered by the IP's family, and
                // an IP none of them applies to stays open.
                if same_family.is_empty() {
                    out.open_without_ranges.push((key, sp.name.clone()));
                    continue;
                }
                out.rules.firewall.entry(key).or_insert(same_family);
            }
        }
    }
    out
}

/// Whether `sp`'s clients come through a load balancer that names them in
/// a PROXY header (TCP only: UDP ports ignore the annotation).
fn accepts_headers(sp: &ServicePort) -> bool {
    sp.protocol == Protocol::Tcp && sp.proxy_protocol.accept.is_some()
}

/// Every key of `sp` the rules redirect, and whether it is external: its
/// cluster IPs, then its externalIPs and LoadBalancer IPs not local to this
/// node (the data plane listens on local ones itself). What [`desired`]
/// programs and what a shared proxy port's destination map routes
/// (`snapshot::destinations`): one locality rule for both.
pub fn redirected_keys<'a>(
    sp: &'a ServicePort,
    local: &'a Locality,
) -> impl Iterator<Item = (RuleKey, bool)> + 'a {
    let remote = sp.external_ips.iter().chain(&sp.load_balancer_ips).filter(|ip| !local.is_local(**ip));
    let key = |ip: &IpAddr| RuleKey { protocol: sp.protocol, daddr: ServiceVip(*ip), dport: sp.port };
    sp.cluster_ips.iter().map(move |ip| (key(ip), false)).chain(remote.map(move |ip| (key(ip), true)))
}

/// The rules of a published snapshot: every service port with a bound
/// proxy port, its own or (TCP in shared mode) the shared one.
pub fn from_snapshot(snapshot: &Snapshot, local: &Locality) -> Desired {
    let mut proxies: HashMap<(&ServicePortName, ListenRole), SocketAddr> = HashMap::new();
    for l in snapshot.listeners.iter().filter(|l| l.key.role.is_proxy()) {
        proxies.insert((&l.key.port, l.key.role), l.addr);
    }
    let shared = Some(snapshot.shared_proxies()).filter(|s| s.iter().any(Option::is_some));
    let ports = snapshot.ports.iter().filter_map(|p| {
        let role = |role| proxies.get(&(&p.spec.name, role)).copied();
        // A shared port serves both scopes (it routes by destination);
        // such a port has no external proxy port of its own.
        let shared = shared.filter(|_| p.spec.protocol == Protocol::Tcp);
        let proxy = shared.unwrap_or([role(ListenRole::Proxy), role(ListenRole::Proxy6)]);
        proxy.iter().any(Option::is_some).then(|| PortRules {
            spec: &p.spec,
            proxy,
            external_proxy: [role(ListenRole::ExternalProxy), role(ListenRole::ExternalProxy6)],
            emptiness: [IpFamily::V4, IpFamily::V6].map(|f| p.emptiness(f)),
            shared: shared.is_some(),
        })
    });
    desired(ports, local)
}

/// What turns one rule set into another. A key whose target changed is
/// both removed and added. The firewall has no incremental form: when it
/// changes, the backends rewrite everything.
///
/// An add names its proxy port alone, what a backend writes: the service
/// it is for is in the new rules (a first sync adds 100k keys, and a
/// `Target` each would be a second copy of those rules' names).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub remove: Vec<RuleKey>,
    pub add: Vec<(RuleKey, ProxyPort)>,
    pub unreject: Vec<RuleKey>,
    pub reject: Vec<RuleKey>,
    pub undrop: Vec<RuleKey>,
    pub drop: Vec<RuleKey>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.add.is_empty()
            && self.unreject.is_empty()
            && self.reject.is_empty()
            && self.undrop.is_empty()
            && self.drop.is_empty()
    }

    /// The UDP keys whose fate changed: conntrack entries for them may
    /// steer a client down a path that no longer exists.
    pub fn udp_keys(&self) -> BTreeSet<RuleKey> {
        let changed = self.remove.iter().chain(self.add.iter().map(|(k, _)| k));
        let changed = changed.chain(&self.unreject).chain(&self.reject).chain(&self.undrop).chain(&self.drop);
        changed.copied().filter(RuleKey::is_udp).collect()
    }
}

/// The difference between two rule sets, `None` when the firewall changed
/// (which needs a full rewrite).
pub fn diff_sets(old: &RuleSet, new: &RuleSet) -> Option<Diff> {
    (old.firewall == new.firewall).then(|| diff_keys(old, new))
}

/// The difference in redirects and rejects, whatever the firewall did:
/// which keys changed fate (a firewall change alone changes none).
pub fn diff_keys(old: &RuleSet, new: &RuleSet) -> Diff {
    let mut d = diff(&old.redirects, &new.redirects);
    d.unreject = old.reject.difference(&new.reject).copied().collect();
    d.reject = new.reject.difference(&old.reject).copied().collect();
    d.undrop = old.dropped.difference(&new.dropped).copied().collect();
    d.drop = new.dropped.difference(&old.dropped).copied().collect();
    d
}
/// One walk over both sorted sets: linear, which matters at 100k rules.
pub fn diff(old: &Rules, new: &Rules) -> Diff {
    let mut d = Diff::default();
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => return d,
            (Some((ok, _)), None) => {
                d.remove.push(**ok);
                o.next();
            }
            (None, Some((nk, nt))) => {
                d.add.push((**nk, nt.proxy_port));
                n.next();
            }
            (Some((ok, ot)), Some((nk, nt))) => match ok.cmp(nk) {
                std::cmp::Ordering::Less => {
                    d.remove.push(**ok);
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    d.add.push((**nk, nt.proxy_port));
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if ot != nt {
                        d.remove.push(**ok);
                        d.add.push((**nk, nt.proxy_port));
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }
}

#[cfg(test)]
mod tests;
