//! Running the proxy on a manifest source until a stop signal: wiring the
//! source, the control plane, the data plane and the admin server together.
//!
//! Threads: the runtime thread (`ringport-control`) serves the admin
//! endpoints, receives signals and watches the source, and never parses or
//! binds; each load, validation and bind runs on a blocking thread, one
//! at a time, while the last good snapshot keeps serving. Updates that
//! arrive meanwhile are merged into one queued update (`Work::queue`):
//! sources yield each change at once, and this queue is what batches a
//! burst.

mod engine;
mod intercept;
mod source;
mod upgrade;
mod work;

use engine::Engine;

use intercept::start_redirect;
use source::{Source, next_node};
use upgrade::listen_for_successors;
use work::{Done, Full, Update, Work};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminServers, AdminState, ProxyHealth};
use crate::balance::BalanceOptions;
use crate::balance::health::{HealthPolicy, HealthRegistry};
use crate::budget::Budget;
use crate::config::{ConfigError, Manifests};
use crate::control::{Applied, Control, Rejected};
use crate::dataplane::{DataPlane, Faults, WorkerConfig};
use crate::handover::{self, HandedAdmin, HandoverOptions, Taken};
use crate::listen::{Binder, ListenOptions, node_addresses};
use crate::metrics::Metrics;
use crate::redirect::syncer::Timed;
use crate::redirect::{self, RedirectError, RedirectMode, SyncerThread};
use crate::service_health::ServiceHealth;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::source::Change;
use crate::source::file::{FileLoader, WatchError};
use crate::source::kube::{KubeError, KubeOptions};
use crate::source_ip::SourceOptions;

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
    /// `--proxy-address`: where intercepted IPv4 traffic is DNATed to when
    /// `--bind-address` is the wildcard (put on `lo` by ringport).
    pub proxy_address: std::net::Ipv4Addr,
    /// `--proxy-address6`: the IPv6 one, beside it (a local route on `lo`).
    pub proxy_address6: std::net::Ipv6Addr,
    /// `--transparent`; `ready` is found out at start.
    pub transparent: SourceOptions,
    /// Where the services come from; `config` is read only for `File`.
    pub source: SourceChoice,
    /// Take the listening sockets over from a running instance, and hand
    /// ours to the next (`--handover-socket`); `None`: neither.
    pub handover: Option<HandoverOptions>,
}

/// `--source`: manifest files (the default) or the Kubernetes API.
#[derive(Clone, Debug, Default)]
pub enum SourceChoice {
    #[default]
    File,
    Kube(KubeOptions),
}

impl SourceChoice {
    /// `--redirect` when not given: a node agent wants its rules (`auto`);
    /// serving files must never quietly write a nat table (`none`).
    pub fn default_redirect(&self) -> RedirectMode {
        match self {
            SourceChoice::File => RedirectMode::None,
            SourceChoice::Kube(_) => RedirectMode::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("invalid manifests in {path}:\n{}", lines(&.errors.0))]
    Initial { path: PathBuf, errors: Rejected },
    #[error(transparent)]
    Rejected(#[from] Rejected),
    #[error("cannot start the data plane")]
    DataPlane(#[source] std::io::Error),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error(
        "--proxy-port-mode shared needs redirect rules (--redirect nft, iptables or auto; --source file defaults to none): only a rule's DNAT tells a shared proxy port which service a connection is for"
    )]
    SharedWithoutRules,
    #[error(
        "cannot bind the shared proxy port: without it no TCP service port gets a rule (--proxy-port-mode shared)"
    )]
    SharedPort(#[source] Box<crate::listen::BindError>),
    #[error("cannot start the redirect syncer")]
    RedirectThread(#[source] std::io::Error),
    #[error("cannot start the control-plane runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("the manifest watcher stopped")]
    WatchEnded,
    #[error(
        "{0} data-plane worker(s) failed (see the error logged above); stopped so the process can be restarted"
    )]
    WorkerFailed(usize),
    #[error("a control-plane task panicked")]
    ControlPanicked,
    #[error(
        "the old instance did not answer our handover confirmation, so it may still serve; stopped rather than serve beside it (a restart takes over or binds afresh)"
    )]
    Unconfirmed(#[source] handover::HandoverError),
}

/// Handles a caller (e.g. the demo) may keep to watch the running proxy.
#[derive(Clone)]
pub struct Handles {
    pub snapshot: SharedSnapshot,
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// Data-plane workers that failed.
    pub faults: Arc<Faults>,
}

impl Handles {
    pub fn new(workers: usize) -> Self {
        Self {
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            ready: Arc::new(AtomicBool::new(false)),
            metrics: Arc::new(Metrics::new(workers)),
            faults: Arc::default(),
        }
    }
}

/// Serve until SIGINT or SIGTERM, then drain. A worker that fails stops
/// the whole process the same way, and ends it with an error.
pub fn run(opts: RunOptions, handles: Handles) -> Result<(), RunError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("ringport-control")
        .build()
        .map_err(RunError::Runtime)?;
    let faults = Arc::clone(&handles.faults);
    let wait_after = opts.handover.as_ref().is_some_and(|h| h.wait_after);
    runtime.block_on(async {
        let stopped = serve(opts, handles).await?;
        crate::systemd::notify("STOPPING=1");
        tracing::info!("stopping: no new connections; draining open ones");
        // The drain blocks, so it runs off this thread: the admin endpoints
        // keep answering meanwhile (and /healthz says why we stop).
        let data_plane = stopped.data_plane;
        tokio::task::spawn_blocking(move || data_plane.stop())
            .await
            .map_err(|e| RunError::Runtime(std::io::Error::other(e)))?;
        upgrade::after_drain(stopped.handed_over, stopped.socket_file, wait_after).await
    })?;
    tracing::info!("stopped");
    match faults.count() {
        0 => Ok(()),
        n => Err(RunError::WorkerFailed(n)),
    }
}

/// How [`serve`] ended.
struct Stopped {
    data_plane: DataPlane,
    /// A successor took our sockets over.
    handed_over: bool,
    /// Our handover socket file, if we made one.
    socket_file: Option<handover::SocketFile>,
}

/// The runtime thread answers probes and signals and watches the source;
/// every load, validation and bind runs on a blocking thread (one at a
/// time, see [`Engine`]), so that a slow reload never stalls `/readyz`,
/// `/healthz` or SIGTERM, and the last good snapshot serves meanwhile.
async fn serve(mut opts: RunOptions, handles: Handles) -> Result<Stopped, RunError> {
    // Before a predecessor's sockets arrive: a successor started with a low
    // soft limit would otherwise get a truncated handover and bind afresh.
    if let Err(e) = crate::dataplane::sys::raise_nofile_limit() {
        tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE");
    }
    // The admin endpoints come first: /livez answers and /readyz says 503
    // while a source is still syncing.
    let state = AdminState {
        snapshot: Arc::clone(&handles.snapshot),
        ready: Arc::clone(&handles.ready),
        metrics: Arc::clone(&handles.metrics),
        health: ProxyHealth {
            metrics: Arc::clone(&handles.metrics),
            // kube-proxy's rule: unhealthy when the rules made no progress
            // for twice the sync period.
            sync_stall: (opts.redirect != RedirectMode::None).then_some(redirect::RESYNC * 2),
            started: std::time::Instant::now(),
            faults: Arc::clone(&handles.faults),
        },
        node_eligible: Arc::new(AtomicBool::new(true)),
        handing_over: Arc::new(AtomicBool::new(false)),
    };
    let handing_over = Arc::clone(&state.handing_over);
    let node_eligible = Arc::clone(&state.node_eligible);
    let service_health = ServiceHealth::new(
        node_addresses(&opts.listen.nodeport_addresses),
        opts.balance.locality.node_name.clone(),
        state.health.clone(),
    );
    // Before anything binds: the sockets of the instance we replace.
    let mut taken = upgrade::predecessor(opts.handover.clone()).await?;
    let adopted_admin = taken.as_mut().map(|t| std::mem::take(&mut t.admin)).unwrap_or_default();
    let mut admin_servers = match admin::serve(
        state,
        opts.healthz_bind_address,
        opts.metrics_bind_address,
        adopted_admin,
    )
    .await
    {
        Ok(servers) => servers,
        Err(e) => {
            tracing::error!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "admin endpoints unavailable; proxying goes on");
            AdminServers::default()
        }
    };
    let admin_sockets = admin_servers.sockets();
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Runtime)?;
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Runtime)?;

    // `--zone` wins over the Node's label.
    let zone_fixed = opts.balance.locality.zone.is_some();
    let (mut source, mut node) = Source::start(&mut opts, &handles.metrics).await?;
    let first = matches!(source, Source::File(_)).then_some(Full::Files);
    let faults = Arc::clone(&handles.faults);
    let start_opts = opts.clone();
    let handles_snapshot = Arc::clone(&handles.snapshot);
    let mut engine = tokio::task::spawn_blocking(move || {
        Engine::start(start_opts, handles, service_health, first, taken, admin_sockets)
    })
    .await
    .map_err(|_| RunError::ControlPanicked)??;
    if let Some(e) = engine.unconfirmed.take() {
        return Err(RunError::Unconfirmed(e));
    }
    tracing::info!(config = %opts.config.display(), workers = opts.workers.workers, "serving");
    let (mut confirmed, socket_file) =
        listen_for_successors(opts.handover.as_ref(), handles_snapshot, handing_over, &engine.admin_sockets);
    let mut handed_over = false;

    let mut idle = Some(engine);
    let mut running: Option<JoinHandle<(Engine, Done)>> = None;
    let mut pending = Work::default();
    let mut recheck: Option<tokio::time::Instant> = None;
    loop {
        let queued = tokio::select! {
            next = source.next() => {
                let next = next?;
                pending.triggers.extend(next.triggers);
                pending.counted += next.counted;
                Some((next.update, next.why))
            }
            view = next_node(&mut node) => {
                let view = view?;
                node_eligible.store(view.eligible, std::sync::atomic::Ordering::Release);
                if view.eligible {
                    tracing::info!(zone = ?view.zone, "Node: eligible");
                } else {
                    tracing::warn!(zone = ?view.zone, "Node: being deleted or tainted ToBeDeletedByClusterAutoscaler; /healthz answers 503");
                }
                if !zone_fixed {
                    pending.zone = Some(view.zone);
                }
                None
            }
            Some(()) = hup.recv() => match &source {
                Source::File(_) => Some((Update::Full(Full::Reread), "SIGHUP")),
                Source::Kube(_) => {
                    tracing::info!("SIGHUP: the Kubernetes source is always current; nothing to reload");
                    None
                }
            },
            () = sleep_until(recheck) => {
                recheck = None;
                Some((Update::Full(Full::Files), "recheck of a file gone or being written"))
            }
            done = finished(&mut running) => {
                running = None;
                let (mut back, done) = done.map_err(|_| RunError::ControlPanicked)?;
                if let Some(e) = back.unconfirmed.take() {
                    return Err(RunError::Unconfirmed(e));
                }
                if done.refused {
                    source.refused();
                }
                if done.recheck {
                    recheck = Some(tokio::time::Instant::now() + crate::source::file::SETTLE);
                }
                idle = Some(back);
                None
            }
            Some(()) = confirmed.recv() => {
                tracing::info!("handed over to the successor: stopping");
                admin_servers.stop_accepting();
                handed_over = true;
                break;
            }
            _ = int.recv() => break,
            _ = term.recv() => break,
            () = faults.failed() => break,
        };
        if let Some(update) = queued {
            pending.queue(update);
        }
        if idle.is_some()
            && !pending.is_empty()
            && let Some(mut engine) = idle.take()
        {
            let work = std::mem::take(&mut pending);
            running = Some(tokio::task::spawn_blocking(move || {
                let done = engine.work(work);
                (engine, done)
            }));
        }
    }
    engine = match (idle, running) {
        (Some(engine), _) => engine,
        (None, Some(reload)) => {
            tracing::info!("waiting for the reload in progress before stopping");
            reload.await.map_err(|_| RunError::ControlPanicked)?.0
        }
        // Unreachable: the engine is idle or with the running reload.
        (None, None) => return Err(RunError::ControlPanicked),
    };
    Ok(Stopped { handed_over, data_plane: engine.data_plane, socket_file })
}

/// The reload in flight, if any; pending forever otherwise.
async fn finished<T>(running: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match running {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn lines(errors: &[ConfigError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_defaults_to_none_for_files_and_auto_for_the_api() {
        assert_eq!(SourceChoice::File.default_redirect(), RedirectMode::None);
        assert_eq!(SourceChoice::Kube(KubeOptions::default()).default_redirect(), RedirectMode::Auto);
    }
}
