//! Tests of the syncer's logic against a recording backend: which kind
//! each sync is, why a full one happened, which UDP keys' conntrack
//! entries are cleared, and how changes are timed.

use super::*;
use crate::model::{Protocol, ProxyPort, ServiceName, ServicePortName, ServiceVip};
use crate::redirect::rules::{Diff, Target};

/// Records what it was asked to do; fails when told to; with
/// `generation`, counts its writes as nftables' generation id does.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<String>>>,
    fail: Arc<AtomicBool>,
    generation: Option<Arc<std::sync::atomic::AtomicU32>>,
    /// With it, the one handle of "our table".
    handles: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Backend for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn replace(&mut self, rules: &RuleSet) -> Result<(), RedirectError> {
        self.calls.lock().unwrap().push(format!("replace {}", rules.redirects.len()));
        self.bump();
        self.result()
    }
    fn update(&mut self, diff: &Diff, _rules: &RuleSet) -> Result<(), RedirectError> {
        self.calls.lock().unwrap().push(format!("update +{} -{}", diff.add.len(), diff.remove.len()));
        if !diff.is_empty() {
            self.bump();
        }
        self.result()
    }
    fn generation(&self) -> Option<u32> {
        self.generation.as_ref().map(|g| g.load(Ordering::SeqCst))
    }
    fn own_handles(&self) -> Option<Vec<(u16, u64)>> {
        self.handles.as_ref().map(|h| vec![(0, h.load(Ordering::SeqCst))])
    }
    fn forget_udp(&mut self, keys: &[RuleKey]) {
        self.calls.lock().unwrap().push(format!("forget {}", keys.len()));
    }
}

impl Recorder {
    /// A write: ours, or someone else's.
    fn bump(&self) {
        if let Some(g) = &self.generation {
            g.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn result(&self) -> Result<(), RedirectError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(RedirectError::Unavailable { mode: "test", program: "test" });
        }
        Ok(())
    }
}

fn rules(n: u8) -> Rules {
    let service = ServicePortName { service: ServiceName::new("default", "x"), port: "".into() };
    (0..n)
        .map(|i| {
            let key =
                RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip([10, 96, 0, i].into()), dport: 80 };
            (key, Target::named(ProxyPort(31000), service.clone()))
        })
        .collect()
}

#[test]
fn a_change_is_timed_to_its_rule_sync_when_rules_changed_else_to_its_publication() {
    let metrics = Arc::new(Metrics::new(1));
    let now = SystemTime::now();
    let trigger = now - Duration::from_secs(20);
    let timed = [Timed { trigger, published: trigger + Duration::from_micros(800) }];
    observe(&metrics, &timed, false, now);
    let bucket = |le: &str| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).unwrap();
        let sample = format!("ringport_network_programming_duration_seconds_bucket{{le=\"{le}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&sample)?.parse::<u64>().ok()).unwrap()
    };
    assert_eq!((bucket("0.001"), bucket("30.0")), (1, 1), "no rule changed: live when published");
    observe(&metrics, &timed, true, now);
    assert_eq!((bucket("0.001"), bucket("30.0")), (1, 2), "rules changed: live once synced, 20 s later");
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
    let service = ServicePortName { service: ServiceName::new("default", "dns"), port: "".into() };
    let udp = |i: u8, port: u16| {
        let key = RuleKey { protocol: Protocol::Udp, daddr: ServiceVip([10, 96, 0, i].into()), dport: 53 };
        (key, Target::named(ProxyPort(port), service.clone()))
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

#[test]
fn a_periodic_resync_verifies_an_untouched_table_and_rewrites_one_someone_else_wrote_to() {
    let rec = Recorder { generation: Some(Arc::default()), ..Recorder::default() };
    let mut s = Syncer::new(Box::new(rec.clone()));
    let kind = |s: &mut Syncer, n, periodic| s.sync_rules(rules(n), periodic).unwrap().kind;
    assert_eq!(kind(&mut s, 3, true), SyncKind::Full, "nothing known yet");
    assert_eq!(kind(&mut s, 3, true), SyncKind::Verify);
    assert_eq!(kind(&mut s, 4, true), SyncKind::Partial, "a change found by the periodic sync");
    assert_eq!(kind(&mut s, 4, true), SyncKind::Verify);
    rec.bump();
    assert_eq!(kind(&mut s, 4, true), SyncKind::Full, "someone else wrote");
    assert_eq!(kind(&mut s, 4, true), SyncKind::Verify);
    // Someone else writes, then we write a difference: the table
    // cannot be known as ours until a full rewrite.
    rec.bump();
    assert_eq!(kind(&mut s, 5, false), SyncKind::Partial);
    assert_eq!(kind(&mut s, 5, true), SyncKind::Full);
    assert_eq!(kind(&mut s, 5, true), SyncKind::Verify);
    // A failed write: rewritten whole, whatever the generation says.
    rec.fail.store(true, Ordering::SeqCst);
    assert!(s.sync_rules(rules(6), false).is_err());
    rec.fail.store(false, Ordering::SeqCst);
    assert_eq!(kind(&mut s, 6, true), SyncKind::Full);
    assert_eq!(
        *rec.calls.lock().unwrap(),
        vec![
            "replace 3",
            "update +1 -0",
            "replace 4",
            "update +1 -0",
            "replace 5",
            "update +1 -0",
            "replace 6"
        ]
    );
}

#[test]
fn a_periodic_resync_after_a_foreign_write_elsewhere_verifies_and_one_in_our_table_rewrites() {
    let rec =
        Recorder { generation: Some(Arc::default()), handles: Some(Arc::default()), ..Recorder::default() };
    let mut s = Syncer::new(Box::new(rec.clone()));
    let kind = |s: &mut Syncer, n, periodic| s.sync_rules(rules(n), periodic).unwrap().kind;
    assert_eq!(kind(&mut s, 3, false), SyncKind::Full);
    rec.bump();
    assert_eq!(kind(&mut s, 3, true), SyncKind::Verify, "someone wrote elsewhere");
    assert_eq!(kind(&mut s, 3, true), SyncKind::Verify, "the new generation id is taken as ours");
    rec.bump();
    assert_eq!(kind(&mut s, 4, false), SyncKind::Partial);
    assert_eq!(kind(&mut s, 4, true), SyncKind::Verify, "elsewhere, then our difference");
    // Someone recreates an object of our table.
    rec.bump();
    rec.handles.as_ref().unwrap().fetch_add(1, Ordering::SeqCst);
    assert_eq!(kind(&mut s, 4, true), SyncKind::Full, "someone wrote in our table");
    assert_eq!(kind(&mut s, 4, true), SyncKind::Verify);
    // Unreadable handles: as before, any foreign write rewrites.
    let mut s = Syncer::new(Box::new(Recorder { handles: None, ..rec.clone() }));
    assert_eq!(kind(&mut s, 3, false), SyncKind::Full);
    rec.bump();
    assert_eq!(kind(&mut s, 3, true), SyncKind::Full);
}

#[test]
fn the_check_is_due_on_the_timer_and_also_under_a_steady_stream_of_snapshots() {
    assert!(check_due(true, Duration::ZERO));
    assert!(!check_due(false, RESYNC / 2), "a snapshot soon after a check");
    assert!(check_due(false, RESYNC), "a snapshot once the interval elapsed");
}

#[test]
fn each_full_sync_says_why() {
    let rec =
        Recorder { generation: Some(Arc::default()), handles: Some(Arc::default()), ..Recorder::default() };
    let mut s = Syncer::new(Box::new(rec.clone()));
    let reason = |s: &mut Syncer, n, periodic| s.sync_rules(rules(n), periodic).unwrap().reason;
    assert_eq!(reason(&mut s, 3, false), Some(FullReason::First));
    assert_eq!(reason(&mut s, 4, false), None);
    assert_eq!(reason(&mut s, 4, true), None, "a verify");
    rec.bump();
    rec.handles.as_ref().unwrap().fetch_add(1, Ordering::SeqCst);
    assert_eq!(reason(&mut s, 4, true), Some(FullReason::ForeignWrite));
    rec.calls.lock().unwrap().clear();
    let udp = RuleKey { protocol: Protocol::Udp, daddr: ServiceVip([10, 96, 1, 1].into()), dport: 53 };
    let mut with_udp = rules(4);
    with_udp.insert(udp, with_udp.values().next().unwrap().clone());
    assert_eq!(s.sync_rules(with_udp.clone(), false).unwrap().kind, SyncKind::Partial);
    rec.bump();
    rec.handles.as_ref().unwrap().fetch_add(1, Ordering::SeqCst);
    assert_eq!(s.sync_rules(with_udp, true).unwrap().reason, Some(FullReason::ForeignWrite));
    // The repair forgets every UDP key, though its fate did not change.
    assert_eq!(*rec.calls.lock().unwrap(), vec!["update +1 -0", "forget 1", "replace 5", "forget 1"]);
    rec.fail.store(true, Ordering::SeqCst);
    assert!(s.sync_rules(rules(5), false).is_err());
    rec.fail.store(false, Ordering::SeqCst);
    assert_eq!(reason(&mut s, 5, false), Some(FullReason::AfterFailure));
    let mut set = RuleSet::from_redirects(rules(5));
    let key = *set.redirects.keys().next().unwrap();
    set.firewall.insert(key, vec!["10.0.0.0/8".parse().unwrap()]);
    assert_eq!(s.sync_set(set, false).unwrap().reason, Some(FullReason::Rewrite));
    // No generation id and no handles (iptables-legacy).
    let mut s = Syncer::new(Box::new(Recorder::default()));
    assert_eq!(reason(&mut s, 3, false), Some(FullReason::First));
    assert_eq!(reason(&mut s, 3, true), Some(FullReason::Unverifiable));
    // A whole rewrite is due every FULL_RESYNC.
    let mut s = Syncer::new(Box::new(rec.clone()));
    assert_eq!(reason(&mut s, 3, false), Some(FullReason::First));
    s.last_full = Instant::now().checked_sub(FULL_RESYNC);
    assert_eq!(reason(&mut s, 3, true), Some(FullReason::Periodic));
    assert_eq!(reason(&mut s, 3, true), None);
}
