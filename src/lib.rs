//! ringport: a userspace, thread-per-core io_uring L4 service proxy.
//!
//! Data flows one way: a source (`source/`) produces validated model objects
//! (`config/` turns raw Kubernetes objects into `model` types), the table
//! (`table`) joins them into service ports, the control plane (`control`)
//! binds listeners and publishes one immutable `snapshot`, and the data
//! plane (`dataplane/`) serves connections from whatever snapshot is current;
//! the redirect syncer (`redirect/`) then brings the REDIRECT rules to match,
//! and `service_health` the healthCheckNodePort servers.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod balance;
pub mod budget;
pub mod check;
pub mod compat;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod demo;
pub mod handover;
pub mod listen;
pub mod log_cap;
pub mod loops;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod proxy_protocol;
pub mod redirect;
pub mod run;
pub mod service_health;
pub mod snapshot;
pub mod source;
pub mod source_ip;
pub mod status;
pub mod systemd;
pub mod table;
#[cfg(test)]
mod test_rng;
mod text_table;
pub mod version;
