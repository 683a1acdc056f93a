//! loadgen: an io_uring load generator and test backend for TCP and UDP.
//!
//! Pure logic (address parsing, the open-loop schedule, accounting, report
//! rendering) lives in modules without I/O; the event loops live in
//! `worker` (load side) and `serve` (backend side); `sys` is the only
//! module with `unsafe`.

#![deny(unsafe_code)]

pub mod addrs;
pub mod hgrm;
pub mod plot;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod serve;
pub mod sys;
pub mod worker;
