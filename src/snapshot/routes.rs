//! Which service port each listener serves, as a copy-on-write map in
//! shards: a snapshot built from a change copies only the shards its
//! listeners fall in and shares the others with the previous snapshot, so
//! a one-port change costs a few shards, not every listener's route.

use std::collections::HashMap;
use std::sync::Arc;

use super::PortState;
use crate::balance::eligible::Scope;
use crate::listen::{Listener, ListenerId};
use crate::model::IpFamily;

/// Listener ids are handed out in sequence, so `id % SHARDS` spreads them
/// evenly: 100k listeners make shards of ~400.
const SHARDS: usize = 256;

/// Where a listener's connections go.
#[derive(Debug, Clone)]
pub(super) struct RouteEntry {
    pub listener: Arc<Listener>,
    pub port: Arc<PortState>,
    pub scope: Scope,
    /// The listener's family: a dual-stack port balances each apart.
    pub family: IpFamily,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Routes {
    /// Empty until the first route; then `SHARDS` of them.
    shards: Vec<Arc<HashMap<ListenerId, RouteEntry>>>,
}

fn shard(id: ListenerId) -> usize {
    (id.0 % SHARDS as u64) as usize
}

impl Routes {
    pub(super) fn get(&self, id: ListenerId) -> Option<&RouteEntry> {
        self.shards.get(shard(id))?.get(&id)
    }

    /// These routes without `remove`, with `insert`: the shards neither
    /// touches are shared.
    pub(super) fn with(
        &self,
        remove: &[ListenerId],
        insert: impl IntoIterator<Item = (ListenerId, RouteEntry)>,
    ) -> Self {
        let mut shards = if self.shards.is_empty() {
            (0..SHARDS).map(|_| Arc::default()).collect()
        } else {
            self.shards.clone()
        };
        for id in remove {
            Arc::make_mut(&mut shards[shard(*id)]).remove(id);
        }
        for (id, entry) in insert {
            Arc::make_mut(&mut shards[shard(id)]).insert(id, entry);
        }
        Self { shards }
    }
}
