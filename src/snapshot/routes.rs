//! Where a snapshot sends what it is asked about, as copy-on-write maps in
//! shards ([`Sharded`]): which service port each listener serves
//! ([`Routes`]), and (in `destinations`) which one an original destination
//! stands for. A snapshot built from a change copies only the shards its
//! keys fall in and shares the others with the previous snapshot, so a
//! one-port change costs a few shards, not every port's entry.
//!
//! Both questions are asked of one structure. They stay two maps: a
//! listener's entry holds the listener and its port's state, an address's
//! entry the claimants of that address in name order (the first wins).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use super::PortState;
use crate::balance::eligible::Scope;
use crate::listen::{Listener, ListenerId};
use crate::model::IpFamily;

/// 100k keys make shards of ~400: a change copies a few of those.
const SHARDS: usize = 256;

/// A hash map split in [`SHARDS`] shards, each shared between snapshots
/// until a change writes to it.
#[derive(Debug)]
pub(super) struct Sharded<K, V> {
    /// Empty until the first entry; then `SHARDS` of them.
    shards: Vec<Arc<HashMap<K, V>>>,
}

// Not derived: that would ask `K, V: Clone/Default` of the map itself.
impl<K, V> Clone for Sharded<K, V> {
    fn clone(&self) -> Self {
        Self { shards: self.shards.clone() }
    }
}

impl<K, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Self { shards: Vec::new() }
    }
}

/// A fixed hasher: which shard a key falls in must not differ between
/// the snapshots that share the shards.
fn shard_of<K: Hash>(key: &K) -> usize {
    let hash =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(key);
    (hash % SHARDS as u64) as usize
}

impl<K: Hash + Eq + Clone, V: Clone> Sharded<K, V> {
    pub(super) fn get(&self, key: &K) -> Option<&V> {
        self.shards.get(shard_of(key))?.get(key)
    }

    /// The entry of `key` to change, its shard copied if another snapshot
    /// shares it (`None`: none yet).
    pub(super) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let shard = self.shards.get_mut(shard_of(key))?;
        if !shard.contains_key(key) {
            return None;
        }
        Arc::make_mut(shard).get_mut(key)
    }

    pub(super) fn insert(&mut self, key: K, value: V) {
        if self.shards.is_empty() {
            self.shards = (0..SHARDS).map(|_| Arc::default()).collect();
        }
        Arc::make_mut(&mut self.shards[shard_of(&key)]).insert(key, value);
    }

    pub(super) fn remove(&mut self, key: &K) -> Option<V> {
        let shard = self.shards.get_mut(shard_of(key))?;
        if !shard.contains_key(key) {
            return None;
        }
        Arc::make_mut(shard).remove(key)
    }

    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Every entry, in no particular order.
    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }
}

/// Where a listener's connections go.
#[derive(Debug, Clone)]
pub(super) struct RouteEntry {
    pub listener: Arc<Listener>,
    pub port: Arc<PortState>,
    pub scope: Scope,
    /// The listener's family: a dual-stack port balances each apart.
    pub family: IpFamily,
}

/// Which service port each listener serves.
pub(super) type Routes = Sharded<ListenerId, RouteEntry>;

impl Routes {
    /// These routes without `remove`, with `insert`: the shards neither
    /// touches are shared.
    pub(super) fn with(
        &self,
        remove: &[ListenerId],
        insert: impl IntoIterator<Item = (ListenerId, RouteEntry)>,
    ) -> Self {
        let mut routes = self.clone();
        for id in remove {
            routes.remove(id);
        }
        for (id, entry) in insert {
            routes.insert(id, entry);
        }
        routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_copies_only_the_shards_it_writes_and_reads_back_what_it_wrote() {
        let mut a: Sharded<u32, u32> = Sharded::default();
        for k in 0..10_000 {
            a.insert(k, k);
        }
        let mut b = a.clone();
        b.insert(5, 50);
        assert_eq!(b.remove(&7), Some(7));
        assert_eq!(b.remove(&1_000_000), None);
        *b.get_mut(&9).expect("9") = 90;
        assert!(b.get_mut(&1_000_000).is_none());
        let copied = a.shards.iter().zip(&b.shards).filter(|(x, y)| !Arc::ptr_eq(x, y)).count();
        assert!(copied <= 3, "{copied} shards copied for three keys");
        assert_eq!((a.get(&5), a.get(&7), a.get(&9)), (Some(&5), Some(&7), Some(&9)), "a is untouched");
        assert_eq!((b.get(&5), b.get(&7), b.get(&9)), (Some(&50), None, Some(&90)));
        assert_eq!((a.len(), b.len(), b.iter().count()), (10_000, 9_999, 9_999));
    }
}
