//! ringport: a userspace, thread-per-core io_uring L4 service proxy.
//!
//! Data flows one way: a source (`source/`) produces validated model objects
//! (`config/` turns raw Kubernetes objects into `model` types), the table
//! (`table`) joins them into one immutable snapshot, and the data plane
//! (`dataplane/`) serves connections from whatever snapshot is current.

pub mod config;
pub mod model;
