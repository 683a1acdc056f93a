//! Starting from sockets that are already bound: those a predecessor
//! handed over (`crate::handover`), adopted where their key and address
//! match the configuration, and the proxy ports a previous run's rules
//! point at, bound again after a crash.

use std::net::IpAddr;
use std::sync::Arc;

use socket2::Socket;

use super::{Binder, Handed, ListenKey, ListenRole, Listener, bind_reuseport, socket_type};
use crate::model::{Protocol, ServicePort};

impl Binder {
    /// Bind proxy ports where the rules of a previous run point:
    /// `((protocol, VIP, service port), proxy port)`.
    pub fn prefer_proxy_ports(&mut self, ports: impl IntoIterator<Item = ((Protocol, IpAddr, u16), u16)>) {
        self.preferred.extend(ports);
        self.preferred_keys.clear();
        for (&(protocol, ip, port), &proxy_port) in &self.preferred {
            self.preferred_keys.entry((protocol, proxy_port)).or_default().push((ip, port));
        }
    }

    /// Serve the next bind's listeners on these handed-over sockets where
    /// the keys and addresses match; the next bind closes the rest.
    pub fn adopt(&mut self, handed: Vec<Handed>) {
        self.adopted.extend(handed.into_iter().map(|h| (h.key.clone(), h)));
    }

    /// The proxy port the previous run's rules send `sp`'s addresses of
    /// `key`'s role to, bound again, if there is one and it is free.
    pub(super) fn bind_preferred(
        &mut self,
        sp: &ServicePort,
        key: &ListenKey,
        ip: IpAddr,
        used: &mut super::Used<'_>,
    ) -> Option<Arc<Listener>> {
        let port =
            self.preferred_port(sp, key.role).filter(|p| !used.contains(p) && self.proxy_port_allowed(*p))?;
        match self.bind_checked(std::net::SocketAddr::new(ip, port), key.protocol) {
            Ok(sockets) => {
                used.insert(port);
                tracing::info!(service = %key.port, role = %key.role, port, "proxy port of the previous run's rules bound again");
                Some(self.listener(key.clone(), sockets))
            }
            Err(e) => {
                tracing::warn!(service = %key.port, role = %key.role, port, error = %e, "cannot bind the proxy port the previous run's rules point at; choosing another (the rules follow)");
                None
            }
        }
    }

    /// After the first bind: what was handed over and not adopted is
    /// closed, and the previous run's proxy ports are forgotten.
    pub(super) fn first_bind_done(&mut self) {
        self.preferred.clear();
        self.preferred_keys.clear();
        for (key, h) in self.adopted.drain() {
            tracing::info!(service = %key.port, role = %key.role, addr = %h.addr, "handover: a socket this configuration does not want; closed");
        }
    }

    /// Whether `port` may be a proxy port: inside `--proxy-port-range`
    /// when one is set (a port read back or handed over from a run with
    /// another range is not).
    fn proxy_port_allowed(&self, port: u16) -> bool {
        self.opts.proxy_port_range.as_ref().is_none_or(|r| r.contains(&port))
    }

    /// The proxy port the previous run's rules send `sp`'s addresses of
    /// this role to, if any, and if nothing else points at it: after a
    /// shared run every TCP key points at the one shared port, which must
    /// not become one service port's own until the first sync (it would
    /// serve every cluster IP as that Service).
    fn preferred_port(&self, sp: &ServicePort, role: ListenRole) -> Option<u16> {
        let (vips, v6): (Vec<&IpAddr>, bool) = match role {
            ListenRole::Proxy => (sp.cluster_ips.iter().collect(), false),
            ListenRole::Proxy6 => (sp.cluster_ips.iter().collect(), true),
            ListenRole::ExternalProxy => {
                (sp.external_ips.iter().chain(&sp.load_balancer_ips).collect(), false)
            }
            ListenRole::ExternalProxy6 => {
                (sp.external_ips.iter().chain(&sp.load_balancer_ips).collect(), true)
            }
            _ => return None,
        };
        let port = vips
            .iter()
            .filter(|ip| ip.is_ipv6() == v6)
            .find_map(|ip| self.preferred.get(&(sp.protocol, **ip, sp.port)).copied())?;
        let owners = self.preferred_keys.get(&(sp.protocol, port))?;
        owners.iter().all(|(ip, p)| *p == sp.port && vips.contains(&ip)).then_some(port)
    }

    /// The handed-over sockets for `key`, if they sit where this
    /// configuration listens: one per worker (binding more on the same
    /// address when there are now more workers).
    pub(super) fn take_adopted(
        &mut self,
        key: &ListenKey,
        ip: IpAddr,
        used: &mut super::Used<'_>,
    ) -> Option<Arc<Listener>> {
        let handed = self.adopted.remove(key)?;
        let port = handed.addr.port();
        let in_range = !key.role.is_proxy() || self.proxy_port_allowed(port);
        // An IPv6 proxy port shares its IPv4 twin's number by design (other
        // address): only IPv4 ones must be unused.
        let taken = key.role.is_proxy() && key.role.first_family().is_none() && used.contains(&port);
        if handed.addr.ip() != ip || !in_range || taken {
            tracing::info!(service = %key.port, role = %key.role, addr = %handed.addr, "handover: socket not where this configuration listens; closed");
            return None;
        }
        let kind = socket_type(key.protocol);
        let mut sockets: Vec<Socket> = handed
            .sockets
            .into_iter()
            .map(Socket::from)
            .filter(|s| {
                s.local_addr().ok().and_then(|a| a.as_socket()) == Some(handed.addr)
                    && s.r#type().ok() == Some(kind)
            })
            .collect();
        if sockets.is_empty() {
            tracing::warn!(service = %key.port, role = %key.role, addr = %handed.addr, "handover: the sockets handed are not bound there; binding afresh");
            return None;
        }
        let workers = self.opts.workers.max(1);
        if sockets.len() > workers {
            tracing::warn!(service = %key.port, addr = %handed.addr, handed = sockets.len(), workers, "handover: fewer workers than sockets handed; connections queued on the extra ones are reset");
            sockets.truncate(workers);
        }
        if sockets.len() < workers {
            let freebind = self.opts.bind_address6 == Some(handed.addr.ip());
            match bind_reuseport(handed.addr, key.protocol, workers - sockets.len(), freebind) {
                Ok(more) => sockets.extend(more),
                Err(e) => {
                    tracing::warn!(service = %key.port, addr = %handed.addr, error = %e, "handover: cannot bind sockets for the added workers; the handed ones serve")
                }
            }
        }
        used.insert(port);
        self.bound.insert((handed.addr, key.protocol));
        Some(self.listener(key.clone(), sockets))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::listen::ListenOptions;
    use crate::model::{Origin, ServiceName, ServicePortName};

    #[test]
    fn a_read_back_proxy_port_outside_the_range_is_not_bound_again() {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (outside, inside) = (free(), free());
        let mut b = Binder::new(ListenOptions {
            bind_address: Ipv4Addr::LOCALHOST.into(),
            bind_address6: None,
            proxy_port_range: Some(inside..=inside),
            nodeport_addresses: vec![],
            workers: 1,
            redirect_rules: true,
            proxy_port_mode: crate::listen::ProxyPortMode::PerService,
        });
        let name = ServicePortName { service: ServiceName::new("default", "a"), port: "".into() };
        let mut sp = ServicePort::new(name, Origin::new("test"), Protocol::Tcp, 8080);
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        sp.cluster_ips = vec![vip];
        b.prefer_proxy_ports([((Protocol::Tcp, vip, 8080), outside)]);
        let (ls, errors) = b.bind(&[sp], &[]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(ls[0].addr.port(), inside, "the range wins over the read-back port {outside}");
    }

    #[test]
    fn a_read_back_port_other_service_ports_point_at_too_is_not_any_ones_own() {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (shared, own) = (free(), free());
        let mut b = Binder::new(ListenOptions {
            bind_address: Ipv4Addr::LOCALHOST.into(),
            bind_address6: None,
            proxy_port_range: None,
            nodeport_addresses: vec![],
            workers: 1,
            redirect_rules: true,
            proxy_port_mode: crate::listen::ProxyPortMode::PerService,
        });
        let sp = |name: &str, vip: &str| {
            let name = ServicePortName { service: ServiceName::new("default", name), port: "".into() };
            let mut sp = ServicePort::new(name, Origin::new("test"), Protocol::Tcp, 80);
            sp.cluster_ips = vec![vip.parse().unwrap()];
            sp
        };
        let (a, b2, c) = (sp("a", "10.96.0.1"), sp("b", "10.96.0.2"), sp("c", "10.96.0.3"));
        // What a killed shared run leaves: a and b on the one shared port;
        // c alone on its own port (as a per-service run would).
        b.prefer_proxy_ports([
            ((Protocol::Tcp, a.cluster_ips[0], 80), shared),
            ((Protocol::Tcp, b2.cluster_ips[0], 80), shared),
            ((Protocol::Tcp, c.cluster_ips[0], 80), own),
        ]);
        let (ls, errors) = b.bind(&[a, b2, c], &[]);
        assert!(errors.is_empty(), "{errors:?}");
        let ports: Vec<u16> = ls.iter().map(|l| l.addr.port()).collect();
        assert!(!ports.contains(&shared), "the shared port is no one's own: {ports:?}");
        assert_eq!(ports[2], own, "a port only c's keys point at is c's again");
    }
}
