//! The desired rules, kept across syncs and recomputed per service port:
//! a new snapshot costs what changed since the last one (the chunks of
//! its port list the last snapshot did not share, compared port by port
//! by pointer), not the building and diffing of every rule, nor a walk
//! over every port.
//!
//! For each service port the state remembers what its rules were made
//! from (its `Arc<PortState>`, its proxy ports, each family's emptiness,
//! which of its external and LB IPs are remote) and what they were: its
//! *claims*, `key -> fate` (redirect to a proxy port, reject, drop), made
//! by [`rules::desired`] for that port alone, the very code that makes a
//! whole snapshot's rules. A port whose `Arc` is the same, or whose
//! rule inputs compare equal (a snapshot that rebuilt every port), keeps
//! its claims. The rules are the winners of each key's claims.
//!
//! Invariants:
//! - The rules equal [`rules::from_snapshot`]'s for the same snapshot and
//!   locality, clashes included: of two service ports claiming one key the
//!   first by name keeps it, and when it goes the next one takes the key.
//! - The [`Diff`] an update returns turns the previous rules into the new
//!   ones exactly; `rewrite` is set when the firewall or the transparent
//!   mark changed, which have no incremental form.
//! - After [`DesiredRules::replace_with`] or [`DesiredRules::orphaned`]
//!   (rules that no port's claims explain), the next update is computed
//!   from scratch and diffed whole.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::rules::{self, Diff, Locality, PortRules, RuleKey, RuleSet, Target};
use crate::listen::{ListenRole, Listener};
use crate::model::{ProxyPort, ServicePort, ServicePortName};
use crate::snapshot::{PortState, Ports, Snapshot};

mod entries;
use entries::Entries;
mod inputs;
use inputs::Inputs;
mod first;
mod sorted;
use sorted::SortedRules;

/// What one key is to one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fate {
    Redirect(ProxyPort),
    Reject,
    Drop,
}

/// One service port's rules, made for it alone, what few ports have out
/// of line.
#[derive(Debug, Default)]
struct Claims {
    keys: Keys,
    rare: Option<Box<RareClaims>>,
}

/// A port's claimed keys. Most ports claim one key, and a large node keeps
/// 100k of these: one is kept inline (24 bytes, the size of a boxed
/// slice's pointer and length with the enum's tag in a niche), not in an
/// allocation of its own.
#[derive(Debug)]
enum Keys {
    One((RuleKey, Fate)),
    /// None, or two or more.
    Many(Box<[(RuleKey, Fate)]>),
}

impl Default for Keys {
    fn default() -> Self {
        Keys::Many(Box::default())
    }
}

impl Keys {
    fn as_slice(&self) -> &[(RuleKey, Fate)] {
        match self {
            Keys::One(claim) => std::slice::from_ref(claim),
            Keys::Many(claims) => claims,
        }
    }
}

impl From<Vec<(RuleKey, Fate)>> for Keys {
    fn from(mut claims: Vec<(RuleKey, Fate)>) -> Self {
        match claims.len() {
            1 => claims.pop().map_or_else(Keys::default, Keys::One),
            _ => Keys::Many(claims.into_boxed_slice()),
        }
    }
}

/// A port's firewall claims (LB IPs with source ranges) and its addresses
/// without a proxy port of their family: none for most ports.
#[derive(Debug, Default)]
struct RareClaims {
    firewall: Vec<(RuleKey, Vec<IpNet>)>,
    wrong_family: usize,
}

impl Claims {
    fn firewall(&self) -> &[(RuleKey, Vec<IpNet>)] {
        self.rare.as_ref().map_or(&[], |r| &r.firewall)
    }

    fn wrong_family(&self) -> usize {
        self.rare.as_ref().map_or(0, |r| r.wrong_family)
    }
}

struct Entry {
    port: Arc<PortState>,
    inputs: Inputs,
    claims: Claims,
}

impl Entry {
    /// Transparent mode's reply mark, when the port uses it.
    fn mark(&self) -> Option<u32> {
        self.port.source.active_mark()
    }
}

/// A claim on a key: by which service port and to what end. A port claims
/// a key once, and its old entry's claims go before its new one's come, so
/// the name tells a key's claims apart.
type Claim<T> = (ServicePortName, T);

/// What an update changed.
#[derive(Debug, Default)]
pub struct Update {
    /// From the previous rules to the new ones.
    pub diff: Diff,
    /// The firewall or the transparent mark changed: rewrite whole.
    pub rewrite: bool,
    /// Service ports whose rules were made again (added and removed ones
    /// included).
    pub ports_changed: usize,
    /// Service ports looked at: those of the chunks of the port list that
    /// changed since the last update (every port when all changed).
    pub examined: usize,
    /// `(key, kept, dropped)`: clashes among the keys this update touched.
    pub clashes: Vec<(RuleKey, ServicePortName, ServicePortName)>,
    /// LB IPs left open (no source range of their family), of the service
    /// ports this update made again.
    pub open_without_ranges: Vec<(RuleKey, ServicePortName)>,
    /// Addresses with no proxy port of their family, over all ports.
    pub wrong_family: usize,
}

/// The rules a sequence of snapshots wants, kept up to date per port.
#[derive(Default)]
pub struct DesiredRules {
    /// One per port of the last snapshot, sorted by name.
    entries: Entries,
    /// The last snapshot's ports (the same `PortState`s the entries hold):
    /// the chunks a new snapshot shares with them hold no change.
    last_ports: Option<Ports>,
    /// The last snapshot's listeners (not the snapshot: its balancers and
    /// endpoints are not kept alive for this): an entry's proxy ports stand
    /// while its proxy listeners are the same `Arc`s (compared by pointer,
    /// no count touched).
    last_listeners: Option<Arc<Vec<Arc<Listener>>>>,
    /// The node's addresses at the last update.
    locality: Option<Locality>,
    /// The shared proxy ports at the last update (`--proxy-port-mode
    /// shared`), when there are any.
    shared: Option<[Option<SocketAddr>; 2]>,
    /// The claims on a key that the rules alone do not tell, in name
    /// order (the first wins): of every key claimed by two ports or more,
    /// or rejected or dropped. A key that one port alone redirects (most
    /// keys) is not here: its rule names the port and the proxy port, so
    /// its claim is read back from the rule when a second one comes. Every
    /// key an update touches is here until [`DesiredRules::settle`].
    claimants: HashMap<RuleKey, Vec<Claim<Fate>>>,
    firewall_claimants: HashMap<RuleKey, Vec<Claim<Vec<IpNet>>>>,
    wrong_family: usize,
    /// The winners: what the backend is to hold.
    rules: RuleSet,
    /// `rules` are not the claims' winners (a whole set was handed in, or
    /// a previous run's rules were read back): start the next update anew.
    orphaned: bool,
    /// Orphaned rules read back from the backend carry no service names.
    unnamed: bool,
}

impl DesiredRules {
    /// Start from rules already in place, not made from any snapshot (a
    /// previous run's, read back from the backend without service names).
    pub fn orphaned(rules: RuleSet) -> Self {
        Self { rules, orphaned: true, unnamed: true, ..Self::default() }
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Make the rules `set`, given whole (not from a snapshot).
    pub fn replace_with(&mut self, set: RuleSet) -> Update {
        let old = std::mem::take(self);
        let update = whole_update(&old.rules, &set, old.unnamed);
        *self = Self { rules: set, orphaned: true, ..Self::default() };
        update
    }

    /// Bring the rules to `snapshot`'s, with `local` the node's addresses.
    ///
    /// Only the ports of the chunks of the snapshot's port list that the
    /// last snapshot did not share are looked at (found by name in the
    /// entries, changed in place): a sync costs what changed since the
    /// last one, however many snapshots ago, not one step per port. Of
    /// those, an unchanged one (the same `Arc`, the same proxy listeners,
    /// the same locality) costs one pointer compare.
    pub fn update(&mut self, snapshot: &Arc<Snapshot>, local: &Locality) -> Update {
        if self.orphaned {
            let old = std::mem::take(self);
            let mut update = self.update(snapshot, local);
            let fresh = whole_update(&old.rules, &self.rules, old.unnamed);
            update.diff = fresh.diff;
            update.rewrite = fresh.rewrite;
            return update;
        }
        let same_locality = self.locality.as_ref() == Some(local);
        let changes = match &self.last_listeners {
            // The very same list: nothing came or went (no walk over it).
            Some(last) if Arc::ptr_eq(last, &snapshot.listeners) => ListenerChanges::same(),
            last => {
                ListenerChanges::between(last.as_deref().map_or(&[][..], |v| &v[..]), &snapshot.listeners)
            }
        };
        // The shared proxy ports are listeners too: the same while they are.
        let shared = match changes.same {
            true => self.shared,
            false => Some(snapshot.shared_proxies()).filter(|s| s.iter().any(Option::is_some)),
        };
        if self.last_listeners.is_some() && shared != self.shared {
            // Every TCP port changes its proxy ports: start anew.
            self.orphaned = true;
            return self.update(snapshot, local);
        }
        // The ports to look at: those of the chunks this snapshot and the
        // last one do not share (every port set or removed since is among
        // them) whose state is not the same `Arc` on both sides, and those
        // whose proxy listeners came or went; every port when the node's
        // addresses changed (or at the first update).
        let last = self.last_ports.take().unwrap_or_default();
        let none = Ports::default();
        let (since_new, since_old) = match same_locality {
            true => (&last, &snapshot.ports),
            false => (&none, &none),
        };
        let mut names =
            changed_names(snapshot.ports.unshared(since_new), last.unshared(since_old), same_locality);
        if !changes.names.is_empty() {
            names.extend(&changes.names);
            names.sort_unstable();
            names.dedup();
        }
        let mut update = Update { examined: names.len(), ..Update::default() };
        // From nothing, every key's claims are settled at once, by key.
        let first = self.holds_nothing();
        let mut touched: BTreeSet<RuleKey> = BTreeSet::new();
        let mut touched_fw: BTreeSet<RuleKey> = BTreeSet::new();
        for name in names {
            let previous = self.entries.remove(name);
            let Some(port) = snapshot.ports.get(name) else {
                if let Some(gone) = previous {
                    self.retract(&gone, &mut touched, &mut touched_fw);
                    update.ports_changed += 1;
                }
                continue;
            };
            let same_arc = previous.as_ref().is_some_and(|p| Arc::ptr_eq(&p.port, port));
            let same_proxies = !changes.names.contains(name);
            if same_arc
                && same_proxies
                && same_locality
                && let Some(p) = previous
            {
                self.entries.insert(p);
                continue;
            }
            let inputs = match &previous {
                Some(p) => {
                    let emptiness = if same_arc { p.inputs.emptiness } else { inputs::emptiness(port) };
                    p.inputs.again(port, emptiness, local, same_proxies, &changes)
                }
                None => Inputs::new(port, local, &changes),
            };
            let entry = match previous {
                Some(p) if p.inputs == inputs && (same_arc || same_rule_spec(&p.port.spec, &port.spec)) => {
                    if !same_arc {
                        self.renew_targets(&p.claims, &port.spec);
                    }
                    Entry { port: Arc::clone(port), inputs, ..p }
                }
                previous => {
                    if let Some(p) = &previous {
                        self.retract(p, &mut touched, &mut touched_fw);
                    }
                    let claims = claims_of(port, &inputs, shared, local, &mut update);
                    let entry = Entry { port: Arc::clone(port), inputs, claims };
                    self.claim(&entry, (!first).then_some(&mut touched), &mut touched_fw);
                    update.ports_changed += 1;
                    entry
                }
            };
            self.entries.insert(entry);
        }
        debug_assert_eq!(self.entries.len(), snapshot.ports.len(), "one entry per port");
        if !changes.same || self.last_listeners.is_none() {
            self.last_listeners = Some(Arc::clone(&snapshot.listeners));
        }
        self.last_ports = Some(snapshot.ports.clone());
        self.locality = Some(local.clone());
        self.shared = shared;
        match first {
            true => self.settle_first(&mut update),
            false => self.settle(touched, &mut update),
        }
        update.rewrite = self.settle_firewall(&touched_fw);
        let mark = self.entries.mark();
        update.rewrite |= self.rules.transparent != mark;
        self.rules.transparent = mark;
        update.wrong_family = self.wrong_family;
        update
    }

    /// The rules a port's `claims` won name `spec`, its new version (the
    /// same rules): a rule must not keep an older version of its port, and
    /// all it holds, alive.
    fn renew_targets(&mut self, claims: &Claims, spec: &Arc<ServicePort>) {
        for (key, fate) in claims.keys.as_slice() {
            if let Fate::Redirect(_) = fate
                && let Some(t) = self.rules.redirects.get_mut(key)
                && t.name() == &spec.name
            {
                t.service = Some(Arc::clone(spec));
            }
        }
    }

    fn retract(&mut self, e: &Entry, touched: &mut BTreeSet<RuleKey>, touched_fw: &mut BTreeSet<RuleKey>) {
        let name = &e.port.spec.name;
        for (key, _) in e.claims.keys.as_slice() {
            match self.claimants.get_mut(key) {
                Some(list) => list.retain(|(n, _)| n != name),
                // A key this port alone redirected: no claim is left.
                None => {
                    debug_assert!(self.rules.redirects.get(key).is_some_and(|t| t.name() == name));
                    self.claimants.insert(*key, Vec::new());
                }
            }
            touched.insert(*key);
        }
        for (key, _) in e.claims.firewall() {
            if let Some(list) = self.firewall_claimants.get_mut(key) {
                list.retain(|(n, _)| n != name);
                if list.is_empty() {
                    self.firewall_claimants.remove(key);
                }
            }
            touched_fw.insert(*key);
        }
        self.wrong_family -= e.claims.wrong_family();
    }

    /// Add `e`'s claims; its keys' alone when `touched` (else a first
    /// sync lists them in `settle_first`).
    fn claim(
        &mut self,
        e: &Entry,
        touched: Option<&mut BTreeSet<RuleKey>>,
        touched_fw: &mut BTreeSet<RuleKey>,
    ) {
        let name = &e.port.spec.name;
        if let Some(touched) = touched {
            for (key, fate) in e.claims.keys.as_slice() {
                let list = self.claimants.entry(*key).or_insert_with(|| {
                    // Not touched by this update yet: the rule, if any, is
                    // the claim of the one port that redirects the key.
                    let sole = self.rules.redirects.get(key);
                    sole.map(|t| (t.name().clone(), Fate::Redirect(t.proxy_port))).into_iter().collect()
                });
                insert_claim(list, (name.clone(), fate.clone()));
                touched.insert(*key);
            }
        }
        for (key, ranges) in e.claims.firewall() {
            let list = self.firewall_claimants.entry(*key).or_default();
            insert_claim(list, (name.clone(), ranges.clone()));
            touched_fw.insert(*key);
        }
        self.wrong_family += e.claims.wrong_family();
    }

    /// Give each touched key to its first claimant, and say what changed.
    /// A key left with one claim, a redirect, is then told by its rule
    /// alone (see `claimants`).
    fn settle(&mut self, touched: BTreeSet<RuleKey>, update: &mut Update) {
        let d = &mut update.diff;
        // A first sync adds every rule: the B-tree is then built as the
        // keys come, with full nodes (`sorted`), and the diff's adds (keys
        // and proxy ports) read from it.
        let fresh = self.rules.redirects.is_empty();
        let mut fresh_adds = SortedRules::default();
        for key in &touched {
            let told_by_rule = |list: &[Claim<Fate>]| matches!(list, [] | [(_, Fate::Redirect(_))]);
            let list = match self.claimants.get(key) {
                Some(list) if told_by_rule(list) => self.claimants.remove(key).unwrap_or_default(),
                Some(list) => list.clone(),
                None => Vec::new(),
            };
            for (lost, _) in list.iter().skip(1) {
                update.clashes.push((*key, list[0].0.clone(), lost.clone()));
            }
            let new = list.first().map(|(name, fate)| match fate {
                Fate::Redirect(p) => {
                    // The spec the winner's entry holds (every claimant has one).
                    let spec = self.entries.get(name).map(|e| Arc::clone(&e.port.spec));
                    debug_assert!(spec.is_some(), "a claimant without an entry");
                    // Never seen; should it happen, the rule keeps its spec
                    // (and its name) rather than lose them.
                    let spec = spec.or_else(|| self.rules.redirects.get(key).and_then(|o| o.service.clone()));
                    (Fate::Redirect(*p), Some(Target { proxy_port: *p, service: spec }))
                }
                other => (other.clone(), None),
            });
            let r = &mut self.rules;
            if let (Some((Fate::Redirect(_), Some(t))), Some(o)) = (&new, r.redirects.get_mut(key))
                && *o == *t
            {
                // The same rule; it holds the newest spec, not an old one.
                o.service.clone_from(&t.service);
                continue;
            }
            if r.redirects.remove(key).is_some() {
                d.remove.push(*key);
            }
            let was_rejected = r.reject.remove(key);
            let was_dropped = r.dropped.remove(key);
            match new {
                Some((Fate::Redirect(_), Some(t))) if fresh => fresh_adds.push(*key, t),
                Some((Fate::Redirect(_), Some(t))) => {
                    d.add.push((*key, t.proxy_port));
                    r.redirects.insert(*key, t);
                }
                Some((Fate::Reject, _)) => {
                    r.reject.insert(*key);
                }
                Some((Fate::Drop, _)) => {
                    r.dropped.insert(*key);
                }
                _ => {}
            }
            match (was_rejected, r.reject.contains(key)) {
                (true, false) => d.unreject.push(*key),
                (false, true) => d.reject.push(*key),
                _ => {}
            }
            match (was_dropped, r.dropped.contains(key)) {
                (true, false) => d.undrop.push(*key),
                (false, true) => d.drop.push(*key),
                _ => {}
            }
        }
        // A first sync fills the map (and `touched`) with every key until
        // it settles them: both go before the rules and the diff's adds
        // are finished, the load's peak.
        drop(touched);
        if self.claimants.capacity() > 4 * self.claimants.len() + 64 {
            self.claimants.shrink_to_fit();
        }
        if fresh {
            self.rules.redirects = fresh_adds.finish();
            d.add = self.rules.redirects.iter().map(|(k, t)| (*k, t.proxy_port)).collect();
        }
    }

    /// Whether the firewall changed.
    fn settle_firewall(&mut self, touched: &BTreeSet<RuleKey>) -> bool {
        let mut changed = false;
        for key in touched {
            let new = self.firewall_claimants.get(key).and_then(|l| l.first()).map(|(_, r)| r.clone());
            let old = match &new {
                Some(ranges) => self.rules.firewall.insert(*key, ranges.clone()),
                None => self.rules.firewall.remove(key),
            };
            changed |= old != new;
        }
        changed
    }
}

/// The names of two sorted runs of ports (new, old) that are not the same
/// `Arc` on both sides, in name order, each once; all of them unless
/// `skip_same`. Equal pointers are equal names: no string compare then.
fn changed_names<'a>(
    new: impl Iterator<Item = &'a Arc<PortState>>,
    old: impl Iterator<Item = &'a Arc<PortState>>,
    skip_same: bool,
) -> Vec<&'a ServicePortName> {
    use std::cmp::Ordering;
    let (mut new, mut old) = (new.peekable(), old.peekable());
    let mut names = Vec::new();
    loop {
        let order = match (new.peek(), old.peek()) {
            (Some(n), Some(o)) if Arc::ptr_eq(n, o) => Ordering::Equal,
            (Some(n), Some(o)) => n.spec.name.cmp(&o.spec.name),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => return names,
        };
        let (n, o) = match order {
            Ordering::Less => (new.next(), None),
            Ordering::Greater => (None, old.next()),
            Ordering::Equal => (new.next(), old.next()),
        };
        let same = matches!((n, o), (Some(n), Some(o)) if Arc::ptr_eq(n, o));
        if let Some(p) = n.or(o).filter(|_| !(same && skip_same)) {
            names.push(&p.spec.name);
        }
    }
}

/// Add a claim in name order. Nearly every key has one claimant: the
/// first takes room for one (a `Vec` would take four).
fn insert_claim<T>(list: &mut Vec<Claim<T>>, claim: Claim<T>) {
    if list.is_empty() {
        list.reserve_exact(1);
    }
    let at = list.partition_point(|(n, _)| *n < claim.0);
    list.insert(at, claim);
}

/// The difference between two whole rule sets; names of `old` taken from
/// `new` where the proxy port is the same when `old` has none (read back).
fn whole_update(old: &RuleSet, new: &RuleSet, unnamed: bool) -> Update {
    let diff = if unnamed {
        let mut named = old.clone();
        for (key, target) in named.redirects.iter_mut() {
            if let Some(d) = new.redirects.get(key).filter(|d| d.proxy_port == target.proxy_port) {
                target.service = d.service.clone();
            }
        }
        rules::diff_keys(&named, new)
    } else {
        rules::diff_keys(old, new)
    };
    let rewrite = old.firewall != new.firewall || old.transparent != new.transparent;
    Update { diff, rewrite, ..Update::default() }
}

type ProxyIndex<'a> = HashMap<(&'a ServicePortName, ListenRole), SocketAddr>;

/// The proxy listeners that came and went between two snapshots, found by
/// pointer (the old ones are still held, so no address was reused).
#[derive(Default)]
struct ListenerChanges<'a> {
    /// The very same listeners (then nothing came or went).
    same: bool,
    came: ProxyIndex<'a>,
    /// The roles of each service port's proxy listeners that went.
    went: HashMap<ServicePortName, Vec<ListenRole>>,
    /// The service ports of both.
    names: BTreeSet<ServicePortName>,
}

impl<'a> ListenerChanges<'a> {
    fn between(old: &[Arc<Listener>], new: &'a [Arc<Listener>]) -> Self {
        let same = old.len() == new.len() && old.iter().zip(new).all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return Self { same, ..Self::default() };
        }
        let pointers =
            |ls: &[Arc<Listener>]| -> HashSet<*const Listener> { ls.iter().map(Arc::as_ptr).collect() };
        let (before, after) = (pointers(old), pointers(new));
        let came: ProxyIndex<'a> = new
            .iter()
            .filter(|l| l.key.role.is_proxy() && !before.contains(&Arc::as_ptr(l)))
            .map(|l| ((&l.key.port, l.key.role), l.addr))
            .collect();
        let mut went: HashMap<ServicePortName, Vec<ListenRole>> = HashMap::new();
        for l in old.iter().filter(|l| l.key.role.is_proxy() && !after.contains(&Arc::as_ptr(l))) {
            went.entry(l.key.port.clone()).or_default().push(l.key.role);
        }
        let names = came.keys().map(|(n, _)| (*n).clone()).chain(went.keys().cloned()).collect();
        Self { same, came, went, names }
    }

    fn same() -> Self {
        Self { same: true, ..Self::default() }
    }
}

/// Whether two specs make the same rules given the same inputs: every
/// field [`rules::desired`] reads.
fn same_rule_spec(a: &ServicePort, b: &ServicePort) -> bool {
    a.name == b.name
        && a.protocol == b.protocol
        && a.port == b.port
        && a.cluster_ips == b.cluster_ips
        && a.external_ips == b.external_ips
        && a.load_balancer_ips == b.load_balancer_ips
        && a.load_balancer_source_ranges == b.load_balancer_source_ranges
        && a.proxy_protocol.accept.is_some() == b.proxy_protocol.accept.is_some()
}

/// The port's rules made for it alone, by the code that makes a whole
/// snapshot's; a port without a proxy port claims nothing.
fn claims_of(
    port: &PortState,
    inputs: &Inputs,
    shared: Option<[Option<SocketAddr>; 2]>,
    local: &Locality,
    update: &mut Update,
) -> Claims {
    let (proxy, shared) = inputs.proxy(&port.spec, shared);
    if proxy.iter().all(Option::is_none) {
        return Claims::default();
    }
    let p = PortRules {
        spec: &port.spec,
        proxy,
        external_proxy: inputs.external_proxy(),
        emptiness: inputs.emptiness,
        shared,
    };
    let d = rules::desired([p], local);
    update.open_without_ranges.extend(d.open_without_ranges);
    let mut keys: BTreeMap<RuleKey, Fate> = BTreeMap::new();
    keys.extend(d.rules.redirects.into_iter().map(|(k, t)| (k, Fate::Redirect(t.proxy_port))));
    keys.extend(d.rules.reject.into_iter().map(|k| (k, Fate::Reject)));
    keys.extend(d.rules.dropped.into_iter().map(|k| (k, Fate::Drop)));
    let rare = RareClaims { firewall: d.rules.firewall.into_iter().collect(), wrong_family: d.wrong_family };
    let rare = (!rare.firewall.is_empty() || rare.wrong_family > 0).then(|| Box::new(rare));
    Claims { keys: Keys::from(keys.into_iter().collect::<Vec<_>>()), rare }
}

#[cfg(test)]
#[path = "desired_tests.rs"]
mod tests;
