//! Running the proxy on a manifest source until a stop signal: wiring the
//! source, the control plane, the data plane and the admin server together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{self, AdminState};
use crate::balance::BalanceOptions;
use crate::balance::health::{HealthPolicy, HealthRegistry};
use crate::config::ConfigErrors;
use crate::control::{Control, Rejected};
use crate::dataplane::listen::{Binder, ListenOptions};
use crate::dataplane::{DataPlane, WorkerConfig};
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::source::file::{FileSource, WatchError};
use crate::source::kube::{Filter, KubeError, KubeOptions, KubeSource};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    pub listen: ListenOptions,
    pub workers: WorkerConfig,
    pub balance: BalanceOptions,
    pub health: HealthPolicy,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    /// Where the services come from; `config` is read only for `File`.
    pub source: SourceChoice,
}

/// `--source`: manifest files (the default) or the Kubernetes API.
#[derive(Clone, Debug, Default)]
pub enum SourceChoice {
    #[default]
    File,
    Kube(KubeOptions),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("invalid manifests in {path}:\n{errors}")]
    Initial { path: PathBuf, errors: ConfigErrors },
    #[error(transparent)]
    Rejected(#[from] Rejected),
    #[error("cannot start the data plane")]
    DataPlane(#[source] std::io::Error),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("cannot start the control-plane runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Kube(#[from] KubeError),
}

/// Handles a caller (e.g. the demo) may keep to watch the running proxy.
#[derive(Clone)]
pub struct Handles {
    pub snapshot: SharedSnapshot,
    pub ready: Arc<AtomicBool>,
}

impl Handles {
    pub fn new() -> Self {
        Self {
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            ready: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Default for Handles {
    fn default() -> Self {
        Self::new()
    }
}

/// Serve until SIGINT or SIGTERM, then drain.
pub fn run(opts: RunOptions, handles: Handles) -> Result<(), RunError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("ringport-control")
        .build()
        .map_err(RunError::Runtime)?;
    let data_plane = match opts.source.clone() {
        SourceChoice::File => runtime.block_on(serve(opts, handles))?,
        SourceChoice::Kube(kube) => runtime.block_on(serve_kube(opts, kube, handles))?,
    };
    tracing::info!("stopping: no new connections; draining open ones");
    data_plane.stop();
    tracing::info!("stopped");
    Ok(())
}

async fn serve(opts: RunOptions, handles: Handles) -> Result<DataPlane, RunError> {
    let mut source = FileSource::watch(&opts.config)?;
    let manifests =
        source.load().map_err(|errors| RunError::Initial { path: opts.config.clone(), errors })?;
    let data_plane =
        DataPlane::start(Arc::clone(&handles.snapshot), opts.workers.clone()).map_err(RunError::DataPlane)?;
    let mut control = Control::new(
        Binder::new(opts.listen.clone()),
        opts.balance.clone(),
        HealthRegistry::new(opts.health, std::time::Instant::now()),
        Arc::clone(&handles.snapshot),
        Arc::clone(&handles.ready),
    );
    let applied = control.replace(manifests, &data_plane)?;
    tracing::info!(
        config = %opts.config.display(),
        workers = opts.workers.workers,
        generation = applied.generation,
        service_ports = applied.service_ports,
        listeners = applied.listeners,
        "serving"
    );
    let state = AdminState { snapshot: Arc::clone(&handles.snapshot), ready: Arc::clone(&handles.ready) };
    if let Err(e) = admin::serve(state, opts.healthz_bind_address, opts.metrics_bind_address).await {
        tracing::error!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "admin endpoints unavailable; proxying goes on");
    }

    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Runtime)?;
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Runtime)?;
    loop {
        let why = tokio::select! {
            Some(()) = source.changed() => "file change",
            Some(()) = hup.recv() => "SIGHUP",
            _ = int.recv() => break,
            _ = term.recv() => break,
        };
        reload(&source, &mut control, &data_plane, why);
    }
    Ok(data_plane)
}

fn reload(source: &FileSource, control: &mut Control, data_plane: &DataPlane, why: &str) {
    let path = source.path().display();
    let outcome = source
        .load()
        .map_err(|errors| Rejected(errors.into_iter().collect()))
        .and_then(|m| control.replace(m, data_plane));
    match outcome {
        Ok(a) => {
            tracing::info!(config = %path, trigger = why, generation = a.generation, service_ports = a.service_ports, listeners = a.listeners, "reloaded")
        }
        Err(rejected) => {
            for e in &rejected.0 {
                tracing::error!(config = %path, error = %e, "invalid manifest");
            }
            tracing::error!(config = %path, trigger = why, error = %rejected, "reload rejected");
        }
    }
}

/// How long the start waits for this node's Node (its zone) before going
/// on without a zone.
const NODE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The Kubernetes API source. The admin endpoints come up first (`/livez`
/// answers, `/readyz` is 503), the zone is read from this node's Node
/// before anything is published, and the first publish (which makes
/// `/readyz` 200) waits for both watchers' initial lists.
async fn serve_kube(
    mut opts: RunOptions,
    kube: KubeOptions,
    handles: Handles,
) -> Result<DataPlane, RunError> {
    let state = AdminState { snapshot: Arc::clone(&handles.snapshot), ready: Arc::clone(&handles.ready) };
    if let Err(e) = admin::serve(state, opts.healthz_bind_address, opts.metrics_bind_address).await {
        tracing::error!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "admin endpoints unavailable; proxying goes on");
    }
    let client = crate::source::kube::client(kube.kubeconfig.as_deref()).await?;
    let locality = &mut opts.balance.locality;
    match (&locality.zone, &locality.node_name) {
        (Some(zone), _) => tracing::info!(%zone, "zone from --zone"),
        (None, None) => tracing::warn!("no node name: no zone, Local policies match no endpoint"),
        (None, Some(node)) => {
            match crate::source::kube::node_zone(client.clone(), node, NODE_TIMEOUT).await {
                Ok(Some(zone)) => {
                    tracing::info!(node = %node, %zone, "zone from the Node's label");
                    locality.zone = Some(zone);
                }
                Ok(None) => tracing::info!(node = %node, "the Node has no zone label"),
                Err(e) => {
                    tracing::warn!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "going on without a zone")
                }
            }
        }
    }
    let data_plane =
        DataPlane::start(Arc::clone(&handles.snapshot), opts.workers.clone()).map_err(RunError::DataPlane)?;
    let mut control = Control::new(
        Binder::new(opts.listen.clone()),
        opts.balance.clone(),
        HealthRegistry::new(opts.health, std::time::Instant::now()),
        Arc::clone(&handles.snapshot),
        Arc::clone(&handles.ready),
    )
    .tolerate_cross_object_errors();
    let mut source = KubeSource::watch(client, Filter { service_proxy_name: kube.service_proxy_name });
    tracing::info!("waiting for the initial lists of Services and EndpointSlices; /readyz is 503 until then");

    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Runtime)?;
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Runtime)?;
    loop {
        let manifests = tokio::select! {
            manifests = source.next() => manifests?,
            _ = int.recv() => break,
            _ = term.recv() => break,
        };
        match control.replace(manifests, &data_plane) {
            Ok(a) => {
                tracing::info!(
                    generation = a.generation,
                    service_ports = a.service_ports,
                    listeners = a.listeners,
                    "applied"
                )
            }
            Err(rejected) => {
                for e in &rejected.0 {
                    tracing::error!(error = %e, "invalid object");
                }
                tracing::error!(error = %rejected, "update rejected");
            }
        }
    }
    Ok(data_plane)
}
