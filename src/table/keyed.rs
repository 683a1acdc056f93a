//! The table's objects in ordered sets keyed by what each object holds: a
//! Service by its name, a slice by its own name and kind. A `BTreeMap`
//! keeps a copy of the key beside each pointer (a node holds its keys
//! inline): 40 and 48 bytes per object where the pointer alone is 8, ~9 MB
//! at 100k Services and 100k slices. Iteration and lookups keep the order
//! and answers of the maps they replace. Likewise each Service name's
//! [`Entry`] is found by the name its slices and ports carry.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::ops::{Bound, Deref};
use std::sync::{Arc, LazyLock};

use super::Ports;
use crate::model::{EndpointSlice, Service, ServiceName, SliceKind};

/// A slice's key: its own name and kind (an Endpoints object and an
/// EndpointSlice may share a name; each Endpoints subset is a slice).
pub(super) type SliceKey = (ServiceName, SliceKind);

/// The table's Services, by name.
#[derive(Debug, Default)]
pub(super) struct Services(BTreeSet<ByName>);

impl Services {
    pub(super) fn get(&self, name: &ServiceName) -> Option<&Arc<Service>> {
        self.0.get(name).map(|s| &s.0)
    }

    pub(super) fn take(&mut self, name: &ServiceName) -> Option<Arc<Service>> {
        self.0.take(name).map(|s| s.0)
    }

    /// In name order.
    pub(super) fn values(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.0.iter().map(|s| &s.0)
    }

    /// Add `added`, sorted by name, none of them in the set.
    pub(super) fn insert_sorted(&mut self, added: Vec<Arc<Service>>) {
        insert_sorted(&mut self.0, added.into_iter().map(ByName).collect());
    }
}

/// The table's slices, by key.
#[derive(Debug, Default)]
pub(super) struct Slices(BTreeSet<BySlice>);

impl Slices {
    pub(super) fn get(&self, key: &dyn SliceKeyed) -> Option<&Arc<EndpointSlice>> {
        self.0.get(key).map(|s| &s.0)
    }

    pub(super) fn take(&mut self, key: &dyn SliceKeyed) -> Option<BySlice> {
        self.0.take(key)
    }

    /// The slices of every kind named `id`, in key order.
    pub(super) fn named(&self, id: &ServiceName) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        let lowest = (id, SliceKind::EndpointSlice);
        let highest = (id, SliceKind::Endpoints { subset: u32::MAX });
        let range =
            (Bound::Included(&lowest as &dyn SliceKeyed), Bound::Included(&highest as &dyn SliceKeyed));
        self.0.range::<dyn SliceKeyed, _>(range).map(|s| &s.0)
    }

    /// In key order.
    pub(super) fn values(&self) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.0.iter().map(|s| &s.0)
    }

    /// Add `added`, sorted by key, none of them in the set.
    pub(super) fn insert_sorted(&mut self, added: Vec<BySlice>) {
        insert_sorted(&mut self.0, added);
    }
}

/// What the table keeps of one Service name; dropped once all empty. Kept
/// in a set, found by the name its slices or ports carry: a map's copy of
/// the name was 32 bytes of every hash-table slot (~4 MB at 100k Services).
#[derive(Debug, Default)]
pub(super) struct Entry {
    /// The slices naming it: the table's own pointers (a copy of each
    /// one's key was 40 bytes more, in an allocation of its own).
    pub(super) slices: SmallSet<BySlice>,
    /// The Service's joined ports, in its port order; none when there is
    /// no such Service. Each is the one copy of its service port: a change
    /// and the snapshot share it.
    pub(super) ports: Ports,
}

impl Entry {
    pub(super) fn is_empty(&self) -> bool {
        self.slices.is_empty() && self.ports.is_empty()
    }

    /// The Service name its ports and slices carry. An empty entry (only
    /// ever outside the set: `Table::change_entry`) has none to give, and
    /// answers a name no Service has.
    fn name(&self) -> &ServiceName {
        static NONE: LazyLock<ServiceName> = LazyLock::new(|| ServiceName::new("", ""));
        match (self.ports.first(), self.slices.first()) {
            (Some(port), _) => &port.name.service,
            (None, Some(slice)) => &slice.service,
            (None, None) => &NONE,
        }
    }
}

impl Borrow<ServiceName> for Entry {
    fn borrow(&self) -> &ServiceName {
        self.name()
    }
}

impl Hash for Entry {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name().hash(state);
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Entry {}

/// A set kept as a sorted list: most of the table's per-Service sets
/// hold one entry (a Service's slice, a nodePort's holder), held inline
/// without an allocation; more are a list at its exact length (where a
/// `BTreeSet` would allocate a whole node, hundreds of bytes, each).
#[derive(Debug)]
pub(super) enum SmallSet<T> {
    One(T),
    Many(Box<[T]>),
}

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        SmallSet::Many(Box::default())
    }
}

impl<T> std::ops::Deref for SmallSet<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            SmallSet::One(one) => std::slice::from_ref(one),
            SmallSet::Many(many) => many,
        }
    }
}

impl<T: Ord> SmallSet<T> {
    /// Insert `value`; an equal one already held is replaced by it.
    pub(super) fn insert(&mut self, value: T) {
        let at = match self.binary_search(&value) {
            Ok(at) => {
                match self {
                    SmallSet::One(one) => *one = value,
                    SmallSet::Many(many) => many[at] = value,
                }
                return;
            }
            Err(at) => at,
        };
        let mut all = std::mem::take(self).into_vec();
        all.insert(at, value);
        *self = Self::from_vec(all);
    }

    pub(super) fn remove(&mut self, value: &T) {
        let Ok(at) = self.binary_search(value) else {
            return;
        };
        let mut all = std::mem::take(self).into_vec();
        all.remove(at);
        *self = Self::from_vec(all);
    }

    fn into_vec(self) -> Vec<T> {
        match self {
            SmallSet::One(one) => vec![one],
            SmallSet::Many(many) => many.into_vec(),
        }
    }

    fn from_vec(mut all: Vec<T>) -> Self {
        match all.pop() {
            Some(one) if all.is_empty() => SmallSet::One(one),
            Some(last) => {
                all.push(last);
                SmallSet::Many(all.into_boxed_slice())
            }
            None => SmallSet::default(),
        }
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// A Service, ordered by its name.
#[derive(Clone, Debug)]
struct ByName(Arc<Service>);

impl Borrow<ServiceName> for ByName {
    fn borrow(&self) -> &ServiceName {
        &self.0.name
    }
}

impl PartialEq for ByName {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for ByName {}

impl PartialOrd for ByName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByName {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.name.cmp(&other.0.name)
    }
}

/// What names a slice: a slice, or its key owned or borrowed. Sets and
/// maps of any of them are searched with any other, through
/// `&dyn SliceKeyed`, without building an owned key.
pub(super) trait SliceKeyed {
    fn key(&self) -> (&ServiceName, SliceKind);
}

impl SliceKeyed for SliceKey {
    fn key(&self) -> (&ServiceName, SliceKind) {
        (&self.0, self.1)
    }
}

impl SliceKeyed for (&ServiceName, SliceKind) {
    fn key(&self) -> (&ServiceName, SliceKind) {
        *self
    }
}

impl PartialEq for dyn SliceKeyed + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for dyn SliceKeyed + '_ {}

impl PartialOrd for dyn SliceKeyed + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn SliceKeyed + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl<'a> Borrow<dyn SliceKeyed + 'a> for SliceKey {
    fn borrow(&self) -> &(dyn SliceKeyed + 'a) {
        self
    }
}

/// A slice, ordered by its key.
#[derive(Clone, Debug)]
pub(super) struct BySlice(pub(super) Arc<EndpointSlice>);

impl SliceKeyed for BySlice {
    fn key(&self) -> (&ServiceName, SliceKind) {
        (&self.0.id, self.0.kind)
    }
}

impl Deref for BySlice {
    type Target = EndpointSlice;

    fn deref(&self) -> &EndpointSlice {
        &self.0
    }
}

impl<'a> Borrow<dyn SliceKeyed + 'a> for BySlice {
    fn borrow(&self) -> &(dyn SliceKeyed + 'a) {
        self
    }
}

impl PartialEq for BySlice {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for BySlice {}

impl PartialOrd for BySlice {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for BySlice {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// Insert `added`, sorted; a value equal to one in `set` replaces it (the
/// callers take the old one out first). A batch as large as the set
/// rebuilds it whole: a B-tree filled one insert after another keeps its
/// nodes about half full, one built from a sorted list fills them (a first
/// load of 100k Services and slices: ~10 MB less, as maps).
pub(super) fn insert_sorted<T: Ord>(set: &mut BTreeSet<T>, added: Vec<T>) {
    if added.len() >= set.len() {
        let old = std::mem::take(set);
        // Of equal values the collect keeps the last: the added one.
        *set = old.into_iter().chain(added).collect();
    } else {
        for value in added {
            set.replace(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Origin;

    fn slice(id: &str, kind: SliceKind) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            id: ServiceName::new("default", id),
            kind,
            service: ServiceName::new("default", "web"),
            origin: Origin::new("test"),
            ports: Arc::from([]),
            endpoints: Box::default(),
            trigger: None,
        })
    }

    #[test]
    fn objects_are_found_by_their_key_and_listed_in_key_order() {
        let subset = |subset| SliceKind::Endpoints { subset };
        let mut slices = Slices::default();
        let all = [
            slice("a", SliceKind::EndpointSlice),
            slice("a", subset(0)),
            slice("a", subset(u32::MAX)),
            slice("b", subset(1)),
            slice("ab", SliceKind::EndpointSlice),
        ];
        let mut added: Vec<BySlice> = all.iter().cloned().map(BySlice).collect();
        added.sort();
        slices.insert_sorted(added);
        let keys = |it: &mut dyn Iterator<Item = &Arc<EndpointSlice>>| -> Vec<String> {
            it.map(|s| format!("{}/{:?}", s.id.name, s.kind)).collect()
        };
        let mut expected: Vec<SliceKey> = all.iter().map(|s| (s.id.clone(), s.kind)).collect();
        expected.sort();
        let listed: Vec<SliceKey> = slices.values().map(|s| (s.id.clone(), s.kind)).collect();
        assert_eq!(listed, expected, "the order of a map keyed by (id, kind)");
        assert_eq!(
            keys(&mut slices.named(&ServiceName::new("default", "a"))),
            ["a/EndpointSlice", "a/Endpoints { subset: 0 }", "a/Endpoints { subset: 4294967295 }"]
        );
        assert!(slices.named(&ServiceName::new("default", "c")).next().is_none());

        let key = (ServiceName::new("default", "b"), subset(1));
        assert!(Arc::ptr_eq(slices.get(&key).unwrap(), &all[3]));
        assert!(slices.get(&(&key.0, subset(0))).is_none(), "the kind is part of the key");
        assert!(slices.take(&key).is_some());
        assert!(slices.get(&key).is_none());

        let mut services = Services::default();
        let service = |name: &str| {
            Arc::new(Service {
                name: ServiceName::new("default", name),
                origin: Origin::new("test"),
                settings: Arc::default(),
                ports: Default::default(),
            })
        };
        services.insert_sorted(vec![service("a"), service("b")]);
        services.insert_sorted(vec![service("ab")]);
        let names: Vec<&str> = services.values().map(|s| s.name.name.as_str()).collect();
        assert_eq!(names, ["a", "ab", "b"]);
        assert!(services.get(&ServiceName::new("default", "ab")).is_some());
        assert!(services.take(&ServiceName::new("default", "a")).is_some());
        assert!(services.get(&ServiceName::new("default", "a")).is_none());
    }

    #[test]
    fn an_object_inserted_over_an_equal_one_replaces_it_in_sets_and_small_sets() {
        let (old, new) = (slice("a", SliceKind::EndpointSlice), slice("a", SliceKind::EndpointSlice));
        let held = |set: &SmallSet<BySlice>| set.iter().map(|s| Arc::clone(&s.0)).collect::<Vec<_>>();
        let mut one = SmallSet::default();
        one.insert(BySlice(Arc::clone(&old)));
        one.insert(BySlice(Arc::clone(&new)));
        assert!(matches!(held(&one).as_slice(), [s] if Arc::ptr_eq(s, &new)), "one held inline");
        let mut many = SmallSet::default();
        many.insert(BySlice(slice("b", SliceKind::EndpointSlice)));
        many.insert(BySlice(Arc::clone(&old)));
        many.insert(BySlice(Arc::clone(&new)));
        assert!(matches!(held(&many).as_slice(), [s, _] if Arc::ptr_eq(s, &new)), "in a list");
        // A small batch goes in one by one; a large one rebuilds the set.
        for (before, batch) in [(3, 1), (0, 2)] {
            let mut set: BTreeSet<BySlice> =
                (0..before).map(|i| BySlice(slice(&format!("z{i}"), SliceKind::EndpointSlice))).collect();
            set.insert(BySlice(Arc::clone(&old)));
            let mut added = vec![BySlice(Arc::clone(&new))];
            added.extend((1..batch).map(|i| BySlice(slice(&format!("y{i}"), SliceKind::EndpointSlice))));
            added.sort();
            insert_sorted(&mut set, added);
            let a = set.iter().find(|s| s.id.name.as_str() == "a").unwrap();
            assert!(Arc::ptr_eq(&a.0, &new), "{before} held, {batch} added");
        }
    }

    #[test]
    fn a_set_holds_a_pointer_per_object() {
        assert_eq!(std::mem::size_of::<ByName>(), 8);
        assert_eq!(std::mem::size_of::<BySlice>(), 8);
    }
}
