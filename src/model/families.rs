//! [`IpFamilies`]: the address families a Service serves, in one byte.
//!
//! A Service serves at most two families, each once (the API server allows
//! no more, and validation drops a repeated one), so the five possible lists
//! are named outright instead of kept in a `Vec` of their own (24 bytes in
//! every Service's settings, plus an allocation). It reads, compares,
//! prints and serializes as the list it replaced.

use std::fmt;

use serde::Serialize;

use super::IpFamily;

/// The families a Service serves, primary first; empty for any family.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum IpFamilies {
    #[default]
    Any,
    V4,
    V6,
    V4V6,
    V6V4,
}

impl IpFamilies {
    pub fn as_slice(self) -> &'static [IpFamily] {
        match self {
            IpFamilies::Any => &[],
            IpFamilies::V4 => &[IpFamily::V4],
            IpFamilies::V6 => &[IpFamily::V6],
            IpFamilies::V4V6 => &[IpFamily::V4, IpFamily::V6],
            IpFamilies::V6V4 => &[IpFamily::V6, IpFamily::V4],
        }
    }

    /// `self` with `family` added after the others, unless it is already
    /// there.
    #[must_use]
    pub fn then(self, family: IpFamily) -> Self {
        match (self, family) {
            (IpFamilies::Any, IpFamily::V4) => IpFamilies::V4,
            (IpFamilies::Any, IpFamily::V6) => IpFamilies::V6,
            (IpFamilies::V4, IpFamily::V6) => IpFamilies::V4V6,
            (IpFamilies::V6, IpFamily::V4) => IpFamilies::V6V4,
            (held, _) => held,
        }
    }
}

/// Each family once, in the order first given: a repeat adds nothing.
impl FromIterator<IpFamily> for IpFamilies {
    fn from_iter<I: IntoIterator<Item = IpFamily>>(families: I) -> Self {
        families.into_iter().fold(IpFamilies::Any, IpFamilies::then)
    }
}

impl std::ops::Deref for IpFamilies {
    type Target = [IpFamily];

    fn deref(&self) -> &[IpFamily] {
        self.as_slice()
    }
}

impl fmt::Debug for IpFamilies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_slice(), f)
    }
}

impl Serialize for IpFamilies {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(serializer)
    }
}

impl<const N: usize> PartialEq<[IpFamily; N]> for IpFamilies {
    fn eq(&self, other: &[IpFamily; N]) -> bool {
        self.as_slice() == other
    }
}

impl PartialEq<[IpFamily]> for IpFamilies {
    fn eq(&self, other: &[IpFamily]) -> bool {
        self.as_slice() == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_each_family_once_in_the_order_given() {
        use IpFamily::{V4, V6};
        let of = |list: &[IpFamily]| list.iter().copied().collect::<IpFamilies>();
        assert_eq!(of(&[]), []);
        assert!(of(&[]).is_empty());
        assert_eq!(of(&[V6]), [V6]);
        assert_eq!(of(&[V4, V6]), [V4, V6]);
        assert_eq!(of(&[V6, V4]), [V6, V4]);
        assert_eq!(of(&[V4, V4, V6, V4]), [V4, V6], "a repeat adds nothing");
        assert!(of(&[V6]).contains(&V6) && !of(&[V6]).contains(&V4));
    }

    #[test]
    fn prints_and_serializes_as_the_list_it_replaced() {
        let families = IpFamilies::V6V4;
        assert_eq!(format!("{families:?}"), format!("{:?}", vec![IpFamily::V6, IpFamily::V4]));
        assert_eq!(serde_json::to_string(&families).unwrap(), r#"["V6","V4"]"#);
        assert_eq!(serde_json::to_string(&IpFamilies::Any).unwrap(), "[]");
        assert_eq!(std::mem::size_of::<IpFamilies>(), 1);
    }
}
