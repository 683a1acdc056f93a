//! The immutable state the data plane serves from, published through one
//! `ArcSwap`.
//!
//! A snapshot is built off the hot path from a validated configuration
//! (the service ports) and the listeners bound for it. On the hot path a
//! worker only `load()`s it, once per new connection, and never waits.
//!
//! Invariants:
//! - A snapshot never changes after it is published; a new configuration
//!   is a new snapshot swapped in whole (one swap, so listeners, endpoints
//!   and balancers always agree).
//! - A service port whose balancer inputs (eligible endpoints, scheduler,
//!   affinity) did not change keeps its `Balancer` (the same `Arc`), so a
//!   reload does not restart its rotation or drop its pins.
//! - A service port an update does not change keeps its `PortState` (the
//!   same `Arc`, `Arc::ptr_eq` with the previous snapshot's): a reader may
//!   tell changed ports by pointer. An update builds only the ports it
//!   changes ([`Snapshot::update`]); the rest of the snapshot is shared
//!   with the previous one: the listener list whole when no listener
//!   comes or goes, the port list chunk by chunk (`ports`), the routes and
//!   the destinations shard by shard (`routes`, `destinations`), the
//!   health-checked ports whole when none of them changes. What an update
//!   copies grows with what it changes, not with the number of ports.
//! - `changed_listeners` names every listener added, removed or whose
//!   service port changed since the previous generation, so a worker one
//!   generation behind follows those alone.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwap;

use crate::balance::eligible::Scope;
use crate::balance::health::HealthRegistry;
use crate::balance::{BalanceOptions, Balancer};
use crate::listen::{ListenRole, Listener, ListenerId};
use crate::metrics::Metrics;
use crate::model::{IpFamily, ProxyPort, ServicePort, ServicePortName};
use crate::redirect::rules::Locality;
use crate::source_ip::{SourceOptions, SourcePlan};

mod counters;
pub use counters::Counters;
mod destinations;
pub use destinations::{Destination, Destinations};
mod ports;
pub use ports::Ports;
mod routes;
use routes::{RouteEntry, Routes};
mod view;
pub use view::{BalancersView, EndpointView, FamilyView, ListenerView, PortView, SnapshotView};

/// One service port as served: its spec and its selection state for each
/// kind of traffic (they differ when a traffic policy is `Local`) and, for
/// a dual-stack port, each family.
#[derive(Debug)]
pub struct PortState {
    /// The table's own copy, shared (not cloned) by every snapshot that
    /// serves this version of the port.
    pub spec: Arc<ServicePort>,
    pub balancers: Balancers,
    /// Its counters, one slot per worker; kept across reloads, registered
    /// at the first count when `/metrics` shows none per port.
    pub metrics: Counters,
    /// Whose address each endpoint sees (transparent mode).
    pub source: SourcePlan,
}

/// A service port's balancers, each `[internal, external]`: cluster-IP /
/// proxy-port traffic (`internalTrafficPolicy`), and node-port,
/// external-IP and load-balancer traffic (`externalTrafficPolicy`).
#[derive(Debug)]
pub enum Balancers {
    /// A single-family port (the join already left out endpoints of the
    /// other family; an edge Service naming no family balances them all).
    One([Arc<Balancer>; 2]),
    /// A dual-stack port, `[IPv4, IPv6]`, each over the endpoints of that
    /// family only: traffic to an address uses endpoints of its family, as
    /// kube-proxy's one proxier per family does.
    PerFamily(Box<[[Arc<Balancer>; 2]; 2]>),
}

/// Whether a family's endpoints can take traffic, for the rules: each
/// address of a dual-stack port is judged by its own family's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Emptiness {
    /// No endpoint in scope for cluster-IP / for external traffic.
    pub internal: bool,
    pub external: bool,
    /// Endpoints exist at all (in any scope, kube-proxy's `hasEndpoints`):
    /// with none in scope, traffic is then dropped rather than rejected.
    pub has_endpoints: bool,
}

impl PortState {
    /// The balancer for traffic of `family` in `scope`.
    pub fn balancer(&self, scope: Scope, family: IpFamily) -> &Arc<Balancer> {
        let scope = usize::from(scope == Scope::External);
        match &self.balancers {
            Balancers::One(pair) => &pair[scope],
            Balancers::PerFamily(families) => &families[family_index(family)][scope],
        }
    }

    /// Whether traffic of `family` has endpoints, in each scope and at all.
    pub fn emptiness(&self, family: IpFamily) -> Emptiness {
        let of_family = |e: &&crate::model::Endpoint| match self.balancers {
            Balancers::One(_) => true,
            Balancers::PerFamily(_) => IpFamily::of(e.addr.0.ip()) == family,
        };
        Emptiness {
            internal: self.balancer(Scope::Internal, family).is_empty(),
            external: self.balancer(Scope::External, family).is_empty(),
            has_endpoints: self.spec.endpoints.iter().filter(of_family).any(|e| e.usable()),
        }
    }
}

impl PortState {
    /// A service port's state; balancers whose inputs did not change, and
    /// the counters, are taken over from `previous` (its previous version).
    fn build(spec: Arc<ServicePort>, previous: Option<&PortState>, ctx: &BalanceContext<'_>) -> Self {
        let prev = previous.map(|p| &p.balancers);
        let pair = |spec: &ServicePort, prev: Option<&[Arc<Balancer>; 2]>| {
            Balancer::build_pair(spec, ctx.options, ctx.registry, prev)
        };
        // Only the balancers traffic uses are built: a dual-stack
        // port's listeners all have a family of their own.
        let balancers = if dual_stack(&spec) {
            Balancers::PerFamily(Box::new([IpFamily::V4, IpFamily::V6].map(|family| {
                let mut of_family = ServicePort::clone(&spec);
                of_family.endpoints.retain(|e| IpFamily::of(e.addr.0.ip()) == family);
                let prev = match prev {
                    Some(Balancers::PerFamily(f)) => Some(&f[family_index(family)]),
                    _ => None,
                };
                pair(&of_family, prev)
            })))
        } else {
            let prev = match prev {
                Some(Balancers::One(p)) => Some(p),
                _ => None,
            };
            Balancers::One(pair(&spec, prev))
        };
        let metrics = Counters::new(ctx.metrics, &spec, previous.map(|p| &p.metrics));
        let node = ctx.options.locality.node_name.as_deref();
        let source = SourcePlan::build(&spec, ctx.source, node);
        PortState { spec, balancers, metrics, source }
    }
}

fn family_index(family: IpFamily) -> usize {
    usize::from(family == IpFamily::V6)
}

/// Whether a service port is dual-stack: cluster IPs of both families.
fn dual_stack(spec: &ServicePort) -> bool {
    let v6 = |ip: &std::net::IpAddr| IpFamily::of(*ip) == IpFamily::V6;
    spec.cluster_ips.iter().any(v6) && !spec.cluster_ips.iter().all(v6)
}

/// What the balancers and counters of a new snapshot are built with.
pub struct BalanceContext<'a> {
    pub options: &'a BalanceOptions,
    pub registry: &'a HealthRegistry,
    pub metrics: &'a Arc<Metrics>,
    pub source: &'a SourceOptions,
}

/// A listener's service port, and the balancer for its kind of traffic.
pub struct Route<'a> {
    pub port: &'a Arc<PortState>,
    pub balancer: &'a Arc<Balancer>,
}

/// Which traffic a listener receives.
pub fn scope_of(role: ListenRole) -> Scope {
    match role {
        ListenRole::Proxy | ListenRole::Proxy6 => Scope::Internal,
        ListenRole::ExternalProxy
        | ListenRole::ExternalProxy6
        | ListenRole::NodePort(_)
        | ListenRole::External(_)
        | ListenRole::LoadBalancer(_) => Scope::External,
    }
}

/// Whether a client may use a listener: `loadBalancerSourceRanges`, when
/// given, admit only matching clients on a LoadBalancer IP. The rules drop
/// the others before they get here; this check is what holds with
/// `--redirect none` (kube-proxy, too, leaves NodePorts and externalIPs
/// unfiltered). Redirected LB IPs arrive on the external proxy port mixed
/// with externalIPs, so only the rules can tell them apart.
///
/// As kube-proxy, ranges are filtered by family: with none of the client's
/// family, the IP stays open (the rules leave it open too).
pub fn admits(role: ListenRole, spec: &ServicePort, client: std::net::IpAddr) -> bool {
    let client = client.to_canonical();
    let family = IpFamily::of(client);
    let mut ranges =
        spec.load_balancer_source_ranges.iter().filter(|r| IpFamily::of(r.addr()) == family).peekable();
    !matches!(role, ListenRole::LoadBalancer(_))
        || ranges.peek().is_none()
        || ranges.any(|r| r.contains(&client))
}

/// The listener role whose source-range check a header's client meets: a
/// connection redirected to the external proxy port (`destination`, its
/// original destination, a non-local LoadBalancer IP) is checked as if it
/// had reached that IP's own listener, since with PROXY headers accepted
/// the rules leave such IPs out of the firewall (see `redirect/rules.rs`).
pub fn header_role(role: ListenRole, spec: &ServicePort, destination: std::net::IpAddr) -> ListenRole {
    let destination = destination.to_canonical();
    match role {
        ListenRole::ExternalProxy | ListenRole::ExternalProxy6
            if spec.load_balancer_ips.iter().any(|ip| ip.to_canonical() == destination) =>
        {
            ListenRole::LoadBalancer(destination)
        }
        _ => role,
    }
}

/// The whole served state.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one per published snapshot.
    pub generation: u64,
    /// Sorted by service port name; shared in chunks with the previous
    /// snapshot (`ports`).
    pub ports: Ports,
    /// Shared with the previous snapshot while no listener comes or goes.
    pub listeners: Arc<Vec<Arc<Listener>>>,
    /// Which port and scope each listener serves.
    routes: Routes,
    /// Listeners added, removed, or whose port changed since the previous
    /// generation (module header).
    pub changed_listeners: Vec<ListenerId>,
    /// Whether this snapshot was built whole (not from a change).
    pub full: bool,
    /// The shared proxy ports (`--proxy-port-mode shared`), which route
    /// by original destination; empty in per-service mode.
    shared: Vec<ListenerId>,
    /// Where each original destination a shared port may see goes; kept
    /// only when there is a shared port, shared in shards with the
    /// previous snapshot (`destinations`).
    destinations: Destinations,
    /// Connections to a shared port whose original destination is no
    /// service port's, per worker (`Metrics::unmatched`).
    unmatched: Arc<[AtomicU64]>,
    /// The ports with a `healthCheckNodePort`, by name: what
    /// `service_health` follows, without a walk over every port. Chunked
    /// like `ports`: an update copies the chunks it touches.
    health_checked: Ports,
}

/// What an update changes, for [`Snapshot::update`].
pub struct PortUpdate<'a> {
    /// Service ports added or changed (new versions), sorted by name.
    pub set: Vec<Arc<ServicePort>>,
    /// Service ports removed, sorted.
    pub removed: &'a [ServicePortName],
    /// The listeners of the set ports (new or kept).
    pub listeners: Vec<Arc<Listener>>,
    /// The previous listeners of the set and removed ports.
    pub old_listeners: Vec<ListenerId>,
}

impl Snapshot {
    /// Assemble a snapshot of `ports` and their `listeners`, every port
    /// built anew; balancers whose inputs did not change are taken over
    /// from `previous` (same `Arc`: rotation, pins and counts go on).
    pub fn new(
        generation: u64,
        ports: Vec<impl Into<Arc<ServicePort>>>,
        listeners: Vec<Arc<Listener>>,
        previous: &Snapshot,
        ctx: &BalanceContext<'_>,
    ) -> Self {
        let mut ports: Vec<Arc<ServicePort>> = ports.into_iter().map(Into::into).collect();
        ports.sort_by(|a, b| a.name.cmp(&b.name));
        let update = PortUpdate { set: ports, removed: &[], listeners, old_listeners: Vec::new() };
        let mut snapshot = Self::build(&Snapshot::default(), previous, generation, update, ctx);
        snapshot.changed_listeners.extend(previous.listeners.iter().map(|l| l.id));
        snapshot.changed_listeners.sort_unstable();
        snapshot.changed_listeners.dedup();
        snapshot.full = true;
        snapshot
    }

    /// The next snapshot after `previous`: the ports `update` sets are
    /// built, those it removes go, every other port keeps its `PortState`.
    pub fn update(
        previous: &Snapshot,
        generation: u64,
        update: PortUpdate<'_>,
        ctx: &BalanceContext<'_>,
    ) -> Self {
        Self::build(previous, previous, generation, update, ctx)
    }

    /// `update` on top of `base`, balancers taken over from `balancers`.
    fn build(
        base: &Snapshot,
        balancers: &Snapshot,
        generation: u64,
        update: PortUpdate<'_>,
        ctx: &BalanceContext<'_>,
    ) -> Self {
        let PortUpdate { set, removed, listeners, old_listeners } = update;
        let built: Vec<Arc<PortState>> = set
            .into_iter()
            .map(|spec| {
                let previous = balancers.port(&spec.name).map(|p| &**p);
                Arc::new(PortState::build(spec, previous, ctx))
            })
            .collect();
        let ports = base.ports.with(&built, removed);
        let mut now: Vec<ListenerId> = listeners.iter().map(|l| l.id).collect();
        let mut before = old_listeners.clone();
        now.sort_unstable();
        before.sort_unstable();
        let listener_list = if now == before {
            Arc::clone(&base.listeners)
        } else {
            let old: std::collections::HashSet<ListenerId> = before.iter().copied().collect();
            let mut list: Vec<Arc<Listener>> =
                base.listeners.iter().filter(|l| !old.contains(&l.id)).cloned().collect();
            list.extend(listeners.iter().cloned());
            Arc::new(list)
        };
        let by_name = |name: &ServicePortName| {
            built.binary_search_by(|p| p.spec.name.cmp(name)).ok().map(|i| Arc::clone(&built[i]))
        };
        let entries = listeners.iter().filter_map(|l| {
            let port = by_name(&l.key.port)?;
            let family = IpFamily::of(l.addr.ip());
            Some((l.id, RouteEntry { listener: Arc::clone(l), port, scope: scope_of(l.key.role), family }))
        });
        let routes = base.routes.with(&before, entries);
        let mut changed_listeners = before;
        changed_listeners.extend(now);
        changed_listeners.sort_unstable();
        changed_listeners.dedup();
        // The shared proxy ports come with the first bind and stay.
        let mut shared = base.shared.clone();
        shared.extend(listeners.iter().filter(|l| l.key.is_shared()).map(|l| l.id));
        shared.sort_unstable();
        shared.dedup();
        // The rules judge locality alike, at their own sync.
        let destinations = match (shared.is_empty(), base.shared.is_empty()) {
            (true, _) => Destinations::default(),
            (false, true) => Destinations::build(&ports, &Locality::from_interfaces()),
            (false, false) => {
                let changed = built.iter().map(|p| &p.spec.name).chain(removed);
                let old = changed.filter_map(|n| base.port(n)).map(|p| &*p.spec);
                base.destinations.with(old, &built, &Locality::from_interfaces(), &ports)
            }
        };
        let unmatched = Arc::clone(&ctx.metrics.unmatched);
        let health_checked = health_checked(&base.health_checked, &built, removed);
        Self {
            generation,
            ports,
            listeners: listener_list,
            routes,
            changed_listeners,
            full: false,
            shared,
            destinations,
            unmatched,
            health_checked,
        }
    }

    /// The service ports with a `healthCheckNodePort`, in name order.
    pub fn health_checked(&self) -> impl Iterator<Item = &Arc<PortState>> {
        self.health_checked.iter()
    }

    /// A service port by name.
    pub fn port(&self, name: &ServicePortName) -> Option<&Arc<PortState>> {
        self.ports.get(name)
    }

    /// A listener of this snapshot by id.
    pub fn listener(&self, id: ListenerId) -> Option<&Arc<Listener>> {
        // A shared proxy port has no route of its own: it is one of a few.
        let shared =
            || self.shared.contains(&id).then(|| self.listeners.iter().find(|l| l.id == id)).flatten();
        self.routes.get(&id).map(|r| &r.listener).or_else(shared)
    }

    /// The service port a listener serves, and its balancer.
    /// Whether `listener`'s traffic has a usable endpoint (else its TCP
    /// sockets stay paused, so the kernel refuses).
    /// A shared proxy port always serves: the rules refuse what has none.
    pub fn serves(&self, listener: ListenerId) -> bool {
        self.route(listener).is_some_and(|r| !r.balancer.is_empty()) || self.shared.contains(&listener)
    }

    /// New TCP sockets are bound without listening; those of ports that
    /// serve listen now, before the snapshot is published, so their first
    /// clients queue rather than wait for a worker to take the socket
    /// (`listen::bind_reuseport`). Ports without an endpoint stay refusing.
    pub fn listen_where_served(&self) {
        for listener in self.changed_listeners.iter().filter_map(|id| self.listener(*id)) {
            if self.serves(listener.id)
                && let Err(e) = listener.listen_untaken()
            {
                tracing::error!(listen = %listener.addr, error = %e, "cannot listen");
            }
        }
    }

    pub fn route(&self, listener: ListenerId) -> Option<Route<'_>> {
        let entry = self.routes.get(&listener)?;
        Some(Route { port: &entry.port, balancer: entry.port.balancer(entry.scope, entry.family) })
    }

    /// The mark of the rule that hands replies to transparent sockets, when
    /// some endpoint gets its client's address (the rules follow it).
    pub fn transparent_mark(&self) -> Option<u32> {
        self.ports.iter().find_map(|p| p.source.active_mark())
    }

    /// The proxy port of a service port, if it is bound: the IPv4 one, or
    /// the IPv6 one of an IPv6-only port.
    pub fn proxy_port(&self, name: &ServicePortName) -> Option<ProxyPort> {
        self.listeners
            .iter()
            .filter(|l| &l.key.port == name && matches!(l.key.role, ListenRole::Proxy | ListenRole::Proxy6))
            .min_by_key(|l| l.key.role)
            .map(|l| ProxyPort(l.addr.port()))
    }
}

/// `previous` (the ports with a `healthCheckNodePort`) after `built`
/// (sorted) were set and `removed` went: the chunks of `previous` that a
/// port with or without one falls in are copied, the rest shared.
fn health_checked(previous: &Ports, built: &[Arc<PortState>], removed: &[ServicePortName]) -> Ports {
    let checked = |p: &&Arc<PortState>| p.spec.health_check_node_port.is_some();
    let set: Vec<Arc<PortState>> = built.iter().filter(checked).cloned().collect();
    let unchecked = built.iter().filter(|p| !checked(p)).map(|p| &p.spec.name);
    let mut gone: Vec<ServicePortName> =
        unchecked.chain(removed).filter(|n| previous.get(n).is_some()).cloned().collect();
    if set.is_empty() && gone.is_empty() {
        return previous.clone();
    }
    gone.sort();
    previous.with(&set, &gone)
}

/// The current snapshot, shared by the control plane (writer) and every
/// worker (readers).
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_incremental;
