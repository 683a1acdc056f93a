//! [`Origin`]: where a model object came from, for error messages, kept as
//! parts (a shared place, the document and List item numbers) rather than
//! as formatted text, since every object carries one.

use std::fmt;
use std::num::NonZeroU32;

use serde::Serialize;

use super::Name;

/// Where a model object came from, for error messages: a place (a file, or
/// the Kubernetes API) and, for an object of a file, the document's index in
/// it and the List item's. Kept apart, not formatted: every object has one,
/// and the place is shared, so cloning one never allocates.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    place: Name,
    /// The document, numbered from 1; `None` for the whole place.
    document: Option<NonZeroU32>,
    /// The List item's index + 1; `None` outside a List. (Both fit in the
    /// room of the niche, so an origin is no larger than the `String` it
    /// replaced.)
    item: Option<NonZeroU32>,
}

impl Origin {
    /// A whole place: a file, a directory, or a source such as the API.
    pub fn new(place: impl AsRef<str>) -> Self {
        Self { place: Name::interned(place.as_ref()), document: None, item: None }
    }

    /// `file (document N)`; documents are numbered from 1.
    pub fn document(file: Name, document: usize) -> Self {
        Self { place: file, document: Some(counted(document)), item: None }
    }

    /// `file (document N, items[I])`; items are indexed from 0.
    pub fn item(file: Name, document: usize, item: usize) -> Self {
        Self { place: file, document: Some(counted(document)), item: Some(counted(item.saturating_add(1))) }
    }

    /// The file or source, without the document.
    pub fn place(&self) -> &Name {
        &self.place
    }
}

/// A count from 1. Documents and items are bounded by the manifest size
/// limit, far below `u32::MAX`, so the clamping never shows.
fn counted(n: usize) -> NonZeroU32 {
    u32::try_from(n).ok().and_then(NonZeroU32::new).unwrap_or(NonZeroU32::MAX)
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.place)?;
        match (self.document, self.item) {
            (None, _) => Ok(()),
            (Some(document), None) => write!(f, " (document {document})"),
            (Some(document), Some(item)) => write!(f, " (document {document}, items[{}])", item.get() - 1),
        }
    }
}

impl Serialize for Origin {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}
