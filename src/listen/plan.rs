//! Where one service port listens ([`plan`]): its proxy ports, per
//! family, and its node ports, external IPs and LoadBalancer IPs; and the
//! node addresses and locality the plan is made against. Pure but for
//! reading the node's interfaces, so `check` and the fd budget plan exactly
//! what the [`Binder`](super::Binder) binds.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use socket2::{Domain, Socket, Type};

use super::ListenRole;
use crate::model::{IpFamily, ServicePort};

/// Addresses node ports listen on: every address (one wildcard socket
/// per family, IPv6 only where the kernel has it) unless
/// `--nodeport-addresses` narrows them to matching local ones.
pub fn node_addresses(nets: &[IpNet]) -> Vec<IpAddr> {
    if nets.is_empty() {
        let v6 = Socket::new(Domain::IPV6, Type::DGRAM, None).is_ok();
        let any6 = v6.then_some(IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED));
        return std::iter::once(Ipv4Addr::UNSPECIFIED.into()).chain(any6).collect();
    }
    let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| nets.iter().any(|net| net.contains(ip)))
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Whether the rules send an external or LB IP to the external proxy port:
/// with `rules` on, every IP not on this node's interfaces now.
pub fn redirected_by_rules(rules: bool) -> impl Fn(&IpAddr) -> bool {
    let local: HashSet<IpAddr> = if rules {
        if_addrs::get_if_addrs().unwrap_or_default().into_iter().map(|i| i.ip()).collect()
    } else {
        HashSet::new()
    };
    move |ip| rules && !local.contains(ip)
}

/// Every `(role, ip, port)` one service port should listen on.
/// `redirected(ip)` says whether the rules send an external or LB IP to the
/// external proxy port (rules on and the IP not local; the same locality the
/// rules use, `redirect::rules::Locality`): only then is one planned.
/// `binds` is `(bind_address, bind_address6)`: IPv6 twins of the proxy
/// ports are planned only for IPv6 addresses the rules send to them, and
/// the IPv4 proxy port only for a port not IPv6-only.
pub fn plan(
    sp: &ServicePort,
    binds: (IpAddr, Option<IpAddr>),
    node_ips: &[IpAddr],
    redirected: impl Fn(&IpAddr) -> bool,
) -> Vec<(ListenRole, IpAddr, u16)> {
    let (bind, bind6) = binds;
    let bind6 = bind6.filter(|b| b.is_ipv6() && bind.is_ipv4());
    let mut out = Vec::new();
    // An IPv6-only port with an IPv6 proxy address needs no IPv4 proxy port.
    let v6 = |ip: &IpAddr| IpFamily::of(*ip) == IpFamily::V6;
    if bind6.is_none() || sp.cluster_ips.is_empty() || !sp.cluster_ips.iter().all(v6) {
        out.push((ListenRole::Proxy, bind, 0));
    }
    let external = || sp.external_ips.iter().chain(&sp.load_balancer_ips).filter(|ip| redirected(ip));
    if external().any(|ip| IpFamily::of(bind) == IpFamily::of(*ip) || bind6.is_none()) {
        out.push((ListenRole::ExternalProxy, bind, 0));
    }
    if let Some(bind6) = bind6 {
        if sp.cluster_ips.iter().any(v6) {
            out.push((ListenRole::Proxy6, bind6, 0));
        }
        if external().any(v6) {
            out.push((ListenRole::ExternalProxy6, bind6, 0));
        }
    }
    if let Some(node_port) = sp.node_port {
        // Only the Service's families: a `[::]` node port of an IPv4-only
        // Service would balance IPv6 clients over IPv4 endpoints.
        let served = |ip: &&IpAddr| sp.ip_families.is_empty() || sp.ip_families.contains(&IpFamily::of(**ip));
        out.extend(node_ips.iter().filter(served).map(|ip| (ListenRole::NodePort(*ip), *ip, node_port)));
    }
    out.extend(sp.external_ips.iter().map(|ip| (ListenRole::External(*ip), *ip, sp.port)));
    out.extend(sp.load_balancer_ips.iter().map(|ip| (ListenRole::LoadBalancer(*ip), *ip, sp.port)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Origin, Protocol, ServiceName, ServicePortName};

    fn port(name: &str, node_port: Option<u16>) -> ServicePort {
        let name = ServicePortName { service: ServiceName::new("default", name), port: "".into() };
        let mut sp = ServicePort::new(name, Origin("test".into()), Protocol::Tcp, 8080);
        sp.node_port = node_port;
        sp
    }

    #[test]
    fn node_ports_listen_in_the_services_families_only() {
        let node_ips: Vec<IpAddr> =
            vec![Ipv4Addr::UNSPECIFIED.into(), std::net::Ipv6Addr::UNSPECIFIED.into()];
        let node_port_ips = |families: Vec<IpFamily>| -> Vec<IpAddr> {
            let mut sp = port("a", Some(30080));
            sp.ip_families = families;
            let planned = plan(&sp, (Ipv4Addr::LOCALHOST.into(), None), &node_ips, |_| false);
            planned
                .into_iter()
                .filter(|(r, ..)| matches!(r, ListenRole::NodePort(_)))
                .map(|(_, ip, _)| ip)
                .collect()
        };
        assert_eq!(node_port_ips(vec![IpFamily::V4]), node_ips[..1]);
        assert_eq!(node_port_ips(vec![IpFamily::V6]), node_ips[1..]);
        assert_eq!(node_port_ips(vec![IpFamily::V4, IpFamily::V6]), node_ips);
        assert_eq!(node_port_ips(vec![]), node_ips, "no family named (an edge Service): every family");
    }

    #[test]
    fn an_ipv6_only_port_gets_only_an_ipv6_proxy_port_when_there_is_an_ipv6_proxy_address() {
        let mut sp = port("a", None);
        sp.cluster_ips = vec!["fd00:96::1".parse().unwrap()];
        let roles = |sp: &ServicePort, bind6: Option<&str>| -> Vec<ListenRole> {
            let binds = (Ipv4Addr::LOCALHOST.into(), bind6.map(|b| b.parse().unwrap()));
            plan(sp, binds, &[], |_| false).into_iter().map(|(r, ..)| r).collect()
        };
        assert_eq!(roles(&sp, Some("fd72::1")), [ListenRole::Proxy6]);
        assert_eq!(roles(&sp, None), [ListenRole::Proxy], "no IPv6 proxy address: the one proxy port");
        sp.cluster_ips.push("10.96.0.1".parse().unwrap());
        assert_eq!(roles(&sp, Some("fd72::1")), [ListenRole::Proxy, ListenRole::Proxy6]);
    }
}
