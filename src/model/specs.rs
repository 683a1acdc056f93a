//! [`PortSpecs`]: a Service's ports, one shared copy of each list.
//!
//! Services repeat the same port lists (one `http` port 80 to 8080): each
//! distinct list is held once, interned as names are, and a Service holds a
//! pointer to it (a `Vec` of one was a 40-byte allocation and 24 bytes in
//! each Service). It reads, compares, prints and serializes as the list it
//! replaced; a write through it copies the list first.

use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use serde::Serialize;

use super::ServicePortSpec;
use super::name::Interner;

/// A Service's ports, in the order given.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSpecs(Arc<[ServicePortSpec]>);

impl PortSpecs {
    pub fn as_slice(&self) -> &[ServicePortSpec] {
        &self.0
    }

    /// Whether `self` and `other` are the same allocation (not only equal).
    pub fn shares(&self, other: &PortSpecs) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Default for PortSpecs {
    fn default() -> Self {
        PortSpecs::from(Vec::new())
    }
}

impl From<Vec<ServicePortSpec>> for PortSpecs {
    fn from(ports: Vec<ServicePortSpec>) -> Self {
        static LISTS: LazyLock<Mutex<Interner<[ServicePortSpec]>>> =
            LazyLock::new(|| Mutex::new(Interner::new()));
        PortSpecs(LISTS.lock().unwrap_or_else(PoisonError::into_inner).get(&ports))
    }
}

impl std::ops::Deref for PortSpecs {
    type Target = [ServicePortSpec];

    fn deref(&self) -> &[ServicePortSpec] {
        &self.0
    }
}

/// A write copies the list first if it is shared, so it never reaches
/// another Service.
impl std::ops::DerefMut for PortSpecs {
    fn deref_mut(&mut self) -> &mut [ServicePortSpec] {
        Arc::make_mut(&mut self.0)
    }
}

impl<'a> IntoIterator for &'a PortSpecs {
    type Item = &'a ServicePortSpec;
    type IntoIter = std::slice::Iter<'a, ServicePortSpec>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl fmt::Debug for PortSpecs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_slice(), f)
    }
}

impl Serialize for PortSpecs {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Name, Protocol, TargetPort};

    fn spec(port: u16) -> ServicePortSpec {
        let target_port = TargetPort::Number(port);
        ServicePortSpec {
            name: Name::from(format!("p{port}")),
            protocol: Protocol::Tcp,
            port,
            target_port,
            node_port: None,
        }
    }

    #[test]
    fn equal_lists_are_one_allocation_and_a_write_copies() {
        let one = PortSpecs::from(vec![spec(80)]);
        assert_eq!(*one, [spec(80)]);
        let again = PortSpecs::from(vec![spec(80)]);
        assert!(one.shares(&again), "one copy of equal lists");
        let two = PortSpecs::from(vec![spec(80), spec(443)]);
        assert_eq!(two.iter().map(|p| p.port).collect::<Vec<_>>(), [80, 443]);
        assert!(PortSpecs::from(Vec::new()).is_empty());
        let mut changed = again.clone();
        changed[0].node_port = Some(30080);
        assert_eq!(
            (one[0].node_port, changed[0].node_port),
            (None, Some(30080)),
            "the write copied the list"
        );
        assert!(PortSpecs::from(vec![spec(80)]).shares(&one));
    }

    #[test]
    fn prints_and_serializes_as_the_list_it_replaced() {
        let ports = PortSpecs::from(vec![spec(80)]);
        assert_eq!(format!("{ports:?}"), format!("{:?}", vec![spec(80)]));
        assert_eq!(serde_json::to_string(&ports).unwrap(), serde_json::to_string(&vec![spec(80)]).unwrap());
        assert_eq!(std::mem::size_of::<PortSpecs>(), 16);
    }
}
