//! Running the proxy on a manifest source until a stop signal: wiring the
//! source, the control plane, the data plane and the admin server together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{self, AdminState, ProxyHealth};
use crate::balance::BalanceOptions;
use crate::balance::health::{HealthPolicy, HealthRegistry};
use crate::config::{ConfigError, ConfigErrors, Manifests};
use crate::control::{Control, Rejected};
use crate::dataplane::{DataPlane, Faults, WorkerConfig};
use crate::listen::{Binder, ListenOptions, node_addresses};
use crate::metrics::Metrics;
use crate::redirect::{self, Intercept, RedirectError, RedirectMode, Syncer, SyncerThread};
use crate::service_health::ServiceHealth;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::source::file::{FileSource, WatchError};
use crate::source::kube::{Filter, KubeError, KubeOptions, KubeSource, NodeView, NodeWatch};

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
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("the manifest watcher stopped")]
    WatchEnded,
    #[error(
        "{0} data-plane worker(s) failed (see the error logged above); stopped so the process can be restarted"
    )]
    WorkerFailed(usize),
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
    runtime.block_on(async {
        let data_plane = serve(opts, handles).await?;
        crate::systemd::notify("STOPPING=1");
        tracing::info!("stopping: no new connections; draining open ones");
        // The drain blocks, so it runs off this thread: the admin endpoints
        // keep answering meanwhile (and /healthz says why we stop).
        tokio::task::spawn_blocking(move || data_plane.stop())
            .await
            .map_err(|e| RunError::Runtime(std::io::Error::other(e)))
    })?;
    tracing::info!("stopped");
    match faults.count() {
        0 => Ok(()),
        n => Err(RunError::WorkerFailed(n)),
    }
}

async fn serve(mut opts: RunOptions, handles: Handles) -> Result<DataPlane, RunError> {
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
    };
    let node_eligible = Arc::clone(&state.node_eligible);
    let mut service_health = ServiceHealth::new(
        node_addresses(&opts.listen.nodeport_addresses),
        opts.balance.locality.node_name.clone(),
        state.health.clone(),
    );
    if let Err(e) = admin::serve(state, opts.healthz_bind_address, opts.metrics_bind_address).await {
        tracing::error!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "admin endpoints unavailable; proxying goes on");
    }
    // `--zone` wins over the Node's label.
    let zone_fixed = opts.balance.locality.zone.is_some();
    let (mut source, first, mut node) = Source::start(&mut opts).await?;
    let data_plane = DataPlane::start_with_faults(
        Arc::clone(&handles.snapshot),
        opts.workers.clone(),
        Arc::clone(&handles.faults),
    )
    .map_err(RunError::DataPlane)?;
    // Ready means the sources have synced *and* their rules are in place:
    // the syncer sets `handles.ready`, Control only its own flag. The
    // syncer comes before the Binder: it decides where proxy ports listen.
    let redirect = start_redirect(&mut opts, Arc::clone(&handles.ready), Arc::clone(&handles.metrics))?;
    let control = Control::new(
        Binder::new(opts.listen.clone()),
        opts.balance.clone(),
        HealthRegistry::new(opts.health, std::time::Instant::now()),
        Arc::clone(&handles.metrics),
        Arc::clone(&handles.snapshot),
        Arc::new(AtomicBool::new(false)),
    );
    // The API serves objects one by one: a cross-object error concerns one
    // Service, and must not freeze every later update for the node.
    let mut control = match source {
        Source::Kube(_) => control.tolerate_cross_object_errors(),
        Source::File(_) => control,
    };
    let mut plane = Plane {
        control: &mut control,
        data_plane: &data_plane,
        redirect: &redirect,
        service_health: &mut service_health,
        metrics: &handles.metrics,
        notified: false,
    };
    // Before the first publish tells systemd READY=1: a stop that follows
    // at once must drain, not find the default action.
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Runtime)?;
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Runtime)?;
    if let Some(manifests) = first {
        let applied = plane.control.replace(manifests, &data_plane)?;
        plane.published();
        tracing::info!(config = %opts.config.display(), workers = opts.workers.workers, generation = applied.generation, service_ports = applied.service_ports, listeners = applied.listeners, "serving");
    }

    loop {
        tokio::select! {
            update = source.next() => {
                let (update, why) = update?;
                plane.apply(update, why);
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
                    plane.relocate(view.zone);
                }
            }
            Some(()) = hup.recv() => match &source {
                Source::File(file) => plane.apply(reload(file), "SIGHUP"),
                Source::Kube(_) => tracing::info!("SIGHUP: the Kubernetes source is always current; nothing to reload"),
            },
            _ = int.recv() => break,
            _ = term.recv() => break,
            () = handles.faults.failed() => break,
        }
    }
    Ok(data_plane)
}

/// Where the services come from.
enum Source {
    File(FileSource),
    Kube(KubeSource),
}

impl Source {
    /// Start the source chosen by `opts`. The file source is read at once
    /// (an invalid start is an error: there is no last good state yet); the
    /// Kubernetes source yields its first state once both watchers have
    /// listed, and comes with a watch on this node's Node (its zone and
    /// eligibility) when the node has a name.
    async fn start(
        opts: &mut RunOptions,
    ) -> Result<(Source, Option<Manifests>, Option<NodeWatch>), RunError> {
        match opts.source.clone() {
            SourceChoice::File => {
                let source = FileSource::watch(&opts.config)?;
                let manifests = source
                    .load()
                    .map_err(|errors| RunError::Initial { path: opts.config.clone(), errors })?;
                Ok((Source::File(source), Some(manifests), None))
            }
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
                Ok((Source::Kube(KubeSource::watch(client, filter)), None, node))
            }
        }
    }

    /// The next full state, valid or not, and what triggered it.
    async fn next(&mut self) -> Result<(Result<Manifests, Vec<ConfigError>>, &'static str), RunError> {
        match self {
            Source::File(file) => {
                if file.changed().await.is_none() {
                    return Err(RunError::WatchEnded);
                }
                Ok((reload(file), "file change"))
            }
            Source::Kube(kube) => Ok((Ok(kube.next().await?), "API change")),
        }
    }
}

/// The manifests on disk now, valid or not.
fn reload(file: &FileSource) -> Result<Manifests, Vec<ConfigError>> {
    file.load().map_err(|e| e.into_iter().collect())
}

/// The Node watch's next view; never, without one.
async fn next_node(node: &mut Option<NodeWatch>) -> Result<NodeView, KubeError> {
    match node {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

/// What an update goes through: control plane, then redirect rules.
struct Plane<'a> {
    control: &'a mut Control,
    data_plane: &'a DataPlane,
    redirect: &'a SyncerThread,
    service_health: &'a mut ServiceHealth,
    metrics: &'a Metrics,
    /// Whether systemd has been told `READY=1`.
    notified: bool,
}

impl Plane<'_> {
    /// A snapshot was published: what follows it (rules, health checks,
    /// and for the first one systemd's `READY=1`, as `Type=notify` waits).
    fn published(&mut self) {
        let current = self.control.current();
        self.service_health.sync(&current);
        self.redirect.publish(current);
        if !self.notified {
            crate::systemd::notify("READY=1");
            self.notified = true;
        }
    }

    /// Follow the Node's zone label: rebuild the balancers for it.
    fn relocate(&mut self, zone: Option<String>) {
        if self.control.zone() == zone.as_deref() {
            return;
        }
        tracing::info!(zone = ?zone, "zone from the Node's label");
        if let Some(a) = self.control.relocate(zone, self.data_plane) {
            self.published();
            tracing::info!(trigger = "Node zone", generation = a.generation, "reloaded");
        }
    }

    /// Apply a source's new state, or log why it was rejected (the last good
    /// state keeps serving).
    fn apply(&mut self, update: Result<Manifests, Vec<ConfigError>>, why: &str) {
        let outcome = update.map_err(Rejected).and_then(|m| self.control.replace(m, self.data_plane));
        let counter =
            if outcome.is_ok() { &self.metrics.reloads_applied } else { &self.metrics.reloads_rejected };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match outcome {
            Ok(a) => {
                self.published();
                tracing::info!(
                    trigger = why,
                    generation = a.generation,
                    service_ports = a.service_ports,
                    listeners = a.listeners,
                    "reloaded"
                );
            }
            Err(rejected) => {
                for e in &rejected.0 {
                    tracing::error!(error = %e, "invalid manifest");
                }
                tracing::error!(trigger = why, error = %rejected, "reload rejected");
            }
        }
    }
}

/// The redirect syncer for `--redirect`, on its own thread. With rules,
/// proxy ports listen on one address the rules DNAT to: `--bind-address`
/// when it names one, else the proxy address, put on `lo` here.
fn start_redirect(
    opts: &mut RunOptions,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> Result<SyncerThread, RunError> {
    let bind = opts.listen.bind_address;
    let to = match bind {
        _ if opts.redirect == RedirectMode::None => Intercept::Redirect,
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => Intercept::ProxyAddress(opts.proxy_address),
        std::net::IpAddr::V4(v4) => {
            if v4.is_loopback() {
                tracing::warn!(bind_address = %bind, "traffic from other interfaces DNATed to a loopback address is dropped as martian; pods and other hosts will not reach cluster IPs");
            }
            Intercept::Dnat(v4)
        }
        std::net::IpAddr::V6(_) => {
            tracing::warn!(bind_address = %bind, "IPv6 --bind-address: traffic is REDIRECTed, which needs an address on the receiving interface (address-less pod veths get no answer)");
            Intercept::Redirect
        }
    };
    let backend = redirect::backend(opts.redirect, to)?;
    // External proxy ports only where rules send traffic to them.
    opts.listen.redirect_rules = backend.name() != "none";
    if let (Some(addr), true) = (to.dnat_to(), backend.name() != "none") {
        if to.guarded().is_some() {
            redirect::proxy_address(addr)?;
            opts.listen.bind_address = addr.into();
        }
        tracing::info!(backend = backend.name(), dnat_to = %addr, "redirect rules: DNAT to the proxy ports' address");
    } else {
        tracing::info!(backend = backend.name(), "redirect rules");
    }
    SyncerThread::spawn(Syncer::new(backend), ready, metrics).map_err(RunError::RedirectThread)
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
