//! [`Name`]: the immutable, shared string every model name is made of.
//!
//! A Service's namespace, name and port names are copied into many indexes
//! (the table's maps, the joined ports, the routes, the rule syncer's
//! claims): as a `Name` each copy is a reference-count bump, not an
//! allocation. A `Name` compares, orders and hashes exactly as the `String`
//! it replaced, and serializes as a plain string.
//!
//! Values that repeat across objects (namespaces, port names, node names,
//! zones, file paths) go through [`Name::interned`], so equal values share
//! one allocation process-wide. The interner only ever holds what is also
//! held elsewhere, plus at most as much garbage again: once it has doubled
//! since its last sweep it drops the entries nobody else holds. Input that
//! sends new names forever (a hostile API) therefore cannot grow it beyond
//! twice what the model itself keeps alive, and each sweep is paid for by
//! the insertions that preceded it.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An immutable shared string: cloning it bumps a reference count.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Arc<str>);

impl Name {
    /// `value`, sharing one allocation with every other live `Name`
    /// interned with the same text.
    pub fn interned(value: &str) -> Self {
        Name(INTERNER.lock().unwrap_or_else(PoisonError::into_inner).get(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `self` and `other` are the same allocation (not only equal).
    pub fn shares(&self, other: &Name) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Below this many entries an interner never sweeps: a handful of
/// namespaces and port names is not worth walking over.
const MIN_SWEEP: usize = 1024;

/// Equal values, shared: each value asked for is held once, as long as
/// someone else holds it too (module header).
pub(super) struct Interner<T: ?Sized> {
    values: HashSet<Arc<T>>,
    /// Entries left after the last sweep (the live ones then).
    live: usize,
}

static INTERNER: LazyLock<Mutex<Interner<str>>> = LazyLock::new(|| Mutex::new(Interner::new()));

impl<T: ?Sized + Eq + std::hash::Hash> Interner<T>
where
    for<'a> Arc<T>: From<&'a T>,
{
    pub(super) fn new() -> Self {
        Self { values: HashSet::new(), live: 0 }
    }

    pub(super) fn get(&mut self, value: &T) -> Arc<T> {
        if let Some(known) = self.values.get(value) {
            return Arc::clone(known);
        }
        if self.values.len() >= (2 * self.live).max(MIN_SWEEP) {
            // Held only here: nobody will ask for it by pointer again.
            self.values.retain(|value| Arc::strong_count(value) > 1);
            self.live = self.values.len();
        }
        let value: Arc<T> = Arc::from(value);
        self.values.insert(Arc::clone(&value));
        value
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.values.len()
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Default for Name {
    fn default() -> Self {
        Name::interned("")
    }
}

impl From<&str> for Name {
    fn from(value: &str) -> Self {
        Name(Arc::from(value))
    }
}

impl From<&String> for Name {
    fn from(value: &String) -> Self {
        Name(Arc::from(value.as_str()))
    }
}

impl From<String> for Name {
    fn from(value: String) -> Self {
        Name(Arc::from(value))
    }
}

impl From<Name> for String {
    fn from(value: Name) -> Self {
        value.0.as_ref().to_owned()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == &*other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == &*other.0
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Name::from)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;

    #[test]
    fn compares_orders_and_hashes_like_the_string_it_holds() {
        let words = ["b", "a", "", "ab", "B", "é"];
        let names: BTreeSet<Name> = words.iter().map(|w| Name::from(*w)).collect();
        let strings: BTreeSet<String> = words.iter().map(|w| (*w).to_owned()).collect();
        let names: Vec<&str> = names.iter().map(Name::as_str).collect();
        let strings: Vec<&str> = strings.iter().map(String::as_str).collect();
        assert_eq!(names, strings);

        let mut by_name = HashMap::new();
        by_name.insert(Name::from("web"), 1);
        assert_eq!(by_name.get("web"), Some(&1), "Borrow<str> hashes as str");
        assert_eq!(Name::from("web"), "web");
        assert_eq!(Name::from(String::from("web")), Name::interned("web"));
    }

    #[test]
    fn prints_and_serializes_as_a_plain_string() {
        let name = Name::from("a\"b");
        assert_eq!((name.to_string(), format!("{name:?}")), ("a\"b".to_owned(), "\"a\\\"b\"".to_owned()));
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"a\\\"b\"");
        let back: Name = serde_json::from_str("\"a\\\"b\"").unwrap();
        assert_eq!(back, name);
        assert_eq!(Name::default(), "");
    }

    #[test]
    fn interned_names_share_one_allocation_and_clones_share_it_too() {
        let a = Name::interned("kube-system");
        let b = Name::interned(&String::from("kube-system"));
        assert!(a.shares(&b));
        assert!(a.clone().shares(&a));
        assert!(!Name::from("kube-system").shares(&a), "From copies");
    }

    #[test]
    fn interner_forgets_names_nobody_holds_once_it_has_doubled() {
        // A private interner: the process-wide one is shared with tests
        // running in parallel.
        let mut interner = Interner::<str>::new();
        let kept: Vec<Name> = (0..MIN_SWEEP).map(|i| Name(interner.get(&format!("kept-{i}")))).collect();
        // A hostile stream of names that are dropped at once.
        for i in 0..20 * MIN_SWEEP {
            drop(interner.get(&format!("random-{i}")));
            assert!(interner.len() <= 2 * MIN_SWEEP + 1, "grew to {} after {i}", interner.len());
        }
        // What is still held is still shared.
        assert!(Name(interner.get("kept-7")).shares(&kept[7]));
        drop(kept);
        for i in 0..2 * MIN_SWEEP {
            drop(interner.get(&format!("later-{i}")));
        }
        assert!(interner.len() <= MIN_SWEEP + 1, "the dropped kept-* went too: {}", interner.len());
    }
}
