//! The control plane's one job: turn a source's update into a published
//! snapshot, or reject it and keep serving the last good one.
//!
//! update -> table (validate, join) -> binder (listeners) -> snapshot ->
//! one `ArcSwap` store -> wake the workers. Nothing here touches a
//! connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::balance::BalanceOptions;
use crate::balance::health::HealthRegistry;
use crate::budget::Budget;
use crate::config::{ConfigError, ConfigErrorKind, Manifests};
use crate::dataplane::DataPlane;
use crate::listen::{self, Binder, Listener};
use crate::loops;
use crate::metrics::{Changes, Metrics};
use crate::model::{Origin, ServicePort};
use crate::snapshot::{BalanceContext, SharedSnapshot, Snapshot};
use crate::source_ip::SourceOptions;
use crate::table::{Delta, Table};

/// Why an update was not applied.
#[derive(Debug, thiserror::Error)]
#[error("configuration rejected ({} errors); the last good configuration keeps serving", .0.len())]
pub struct Rejected(pub Vec<ConfigError>);

/// What a published update did.
#[derive(Debug)]
pub struct Applied {
    pub generation: u64,
    pub service_ports: usize,
    pub listeners: usize,
}

pub struct Control {
    table: Table,
    binder: Binder,
    balance: BalanceOptions,
    /// Endpoint health and load, kept across snapshots.
    health: HealthRegistry,
    metrics: Arc<Metrics>,
    snapshot: SharedSnapshot,
    ready: Arc<AtomicBool>,
    /// The fd budget a new configuration must fit in; none: unchecked.
    budget: Option<Budget>,
    /// Transparent mode: whose address endpoints see.
    source: SourceOptions,
}

impl Control {
    pub fn new(
        binder: Binder,
        balance: BalanceOptions,
        health: HealthRegistry,
        metrics: Arc<Metrics>,
        snapshot: SharedSnapshot,
        ready: Arc<AtomicBool>,
    ) -> Self {
        Self {
            table: Table::default(),
            binder,
            balance,
            health,
            metrics,
            snapshot,
            ready,
            budget: None,
            source: SourceOptions::default(),
        }
    }

    /// Serve with these transparent-mode settings.
    pub fn with_source(mut self, source: SourceOptions) -> Self {
        self.source = source;
        self
    }

    /// Apply a full set of manifests (a file source's load).
    pub fn replace(&mut self, manifests: Manifests, data_plane: &DataPlane) -> Result<Applied, Rejected> {
        self.update(|table| table.try_replace(manifests), data_plane)
    }

    /// Apply a change to some Services and EndpointSlices.
    pub fn apply(&mut self, delta: Delta, data_plane: &DataPlane) -> Result<Applied, Rejected> {
        self.update(|table| table.try_apply(delta), data_plane)
    }

    /// Change the table with `change`, then check, bind and publish.
    fn update(
        &mut self,
        change: impl FnOnce(&mut Table) -> Result<Vec<ServicePort>, Vec<ConfigError>>,
        data_plane: &DataPlane,
    ) -> Result<Applied, Rejected> {
        let received = std::time::Instant::now();
        // The table commits on success; a check below may still refuse the
        // update, and then the table must be as it was.
        let saved = self.table.clone();
        let mut ports = change(&mut self.table).map_err(Rejected)?;
        let node_ips = listen::node_addresses(&self.binder.options().nodeport_addresses);
        if let Some(budget) = &self.budget
            && let Err(e) = budget.check(&ports, self.binder.options(), &node_ips)
        {
            self.table = saved;
            let error = ConfigError {
                origin: Origin("the configuration".into()),
                object: None,
                field: None,
                kind: ConfigErrorKind::FdBudget(e),
            };
            return Err(Rejected(vec![error]));
        }
        let previous = self.snapshot.load_full();
        let changes = changes(&previous, &ports);
        let (listeners, bind_errors) = self.binder.bind(&ports, &previous.listeners);
        // Only now are the proxy ports known. New listeners of a refused
        // update are dropped unserved (no worker has taken their sockets).
        let own = loops::of_listeners(&listeners);
        let local = loops::local_ips();
        let looping = loops::find(&ports, &own, &local);
        if !looping.is_empty() {
            if self.table.is_tolerant() {
                for e in &looping {
                    tracing::error!(error = %e, "endpoint not served");
                }
                loops::strip(&mut ports, &own, &local);
            } else {
                self.table = saved;
                return Err(Rejected(looping));
            }
        }
        for l in listeners.iter().filter(|l| !previous.listeners.iter().any(|p| p.id == l.id)) {
            tracing::info!(service = %l.key.port, role = %l.key.role, addr = %l.addr, "listening");
        }
        for e in &bind_errors {
            if e.is_benign() {
                tracing::info!(error = %e, "not listening");
            } else {
                tracing::error!(error = %e, source = ?std::error::Error::source(e).map(ToString::to_string), "not listening");
            }
        }
        let applied = self.publish(ports, listeners, &previous, data_plane);
        self.metrics.apply.published(received, changes);
        Ok(applied)
    }

    /// Move this node to another zone (the Node's label changed): the
    /// same service ports and listeners, with balancers rebuilt for the
    /// new zone. Nothing is published before the first update (`None`).
    pub fn relocate(&mut self, zone: Option<String>, data_plane: &DataPlane) -> Option<Applied> {
        self.balance.locality.zone = zone;
        let previous = self.snapshot.load_full();
        if previous.generation == 0 {
            return None;
        }
        let started = std::time::Instant::now();
        let ports = previous.ports.iter().map(|p| p.spec.clone()).collect();
        let applied = self.publish(ports, previous.listeners.clone(), &previous, data_plane);
        // A sync with no service or endpoint change.
        self.metrics.apply.published(started, Changes::default());
        Some(applied)
    }

    /// This node's zone, as balancing uses it.
    pub fn zone(&self) -> Option<&str> {
        self.balance.locality.zone.as_deref()
    }

    /// Build the next snapshot and swap it in: the one way a snapshot is
    /// published.
    fn publish(
        &mut self,
        ports: Vec<ServicePort>,
        listeners: Vec<Arc<Listener>>,
        previous: &Snapshot,
        data_plane: &DataPlane,
    ) -> Applied {
        let ctx = BalanceContext {
            options: &self.balance,
            registry: &self.health,
            metrics: &self.metrics,
            source: &self.source,
        };
        let snapshot = Snapshot::new(previous.generation + 1, ports, listeners, previous, &ctx);
        snapshot.listen_where_served();
        let applied = Applied {
            generation: snapshot.generation,
            service_ports: snapshot.ports.len(),
            listeners: snapshot.listeners.len(),
        };
        self.metrics.generation.store(snapshot.generation, Ordering::Relaxed);
        self.snapshot.store(Arc::new(snapshot));
        data_plane.notify();
        self.ready.store(true, Ordering::Release);
        applied
    }

    /// Refuse configurations that do not fit in `budget`.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Serve through cross-object errors (logged once each) instead of
    /// rejecting the update: for the Kubernetes API source, which keeps
    /// each object's last good version itself (`table` module header).
    pub fn tolerate_cross_object_errors(mut self) -> Self {
        self.table = Table::tolerant();
        self
    }
}

/// Which service ports an update changes, as kube-proxy counts endpoint
/// and service changes (a port added or removed counts as both).
fn changes(previous: &Snapshot, ports: &[ServicePort]) -> Changes {
    let old: std::collections::HashMap<_, _> =
        previous.ports.iter().map(|p| (&p.spec.name, &p.spec)).collect();
    let mut c = Changes::default();
    let mut kept = 0;
    for new in ports {
        let Some(old) = old.get(&new.name) else {
            c.endpoints += 1;
            c.services += 1;
            continue;
        };
        kept += 1;
        if *old == new {
            continue;
        }
        if old.endpoints == new.endpoints {
            c.services += 1;
            continue;
        }
        c.endpoints += 1;
        // Both may have changed: compare the rest (rare, so the clone is).
        let rest = |p: &ServicePort| ServicePort { endpoints: Vec::new(), ..p.clone() };
        if rest(old) != rest(new) {
            c.services += 1;
        }
    }
    let removed = (old.len() - kept) as u64;
    c.endpoints += removed;
    c.services += removed;
    c
}
