//! The compact parts of an endpoint: its addresses (one inline, the usual
//! case) and its topology hints (out of line, shared).

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use super::Name;

/// An endpoint's addresses: nearly always exactly one, which is kept inline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addresses {
    One(IpAddr),
    /// None, or more than one.
    Many(Box<[IpAddr]>),
}

impl Addresses {
    pub fn as_slice(&self) -> &[IpAddr] {
        match self {
            Addresses::One(ip) => std::slice::from_ref(ip),
            Addresses::Many(ips) => ips,
        }
    }
}

impl std::ops::Deref for Addresses {
    type Target = [IpAddr];

    fn deref(&self) -> &[IpAddr] {
        self.as_slice()
    }
}

impl<'a> IntoIterator for &'a Addresses {
    type Item = &'a IpAddr;
    type IntoIter = std::slice::Iter<'a, IpAddr>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl From<Vec<IpAddr>> for Addresses {
    fn from(ips: Vec<IpAddr>) -> Self {
        match *ips {
            [ip] => Addresses::One(ip),
            _ => Addresses::Many(ips.into_boxed_slice()),
        }
    }
}

impl From<IpAddr> for Addresses {
    fn from(ip: IpAddr) -> Self {
        Addresses::One(ip)
    }
}

impl Serialize for Addresses {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(serializer)
    }
}

/// An endpoint's topology hints (`hints.forZones`, `hints.forNodes`), rare
/// enough to live behind one pointer, shared by the joined [`Endpoint`]s of
/// every address and port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Hints {
    pub zones: Box<[Name]>,
    pub nodes: Box<[Name]>,
}

impl Hints {
    /// `None` when there are no hints at all.
    pub fn new(zones: Vec<Name>, nodes: Vec<Name>) -> Option<Arc<Hints>> {
        if zones.is_empty() && nodes.is_empty() {
            return None;
        }
        Some(Arc::new(Hints { zones: zones.into(), nodes: nodes.into() }))
    }
}

pub(super) fn serialize_hints<S: serde::Serializer>(
    hints: &Option<Arc<Hints>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    hints.as_deref().serialize(serializer)
}
