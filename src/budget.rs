//! The file-descriptor budget: does a configuration fit in `RLIMIT_NOFILE`?
//!
//! Every listen address of every service port holds one socket per worker
//! (in `--proxy-port-mode shared`, a TCP service port has no proxy port of
//! its own: the one or two shared ones count once, whatever the number of
//! TCP service ports),
//! and every UDP flow one backend socket; what is left must still carry
//! proxied connections (two sockets and two pipes each with splice) and the
//! admin servers. A configuration whose listening sockets alone would eat
//! into that reserve is refused as a whole, before anything is bound, and
//! the last good one keeps serving; `ringport check` applies the same sum.
//!
//! The count is an upper bound: a listen address that turns out not to be
//! local (an external IP on another node) is counted though it is never
//! bound, and a listener kept from the previous configuration is counted
//! once although its sockets already exist.

use crate::listen::{self, ListenOptions, NodeView};
use crate::model::{Protocol, ServicePort};

/// Descriptors kept for the admin servers: their connection cap (the
/// health, metrics and healthCheckNodePort servers together) plus a fixed
/// overhead for their listeners, the control runtime, the file watcher,
/// the log and standard streams.
pub const ADMIN_RESERVE: u64 = crate::admin::MAX_CONNECTIONS as u64 + 32;
/// Descriptors each worker holds whatever the configuration: its ring, its
/// wake-up eventfd and a few spare pipes.
pub const PER_WORKER: u64 = 8;
/// Descriptors that must stay free for proxied connections (six each:
/// client, upstream, two pipes): about 170 connections at the very least.
pub const CONNECTION_RESERVE: u64 = 1024;

/// What the budget is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// The soft `RLIMIT_NOFILE` the process runs with.
    pub limit: u64,
    pub workers: usize,
    /// `--udp-max-flows`: one backend socket each, if any port is UDP.
    pub udp_max_flows: usize,
}

/// The descriptors a configuration needs, by use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    pub listen_addresses: u64,
    pub listening_sockets: u64,
    pub udp_flows: u64,
    pub fixed: u64,
}

impl Demand {
    pub fn total(&self) -> u64 {
        self.listening_sockets + self.udp_flows + self.fixed
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "needs about {} file descriptors but RLIMIT_NOFILE is {limit}: {} listen addresses x {workers} workers = {} listening sockets, \
     {} for UDP flows (--udp-max-flows), {} reserved for connections, workers and the admin servers; \
     serve fewer service ports, fewer --workers, or raise the limit",
    .demand.total(), .demand.listen_addresses, .demand.listening_sockets, .demand.udp_flows, .demand.fixed
)]
pub struct BudgetError {
    pub demand: Demand,
    pub limit: u64,
    pub workers: usize,
}

impl Budget {
    /// The budget of this process: its soft limit, first raised to the hard
    /// limit. An unreadable limit counts as unlimited.
    pub fn of_this_process(workers: usize, udp_max_flows: usize) -> Self {
        let limit = match crate::dataplane::sys::raise_nofile_limit() {
            Ok((soft, _hard)) => soft,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE; no fd budget is enforced");
                u64::MAX
            }
        };
        Self { limit, workers, udp_max_flows }
    }

    /// The descriptors `ports` need, listening as `opts` says on `node`.
    pub fn demand(&self, ports: &[ServicePort], opts: &ListenOptions, node: &NodeView) -> Demand {
        let listen_addresses: u64 =
            ports.iter().map(|sp| addresses(sp, opts, node)).sum::<u64>() + shared_addresses(opts);
        let any_udp = ports.iter().any(|sp| sp.protocol == Protocol::Udp);
        self.demand_of(listen_addresses, any_udp)
    }

    /// The descriptors `listen_addresses` need, with UDP flows or not.
    pub fn demand_of(&self, listen_addresses: u64, any_udp: bool) -> Demand {
        let workers = self.workers.max(1) as u64;
        Demand {
            listen_addresses,
            listening_sockets: listen_addresses.saturating_mul(workers),
            udp_flows: if any_udp { self.udp_max_flows as u64 } else { 0 },
            fixed: ADMIN_RESERVE + CONNECTION_RESERVE + PER_WORKER * workers,
        }
    }

    /// `Err` when `demand` would not fit.
    pub fn fits(&self, demand: Demand) -> Result<Demand, BudgetError> {
        if demand.total() > self.limit {
            return Err(BudgetError { demand, limit: self.limit, workers: self.workers });
        }
        Ok(demand)
    }

    /// `Err` when `ports` would not fit.
    pub fn check(
        &self,
        ports: &[ServicePort],
        opts: &ListenOptions,
        node: &NodeView,
    ) -> Result<Demand, BudgetError> {
        self.fits(self.demand(ports, opts, node))
    }
}

/// The listen addresses of one service port (a change counts the
/// difference: those of its new ports less those of its old ones), on
/// `node`: the view the whole update plans against, read once, not once
/// per port.
pub fn addresses(sp: &ServicePort, opts: &ListenOptions, node: &NodeView) -> u64 {
    listen::plan_port(sp, opts, node).len() as u64
}

/// The shared proxy ports' listen addresses (none in per-service mode):
/// counted once, whatever the number of service ports.
pub fn shared_addresses(opts: &ListenOptions) -> u64 {
    listen::shared_plan(opts).len() as u64
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Origin, ServiceName, ServicePortName};

    fn ports(n: usize, protocol: Protocol) -> Vec<ServicePort> {
        (0..n)
            .map(|i| {
                let name = ServicePortName {
                    service: ServiceName::new("default", format!("s{i}")),
                    port: "".into(),
                };
                let mut sp = ServicePort::new(name, Origin::new("test"), protocol, 80);
                sp.node_port = std::num::NonZeroU16::new(30000 + (i % 2000) as u16);
                sp
            })
            .collect()
    }

    fn opts() -> ListenOptions {
        ListenOptions {
            bind_address: Ipv4Addr::UNSPECIFIED.into(),
            bind_address6: None,
            proxy_port_range: None,
            nodeport_addresses: vec![],
            workers: 2,
            redirect_rules: false,
            proxy_port_mode: crate::listen::ProxyPortMode::PerService,
        }
    }

    #[test]
    fn twenty_thousand_service_ports_do_not_fit_in_twenty_thousand_fds() {
        let budget = Budget { limit: 20_000, workers: 2, udp_max_flows: 8192 };
        let node = NodeView::of(vec![Ipv4Addr::UNSPECIFIED.into()], vec![], false);
        let err = budget.check(&ports(20_000, Protocol::Tcp), &opts(), &node).unwrap_err();
        // A proxy port and a node port each, on two workers.
        assert_eq!(err.demand.listening_sockets, 80_000);
        assert!(err.to_string().contains("RLIMIT_NOFILE is 20000"), "{err}");
        assert!(budget.check(&ports(1_000, Protocol::Tcp), &opts(), &node).is_ok());
    }

    #[test]
    fn shared_mode_needs_the_same_listening_sockets_for_a_hundred_or_ten_thousand_tcp_ports() {
        let budget = Budget { limit: 20_000, workers: 2, udp_max_flows: 8192 };
        let shared = ListenOptions {
            redirect_rules: true,
            proxy_port_mode: crate::listen::ProxyPortMode::Shared,
            bind_address6: Some("fd72::1".parse().unwrap()),
            bind_address: Ipv4Addr::new(169, 254, 99, 1).into(),
            ..opts()
        };
        let cluster_ip_only = |n| -> Vec<ServicePort> {
            let mut ports = ports(n, Protocol::Tcp);
            for sp in &mut ports {
                sp.node_port = None;
                sp.cluster_ips = vec!["10.96.0.1".parse().unwrap()];
            }
            ports
        };
        // Cluster IPs only: no node ports, nothing local to tell apart.
        let off_node = NodeView::of(vec![], vec![], true);
        let few = budget.demand(&cluster_ip_only(100), &shared, &off_node);
        let many = budget.check(&cluster_ip_only(10_000), &shared, &off_node).expect("fits");
        assert_eq!((few.listen_addresses, many.listen_addresses), (2, 2), "one per family");
        assert_eq!(many.listening_sockets, 4);
        let per_service =
            ListenOptions { proxy_port_mode: crate::listen::ProxyPortMode::PerService, ..shared };
        assert_eq!(
            budget.demand(&cluster_ip_only(10_000), &per_service, &off_node).listening_sockets,
            20_000
        );
    }

    #[test]
    fn udp_flows_count_only_when_a_port_is_udp() {
        let budget = Budget { limit: 20_000, workers: 2, udp_max_flows: 8192 };
        let node = NodeView::of(vec![Ipv4Addr::UNSPECIFIED.into()], vec![], false);
        assert_eq!(budget.demand(&ports(10, Protocol::Tcp), &opts(), &node).udp_flows, 0);
        assert_eq!(budget.demand(&ports(10, Protocol::Udp), &opts(), &node).udp_flows, 8192);
    }
}
