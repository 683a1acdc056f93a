//! Slab slots whose keys carry a generation, so that a completion arriving
//! late (a retry timer, an accept, any op submitted for an object since
//! freed) can never act on the object that reused its slot.
//!
//! A [`Key`] is the slot index plus the generation the slot had when the
//! object was inserted; [`Slots::get`] answers only for the same
//! generation. Both fit in 56 bits, so a [`Key`] rides in an io_uring
//! `user_data` next to an 8-bit kind (see the worker's `Token`).
//!
//! Invariant: generations advance on every insert, so the same
//! (index, generation) pair comes back only after [`GENERATIONS`] inserts
//! while the old op is still in flight, which no op lives long enough for.

use slab::Slab;

/// How many generations a key tells apart (24 bits).
pub const GENERATIONS: u32 = 1 << 24;

/// A slot index and the generation of the object it was given to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub index: u32,
    pub generation: u32,
}

impl Key {
    /// The key packed into 56 bits: generation above, index below.
    pub fn pack(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    /// The key of [`Key::pack`] (bits above 56 are ignored).
    pub fn unpack(v: u64) -> Key {
        Key { index: v as u32, generation: ((v >> 32) as u32) % GENERATIONS }
    }
}

/// A slab of `T` addressed by generation-checked keys.
pub struct Slots<T> {
    slab: Slab<(u32, T)>,
    next_generation: u32,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<T> Slots<T> {
    pub fn with_capacity(n: usize) -> Self {
        Self { slab: Slab::with_capacity(n), next_generation: 0 }
    }

    pub fn insert(&mut self, value: T) -> Key {
        let generation = self.next_generation;
        self.next_generation = (generation + 1) % GENERATIONS;
        let index = self.slab.insert((generation, value));
        // An index past u32 would need 4 billion live objects, each holding
        // an fd: far past any fd limit.
        Key { index: index as u32, generation }
    }

    pub fn get(&self, key: Key) -> Option<&T> {
        match self.slab.get(key.index as usize) {
            Some((generation, value)) if *generation == key.generation => Some(value),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        match self.slab.get_mut(key.index as usize) {
            Some((generation, value)) if *generation == key.generation => Some(value),
            _ => None,
        }
    }

    /// Remove the object of `key`; `None` (and nothing removed) when the
    /// slot is empty or holds a later object.
    pub fn remove(&mut self, key: Key) -> Option<T> {
        self.get(key)?;
        self.slab.try_remove(key.index as usize).map(|(_, value)| value)
    }

    pub fn keys(&self) -> Vec<Key> {
        self.slab
            .iter()
            .map(|(index, (generation, _))| Key { index: index as u32, generation: *generation })
            .collect()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slab.iter_mut().map(|(_, (_, value))| value)
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_key_never_reaches_the_object_that_reused_its_slot() {
        let mut slots = Slots::default();
        let old = slots.insert("listener A");
        assert_eq!(slots.remove(old), Some("listener A"));
        let new = slots.insert("listener B");
        assert_eq!(new.index, old.index, "the slab reuses the freed slot");
        assert_ne!(new.generation, old.generation);
        assert_eq!(slots.get(old), None, "a late completion for A finds nothing");
        assert_eq!(slots.get_mut(old), None);
        assert_eq!(slots.remove(old), None, "and cannot free B");
        assert_eq!(slots.get(new), Some(&"listener B"));
        assert_eq!(slots.len(), 1);
    }

    #[test]
    fn keys_survive_packing_into_user_data() {
        let key = Key { index: u32::MAX, generation: GENERATIONS - 1 };
        assert!(key.pack() < 1 << 56);
        assert_eq!(Key::unpack(key.pack()), key);
        assert_eq!(Key::unpack(Key { index: 7, generation: 0 }.pack()), Key { index: 7, generation: 0 });
    }

    #[test]
    fn generations_wrap_without_leaving_their_bits() {
        let mut slots = Slots { next_generation: GENERATIONS - 1, ..Slots::default() };
        let a = slots.insert(1);
        let b = slots.insert(2);
        assert_eq!(a.generation, GENERATIONS - 1);
        assert_eq!(b.generation, 0);
        assert_eq!(Key::unpack(a.pack()), a);
    }
}
