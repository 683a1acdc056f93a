//! The redirects of a first sync, built as their keys come (in order):
//! in runs, each made a B-tree and appended to the whole. A B-tree built
//! from a whole sorted list has full nodes (inserted one by one in key
//! order, they are left half full), but the standard library's builder
//! sorts its input first, with a scratch buffer as large as the list: at
//! 100k keys, 8 MB besides the list's own 8 MB, at the moment the process
//! peaks. A run is at most an eighth of what is built so far, so the
//! extra is an eighth, and the appends (each a walk over the tree so far,
//! rebuilding it with full nodes and freeing its old nodes as it goes)
//! cost a few walks of the whole in all.
//!
//! Invariant: keys are pushed in strictly increasing order (a `BTreeSet`
//! walk), so a run never overlaps what is already built.

use super::rules::{RuleKey, Rules, Target};

/// The smallest run made a tree: below it, an append costs more than the
/// scratch it spares. Tests use tiny runs, so a few keys already append.
const MIN_RUN: usize = if cfg!(test) { 3 } else { 4096 };

#[derive(Default)]
pub(super) struct SortedRules {
    built: Rules,
    run: Vec<(RuleKey, Target)>,
}

impl SortedRules {
    /// Add `key`, greater than every key pushed before.
    pub(super) fn push(&mut self, key: RuleKey, target: Target) {
        let last = self.run.last().map(|(k, _)| k).or(self.built.last_key_value().map(|(k, _)| k));
        debug_assert!(last.is_none_or(|k| *k < key), "keys come in order");
        self.run.push((key, target));
        if self.run.len() >= MIN_RUN.max(self.built.len() / 8) {
            self.append_run();
        }
    }

    fn append_run(&mut self) {
        // Collected in place: the run's own buffer becomes the sort's input.
        let mut run: Rules = std::mem::take(&mut self.run).into_iter().collect();
        self.built.append(&mut run);
    }

    pub(super) fn finish(mut self) -> Rules {
        self.append_run();
        self.built
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ProxyPort, ServiceName, ServicePortName, ServiceVip};

    #[test]
    fn keys_pushed_in_order_make_the_map_they_would_collect_into() {
        let service = ServicePortName { service: ServiceName::new("default", "web"), port: "".into() };
        let entry = |i: u32| {
            let key = RuleKey {
                protocol: Protocol::Tcp,
                daddr: ServiceVip(std::net::Ipv4Addr::from(0x0a60_0000 + i).into()),
                dport: 80,
            };
            (key, Target::named(ProxyPort(i as u16), service.clone()))
        };
        for n in [0, 1, 2, 3, 4, 7, 100, 1000] {
            let mut sorted = SortedRules::default();
            for i in 0..n {
                let (k, t) = entry(i);
                sorted.push(k, t);
            }
            let want: Rules = (0..n).map(entry).collect();
            let got = sorted.finish();
            assert_eq!(got.len(), n as usize);
            assert_eq!(got, want, "{n} keys");
        }
    }
}
