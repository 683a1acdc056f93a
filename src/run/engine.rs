//! The engine: what an update goes through on the blocking thread (load,
//! control plane, redirect rules, health checks, the fd store), one at a
//! time.

use super::*;

/// What an update goes through: load (for files), control plane, then
/// redirect rules. Owned by one blocking task at a time.
pub(super) struct Engine {
    pub(super) control: Control,
    pub(super) data_plane: DataPlane,
    pub(super) redirect: SyncerThread,
    pub(super) service_health: ServiceHealth,
    pub(super) metrics: Arc<Metrics>,
    /// The file source's reader; `None` for the Kubernetes source.
    pub(super) loader: Option<FileLoader>,
    /// The predecessor whose sockets we took, until we publish and confirm.
    pub(super) taking: Option<Taken>,
    /// Copies of the admin servers' sockets, for a successor and the fd
    /// store.
    pub(super) admin_sockets: Vec<HandedAdmin>,
    /// The predecessor did not answer our confirmation: stop.
    pub(super) unconfirmed: Option<handover::HandoverError>,
    /// Redirect rules intercept service traffic (`--redirect` is not
    /// `none`): a change is live once its rules are synced.
    pub(super) rules: bool,
    /// What we keep in systemd's fd store; `None` without one.
    pub(super) stored: Option<upgrade::FdStore>,
}

impl Engine {
    /// Start the data plane, the redirect syncer and the control plane, and
    /// apply `first` (an invalid first file state is an error: there is no
    /// last good state yet).
    pub(super) fn start(
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
    pub(super) fn work(&mut self, work: Work) -> Done {
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
                crate::memory::release_after(a.summary.set + a.summary.removed);
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
