//! Endpoint loops: an endpoint that is one of ringport's own listening
//! addresses would send each proxied connection back into the proxy, which
//! proxies it again, until the fds run out (one client connection became
//! 9,988 in under 2 s). Such endpoints are refused.
//!
//! An endpoint loops when its protocol and port match an own listener and
//! its address is that listener's address, or the listener is on the
//! wildcard address of the same family and the endpoint's address is local
//! (loopback, or on one of this node's interfaces when the check runs).
//!
//! What cannot be detected here: a loop through another hop (an endpoint
//! that is another proxy, or a ClusterIP whose redirect rule leads back to
//! ringport), an address added to an interface after the check, a proxy
//! port the kernel chooses later (`ringport check` without
//! `--proxy-port-range` cannot know it; `run` checks the bound ports), and
//! NAT in front of the node that maps an outside address onto a node port.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;

use crate::config::{ConfigError, ConfigErrorKind, service_ref};
use crate::listen::{self, ListenOptions, ListenRole, Listener, NodeView};
use crate::model::{Protocol, ServicePort};

/// An address ringport listens on (or may listen on: a port range).
#[derive(Clone, Debug)]
pub struct OwnAddress {
    pub ip: IpAddr,
    pub ports: RangeInclusive<u16>,
    pub protocol: Protocol,
    pub role: ListenRole,
}

/// The addresses bound listeners hold.
pub fn of_listeners(listeners: &[Arc<Listener>]) -> Vec<OwnAddress> {
    listeners.iter().map(|l| of_listener(l)).collect()
}

/// The addresses `ports` would listen on, for `ringport check`: proxy
/// ports are known only as `--proxy-port-range`, or not at all.
pub fn planned(ports: &[ServicePort], opts: &ListenOptions, node: &NodeView) -> Vec<OwnAddress> {
    let mut out = Vec::new();
    // The shared proxy ports, where known (a range): every TCP port's.
    for (role, ip) in listen::shared_plan(opts) {
        if let Some(ports) = opts.proxy_port_range.clone() {
            out.push(OwnAddress { ip, ports, protocol: crate::model::Protocol::Tcp, role });
        }
    }
    for sp in ports {
        for (role, ip, port) in listen::plan_port(sp, opts, node) {
            let proxy = role.is_proxy();
            let ports = match (proxy, &opts.proxy_port_range) {
                (true, Some(range)) => range.clone(),
                (true, None) => continue,
                (false, _) => port..=port,
            };
            out.push(OwnAddress { ip, ports, protocol: sp.protocol, role });
        }
    }
    out
}

/// One error per endpoint of `ports` that is an own address.
pub fn find(ports: &[ServicePort], own: &[OwnAddress], local: &[IpAddr]) -> Vec<ConfigError> {
    find_by(ports, &in_list(own), local)
}

/// Drops the endpoints `find` reports, for a source that serves the rest.
pub fn strip(ports: &mut [ServicePort], own: &[OwnAddress], local: &[IpAddr]) {
    strip_by(ports, &in_list(own), local)
}

/// The own addresses of a protocol whose ports take a port number.
pub type Lookup<'a> = dyn Fn(Protocol, u16) -> Vec<OwnAddress> + 'a;

fn in_list(own: &[OwnAddress]) -> impl Fn(Protocol, u16) -> Vec<OwnAddress> + '_ {
    |protocol, port| {
        own.iter().filter(|o| o.protocol == protocol && o.ports.contains(&port)).cloned().collect()
    }
}

/// [`find`], with the own addresses on each port number from `own`.
pub fn find_by(
    ports: &[impl std::borrow::Borrow<ServicePort>],
    own: &Lookup<'_>,
    local: &[IpAddr],
) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for sp in ports {
        let sp: &ServicePort = sp.borrow();
        for (i, ep) in sp.endpoints.iter().enumerate() {
            let (ip, port) = (ep.addr.0.ip(), ep.addr.0.port());
            if let Some(hit) =
                own(sp.protocol, port).iter().find(|o| loops_into(sp.protocol, ip, port, o, local))
            {
                errors.push(ConfigError {
                    origin: sp.origin.clone(),
                    object: Some(service_ref(&sp.name.service)),
                    field: Some(format!("endpoints of port {:?} [{i}]", sp.name.port)),
                    kind: ConfigErrorKind::EndpointLoop {
                        endpoint: ep.addr.0,
                        role: hit.role.to_string(),
                        listen: format!("{}:{}", hit.ip, port_text(&hit.ports)),
                    },
                });
            }
        }
    }
    errors
}

/// [`strip`], with the own addresses on each port number from `own`.
pub fn strip_by(ports: &mut [ServicePort], own: &Lookup<'_>, local: &[IpAddr]) {
    for sp in ports {
        let protocol = sp.protocol;
        sp.endpoints.retain(|ep| {
            let (ip, port) = (ep.addr.0.ip(), ep.addr.0.port());
            !own(protocol, port).iter().any(|o| loops_into(protocol, ip, port, o, local))
        });
    }
}

/// The own address of a listener.
pub fn of_listener(l: &Listener) -> OwnAddress {
    OwnAddress {
        ip: l.addr.ip(),
        ports: l.addr.port()..=l.addr.port(),
        protocol: l.key.protocol,
        role: l.key.role,
    }
}

fn loops_into(protocol: Protocol, ip: IpAddr, port: u16, own: &OwnAddress, local: &[IpAddr]) -> bool {
    if own.protocol != protocol || !own.ports.contains(&port) {
        return false;
    }
    ip == own.ip
        || (own.ip.is_unspecified()
            && own.ip.is_ipv4() == ip.is_ipv4()
            && (ip.is_loopback() || local.contains(&ip)))
}

fn port_text(ports: &RangeInclusive<u16>) -> String {
    if ports.start() == ports.end() {
        ports.start().to_string()
    } else {
        format!("{}-{}", ports.start(), ports.end())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Endpoint, EndpointAddr, Origin, ServiceName, ServicePortName};

    fn port_with(endpoint: &str) -> ServicePort {
        let name = ServicePortName { service: ServiceName::new("default", "web"), port: "".into() };
        let mut sp = ServicePort::new(name, Origin::new("t.yaml"), Protocol::Tcp, 80);
        sp.node_port = std::num::NonZeroU16::new(30080);
        sp.endpoints = vec![Endpoint::ready(EndpointAddr(endpoint.parse().unwrap()))];
        sp
    }

    fn own(ip: &str, port: u16) -> OwnAddress {
        OwnAddress {
            ip: ip.parse().unwrap(),
            ports: port..=port,
            protocol: Protocol::Tcp,
            role: ListenRole::Proxy,
        }
    }

    #[test]
    fn an_endpoint_on_an_own_wildcard_listener_is_a_loop() {
        let local: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap()];
        for ep in ["127.0.0.1:30080", "127.3.2.1:30080", "10.0.0.5:30080"] {
            let errors = find(&[port_with(ep)], &[own("0.0.0.0", 30080)], &local);
            assert_eq!(errors.len(), 1, "{ep}");
            assert!(errors[0].to_string().contains("Service default/web"), "{}", errors[0]);
        }
        for ep in ["10.0.0.6:30080", "127.0.0.1:30081", "[::1]:30080"] {
            assert!(find(&[port_with(ep)], &[own("0.0.0.0", 30080)], &local).is_empty(), "{ep}");
        }
    }

    #[test]
    fn an_endpoint_on_a_specific_listener_loops_only_on_that_address() {
        assert_eq!(find(&[port_with("127.0.0.1:20000")], &[own("127.0.0.1", 20000)], &[]).len(), 1);
        assert!(find(&[port_with("127.0.0.2:20000")], &[own("127.0.0.1", 20000)], &[]).is_empty());
    }

    #[test]
    fn check_knows_node_ports_and_the_proxy_port_range() {
        let opts = ListenOptions {
            bind_address: Ipv4Addr::LOCALHOST.into(),
            bind_address6: None,
            proxy_port_range: Some(20000..=20099),
            nodeport_addresses: vec![],
            workers: 1,
            redirect_rules: false,
            proxy_port_mode: crate::listen::ProxyPortMode::PerService,
        };
        let node = NodeView::of(vec![Ipv4Addr::UNSPECIFIED.into()], vec![], false);
        let ports = [port_with("127.0.0.1:20050")];
        let own = planned(&ports, &opts, &node);
        assert_eq!(find(&ports, &own, &[]).len(), 1);
        let mut stripped = vec![port_with("127.0.0.1:30080")];
        strip(&mut stripped, &own, &[]);
        assert!(stripped[0].endpoints.is_empty());
    }
}
