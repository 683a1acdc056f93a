//! The table: every validated Service and EndpointSlice the sources know,
//! merged into one list of service ports, kept joined per Service.
//!
//! Sources feed the table; the table never reaches out to them. A change
//! is worked out first without touching the table ([`Table::prepare`]),
//! and only a change the control plane accepts is committed
//! ([`Table::commit`]), so an invalid change leaves the table (and therefore
//! the served snapshot) as it was, and nothing needs undoing.
//!
//! A change re-joins only the Services it touches: those it sets or
//! removes, and those whose slices it sets, removes or moves. Slices are
//! indexed by the Service they name, and each Service's joined service
//! ports and cross-object errors are kept, so a change costs what it
//! touches, not the size of the table. A full state (a file reload, an API
//! relist: [`Table::prepare_replace`]) is first compared with the table,
//! object by object, and what differs takes the same path. nodePort clashes
//! are the one check that spans Services: claims are indexed by
//! `(port, protocol)`, and a change re-checks the claims it touches.
//!
//! A [`Table::tolerant`] table (the Kubernetes API source's) still rejects
//! nothing per object (the source has already kept each object's last good
//! version) but serves through cross-object findings of `join`, such as a
//! service port no slice port matches: it logs each new one once and serves
//! the rest, as kube-proxy does, instead of freezing every update.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use keyed::{BySlice, Entry, Services, SliceKey, SliceKeyed, Slices, SmallSet};

use crate::config::join::{
    check_node_ports, join_service, own_slices, slice_warning, unique_services, unique_slices,
};
use crate::config::{ConfigError, ConfigErrorKind, Manifests, WarningKind};
use crate::metrics::Changes;
use crate::model::{EndpointSlice, Protocol, Service, ServiceName, ServicePort, ServicePortName, SliceKind};

/// A nodePort (or healthCheckNodePort) claim.
type Claim = (u16, Protocol);

#[derive(Debug, Default)]
pub struct Table {
    /// Shared with the source that made them (one copy of each object),
    /// in sets keyed by what each object holds (`keyed`).
    services: Services,
    slices: Slices,
    /// Per Service name, one entry: the slices that name it (the Service
    /// may not exist) and, when it exists, its joined ports. One set, found
    /// by the name its slices and ports carry (no copy of it is kept).
    by_service: HashSet<Entry>,
    /// The cross-object errors of each Service that has some (as
    /// reported: a tolerant table logs each new one once). Few have any:
    /// kept apart, they cost the other entries no room.
    errors: HashMap<ServiceName, Box<[String]>>,
    /// Which Services claim each nodePort.
    claims: HashMap<Claim, SmallSet<ServiceName>>,
    /// The clash errors of each claim more than one Service holds.
    clashes: HashMap<Claim, Vec<String>>,
    /// Errors of the last full state's lists (duplicate objects).
    listed: Vec<String>,
    /// Serve through cross-object errors (module header).
    tolerant: bool,
}

/// One Service, joined (a prepared change's). Most Services have one
/// port and no error: the port is held without a list, and no errors cost
/// no allocation.
#[derive(Clone, Debug, Default)]
struct Joined {
    /// In the Service's port order.
    ports: Ports,
    /// As reported.
    errors: Box<[String]>,
}

/// A Service's joined ports, read as a slice: one alone, or a list at
/// its exact length (16 bytes either way).
#[derive(Clone, Debug)]
enum Ports {
    One(Arc<ServicePort>),
    Many(Box<[Arc<ServicePort>]>),
}

impl Default for Ports {
    fn default() -> Self {
        Ports::Many(Box::default())
    }
}

impl std::ops::Deref for Ports {
    type Target = [Arc<ServicePort>];

    fn deref(&self) -> &Self::Target {
        match self {
            Ports::One(port) => std::slice::from_ref(port),
            Ports::Many(ports) => ports,
        }
    }
}

impl std::ops::DerefMut for Ports {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Ports::One(port) => std::slice::from_mut(port),
            Ports::Many(ports) => ports,
        }
    }
}

/// What a change does to the service ports.
#[derive(Debug, Default)]
pub struct PortChange {
    /// Service ports added or changed, new versions, sorted by name (the
    /// table's own, shared).
    pub set: Vec<Arc<ServicePort>>,
    /// Service ports removed, sorted.
    pub removed: Vec<ServicePortName>,
    /// The previous versions of the changed and removed ones.
    pub old: Vec<Arc<ServicePort>>,
    /// As kube-proxy counts them (metrics).
    pub changes: Changes,
}

impl PortChange {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.removed.is_empty()
    }
}

/// A change worked out against the table, not yet committed.
#[derive(Debug)]
pub struct Prepared {
    services: BTreeMap<ServiceName, Option<Arc<Service>>>,
    slices: BTreeMap<SliceKey, Option<Arc<EndpointSlice>>>,
    joined: Vec<(ServiceName, Option<Joined>)>,
    clashes: Vec<(Claim, Vec<String>)>,
    listed: Option<Vec<String>>,
    pub change: PortChange,
}

impl Table {
    /// A table that serves through cross-object errors (see the module
    /// header); for sources whose objects are validated one by one.
    pub fn tolerant() -> Self {
        Self { tolerant: true, ..Self::default() }
    }

    /// Whether this table serves through cross-object errors.
    pub fn is_tolerant(&self) -> bool {
        self.tolerant
    }

    /// Replace the whole contents (a file source's reload), but only if the
    /// result is valid; committed at once. On error the table is unchanged.
    pub fn try_replace(&mut self, manifests: Manifests) -> Result<PortChange, Vec<ConfigError>> {
        let prepared = self.prepare_replace(manifests)?;
        Ok(self.commit(prepared))
    }

    /// Apply a change to some objects, but only if the result is valid;
    /// committed at once. On error the table is unchanged.
    pub fn try_apply(&mut self, delta: Delta) -> Result<PortChange, Vec<ConfigError>> {
        let prepared = self.prepare(delta)?;
        Ok(self.commit(prepared))
    }

    /// The change a whole new state makes: the objects that differ from
    /// the table's, by equality. Duplicates in its lists are reported
    /// (the first definition is kept), not collapsed. The objects that
    /// differ are taken from `manifests` as they are, shared, not copied.
    pub fn prepare_replace(&self, manifests: Manifests) -> Result<Prepared, Vec<ConfigError>> {
        let Manifests { services, slices, .. } = manifests;
        let mut listed = Vec::new();
        let mut ops = Ops::default();
        let keep = {
            let unique = unique_services(&services, &mut listed);
            let names: HashSet<&ServiceName> = unique.iter().map(|s| &s.name).collect();
            for name in self.services.values().map(|s| &s.name).filter(|n| !names.contains(n)) {
                ops.services.insert(name.clone(), None);
            }
            firsts(&services, &unique)
        };
        for s in services.into_iter().zip(keep).filter_map(|(s, keep)| keep.then_some(s)) {
            if !self.services.get(&s.name).is_some_and(|old| same(old, &s)) {
                ops.services.insert(s.name.clone(), Some(s));
            }
        }
        let keep = {
            let unique = unique_slices(&slices, &mut listed);
            let keys: HashSet<(&ServiceName, SliceKind)> = unique.iter().map(|s| (&s.id, s.kind)).collect();
            for s in self.slices.values().filter(|s| !keys.contains(&(&s.id, s.kind))) {
                ops.slices.insert((s.id.clone(), s.kind), None);
            }
            firsts(&slices, &unique)
        };
        for s in slices.into_iter().zip(keep).filter_map(|(s, keep)| keep.then_some(s)) {
            let key = (s.id.clone(), s.kind);
            if !self.slices.get(&key).is_some_and(|old| same(old, &s)) {
                ops.slices.insert(key, Some(s));
            }
        }
        self.prepare_ops(ops, Some(listed))
    }

    /// The change a delta makes. A slice set by name replaces every slice
    /// of that name (of any kind); removed, they all go.
    pub fn prepare(&self, delta: Delta) -> Result<Prepared, Vec<ConfigError>> {
        let mut ops = Ops { services: delta.services, slices: BTreeMap::new() };
        for (id, slice) in delta.slices {
            for s in self.slices.named(&id) {
                ops.slices.insert((s.id.clone(), s.kind), None);
            }
            if let Some(s) = slice {
                ops.slices.insert((s.id.clone(), s.kind), Some(s));
            }
        }
        self.prepare_ops(ops, None)
    }

    fn prepare_ops(&self, ops: Ops, listed: Option<Vec<ConfigError>>) -> Result<Prepared, Vec<ConfigError>> {
        let service_after = |name: &ServiceName| match ops.services.get(name) {
            Some(set) => set.as_deref(),
            None => self.services.get(name).map(|s| &**s),
        };
        let slice_after = |key: &dyn SliceKeyed| match ops.slices.get(key) {
            Some(set) => set.as_deref(),
            None => self.slices.get(key).map(|s| &**s),
        };
        // The Services this touches: set or removed, or whose slices are.
        let mut touched: BTreeSet<&ServiceName> = ops.services.keys().collect();
        let mut warnings = Vec::new();
        for (key, slice) in &ops.slices {
            touched.extend(self.slices.get(key).map(|s| &s.service));
            if let Some(s) = slice {
                touched.insert(&s.service);
                if service_after(&s.service).is_none() {
                    warnings.push(slice_warning(s, WarningKind::NoSuchService(s.service.clone())));
                }
            }
        }
        let mut new_slices: HashMap<&ServiceName, Vec<&SliceKey>> = HashMap::new();
        for (key, slice) in &ops.slices {
            if let Some(s) = slice {
                new_slices.entry(&s.service).or_default().push(key);
            }
        }

        let mut joined = Vec::with_capacity(touched.len());
        let (mut errors, mut old_errors) = (Vec::new(), Vec::new());
        let mut change = PortChange::default();
        for &name in &touched {
            let old = self.by_service.get(name).map(|e| &e.ports[..]);
            old_errors.extend(self.errors.get(name).into_iter().flatten());
            let mut new = service_after(name).map(|service| {
                let mut keys: BTreeSet<(&ServiceName, SliceKind)> =
                    self.by_service.get(name).into_iter().flat_map(|e| &e.slices).map(|s| s.key()).collect();
                keys.extend(new_slices.get(name).into_iter().flatten().map(|k| k.key()));
                let mut own: Vec<&EndpointSlice> =
                    keys.iter().filter_map(|k| slice_after(k)).filter(|s| &s.service == name).collect();
                own_slices(&mut own, &mut warnings);
                let mut found = Vec::new();
                let ports = shared(join_service(service, &own, &mut found, &mut warnings));
                let j = Joined { ports, errors: found.iter().map(ToString::to_string).collect() };
                errors.extend(found);
                j
            });
            diff_ports(old.unwrap_or_default(), new.as_mut().map(|j| &mut j.ports[..]), &mut change);
            joined.push((name.clone(), new));
        }
        crate::log_cap::warn(&warnings, "manifest warning");

        // nodePort clashes: every claim the touched Services held or hold.
        // Who holds a claim after the change: the holders indexed before it
        // (some may have let go) and the touched Services that claim it,
        // found in one pass over them, not one per claim (a first load of
        // 100k Services with 2,768 node ports took minutes that way).
        let mut affected: BTreeSet<Claim> = BTreeSet::new();
        let mut touched_claims: HashMap<Claim, Vec<&ServiceName>> = HashMap::new();
        for &name in &touched {
            affected.extend(self.services.get(name).into_iter().flat_map(|s| claims(s)));
            for claim in service_after(name).into_iter().flat_map(claims) {
                affected.insert(claim);
                touched_claims.entry(claim).or_default().push(name);
            }
        }
        let mut clashes = Vec::with_capacity(affected.len());
        for claim in affected {
            old_errors.extend(self.clashes.get(&claim).into_iter().flatten());
            let mut holders: BTreeSet<&ServiceName> = self.claims.get(&claim).into_iter().flatten().collect();
            holders.extend(touched_claims.get(&claim).into_iter().flatten().copied());
            let holders: Vec<&Service> = holders
                .into_iter()
                .filter_map(service_after)
                .filter(|s| claims(s).any(|c| c == claim))
                .collect();
            let mut found = Vec::new();
            if holders.len() > 1 || holders.iter().any(|s| claims(s).filter(|c| *c == claim).count() > 1) {
                check_node_ports(&holders, &mut found);
                found.retain(|e| matches!(e.kind, ConfigErrorKind::DuplicateNodePort { node_port, protocol, .. } if (node_port, protocol) == claim));
            }
            clashes.push((claim, found.iter().map(ToString::to_string).collect()));
            errors.extend(found);
        }
        let listed = listed.map(|listed| {
            old_errors.extend(&self.listed);
            let text = listed.iter().map(ToString::to_string).collect();
            errors.extend(listed);
            text
        });

        if self.tolerant {
            let reported: HashSet<&String> = old_errors.into_iter().collect();
            let new = errors.iter().filter(|e| !reported.contains(&e.to_string()));
            crate::log_cap::warn(new, "served without what this error concerns");
        } else if !errors.is_empty() {
            return Err(errors);
        }
        change.set.sort_by(|a, b| a.name.cmp(&b.name));
        change.removed.sort();
        Ok(Prepared { services: ops.services, slices: ops.slices, joined, clashes, listed, change })
    }

    /// Make a prepared change the table's; what it does to the ports.
    pub fn commit(&mut self, prepared: Prepared) -> PortChange {
        let Prepared { services, slices, joined, clashes, listed, change } = prepared;
        let mut added = Vec::new();
        for (name, service) in services {
            if let Some(old) = self.services.take(&name) {
                for claim in claims(&old) {
                    if let Some(set) = self.claims.get_mut(&claim) {
                        set.remove(&name);
                        if set.is_empty() {
                            self.claims.remove(&claim);
                        }
                    }
                }
            }
            if let Some(new) = service {
                // The sets find an object by its own name: an op under
                // another name would leave the old object in place.
                debug_assert_eq!(new.name, name, "a Service op under another name");
                for claim in claims(&new) {
                    self.claims.entry(claim).or_default().insert(name.clone());
                }
                added.push(new);
            }
        }
        self.services.insert_sorted(added);
        // Room for the new names at once: growing by doubling holds the
        // old hash table and the new one together.
        let new_names = joined.iter().filter(|(n, j)| j.is_some() && !self.by_service.contains(n)).count();
        self.by_service.reserve(new_names);
        let mut added = Vec::new();
        for (key, slice) in slices {
            if let Some(old) = self.slices.take(&key) {
                self.change_entry(&old.service, |e| e.slices.remove(&old));
            }
            if let Some(new) = slice {
                debug_assert!(new.id == key.0 && new.kind == key.1, "a slice op under another key");
                let new = BySlice(new);
                self.change_entry(&new.service, |e| e.slices.insert(new.clone()));
                added.push(new);
            }
        }
        self.slices.insert_sorted(added);
        for (name, j) in joined {
            let Some(Joined { ports, errors }) = j else {
                self.errors.remove(&name);
                self.change_entry(&name, |e| e.ports = Ports::default());
                continue;
            };
            if errors.is_empty() {
                self.errors.remove(&name);
            } else {
                self.errors.insert(name.clone(), errors);
            }
            self.change_entry(&name, |e| e.ports = ports);
        }
        for (claim, found) in clashes {
            if found.is_empty() {
                self.clashes.remove(&claim);
            } else {
                self.clashes.insert(claim, found);
            }
        }
        if let Some(listed) = listed {
            self.listed = listed;
        }
        change
    }

    /// Change the entry of `name` (a new one if it has none); drop it
    /// once empty. It is taken out and put back: found by the name its
    /// contents carry, it cannot change in place.
    fn change_entry(&mut self, name: &ServiceName, f: impl FnOnce(&mut Entry)) {
        let mut entry = self.by_service.take(name).unwrap_or_default();
        f(&mut entry);
        if !entry.is_empty() {
            self.by_service.insert(entry);
        }
    }

    /// One service port as joined (before any endpoint loop is stripped).
    pub fn port(&self, name: &ServicePortName) -> Option<&Arc<ServicePort>> {
        self.by_service.get(&name.service)?.ports.iter().find(|p| p.name == *name)
    }

    /// Every service port, sorted by name (a full rebuild's input).
    pub fn ports(&self) -> Vec<Arc<ServicePort>> {
        let mut ports: Vec<Arc<ServicePort>> =
            self.by_service.iter().flat_map(|e| e.ports.iter().cloned()).collect();
        ports.sort_by(|a, b| a.name.cmp(&b.name));
        ports
    }
}

/// Objects to set or remove, by key.
#[derive(Default)]
struct Ops {
    services: BTreeMap<ServiceName, Option<Arc<Service>>>,
    slices: BTreeMap<SliceKey, Option<Arc<EndpointSlice>>>,
}

/// Each port behind its own `Arc`; several in a list of its own size: a
/// `collect` would reuse the list of ports in place and keep its 120 bytes
/// per port for an 8-byte pointer.
fn shared(mut ports: Vec<ServicePort>) -> Ports {
    if ports.len() == 1
        && let Some(port) = ports.pop()
    {
        return Ports::One(Arc::new(port));
    }
    let mut shared = Vec::with_capacity(ports.len());
    shared.extend(ports.into_iter().map(Arc::new));
    Ports::Many(shared.into_boxed_slice())
}

/// Which of `all` are in `unique` (a subset of references into it, in
/// order): the first definitions to keep.
fn firsts<T>(all: &[Arc<T>], unique: &[&T]) -> Vec<bool> {
    let mut unique = unique.iter().peekable();
    all.iter().map(|t| unique.next_if(|u| std::ptr::eq(**u, &**t)).is_some()).collect()
}

/// Whether two shared objects are equal: the same allocation (a source
/// that kept an unchanged object), or equal by value.
fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

/// The nodePorts a Service claims (a port may claim one twice: an error).
fn claims(service: &Service) -> impl Iterator<Item = Claim> + '_ {
    let ports = service.ports.iter().filter_map(|p| Some((p.node_port?, p.protocol)));
    ports.chain(service.health_check_node_port.map(|p| (p, Protocol::Tcp)))
}

/// Record what one Service's ports going from `old` to `new` changes, as
/// kube-proxy counts endpoint and service changes (a port added or removed
/// counts as both). An unchanged port keeps its old `Arc` (the one the
/// snapshot holds too), so it is not held twice.
fn diff_ports(old: &[Arc<ServicePort>], new: Option<&mut [Arc<ServicePort>]>, change: &mut PortChange) {
    let new = new.unwrap_or_default();
    let c = &mut change.changes;
    for port in new.iter_mut() {
        let Some(before) = old.iter().find(|o| o.name == port.name) else {
            c.endpoints += 1;
            c.services += 1;
            change.set.push(Arc::clone(port));
            continue;
        };
        if before == port {
            *port = Arc::clone(before);
            continue;
        }
        if before.endpoints == port.endpoints {
            c.services += 1;
        } else {
            c.endpoints += 1;
            // Both may have changed: compare the rest (rare, so the clone is).
            let rest = |p: &ServicePort| ServicePort { endpoints: Vec::new(), ..p.clone() };
            if rest(before) != rest(port) {
                c.services += 1;
            }
        }
        change.old.push(Arc::clone(before));
        change.set.push(Arc::clone(port));
    }
    for before in old.iter().filter(|o| !new.iter().any(|n| n.name == o.name)) {
        c.endpoints += 1;
        c.services += 1;
        change.old.push(Arc::clone(before));
        change.removed.push(before.name.clone());
    }
}

/// A change to some of the table's objects, by name: each is set to the
/// value given, or removed (`None`). A source that knows what changed
/// sends one instead of its whole state.
#[derive(Clone, Debug, Default)]
pub struct Delta {
    pub services: BTreeMap<ServiceName, Option<Arc<Service>>>,
    /// Keyed by the slice's own name (`EndpointSlice::id`).
    pub slices: BTreeMap<ServiceName, Option<Arc<EndpointSlice>>>,
}

impl Delta {
    /// Fold a later change in: per object, the later one wins.
    pub fn merge(&mut self, later: Delta) {
        self.services.extend(later.services);
        self.slices.extend(later.slices);
    }
}

mod keyed;
#[cfg(test)]
mod tests;
