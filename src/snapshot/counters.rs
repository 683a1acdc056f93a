//! A service port's counters as its `PortState` holds them: registered
//! with the process's [`Metrics`] when the port is built, or, when
//! `/metrics` carries no per-port series (`--per-service-metrics off`), at
//! the port's first count: most of 100k service ports never see a
//! connection, and each registration costs a few hundred bytes (the
//! counters, their name, the registry's entry).
//!
//! Invariants:
//! - A port rebuilt by a reload keeps the counters of its previous version
//!   (same name and protocol), so its counts go on; one made at a first
//!   count is the registry's own for that name and protocol, shared with
//!   any version of the port that holds one.
//! - The sums `/metrics` shows without per-port detail are over the
//!   registered counters: a port that never counted adds nothing to them.

use std::sync::{Arc, OnceLock};

use crate::metrics::{Metrics, PortCounters, PortDetail, PortMetrics};
use crate::model::ServicePort;

#[derive(Debug)]
pub struct Counters {
    metrics: Arc<Metrics>,
    spec: Arc<ServicePort>,
    port: OnceLock<Arc<PortMetrics>>,
}

impl Counters {
    /// The counters of `spec`: those of `previous` (its previous version's)
    /// when it has them, else registered now unless per-port detail is off.
    pub(super) fn new(metrics: &Arc<Metrics>, spec: &Arc<ServicePort>, previous: Option<&Counters>) -> Self {
        let port = OnceLock::new();
        let kept = previous.filter(|p| p.spec.protocol == spec.protocol).and_then(|p| p.port.get());
        match kept {
            Some(kept) => {
                let _ = port.set(Arc::clone(kept));
            }
            None if metrics.detail() != PortDetail::Off => {
                let _ = port.set(metrics.port(&spec.name, spec.protocol));
            }
            None => {}
        }
        Self { metrics: Arc::clone(metrics), spec: Arc::clone(spec), port }
    }

    /// Worker `worker`'s slot (registering the counters at a first count).
    pub fn slot(&self, worker: usize) -> &PortCounters {
        self.port.get_or_init(|| self.metrics.port(&self.spec.name, self.spec.protocol)).slot(worker)
    }

    /// Whether the counters are registered (for tests).
    #[cfg(test)]
    pub(super) fn registered(&self) -> Option<&Arc<PortMetrics>> {
        self.port.get()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::balance::BalanceOptions;
    use crate::balance::health::HealthRegistry;
    use crate::model::{Endpoint, EndpointAddr, Origin, Protocol, ServiceName, ServicePortName};
    use crate::snapshot::{BalanceContext, Snapshot};
    use crate::source_ip::SourceOptions;

    fn port(name: &str, protocol: Protocol, endpoints: u8) -> ServicePort {
        let name = ServicePortName { service: ServiceName::new("default", name), port: "".into() };
        let mut sp = ServicePort::new(name, Origin::new("t"), protocol, 80);
        let addr = |n| EndpointAddr(SocketAddr::from(([10, 0, 0, n], 80)));
        sp.endpoints = (1..=endpoints).map(|n| Endpoint::ready(addr(n))).collect();
        sp
    }

    /// A snapshot of `ports` (every one built anew) on top of `previous`.
    fn build(metrics: &Arc<Metrics>, ports: Vec<ServicePort>, previous: &Snapshot) -> Snapshot {
        let (options, registry, source) =
            (BalanceOptions::default(), HealthRegistry::default(), SourceOptions::default());
        let ctx = BalanceContext { options: &options, registry: &registry, metrics, source: &source };
        Snapshot::new(previous.generation + 1, ports, Vec::new(), previous, &ctx)
    }

    fn counters<'a>(snapshot: &'a Snapshot, name: &str) -> &'a Counters {
        &snapshot.ports.iter().find(|p| p.spec.name.service.name == name).expect("port").metrics
    }

    #[test]
    fn without_per_port_detail_a_port_registers_its_counters_at_its_first_count_and_keeps_them() {
        let metrics = Arc::new(Metrics::new(1));
        metrics.set_detail(PortDetail::Off);
        let s1 = build(
            &metrics,
            vec![port("a", Protocol::Tcp, 2), port("b", Protocol::Tcp, 2)],
            &Snapshot::default(),
        );
        assert_eq!(metrics.remembered(), 0, "built, never counted: nothing registered");
        let a = counters(&s1, "a");
        a.slot(0).add(&a.slot(0).accepted, 1);
        assert_eq!(metrics.remembered(), 1, "the port that counted, alone");
        // A reload changes both ports' endpoints: new states, same counters.
        let s2 = build(&metrics, vec![port("a", Protocol::Tcp, 3), port("b", Protocol::Tcp, 3)], &s1);
        assert!(!Arc::ptr_eq(&s1.ports[0], &s2.ports[0]), "a new state for the changed port");
        let kept = counters(&s2, "a").registered().expect("taken over");
        assert!(Arc::ptr_eq(kept, a.registered().expect("registered")));
        assert!(counters(&s2, "b").registered().is_none(), "still never counted");
        drop(s1);
        assert_eq!(counters(&s2, "a").slot(0).accepted.load(Ordering::Relaxed), 1, "the count goes on");
        // A port that turns UDP counts apart from its TCP self.
        let s3 = build(&metrics, vec![port("a", Protocol::Udp, 3), port("b", Protocol::Tcp, 3)], &s2);
        assert!(counters(&s3, "a").registered().is_none());
    }

    #[test]
    fn with_per_port_detail_every_port_registers_its_counters_when_built() {
        let metrics = Arc::new(Metrics::new(1));
        let s1 = build(
            &metrics,
            vec![port("a", Protocol::Tcp, 2), port("b", Protocol::Udp, 0)],
            &Snapshot::default(),
        );
        assert_eq!(metrics.remembered(), 2, "/metrics shows each port, counted or not");
        assert!(counters(&s1, "b").registered().is_some());
    }
}
