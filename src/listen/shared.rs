//! `--proxy-port-mode`: one proxy port per service port (`per-service`,
//! kube-proxy's userspace shape), or one shared proxy port per family for
//! every TCP service port (`shared`), whose connections find their service
//! port by their original destination (`snapshot::destinations`).
//!
//! In shared mode a TCP service port plans no proxy port of its own: its
//! cluster IPs and non-local external and LB IPs are DNATed to the shared
//! port. UDP service ports keep theirs (DNAT hides a datagram's original
//! destination; `docs/architecture.md` says why not TPROXY), and node
//! ports and local external and LB IPs keep their own listeners in both
//! modes. The shared listeners are ordinary [`Listener`]s under a key no
//! Service can have (an empty namespace), so reloads, handover and the fd
//! store keep them as they keep every other.
//!
//! Invariant: a shared listener has no route of its own; the data plane
//! routes each of its connections by the destination the rules rewrote.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::{BindError, Binder, ListenKey, ListenOptions, ListenRole, Listener, NodeView, plan};
use crate::model::{Protocol, ServiceName, ServicePort, ServicePortName};

/// `--proxy-port-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyPortMode {
    /// One proxy port per service port (and per family, and per scope).
    #[default]
    PerService,
    /// One proxy port per family for every TCP service port; needs rules.
    Shared,
}

impl ListenKey {
    /// The key of a shared proxy port (`ListenRole::Proxy` or `Proxy6`).
    pub fn shared(role: ListenRole) -> ListenKey {
        ListenKey { port: shared_name(), protocol: Protocol::Tcp, role, wanted_port: 0 }
    }

    /// Whether this is a shared proxy port's key.
    pub fn is_shared(&self) -> bool {
        self.port.service.namespace.is_empty() && self.port == shared_name()
    }
}

/// The name shared listeners go by: no Service has an empty namespace (nor
/// spaces in its name); it prints as "shared proxy port" in logs.
fn shared_name() -> ServicePortName {
    ServicePortName { service: ServiceName::new("", "shared proxy port"), port: Default::default() }
}

/// Whether `sp` gets proxy ports of its own under `opts`.
fn own_proxy_ports(sp: &ServicePort, opts: &ListenOptions) -> bool {
    opts.proxy_port_mode == ProxyPortMode::PerService || sp.protocol == Protocol::Udp
}

/// Every `(role, ip, port)` one service port listens on under `opts`: its
/// [`plan`] against `node`, less the proxy ports a shared one replaces.
/// What the binder, the fd budget, `check` and the loop check all plan with.
pub fn plan_port(sp: &ServicePort, opts: &ListenOptions, node: &NodeView) -> Vec<(ListenRole, IpAddr, u16)> {
    let binds = (opts.bind_address, opts.bind_address6);
    let mut planned = plan(sp, binds, &node.node_ips, |ip| node.redirected(ip));
    if !own_proxy_ports(sp, opts) {
        planned.retain(|(role, ..)| !role.is_proxy());
    }
    planned
}

/// The shared proxy ports `opts` asks for: `(role, ip)`, the IPv4 one on
/// the proxy address and, with an IPv6 proxy address, its IPv6 twin.
/// Nothing in per-service mode.
pub fn shared_plan(opts: &ListenOptions) -> Vec<(ListenRole, IpAddr)> {
    if opts.proxy_port_mode != ProxyPortMode::Shared {
        return Vec::new();
    }
    let bind6 = opts.bind_address6.filter(|b| b.is_ipv6() && opts.bind_address.is_ipv4());
    std::iter::once((ListenRole::Proxy, opts.bind_address))
        .chain(bind6.map(|ip| (ListenRole::Proxy6, ip)))
        .collect()
}

impl Binder {
    /// The shared proxy ports (none in per-service mode): kept from
    /// `previous` or handed over when their key and address match, else
    /// bound, the IPv6 one on the IPv4 one's number when free.
    pub(super) fn bind_shared(
        &mut self,
        held: &super::Held,
        used: &mut super::Used<'_>,
    ) -> (Vec<Arc<Listener>>, Vec<BindError>) {
        let (mut listeners, mut errors) = (Vec::new(), Vec::new());
        let mut v4_port = None;
        for (role, ip) in shared_plan(&self.opts) {
            let key = ListenKey::shared(role);
            let twin = v4_port.filter(|_| role == ListenRole::Proxy6);
            let started = self.started_shared.iter().position(|l| l.key == key && l.addr.ip() == ip);
            let result = match (held.listener(&key), started) {
                (Some(existing), _) if existing.addr.ip() == ip => Ok(Arc::clone(existing)),
                (_, Some(at)) => Ok(self.started_shared.swap_remove(at)),
                _ => match self.take_adopted(&key, ip, used) {
                    Some(adopted) => Ok(adopted),
                    None => match twin.or_else(|| self.preferred_shared(role, used)) {
                        Some(p) => match self.bind_twin(&key, SocketAddr::new(ip, p)) {
                            Some(listener) => Ok(listener),
                            None => self.bind_new(key, ip, used),
                        },
                        None => self.bind_new(key, ip, used),
                    },
                },
            };
            match result {
                Ok(listener) => {
                    used.insert(listener.addr.port());
                    if role == ListenRole::Proxy {
                        v4_port = Some(listener.addr.port());
                    }
                    listeners.push(listener);
                }
                Err(e) => errors.push(e),
            }
        }
        (listeners, errors)
    }

    /// Bind the shared proxy ports now, before any configuration (the
    /// first bind takes them): at start, where a failure must stop the
    /// process, since no TCP service port gets a rule without them. After
    /// that, every bind keeps them (their key and address never change),
    /// so a reload cannot lose them. Nothing in per-service mode.
    // Bind errors are rare and off the hot path; their size does not matter.
    #[allow(clippy::result_large_err)]
    pub fn bind_shared_at_start(&mut self) -> Result<(), BindError> {
        let none = super::Held::default();
        let mut used = super::Used::new(&none);
        let (listeners, errors) = self.bind_shared(&none, &mut used);
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        self.started_shared = listeners;
        Ok(())
    }

    /// After a crash: the port the previous run's rules send TCP of
    /// `role`'s family to (the shared port, if that run shared one), so
    /// the first sync is a difference, not a rewrite of every element.
    fn preferred_shared(&self, role: ListenRole, used: &super::Used<'_>) -> Option<u16> {
        let v6 = role == ListenRole::Proxy6;
        let allowed = |p: &u16| self.opts.proxy_port_range.as_ref().is_none_or(|r| r.contains(p));
        self.preferred
            .iter()
            .filter(|((protocol, ip, _), _)| *protocol == Protocol::Tcp && ip.is_ipv6() == v6)
            .map(|(_, port)| *port)
            .filter(|p| allowed(p) && !used.contains(p))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::Origin;

    fn opts(mode: ProxyPortMode) -> ListenOptions {
        ListenOptions {
            bind_address: Ipv4Addr::LOCALHOST.into(),
            bind_address6: None,
            proxy_port_range: None,
            nodeport_addresses: vec![],
            workers: 2,
            redirect_rules: true,
            proxy_port_mode: mode,
        }
    }

    fn port(name: &str, protocol: Protocol) -> ServicePort {
        let name = ServicePortName { service: ServiceName::new("default", name), port: Default::default() };
        let mut sp = ServicePort::new(name, Origin::new("test"), protocol, 80);
        sp.cluster_ips = vec!["10.96.0.1".parse().unwrap()];
        sp
    }

    #[test]
    fn shared_mode_binds_one_proxy_port_for_every_tcp_port_and_udp_ports_keep_their_own() {
        let mut b = Binder::new(opts(ProxyPortMode::Shared));
        let ports: Vec<ServicePort> = (0..5).map(|i| port(&format!("t{i}"), Protocol::Tcp)).collect();
        let ports = [ports, vec![port("dns", Protocol::Udp)]].concat();
        let (ls, errors) = b.bind(&ports, &[]);
        assert!(errors.is_empty(), "{errors:?}");
        let shared: Vec<_> = ls.iter().filter(|l| l.key.is_shared()).collect();
        assert_eq!(shared.len(), 1, "one shared proxy port (IPv4 only here)");
        assert_eq!(ls.len(), 2, "the shared port and the UDP port's own: {ls:?}");
        let (again, _) = b.bind(&ports, &ls);
        assert_eq!(again.iter().find(|l| l.key.is_shared()).map(|l| l.id), Some(shared[0].id), "kept");
        let mut per_service = Binder::new(opts(ProxyPortMode::PerService));
        let (ls, _) = per_service.bind(&ports, &[]);
        assert_eq!(ls.len(), 6);
        assert!(!ls.iter().any(|l| l.key.is_shared()));
    }

    #[test]
    fn after_a_crash_the_shared_port_is_bound_where_the_previous_runs_rules_point() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut b = Binder::new(opts(ProxyPortMode::Shared));
        b.prefer_proxy_ports([((Protocol::Tcp, "10.96.0.1".parse().unwrap(), 80), free)]);
        let (ls, errors) = b.bind(&[port("t", Protocol::Tcp)], &[]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(ls.iter().find(|l| l.key.is_shared()).map(|l| l.addr.port()), Some(free));
    }

    #[test]
    fn a_shared_port_that_cannot_bind_at_start_is_an_error_and_one_bound_at_start_is_the_first_binds() {
        // Another process holds the port the previous run's rules point at
        // and the range has no other: the start fails.
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap().port();
        let mut b = Binder::new(ListenOptions {
            proxy_port_range: Some(taken..=taken),
            ..opts(ProxyPortMode::Shared)
        });
        b.prefer_proxy_ports([((Protocol::Tcp, "10.96.0.1".parse().unwrap(), 80), taken)]);
        assert!(matches!(b.bind_shared_at_start(), Err(BindError::RangeExhausted { .. })));
        drop(held);
        let mut b = Binder::new(opts(ProxyPortMode::Shared));
        b.bind_shared_at_start().expect("a free port");
        let at_start = b.started_shared[0].id;
        let (ls, errors) = b.bind(&[port("t", Protocol::Tcp)], &[]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(ls.iter().find(|l| l.key.is_shared()).map(|l| l.id), Some(at_start));
        let mut per_service = Binder::new(opts(ProxyPortMode::PerService));
        assert!(per_service.bind_shared_at_start().is_ok() && per_service.started_shared.is_empty());
    }

    #[test]
    fn no_service_port_name_is_the_shared_one() {
        let name =
            ServicePortName { service: ServiceName::new("default", "shared proxy port"), port: "".into() };
        let key = ListenKey { port: name, protocol: Protocol::Tcp, role: ListenRole::Proxy, wanted_port: 0 };
        assert!(!key.is_shared());
        assert!(ListenKey::shared(ListenRole::Proxy6).is_shared());
    }
}
