//! Which endpoints of a service port may receive a given kind of traffic:
//! endpoint conditions, traffic policies and topology preferences. Pure.
//!
//! The order of the rules, as modern kube-proxy applies them:
//! 1. Scope: `internalTrafficPolicy` governs cluster-IP / proxy-port
//!    traffic, `externalTrafficPolicy` node-port, external and
//!    load-balancer traffic. `Local` keeps only endpoints on this node.
//! 2. Conditions: the ready endpoints; if none is ready, those serving
//!    while terminating; never one that is not serving.
//! 3. Topology (not under `Local`, which takes precedence):
//!    `PreferSameNode` then `PreferSameZone` keep the nearby endpoints
//!    (by EndpointSlice hints when an endpoint has them, else by its own
//!    `nodeName` / `zone`), falling back to all when none is nearby.

use serde::Serialize;

use crate::model::{Endpoint, EndpointAddr, ServicePort, TrafficDistribution, TrafficPolicy};

/// Which traffic a balancer serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Scope {
    /// To the cluster IP, i.e. the proxy port.
    Internal,
    /// To a node port, an external IP or a load-balancer IP.
    External,
}

/// Where this node is (`--node-name`, `--zone`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    pub node_name: Option<String>,
    pub zone: Option<String>,
}

/// The endpoints of `sp` that `scope` traffic may go to, in address order.
pub fn eligible(sp: &ServicePort, scope: Scope, here: &Locality) -> Vec<EndpointAddr> {
    let policy = match scope {
        Scope::Internal => sp.internal_policy,
        Scope::External => sp.external_policy,
    };
    let in_scope: Vec<&Endpoint> = match policy {
        TrafficPolicy::Cluster => sp.endpoints.iter().collect(),
        TrafficPolicy::Local => sp
            .endpoints
            .iter()
            .filter(|e| here.node_name.is_some() && e.node_name.as_deref() == here.node_name.as_deref())
            .collect(),
    };
    let mut usable: Vec<&Endpoint> = in_scope.iter().copied().filter(|e| e.conditions.ready).collect();
    if usable.is_empty() {
        usable = in_scope.into_iter().filter(|e| e.conditions.serving && e.conditions.terminating).collect();
    }
    if policy == TrafficPolicy::Cluster {
        usable = prefer_nearby(usable, sp.distribution, here);
    }
    usable.into_iter().map(|e| e.addr).collect()
}

fn prefer_nearby<'a>(
    usable: Vec<&'a Endpoint>,
    distribution: TrafficDistribution,
    here: &Locality,
) -> Vec<&'a Endpoint> {
    let same_node = |e: &&Endpoint| match &here.node_name {
        Some(node) if !e.hints_nodes().is_empty() => e.hints_nodes().iter().any(|h| h == node),
        Some(node) => e.node_name.as_deref() == Some(node.as_str()),
        None => false,
    };
    let same_zone = |e: &&Endpoint| match &here.zone {
        Some(zone) if !e.hints_zones().is_empty() => e.hints_zones().iter().any(|h| h == zone),
        Some(zone) => e.zone.as_deref() == Some(zone.as_str()),
        None => false,
    };
    let tiers: &[&dyn Fn(&&Endpoint) -> bool] = match distribution {
        TrafficDistribution::Any => &[],
        TrafficDistribution::PreferSameZone => &[&same_zone],
        TrafficDistribution::PreferSameNode => &[&same_node, &same_zone],
    };
    for near in tiers {
        let nearby: Vec<&Endpoint> = usable.iter().copied().filter(near).collect();
        if !nearby.is_empty() {
            return nearby;
        }
    }
    usable
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Conditions, Origin, Placement, Protocol, ServiceName, ServicePortName};
    use std::net::SocketAddr;

    fn ep(last: u8, node: &str, zone: &str, c: (bool, bool, bool)) -> Endpoint {
        Endpoint {
            addr: EndpointAddr(SocketAddr::from(([10, 0, 0, last], 80))),
            conditions: Conditions { ready: c.0, serving: c.1, terminating: c.2 },
            place: Placement { node_name: Some(node.into()), zone: Some(zone.into()), hints: None }.shared(),
        }
    }

    const READY: (bool, bool, bool) = (true, true, false);
    const DRAINING: (bool, bool, bool) = (false, true, true);
    const GONE: (bool, bool, bool) = (false, false, true);

    fn port(endpoints: Vec<Endpoint>) -> ServicePort {
        let name = ServicePortName { service: ServiceName::new("default", "s"), port: "".into() };
        let mut sp = ServicePort::new(name, Origin::new("t"), Protocol::Tcp, 80);
        sp.endpoints = endpoints;
        sp
    }

    fn here() -> Locality {
        Locality { node_name: Some("n1".into()), zone: Some("z1".into()) }
    }

    fn lasts(v: Vec<EndpointAddr>) -> Vec<u8> {
        v.iter()
            .map(|a| match a.0.ip() {
                std::net::IpAddr::V4(ip) => ip.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            })
            .collect()
    }

    #[test]
    fn serving_terminating_endpoints_are_used_only_when_none_is_ready() {
        let sp = port(vec![ep(1, "n1", "z1", DRAINING), ep(2, "n2", "z1", GONE)]);
        assert_eq!(lasts(eligible(&sp, Scope::Internal, &here())), [1]);
        let sp = port(vec![ep(1, "n1", "z1", DRAINING), ep(3, "n2", "z1", READY)]);
        assert_eq!(lasts(eligible(&sp, Scope::Internal, &here())), [3]);
        let sp = port(vec![ep(2, "n2", "z1", GONE)]);
        assert!(eligible(&sp, Scope::Internal, &here()).is_empty());
    }

    #[test]
    fn local_policy_keeps_this_nodes_endpoints_for_its_scope_only() {
        let mut sp = port(vec![ep(1, "n1", "z1", READY), ep(2, "n2", "z1", READY)]);
        sp.external_policy = TrafficPolicy::Local;
        assert_eq!(lasts(eligible(&sp, Scope::External, &here())), [1]);
        assert_eq!(lasts(eligible(&sp, Scope::Internal, &here())), [1, 2]);
        sp.internal_policy = TrafficPolicy::Local;
        let elsewhere = Locality { node_name: Some("n9".into()), zone: None };
        assert!(eligible(&sp, Scope::Internal, &elsewhere).is_empty(), "none local: nothing");
    }

    #[test]
    fn topology_prefers_nearby_and_falls_back_to_all() {
        let mut sp = port(vec![ep(1, "n1", "z1", READY), ep(2, "n2", "z1", READY), ep(3, "n3", "z2", READY)]);
        sp.distribution = TrafficDistribution::PreferSameNode;
        assert_eq!(lasts(eligible(&sp, Scope::Internal, &here())), [1]);
        sp.distribution = TrafficDistribution::PreferSameZone;
        assert_eq!(lasts(eligible(&sp, Scope::Internal, &here())), [1, 2]);
        let far = Locality { node_name: Some("n7".into()), zone: Some("z7".into()) };
        assert_eq!(lasts(eligible(&sp, Scope::Internal, &far)), [1, 2, 3]);
    }

    #[test]
    fn slice_hints_override_the_endpoints_own_zone() {
        let mut a = ep(1, "n1", "z1", READY);
        a.hints = crate::model::Hints::new(vec!["z2".into()], vec![]);
        let mut sp = port(vec![a, ep(2, "n2", "z2", READY)]);
        sp.distribution = TrafficDistribution::PreferSameZone;
        let z2 = Locality { node_name: None, zone: Some("z2".into()) };
        assert_eq!(lasts(eligible(&sp, Scope::Internal, &z2)), [1, 2]);
        assert!(eligible(&sp, Scope::Internal, &here()).len() == 2, "no endpoint hinted for z1: all");
    }

    #[test]
    fn local_policy_takes_precedence_over_topology() {
        let mut sp = port(vec![ep(1, "n2", "z1", READY), ep(2, "n1", "z2", READY)]);
        sp.internal_policy = TrafficPolicy::Local;
        sp.distribution = TrafficDistribution::PreferSameZone;
        assert_eq!(lasts(eligible(&sp, Scope::Internal, &here())), [2]);
    }
}
