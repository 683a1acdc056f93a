//! Endpoint selection for one service port: pure logic, no I/O. The time is
//! passed in, so every behaviour can be tested with a fake clock.
//!
//! For one new connection, [`Balancer::pick`] yields the ordered candidates
//! to try. Retry on connect failure is then "take the next candidate"
//! (pingora's selection iterator). The skeleton balances by round robin
//! over the usable endpoints; affinity, health and other schedulers grow
//! behind the same `pick`.
//!
//! Invariants:
//! - A balancer is shared by every worker (through the snapshot); its only
//!   mutable state is atomic, so workers never block each other, and round
//!   robin is fair across all workers together.
//! - One pick yields [`MAX_ATTEMPTS`] candidates, going through every
//!   endpoint once before any repeats (with one endpoint, it is tried four
//!   times with growing timeouts, as kube-proxy's userspace mode did).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::model::{ClientAddr, Endpoint, EndpointAddr};

/// Most endpoints one connection tries (kube-proxy's userspace mode: 4).
pub const MAX_ATTEMPTS: usize = 4;

/// Which endpoints may receive traffic: the ready ones; when none is ready,
/// those still serving while terminating (the Kubernetes rule). An endpoint
/// that is not serving never gets traffic.
pub fn usable(endpoints: &[Endpoint]) -> Vec<EndpointAddr> {
    let ready: Vec<_> = endpoints.iter().filter(|e| e.conditions.ready).map(|e| e.addr).collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints.iter().filter(|e| e.conditions.serving && e.conditions.terminating).map(|e| e.addr).collect()
}

/// The selection state of one service port.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<EndpointAddr>,
    next: AtomicUsize,
}

impl Balancer {
    pub fn new(endpoints: Vec<EndpointAddr>) -> Self {
        Self { endpoints, next: AtomicUsize::new(0) }
    }

    /// The endpoints this balancer chooses from, in rotation order.
    pub fn endpoints(&self) -> &[EndpointAddr] {
        &self.endpoints
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The ordered candidates for one new connection from `client`.
    pub fn pick(&self, _client: ClientAddr, _now: Instant) -> Candidates {
        let n = self.endpoints.len();
        if n == 0 {
            return Candidates { start: 0, len: 0, taken: 0 };
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        Candidates { start, len: MAX_ATTEMPTS, taken: 0 }
    }

    /// The endpoint a candidate index stands for.
    pub fn endpoint(&self, candidate: usize) -> Option<EndpointAddr> {
        self.endpoints.get(candidate).copied()
    }
}

/// The endpoints to try for one connection, best first. Holds indices into
/// its [`Balancer`], so it is `Copy` and lives inside a connection's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidates {
    start: usize,
    len: usize,
    taken: usize,
}

impl Candidates {
    /// The next endpoint to try, as an index for [`Balancer::endpoint`].
    pub fn next_index(&mut self, balancer: &Balancer) -> Option<usize> {
        if self.taken >= self.len {
            return None;
        }
        let i = (self.start + self.taken) % balancer.endpoints.len();
        self.taken += 1;
        Some(i)
    }

    /// How many candidates were handed out so far (the attempt number).
    pub fn attempts(&self) -> usize {
        self.taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Conditions;
    use std::net::SocketAddr;

    fn addr(port: u16) -> EndpointAddr {
        EndpointAddr(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn client() -> ClientAddr {
        ClientAddr(SocketAddr::from(([127, 0, 0, 9], 40000)))
    }

    fn endpoint(port: u16, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addr: addr(port),
            conditions: Conditions { ready, serving, terminating },
            node_name: None,
            zone: None,
            hints_zones: vec![],
            hints_nodes: vec![],
        }
    }

    fn first(b: &Balancer) -> EndpointAddr {
        let mut c = b.pick(client(), Instant::now());
        b.endpoint(c.next_index(b).expect("a candidate")).expect("in range")
    }

    #[test]
    fn three_endpoints_rotate_a_b_c_a() {
        let b = Balancer::new(vec![addr(1), addr(2), addr(3)]);
        let got: Vec<_> = (0..4).map(|_| first(&b)).collect();
        assert_eq!(got, vec![addr(1), addr(2), addr(3), addr(1)]);
    }

    #[test]
    fn single_endpoint_is_returned_every_time() {
        let b = Balancer::new(vec![addr(7)]);
        assert!((0..5).all(|_| first(&b) == addr(7)));
    }

    #[test]
    fn empty_balancer_yields_no_candidate() {
        let b = Balancer::new(vec![]);
        assert_eq!(b.pick(client(), Instant::now()).next_index(&b), None);
    }

    fn all_candidates(b: &Balancer) -> Vec<usize> {
        let mut c = b.pick(client(), Instant::now());
        std::iter::from_fn(|| c.next_index(b)).collect()
    }

    #[test]
    fn candidates_are_distinct_and_capped_at_max_attempts() {
        let b = Balancer::new((1..=6).map(addr).collect());
        let seen = all_candidates(&b);
        assert_eq!(seen, vec![0, 1, 2, 3]);
    }

    #[test]
    fn fewer_endpoints_than_attempts_are_cycled() {
        let b = Balancer::new(vec![addr(1), addr(2)]);
        assert_eq!(all_candidates(&b), vec![0, 1, 0, 1]);
        assert_eq!(all_candidates(&b), vec![1, 0, 1, 0]);
    }

    #[test]
    fn ready_endpoints_win_over_terminating_ones() {
        let eps = [endpoint(1, true, true, false), endpoint(2, false, true, true)];
        assert_eq!(usable(&eps), vec![addr(1)]);
    }

    #[test]
    fn serving_terminating_endpoints_are_used_when_none_is_ready() {
        let eps = [endpoint(1, false, true, true), endpoint(2, false, false, true)];
        assert_eq!(usable(&eps), vec![addr(1)]);
    }
}
