//! Where one service port listens ([`plan`]): its proxy ports, per
//! family, and its node ports, external IPs and LoadBalancer IPs; and the
//! node it is planned against ([`NodeView`]: the node's addresses, read
//! once per update). Pure but for that one read, so `check`, the fd budget,
//! the loop check and the [`Binder`](super::Binder) plan exactly alike.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use socket2::{Domain, Socket, Type};

use super::{ListenOptions, ListenRole};
use crate::model::{IpFamily, ServicePort};

/// What this node looks like for one update: its interface addresses and
/// the addresses node ports listen on, read once (one netlink dump) and
/// used by everything the update plans (the fd budget, the binder, the loop
/// check, `ringport check`), so that all of them see one node. Two views
/// compare equal when every plan made against them would be the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Where node ports listen ([`node_addresses`]).
    pub node_ips: Vec<IpAddr>,
    /// Every address on this node's interfaces, sorted, without repeats:
    /// whether an endpoint is local (loops) and an external or LB IP
    /// listened on or redirected.
    pub local: Vec<IpAddr>,
    /// `--redirect` is on: rules send non-local external and LB IPs to
    /// the external proxy port.
    rules: bool,
}

impl NodeView {
    /// The node now, as `opts` plans against it.
    pub fn now(opts: &ListenOptions) -> Self {
        let mut local: Vec<IpAddr> =
            if_addrs::get_if_addrs().unwrap_or_default().into_iter().map(|i| i.ip()).collect();
        local.sort();
        local.dedup();
        let node_ips = node_addresses_among(&opts.nodeport_addresses, &local);
        Self { node_ips, local, rules: opts.redirect_rules }
    }

    /// A view of a node with these addresses (tests, and callers that
    /// read the node themselves).
    pub fn of(node_ips: Vec<IpAddr>, mut local: Vec<IpAddr>, rules: bool) -> Self {
        local.sort();
        local.dedup();
        Self { node_ips, local, rules }
    }

    /// Whether the rules send external or LB IP `ip` to the external proxy
    /// port: rules on and `ip` not on this node's interfaces.
    pub fn redirected(&self, ip: &IpAddr) -> bool {
        self.rules && self.local.binary_search(ip).is_err()
    }
}

/// Addresses node ports listen on: every address (one wildcard socket
/// per family, IPv6 only where the kernel has it) unless
/// `--nodeport-addresses` narrows them to matching local ones.
pub fn node_addresses(nets: &[IpNet]) -> Vec<IpAddr> {
    if nets.is_empty() {
        return node_addresses_among(nets, &[]);
    }
    let local: Vec<IpAddr> =
        if_addrs::get_if_addrs().unwrap_or_default().into_iter().map(|i| i.ip()).collect();
    node_addresses_among(nets, &local)
}

/// [`node_addresses`] among the node's addresses `local`.
fn node_addresses_among(nets: &[IpNet], local: &[IpAddr]) -> Vec<IpAddr> {
    if nets.is_empty() {
        let v6 = Socket::new(Domain::IPV6, Type::DGRAM, None).is_ok();
        let any6 = v6.then_some(IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED));
        return std::iter::once(Ipv4Addr::UNSPECIFIED.into()).chain(any6).collect();
    }
    let mut ips: Vec<IpAddr> =
        local.iter().copied().filter(|ip| nets.iter().any(|net| net.contains(ip))).collect();
    ips.sort();
    ips.dedup();
    ips
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
        let node_port = node_port.get();
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
        let mut sp = ServicePort::new(name, Origin::new("test"), Protocol::Tcp, 8080);
        sp.node_port = node_port.and_then(std::num::NonZeroU16::new);
        sp
    }

    #[test]
    fn node_ports_listen_in_the_services_families_only() {
        let node_ips: Vec<IpAddr> =
            vec![Ipv4Addr::UNSPECIFIED.into(), std::net::Ipv6Addr::UNSPECIFIED.into()];
        let node_port_ips = |families: Vec<IpFamily>| -> Vec<IpAddr> {
            let mut sp = port("a", Some(30080));
            sp.ip_families = families.into_iter().collect();
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

    #[test]
    fn the_node_view_decides_which_external_ips_are_redirected_for_every_planner() {
        let opts = ListenOptions {
            bind_address: "169.254.99.1".parse().unwrap(),
            bind_address6: None,
            proxy_port_range: None,
            nodeport_addresses: vec![],
            workers: 2,
            redirect_rules: true,
            proxy_port_mode: super::super::ProxyPortMode::PerService,
        };
        let on_node: IpAddr = "192.0.2.7".parse().unwrap();
        let elsewhere: IpAddr = "198.51.100.9".parse().unwrap();
        let node = NodeView::of(vec![Ipv4Addr::UNSPECIFIED.into()], vec![on_node, on_node], true);
        assert_eq!(node.local, [on_node], "sorted, without repeats");
        assert!(!node.redirected(&on_node) && node.redirected(&elsewhere));
        let without_rules = NodeView::of(vec![], vec![on_node], false);
        assert!(!without_rules.redirected(&elsewhere), "nothing is redirected without rules");

        let mut sp = port("a", Some(30080));
        sp.external_ips = vec![on_node];
        let roles = |sp: &ServicePort| -> Vec<ListenRole> {
            super::super::plan_port(sp, &opts, &node).into_iter().map(|(r, ..)| r).collect()
        };
        let node_port = ListenRole::NodePort(Ipv4Addr::UNSPECIFIED.into());
        // A local external IP is listened on, not redirected.
        assert_eq!(roles(&sp), [ListenRole::Proxy, node_port, ListenRole::External(on_node)]);
        sp.external_ips = vec![elsewhere];
        assert_eq!(
            roles(&sp),
            [ListenRole::Proxy, ListenRole::ExternalProxy, node_port, ListenRole::External(elsewhere)],
            "a redirected one gets an external proxy port"
        );
        // The budget counts exactly what the binder plans, on the same view.
        assert_eq!(crate::budget::addresses(&sp, &opts, &node), roles(&sp).len() as u64);
    }
}
