//! The redirect syncer: brings the rules to match the latest snapshot.
//!
//! [`Syncer`] is the logic (desired rules kept per service port, so a
//! snapshot costs what changed in it; the difference with what was last
//! applied; apply); [`SyncerThread`] runs it on a thread of its own, fed
//! by the control loop with each published snapshot. Bursts coalesce: the
//! thread always syncs the newest snapshot, never a queue of old ones.
//!
//! Each sync is one of three kinds ([`SyncKind`]): *full* (the whole table
//! rewritten: the first sync, the one after a failure, a firewall change,
//! or a periodic resync that finds the rules touched by someone else),
//! *partial* (only the difference, one batch with every add and delete),
//! or *verify* (a periodic resync that finds the rules as its last write
//! left them, and nothing to change: it writes nothing). The first check
//! is nftables' ruleset generation id ([`super::genid`]), read for nothing
//! whatever the number of rules. It is per namespace, so any other writer
//! (iptables-nft, a CNI's portmap, firewalld) moves it; then the handles of
//! our own table's chains, rules and sets ([`super::handles`]) are compared
//! with those read after our last whole rewrite: equal, nobody touched our
//! table and the resync is a verify. Elements have no handles, so the table
//! is also rewritten whole every [`FULL_RESYNC`]. A backend with no
//! generation id (iptables-legacy) is rewritten whole at every periodic
//! resync; one with no table of its own (iptables-nft) at every periodic
//! resync after any other writer.
//!
//! Invariants:
//! - What was last applied is known exactly, or not at all: after a failed
//!   apply the next sync rewrites everything (`replace`), as does the first
//!   sync and the periodic resync when the rules may have been touched.
//! - The generation id is trusted only when the kernel counted exactly our
//!   own writes since the last full rewrite (one per batch); after any
//!   other writer, only our table's handles, unchanged since our last full
//!   rewrite, spare the next periodic resync a full rewrite.
//! - Ready is reported only once the first snapshot's rules are in place.
//! - After every successful apply, the conntrack entries of each UDP key
//!   whose fate changed are deleted (a firewall change alone changes no
//!   key's fate); when what was applied before is not known (a start, a
//!   restart, after a failure, the repair of our table someone changed),
//!   those of every UDP key, listed with one
//!   `conntrack` run per family (see `conntrack.rs`).
//! - A change handed over with its trigger times ([`SyncerThread::publish_timed`])
//!   is timed for the network programming latency after the sync of its
//!   snapshot: up to now when that sync changed rules (the change is not
//!   live before its rules are), else up to when it was published.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::metrics::Metrics;
pub use crate::metrics::{FullReason, SyncKind};

use super::desired::{DesiredRules, Update};
use super::rules::{Locality, RuleKey, RuleSet, Rules};
use super::{Backend, RedirectError};
use crate::snapshot::Snapshot;

/// How often the rules are checked (and rewritten whole when touched)
/// even when nothing changed.
pub const RESYNC: Duration = Duration::from_secs(30);
/// How often a periodic resync rewrites the table whole even when it looks
/// untouched: a foreign delete of one map element changes neither the
/// generation id as seen after another writer nor any handle.
pub const FULL_RESYNC: Duration = Duration::from_secs(600);
/// How soon a failed sync is tried again.
pub const RETRY: Duration = Duration::from_secs(5);

/// What one sync did.
#[derive(Clone, Copy, Debug)]
pub struct SyncReport {
    pub kind: SyncKind,
    /// Everything was rewritten, not just the difference (`kind` is full).
    pub full: bool,
    /// Why, when it was.
    pub reason: Option<FullReason>,
    pub added: usize,
    pub removed: usize,
    /// Rules in place after the sync.
    pub total: usize,
    /// Service ports whose rules were made again.
    pub ports_changed: usize,
    /// The whole sync: desired rules, diff, render and apply.
    pub duration: Duration,
    /// The rule tool's share of `duration`.
    pub apply: Duration,
}

pub struct Syncer {
    backend: Box<dyn Backend>,
    desired: DesiredRules,
    /// The backend holds the desired rules of the last sync, which
    /// succeeded (or a previous run's, read back).
    in_place: bool,
    /// The ruleset generation id our last write left, while nobody else
    /// has written since as far as we know.
    generation: Option<u32>,
    /// The handles of our table's objects after our last whole rewrite.
    handles: Option<Vec<(u16, u64)>>,
    /// When the last whole rewrite succeeded.
    last_full: Option<Instant>,
    /// The last sync failed.
    failed: bool,
    /// The count of wrong-family addresses last warned about.
    wrong_family_warned: usize,
}

impl Syncer {
    pub fn new(backend: Box<dyn Backend>) -> Self {
        Self {
            backend,
            desired: DesiredRules::default(),
            in_place: false,
            generation: None,
            handles: None,
            last_full: None,
            failed: false,
            wrong_family_warned: 0,
        }
    }

    /// Start from the rules a previous run left (`whole`, read back by the
    /// backend): the first sync is then a difference, and rewrites nothing
    /// a restart left unchanged.
    pub fn from_read_back(mut self, whole: Option<RuleSet>) -> Self {
        if let Some(rules) = whole {
            self.desired = DesiredRules::orphaned(rules);
            self.in_place = true;
        }
        self
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Bring the rules to `snapshot`'s, looking up which addresses are
    /// local now; only service ports whose inputs changed are looked at.
    /// `periodic`: also make sure nobody else touched the rules.
    pub fn sync(&mut self, snapshot: &Arc<Snapshot>, periodic: bool) -> Result<SyncReport, RedirectError> {
        let started = Instant::now();
        let update = self.desired.update(snapshot, &Locality::from_interfaces());
        for (key, kept, dropped) in &update.clashes {
            tracing::warn!(address = %key.daddr.0, port = key.dport, kept = %kept, dropped = %dropped, "two service ports claim one address and port; the first keeps the rule");
        }
        for (key, service) in &update.open_without_ranges {
            tracing::warn!(service = %service, field = "spec.loadBalancerSourceRanges", address = %key.daddr.0, port = key.dport, "no source range of this LoadBalancer IP's family: it stays open to every source, as with kube-proxy");
        }
        // Said again only when the count changes, not at every sync.
        if update.wrong_family > 0 && update.wrong_family != self.wrong_family_warned {
            tracing::warn!(
                addresses = update.wrong_family,
                "addresses of the other family than --bind-address get no rule (their proxy port could not accept them)"
            );
        }
        self.wrong_family_warned = update.wrong_family;
        self.apply(update, periodic, started)
    }

    /// Bring the redirects to `desired` (no rejects, no firewall).
    pub fn sync_rules(&mut self, desired: Rules, periodic: bool) -> Result<SyncReport, RedirectError> {
        self.sync_set(RuleSet::from_redirects(desired), periodic)
    }

    /// Bring the rules to `desired`, given whole: the difference only,
    /// unless the last state is unknown, the firewall changed, or (with
    /// `periodic`) someone else may have touched the rules.
    pub fn sync_set(&mut self, desired: RuleSet, periodic: bool) -> Result<SyncReport, RedirectError> {
        let started = Instant::now();
        let update = self.desired.replace_with(desired);
        self.apply(update, periodic, started)
    }

    /// `None` when nobody touched our rules since our last write: nobody
    /// wrote any nf_tables rule (the generation id), or, when someone did,
    /// our table's objects are the ones our last whole rewrite made (then
    /// the generation id seen now is taken as ours). Else why not.
    fn touched(&mut self) -> Option<FullReason> {
        let now = self.backend.generation();
        if self.generation.is_some() && now == self.generation {
            return None;
        }
        let Some(ours) = self.handles.as_ref() else { return Some(FullReason::Unverifiable) };
        match self.backend.own_handles() {
            Some(h) if h == *ours => {
                self.generation = now;
                None
            }
            Some(_) => Some(FullReason::ForeignWrite),
            None => Some(FullReason::Unverifiable),
        }
    }

    /// Whether this sync rewrites everything, and why.
    fn full_reason(&mut self, rewrite: bool, periodic: bool) -> Option<FullReason> {
        match () {
            _ if !self.in_place && self.failed => Some(FullReason::AfterFailure),
            _ if !self.in_place => Some(FullReason::First),
            _ if rewrite => Some(FullReason::Rewrite),
            _ if !periodic => None,
            _ if self.due_full() => Some(FullReason::Periodic),
            _ => self.touched(),
        }
    }

    /// Whether the last whole rewrite is older than [`FULL_RESYNC`].
    fn due_full(&self) -> bool {
        self.last_full.is_none_or(|t| t.elapsed() >= FULL_RESYNC)
    }

    fn apply(
        &mut self,
        update: Update,
        periodic: bool,
        started: Instant,
    ) -> Result<SyncReport, RedirectError> {
        let Update { diff, rewrite, ports_changed, .. } = update;
        let reason = self.full_reason(rewrite, periodic);
        let kind = if reason.is_some() {
            SyncKind::Full
        } else if periodic && diff.is_empty() {
            SyncKind::Verify
        } else {
            SyncKind::Partial
        };
        let rules = self.desired.rules();
        // Which keys changed fate is known whenever what was applied is,
        // even when a firewall change forces a full rewrite.
        // A repair of our table someone changed: what it did to packets
        // meanwhile is not known either (a deleted rule let keys through
        // un-NATed), so every UDP key.
        let repair = reason == Some(FullReason::ForeignWrite);
        let mut forget: Vec<RuleKey> = match self.in_place && !repair {
            true => diff.udp_keys().into_iter().collect(),
            // Unknown before (a start, after a failure, a repair): every UDP key.
            false => rules.udp_keys().collect(),
        };
        let before = self.backend.generation();
        let t = Instant::now();
        let result = match kind {
            SyncKind::Full => self.backend.replace(rules),
            SyncKind::Partial => self.backend.update(&diff, rules),
            SyncKind::Verify => Ok(()),
        };
        let apply = t.elapsed();
        let was_in_place = self.in_place;
        if let Err(e) = result {
            (self.in_place, self.generation, self.handles, self.failed) = (false, None, None, true);
            return Err(e);
        }
        if kind == SyncKind::Full {
            self.handles = self.backend.own_handles();
            self.last_full = Some(Instant::now());
        }
        let total = rules.redirects.len() + rules.reject.len();
        let (added, removed) = match kind {
            // What was there before, as far as it is known.
            SyncKind::Full if !was_in_place => (total, 0),
            SyncKind::Full => {
                (total, total + diff.remove.len() + diff.unreject.len() - diff.add.len() - diff.reject.len())
            }
            _ => (diff.add.len() + diff.reject.len(), diff.remove.len() + diff.unreject.len()),
        };
        let wrote = kind == SyncKind::Full || !diff.is_empty();
        self.generation = match (before, self.backend.generation()) {
            // Our write is the only one the kernel counted, onto the rules
            // as we had left them (or a full rewrite, which makes them so).
            (Some(b), Some(a)) => {
                let ours_before = kind == SyncKind::Full || self.generation == Some(b);
                let expected = match kind {
                    _ if !wrote => 0,
                    SyncKind::Full => self.backend.transactions(None),
                    _ => self.backend.transactions(Some(&diff)),
                };
                let only_ours = a == b.wrapping_add(expected);
                if !only_ours {
                    let observed = a.wrapping_sub(b);
                    tracing::debug!(
                        expected,
                        observed,
                        "someone else committed nf_tables transactions while we wrote: the next periodic resync checks our table"
                    );
                }
                (ours_before && only_ours).then_some(a)
            }
            _ => None,
        };
        (self.in_place, self.failed) = (true, false);
        if !forget.is_empty() {
            forget.sort();
            forget.dedup();
            self.backend.forget_udp(&forget);
        }
        Ok(SyncReport {
            kind,
            full: kind == SyncKind::Full,
            reason,
            added,
            removed,
            total,
            ports_changed,
            duration: started.elapsed(),
            apply,
        })
    }
}

/// Whether a sync also checks the rules: when it was woken by the timer,
/// and also when snapshots keep arriving faster than [`RESYNC`], which
/// would otherwise put the check off for as long as they do.
fn check_due(timer: bool, since_check: Duration) -> bool {
    timer || since_check >= RESYNC
}

/// The newest snapshot not yet synced, the changes it carries that wait
/// to be timed, and the stop flag.
#[derive(Default)]
struct Inbox {
    latest: Option<Arc<Snapshot>>,
    timed: Vec<Timed>,
    stop: bool,
}

/// A change published and not yet timed: when it was triggered, and when
/// its snapshot was published.
#[derive(Clone, Copy, Debug)]
pub struct Timed {
    pub trigger: SystemTime,
    pub published: SystemTime,
}

/// At most this many changes wait for a successful sync to be timed (the
/// oldest are dropped beyond it, untimed, while syncs keep failing).
const MAX_TIMED: usize = 100_000;

/// Time `timed` once their snapshot's rules are synced: a sync that
/// changed rules made them live now; one that changed none left them live
/// since they were published.
fn observe(metrics: &Metrics, timed: &[Timed], rules_changed: bool, now: SystemTime) {
    for t in timed {
        metrics.apply.programmed_at(t.trigger, if rules_changed { now } else { t.published });
    }
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
        self.publish_timed(snapshot, Vec::new());
    }

    /// As [`SyncerThread::publish`], with the changes it carries, to be
    /// timed after its sync (module header).
    pub fn publish_timed(&self, snapshot: Arc<Snapshot>, timed: Vec<Timed>) {
        let (lock, wake) = &*self.inbox;
        let mut inbox = lock.lock().unwrap_or_else(|p| p.into_inner());
        inbox.latest = Some(snapshot);
        inbox.timed.extend(timed);
        let over = inbox.timed.len().saturating_sub(MAX_TIMED);
        inbox.timed.drain(..over);
        drop(inbox);
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
    // Changes of the snapshots taken, timed after their sync succeeds.
    let mut timed: Vec<Timed> = Vec::new();
    let mut failed = false;
    let mut last_check = Instant::now();
    loop {
        let wait = if failed { RETRY } else { RESYNC.saturating_sub(last_check.elapsed()) };
        let next = {
            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            let (mut guard, _) = wake
                .wait_timeout_while(guard, wait, |i| i.latest.is_none() && !i.stop)
                .unwrap_or_else(|p| p.into_inner());
            if guard.stop {
                return;
            }
            timed.append(&mut guard.timed);
            guard.latest.take()
        };
        let over = timed.len().saturating_sub(MAX_TIMED);
        timed.drain(..over);
        let periodic = check_due(next.is_none(), last_check.elapsed());
        // The snapshot this one replaces is dropped after the write, so
        // freeing it never delays the rules.
        let replaced = next.and_then(|s| current.replace(s));
        let Some(snapshot) = current.as_ref() else { continue };
        let started = Instant::now();
        let result = syncer.sync(snapshot, periodic && !failed);
        drop(replaced);
        let result_kind = result.as_ref().map(|r| (r.kind, r.reason, r.total)).map_err(|_| ());
        metrics.sync.record(started.elapsed(), result_kind);
        match result {
            Ok(r) => {
                observe(metrics, &timed, r.added + r.removed > 0, SystemTime::now());
                timed.clear();
                if periodic || r.full {
                    last_check = Instant::now();
                }
                failed = false;
                // The first success makes the proxy ready: /readyz answers
                // 200 and systemd hears READY=1, both once rules exist.
                if !ready.swap(true, Ordering::AcqRel) {
                    crate::systemd::notify("READY=1");
                    tracing::info!(generation = snapshot.generation, "ready: the redirect rules exist");
                }
                // One line per sync, never one per rule; a periodic check
                // that found nothing to do only at debug.
                macro_rules! synced {
                    ($level:ident) => {
                        tracing::$level!(
                            backend = syncer.backend_name(),
                            generation = snapshot.generation,
                            kind = r.kind.as_str(),
                            full = r.full,
                            reason = r.reason.map_or("", FullReason::as_str),
                            added = r.added,
                            removed = r.removed,
                            rules = r.total,
                            ports_changed = r.ports_changed,
                            duration_ms = r.duration.as_secs_f64() * 1e3,
                            apply_ms = r.apply.as_secs_f64() * 1e3,
                            "redirect rules synced"
                        )
                    };
                }
                if r.kind == SyncKind::Verify {
                    synced!(debug);
                } else {
                    synced!(info);
                }
                // Last: the purge takes milliseconds after a large sync,
                // which neither readiness nor the latency timed above
                // should wait for.
                crate::memory::release_after(r.ports_changed);
            }
            Err(e) => {
                failed = true;
                tracing::error!(backend = syncer.backend_name(), generation = snapshot.generation, error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), retry_in = ?RETRY, "redirect rules not synced");
            }
        }
    }
}

#[cfg(test)]
#[path = "syncer_tests.rs"]
mod tests;
