//! Passive health and load of each endpoint, shared by every worker and
//! every snapshot.
//!
//! An endpoint that fails `failures` consecutive connects is ejected for a
//! back-off that doubles with each ejection (1 s, 2 s, ... capped at 30 s by
//! default). It is readmitted when the back-off ends, on probation: until a
//! connect to it succeeds, a single failure ejects it again (so a dead
//! endpoint costs one attempt per back-off, not `failures`). A successful
//! connect readmits it at once and resets the back-off. Failures while it
//! is ejected (connects begun before) neither count nor eject it again;
//! of workers failing or succeeding at once, exactly one ejects or
//! readmits. Ejection only ever
//! reorders candidates: when every endpoint is ejected, all are tried
//! (health alone never fails a service closed).
//!
//! Invariants:
//! - One [`EndpointState`] per protocol and endpoint address for the whole
//!   process (through [`HealthRegistry`]), so ejection and active-connection
//!   counts survive reloads and are the same for every worker.
//! - A state exists only once it matters: a balancer's [`HealthCells`]
//!   are one empty pointer until its first attempt (most of 100k service
//!   ports never see a connection), then a cell per endpoint, empty until
//!   that endpoint's first attempt. An empty cell reads as a fresh state
//!   would (admitted, nothing active), with no lock and no write. Its
//!   first use takes the registry's lock once, to find the state
//!   another balancer made or to make it; a balancer built while an older
//!   one holds a state takes it at build, so an ejection or a count
//!   survives the reload. (A state made by an older balancer after a newer
//!   one was built reaches the newer one at its own first use of that
//!   endpoint, if the older balancer still holds it then. If the older
//!   balancer is dropped first, that state goes with it, and the newer one
//!   starts the endpoint afresh: failures counted, or an ejection made, in
//!   the moments between a snapshot's build and its publication can be
//!   lost, and the endpoint takes `failures` attempts to be ejected again.)
//! - TCP and UDP never share a state: a UDP endpoint's ICMP port-unreachable
//!   says nothing about the TCP server on the same `ip:port` (DNS on 53,
//!   HTTPS and QUIC on 443), so it must not eject it, move its pins, or
//!   weigh in its least-connections count.
//! - Everything mutable is atomic: workers never block each other here.
//! - Time is passed in; nothing here reads a clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::model::{EndpointAddr, Protocol};

/// When to eject an endpoint, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Consecutive connect failures that eject an endpoint (0: never eject).
    pub failures: u32,
    /// The first ejection's length; each further one doubles it.
    pub base: Duration,
    pub max: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self { failures: 3, base: Duration::from_secs(1), max: Duration::from_secs(30) }
    }
}

/// What every state of one registry shares: kept once, not per endpoint
/// (a process holds one state per endpoint address, hundreds of
/// thousands at scale).
#[derive(Debug)]
struct Settings {
    epoch: Instant,
    policy: HealthPolicy,
}

/// Health and load of one endpoint address (the address is its
/// balancer's and the registry's key, not kept here).
#[derive(Debug)]
pub struct EndpointState {
    settings: Arc<Settings>,
    /// Consecutive failures since the last success or ejection.
    failures: AtomicU32,
    /// Ejections since the last success (sets the back-off).
    ejections: AtomicU32,
    /// Every ejection since it was first seen (never reset).
    ejections_total: AtomicU64,
    /// Nanoseconds after `epoch` until which the endpoint is skipped.
    ejected_until: AtomicU64,
    /// Connections to it open right now, over all workers.
    active: AtomicU32,
    attempts: AtomicU64,
    failures_total: AtomicU64,
}

/// A point-in-time view, for `/debug/snapshot` and tests.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HealthView {
    pub ejected: bool,
    pub consecutive_failures: u32,
    /// Ejections since the last success (the back-off's exponent).
    pub ejections: u32,
    /// Every ejection, never reset.
    #[serde(default)]
    pub ejections_total: u64,
    pub active: u32,
    pub attempts: u64,
    pub failures: u64,
}

impl EndpointState {
    fn new(settings: Arc<Settings>) -> Self {
        Self {
            settings,
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejections_total: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            active: AtomicU32::new(0),
            attempts: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.settings.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.nanos(now) < self.ejected_until.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// A connect to this endpoint is about to be tried.
    pub fn attempted(&self) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// A connect succeeded: readmit at once, forget past failures, and count
    /// the connection as active until [`EndpointState::closed`].
    pub fn connected(&self) -> bool {
        let readmitted = self.succeeded();
        self.opened();
        readmitted
    }

    /// The endpoint answered: readmit at once and forget past failures.
    /// True when this readmits an endpoint that had been ejected; of
    /// workers succeeding at once, exactly one (the one that swaps the
    /// ejection count to zero) reports it.
    pub fn succeeded(&self) -> bool {
        // The common case (healthy) only reads.
        if self.failures.load(Ordering::Relaxed) == 0 && self.ejections.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        let readmitted = self.ejections.swap(0, Ordering::AcqRel) != 0;
        if readmitted {
            self.ejected_until.store(0, Ordering::Relaxed);
        }
        readmitted
    }

    /// One more connection or flow to it, until [`EndpointState::closed`].
    pub fn opened(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection counted by [`EndpointState::connected`] ended.
    pub fn closed(&self) {
        // Saturating: a count can never go below zero, even if misused.
        let _ = self.active.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// A connect failed (refused, reset or timed out). True when this
    /// failure ejected the endpoint: of failures crossing the threshold at
    /// once, exactly one (the one that resets the count it reached) ejects.
    pub fn failed(&self, now: Instant) -> bool {
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        // A connect begun before the ejection, failing during it, says
        // nothing new: it must not eject again and double the back-off.
        let until_seen = self.ejected_until.load(Ordering::Acquire);
        if self.nanos(now) < until_seen {
            return false;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        // Readmitted after an ejection but not yet proven by a success, one
        // failure is enough to eject again (a half-open probe).
        let ejections = self.ejections.load(Ordering::Acquire);
        let policy = &self.settings.policy;
        let threshold = if ejections > 0 { 1 } else { policy.failures };
        if policy.failures == 0 || failures < threshold {
            return false;
        }
        let backoff = policy.base.saturating_mul(1u32 << ejections.min(16)).min(policy.max);
        let until = self.nanos(now).saturating_add(u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX));
        // Of failures crossing the threshold at once, the one that moves
        // the deadline from what it saw ejects; the others were part of
        // the same burst (or a success came between).
        if self
            .ejected_until
            .compare_exchange(until_seen, until, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::AcqRel);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn view(&self, now: Instant) -> HealthView {
        HealthView {
            ejected: self.is_ejected(now),
            consecutive_failures: self.failures.load(Ordering::Relaxed),
            ejections: self.ejections.load(Ordering::Relaxed),
            ejections_total: self.ejections_total.load(Ordering::Relaxed),
            active: self.active(),
            attempts: self.attempts.load(Ordering::Relaxed),
            failures: self.failures_total.load(Ordering::Relaxed),
        }
    }
}

/// Hands out the one [`EndpointState`] of each protocol and address. Cheap
/// to clone (one shared registry): the control plane holds it, and each
/// balancer a clone, to make its endpoints' states when they first matter.
#[derive(Debug, Clone)]
pub struct HealthRegistry {
    shared: Arc<Registry>,
}

#[derive(Debug)]
struct Registry {
    settings: Arc<Settings>,
    states: Mutex<HashMap<(Protocol, EndpointAddr), Weak<EndpointState>>>,
}

type States = HashMap<(Protocol, EndpointAddr), Weak<EndpointState>>;

impl HealthRegistry {
    pub fn new(policy: HealthPolicy, epoch: Instant) -> Self {
        let settings = Arc::new(Settings { epoch, policy });
        Self { shared: Arc::new(Registry { settings, states: Mutex::new(HashMap::new()) }) }
    }

    fn states(&self) -> std::sync::MutexGuard<'_, States> {
        self.shared.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of `addr` for `protocol` traffic: the existing one while
    /// anything holds it, else a new one.
    pub fn state(&self, protocol: Protocol, addr: EndpointAddr) -> Arc<EndpointState> {
        let mut states = self.states();
        if let Some(state) = states.get(&(protocol, addr)).and_then(Weak::upgrade) {
            return state;
        }
        let state = Arc::new(EndpointState::new(Arc::clone(&self.shared.settings)));
        states.insert((protocol, addr), Arc::downgrade(&state));
        state
    }

    /// The states something holds of `addrs`, in their order, under one
    /// lock; `None` when it holds none of them (then nothing is made).
    fn held(&self, protocol: Protocol, addrs: &[EndpointAddr]) -> Option<Box<[Cell]>> {
        let states = self.states();
        let held = |a: &EndpointAddr| states.get(&(protocol, *a)).and_then(Weak::upgrade);
        addrs.iter().any(|a| held(a).is_some()).then(|| {
            addrs
                .iter()
                .map(|a| {
                    let cell = Cell::new();
                    if let Some(state) = held(a) {
                        let _ = cell.set(state);
                    }
                    cell
                })
                .collect()
        })
    }

    /// The state some balancer holds for `addr`, if any (none is made).
    pub fn existing(&self, protocol: Protocol, addr: EndpointAddr) -> Option<Arc<EndpointState>> {
        self.states().get(&(protocol, addr)).and_then(Weak::upgrade)
    }

    /// Forget these addresses where no balancer holds them any more.
    pub fn forget(&self, addrs: impl IntoIterator<Item = (Protocol, EndpointAddr)>) {
        let mut states = self.states();
        for key in addrs {
            if states.get(&key).is_some_and(|s| s.strong_count() == 0) {
                states.remove(&key);
            }
        }
    }

    /// Forget addresses no balancer holds any more.
    pub fn prune(&self) {
        self.states().retain(|_, s| s.strong_count() > 0);
    }

    /// How many states the registry knows of (held or not yet forgotten).
    pub fn len(&self) -> usize {
        self.states().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One endpoint's state, once it matters.
type Cell = OnceLock<Arc<EndpointState>>;

/// The states of a balancer's endpoints, by candidate index: none at all
/// until the first of them matters (most of 100k service ports never see
/// a connection), then a cell for each, filled at each one's first use.
/// Reads of an empty cell see a fresh state's values (module header).
#[derive(Debug, Default)]
pub struct HealthCells {
    /// Boxed twice, so that a balancer pays one pointer for its states
    /// until they are made.
    cells: OnceLock<Box<Cells>>,
}

#[derive(Debug)]
struct Cells {
    states: Box<[Cell]>,
}

impl HealthCells {
    /// The cells of a balancer of `addrs` (its endpoints, by candidate
    /// index), holding the states something already holds (a previous
    /// balancer's), so an ejection or a count survives a reload.
    pub fn new(registry: &HealthRegistry, protocol: Protocol, addrs: &[EndpointAddr]) -> Self {
        let cells = OnceLock::new();
        if let Some(states) = registry.held(protocol, addrs) {
            let _ = cells.set(Box::new(Cells { states }));
        }
        Self { cells }
    }

    /// Endpoint `i`'s state, if it has mattered yet.
    pub fn existing(&self, i: usize) -> Option<&EndpointState> {
        self.cells.get()?.states.get(i)?.get().map(|s| &**s)
    }

    /// Endpoint `i`'s state (its address `addr`, one of `len`), made or
    /// found in `registry` on first use; `None` past the last endpoint.
    /// Workers racing to fill one cell get the same state, and so do
    /// balancers racing to fill cells of the same protocol and address
    /// (the registry's lock decides).
    pub fn state(
        &self,
        i: usize,
        len: usize,
        addr: EndpointAddr,
        registry: &HealthRegistry,
        protocol: Protocol,
    ) -> Option<&EndpointState> {
        let cells =
            self.cells.get_or_init(|| Box::new(Cells { states: (0..len).map(|_| Cell::new()).collect() }));
        Some(cells.states.get(i)?.get_or_init(|| registry.state(protocol, addr)))
    }

    /// Whether any state is held (for tests).
    #[cfg(test)]
    pub fn made(&self) -> bool {
        self.cells.get().is_some()
    }

    /// For `/debug/snapshot` and `ringport status`: an empty cell shows the
    /// state another balancer made for the same address (the other scope
    /// of a `Local` policy, another Service on the same pod), so an
    /// endpoint ejected through one is not shown up through the other.
    pub fn view(
        &self,
        i: usize,
        addr: EndpointAddr,
        registry: &HealthRegistry,
        protocol: Protocol,
        now: Instant,
    ) -> HealthView {
        match self.existing(i) {
            Some(s) => s.view(now),
            None => registry.existing(protocol, addr).map_or_else(HealthView::default, |s| s.view(now)),
        }
    }
}

impl Default for HealthRegistry {
    fn default() -> Self {
        Self::new(HealthPolicy::default(), Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;

    fn state(t0: Instant) -> Arc<EndpointState> {
        let registry = HealthRegistry::new(HealthPolicy::default(), t0);
        registry.state(Protocol::Tcp, EndpointAddr(SocketAddr::from(([127, 0, 0, 1], 80))))
    }

    #[test]
    fn three_consecutive_failures_eject_for_a_doubling_backoff() {
        let t0 = Instant::now();
        let s = state(t0);
        assert!(!s.failed(t0));
        assert!(!s.failed(t0));
        assert!(s.failed(t0), "the third failure ejects");
        assert!(s.is_ejected(t0 + Duration::from_millis(999)));
        assert!(!s.is_ejected(t0 + Duration::from_millis(1001)), "readmitted after 1 s");
        let t1 = t0 + Duration::from_secs(2);
        assert!(s.failed(t1), "on probation, one failure ejects again");
        assert!(s.is_ejected(t1 + Duration::from_millis(1999)), "second ejection lasts 2 s");
        assert!(!s.is_ejected(t1 + Duration::from_millis(2001)));
    }

    #[test]
    fn backoff_is_capped_at_30_seconds() {
        let t0 = Instant::now();
        let s = state(t0);
        let mut t = t0;
        for _ in 0..10 {
            for _ in 0..3 {
                s.failed(t);
            }
            t += Duration::from_secs(60);
        }
        let last = t - Duration::from_secs(60);
        assert!(s.is_ejected(last + Duration::from_secs(29)));
        assert!(!s.is_ejected(last + Duration::from_millis(30_001)));
    }

    #[test]
    fn a_success_readmits_at_once_and_resets_the_backoff() {
        let t0 = Instant::now();
        let s = state(t0);
        for _ in 0..3 {
            s.failed(t0);
        }
        assert!(s.is_ejected(t0));
        s.connected();
        assert!(!s.is_ejected(t0));
        assert_eq!(s.view(t0).ejections, 0);
        assert_eq!(s.view(t0).ejections_total, 1, "the total survives readmission");
        assert_eq!(s.active(), 1);
        s.closed();
        s.closed();
        assert_eq!(s.active(), 0, "never below zero");
    }

    #[test]
    fn one_state_per_address_while_held() {
        let registry = HealthRegistry::default();
        let addr = EndpointAddr(SocketAddr::from(([127, 0, 0, 1], 80)));
        let a = registry.state(Protocol::Tcp, addr);
        assert!(Arc::ptr_eq(&a, &registry.state(Protocol::Tcp, addr)));
        drop(a);
        registry.prune();
        assert!(registry.is_empty());
    }

    #[test]
    fn udp_failures_never_touch_the_tcp_state_of_the_same_address() {
        let t0 = Instant::now();
        let registry = HealthRegistry::new(HealthPolicy::default(), t0);
        let addr = EndpointAddr(SocketAddr::from(([127, 0, 0, 2], 8080)));
        let (tcp, udp) = (registry.state(Protocol::Tcp, addr), registry.state(Protocol::Udp, addr));
        assert!(!Arc::ptr_eq(&tcp, &udp));
        tcp.opened();
        for _ in 0..3 {
            udp.failed(t0);
        }
        assert!(udp.is_ejected(t0));
        assert!(!tcp.is_ejected(t0), "UDP failures leave TCP admitted");
        assert_eq!(tcp.view(t0).failures, 0);
        assert_eq!((tcp.active(), udp.active()), (1, 0), "active counts are per protocol");
    }

    /// `rounds` fresh states, each hit by `threads` workers at once (one
    /// start per round); how many calls of each round returned true.
    fn at_once(
        rounds: usize,
        threads: usize,
        prepare: impl Fn(&EndpointState),
        hit: impl Fn(&EndpointState) -> bool + Sync,
    ) -> Vec<usize> {
        let t0 = Instant::now();
        let states: Vec<Arc<EndpointState>> = (0..rounds).map(|_| state(t0)).collect();
        states.iter().for_each(|s| prepare(s));
        // A spinning barrier: parked threads wake one by one, too far
        // apart to overlap.
        let arrived = AtomicU64::new(0);
        let wins: Vec<AtomicU32> = (0..rounds).map(|_| AtomicU32::new(0)).collect();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    for (round, (s, w)) in states.iter().zip(&wins).enumerate() {
                        let all = ((round + 1) * threads) as u64;
                        arrived.fetch_add(1, Ordering::AcqRel);
                        while arrived.load(Ordering::Acquire) < all {
                            std::hint::spin_loop();
                        }
                        if hit(s) {
                            w.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        wins.iter().map(|w| w.load(Ordering::Relaxed) as usize).collect()
    }

    #[test]
    fn failures_crossing_the_threshold_at_once_eject_exactly_once() {
        // Two failed, then two workers fail at once: counts 3 and 4 both
        // reach the threshold, but only one may eject (and double the
        // back-off).
        let t0 = Instant::now();
        let prepare = |s: &EndpointState| {
            s.failed(t0);
            s.failed(t0);
        };
        let wins = at_once(2000, 2, prepare, |s| s.failed(t0));
        assert!(
            wins.iter().all(|&w| w == 1),
            "ejections per round: {:?}",
            wins.iter().filter(|&&w| w != 1).collect::<Vec<_>>()
        );
    }

    #[test]
    fn successes_at_once_readmit_exactly_once() {
        let t0 = Instant::now();
        let prepare = |s: &EndpointState| {
            for _ in 0..3 {
                s.failed(t0);
            }
        };
        let wins = at_once(2000, 2, prepare, EndpointState::succeeded);
        assert!(
            wins.iter().all(|&w| w == 1),
            "readmissions per round: {:?}",
            wins.iter().filter(|&&w| w != 1).collect::<Vec<_>>()
        );
    }
}
