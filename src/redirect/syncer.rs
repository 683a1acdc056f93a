//! The redirect syncer: brings the rules to match the latest snapshot.
//!
//! [`Syncer`] is the logic (desired rules, diff with what was last applied,
//! apply); [`SyncerThread`] runs it on a thread of its own, fed by the
//! control loop with each published snapshot. Bursts coalesce: the thread
//! always syncs the newest snapshot, never a queue of old ones.
//!
//! Invariants:
//! - What was last applied is known exactly, or not at all: after a failed
//!   apply the next sync rewrites everything (`replace`), as does the first
//!   sync and the periodic resync that repairs rules someone else removed.
//! - Ready is reported only once the first snapshot's rules are in place.
//! - After every successful apply, the conntrack entries of each UDP key
//!   whose fate changed are deleted (a firewall change alone changes no
//!   key's fate); when what was applied before is not known (a start, a
//!   restart, after a failure), those of every UDP key, listed with one
//!   `conntrack` run per family (see `conntrack.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

use super::rules::{self, Locality, RuleKey, RuleSet, Rules};
use super::{Backend, RedirectError};
use crate::snapshot::Snapshot;

/// How often the rules are rewritten whole even when nothing changed.
pub const RESYNC: Duration = Duration::from_secs(30);
/// How soon a failed sync is tried again.
pub const RETRY: Duration = Duration::from_secs(5);

/// What one sync did.
#[derive(Clone, Copy, Debug)]
pub struct SyncReport {
    /// Everything was rewritten, not just the difference.
    pub full: bool,
    pub added: usize,
    pub removed: usize,
    /// Rules in place after the sync.
    pub total: usize,
    /// The whole sync: diff, render and apply.
    pub duration: Duration,
    /// The rule tool's share of `duration`.
    pub apply: Duration,
}

pub struct Syncer {
    backend: Box<dyn Backend>,
    /// `None` until the first success and after any failure.
    applied: Option<RuleSet>,
    /// `applied` was read back from the backend's own table at start: its
    /// redirects carry no service names yet.
    read_back: bool,
}

impl Syncer {
    pub fn new(backend: Box<dyn Backend>) -> Self {
        Self { backend, applied: None, read_back: false }
    }

    /// Start from the rules a previous run left (`whole`, read back by the
    /// backend): the first sync is then a difference, and rewrites nothing
    /// a restart left unchanged.
    pub fn from_read_back(mut self, whole: Option<RuleSet>) -> Self {
        self.read_back = whole.is_some();
        self.applied = whole;
        self
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Bring the rules to `snapshot`'s, looking up which addresses are
    /// local now.
    pub fn sync(&mut self, snapshot: &Snapshot, full: bool) -> Result<SyncReport, RedirectError> {
        let desired = rules::from_snapshot(snapshot, &Locality::from_interfaces());
        for (key, kept, dropped) in &desired.clashes {
            tracing::warn!(address = %key.daddr.0, port = key.dport, kept = %kept, dropped = %dropped, "two service ports claim one address and port; the first keeps the rule");
        }
        for (key, service) in &desired.open_without_ranges {
            tracing::warn!(service = %service, field = "spec.loadBalancerSourceRanges", address = %key.daddr.0, port = key.dport, "no source range of this LoadBalancer IP's family: it stays open to every source, as with kube-proxy");
        }
        if desired.wrong_family > 0 {
            tracing::warn!(
                addresses = desired.wrong_family,
                "addresses of the other family than --bind-address get no rule (their proxy port could not accept them)"
            );
        }
        let mut rules = desired.rules;
        rules.transparent = snapshot.transparent_mark();
        self.sync_set(rules, full)
    }

    /// Bring the redirects to `desired` (no rejects, no firewall).
    pub fn sync_rules(&mut self, desired: Rules, full: bool) -> Result<SyncReport, RedirectError> {
        self.sync_set(RuleSet::from_redirects(desired), full)
    }

    /// Bring the rules to `desired`: the difference only, unless `full`, the
    /// last state is unknown or the firewall changed.
    pub fn sync_set(&mut self, desired: RuleSet, full: bool) -> Result<SyncReport, RedirectError> {
        let started = Instant::now();
        let mut apply = Duration::ZERO;
        let mut timed = |f: &mut dyn FnMut() -> Result<(), RedirectError>| {
            let t = Instant::now();
            let r = f();
            apply = t.elapsed();
            r
        };
        let mut applied = self.applied.take();
        if std::mem::take(&mut self.read_back)
            && let Some(a) = applied.as_mut()
        {
            // The table has no names: a redirect to the same proxy port is
            // the same redirect.
            for (key, target) in a.redirects.iter_mut() {
                if let Some(d) = desired.redirects.get(key).filter(|d| d.proxy_port == target.proxy_port) {
                    target.service = d.service.clone();
                }
            }
        }
        // Which keys changed fate is known whenever what was applied is,
        // even when a firewall change forces a full rewrite.
        let changes = applied.as_ref().map(|a| rules::diff_keys(a, &desired));
        let forget: Vec<RuleKey> = match &changes {
            Some(d) => d.udp_keys().into_iter().collect(),
            // Unknown before (a start, after a failure): every UDP key.
            None => desired.udp_keys().collect(),
        };
        // The firewall and the transparent chain are written whole.
        let same_firewall = applied
            .as_ref()
            .is_some_and(|a| a.firewall == desired.firewall && a.transparent == desired.transparent);
        let diff = changes.filter(|_| same_firewall);
        let (full, added, removed, result) = match diff {
            Some(diff) if !full => {
                let r = timed(&mut || self.backend.update(&diff, &desired));
                (false, diff.add.len() + diff.reject.len(), diff.remove.len() + diff.unreject.len(), r)
            }
            _ => {
                let before = applied.as_ref().map_or(0, |a| a.redirects.len() + a.reject.len());
                let after = desired.redirects.len() + desired.reject.len();
                (true, after, before, timed(&mut || self.backend.replace(&desired)))
            }
        };
        result?;
        if !forget.is_empty() {
            let mut forget = forget;
            forget.sort();
            forget.dedup();
            self.backend.forget_udp(&forget);
        }
        let total = desired.redirects.len() + desired.reject.len();
        self.applied = Some(desired);
        Ok(SyncReport { full, added, removed, total, duration: started.elapsed(), apply })
    }
}

/// The newest snapshot not yet synced, and the stop flag.
#[derive(Default)]
struct Inbox {
    latest: Option<Arc<Snapshot>>,
    stop: bool,
}

/// A [`Syncer`] on its own thread. Dropping it stops the thread (after the
/// sync in progress, if any); the rules stay in place.
pub struct SyncerThread {
    inbox: Arc<(Mutex<Inbox>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl SyncerThread {
    /// Start syncing; `ready` is set after the first successful sync.
    pub fn spawn(syncer: Syncer, ready: Arc<AtomicBool>, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let inbox = Arc::new((Mutex::new(Inbox::default()), Condvar::new()));
        let theirs = Arc::clone(&inbox);
        let thread = std::thread::Builder::new()
            .name("ringport-redirect".into())
            .spawn(move || run(syncer, &theirs, &ready, &metrics))?;
        Ok(Self { inbox, thread: Some(thread) })
    }

    /// Hand over a newly published snapshot; never waits on a sync.
    pub fn publish(&self, snapshot: Arc<Snapshot>) {
        let (lock, wake) = &*self.inbox;
        lock.lock().unwrap_or_else(|p| p.into_inner()).latest = Some(snapshot);
        wake.notify_one();
    }
}

impl Drop for SyncerThread {
    fn drop(&mut self) {
        let (lock, wake) = &*self.inbox;
        lock.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut syncer: Syncer, inbox: &(Mutex<Inbox>, Condvar), ready: &AtomicBool, metrics: &Metrics) {
    let (lock, wake) = inbox;
    // `none` touches nothing, not even a previous run's rules.
    if syncer.backend_name() != "none"
        && let Err(e) = super::remove_stale(syncer.backend_name())
    {
        tracing::error!(error = %e, "cannot remove a previous run's redirect state");
    }
    let mut current: Option<Arc<Snapshot>> = None;
    let mut failed = false;
    let mut last_full = Instant::now();
    loop {
        let wait = if failed { RETRY } else { RESYNC.saturating_sub(last_full.elapsed()) };
        let next = {
            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            let (mut guard, _) = wake
                .wait_timeout_while(guard, wait, |i| i.latest.is_none() && !i.stop)
                .unwrap_or_else(|p| p.into_inner());
            if guard.stop {
                return;
            }
            guard.latest.take()
        };
        let periodic = next.is_none();
        if let Some(s) = next {
            current = Some(s);
        }
        let Some(snapshot) = current.as_deref() else { continue };
        let full = periodic && !failed;
        let started = Instant::now();
        let result = syncer.sync(snapshot, full);
        metrics.sync.record(started.elapsed(), result.as_ref().map(|r| r.total).map_err(|_| ()));
        match result {
            Ok(r) => {
                if r.full {
                    last_full = Instant::now();
                }
                failed = false;
                // The first success makes the proxy ready: /readyz answers
                // 200 and systemd hears READY=1, both once rules exist.
                if !ready.swap(true, Ordering::AcqRel) {
                    crate::systemd::notify("READY=1");
                }
                if !periodic || r.added + r.removed > 0 {
                    tracing::info!(
                        backend = syncer.backend_name(),
                        generation = snapshot.generation,
                        full = r.full,
                        added = r.added,
                        removed = r.removed,
                        rules = r.total,
                        duration_ms = r.duration.as_secs_f64() * 1e3,
                        apply_ms = r.apply.as_secs_f64() * 1e3,
                        "redirect rules synced"
                    );
                }
            }
            Err(e) => {
                failed = true;
                tracing::error!(backend = syncer.backend_name(), generation = snapshot.generation, error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), retry_in = ?RETRY, "redirect rules not synced");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ProxyPort, ServiceName, ServicePortName, ServiceVip};
    use crate::redirect::rules::{Diff, Target};

    /// Records what it was asked to do; fails when told to.
    #[derive(Clone, Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<String>>>,
        fail: Arc<AtomicBool>,
    }

    impl Backend for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn replace(&mut self, rules: &RuleSet) -> Result<(), RedirectError> {
            self.calls.lock().unwrap().push(format!("replace {}", rules.redirects.len()));
            self.result()
        }
        fn update(&mut self, diff: &Diff, _rules: &RuleSet) -> Result<(), RedirectError> {
            self.calls.lock().unwrap().push(format!("update +{} -{}", diff.add.len(), diff.remove.len()));
            self.result()
        }
        fn forget_udp(&mut self, keys: &[RuleKey]) {
            self.calls.lock().unwrap().push(format!("forget {}", keys.len()));
        }
    }

    impl Recorder {
        fn result(&self) -> Result<(), RedirectError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(RedirectError::Unavailable { mode: "test", program: "test" });
            }
            Ok(())
        }
    }

    fn rules(n: u8) -> Rules {
        let service = ServicePortName { service: ServiceName::new("default", "x"), port: String::new() };
        (0..n)
            .map(|i| {
                let key =
                    RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip([10, 96, 0, i].into()), dport: 80 };
                (key, Target { proxy_port: ProxyPort(31000), service: service.clone() })
            })
            .collect()
    }

    #[test]
    fn first_sync_replaces_then_changes_are_incremental_and_a_failure_forces_a_replace() {
        let rec = Recorder::default();
        let mut s = Syncer::new(Box::new(rec.clone()));
        assert!(s.sync_rules(rules(3), false).unwrap().full);
        let r = s.sync_rules(rules(4), false).unwrap();
        assert_eq!((r.full, r.added, r.removed, r.total), (false, 1, 0, 4));
        rec.fail.store(true, Ordering::SeqCst);
        assert!(s.sync_rules(rules(2), false).is_err());
        rec.fail.store(false, Ordering::SeqCst);
        assert!(s.sync_rules(rules(2), false).unwrap().full);
        assert!(s.sync_rules(rules(2), true).unwrap().full);
        assert_eq!(
            *rec.calls.lock().unwrap(),
            vec!["replace 3", "update +1 -0", "update +0 -2", "replace 2", "replace 2"]
        );
    }

    #[test]
    fn conntrack_is_cleared_for_every_udp_key_at_start_and_then_only_for_udp_keys_whose_fate_changed() {
        let rec = Recorder::default();
        let mut s = Syncer::new(Box::new(rec.clone()));
        let service = ServicePortName { service: ServiceName::new("default", "dns"), port: String::new() };
        let udp = |i: u8, port: u16| {
            let key =
                RuleKey { protocol: Protocol::Udp, daddr: ServiceVip([10, 96, 0, i].into()), dport: 53 };
            (key, Target { proxy_port: ProxyPort(port), service: service.clone() })
        };
        let mut set =
            RuleSet::from_redirects(rules(2).into_iter().chain([udp(50, 31000), udp(51, 31001)]).collect());
        s.sync_set(set.clone(), false).unwrap();
        s.sync_set(set.clone(), false).unwrap();
        set.redirects.insert(udp(51, 32001).0, udp(51, 32001).1);
        s.sync_set(set.clone(), false).unwrap();
        set.redirects.remove(&udp(50, 0).0);
        set.reject.insert(udp(50, 0).0);
        s.sync_set(set.clone(), false).unwrap();
        // A firewall change rewrites everything but changes no key's fate.
        set.firewall.insert(udp(51, 0).0, vec!["10.0.0.0/8".parse().unwrap()]);
        s.sync_set(set.clone(), false).unwrap();
        // Nor does a failed sync: the next one forgets every UDP key.
        rec.fail.store(true, Ordering::SeqCst);
        assert!(s.sync_set(set.clone(), false).is_err());
        rec.fail.store(false, Ordering::SeqCst);
        s.sync_set(set, false).unwrap();
        assert_eq!(
            *rec.calls.lock().unwrap(),
            vec![
                "replace 4",
                "forget 2",
                "update +0 -0",
                "update +1 -1",
                "forget 1",
                "update +0 -1",
                "forget 1",
                "replace 3",
                "update +0 -0",
                "replace 3",
                "forget 2"
            ]
        );
    }
}
