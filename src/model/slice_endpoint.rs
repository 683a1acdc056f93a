//! [`SliceEndpoint`]: one endpoint of an EndpointSlice, in 32 bytes.
//!
//! There are hundreds of thousands of them. Its usual single address sits
//! beside its conditions and its placement pointer, the rare list of several
//! addresses in the same room (a list of addresses of its own was 24 bytes,
//! and with the rest 40). Its parts are read through methods; it prints and
//! serializes as the struct of three fields it was.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use super::{Addresses, Conditions, Placement};

/// One endpoint of an [`EndpointSlice`](super::EndpointSlice): addresses ×
/// the slice's ports. Node, zone and hints are behind one shared pointer,
/// read through `Deref`: `endpoint.node_name`.
#[derive(Clone, PartialEq, Eq)]
pub struct SliceEndpoint(Repr);

#[derive(Clone, PartialEq, Eq)]
enum Repr {
    One {
        place: Arc<Placement>,
        address: IpAddr,
        conditions: Conditions,
    },
    /// None, or more than one.
    Many {
        place: Arc<Placement>,
        addresses: Box<[IpAddr]>,
        conditions: Conditions,
    },
}

impl SliceEndpoint {
    pub fn new(addresses: impl Into<Addresses>, conditions: Conditions, place: Arc<Placement>) -> Self {
        SliceEndpoint(match addresses.into() {
            Addresses::One(address) => Repr::One { place, address, conditions },
            Addresses::Many(addresses) => Repr::Many { place, addresses, conditions },
        })
    }

    pub fn addresses(&self) -> &[IpAddr] {
        match &self.0 {
            Repr::One { address, .. } => std::slice::from_ref(address),
            Repr::Many { addresses, .. } => addresses,
        }
    }

    pub fn conditions(&self) -> Conditions {
        match self.0 {
            Repr::One { conditions, .. } | Repr::Many { conditions, .. } => conditions,
        }
    }

    /// Shared with the [`Endpoint`](super::Endpoint)s joined from it.
    pub fn place(&self) -> &Arc<Placement> {
        match &self.0 {
            Repr::One { place, .. } | Repr::Many { place, .. } => place,
        }
    }

    pub fn set_addresses(&mut self, addresses: impl Into<Addresses>) {
        *self = SliceEndpoint::new(addresses, self.conditions(), Arc::clone(self.place()));
    }
}

impl std::ops::Deref for SliceEndpoint {
    type Target = Placement;

    fn deref(&self) -> &Placement {
        self.place()
    }
}

/// A write copies the placement first if it is shared.
impl std::ops::DerefMut for SliceEndpoint {
    fn deref_mut(&mut self) -> &mut Placement {
        match &mut self.0 {
            Repr::One { place, .. } | Repr::Many { place, .. } => Arc::make_mut(place),
        }
    }
}

impl fmt::Debug for SliceEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SliceEndpoint")
            .field("addresses", &Addresses::from(self.addresses().to_vec()))
            .field("conditions", &self.conditions())
            .field("place", self.place())
            .finish()
    }
}

impl Serialize for SliceEndpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Fields<'a> {
            addresses: &'a [IpAddr],
            conditions: Conditions,
            #[serde(flatten)]
            place: &'a Placement,
        }
        Fields { addresses: self.addresses(), conditions: self.conditions(), place: self.place() }
            .serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Hints, Name};

    /// The struct it was, with its derived `Debug` and serialization.
    #[derive(Debug, Serialize)]
    #[allow(dead_code, reason = "read through Debug")]
    struct Old {
        addresses: Addresses,
        conditions: Conditions,
        #[serde(flatten)]
        place: Placement,
    }

    #[test]
    fn holds_one_address_or_a_list_in_32_bytes_and_prints_as_before() {
        assert_eq!(std::mem::size_of::<SliceEndpoint>(), 32);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let place = Placement {
            node_name: Some(Name::from("n1")),
            zone: Some(Name::from("z1")),
            hints: Hints::new(vec![Name::from("z1")], Vec::new()),
        };
        let not_ready = Conditions { ready: false, serving: true, terminating: true };
        for ips in [vec![ip("10.0.0.1")], vec![ip("10.0.0.1"), ip("fd00::1")], Vec::new()] {
            let e = SliceEndpoint::new(ips.clone(), not_ready, Arc::new(place.clone()));
            assert_eq!((e.addresses(), e.conditions(), e.zone.as_deref()), (&ips[..], not_ready, Some("z1")));
            let old = Old { addresses: ips.clone().into(), conditions: not_ready, place: place.clone() };
            assert_eq!(format!("{e:?}").replacen("SliceEndpoint", "Old", 1), format!("{old:?}"));
            assert_eq!(serde_json::to_string(&e).unwrap(), serde_json::to_string(&old).unwrap());
        }
        let mut e = SliceEndpoint::new(ip("10.0.0.1"), not_ready, Placement::none());
        e.set_addresses(vec![ip("10.0.0.2"), ip("10.0.0.3")]);
        assert_eq!((e.addresses(), e.conditions()), (&[ip("10.0.0.2"), ip("10.0.0.3")][..], not_ready));
        e.node_name = Some(Name::from("n2"));
        assert_eq!((e.node_name.as_deref(), Placement::none().node_name.as_deref()), (Some("n2"), None));
    }
}
