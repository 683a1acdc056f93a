//! Control-plane inputs. Each source produces validated model objects for
//! the table; none of them touches the data plane.

pub mod file;
pub mod kube;

use crate::config::Manifests;
use crate::table::Delta;

/// What a source hands the control plane: its whole state (a first load,
/// or when a change cannot be told apart from the rest), or the objects
/// that changed since its last update.
#[derive(Debug)]
pub enum Change {
    /// For the control plane's `replace`.
    Whole(Manifests),
    /// For the control plane's `apply`.
    Delta(Delta),
}
