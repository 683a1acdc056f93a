//! A first sync's claims, settled without the claimants table: every
//! port's claims are new, so instead of a table entry (and a list) per
//! key, which a key told by its rule alone gives back at once, the claims
//! are listed, sorted by key and, within a key, by name (the order the
//! entries are in), and each key's run settled as `settle` settles a key.
//! At 100k keys that is one 28-byte row each, sorted in place, not ~120
//! bytes each in a hash table at the moment the load peaks.
//!
//! Invariant: the outcome (rules, diff, clashes, claimants) is what
//! `claim` then `settle` make of the same claims (the randomized
//! whole-versus-incremental tests start from nothing each time).

use super::rules::{RuleKey, Target};
use super::{DesiredRules, Entry, Fate, SortedRules, Update};

impl DesiredRules {
    /// Whether an update starts from nothing: no entry, rule or claim.
    pub(super) fn holds_nothing(&self) -> bool {
        self.entries.len() == 0
            && self.claimants.is_empty()
            && self.rules.redirects.is_empty()
            && self.rules.reject.is_empty()
            && self.rules.dropped.is_empty()
    }

    /// Give each key its first claimant by name, every port's claims new.
    pub(super) fn settle_first(&mut self, update: &mut Update) {
        let Self { entries, claimants, rules, .. } = self;
        let all: Vec<&Entry> = entries.iter().collect();
        let mut claims: Vec<(RuleKey, u32, Fate)> = Vec::new();
        for (i, e) in all.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            claims.extend(e.claims.keys.as_slice().iter().map(|(key, fate)| (*key, i, fate.clone())));
        }
        claims.sort_unstable_by_key(|c| (c.0, c.1));
        let name = |i: u32| &all[i as usize].port.spec.name;
        let mut adds = SortedRules::default();
        for run in claims.chunk_by(|a, b| a.0 == b.0) {
            let (key, first, fate) = &run[0];
            for (_, lost, _) in &run[1..] {
                update.clashes.push((*key, name(*first).clone(), name(*lost).clone()));
            }
            match fate {
                Fate::Redirect(p) => adds.push(*key, Target::new(*p, &all[*first as usize].port.spec)),
                Fate::Reject => {
                    rules.reject.insert(*key);
                    update.diff.reject.push(*key);
                }
                Fate::Drop => {
                    rules.dropped.insert(*key);
                    update.diff.drop.push(*key);
                }
            }
            // A key one port alone redirects is told by its rule.
            if run.len() > 1 || !matches!(fate, Fate::Redirect(_)) {
                claimants.insert(*key, run.iter().map(|(_, i, f)| (name(*i).clone(), f.clone())).collect());
            }
        }
        drop(claims);
        rules.redirects = adds.finish();
        update.diff.add = rules.redirects.iter().map(|(k, t)| (*k, t.proxy_port)).collect();
    }
}
