//! A snapshot's service ports, sorted by name, as a list of chunks shared
//! between snapshots: an update copies the chunks its ports fall in (a few
//! hundred pointers each) and the list of chunks, not one pointer per port.
//!
//! Invariants: the ports are sorted by name, with no name twice; no chunk
//! is empty; a chunk holds at most `2 * CHUNK` ports (a fuller one is
//! split in two).

use std::ops::Index;
use std::sync::Arc;

use super::PortState;
use crate::model::ServicePortName;

/// A chunk's size when built whole; an update lets one grow to twice that.
/// Tests use tiny chunks, so a few ports already take the chunked path,
/// with splits.
const CHUNK: usize = if cfg!(test) { 4 } else { 512 };

type Chunk = Arc<Vec<Arc<PortState>>>;

/// Service ports sorted by name.
#[derive(Debug, Default, Clone)]
pub struct Ports {
    chunks: Vec<Chunk>,
    len: usize,
}

/// The ports in name order.
pub type Iter<'a> = std::iter::FlatMap<
    std::slice::Iter<'a, Chunk>,
    std::slice::Iter<'a, Arc<PortState>>,
    fn(&'a Chunk) -> std::slice::Iter<'a, Arc<PortState>>,
>;

impl Ports {
    /// Ports already sorted by name, each name once.
    pub fn from_sorted(ports: Vec<Arc<PortState>>) -> Self {
        debug_assert!(ports.windows(2).all(|w| w[0].spec.name < w[1].spec.name));
        let len = ports.len();
        let chunks = ports.chunks(CHUNK).map(|c| Arc::new(c.to_vec())).collect();
        Self { chunks, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> Iter<'_> {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// The ports of the chunks `other` does not hold (told by pointer,
    /// while `other` keeps them alive): every port set or removed between
    /// the two lists is among them, with the rest of its chunk.
    pub fn unshared<'a>(&'a self, other: &Ports) -> impl Iterator<Item = &'a Arc<PortState>> {
        let theirs: std::collections::HashSet<*const Vec<Arc<PortState>>> =
            other.chunks.iter().map(Arc::as_ptr).collect();
        self.chunks.iter().filter(move |c| !theirs.contains(&Arc::as_ptr(c))).flat_map(|c| c.iter())
    }

    /// A service port by name.
    pub fn get(&self, name: &ServicePortName) -> Option<&Arc<PortState>> {
        let chunk = self.chunks.get(self.chunk_for(name))?;
        let i = chunk.binary_search_by(|p| p.spec.name.cmp(name)).ok()?;
        chunk.get(i)
    }

    /// The chunk `name` is in or would go in: the first whose last port
    /// does not sort before it, else the last.
    fn chunk_for(&self, name: &ServicePortName) -> usize {
        let at = self.chunks.partition_point(|c| c.last().is_some_and(|p| p.spec.name < *name));
        at.min(self.chunks.len().saturating_sub(1))
    }

    /// These ports with `built` (sorted by name) set in place of their
    /// namesakes or added, and `removed` (sorted) gone. A change of fewer
    /// ports than there are chunks copies only the chunks it touches; a
    /// bigger one merges the lists whole.
    pub(super) fn with(&self, built: &[Arc<PortState>], removed: &[ServicePortName]) -> Self {
        if built.len() + removed.len() >= self.chunks.len() {
            return self.merged(built, removed);
        }
        let mut next = self.clone();
        for name in removed {
            let at = next.chunk_for(name);
            let Some(chunk) = next.chunks.get_mut(at) else { continue };
            let Ok(i) = chunk.binary_search_by(|p| p.spec.name.cmp(name)) else { continue };
            Arc::make_mut(chunk).remove(i);
            next.len -= 1;
            if chunk.is_empty() {
                next.chunks.remove(at);
            }
        }
        for port in built {
            if next.chunks.is_empty() {
                next.chunks.push(Arc::default());
            }
            let at = next.chunk_for(&port.spec.name);
            let chunk = Arc::make_mut(&mut next.chunks[at]);
            match chunk.binary_search_by(|p| p.spec.name.cmp(&port.spec.name)) {
                Ok(i) => chunk[i] = Arc::clone(port),
                Err(i) => {
                    chunk.insert(i, Arc::clone(port));
                    next.len += 1;
                    if chunk.len() > 2 * CHUNK {
                        let upper = chunk.split_off(chunk.len() / 2);
                        next.chunks.insert(at + 1, Arc::new(upper));
                    }
                }
            }
        }
        next
    }

    /// `with` by a merge of two sorted lists: a built port replaces its
    /// old self, a removed one is left out, the rest are kept as is.
    fn merged(&self, built: &[Arc<PortState>], removed: &[ServicePortName]) -> Self {
        let gone = |p: &Arc<PortState>| removed.binary_search(&p.spec.name).is_ok();
        let mut ports = Vec::with_capacity(self.len + built.len());
        let mut new = built.iter().peekable();
        for old in self.iter() {
            while let Some(n) = new.next_if(|n| n.spec.name < old.spec.name) {
                ports.push(Arc::clone(n));
            }
            if new.peek().is_some_and(|n| n.spec.name == old.spec.name) || gone(old) {
                continue;
            }
            ports.push(Arc::clone(old));
        }
        ports.extend(new.cloned());
        Self::from_sorted(ports)
    }

    /// How many chunks two lists share (for tests of what an update copies).
    #[cfg(test)]
    pub(super) fn shared_chunks(&self, other: &Ports) -> usize {
        self.chunks.iter().filter(|c| other.chunks.iter().any(|o| Arc::ptr_eq(c, o))).count()
    }

    #[cfg(test)]
    pub(super) fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The module's invariants hold (for tests).
    #[cfg(test)]
    pub(super) fn check(&self) {
        assert!(self.chunks.iter().all(|c| !c.is_empty() && c.len() <= 2 * CHUNK), "chunk sizes");
        assert_eq!(self.len, self.chunks.iter().map(|c| c.len()).sum::<usize>());
        let names: Vec<_> = self.iter().map(|p| &p.spec.name).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, each name once");
    }
}

impl<'a> IntoIterator for &'a Ports {
    type Item = &'a Arc<PortState>;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl From<Vec<Arc<PortState>>> for Ports {
    /// Ports in any order (sorted here; the last of a name twice is kept).
    fn from(mut ports: Vec<Arc<PortState>>) -> Self {
        ports.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        ports.reverse();
        ports.dedup_by(|a, b| a.spec.name == b.spec.name);
        ports.reverse();
        Self::from_sorted(ports)
    }
}

impl Index<usize> for Ports {
    type Output = Arc<PortState>;

    /// The `i`th port by name (a walk over the chunks: for tests and
    /// tools, not for a hot path).
    fn index(&self, mut i: usize) -> &Arc<PortState> {
        for chunk in &self.chunks {
            if i < chunk.len() {
                return &chunk[i];
            }
            i -= chunk.len();
        }
        panic!("port index {i} past the end of {} ports", self.len)
    }
}
