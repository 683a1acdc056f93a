//! [`PortSpecs`]: a Service's ports, the usual single one inline.
//!
//! Nearly every Service has one port; kept inline it costs no allocation of
//! its own (a `Vec` of one was a 40-byte allocation and 24 bytes in each
//! Service). It reads, compares, prints and serializes as the list it
//! replaced.

use std::fmt;

use serde::Serialize;

use super::ServicePortSpec;

/// A Service's ports, in the order given.
#[derive(Clone, PartialEq, Eq)]
pub enum PortSpecs {
    One(ServicePortSpec),
    /// None, or more than one.
    Many(Box<[ServicePortSpec]>),
}

impl PortSpecs {
    pub fn as_slice(&self) -> &[ServicePortSpec] {
        match self {
            PortSpecs::One(port) => std::slice::from_ref(port),
            PortSpecs::Many(ports) => ports,
        }
    }
}

impl Default for PortSpecs {
    fn default() -> Self {
        PortSpecs::Many(Box::default())
    }
}

impl From<Vec<ServicePortSpec>> for PortSpecs {
    fn from(mut ports: Vec<ServicePortSpec>) -> Self {
        match ports.pop() {
            Some(port) if ports.is_empty() => PortSpecs::One(port),
            Some(last) => {
                ports.push(last);
                PortSpecs::Many(ports.into_boxed_slice())
            }
            None => PortSpecs::default(),
        }
    }
}

impl std::ops::Deref for PortSpecs {
    type Target = [ServicePortSpec];

    fn deref(&self) -> &[ServicePortSpec] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for PortSpecs {
    fn deref_mut(&mut self) -> &mut [ServicePortSpec] {
        match self {
            PortSpecs::One(port) => std::slice::from_mut(port),
            PortSpecs::Many(ports) => ports,
        }
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
    fn one_port_is_held_inline_and_any_other_count_boxed() {
        let one = PortSpecs::from(vec![spec(80)]);
        assert!(matches!(one, PortSpecs::One(_)));
        assert_eq!(*one, [spec(80)]);
        let two = PortSpecs::from(vec![spec(80), spec(443)]);
        assert_eq!(two.iter().map(|p| p.port).collect::<Vec<_>>(), [80, 443]);
        assert!(PortSpecs::from(Vec::new()).is_empty());
        assert_eq!(PortSpecs::from(vec![spec(80)]), one);
    }

    #[test]
    fn prints_and_serializes_as_the_list_it_replaced() {
        let ports = PortSpecs::from(vec![spec(80)]);
        assert_eq!(format!("{ports:?}"), format!("{:?}", vec![spec(80)]));
        assert_eq!(serde_json::to_string(&ports).unwrap(), serde_json::to_string(&vec![spec(80)]).unwrap());
        assert_eq!(
            std::mem::size_of::<PortSpecs>(),
            std::mem::size_of::<ServicePortSpec>(),
            "no tag of its own"
        );
    }
}
