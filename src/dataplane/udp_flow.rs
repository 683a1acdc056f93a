//! The life of one UDP flow as an I/O-free machine: events and `now` in,
//! wanted operations ([`FlowAction`]s) out, like the TCP connection's
//! (`machine.rs`). The worker owns the sockets, the ring and the clock.
//!
//! ```text
//! Open --idle past the timeout, ICMP refused, endpoint gone, evicted--> Closing
//! Closing --its poll completed (or none was in flight)--> Freed
//! ```
//!
//! Invariants:
//! - At most one readable poll is in flight; [`FlowAction::Free`] is issued
//!   once, only when closing with no poll in flight, so a late completion
//!   never reaches a flow that reused the slot.
//! - Only an endpoint's refusal (ICMP port unreachable) is blamed on it
//!   ([`FlowAction::Blame`]); idleness, eviction and receive errors are not.

use std::time::{Duration, Instant};

use super::machine::Actions;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowPhase {
    Open,
    Closing,
    Freed,
}

/// What a receive from the endpoint's socket found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// Replies were relayed (or none were waiting).
    Replies { relayed: usize },
    /// The endpoint refused: ICMP port unreachable.
    Refused,
    /// Another receive error; the flow cannot go on.
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowAction {
    /// Poll the endpoint socket for readable.
    ArmPoll,
    /// Replies (or an error) wait: receive, then report [`FlowMachine::received`].
    Receive,
    /// Count a failure against the endpoint (passive health).
    Blame,
    /// Cancel the poll in flight; its completion still comes back.
    Cancel,
    /// Nothing is in flight: drop the flow, closing its socket.
    Free,
}

#[derive(Debug)]
pub struct FlowMachine {
    phase: FlowPhase,
    /// A readable poll is in flight.
    armed: bool,
    last_active: Instant,
    actions: Actions<FlowAction, 4>,
}

impl FlowMachine {
    /// A flow opened at `now`: it wants its poll.
    pub fn new(now: Instant) -> Self {
        let mut actions = Actions::new();
        actions.push_back(FlowAction::ArmPoll);
        Self { phase: FlowPhase::Open, armed: true, last_active: now, actions }
    }

    #[cfg(test)]
    pub fn phase(&self) -> FlowPhase {
        self.phase
    }

    pub fn is_open(&self) -> bool {
        self.phase == FlowPhase::Open
    }

    pub fn last_active(&self) -> Instant {
        self.last_active
    }

    pub fn poll_action(&mut self) -> Option<FlowAction> {
        self.actions.pop_front()
    }

    /// A datagram from the client went to the endpoint.
    pub fn sent(&mut self, now: Instant) {
        self.last_active = now;
    }

    /// A send to the endpoint failed; `refused`: ICMP port unreachable.
    pub fn send_failed(&mut self, refused: bool) {
        if refused && self.is_open() {
            self.actions.push_back(FlowAction::Blame);
            self.close();
        }
    }

    /// The readable poll completed with `result`.
    pub fn polled(&mut self, result: i32) {
        self.armed = false;
        match self.phase {
            FlowPhase::Open if result >= 0 => self.actions.push_back(FlowAction::Receive),
            // A poll error without a close asked for: the socket is unusable.
            FlowPhase::Open => self.close(),
            FlowPhase::Closing => self.free_if_idle(),
            FlowPhase::Freed => {}
        }
    }

    /// The outcome of a [`FlowAction::Receive`].
    pub fn received(&mut self, received: Received, now: Instant) {
        if !self.is_open() {
            return;
        }
        match received {
            Received::Replies { relayed } => {
                if relayed > 0 {
                    self.last_active = now;
                }
                self.armed = true;
                self.actions.push_back(FlowAction::ArmPoll);
            }
            Received::Refused => {
                self.actions.push_back(FlowAction::Blame);
                self.close();
            }
            Received::Failed => self.close(),
        }
    }

    /// Whether the flow moved nothing either way for longer than `timeout`.
    pub fn expired(&self, now: Instant, timeout: Duration) -> bool {
        self.is_open() && now.saturating_duration_since(self.last_active) > timeout
    }

    /// Close the flow (idle, evicted, endpoint or listener gone).
    pub fn close(&mut self) {
        if !self.is_open() {
            return;
        }
        self.phase = FlowPhase::Closing;
        // A poll asked for but not yet submitted is not in flight.
        if self.actions.iter().any(|a| a == FlowAction::ArmPoll) {
            self.armed = false;
        }
        self.actions.retain(|a| *a == FlowAction::Blame);
        if self.armed {
            self.actions.push_back(FlowAction::Cancel);
        }
        self.free_if_idle();
    }

    fn free_if_idle(&mut self) {
        if self.phase == FlowPhase::Closing && !self.armed {
            self.phase = FlowPhase::Freed;
            self.actions.push_back(FlowAction::Free);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actions(m: &mut FlowMachine) -> Vec<FlowAction> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    fn open(now: Instant) -> FlowMachine {
        let mut m = FlowMachine::new(now);
        assert_eq!(actions(&mut m), [FlowAction::ArmPoll]);
        m
    }

    #[test]
    fn replies_are_received_and_the_poll_rearmed() {
        let t0 = Instant::now();
        let mut m = open(t0);
        m.polled(libc::POLLIN as i32);
        assert_eq!(actions(&mut m), [FlowAction::Receive]);
        m.received(Received::Replies { relayed: 3 }, t0 + Duration::from_secs(5));
        assert_eq!(actions(&mut m), [FlowAction::ArmPoll]);
        assert_eq!(m.last_active(), t0 + Duration::from_secs(5));
    }

    #[test]
    fn an_idle_flow_expires_and_frees_only_after_its_poll_is_cancelled() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(30);
        let mut m = open(t0);
        m.sent(t0 + Duration::from_secs(20));
        assert!(!m.expired(t0 + Duration::from_secs(45), timeout), "a datagram restarted the clock");
        assert!(m.expired(t0 + Duration::from_secs(51), timeout));
        m.close();
        assert_eq!(actions(&mut m), [FlowAction::Cancel]);
        assert_eq!(m.phase(), FlowPhase::Closing);
        assert!(!m.expired(t0 + Duration::from_secs(99), timeout), "a closing flow is not expired twice");
        m.polled(-libc::ECANCELED);
        assert_eq!(actions(&mut m), [FlowAction::Free]);
        m.polled(-libc::ECANCELED);
        m.close();
        assert!(actions(&mut m).is_empty(), "freed once");
    }

    #[test]
    fn a_refusing_endpoint_is_blamed_and_the_flow_closed() {
        let mut m = open(Instant::now());
        m.polled(libc::POLLERR as i32);
        assert_eq!(actions(&mut m), [FlowAction::Receive]);
        m.received(Received::Refused, Instant::now());
        assert_eq!(actions(&mut m), [FlowAction::Blame, FlowAction::Free]);
    }

    #[test]
    fn a_refused_send_blames_the_endpoint_and_cancels_the_poll() {
        let mut m = open(Instant::now());
        m.send_failed(false);
        assert!(actions(&mut m).is_empty(), "a dropped datagram alone closes nothing");
        m.send_failed(true);
        assert_eq!(actions(&mut m), [FlowAction::Blame, FlowAction::Cancel]);
        m.polled(-libc::ECANCELED);
        assert_eq!(actions(&mut m), [FlowAction::Free]);
    }

    #[test]
    fn a_receive_error_closes_without_blame() {
        let mut m = open(Instant::now());
        m.polled(libc::POLLIN as i32);
        actions(&mut m);
        m.received(Received::Failed, Instant::now());
        assert_eq!(actions(&mut m), [FlowAction::Free]);
    }

    #[test]
    fn a_poll_error_closes_the_flow_instead_of_leaving_it_unwatched() {
        let mut m = open(Instant::now());
        m.polled(-libc::EBADF);
        assert_eq!(actions(&mut m), [FlowAction::Free]);
    }

    #[test]
    fn closing_before_the_first_poll_was_submitted_frees_at_once() {
        let mut m = FlowMachine::new(Instant::now());
        m.close();
        assert_eq!(actions(&mut m), [FlowAction::Free]);
    }
}
