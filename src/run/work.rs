//! What waits for the engine: the update queued behind the one being
//! applied, and how a new update folds into it. This queue is what batches
//! a burst: sources yield each change at once, and everything that arrives
//! while an apply runs becomes one update.

use crate::config::Manifests;
use crate::metrics::Changes;
use crate::table::Delta;

/// What waits for the engine: the latest source update, and the latest
/// zone of the Node (each kept separately, so neither hides the other).
#[derive(Default)]
pub(super) struct Work {
    pub update: Option<(Update, &'static str)>,
    pub zone: Option<Option<String>>,
    /// The trigger times of the EndpointSlice changes queued updates
    /// carry, kept when a newer update replaces an older one.
    pub triggers: Vec<std::time::SystemTime>,
    /// The changes queued updates carry that were counted pending: no
    /// longer pending once the update is applied (or refused).
    pub counted: Changes,
}

/// What the engine's work came to.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Done {
    /// A file gone or being written was kept: read the files again soon.
    pub recheck: bool,
    /// The control plane refused a source's update.
    pub refused: bool,
}

impl Work {
    pub fn is_empty(&self) -> bool {
        self.update.is_none() && self.zone.is_none()
    }

    /// Queue `update` behind what waits: a newer full state replaces
    /// whatever is queued (it includes every earlier change); a change is
    /// folded into a queued change, and kept behind a queued full state.
    pub fn queue(&mut self, (update, why): (Update, &'static str)) {
        self.update = Some(match (self.update.take(), update) {
            (Some((Update::Changes(mut queued), _)), Update::Changes(later)) => {
                queued.merge(later);
                (Update::Changes(queued), why)
            }
            (Some((Update::Then(full, mut queued), first)), Update::Changes(later)) => {
                queued.merge(later);
                (Update::Then(full, queued), first)
            }
            (Some((Update::Full(full), first)), Update::Changes(later)) => (Update::Then(full, later), first),
            // A later change on disk does not undo a SIGHUP's reread.
            (Some((Update::Full(Full::Reread), first)), Update::Full(Full::Files)) => {
                (Update::Full(Full::Reread), first)
            }
            (_, update) => (update, why),
        });
    }
}

/// What to apply: a full state, a change to some objects, or a full state
/// then a change.
pub(super) enum Update {
    Full(Full),
    Changes(Delta),
    Then(Full, Delta),
}

/// A full state: the files as they are on disk now (read on the blocking
/// thread: the files that changed since the last load, and the loader
/// sends what changed in them), the same with every file read again
/// (SIGHUP), or the API's.
pub(super) enum Full {
    Files,
    Reread,
    Manifests(Manifests),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> crate::model::ServiceName {
        crate::model::ServiceName { namespace: "default".into(), name: name.into() }
    }

    fn removing(name: &str) -> Update {
        let mut delta = Delta::default();
        delta.services.insert(named(name), None);
        Update::Changes(delta)
    }

    fn changed(update: &Update) -> Vec<String> {
        let delta = match update {
            Update::Changes(d) | Update::Then(_, d) => d,
            Update::Full(_) => return Vec::new(),
        };
        delta.services.keys().map(|n| n.name.to_string()).collect()
    }

    #[test]
    fn queued_changes_merge_and_a_full_state_replaces_them_but_not_later_ones() {
        let mut work = Work::default();
        work.queue((removing("a"), "one"));
        work.queue((removing("b"), "two"));
        let (update, why) = work.update.as_ref().unwrap();
        assert_eq!((changed(update), *why), (vec!["a".to_owned(), "b".to_owned()], "two"));

        work.queue((Update::Full(Full::Files), "full"));
        assert!(
            matches!(work.update, Some((Update::Full(Full::Files), "full"))),
            "a full state includes them"
        );

        work.queue((removing("c"), "three"));
        work.queue((removing("d"), "four"));
        let (update, why) = work.update.as_ref().unwrap();
        assert!(matches!(update, Update::Then(Full::Files, _)), "the full state still comes first");
        assert_eq!((changed(update), *why), (vec!["c".to_owned(), "d".to_owned()], "full"));
    }
}
