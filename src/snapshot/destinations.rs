//! Where a connection to a shared proxy port was going: `(protocol,
//! original destination IP, port) -> (service port, scope, family)`, built
//! by one function ([`Destinations::build`]) from the service ports, and
//! looked up once per connection a shared proxy port accepts.
//!
//! Invariants:
//! - Built from the same addresses the rules DNAT to a shared port: every
//!   cluster IP (internal scope) and every externalIP and LoadBalancer IP
//!   (external scope) of a TCP service port. A local external IP is never
//!   DNATed, so its entry is never met; keeping it spares this map the
//!   node's interfaces, and keeps it pure.
//! - One key, one service port: when two claim the same key, the first in
//!   the order given keeps it, as the rules' own clash rule (`redirect::
//!   rules`), so a connection goes where the rule that sent it says.
//! - Values name service ports, never a position in some list, so the map
//!   stays right when other ports come and go around it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::balance::eligible::Scope;
use crate::model::{IpFamily, Protocol, ServicePort, ServicePortName};

/// What a redirected connection's original destination stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub port: ServicePortName,
    /// Internal for a cluster IP, external for an external or LB IP.
    pub scope: Scope,
    /// The address's family: a dual-stack port balances each apart.
    pub family: IpFamily,
}

/// The map of every address a shared proxy port may be sent.
#[derive(Debug, Default)]
pub struct Destinations {
    map: HashMap<(Protocol, IpAddr, u16), Destination>,
}

impl Destinations {
    /// The destinations of `ports`' TCP service ports (UDP ones keep
    /// proxy ports of their own).
    pub fn build<'a>(ports: impl IntoIterator<Item = &'a ServicePort>) -> Self {
        let mut map = HashMap::new();
        for sp in ports.into_iter().filter(|sp| sp.protocol == Protocol::Tcp) {
            let internal = sp.cluster_ips.iter().map(|ip| (ip, Scope::Internal));
            let external =
                sp.external_ips.iter().chain(&sp.load_balancer_ips).map(|ip| (ip, Scope::External));
            for (ip, scope) in internal.chain(external) {
                let ip = ip.to_canonical();
                map.entry((sp.protocol, ip, sp.port)).or_insert_with(|| Destination {
                    port: sp.name.clone(),
                    scope,
                    family: IpFamily::of(ip),
                });
            }
        }
        Self { map }
    }

    /// What `to` (a connection's original destination) stands for.
    pub fn get(&self, protocol: Protocol, to: SocketAddr) -> Option<&Destination> {
        self.map.get(&(protocol, to.ip().to_canonical(), to.port()))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
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
        let d = Destinations::build([&web, &dns]);
        assert_eq!(d.len(), 4);
        let got = |s| d.get(Protocol::Tcp, to(s)).map(|d| (d.port.service.name.clone(), d.scope, d.family));
        assert_eq!(got("10.96.0.10:80"), Some(("web".into(), Scope::Internal, IpFamily::V4)));
        assert_eq!(got("[fd00:96::10]:80"), Some(("web".into(), Scope::Internal, IpFamily::V6)));
        assert_eq!(got("[::ffff:10.96.0.10]:80"), Some(("web".into(), Scope::Internal, IpFamily::V4)));
        assert_eq!(got("10.97.0.1:80").map(|g| g.1), Some(Scope::External));
        assert_eq!(got("10.98.0.1:80").map(|g| g.1), Some(Scope::External));
        assert_eq!(got("10.96.0.10:81"), None, "another port of the same address");
        assert_eq!(d.get(Protocol::Udp, to("10.96.0.53:53")), None);
    }

    #[test]
    fn the_first_of_two_ports_on_one_key_keeps_it() {
        let (mut a, mut b) = (sp("a", Protocol::Tcp, 80), sp("b", Protocol::Tcp, 80));
        a.cluster_ips = vec!["10.96.0.1".parse().unwrap()];
        b.cluster_ips = vec!["10.96.0.1".parse().unwrap()];
        let d = Destinations::build([&a, &b]);
        assert_eq!(d.get(Protocol::Tcp, to("10.96.0.1:80")).map(|d| d.port.service.name.as_str()), Some("a"));
    }
}
