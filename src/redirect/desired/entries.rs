//! The desired rules' entries, one per service port, sorted by name in
//! chunks that an update changes in place: setting or removing one port
//! moves at most one chunk's entries, never the whole list, and a port no
//! update touches is never moved or read.
//!
//! Invariants: the entries are sorted by their port's name, each name
//! once; no chunk is empty; a chunk holds at most `2 * CHUNK` entries (a
//! fuller one is split in two); each chunk counts its entries with a
//! transparent mark, so the first mark by name is found without a walk
//! over every entry.

use super::Entry;
use crate::model::ServicePortName;

/// A chunk's size when filled in name order; an insert lets one grow to
/// twice that. Tests use tiny chunks, so a few ports already split them.
const CHUNK: usize = if cfg!(test) { 4 } else { 512 };

/// Entries are boxed: an insert or a removal in a chunk moves pointers,
/// not entries of a few hundred bytes each.
#[derive(Default)]
struct Chunk {
    #[allow(clippy::vec_box)] // on purpose: see the type's doc
    entries: Vec<Box<Entry>>,
    /// Entries with a transparent mark.
    marked: usize,
}

/// Entries sorted by name.
#[derive(Default)]
pub(super) struct Entries {
    chunks: Vec<Chunk>,
    len: usize,
}

impl Entries {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The entries in name order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.chunks.iter().flat_map(|c| c.entries.iter().map(|e| &**e))
    }

    /// The chunk `name` is in or would go in: the first whose last entry
    /// does not sort before it, else the last.
    fn chunk_for(&self, name: &ServicePortName) -> usize {
        let at = self.chunks.partition_point(|c| c.entries.last().is_some_and(|e| e.port.spec.name < *name));
        at.min(self.chunks.len().saturating_sub(1))
    }

    /// The entry of `name`, if there is one.
    pub(super) fn get(&self, name: &ServicePortName) -> Option<&Entry> {
        let chunk = self.chunks.get(self.chunk_for(name))?;
        let i = chunk.entries.binary_search_by(|e| e.port.spec.name.cmp(name)).ok()?;
        Some(&chunk.entries[i])
    }

    /// Take out the entry of `name`, if there is one.
    pub(super) fn remove(&mut self, name: &ServicePortName) -> Option<Entry> {
        let at = self.chunk_for(name);
        let chunk = self.chunks.get_mut(at)?;
        let i = chunk.entries.binary_search_by(|e| e.port.spec.name.cmp(name)).ok()?;
        let entry = chunk.entries.remove(i);
        chunk.marked -= usize::from(entry.mark().is_some());
        self.len -= 1;
        if chunk.entries.is_empty() {
            self.chunks.remove(at);
        }
        Some(*entry)
    }

    /// Put `entry` in its place by name (in place of its namesake, if any).
    pub(super) fn insert(&mut self, entry: Entry) {
        let entry = Box::new(entry);
        let marked = usize::from(entry.mark().is_some());
        if self.chunks.is_empty() {
            self.chunks.push(Chunk::default());
        }
        let at = self.chunk_for(&entry.port.spec.name);
        let last = at + 1 == self.chunks.len();
        let chunk = &mut self.chunks[at];
        match chunk.entries.binary_search_by(|e| e.port.spec.name.cmp(&entry.port.spec.name)) {
            Ok(i) => {
                let old = std::mem::replace(&mut chunk.entries[i], entry);
                chunk.marked = chunk.marked + marked - usize::from(old.mark().is_some());
                return;
            }
            // Filling in name order (a first sync): full chunks, none split.
            Err(i) if last && i == chunk.entries.len() && chunk.entries.len() >= CHUNK => {
                self.chunks.push(Chunk { entries: vec![entry], marked });
            }
            Err(i) => {
                chunk.entries.insert(i, entry);
                chunk.marked += marked;
                if chunk.entries.len() > 2 * CHUNK {
                    let mut upper = chunk.entries.split_off(chunk.entries.len() / 2);
                    upper.shrink_to_fit();
                    chunk.entries.shrink_to_fit();
                    let upper_marked = upper.iter().filter(|e| e.mark().is_some()).count();
                    chunk.marked -= upper_marked;
                    self.chunks.insert(at + 1, Chunk { entries: upper, marked: upper_marked });
                }
            }
        }
        self.len += 1;
    }

    /// The first transparent mark by name.
    pub(super) fn mark(&self) -> Option<u32> {
        self.chunks.iter().find(|c| c.marked > 0)?.entries.iter().find_map(|e| e.mark())
    }

    /// The module's invariants hold (for tests).
    #[cfg(test)]
    pub(super) fn check(&self) {
        assert!(
            self.chunks.iter().all(|c| !c.entries.is_empty() && c.entries.len() <= 2 * CHUNK),
            "chunk sizes"
        );
        assert_eq!(self.len, self.iter().count());
        for c in &self.chunks {
            assert_eq!(c.marked, c.entries.iter().filter(|e| e.mark().is_some()).count(), "marks counted");
        }
        let names: Vec<_> = self.iter().map(|e| &e.port.spec.name).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, each name once");
    }
}
