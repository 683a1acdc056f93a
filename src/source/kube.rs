//! Services and EndpointSlices from the Kubernetes API, through `kube`'s
//! runtime watchers, as whole-state updates for the control plane.
//!
//! **Table updates: the whole state once, then deltas.** The source keeps
//! the last good version of every object itself ([`ClusterState`]) and
//! yields the whole state first (`Manifests`, for the control plane's
//! `replace`), then only the objects touched since ([`Delta`](crate::table::Delta), for
//! `apply`), so one changed EndpointSlice costs the table one Service's
//! worth of work, not a join over every object. Per-object validity lives
//! here: an invalid object is logged (namespace/name/field) and its
//! previous version kept, so the table only ever sees valid objects.
//! Cross-object findings (`join`'s errors, e.g. a named targetPort no slice
//! carries) cannot be pinned on one object's last good version, so for this
//! source they are logged and the rest served: the control plane is told to
//! tolerate them (`Control::tolerate_cross_object_errors`), as kube-proxy
//! would, rather than freeze the whole node on one odd Service.
//!
//! **Readiness.** Nothing is yielded until both watchers have delivered
//! their initial list (`Init` .. `InitDone`), so the first publish (which
//! makes `/readyz` answer 200) is the complete state, swapped in once.
//!
//! **Recovery.** The watchers carry `default_backoff()` (exponential, 0.8 s
//! to 30 s, jittered): a dropped stream re-watches from the last resource
//! version (a BOOKMARK advances it), a 410 Gone relists, and an API error is
//! logged and retried. Errors never touch the state, so the last good
//! snapshot keeps serving while the API is away; a relist is swapped in
//! only at its `InitDone`.
//!
//! **This node's Node** is watched apart ([`NodeWatch`]): its zone and
//! eligibility are not Manifests, and reach the balancers and `/healthz`
//! through the run loop, not the table.
//!
//! **Reaching the API.** [`client`] takes `--master` over any kubeconfig
//! or in-cluster server: a node agent must reach the API server by its
//! real address, since the `kubernetes` Service only works once ringport's
//! own rules exist.
//!
//! **No wait.** An update is yielded as soon as a change is handled,
//! together with every event that has already arrived (up to
//! [`MAX_BATCH`] of them): no timer holds a change back. A storm is
//! batched downstream instead: while the control plane applies one update,
//! the run loop merges the deltas that arrive into the next one (its
//! `Work::queue`), so a burst costs a few applies, however long it lasts,
//! and a lone change is applied at once (kube-proxy's `minSyncPeriod`
//! without its fixed wait).

mod node;
mod state;
#[cfg(test)]
mod tests;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use crate::metrics::{Changes, Metrics};

pub use node::{NodeView, NodeWatch, TO_BE_DELETED_TAINT};
pub use state::{API_ORIGIN, ClusterState, Filter, Outcome, SERVICE_PROXY_NAME_LABEL};

use crate::config::Manifests;
use crate::source::Change;

/// The most events already arrived that one update takes in, so a flood
/// cannot hold an update back.
pub const MAX_BATCH: usize = 1024;

/// The Node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// EndpointSlices of headless Services carry this label; kube-proxy does
/// not watch them, and neither do we (their Service is skipped anyway).
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// How the source reaches the API and which Services it serves.
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    /// `None`: in-cluster configuration (or `KUBECONFIG`, through
    /// `kube::Config::infer`).
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: the API server's address, overriding the kubeconfig's
    /// (or the in-cluster one), as kube-proxy's flag does.
    pub master: Option<String>,
    pub service_proxy_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot load kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes client configuration: not in a cluster and no kubeconfig (give --kubeconfig)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("--master {value:?} is not a URL")]
    Master {
        value: String,
        #[source]
        source: axum::http::uri::InvalidUri,
    },
    #[error("--master {0:?} needs a scheme and a host, e.g. https://10.0.0.1:6443")]
    MasterIncomplete(String),
    #[error("cannot build the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("the {0} watch stream ended")]
    StreamEnded(&'static str),
}

/// A client from `--kubeconfig`, or the in-cluster configuration; `master`
/// (`--master`) replaces the server either names.
///
/// With `--master` and no kubeconfig anywhere, the pod's ServiceAccount
/// token and CA are still used (read from their files: no
/// `KUBERNETES_SERVICE_HOST` needed), and outside a pod the client goes
/// without credentials, as kube-proxy's `--master` does. This is what lets
/// a node agent reach the API server before any Service rule exists.
pub async fn client(kubeconfig: Option<&std::path::Path>, master: Option<&str>) -> Result<Client, KubeError> {
    let master = master.map(parse_master).transpose()?;
    let mut config = match (kubeconfig, &master) {
        (Some(path), _) => {
            let err = |source| KubeError::Kubeconfig { path: path.to_path_buf(), source };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        (None, None) => kube::Config::infer().await.map_err(KubeError::Infer)?,
        (None, Some(url)) => match kube::Config::infer().await {
            Ok(config) => config,
            // `infer`'s in-cluster step needs KUBERNETES_SERVICE_HOST; with
            // --master only the token and CA files matter.
            Err(_) => kube::Config::incluster_dns().unwrap_or_else(|_| kube::Config::new(url.clone())),
        },
    };
    if let Some(url) = master {
        config.cluster_url = url;
    }
    tracing::info!(api = %config.cluster_url, "Kubernetes API");
    Client::try_from(config).map_err(KubeError::Client)
}

fn parse_master(value: &str) -> Result<axum::http::Uri, KubeError> {
    let uri: axum::http::Uri =
        value.parse().map_err(|source| KubeError::Master { value: value.to_owned(), source })?;
    if uri.scheme().is_none() || uri.host().is_none() {
        return Err(KubeError::MasterIncomplete(value.to_owned()));
    }
    Ok(uri)
}

/// One watcher's stream, boxed so tests can substitute synthetic events.
pub type Events<K> = Pin<Box<dyn Stream<Item = Result<Event<K>, watcher::Error>> + Send>>;

/// The Service and EndpointSlice watchers and the state they feed.
pub struct KubeSource {
    services: Events<Service>,
    slices: Events<EndpointSlice>,
    state: ClusterState,
    /// Where changes are counted as pending as they arrive (the control
    /// plane resets the count when it publishes them).
    metrics: Option<Arc<Metrics>>,
    /// The trigger times of the slice changes in the last update yielded.
    triggers: Vec<std::time::SystemTime>,
    /// The changes counted pending since the last update yielded.
    counted: Changes,
}

impl KubeSource {
    /// Watch every namespace through `client`.
    pub fn watch(client: Client, filter: Filter) -> Self {
        // Server-side filtering only where it is exact: headless slices.
        // The service-proxy-name rule ("absent, or equal to ours") has no
        // label-selector form, so it is applied to each Service here.
        let services = watcher::watcher(Api::<Service>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .boxed();
        let slice_config = watcher::Config::default().labels(&format!("!{HEADLESS_LABEL}"));
        let slices =
            watcher::watcher(Api::<EndpointSlice>::all(client), slice_config).default_backoff().boxed();
        Self::from_streams(services, slices, filter)
    }

    /// A source over any event streams (tests feed synthetic ones).
    pub fn from_streams(services: Events<Service>, slices: Events<EndpointSlice>, filter: Filter) -> Self {
        Self {
            services,
            slices,
            state: ClusterState::new(filter),
            metrics: None,
            triggers: Vec::new(),
            counted: Changes::default(),
        }
    }

    /// Count each change as pending in `metrics` until it is published.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Both watchers have delivered their initial list.
    pub fn synced(&self) -> bool {
        self.state.synced()
    }

    /// The next update to publish: the whole state once both watchers have
    /// listed, then the objects touched since, as soon as one is (module
    /// header). Stream errors are logged and retried (with backoff) inside;
    /// only a stream that ends is an error.
    pub async fn next(&mut self) -> Result<Change, KubeError> {
        loop {
            while !self.state.pending() {
                self.step().await?;
            }
            // What has already arrived rides along; nothing is waited for.
            for _ in 0..MAX_BATCH {
                match self.step().now_or_never() {
                    Some(stepped) => stepped?,
                    None => break,
                }
            }
            if let Some(update) = self.state.take_update() {
                self.triggers = self.state.take_triggers();
                if let Change::Delta(d) = &update {
                    tracing::debug!(
                        services = d.services.len(),
                        slices = d.slices.len(),
                        "API changes yielded"
                    );
                }
                return Ok(update);
            }
        }
    }

    /// The control plane refused the last update: the next one is the
    /// whole state.
    pub fn resync(&mut self) {
        self.state.resync();
    }

    /// The whole state as it would be published now.
    pub fn manifests(&self) -> Manifests {
        self.state.manifests()
    }

    /// The changes counted pending (in the metrics given) that the update
    /// [`KubeSource::next`] last yielded carries: they stop being pending
    /// once it is published.
    pub fn take_counted(&mut self) -> Changes {
        std::mem::take(&mut self.counted)
    }

    /// The `endpoints.kubernetes.io/last-change-trigger-time` of each
    /// EndpointSlice change in the update [`KubeSource::next`] last
    /// yielded, for kube-proxy's network programming latency once it is
    /// served.
    pub fn take_triggers(&mut self) -> Vec<std::time::SystemTime> {
        std::mem::take(&mut self.triggers)
    }

    /// Wait for one event from either watcher and apply it. Cancel-safe:
    /// the only await is on the streams' `next`.
    async fn step(&mut self) -> Result<(), KubeError> {
        tokio::select! {
            event = self.services.next() => match event {
                Some(Ok(event)) => {
                    self.state.handle_service(event);
                }
                Some(Err(e)) => stream_error("Service", &e),
                None => return Err(KubeError::StreamEnded("Service")),
            },
            event = self.slices.next() => match event {
                Some(Ok(event)) => {
                    self.state.handle_slice(event);
                }
                Some(Err(e)) => stream_error("EndpointSlice", &e),
                None => return Err(KubeError::StreamEnded("EndpointSlice")),
            },
        }
        let queued = self.state.take_queued();
        if let Some(metrics) = &self.metrics {
            metrics.apply.queued(queued);
            self.counted += queued;
        }
        Ok(())
    }
}

fn stream_error(kind: &'static str, e: &watcher::Error) {
    // A 410 Gone arrives here too, just before the watcher relists.
    tracing::warn!(
        kind,
        error = %e,
        source = ?std::error::Error::source(e).map(ToString::to_string),
        "watch error; retrying with backoff, the last good state keeps serving"
    );
}
