//! Endpoint selection for one service port: pure logic, no I/O. The time is
//! passed in, so every behaviour can be tested with a fake clock.
//!
//! For one new connection, [`Balancer::pick`] chooses the first candidate;
//! retry on connect failure is then "take the next candidate"
//! ([`Balancer::next_candidate`], after pingora's selection iterator), chosen
//! when it is needed. The outcome of each attempt is reported
//! back ([`Balancer::connected`], [`Balancer::failed`], [`Balancer::closed`])
//! and feeds passive health, session affinity and least-connections.
//!
//! Order of one pick:
//! 1. With ClientIP affinity, a live pin to an endpoint that is still
//!    eligible and not ejected comes first (and its window slides).
//! 2. Otherwise the scheduler chooses (rr, random, lc, p2c, sh, maglev),
//!    skipping ejected endpoints; with affinity the choice is pinned.
//! 3. Each retry asks the scheduler again as if the endpoints already tried
//!    and the ejected ones were absent (round robin: the next rotation
//!    index), so a failed endpoint's share spreads over all survivors; when
//!    fewer healthy endpoints exist than attempts, they are cycled; when
//!    none is healthy, all are tried (health never fails a service closed).
//!
//! Invariants:
//! - A balancer is shared by every worker (through the snapshot); its
//!   mutable state is atomic or briefly locked (affinity shards), so workers
//!   never wait on each other for long, and round robin is fair across all
//!   workers together.
//! - A balancer is rebuilt only when its inputs change; the rebuild
//!   reshuffles the rotation and keeps the pins to endpoints that remain.
//! - A service port's internal and external traffic share one balancer
//!   ([`Balancer::build_pair`]) when their inputs are equal (the common
//!   case: both traffic policies `Cluster`): one rotation and one affinity
//!   pin table for both scopes, as kube-proxy's userspace mode had one
//!   balancer per service port. They split when the inputs differ (a
//!   `Local` policy), each then with its own copy of the pins, and join
//!   again when the inputs are equal again. A side whose inputs did not
//!   change keeps its balancer whole through a split or a rejoin.

pub mod affinity;
pub mod eligible;
mod endpoints;
pub mod health;
pub mod maglev;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use serde::Serialize;

use self::affinity::Pins;
use self::eligible::{Locality, Scope};
use self::endpoints::Slot;
use self::health::{EndpointState, HealthCells, HealthRegistry, HealthView};
use self::maglev::Maglev;
use crate::model::{Affinity, ClientAddr, EndpointAddr, Protocol, Scheduler, ServicePort};

/// Most attempts one connection may make.
pub const MAX_ATTEMPTS: usize = 8;

/// Process-wide selection settings (from the command line).
#[derive(Clone, Debug, Default)]
pub struct BalanceOptions {
    /// `--scheduler`: for service ports without `ringport.io/scheduler`.
    pub scheduler: Scheduler,
    pub locality: Locality,
}

/// Everything that decides a balancer; equal inputs mean the same balancer.
/// Made for each build and compared with what a balancer holds
/// ([`Balancer::serves`]); a balancer keeps its endpoints once.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inputs {
    /// Eligible endpoints, in address order, each once.
    endpoints: Vec<EndpointAddr>,
    /// Health and load are kept per protocol (see `health.rs`).
    protocol: Protocol,
    scheduler: Scheduler,
    affinity: Affinity,
}

impl Inputs {
    fn of(sp: &ServicePort, scope: Scope, opts: &BalanceOptions) -> Self {
        let mut endpoints = eligible::eligible(sp, scope, &opts.locality);
        // Already so from the join; kept so here, as the balancer finds an
        // endpoint by a binary search.
        endpoints.sort_unstable();
        endpoints.dedup();
        Self {
            endpoints,
            protocol: sp.protocol,
            scheduler: sp.scheduler.unwrap_or(opts.scheduler),
            affinity: sp.affinity,
        }
    }
}

/// The selection state of one service port for one traffic scope (or
/// both: [`Balancer::build_pair`]).
#[derive(Debug)]
pub struct Balancer {
    /// The eligible endpoints in address order, a candidate an index into
    /// it; each slot also holds the rotation's entry at its position.
    endpoints: Box<[Slot]>,
    /// The endpoints' health states, by candidate index, once they matter.
    health: HealthCells,
    /// Maglev's lookup table (Maglev's alone, and only with endpoints).
    maglev: Option<Box<Maglev>>,
    /// Health and load are kept per protocol (see `health.rs`).
    protocol: Protocol,
    scheduler: Scheduler,
    /// Where the endpoints' states are made when they first matter.
    registry: HealthRegistry,
    /// The next position of the rotation, over all workers. 32 bits keep
    /// the balancer at 64 bytes; it wraps after 4 billion picks, when the
    /// rotation restarts from its first position once.
    next: AtomicU32,
    pins: Option<Arc<Pins>>,
}

impl Balancer {
    /// The balancer for `sp`'s `scope` traffic: `previous` itself when its
    /// inputs are unchanged, otherwise a new one (reshuffled, keeping the
    /// pins to endpoints that remain).
    pub fn build(
        sp: &ServicePort,
        scope: Scope,
        opts: &BalanceOptions,
        registry: &HealthRegistry,
        previous: Option<&Arc<Balancer>>,
    ) -> Arc<Balancer> {
        let inputs = Inputs::of(sp, scope, opts);
        let pins = previous.and_then(|p| p.pins.clone());
        Self::reuse_or_new(inputs, registry, previous, pins)
    }

    /// `[internal, external]` for `sp`: one balancer for both scopes when
    /// their inputs are equal (module header), else one each. `previous`
    /// is the pair of the port's previous version. A side whose inputs
    /// equal a previous balancer's keeps that balancer whole (rotation and
    /// pins); a pair that splits gives the side that changed a copy of the
    /// shared pins, taken before any are dropped; a pair that rejoins keeps
    /// the balancer whose inputs did not change and takes in the other's
    /// pins to endpoints it has ([`Pins::merge`]: the later-used pin wins).
    pub fn build_pair(
        sp: &ServicePort,
        opts: &BalanceOptions,
        registry: &HealthRegistry,
        previous: Option<&[Arc<Balancer>; 2]>,
    ) -> [Arc<Balancer>; 2] {
        let internal = Inputs::of(sp, Scope::Internal, opts);
        let external = Inputs::of(sp, Scope::External, opts);
        let [old_internal, old_external] = previous.map_or([None, None], |[i, e]| [Some(i), Some(e)]);
        let shared = previous.filter(|[i, e]| Arc::ptr_eq(i, e)).map(|[s, _]| s);
        let own_pins = |b: Option<&Arc<Balancer>>| b.and_then(|b| b.pins.clone());
        if internal == external {
            let unchanged = [old_internal, old_external].into_iter().flatten().find(|b| b.serves(&internal));
            let joined = match unchanged {
                Some(b) => Arc::clone(b),
                None => Self::reuse_or_new(internal, registry, old_internal, own_pins(old_internal)),
            };
            if shared.is_none() {
                // The pair rejoins: the other side's pins come along.
                for other in [old_internal, old_external].into_iter().flatten() {
                    if !Arc::ptr_eq(other, &joined)
                        && let (Some(into), Some(from)) = (&joined.pins, &other.pins)
                    {
                        into.merge(from, |e| joined.position(e).is_some());
                    }
                }
            }
            return [Arc::clone(&joined), joined];
        }
        let Some(shared) = shared else {
            return [
                Self::reuse_or_new(internal, registry, old_internal, own_pins(old_internal)),
                Self::reuse_or_new(external, registry, old_external, own_pins(old_external)),
            ];
        };
        // The pair splits. The copy is taken before `new` drops the pins
        // to endpoints a side no longer has (it does so in place).
        let copy = || shared.pins.as_ref().map(|p| Arc::new(p.copy()));
        let new = |inputs, pins| {
            Arc::new(Self::new(inputs, registry, Some(shared), pins, &mut fastrand::Rng::new()))
        };
        if shared.serves(&external) {
            [new(internal, copy()), Arc::clone(shared)]
        } else {
            let copy = copy();
            [Self::reuse_or_new(internal, registry, Some(shared), shared.pins.clone()), new(external, copy)]
        }
    }

    /// `previous` itself when its inputs equal `inputs`, else a new
    /// balancer (reshuffled, with `pins` for its affinity).
    fn reuse_or_new(
        inputs: Inputs,
        registry: &HealthRegistry,
        previous: Option<&Arc<Balancer>>,
        pins: Option<Arc<Pins>>,
    ) -> Arc<Balancer> {
        if let Some(prev) = previous
            && prev.serves(&inputs)
        {
            return Arc::clone(prev);
        }
        let previous = previous.map(AsRef::as_ref);
        Arc::new(Self::new(inputs, registry, previous, pins, &mut fastrand::Rng::new()))
    }

    fn new(
        inputs: Inputs,
        registry: &HealthRegistry,
        previous: Option<&Balancer>,
        pins: Option<Arc<Pins>>,
        rng: &mut fastrand::Rng,
    ) -> Self {
        let Inputs { mut endpoints, protocol, scheduler, affinity } = inputs;
        // Candidates index endpoints in a u32 (see `slot`).
        endpoints.truncate(MAX_ENDPOINTS);
        // Round robin's and least-connections' rotation is a shuffle of
        // the candidate indices; the others use address order (random
        // draws need no other, and the hashing schedulers use it, so every
        // rebuild hashes alike).
        let mut rotation: Vec<u32> = (0..endpoints.len()).map(slot).collect();
        let mut maglev = None;
        match scheduler {
            Scheduler::Rr | Scheduler::Lc => rng.shuffle(&mut rotation),
            Scheduler::Maglev => {
                // After a removal, keep the survivors' slots (only the
                // removed endpoints' clients move); otherwise build afresh.
                let shrunk = previous.and_then(|p| {
                    let table = p.maglev.as_ref()?;
                    let old: Vec<EndpointAddr> = p.endpoints.iter().map(Slot::addr).collect();
                    table.shrink(&old, &endpoints)
                });
                maglev = shrunk.or_else(|| Maglev::new(&endpoints)).map(Box::new);
            }
            _ => {}
        }
        let pins = match affinity {
            Affinity::None => None,
            Affinity::ClientIp { timeout } => Some(match pins {
                Some(p) if p.timeout() == timeout => {
                    p.retain(&endpoints.iter().copied().collect::<HashSet<_>>());
                    p
                }
                _ => Arc::new(Pins::new(timeout)),
            }),
        };
        Self {
            health: HealthCells::new(registry, protocol, &endpoints),
            endpoints: endpoints.iter().zip(rotation).map(|(e, r)| Slot::new(*e, r)).collect(),
            maglev,
            protocol,
            scheduler,
            registry: registry.clone(),
            next: AtomicU32::new(0),
            pins,
        }
    }

    /// Whether this balancer is the one `inputs` make (its rotation aside).
    fn serves(&self, inputs: &Inputs) -> bool {
        self.protocol == inputs.protocol
            && self.scheduler == inputs.scheduler
            && self.affinity() == inputs.affinity
            && self.endpoints.len() == inputs.endpoints.len().min(MAX_ENDPOINTS)
            && self.endpoints.iter().zip(&inputs.endpoints).all(|(e, i)| e.addr() == *i)
    }

    /// Its session affinity: told by its pins, which it has with ClientIP
    /// affinity alone, and whose timeout is the affinity's (16 bytes a
    /// balancer need not keep).
    fn affinity(&self) -> Affinity {
        match &self.pins {
            Some(pins) => Affinity::ClientIp { timeout: pins.timeout() },
            None => Affinity::None,
        }
    }

    /// The endpoint at position `at` of the rotation.
    fn rotated(&self, at: usize) -> usize {
        self.endpoints.get(at).map_or(at, |s| s.rotated as usize)
    }

    /// Endpoint `i`'s state, made on its first use.
    fn state(&self, i: usize) -> Option<&EndpointState> {
        let addr = self.endpoints.get(i)?.addr();
        self.health.state(i, self.endpoints.len(), addr, &self.registry, self.protocol)
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The candidate index of `endpoint`, if the balancer has it.
    fn position(&self, endpoint: EndpointAddr) -> Option<usize> {
        self.endpoints.binary_search_by(|e| e.addr().cmp(&endpoint)).ok()
    }

    /// The endpoints in rotation order.
    pub fn endpoints(&self) -> impl Iterator<Item = EndpointAddr> + '_ {
        (0..self.endpoints.len()).map(|at| self.endpoints[self.rotated(at)].addr())
    }

    /// The endpoint a candidate index stands for.
    pub fn endpoint(&self, candidate: usize) -> Option<EndpointAddr> {
        self.endpoints.get(candidate).map(Slot::addr)
    }

    /// The candidates for one new connection from `client`, at most
    /// `attempts` of them: the first is chosen now (pin or scheduler), each
    /// retry when [`Balancer::next_candidate`] asks for it.
    pub fn pick(&self, client: ClientAddr, now: Instant, attempts: usize) -> Candidates {
        let ip = client.0.ip();
        let mut c = Candidates { client: ip, tried: [0; MAX_ATTEMPTS], len: 0, taken: 0 };
        if self.endpoints.is_empty() || attempts == 0 {
            return c;
        }
        let first = match &self.pins {
            Some(pins) => pins
                .pinned_or(
                    ip,
                    now,
                    |e| self.position(e).is_some_and(|i| !self.ejected(i, now)),
                    || self.endpoint(self.first_choice(ip, now)),
                )
                .and_then(|e| self.position(e))
                .unwrap_or(0),
            None => self.first_choice(ip, now),
        };
        c.tried[0] = slot(first);
        c.len = attempts.min(MAX_ATTEMPTS) as u8;
        c
    }

    /// The next endpoint to try for `c`, as an index for
    /// [`Balancer::endpoint`]; `None` when its attempts are spent.
    ///
    /// A retry asks the scheduler again, as if the endpoints already tried
    /// (and the ejected ones) were absent: round robin moves on to the next
    /// index of the shared rotation, like userspace mode, so a dead
    /// endpoint's share spreads over all survivors instead of falling to its
    /// neighbour. With fewer healthy endpoints than attempts, those tried
    /// are cycled; with none healthy, every endpoint is tried.
    pub fn next_candidate(&self, c: &mut Candidates, now: Instant) -> Option<usize> {
        let k = usize::from(c.taken);
        if k >= usize::from(c.len) {
            return None;
        }
        if k > 0 {
            let tried = c.tried;
            let untried = |i: usize| !tried[..k].contains(&slot(i));
            let salt = k as u64;
            let next = self
                .choose(c.client, salt, |i| untried(i) && !self.ejected(i, now))
                .or_else(|| {
                    let none_healthy = (0..self.endpoints.len()).all(|i| self.ejected(i, now));
                    none_healthy.then(|| self.choose(c.client, salt, untried)).flatten()
                })
                .unwrap_or_else(|| {
                    // Every candidate worth trying was tried: cycle them.
                    let distinct = (1..k).find(|&j| tried[..j].contains(&tried[j])).unwrap_or(k);
                    tried[k % distinct] as usize
                });
            c.tried[k] = slot(next);
        }
        c.taken += 1;
        Some(c.tried[k] as usize)
    }

    fn ejected(&self, i: usize, now: Instant) -> bool {
        self.health.existing(i).is_some_and(|s| s.is_ejected(now))
    }

    /// The scheduler's first choice among the healthy endpoints, or among
    /// all of them when none is healthy.
    fn first_choice(&self, client: IpAddr, now: Instant) -> usize {
        self.choose(client, 0, |i| !self.ejected(i, now))
            .or_else(|| self.choose(client, 0, |_| true))
            .unwrap_or(0)
    }

    /// The scheduler's choice among the endpoints `allowed` lets through,
    /// as if the others were absent. `salt` varies the hash schedulers'
    /// choice between attempts (the same client always gets the same
    /// sequence). `None` only when nothing is allowed.
    fn choose(&self, client: IpAddr, salt: u64, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.endpoints.len();
        let active = |i: usize| self.health.existing(i).map_or(0, EndpointState::active);
        // The next position of the rotation (a candidate index for `rotated`).
        let turn = || self.next.fetch_add(1, Ordering::Relaxed) as usize % n;
        let rr = || self.rotated(turn());
        let hashed = |t: u64| {
            let h = match (salt, t) {
                (0, 0) => hash_ip(client),
                _ => hash_ip_seeded(client, (salt << 32) | t),
            };
            match &self.maglev {
                Some(m) => m.lookup(h),
                None => (h % n as u64) as usize,
            }
        };
        // Draw up to n times, skipping what is not allowed; round robin thus
        // takes the next rotation index, which keeps it fair over the
        // survivors. Then scan on from the last draw, so one allowed
        // endpoint is always found.
        let draw = |f: &dyn Fn(u64) -> usize| {
            let mut last = 0;
            for t in 0..n as u64 {
                last = f(t);
                if allowed(last) {
                    return Some(last);
                }
            }
            (1..n).map(|k| (last + k) % n).find(|&i| allowed(i))
        };
        match self.scheduler {
            Scheduler::Rr => draw(&|_| rr()),
            Scheduler::Random => draw(&|_| fastrand::usize(..n)),
            Scheduler::Lc => {
                // Ties go round robin, so equal loads still spread.
                let start = turn();
                let order = (0..n).map(|k| self.rotated((start + k) % n));
                order.filter(|&i| allowed(i)).min_by_key(|&i| active(i))
            }
            Scheduler::P2c => {
                let a = draw(&|_| fastrand::usize(..n))?;
                let b = (n > 1)
                    .then(|| {
                        let other = |_: u64| (a + 1 + fastrand::usize(..n - 1)) % n;
                        (0..n as u64).map(other).find(|&i| allowed(i))
                    })
                    .flatten()
                    .unwrap_or(a);
                Some(if active(b) < active(a) { b } else { a })
            }
            Scheduler::Sh | Scheduler::Maglev => draw(&hashed),
        }
    }

    /// A connect to candidate `i` is about to start.
    pub fn attempting(&self, i: usize) {
        if let Some(e) = self.state(i) {
            e.attempted();
        }
    }

    /// The connect to candidate `i` succeeded: it is healthy, holds one more
    /// active connection, and (with affinity) becomes the client's pin.
    /// True when this readmits an endpoint that had been ejected.
    pub fn connected(&self, client: ClientAddr, i: usize, now: Instant) -> bool {
        let readmitted = self.answered(i);
        self.flow_opened(client, i, now);
        readmitted
    }

    /// A UDP flow to candidate `i` opened: it counts as active and (with
    /// affinity) becomes the client's pin; health waits for an answer.
    pub fn flow_opened(&self, client: ClientAddr, i: usize, now: Instant) {
        let (Some(e), Some(addr)) = (self.state(i), self.endpoint(i)) else { return };
        e.opened();
        if let Some(pins) = &self.pins
            && pins.get(client.0.ip(), now) != Some(addr)
        {
            pins.repin(client.0.ip(), addr, now);
        }
    }

    /// Candidate `i` answered a datagram: it is healthy. True when this
    /// readmits an endpoint that had been ejected.
    pub fn answered(&self, i: usize) -> bool {
        self.state(i).is_some_and(EndpointState::succeeded)
    }

    /// The connect to candidate `i` failed: count it for passive health and
    /// reset the client's pin if it pointed there. True if now ejected.
    pub fn failed(&self, client: ClientAddr, i: usize, now: Instant) -> bool {
        let (Some(e), Some(addr)) = (self.state(i), self.endpoint(i)) else { return false };
        if let Some(pins) = &self.pins {
            pins.unpin(client.0.ip(), addr);
        }
        e.failed(now)
    }

    /// A connection counted by [`Balancer::connected`] ended.
    pub fn closed(&self, i: usize) {
        // A connection counted was counted in a state: an empty cell has
        // nothing to close.
        if let Some(e) = self.health.existing(i) {
            e.closed();
        }
    }

    /// The client's live pin, if any.
    pub fn pin(&self, client: IpAddr, now: Instant) -> Option<EndpointAddr> {
        self.pins.as_ref().and_then(|p| p.get(client, now))
    }

    /// Each endpoint with its health, in candidate (address) order, for
    /// `/debug/snapshot`; zeros for an endpoint that never mattered to
    /// any balancer.
    pub fn view(&self, now: Instant) -> BalancerView {
        BalancerView {
            scheduler: self.scheduler,
            pins: self.pins.as_ref().map_or(0, |p| p.len()),
            endpoints: self
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| (e.addr(), self.health.view(i, e.addr(), &self.registry, self.protocol, now)))
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BalancerView {
    pub scheduler: Scheduler,
    pub pins: usize,
    pub endpoints: Vec<(EndpointAddr, HealthView)>,
}

/// The most endpoints one balancer holds: its indices fit a
/// [`Candidates`] slot (the rest of a larger set is never chosen).
const MAX_ENDPOINTS: usize = u32::MAX as usize;

/// An endpoint index as [`Candidates`] keeps it: lossless, as a balancer
/// holds at most [`MAX_ENDPOINTS`] (past it, an index that can never be
/// tried).
fn slot(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// The endpoints tried so far for one connection, and how many it may try.
/// Holds indices into its [`Balancer`], so it is `Copy` and lives inside a
/// connection's state; [`Balancer::next_candidate`] hands out the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidates {
    client: IpAddr,
    tried: [u32; MAX_ATTEMPTS],
    len: u8,
    taken: u8,
}

impl Candidates {
    /// How many candidates were handed out so far (the attempt number).
    pub fn attempts(&self) -> usize {
        usize::from(self.taken)
    }
}

/// A stable 64-bit hash (FNV-1a with a splitmix64 finish): the same on
/// every worker, every run and every build, unlike std's `RandomState`.
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// [`hash_bytes`] of a client address.
pub fn hash_ip(ip: IpAddr) -> u64 {
    hash_ip_seeded(ip, 0)
}

fn hash_ip_seeded(ip: IpAddr, seed: u64) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(&v4.octets(), seed),
        IpAddr::V6(v6) => hash_bytes(&v6.octets(), seed),
    }
}

#[cfg(test)]
mod pair_tests;
#[cfg(test)]
mod state_tests;
#[cfg(test)]
mod tests;
