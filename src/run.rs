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

mod intercept;
mod source;
mod upgrade;
mod work;

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

/// What an update goes through: load (for files), control plane, then
/// redirect rules. Owned by one blocking task at a time.
struct Engine {
    control: Control,
    data_plane: DataPlane,
    redirect: SyncerThread,
    service_health: ServiceHealth,
    metrics: Arc<Metrics>,
    /// The file source's reader; `None` for the Kubernetes source.
    loader: Option<FileLoader>,
    /// The predecessor whose sockets we took, until we publish and confirm.
    taking: Option<Taken>,
    /// Copies of the admin servers' sockets, for a successor and the fd
    /// store.
    admin_sockets: Vec<HandedAdmin>,
    /// The predecessor did not answer our confirmation: stop.
    unconfirmed: Option<handover::HandoverError>,
    /// Redirect rules intercept service traffic (`--redirect` is not
    /// `none`): a change is live once its rules are synced.
    rules: bool,
    /// What we keep in systemd's fd store; `None` without one.
    stored: Option<upgrade::FdStore>,
}

impl Engine {
    /// Start the data plane, the redirect syncer and the control plane, and
    /// apply `first` (an invalid first file state is an error: there is no
    /// last good state yet).
    fn start(
        mut opts: RunOptions,
        handles: Handles,
        service_health: ServiceHealth,
        first: Option<Full>,
        mut taking: Option<Taken>,
        admin_sockets: Vec<HandedAdmin>,
    ) -> Result<Self, RunError> {
        let budget = Budget::of_this_process(opts.workers.workers, opts.workers.udp_max_flows);
        tracing::info!(rlimit_nofile = budget.limit, "file-descriptor budget");
        let data_plane = DataPlane::start_with_faults(
            Arc::clone(&handles.snapshot),
            opts.workers.clone(),
            Arc::clone(&handles.faults),
        )
        .map_err(RunError::DataPlane)?;
        // Ready means the sources have synced *and* their rules are in place:
        // the syncer sets `handles.ready`, Control only its own flag. The
        // syncer comes before the Binder: it decides where proxy ports listen.
        let (redirect, read_back) =
            start_redirect(&mut opts, Arc::clone(&handles.ready), Arc::clone(&handles.metrics))?;
        let kept_names = upgrade::kept_names(taking.as_ref(), &admin_sockets);
        let mut binder = Binder::new(opts.listen.clone());
        binder.prefer_proxy_ports(
            read_back.iter().map(|(k, t)| ((k.protocol, k.daddr.0, k.dport), t.proxy_port.0)),
        );
        if let Some(t) = taking.as_mut() {
            binder.adopt(std::mem::take(&mut t.listeners));
        }
        // Before any configuration: a shared mode without its port serves
        // no TCP service port at all, so that is fatal here.
        binder.bind_shared_at_start().map_err(|e| RunError::SharedPort(Box::new(e)))?;
        let control = Control::new(
            binder,
            opts.balance.clone(),
            HealthRegistry::new(opts.health, std::time::Instant::now()),
            Arc::clone(&handles.metrics),
            Arc::clone(&handles.snapshot),
            Arc::new(AtomicBool::new(false)),
        )
        .with_budget(budget)
        .with_source(opts.transparent.clone());
        let loader = matches!(opts.source, SourceChoice::File).then(|| FileLoader::new(&opts.config));
        // The API serves objects one by one: a cross-object error concerns one
        // Service, and must not freeze every later update for the node.
        let control = if loader.is_none() { control.tolerate_cross_object_errors() } else { control };
        let mut engine = Self {
            control,
            data_plane,
            redirect,
            service_health,
            metrics: handles.metrics,
            loader,
            taking,
            admin_sockets,
            unconfirmed: None,
            rules: opts.listen.redirect_rules,
            stored: None,
        };
        engine.start_store(kept_names);
        if let Some(first) = first {
            let (change, _, _) = engine.read(first);
            let initial = |errors: Vec<ConfigError>| RunError::Initial {
                path: opts.config.clone(),
                errors: Rejected(errors),
            };
            let applied =
                change.map_err(initial).and_then(|c| engine.take(c).map_err(|rejected| initial(rejected.0)));
            match applied {
                // A first load is a whole state: never `None`.
                Ok(None) => {}
                Ok(Some(a)) => {
                    engine.published(Vec::new());
                    summary(&a, "first configuration");
                }
                Err(e) => {
                    engine.data_plane.stop();
                    return Err(e);
                }
            }
        }
        Ok(engine)
    }

    /// Everything queued: the Node's zone first (it changes how the
    /// update balances), then the update.
    fn work(&mut self, work: Work) -> Done {
        if let Some(zone) = work.zone {
            self.relocate(zone);
        }
        let done = match work.update {
            Some((update, why)) => self.apply(update, why, work.triggers),
            None => Done::default(),
        };
        self.metrics.apply.unqueued(work.counted);
        done
    }

    /// A snapshot was published: what follows it (rules, health checks).
    /// systemd's `READY=1` comes from the syncer's first success, with
    /// /readyz's 200: once the redirect rules exist. Each of `triggers` (a
    /// change it carries) is timed for the network programming latency:
    /// now without redirect rules, else by the syncer once the snapshot's
    /// rules are synced (docs/node-agent.md).
    fn published(&mut self, triggers: Vec<SystemTime>) {
        if let Some(predecessor) = self.taking.take()
            && let Err(e) = predecessor.confirm()
        {
            tracing::error!(error = %e, "handover: the old instance did not answer our confirmation; stopping rather than serving beside it");
            self.unconfirmed = Some(e);
        }
        let current = self.control.current();
        self.store(&current);
        self.service_health.sync(&current);
        let now = SystemTime::now();
        if self.rules {
            let timed = triggers.into_iter().map(|trigger| Timed { trigger, published: now }).collect();
            self.redirect.publish_timed(current, timed);
        } else {
            for t in triggers {
                self.metrics.apply.programmed_at(t, now);
            }
            self.redirect.publish(current);
        }
    }

    /// Follow the Node's zone label: rebuild the balancers for it.
    fn relocate(&mut self, zone: Option<String>) {
        if self.control.zone() == zone.as_deref() {
            return;
        }
        tracing::info!(zone = ?zone, "zone from the Node's label");
        if let Some(a) = self.control.relocate(zone, &self.data_plane) {
            self.published(Vec::new());
            tracing::info!(trigger = "Node zone", generation = a.generation, "reloaded");
        }
    }

    /// The change `full` stands for, whether a vanished file was kept
    /// (then load again soon), and the trigger times of the slices a file
    /// load changes.
    fn read(&mut self, full: Full) -> (Result<Change, Vec<ConfigError>>, bool, Vec<SystemTime>) {
        let reread = matches!(full, Full::Reread);
        match (full, &mut self.loader) {
            (Full::Manifests(m), _) => (Ok(Change::Whole(m)), false, Vec::new()),
            (Full::Files | Full::Reread, Some(loader)) => {
                let loaded = loader.load(reread);
                (loaded.result.map_err(|e| e.into_iter().collect()), loaded.recheck, loaded.triggers)
            }
            (Full::Files | Full::Reread, None) => {
                (Ok(Change::Whole(Manifests::default())), false, Vec::new())
            }
        }
    }

    /// Take `change` into the control plane (`None`: it changes no
    /// service port, e.g. a file saved unchanged, a resync). The file loader's load is what is
    /// served once taken: its next load is told apart from it.
    fn take(&mut self, change: Change) -> Result<Option<Applied>, Rejected> {
        let outcome = match change {
            Change::Whole(m) => self.control.replace(m, &self.data_plane),
            Change::Delta(d) => self.control.apply(d, &self.data_plane),
        };
        if outcome.is_ok()
            && let Some(loader) = &mut self.loader
        {
            loader.commit();
        }
        outcome
    }

    /// Apply an update, or log why it was rejected (the last good state
    /// keeps serving). Once it is published, each of `triggers` (and each
    /// trigger time of the slices the files changed) is timed for the
    /// network programming latency.
    fn apply(&mut self, update: Update, why: &str, mut triggers: Vec<SystemTime>) -> Done {
        tracing::debug!(trigger = why, "applying");
        let (outcome, mut done) = match update {
            Update::Changes(delta) => (self.take(Change::Delta(delta)), Done::default()),
            Update::Then(full, delta) => {
                let done = self.apply(Update::Full(full), why, Vec::new());
                (self.take(Change::Delta(delta)), done)
            }
            Update::Full(full) => {
                let (change, recheck, read) = self.read(full);
                triggers.extend(read);
                (change.map_err(Rejected).and_then(|c| self.take(c)), Done { recheck, refused: false })
            }
        };
        let counter =
            if outcome.is_ok() { &self.metrics.reloads_applied } else { &self.metrics.reloads_rejected };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match outcome {
            // Accepted, and the same as what serves (a file saved unchanged,
            // or fixed back after a refused reload): said, so an operator
            // sees the error is over; nothing is published.
            Ok(None) => tracing::info!(trigger = why, "reloaded: nothing changed, nothing published"),
            Ok(Some(a)) => {
                self.published(triggers);
                summary(&a, why);
            }
            Err(rejected) => {
                done.refused = true;
                crate::log_cap::error(&rejected.0, "invalid manifest");
                tracing::error!(trigger = why, error = %rejected, "reload rejected");
            }
        }
        done
    }
}

/// The one line an update logs at info, whatever its size (per-listener
/// lines are at debug).
fn summary(a: &crate::control::Applied, trigger: &str) {
    let s = a.summary;
    tracing::info!(
        trigger,
        generation = a.generation,
        service_ports = a.service_ports,
        listeners = a.listeners,
        ports_set = s.set,
        ports_removed = s.removed,
        listeners_added = s.listeners_added,
        listeners_removed = s.listeners_removed,
        bind_errors = s.bind_errors,
        took = ?a.stages.total(),
        stages = ?a.stages,
        "reloaded"
    );
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
