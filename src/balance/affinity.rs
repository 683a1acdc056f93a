//! ClientIP session affinity: which endpoint each client IP is pinned to.
//!
//! One [`Pins`] table per service port while its internal and external
//! traffic share one balancer (their inputs are equal), else one per
//! traffic scope (see `Balancer::build_pair`); shared by every worker: SO_REUSEPORT spreads one client's connections over all workers,
//! so affinity must hold for the whole process. The table is split into
//! shards by client IP, each behind its own mutex; a lock is held only for
//! one map lookup and insert per new connection of an affinity service.
//!
//! Invariants:
//! - Choosing and pinning happen under one shard lock, so two workers
//!   racing on a new client's first connections pin it once.
//! - A pin used less than `timeout` ago is kept and its time refreshed (the
//!   window slides); an older one is replaced.
//! - Time is passed in; nothing here reads a clock.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::EndpointAddr;

const SHARDS: usize = 16;
/// A shard is swept of expired pins whenever it grows past this many
/// entries since its last sweep (amortised: the threshold doubles).
const SWEEP_FLOOR: usize = 1024;

#[derive(Clone, Copy, Debug)]
struct Pin {
    endpoint: EndpointAddr,
    last_used: Instant,
}

#[derive(Debug, Default)]
struct Shard {
    pins: HashMap<IpAddr, Pin>,
    sweep_at: usize,
}

#[derive(Debug)]
pub struct Pins {
    timeout: Duration,
    shards: Vec<Mutex<Shard>>,
}

impl Pins {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect() }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A table of its own with the same pins (for a balancer that stops
    /// sharing its pins with another).
    pub fn copy(&self) -> Self {
        let shard = |s: &Mutex<Shard>| {
            let s = s.lock().unwrap_or_else(|p| p.into_inner());
            Mutex::new(Shard { pins: s.pins.clone(), sweep_at: s.sweep_at })
        };
        Self { timeout: self.timeout, shards: self.shards.iter().map(shard).collect() }
    }

    /// Take in `other`'s pins to endpoints `keep` lets through (a pair of
    /// balancers that joins again). When a client is pinned in both
    /// tables, the pin used last wins: its latest choice through either
    /// scope. One shard of each is locked at a time.
    pub fn merge(&self, other: &Pins, keep: impl Fn(EndpointAddr) -> bool) {
        if std::ptr::eq(self, other) {
            return;
        }
        for (mine, theirs) in self.shards.iter().zip(&other.shards) {
            let theirs: Vec<(IpAddr, Pin)> = {
                let theirs = theirs.lock().unwrap_or_else(|p| p.into_inner());
                theirs.pins.iter().filter(|(_, p)| keep(p.endpoint)).map(|(c, p)| (*c, *p)).collect()
            };
            let mut mine = mine.lock().unwrap_or_else(|p| p.into_inner());
            for (client, pin) in theirs {
                let slot = mine.pins.entry(client).or_insert(pin);
                if pin.last_used > slot.last_used {
                    *slot = pin;
                }
            }
        }
    }

    fn shard(&self, client: IpAddr) -> std::sync::MutexGuard<'_, Shard> {
        let i = (super::hash_ip(client) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client's endpoint: its live pin when `usable(pin)`, otherwise
    /// `choose()`, which is then pinned. `None` only if `choose` gives none.
    pub fn pinned_or(
        &self,
        client: IpAddr,
        now: Instant,
        usable: impl Fn(EndpointAddr) -> bool,
        choose: impl FnOnce() -> Option<EndpointAddr>,
    ) -> Option<EndpointAddr> {
        let mut shard = self.shard(client);
        if let Some(pin) = shard.pins.get_mut(&client)
            && now.saturating_duration_since(pin.last_used) < self.timeout
            && usable(pin.endpoint)
        {
            pin.last_used = now;
            return Some(pin.endpoint);
        }
        let endpoint = choose()?;
        shard.pins.insert(client, Pin { endpoint, last_used: now });
        if shard.pins.len() > shard.sweep_at.max(SWEEP_FLOOR) {
            let timeout = self.timeout;
            shard.pins.retain(|_, p| now.saturating_duration_since(p.last_used) < timeout);
            shard.sweep_at = 2 * shard.pins.len();
        }
        Some(endpoint)
    }

    /// Pin `client` to `endpoint` (after a failure moved it elsewhere).
    pub fn repin(&self, client: IpAddr, endpoint: EndpointAddr, now: Instant) {
        self.shard(client).pins.insert(client, Pin { endpoint, last_used: now });
    }

    /// Drop the client's pin if it points at `endpoint` (a connect to it
    /// failed: the next connection chooses afresh).
    pub fn unpin(&self, client: IpAddr, endpoint: EndpointAddr) {
        let mut shard = self.shard(client);
        if shard.pins.get(&client).is_some_and(|p| p.endpoint == endpoint) {
            shard.pins.remove(&client);
        }
    }

    /// Keep only pins to endpoints that still exist.
    pub fn retain(&self, endpoints: &HashSet<EndpointAddr>) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.pins.retain(|_, p| endpoints.contains(&p.endpoint));
        }
    }

    /// The client's current pin, if live (for tests and debugging).
    pub fn get(&self, client: IpAddr, now: Instant) -> Option<EndpointAddr> {
        let shard = self.shard(client);
        shard
            .pins
            .get(&client)
            .filter(|p| now.saturating_duration_since(p.last_used) < self.timeout)
            .map(|p| p.endpoint)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).pins.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
