//! The Kubernetes source's view of the cluster: the last good version of
//! every Service and EndpointSlice the watchers delivered, fed one watcher
//! event at a time. Pure: no I/O, no clock, so tests feed it synthetic
//! events built from real `k8s-openapi` objects.
//!
//! Invariants:
//! - Each object goes through `config::service_from_k8s` /
//!   `config::slice_from_k8s`, exactly as a manifest file does. An invalid
//!   object is reported (namespace/name/field) and skipped; the last good
//!   version of that object, if there was one, stays.
//! - `Init` .. `InitApply`* .. `InitDone` is buffered aside and swapped in
//!   whole at `InitDone`, so objects absent from a relist disappear and the
//!   served state is never a half-listed (or empty) one.
//! - [`ClusterState::take_update`] yields nothing until both kinds have
//!   delivered their first `InitDone`, and nothing when nothing changed.
//!   Its first update is the whole state; every later one is a
//!   [`Delta`] of the objects touched since the last (a relist too: the
//!   listed objects are compared with those served). What the delta sets
//!   is exactly what the whole state would hold for each touched name, so
//!   the table, fed the first state and then each delta, always equals the
//!   whole state: a slice is in it only while its Service is.
//! - Each served object is one allocation (`Arc`), shared with the updates
//!   and the table; an event that brings an equal object keeps it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::Event;

use crate::config::{self, ConfigErrors, Conversion, Manifests, ObjectRef};
use crate::metrics::Changes;
use crate::model::{self, Origin, ServiceName};
use crate::source::Change;
use crate::table::Delta;

/// The label that hands a Service to a named proxy (kube-proxy skips every
/// Service carrying it; ringport serves those whose value is its own
/// `--service-proxy-name`).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Where API objects come from, in error messages.
pub const API_ORIGIN: &str = "kubernetes API";

/// What became of one object of one event.
#[derive(Debug)]
pub enum Outcome {
    /// The object is now served as given (or was deleted).
    Stored,
    /// Valid, but nothing to proxy: headless, ExternalName, FQDN slice, or
    /// another proxy's Service. Any earlier version is no longer served.
    Skipped(String),
    /// Invalid: reported, and its last good version (if any) kept.
    Rejected(ConfigErrors),
    /// A marker event (`Init`, `InitDone`) with no object.
    Marker,
}

/// What one watcher's objects convert into.
trait Convert: Sized {
    type Raw;
    const KIND: &'static str;
    fn meta(raw: &Self::Raw) -> &ObjectMeta;
    /// `Some(reason)` when the object is another proxy's to serve.
    fn foreign(_raw: &Self::Raw, _filter: &Filter) -> Option<String> {
        None
    }
    fn convert(raw: &Self::Raw) -> Result<Conversion<Self>, ConfigErrors>;
}

/// The `--service-proxy-name` rule, kube-proxy's semantics extended: a
/// labelled Service is served only by the proxy of that name.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub service_proxy_name: Option<String>,
}

impl Filter {
    /// `Some(reason)` when the Service belongs to another proxy.
    fn foreign(&self, meta: &ObjectMeta) -> Option<String> {
        let label = meta.labels.as_ref()?.get(SERVICE_PROXY_NAME_LABEL)?;
        match &self.service_proxy_name {
            Some(mine) if mine == label => None,
            Some(mine) => Some(format!("{SERVICE_PROXY_NAME_LABEL}={label:?} is not ours ({mine:?})")),
            None => Some(format!(
                "{SERVICE_PROXY_NAME_LABEL}={label:?}: served by another proxy (no --service-proxy-name given)"
            )),
        }
    }
}

impl Convert for model::Service {
    type Raw = Service;
    const KIND: &'static str = "Service";
    fn meta(raw: &Service) -> &ObjectMeta {
        &raw.metadata
    }
    fn foreign(raw: &Service, filter: &Filter) -> Option<String> {
        filter.foreign(&raw.metadata)
    }
    fn convert(raw: &Service) -> Result<Conversion<Self>, ConfigErrors> {
        config::service_from_k8s(raw, Origin::new(API_ORIGIN))
    }
}

impl Convert for model::EndpointSlice {
    type Raw = EndpointSlice;
    const KIND: &'static str = "EndpointSlice";
    fn meta(raw: &EndpointSlice) -> &ObjectMeta {
        &raw.metadata
    }
    fn convert(raw: &EndpointSlice) -> Result<Conversion<Self>, ConfigErrors> {
        config::slice_from_k8s(raw, Origin::new(API_ORIGIN))
    }
}

/// One kind's objects: what is served, and a relist being gathered. Each
/// is shared (`Arc`) with the updates made of it and with the table: one
/// copy of each object.
#[derive(Debug)]
struct Objects<T> {
    live: BTreeMap<ServiceName, Arc<T>>,
    /// `Some` between `Init` and `InitDone`.
    relisting: Option<BTreeMap<ServiceName, Arc<T>>>,
    /// A first `InitDone` has been seen.
    synced: bool,
}

impl<T> Default for Objects<T> {
    fn default() -> Self {
        Self { live: BTreeMap::new(), relisting: None, synced: false }
    }
}

/// What one event changed in what is served.
#[derive(Debug, Default)]
struct Touched {
    /// The names whose served object changed.
    keys: Vec<ServiceName>,
}

impl<T: Convert + Clone + PartialEq> Objects<T> {
    /// Applies one event, noting in `touched` each name whose served
    /// object changed.
    fn handle(&mut self, event: Event<T::Raw>, filter: &Filter, touched: &mut Touched) -> Outcome {
        match event {
            Event::Init => {
                if self.synced {
                    tracing::info!(
                        kind = T::KIND,
                        "relisting; the current state keeps serving until it is done"
                    );
                }
                self.relisting = Some(BTreeMap::new());
                Outcome::Marker
            }
            Event::InitDone => {
                // A stray InitDone without Init keeps what is there.
                if let Some(listed) = self.relisting.take() {
                    // A relist changes only what differs from what served.
                    if self.synced {
                        touched.keys.extend(differing(&self.live, &listed));
                    }
                    self.live = listed;
                }
                self.synced = true;
                tracing::info!(kind = T::KIND, objects = self.live.len(), "listed");
                Outcome::Marker
            }
            Event::InitApply(raw) => {
                // The previous version, for when the listed one is invalid.
                let key = key_of(T::meta(&raw));
                let previous = key.as_ref().and_then(|k| self.live.get(k).cloned());
                let target = self.relisting.get_or_insert_with(BTreeMap::new);
                store(target, &raw, previous, filter).0
            }
            Event::Apply(raw) => {
                let listing = self.relisting.is_some();
                let target = self.relisting.as_mut().unwrap_or(&mut self.live);
                let key = key_of(T::meta(&raw));
                let previous = key.as_ref().and_then(|k| target.get(k).cloned());
                let (outcome, stored) = store(target, &raw, previous.clone(), filter);
                let same = key.as_ref().is_some_and(|k| target.get(k) == previous.as_ref());
                if let Some(key) = key.filter(|_| stored && !listing && !same) {
                    touched.keys.push(key);
                }
                outcome
            }
            Event::Delete(raw) => {
                let listing = self.relisting.is_some();
                let target = self.relisting.as_mut().unwrap_or(&mut self.live);
                if let Some(key) = key_of(T::meta(&raw))
                    && target.remove(&key).is_some()
                    && !listing
                {
                    touched.keys.push(key);
                }
                Outcome::Stored
            }
        }
    }
}

/// The names whose object differs between `old` and `new` (added and
/// removed ones included).
fn differing<T: PartialEq>(
    old: &BTreeMap<ServiceName, T>,
    new: &BTreeMap<ServiceName, T>,
) -> Vec<ServiceName> {
    let changed = new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, _)| k.clone());
    let removed = old.keys().filter(|k| !new.contains_key(*k)).cloned();
    changed.chain(removed).collect()
}

/// Converts `raw` into `target`: stored when valid, removed when skipped,
/// `previous` restored when invalid. The flag says whether `target`
/// changed.
fn store<T: Convert + PartialEq>(
    target: &mut BTreeMap<ServiceName, Arc<T>>,
    raw: &T::Raw,
    previous: Option<Arc<T>>,
    filter: &Filter,
) -> (Outcome, bool) {
    let meta = T::meta(raw);
    let object = ObjectRef::from_meta(T::KIND, meta);
    let Some(key) = key_of(meta) else {
        // The API server never sends a nameless object; convert anyway so
        // the error names the field.
        let outcome = match T::convert(raw) {
            Err(errors) => reject(errors, &object, false),
            Ok(_) => Outcome::Skipped("no metadata.name".to_owned()),
        };
        return (outcome, false);
    };
    if let Some(reason) = T::foreign(raw, filter) {
        let removed = target.remove(&key).is_some();
        tracing::debug!(object = %object, reason = %reason, "skipped");
        return (Outcome::Skipped(reason), removed);
    }
    match T::convert(raw) {
        Ok(Conversion::Accepted { value, .. }) => {
            // An unchanged object (a resync, a relist) keeps the copy the
            // table shares.
            let value = previous.filter(|p| **p == value).unwrap_or_else(|| Arc::new(value));
            target.insert(key, value);
            (Outcome::Stored, true)
        }
        Ok(Conversion::Skipped(skip)) => {
            let removed = target.remove(&key).is_some();
            tracing::debug!(object = %object, reason = %skip, "skipped");
            (Outcome::Skipped(skip.to_string()), removed)
        }
        Err(errors) => {
            let kept = previous.is_some();
            match previous {
                Some(previous) => target.insert(key, previous),
                None => target.remove(&key),
            };
            (reject(errors, &object, kept), false)
        }
    }
}

fn reject(errors: ConfigErrors, object: &ObjectRef, kept: bool) -> Outcome {
    for e in errors.iter() {
        tracing::error!(object = %object, error = %e, "invalid object from the API; skipped");
    }
    if kept {
        tracing::warn!(object = %object, "its last good version keeps serving");
    }
    Outcome::Rejected(errors)
}

/// `namespace/name`, the key of both kinds (a slice is keyed by its own
/// name, not its Service's). `None` without a name.
fn key_of(meta: &ObjectMeta) -> Option<ServiceName> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
    let namespace = meta.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or("default");
    Some(ServiceName::new(namespace, name))
}

/// Everything both watchers delivered, validated, and what changed since
/// the last [`ClusterState::take_update`].
#[derive(Debug)]
pub struct ClusterState {
    filter: Filter,
    services: Objects<model::Service>,
    slices: Objects<model::EndpointSlice>,
    /// The ids of the served slices of each Service, so a Service that
    /// comes or goes takes its slices with it in a delta.
    by_service: BTreeMap<ServiceName, BTreeSet<ServiceName>>,
    /// The next update is the whole state (until the first is taken).
    whole: bool,
    /// The next update, when something changes, is the whole state: the
    /// control plane refused one, so it no longer holds what we sent.
    resync: bool,
    /// Names touched since the last update.
    dirty_services: BTreeSet<ServiceName>,
    dirty_slices: BTreeSet<ServiceName>,
    /// Events that changed what is served, since the last
    /// [`ClusterState::take_queued`]: kube-proxy's pending changes.
    queued: Changes,
    /// When this state began: older trigger times are not this process's
    /// to measure (kube-proxy's rule too).
    started: Option<SystemTime>,
    /// The trigger times of the slice changes not yet taken.
    triggers: Vec<SystemTime>,
}

impl Default for ClusterState {
    fn default() -> Self {
        Self {
            filter: Filter::default(),
            services: Objects::default(),
            slices: Objects::default(),
            by_service: BTreeMap::new(),
            whole: true,
            resync: false,
            dirty_services: BTreeSet::new(),
            dirty_slices: BTreeSet::new(),
            queued: Changes::default(),
            started: None,
            triggers: Vec::new(),
        }
    }
}

impl ClusterState {
    pub fn new(filter: Filter) -> Self {
        Self { filter, started: Some(SystemTime::now()), ..Self::default() }
    }

    pub fn handle_service(&mut self, event: Event<Service>) -> Outcome {
        let mut touched = Touched::default();
        let outcome = self.services.handle(event, &self.filter, &mut touched);
        self.queued.services += touched.keys.len() as u64;
        self.dirty_services.extend(touched.keys);
        outcome
    }

    pub fn handle_slice(&mut self, event: Event<EndpointSlice>) -> Outcome {
        // Only a change seen as it happens is timed, not a (re)list.
        let trigger = match &event {
            Event::Apply(raw) => config::trigger_time(&raw.metadata),
            _ => None,
        };
        let relist = matches!(event, Event::InitDone);
        let mut touched = Touched::default();
        // Each touched slice leaves its old Service's index entry first.
        let before: Vec<(ServiceName, Option<ServiceName>)> = match &event {
            Event::Apply(raw) | Event::Delete(raw) => key_of(&raw.metadata)
                .map(|k| {
                    let service = self.slices.live.get(&k).map(|s| s.service.clone());
                    (k, service)
                })
                .into_iter()
                .collect(),
            _ => Vec::new(),
        };
        let outcome = self.slices.handle(event, &self.filter, &mut touched);
        if relist {
            self.index_slices();
        } else {
            for (key, service) in before.into_iter().filter(|(k, _)| touched.keys.contains(k)) {
                if let Some(ids) = service.and_then(|s| self.by_service.get_mut(&s)) {
                    ids.remove(&key);
                }
                if let Some(now) = self.slices.live.get(&key) {
                    self.by_service.entry(now.service.clone()).or_default().insert(key);
                }
            }
        }
        let changed = !touched.keys.is_empty();
        self.queued.endpoints += touched.keys.len() as u64;
        self.dirty_slices.extend(touched.keys);
        if let Some(t) = trigger.filter(|t| changed && self.started.is_some_and(|s| *t >= s)) {
            self.triggers.push(t);
        }
        outcome
    }

    /// The control plane refused an update: make the next one (when
    /// something changes) the whole state, since a delta against what the
    /// control plane no longer holds would lose the refused change.
    pub fn resync(&mut self) {
        self.resync = true;
    }

    /// Rebuild the Service -> slices index from the served slices.
    fn index_slices(&mut self) {
        self.by_service.clear();
        for (id, slice) in &self.slices.live {
            self.by_service.entry(slice.service.clone()).or_default().insert(id.clone());
        }
    }

    /// The trigger times of the slice changes handled since the last call.
    pub fn take_triggers(&mut self) -> Vec<SystemTime> {
        std::mem::take(&mut self.triggers)
    }

    /// The changes handled since the last call (each object an event
    /// changed counts once), for the pending-changes gauges.
    pub fn take_queued(&mut self) -> Changes {
        std::mem::take(&mut self.queued)
    }

    /// Both watchers have delivered their initial list.
    pub fn synced(&self) -> bool {
        self.services.synced && self.slices.synced
    }

    /// There is something new to publish.
    pub fn pending(&self) -> bool {
        self.synced() && (self.whole || !self.dirty_services.is_empty() || !self.dirty_slices.is_empty())
    }

    /// What to publish, once synced and only when something changed: the
    /// whole state first, then what changed since (module header).
    pub fn take_update(&mut self) -> Option<Change> {
        if !self.pending() {
            return None;
        }
        let dirty_services = std::mem::take(&mut self.dirty_services);
        let mut dirty_slices = std::mem::take(&mut self.dirty_slices);
        if std::mem::take(&mut self.whole) | std::mem::take(&mut self.resync) {
            return Some(Change::Whole(self.manifests()));
        }
        let mut delta = Delta::default();
        for name in dirty_services {
            if let Some(ids) = self.by_service.get(&name) {
                dirty_slices.extend(ids.iter().cloned());
            }
            delta.services.insert(name.clone(), self.services.live.get(&name).cloned());
        }
        for id in dirty_slices {
            let served = self.slices.live.get(&id).filter(|s| self.services.live.contains_key(&s.service));
            delta.slices.insert(id, served.cloned());
        }
        Some(Change::Delta(delta))
    }

    /// The whole state as it would be published now. Slices whose Service
    /// is unknown (not created yet, skipped, another proxy's) are left out
    /// here rather than warned about by `join` on every update.
    pub fn manifests(&self) -> Manifests {
        let services: Vec<Arc<model::Service>> = self.services.live.values().cloned().collect();
        let slices = self
            .slices
            .live
            .values()
            .filter(|s| self.services.live.contains_key(&s.service))
            .cloned()
            .collect();
        Manifests { services, slices, warnings: Vec::new() }
    }
}
