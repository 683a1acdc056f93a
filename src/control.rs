//! The control plane's one job: turn a source's update into a published
//! snapshot, or reject it and keep serving the last good one.
//!
//! update -> table (validate, join) -> binder (listeners) -> snapshot ->
//! one `ArcSwap` store -> wake the workers. Nothing here touches a
//! connection.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::balance::BalanceOptions;
use crate::balance::health::HealthRegistry;
use crate::budget::{self, Budget};
use crate::config::{ConfigError, ConfigErrorKind, Manifests};
use crate::dataplane::DataPlane;
use crate::listen::{self, BindError, Binder, Held, Listener, ListenerId, NodeView};
use crate::log_cap;
use crate::loops::{self, OwnAddress};
use crate::metrics::{Changes, Metrics};
use crate::model::{Origin, Protocol, ServicePort, ServicePortName};
use crate::snapshot::{BalanceContext, PortUpdate, SharedSnapshot, Snapshot};
use crate::source_ip::SourceOptions;
use crate::table::{Delta, PortChange, Prepared, Table};

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
    /// What it changed.
    pub summary: Summary,
    /// Where the time went.
    pub stages: Stages,
}

/// What an update changed, for its summary line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    /// Service ports added or changed.
    pub set: usize,
    pub removed: usize,
    pub listeners_added: usize,
    pub listeners_removed: usize,
    /// Listen addresses not served (benign ones included).
    pub bind_errors: usize,
}

/// How long each stage of an update took (`bench/control.rs` reports
/// them; the summary log line gives the total).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stages {
    /// The table: validate and join the change.
    pub join: Duration,
    /// The fd budget.
    pub budget: Duration,
    /// Listeners for the changed service ports.
    pub bind: Duration,
    /// Endpoint loops.
    pub loops: Duration,
    /// The table takes the change; the listener index; the log lines.
    pub commit: Duration,
    /// The snapshot: balancers, routes.
    pub build: Duration,
    /// The store, the workers' wake-up, the logs.
    pub publish: Duration,
}

impl Stages {
    pub fn total(&self) -> Duration {
        self.join + self.budget + self.bind + self.loops + self.commit + self.build + self.publish
    }
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
    /// The current snapshot's listeners, indexed (what a change binds
    /// against).
    held: Held,
    /// Listen addresses and UDP service ports of the table (the budget's
    /// running count).
    listen_addresses: u64,
    udp_ports: u64,
    /// Ports with a listen address not served (not benign): bound again at
    /// each update.
    unbound: BTreeSet<ServicePortName>,
    /// What each port's listen addresses counted in `listen_addresses`;
    /// a port that counted none has no entry (in shared mode, most: their
    /// proxy ports are the shared ones; 100k entries were 7.5 MB).
    addresses: HashMap<ServicePortName, u64>,
    /// What the last update planned listeners against.
    plan_inputs: Option<PlanInputs>,
    /// When the registries were last swept (`publish`).
    swept: Instant,
    /// How many service ports (the table's versions) have an endpoint on
    /// each (protocol, port number): only there can a new listener catch
    /// an unchanged port's endpoint, so a new listener on another number
    /// costs no walk over every port.
    endpoint_numbers: HashMap<(Protocol, u16), u32>,
}

/// The (protocol, port number) pairs `sp`'s endpoints use, each once.
fn endpoint_numbers(sp: &ServicePort) -> Vec<(Protocol, u16)> {
    let mut numbers: Vec<(Protocol, u16)> =
        sp.endpoints.iter().map(|e| (sp.protocol, e.addr.0.port())).collect();
    numbers.sort_unstable();
    numbers.dedup();
    numbers
}

/// How often at most the health and counter registries are swept of what
/// nothing holds any more: a sweep walks every endpoint and port (100k
/// ports: a few ms), so it must not come with every update of a churn.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The node's state a port's listen plan depends on: when it moves, the
/// ports depending on it are planned and bound again.
#[derive(Debug, PartialEq)]
struct PlanInputs {
    /// Where node ports listen (`--nodeport-addresses`).
    node_ips: Vec<IpAddr>,
    /// The node's addresses, sorted: whether an external or LB IP is
    /// local (listened on) or redirected.
    local: Vec<IpAddr>,
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
            held: Held::default(),
            listen_addresses: 0,
            udp_ports: 0,
            unbound: BTreeSet::new(),
            addresses: HashMap::new(),
            plan_inputs: None,
            swept: Instant::now(),
            endpoint_numbers: HashMap::new(),
        }
    }

    /// Serve with these transparent-mode settings.
    pub fn with_source(mut self, source: SourceOptions) -> Self {
        self.source = source;
        self
    }

    /// Apply a full set of manifests (a file source's load): what differs
    /// from the table goes the way of a change. `None`: it changes no
    /// service port (nothing is published).
    pub fn replace(
        &mut self,
        manifests: Manifests,
        data_plane: &DataPlane,
    ) -> Result<Option<Applied>, Rejected> {
        self.update(|table| table.prepare_replace(manifests), data_plane)
    }

    /// Apply a change to some Services and EndpointSlices (`None` as for
    /// [`Control::replace`]).
    pub fn apply(&mut self, delta: Delta, data_plane: &DataPlane) -> Result<Option<Applied>, Rejected> {
        self.update(|table| table.prepare(delta), data_plane)
    }

    /// Work out the change with `change`, check and bind the service
    /// ports it changes, commit it to the table and publish. The ports it
    /// leaves alone keep their listeners and state.
    fn update(
        &mut self,
        change: impl FnOnce(&Table) -> Result<Prepared, Vec<ConfigError>>,
        data_plane: &DataPlane,
    ) -> Result<Option<Applied>, Rejected> {
        let received = Instant::now();
        let mut stages = Stages::default();
        let mut clock = Instant::now();
        let mut lap = |stage: &mut Duration| {
            let now = Instant::now();
            *stage = now - clock;
            clock = now;
        };
        let prepared = change(&self.table).map_err(Rejected)?;
        lap(&mut stages.join);
        // A resync or a reread with no service port changed: the table
        // takes it (objects may differ in what no port uses), nothing is
        // bound or published. The first update always publishes.
        if prepared.change.is_empty() && self.snapshot.load().generation > 0 {
            self.table.commit(prepared);
            return Ok(None);
        }

        // Ports bound again without a change of their own (`bound_again`),
        // among them every port whose plan depends on an input that moved
        // since the last update: the node's addresses.
        let opts = self.binder.options();
        // One view of the node (one read of its interfaces) for the whole
        // update: the budget, the binder and the loop check plan with it.
        let node = NodeView::now(opts);
        let local = node.local.clone();
        let inputs = PlanInputs { node_ips: node.node_ips.clone(), local: local.clone() };
        let previous = self.snapshot.load_full();
        let c = &prepared.change;
        let mut leaving: HashSet<ServicePortName> = c.old.iter().map(|p| p.name.clone()).collect();
        let moved = self.plan_inputs.as_ref().filter(|last| **last != inputs);
        let replan: Vec<&ServicePortName> = match moved {
            None => Vec::new(),
            Some(last) => {
                let nodes = last.node_ips != inputs.node_ips;
                let locals = last.local != inputs.local;
                let depends = |sp: &ServicePort| {
                    (nodes && sp.node_port.is_some())
                        || (locals && !(sp.external_ips.is_empty() && sp.load_balancer_ips.is_empty()))
                };
                previous.ports.iter().map(|p| &p.spec).filter(|sp| depends(sp)).map(|sp| &sp.name).collect()
            }
        };
        let again = self.bound_again(&c.set, &leaving, &node, replan);

        // The budget: the listen addresses of the ports bound, counted
        // against the running total less what each counted last time.
        let counted: Vec<(ServicePortName, u64)> = c
            .set
            .iter()
            .chain(&again)
            .map(|sp| (sp.name.clone(), budget::addresses(sp, opts, &node)))
            .collect();
        let new_addresses: u64 = counted.iter().map(|(_, n)| n).sum();
        let old_addresses: u64 =
            c.old.iter().chain(&again).filter_map(|sp| self.addresses.get(&sp.name)).sum();
        let udp = |ports: &[Arc<ServicePort>]| {
            ports.iter().filter(|sp| sp.protocol == Protocol::Udp).count() as u64
        };
        let listen_addresses = (self.listen_addresses + new_addresses).saturating_sub(old_addresses);
        let shared = budget::shared_addresses(opts);
        let udp_ports = (self.udp_ports + udp(&c.set)).saturating_sub(udp(&c.old));
        if let Some(budget) = &self.budget
            && let Err(e) = budget.fits(budget.demand_of(listen_addresses + shared, udp_ports > 0))
        {
            let error = ConfigError {
                origin: Origin::new("the configuration"),
                object: None,
                field: None,
                kind: ConfigErrorKind::FdBudget(e),
            };
            return Err(Rejected(vec![error]));
        }
        lap(&mut stages.budget);

        leaving.extend(again.iter().map(|p| p.name.clone()));
        let binding: Cow<'_, [Arc<ServicePort>]> = match again.is_empty() {
            true => Cow::Borrowed(&c.set),
            false => {
                let mut all: Vec<Arc<ServicePort>> = c.set.iter().chain(&again).cloned().collect();
                all.sort_by(|a, b| a.name.cmp(&b.name));
                Cow::Owned(all)
            }
        };
        let (mut listeners, bind_errors) =
            self.binder.bind_changed(&binding, &self.held, &|p| leaving.contains(p), &node);
        lap(&mut stages.bind);

        // Only now are the proxy ports known. New listeners of a refused
        // update are dropped unserved (no worker has taken their sockets).
        let fresh: Vec<&Arc<Listener>> = listeners.iter().filter(|l| !self.held.has(l)).collect();
        let mut mine: HashMap<(Protocol, u16), Vec<OwnAddress>> = HashMap::new();
        for l in &listeners {
            mine.entry((l.key.protocol, l.addr.port())).or_default().push(loops::of_listener(l));
        }
        let own = |protocol: Protocol, port: u16| -> Vec<OwnAddress> {
            let held = self.held.on_number(protocol, port).iter().filter(|l| !leaving.contains(&l.key.port));
            let mut own: Vec<OwnAddress> = held.map(|l| loops::of_listener(l)).collect();
            own.extend(mine.get(&(protocol, port)).into_iter().flatten().cloned());
            own
        };
        let mut looping = loops::find_by(&binding, &own, &local);
        // A new listener may be where an unchanged port's endpoint points.
        let mut caught = Vec::new();
        if !fresh.is_empty() {
            let new_own = loops::of_listeners(&fresh.iter().map(|l| Arc::clone(l)).collect::<Vec<_>>());
            // Only an endpoint on a new listener's port number can loop;
            // with none on any of them, no port is walked.
            let numbers: HashSet<(Protocol, u16)> = fresh
                .iter()
                .map(|l| (l.key.protocol, l.addr.port()))
                .filter(|n| self.endpoint_numbers.contains_key(n))
                .collect();
            let suspect = |p: &ServicePort| {
                p.endpoints.iter().any(|e| numbers.contains(&(p.protocol, e.addr.0.port())))
            };
            let walked = if numbers.is_empty() { None } else { Some(previous.ports.iter()) };
            let unchanged =
                walked.into_iter().flatten().filter(|p| suspect(&p.spec) && !leaving.contains(&p.spec.name));
            for p in unchanged {
                let found = loops::find(std::slice::from_ref(&p.spec), &new_own, &local);
                if !found.is_empty() {
                    looping.extend(found);
                    let mut spec = ServicePort::clone(&p.spec);
                    loops::strip(std::slice::from_mut(&mut spec), &new_own, &local);
                    caught.push(Arc::new(spec));
                }
            }
        }
        if !looping.is_empty() && !self.table.is_tolerant() {
            return Err(Rejected(looping));
        }
        log_cap::error(&looping, "endpoint not served");
        lap(&mut stages.loops);

        drop(binding);
        let PortChange { mut set, removed, old, changes } = self.table.commit(prepared);
        for number in old.iter().flat_map(|sp| endpoint_numbers(sp)) {
            if let Some(n) = self.endpoint_numbers.get_mut(&number) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.endpoint_numbers.remove(&number);
                }
            }
        }
        for number in set.iter().flat_map(|sp| endpoint_numbers(sp)) {
            *self.endpoint_numbers.entry(number).or_default() += 1;
        }
        // Ports bound again keep what they held and lose what they lost.
        for n in &leaving {
            self.unbound.remove(n);
        }
        self.unbound.extend(bind_errors.iter().filter(|e| !e.is_benign()).map(|e| e.port().clone()));
        let mut old_listeners: Vec<ListenerId> = old
            .iter()
            .map(|p| &p.name)
            .chain(again.iter().map(|p| &p.name))
            .flat_map(|n| self.held.of_port(n))
            .map(|l| l.id)
            .collect();
        set.extend(again);
        if !looping.is_empty() {
            // Only the ports that lose an endpoint become copies of their own.
            for sp in &mut set {
                let mut one = [ServicePort::clone(sp)];
                loops::strip_by(&mut one, &own, &local);
                let [stripped] = one;
                if stripped.endpoints.len() != sp.endpoints.len() {
                    *sp = Arc::new(stripped);
                }
            }
        }
        // A caught port's kept listeners come back as its own: the index
        // drops them first, or it would hold them twice.
        let caught_names: Vec<ServicePortName> = caught.iter().map(|p| p.name.clone()).collect();
        for spec in caught {
            let kept = self.held.of_port(&spec.name);
            old_listeners.extend(kept.iter().map(|l| l.id));
            listeners.extend(kept.iter().cloned());
            set.push(spec);
        }
        set.sort_by(|a, b| a.name.cmp(&b.name));
        let before: HashSet<ListenerId> = old_listeners.iter().copied().collect();
        let now: HashSet<ListenerId> = listeners.iter().map(|l| l.id).collect();
        let added: Vec<&Arc<Listener>> = listeners.iter().filter(|l| !before.contains(&l.id)).collect();
        for l in &added {
            tracing::debug!(service = %l.key.port, role = %l.key.role, addr = %l.addr, "listening");
        }
        let summary = Summary {
            set: set.len(),
            removed: removed.len(),
            listeners_added: added.len(),
            listeners_removed: before.difference(&now).count(),
            bind_errors: bind_errors.len(),
        };
        log_bind_errors(&bind_errors);
        self.held.replace(leaving.iter().chain(&caught_names), &listeners);
        (self.listen_addresses, self.udp_ports) = (listen_addresses, udp_ports);
        for n in &leaving {
            self.addresses.remove(n);
        }
        self.addresses.extend(counted.into_iter().filter(|(_, n)| *n > 0));
        self.plan_inputs = Some(inputs);
        lap(&mut stages.commit);

        let built = Some(set.len());
        let update = PortUpdate { set, removed: &removed, listeners, old_listeners };
        let mut applied = self.publish(
            |ctx| Snapshot::update(&previous, previous.generation + 1, update, ctx),
            built,
            data_plane,
            &mut stages,
        );
        self.metrics.apply.published(received, changes);
        // The previous snapshot held what the change dropped: once it is
        // gone, the counters of the ports removed and the health of the
        // endpoints they left are forgotten (what a worker or the rule
        // syncer still holds waits for the periodic sweep).
        drop(previous);
        self.metrics.forget(&removed);
        self.health.forget(old.iter().flat_map(|p| p.endpoints.iter().map(|e| (p.protocol, e.addr))));
        applied.summary = summary;
        applied.stages = stages;
        Ok(Some(applied))
    }

    /// Unchanged ports to bind again with the change `set` (`leaving`:
    /// the changed ports' old names): those that failed to bind (retried
    /// at each update: a clash's winner may have gone, a port may be
    /// free), those of `replan` (whose plan an input changed), and the held claimants of an address a port of `set`
    /// sorting before them asks for (the first by name wins, as in the
    /// rules, whatever the order they came in). Their specs come from the
    /// table, sorted by name.
    fn bound_again(
        &self,
        set: &[Arc<ServicePort>],
        leaving: &HashSet<ServicePortName>,
        node: &NodeView,
        replan: Vec<&ServicePortName>,
    ) -> Vec<Arc<ServicePort>> {
        let set_names: HashSet<&ServicePortName> = set.iter().map(|p| &p.name).collect();
        let unchanged = |n: &ServicePortName| !set_names.contains(n) && !leaving.contains(n);
        let mut again: BTreeSet<&ServicePortName> =
            self.unbound.iter().chain(replan).filter(|n| unchanged(n)).collect();
        let opts = self.binder.options();
        for sp in set {
            for (role, ip, port) in listen::plan_port(sp, opts, node) {
                if role.is_proxy() {
                    continue;
                }
                if let Some(holder) = self.held.claimant(SocketAddr::new(ip, port), sp.protocol)
                    && *holder > sp.name
                    && unchanged(holder)
                {
                    again.insert(holder);
                }
            }
        }
        again.into_iter().filter_map(|n| self.table.port(n)).cloned().collect()
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
        let listeners = previous.listeners.to_vec();
        let build = |ctx: &BalanceContext<'_>| {
            Snapshot::new(previous.generation + 1, ports, listeners, &previous, ctx)
        };
        let applied = self.publish(build, None, data_plane, &mut Stages::default());
        // A sync with no service or endpoint change.
        self.metrics.apply.published(started, Changes::default());
        Some(applied)
    }

    /// This node's zone, as balancing uses it.
    pub fn zone(&self) -> Option<&str> {
        self.balance.locality.zone.as_deref()
    }

    /// Build the next snapshot with `build` and swap it in: the one way a
    /// snapshot is published. `built`: how many ports `build` builds
    /// (`None`: all); every port built is a full build.
    fn publish(
        &mut self,
        build: impl FnOnce(&BalanceContext<'_>) -> Snapshot,
        built: Option<usize>,
        data_plane: &DataPlane,
        stages: &mut Stages,
    ) -> Applied {
        let started = Instant::now();
        let ctx = BalanceContext {
            options: &self.balance,
            registry: &self.health,
            metrics: &self.metrics,
            source: &self.source,
        };
        let snapshot = build(&ctx);
        snapshot.listen_where_served();
        stages.build = started.elapsed();
        let full = built.is_none_or(|n| n >= snapshot.ports.len());
        self.metrics.apply.snapshot_built(stages.build, full);
        let started = Instant::now();
        let applied = Applied {
            generation: snapshot.generation,
            service_ports: snapshot.ports.len(),
            listeners: snapshot.listeners.len(),
            summary: Summary::default(),
            stages: Stages::default(),
        };
        self.metrics.generation.store(snapshot.generation, Ordering::Relaxed);
        self.snapshot.store(Arc::new(snapshot));
        data_plane.notify();
        self.ready.store(true, Ordering::Release);
        stages.publish = started.elapsed();
        // Counters and health of ports gone are dropped with their last
        // user; `update` has the registries forget them once the snapshot
        // that held them is replaced; what a worker or the rule syncer held
        // a while longer goes at the next sweep.
        if self.swept.elapsed() >= SWEEP_EVERY {
            self.swept = Instant::now();
            self.health.prune();
            self.metrics.prune();
        }
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

/// Bind errors: those expected on a healthy node at debug; the others at
/// error level, but a few lines whatever their number.
fn log_bind_errors(errors: &[BindError]) {
    let (benign, serious): (Vec<&BindError>, Vec<&BindError>) = errors.iter().partition(|e| e.is_benign());
    for e in benign {
        tracing::debug!(error = %e, "not listening");
    }
    log_cap::capped(
        serious,
        |e| tracing::error!(error = %e, source = ?std::error::Error::source(e).map(ToString::to_string), "not listening"),
        |more| tracing::error!(more, "not listening on more addresses (not shown)"),
    );
}
