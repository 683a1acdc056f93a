//! Where the services come from, for `run`: manifest files or the
//! Kubernetes API (with a watch on this node's Node), as one stream of
//! updates.

use std::sync::Arc;

use super::{Full, RunError, RunOptions, SourceChoice, Update};
use crate::metrics::{Changes, Metrics};
use crate::source::Change;
use crate::source::file::FileSource;
use crate::source::kube::{Filter, KubeError, KubeSource, NodeView, NodeWatch};

/// Where the services come from.
pub(super) enum Source {
    File(FileSource),
    Kube(Box<KubeSource>),
}

/// The Node watch's next view; never, without one.
pub(super) async fn next_node(node: &mut Option<NodeWatch>) -> Result<NodeView, KubeError> {
    match node {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

impl Source {
    /// Start the source chosen by `opts`. The Kubernetes source yields its
    /// first state once both watchers have listed (counting each change as
    /// pending in `metrics` as it arrives), and comes with a watch on this
    /// node's Node (its zone and eligibility) when the node has a name.
    pub(super) async fn start(
        opts: &mut RunOptions,
        metrics: &Arc<Metrics>,
    ) -> Result<(Source, Option<NodeWatch>), RunError> {
        match opts.source.clone() {
            SourceChoice::File => Ok((Source::File(FileSource::watch(&opts.config)?), None)),
            SourceChoice::Kube(kube) => {
                let client =
                    crate::source::kube::client(kube.kubeconfig.as_deref(), kube.master.as_deref()).await?;
                let locality = &opts.balance.locality;
                let node = match (&locality.node_name, &locality.zone) {
                    (None, _) => {
                        tracing::warn!(
                            "no node name: no Node watch, no zone, Local policies match no endpoint"
                        );
                        None
                    }
                    (Some(name), zone) => {
                        tracing::info!(node = %name, zone_flag = ?zone, "watching this node's Node (zone label, eligibility)");
                        Some(NodeWatch::watch(client.clone(), name))
                    }
                };
                let filter = Filter { service_proxy_name: kube.service_proxy_name };
                tracing::info!(
                    "waiting for the initial lists of Services and EndpointSlices; /readyz is 503 until then"
                );
                let source = KubeSource::watch(client, filter).with_metrics(Arc::clone(metrics));
                Ok((Source::Kube(Box::new(source)), node))
            }
        }
    }

    /// The next update, what triggered it, and what it carries for the
    /// metrics.
    pub(super) async fn next(&mut self) -> Result<Next, RunError> {
        match self {
            Source::File(file) => {
                if file.changed().await.is_none() {
                    return Err(RunError::WatchEnded);
                }
                // The engine reads the changed files: their trigger times
                // come with what it reads.
                Ok(Next::new(Update::Full(Full::Files), "file change"))
            }
            Source::Kube(kube) => {
                let update = match kube.next().await? {
                    Change::Whole(m) => Update::Full(Full::Manifests(m)),
                    Change::Delta(d) => Update::Changes(d),
                };
                let mut next = Next::new(update, "API change");
                next.triggers = kube.take_triggers();
                next.counted = kube.take_counted();
                Ok(next)
            }
        }
    }

    /// The control plane refused the last update it was given.
    pub(super) fn refused(&mut self) {
        if let Source::Kube(kube) = self {
            kube.resync();
        }
    }
}

/// One update from the source.
pub(super) struct Next {
    pub update: Update,
    pub why: &'static str,
    /// The trigger times of the EndpointSlice changes it carries.
    pub triggers: Vec<std::time::SystemTime>,
    /// The changes it carries that were counted pending.
    pub counted: Changes,
}

impl Next {
    fn new(update: Update, why: &'static str) -> Self {
        Self { update, why, triggers: Vec::new(), counted: Changes::default() }
    }
}
