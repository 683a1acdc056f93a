//! Control-plane inputs. Each source produces validated model objects for
//! the table; none of them touches the data plane.

pub mod file;
pub mod kube;
