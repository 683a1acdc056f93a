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
use crate::metrics::Metrics;
use crate::redirect::{self, RedirectError, RedirectMode, Syncer, SyncerThread};
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::source::file::{FileSource, WatchError};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    pub listen: ListenOptions,
    pub workers: WorkerConfig,
    pub balance: BalanceOptions,
    pub health: HealthPolicy,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    pub redirect: RedirectMode,
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
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error("cannot start the redirect syncer")]
    RedirectThread(#[source] std::io::Error),
    #[error("cannot start the control-plane runtime")]
    Runtime(#[source] std::io::Error),
}

/// Handles a caller (e.g. the demo) may keep to watch the running proxy.
#[derive(Clone)]
pub struct Handles {
    pub snapshot: SharedSnapshot,
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
}

impl Handles {
    pub fn new(workers: usize) -> Self {
        Self {
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            ready: Arc::new(AtomicBool::new(false)),
            metrics: Arc::new(Metrics::new(workers)),
        }
    }
}

/// Serve until SIGINT or SIGTERM, then drain.
pub fn run(opts: RunOptions, handles: Handles) -> Result<(), RunError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("ringport-control")
        .build()
        .map_err(RunError::Runtime)?;
    let data_plane = runtime.block_on(serve(opts, handles))?;
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
    // Ready means the sources have synced *and* their rules are in place:
    // the syncer sets `handles.ready`, Control only its own flag.
    let redirect = start_redirect(&opts, Arc::clone(&handles.ready))?;
    let mut control = Control::new(
        Binder::new(opts.listen.clone()),
        opts.balance.clone(),
        HealthRegistry::new(opts.health, std::time::Instant::now()),
        Arc::clone(&handles.metrics),
        Arc::clone(&handles.snapshot),
        Arc::new(AtomicBool::new(false)),
    );
    let applied = control.replace(manifests, &data_plane)?;
    redirect.publish(control.current());
    tracing::info!(
        config = %opts.config.display(),
        workers = opts.workers.workers,
        generation = applied.generation,
        service_ports = applied.service_ports,
        listeners = applied.listeners,
        "serving"
    );
    let state = AdminState {
        snapshot: Arc::clone(&handles.snapshot),
        ready: Arc::clone(&handles.ready),
        metrics: Arc::clone(&handles.metrics),
    };
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
        reload(&source, &mut control, &data_plane, &redirect, &handles.metrics, why);
    }
    Ok(data_plane)
}

/// The redirect syncer for `--redirect`, on its own thread.
fn start_redirect(opts: &RunOptions, ready: Arc<AtomicBool>) -> Result<SyncerThread, RunError> {
    let backend = redirect::backend(opts.redirect)?;
    let bind = opts.listen.bind_address;
    if backend.name() != "none" && !bind.is_unspecified() {
        tracing::warn!(bind_address = %bind, "redirected traffic arrives on the receiving interface's address (127.0.0.1 from the node itself); a proxy port on one specific --bind-address will not accept all of it");
    }
    tracing::info!(backend = backend.name(), "redirect rules");
    SyncerThread::spawn(Syncer::new(backend), ready).map_err(RunError::RedirectThread)
}

fn reload(
    source: &FileSource,
    control: &mut Control,
    data_plane: &DataPlane,
    redirect: &SyncerThread,
    metrics: &Metrics,
    why: &str,
) {
    let path = source.path().display();
    let outcome = source
        .load()
        .map_err(|errors| Rejected(errors.into_iter().collect()))
        .and_then(|m| control.replace(m, data_plane));
    let counter = if outcome.is_ok() { &metrics.reloads_applied } else { &metrics.reloads_rejected };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match outcome {
        Ok(a) => {
            redirect.publish(control.current());
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
