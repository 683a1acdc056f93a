//! The desired redirect rules of a snapshot, and the difference between two
//! sets of them. Pure: no I/O except [`Locality::from_interfaces`].
//!
//! A rule is `(protocol, daddr, dport) -> proxy port`. Only addresses that
//! no interface of this node carries need one: every cluster IP, and the
//! externalIPs and LoadBalancer ingress IPs that are not local (the data
//! plane listens on local ones itself, and on node ports). A service port
//! without a bound proxy port gets no rule.
//!
//! Invariants:
//! - One key maps to one target: when two service ports claim the same
//!   `(protocol, daddr, dport)`, the first by name keeps it and the clash
//!   is reported.
//! - A rule's family matches its proxy port's: an IPv4 proxy port
//!   (`--bind-address 0.0.0.0`) cannot accept traffic redirected to `::1`,
//!   so IPv6 addresses are then skipped and counted, not redirected to
//!   nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use crate::dataplane::listen::ListenRole;
use crate::model::{Protocol, ProxyPort, ServicePort, ServicePortName, ServiceVip};
use crate::snapshot::Snapshot;

/// What a rule matches: a packet's protocol, destination address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey {
    pub protocol: Protocol,
    pub daddr: ServiceVip,
    pub dport: u16,
}

impl RuleKey {
    pub fn is_ipv6(&self) -> bool {
        self.daddr.0.is_ipv6()
    }
}

/// Where a rule sends the packet, and for whom (kept for comments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub proxy_port: ProxyPort,
    pub service: ServicePortName,
}

/// A full set of rules, ordered so that rendered text is stable.
pub type Rules = BTreeMap<RuleKey, Target>;

/// The addresses of this node's interfaces.
#[derive(Clone, Debug, Default)]
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

/// The rules a snapshot wants, and what could not be expressed.
#[derive(Debug, Default)]
pub struct Desired {
    pub rules: Rules,
    /// `(key, kept, dropped)`: two service ports claimed one key.
    pub clashes: Vec<(RuleKey, ServicePortName, ServicePortName)>,
    /// Addresses of the other family than their proxy port's.
    pub wrong_family: usize,
}

/// The rules for `ports`, each given with the address its proxy port is
/// bound to.
pub fn desired<'a>(
    ports: impl IntoIterator<Item = (&'a ServicePort, SocketAddr)>,
    local: &Locality,
) -> Desired {
    let mut out = Desired::default();
    for (sp, proxy) in ports {
        // TCP and UDP share the map (its key starts with the protocol).
        // A UDP port without endpoints gets no ICMP reject yet: its
        // datagrams reach the proxy port, which drops and counts them.
        let remote = sp.external_ips.iter().chain(&sp.load_balancer_ips).filter(|ip| !local.is_local(**ip));
        for ip in sp.cluster_ips.iter().chain(remote) {
            if ip.is_ipv6() != proxy.is_ipv6() {
                out.wrong_family += 1;
                continue;
            }
            let key = RuleKey { protocol: sp.protocol, daddr: ServiceVip(*ip), dport: sp.port };
            let target = Target { proxy_port: ProxyPort(proxy.port()), service: sp.name.clone() };
            match out.rules.get(&key) {
                Some(kept) if kept.service != sp.name => {
                    out.clashes.push((key, kept.service.clone(), sp.name.clone()));
                }
                Some(_) => {}
                None => {
                    out.rules.insert(key, target);
                }
            }
        }
    }
    out
}

/// The rules of a published snapshot: every service port with a bound
/// proxy port.
pub fn from_snapshot(snapshot: &Snapshot, local: &Locality) -> Desired {
    let proxies: HashMap<&ServicePortName, SocketAddr> = snapshot
        .listeners
        .iter()
        .filter(|l| l.key.role == ListenRole::Proxy)
        .map(|l| (&l.key.port, l.addr))
        .collect();
    let ports = snapshot.ports.iter().filter_map(|p| proxies.get(&p.spec.name).map(|addr| (&p.spec, *addr)));
    desired(ports, local)
}

/// What turns one rule set into another. A key whose target changed is
/// both removed and added.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub remove: Vec<RuleKey>,
    pub add: Vec<(RuleKey, Target)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
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
                d.add.push((**nk, (*nt).clone()));
                n.next();
            }
            (Some((ok, ot)), Some((nk, nt))) => match ok.cmp(nk) {
                std::cmp::Ordering::Less => {
                    d.remove.push(**ok);
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    d.add.push((**nk, (*nt).clone()));
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if ot != nt {
                        d.remove.push(**ok);
                        d.add.push((**nk, (*nt).clone()));
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Origin, ServiceName};

    fn sp(name: &str, protocol: Protocol, port: u16) -> ServicePort {
        let name = ServicePortName { service: ServiceName::new("default", name), port: String::new() };
        ServicePort::new(name, Origin("test".into()), protocol, port)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key(daddr: &str, dport: u16) -> RuleKey {
        RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip(ip(daddr)), dport }
    }

    fn v4_proxy(port: u16) -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], port))
    }

    #[test]
    fn cluster_ips_and_non_local_external_addresses_get_rules_and_local_ones_do_not() {
        let mut web = sp("web", Protocol::Tcp, 80);
        web.cluster_ips = vec![ip("10.96.0.10")];
        web.external_ips = vec![ip("10.97.0.1"), ip("10.200.0.1")];
        web.load_balancer_ips = vec![ip("10.98.0.1"), ip("10.200.0.2")];
        web.node_port = Some(30080);
        let local = Locality::from_addrs([ip("10.200.0.1"), ip("10.200.0.2")]);
        let d = desired([(&web, v4_proxy(31000))], &local);
        let keys: Vec<RuleKey> = d.rules.keys().copied().collect();
        assert_eq!(keys, vec![key("10.96.0.10", 80), key("10.97.0.1", 80), key("10.98.0.1", 80)]);
        assert!(d.rules.values().all(|t| t.proxy_port == ProxyPort(31000)));
    }

    #[test]
    fn udp_service_ports_get_rules_in_the_same_map() {
        let mut dns = sp("dns", Protocol::Udp, 53);
        dns.cluster_ips = vec![ip("10.96.0.53")];
        let d = desired([(&dns, v4_proxy(31000))], &Locality::default());
        let keys: Vec<RuleKey> = d.rules.keys().copied().collect();
        assert_eq!(
            keys,
            vec![RuleKey { protocol: Protocol::Udp, daddr: ServiceVip(ip("10.96.0.53")), dport: 53 }]
        );
    }

    #[test]
    fn ipv6_addresses_follow_an_ipv6_proxy_port_and_are_counted_when_the_family_differs() {
        let mut dual = sp("dual", Protocol::Tcp, 443);
        dual.cluster_ips = vec![ip("10.96.0.1"), ip("fd00:96::1")];
        let on_v4 = desired([(&dual, v4_proxy(31000))], &Locality::default());
        assert_eq!(on_v4.rules.keys().copied().collect::<Vec<_>>(), vec![key("10.96.0.1", 443)]);
        assert_eq!(on_v4.wrong_family, 1);
        let on_v6 = desired([(&dual, "[::]:31000".parse().unwrap())], &Locality::default());
        assert_eq!(on_v6.rules.keys().copied().collect::<Vec<_>>(), vec![key("fd00:96::1", 443)]);
    }

    #[test]
    fn two_service_ports_on_one_address_and_port_clash_and_the_first_keeps_it() {
        let (mut a, mut b) = (sp("a", Protocol::Tcp, 80), sp("b", Protocol::Tcp, 80));
        a.cluster_ips = vec![ip("10.96.0.1")];
        b.cluster_ips = vec![ip("10.96.0.1")];
        let d = desired([(&a, v4_proxy(31000)), (&b, v4_proxy(31001))], &Locality::default());
        assert_eq!(d.rules.len(), 1);
        assert_eq!(d.rules[&key("10.96.0.1", 80)].proxy_port, ProxyPort(31000));
        assert_eq!(d.clashes.len(), 1);
    }

    #[test]
    fn diff_removes_gone_keys_adds_new_ones_and_replaces_changed_targets() {
        let target = |port| Target {
            proxy_port: ProxyPort(port),
            service: ServicePortName { service: ServiceName::new("default", "x"), port: String::new() },
        };
        let old: Rules = [
            (key("10.96.0.1", 80), target(1)),
            (key("10.96.0.2", 80), target(2)),
            (key("10.96.0.3", 80), target(3)),
        ]
        .into_iter()
        .collect();
        let new: Rules = [
            (key("10.96.0.1", 80), target(1)),
            (key("10.96.0.3", 80), target(33)),
            (key("10.96.0.4", 80), target(4)),
        ]
        .into_iter()
        .collect();
        let d = diff(&old, &new);
        assert_eq!(d.remove, vec![key("10.96.0.2", 80), key("10.96.0.3", 80)]);
        assert_eq!(d.add, vec![(key("10.96.0.3", 80), target(33)), (key("10.96.0.4", 80), target(4))]);
        assert!(diff(&new, &new).is_empty());
    }
}
