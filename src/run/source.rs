//! Where the services come from, for `run`: manifest files or the
//! Kubernetes API (with a watch on this node's Node), as one stream of
//! updates.

use std::sync::Arc;

use super::{Full, RunError, RunOptions, SourceChoice, Update};
use crate::metrics::Metrics;
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

    /// The trigger times of the EndpointSlice changes in the state `next`
    /// last yielded (none from files).
    pub(super) fn take_triggers(&mut self) -> Vec<std::time::SystemTime> {
        match self {
            Source::File(_) => Vec::new(),
            Source::Kube(kube) => kube.take_triggers(),
        }
    }

    /// The next update, and what triggered it.
    pub(super) async fn next(&mut self) -> Result<(Update, &'static str), RunError> {
        match self {
            Source::File(file) => {
                if file.changed().await.is_none() {
                    return Err(RunError::WatchEnded);
                }
                Ok((Update::Full(Full::Files), "file change"))
            }
            Source::Kube(kube) => Ok((Update::Full(Full::Manifests(kube.next().await?)), "API change")),
        }
    }
}
