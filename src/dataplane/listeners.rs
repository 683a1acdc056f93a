//! What a worker keeps of each listening socket, and the back-off of an
//! accept that failed for lack of resources. Plain data: the worker module
//! and its accept and UDP halves all read it, and it depends on none of
//! them, so their imports form no cycle.

use io_uring::types;

use super::sys;
use super::udp_pace::ReadPace;
use crate::listen::{ListenRole, ListenerId};
use crate::model::Protocol;

/// A listening socket this worker accepts on (TCP) or receives on (UDP).
pub(super) struct Accepting {
    pub(super) id: ListenerId,
    pub(super) role: ListenRole,
    pub(super) protocol: Protocol,
    /// A shared proxy port: each connection is routed by its original
    /// destination, not by the listener.
    pub(super) shared: bool,
    /// `None` once the listener left the snapshot: its accept is being
    /// cancelled, and the slot is freed when that completes.
    pub(super) fd: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// Not listening, because its service port has no usable endpoint:
    /// the kernel refuses connections at once, and the port stays bound.
    /// (TCP only: a UDP socket is never paused.)
    pub(super) paused: bool,
    /// A multishot accept (TCP) or a readable poll (UDP), or an accept's
    /// back-off timer, or a UDP listener's pacing timer, is in flight.
    pub(super) armed: bool,
    /// How much a UDP listener reads per wake-up (`udp_pace.rs`).
    pub(super) pace: ReadPace,
}

/// The back-off timespecs, handed to the kernel by pointer.
pub(super) fn backoff_timespecs() -> Vec<&'static types::Timespec> {
    super::fault::ACCEPT_BACKOFF.iter().map(|d| sys::timespec(*d)).collect()
}
