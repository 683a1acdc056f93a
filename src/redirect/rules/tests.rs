//! Unit tests of the desired rules: keys, clashes, families, scopes.

use super::*;
use crate::model::{Endpoint, EndpointAddr, Origin, ServiceName};

fn sp(name: &str, protocol: Protocol, port: u16) -> ServicePort {
    let name = ServicePortName { service: ServiceName::new("default", name), port: "".into() };
    ServicePort::new(name, Origin::new("test"), protocol, port)
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
    web.node_port = std::num::NonZeroU16::new(30080);
    let local = Locality::from_addrs([ip("10.200.0.1"), ip("10.200.0.2")]);
    let web = Arc::new(web);
    let d = desired([PortRules::new(&web, v4_proxy(31000))], &local);
    let keys: Vec<RuleKey> = d.rules.redirects.keys().copied().collect();
    assert_eq!(keys, vec![key("10.96.0.10", 80), key("10.97.0.1", 80), key("10.98.0.1", 80)]);
    assert!(d.rules.redirects.values().all(|t| t.proxy_port == ProxyPort(31000)));
}

#[test]
fn udp_service_ports_get_rules_in_the_same_map() {
    let mut dns = sp("dns", Protocol::Udp, 53);
    dns.cluster_ips = vec![ip("10.96.0.53")];
    let dns = Arc::new(dns);
    let d = desired([PortRules::new(&dns, v4_proxy(31000))], &Locality::default());
    let keys: Vec<RuleKey> = d.rules.redirects.keys().copied().collect();
    assert_eq!(
        keys,
        vec![RuleKey { protocol: Protocol::Udp, daddr: ServiceVip(ip("10.96.0.53")), dport: 53 }]
    );
}

#[test]
fn ipv6_addresses_follow_an_ipv6_proxy_port_and_are_counted_when_the_family_differs() {
    let mut dual = sp("dual", Protocol::Tcp, 443);
    dual.cluster_ips = vec![ip("10.96.0.1"), ip("fd00:96::1")];
    let dual = Arc::new(dual);
    let on_v4 = desired([PortRules::new(&dual, v4_proxy(31000))], &Locality::default());
    assert_eq!(on_v4.rules.redirects.keys().copied().collect::<Vec<_>>(), vec![key("10.96.0.1", 443)]);
    assert_eq!(on_v4.wrong_family, 1);
    let on_v6 = desired([PortRules::new(&dual, "[::]:31000".parse().unwrap())], &Locality::default());
    assert_eq!(on_v6.rules.redirects.keys().copied().collect::<Vec<_>>(), vec![key("fd00:96::1", 443)]);
    // Dual-stack proxy ports: each address to the proxy port of its family.
    let both = PortRules::new(&dual, v4_proxy(31000)).with_proxy("[fd72::1]:31001".parse().unwrap());
    let d = desired([both], &Locality::default());
    assert_eq!(d.rules.redirects[&key("10.96.0.1", 443)].proxy_port, ProxyPort(31000));
    assert_eq!(d.rules.redirects[&key("fd00:96::1", 443)].proxy_port, ProxyPort(31001));
    assert_eq!(d.wrong_family, 0);
}

#[test]
fn ipv6_external_addresses_go_to_the_ipv6_external_proxy_port_or_else_the_ipv6_proxy_port() {
    let mut web = sp("web", Protocol::Tcp, 80);
    web.cluster_ips = vec![ip("fd00:96::10")];
    web.load_balancer_ips = vec![ip("fd00:98::1"), ip("10.98.0.1")];
    let p6 = |port| SocketAddr::from((ip("fd72::1"), port));
    let web = Arc::new(web);
    let p = PortRules::new(&web, v4_proxy(31000))
        .with_external_proxy(v4_proxy(32000))
        .with_proxy(p6(31001))
        .with_external_proxy(p6(32001));
    let d = desired([p], &Locality::default());
    assert_eq!(d.rules.redirects[&key("fd00:96::10", 80)].proxy_port, ProxyPort(31001));
    assert_eq!(d.rules.redirects[&key("fd00:98::1", 80)].proxy_port, ProxyPort(32001));
    assert_eq!(d.rules.redirects[&key("10.98.0.1", 80)].proxy_port, ProxyPort(32000));
    let no_external6 = PortRules { external_proxy: [Some(v4_proxy(32000)), None], ..p };
    let d = desired([no_external6], &Locality::default());
    assert_eq!(d.rules.redirects[&key("fd00:98::1", 80)].proxy_port, ProxyPort(31001));
}

#[test]
fn a_dual_stack_port_judges_each_address_by_its_own_familys_endpoints() {
    let mut dns = sp("dns", Protocol::Udp, 53);
    dns.cluster_ips = vec![ip("10.96.0.53"), ip("fd00:96::53")];
    // IPv4 endpoints only: the IPv6 ClusterIP is rejected, as kube-proxy's IPv6 proxier does.
    let none = Emptiness { internal: true, external: true, has_endpoints: false };
    let dns = Arc::new(dns);
    let p = PortRules {
        emptiness: [Emptiness { internal: false, external: false, has_endpoints: true }, none],
        ..PortRules::new(&dns, v4_proxy(31000)).with_proxy("[fd72::1]:31001".parse().unwrap())
    };
    let d = desired([p], &Locality::default());
    let udp = |a| RuleKey { protocol: Protocol::Udp, daddr: ServiceVip(ip(a)), dport: 53 };
    assert_eq!(d.rules.redirects.keys().copied().collect::<Vec<_>>(), vec![udp("10.96.0.53")]);
    assert_eq!(d.rules.reject.iter().copied().collect::<Vec<_>>(), vec![udp("fd00:96::53")]);
}

#[test]
fn two_service_ports_on_one_address_and_port_clash_and_the_first_keeps_it() {
    let (mut a, mut b) = (sp("a", Protocol::Tcp, 80), sp("b", Protocol::Tcp, 80));
    a.cluster_ips = vec![ip("10.96.0.1")];
    b.cluster_ips = vec![ip("10.96.0.1")];
    let (a, b) = (Arc::new(a), Arc::new(b));
    let d = desired(
        [PortRules::new(&a, v4_proxy(31000)), PortRules::new(&b, v4_proxy(31001))],
        &Locality::default(),
    );
    assert_eq!(d.rules.redirects.len(), 1);
    assert_eq!(d.rules.redirects[&key("10.96.0.1", 80)].proxy_port, ProxyPort(31000));
    assert_eq!(d.clashes.len(), 1);
}

#[test]
fn external_addresses_go_to_the_external_proxy_port_and_cluster_ips_to_the_proxy_port() {
    let mut web = sp("web", Protocol::Tcp, 80);
    web.cluster_ips = vec![ip("10.96.0.10")];
    web.load_balancer_ips = vec![ip("10.98.0.1")];
    let web = Arc::new(web);
    let p = PortRules::new(&web, v4_proxy(31000)).with_external_proxy(v4_proxy(32000));
    let d = desired([p], &Locality::default());
    assert_eq!(d.rules.redirects[&key("10.96.0.10", 80)].proxy_port, ProxyPort(31000));
    assert_eq!(d.rules.redirects[&key("10.98.0.1", 80)].proxy_port, ProxyPort(32000));
}

#[test]
fn a_udp_port_without_endpoints_is_rejected_not_redirected_and_tcp_is_still_redirected() {
    let mut dns = sp("dns", Protocol::Udp, 53);
    dns.cluster_ips = vec![ip("10.96.0.53")];
    let mut web = sp("web", Protocol::Tcp, 80);
    web.cluster_ips = vec![ip("10.96.0.10")];
    let none = Emptiness { internal: true, external: true, has_endpoints: false };
    let empty = |spec| PortRules { emptiness: [none; 2], ..PortRules::new(spec, v4_proxy(31000)) };
    let (dns, web) = (Arc::new(dns), Arc::new(web));
    let d = desired([empty(&dns), empty(&web)], &Locality::default());
    let udp = RuleKey { protocol: Protocol::Udp, daddr: ServiceVip(ip("10.96.0.53")), dport: 53 };
    assert_eq!(d.rules.reject.iter().copied().collect::<Vec<_>>(), vec![udp]);
    assert_eq!(d.rules.redirects.keys().copied().collect::<Vec<_>>(), vec![key("10.96.0.10", 80)]);
    assert!(d.rules.dropped.is_empty());
}

#[test]
fn endpoints_elsewhere_and_none_in_scope_are_dropped_for_tcp_and_udp_not_rejected() {
    let with_remote_endpoint = |name, protocol| {
        let mut spec = sp(name, protocol, 53);
        spec.cluster_ips = vec![ip(if protocol == Protocol::Udp { "10.96.0.53" } else { "10.96.0.54" })];
        spec.external_ips = vec![ip("10.97.0.1")];
        spec.endpoints = vec![Endpoint::ready(EndpointAddr("10.0.0.9:53".parse().unwrap()))];
        spec
    };
    let (dns, web) = (with_remote_endpoint("dns", Protocol::Udp), with_remote_endpoint("web", Protocol::Tcp));
    // externalTrafficPolicy Local and no local endpoint: only the
    // external scope is empty.
    let outside = Emptiness { internal: false, external: true, has_endpoints: true };
    let local_only = |spec| PortRules { emptiness: [outside; 2], ..PortRules::new(spec, v4_proxy(31000)) };
    let (dns, web) = (Arc::new(dns), Arc::new(web));
    let d = desired([local_only(&dns), local_only(&web)], &Locality::default());
    let k = |protocol, daddr: &str| RuleKey { protocol, daddr: ServiceVip(ip(daddr)), dport: 53 };
    assert_eq!(
        d.rules.dropped.iter().copied().collect::<Vec<_>>(),
        vec![k(Protocol::Tcp, "10.97.0.1"), k(Protocol::Udp, "10.97.0.1")]
    );
    assert!(d.rules.reject.is_empty(), "endpoints exist: nothing is rejected");
    assert_eq!(
        d.rules.redirects.keys().copied().collect::<Vec<_>>(),
        vec![k(Protocol::Tcp, "10.96.0.54"), k(Protocol::Udp, "10.96.0.53")]
    );
    let old = RuleSet::default();
    let diff = diff_keys(&old, &d.rules);
    assert_eq!((diff.drop.len(), diff.udp_keys().len()), (2, 2));
}

#[test]
fn source_ranges_guard_every_load_balancer_ip_local_or_not_with_ranges_of_its_family() {
    let mut web = sp("web", Protocol::Tcp, 80);
    web.load_balancer_ips = vec![ip("10.98.0.1"), ip("10.200.0.1")];
    web.load_balancer_source_ranges = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
    let local = Locality::from_addrs([ip("10.200.0.1")]);
    let web = Arc::new(web);
    let d = desired([PortRules::new(&web, v4_proxy(31000))], &local);
    assert_eq!(d.rules.firewall.len(), 2);
    assert_eq!(d.rules.firewall[&key("10.200.0.1", 80)], vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
    let mut plain = ServicePort::clone(&web);
    plain.load_balancer_source_ranges.clear();
    assert!(desired([PortRules::new(&Arc::new(plain), v4_proxy(31000))], &local).rules.firewall.is_empty());
    // Only ranges of the other family: the IP stays open (no firewall
    // entry, which would drop every source), and that is reported.
    let mut v6_only = ServicePort::clone(&web);
    v6_only.load_balancer_source_ranges = vec!["fd00::/8".parse().unwrap()];
    let d = desired([PortRules::new(&Arc::new(v6_only), v4_proxy(31000))], &local);
    assert!(d.rules.firewall.is_empty(), "{:?}", d.rules.firewall);
    assert_eq!(d.open_without_ranges.len(), 2);
}

#[test]
fn set_diff_tracks_rejects_names_changed_udp_keys_and_asks_for_a_rewrite_when_the_firewall_changes() {
    let udp = RuleKey { protocol: Protocol::Udp, daddr: ServiceVip(ip("10.96.0.53")), dport: 53 };
    let target = Target::named(
        ProxyPort(31000),
        ServicePortName { service: ServiceName::new("default", "dns"), port: "".into() },
    );
    let old = RuleSet { reject: [udp].into(), ..RuleSet::default() };
    let new = RuleSet::from_redirects([(udp, target)].into_iter().collect());
    let d = diff_sets(&old, &new).expect("no firewall change");
    assert_eq!((d.unreject.clone(), d.add.len()), (vec![udp], 1));
    assert_eq!(d.udp_keys().into_iter().collect::<Vec<_>>(), vec![udp]);
    let mut walled = new.clone();
    walled.firewall.insert(key("10.98.0.1", 80), vec![]);
    assert!(diff_sets(&new, &walled).is_none());
}

#[test]
fn diff_removes_gone_keys_adds_new_ones_and_replaces_changed_targets() {
    let target = |port| {
        Target::named(
            ProxyPort(port),
            ServicePortName { service: ServiceName::new("default", "x"), port: "".into() },
        )
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
    let port = |t: Target| t.proxy_port;
    assert_eq!(
        d.add,
        vec![(key("10.96.0.3", 80), port(target(33))), (key("10.96.0.4", 80), port(target(4)))]
    );
    assert!(diff(&new, &new).is_empty());
}
