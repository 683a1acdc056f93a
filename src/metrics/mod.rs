//! Prometheus metrics: per-service-port counters kept per worker (summed at
//! scrape, so cores never contend on a cache line), control-plane figures
//! under ringport's names and kube-proxy's, process figures, and their
//! exposition through `prometheus-client` (in [`expose`]).
//!
//! Invariants:
//! - Every metric name is a constant in [`names`]; nothing else spells one.
//! - A worker writes only its own slot of a [`PortMetrics`] (relaxed
//!   atomics, 128-byte aligned); the scrape reads and sums all slots.
//! - Counters of a service port live as long as any snapshot or connection
//!   holds them, so they keep counting across reloads that keep the port.
//! - A histogram stores per-bucket (not cumulative) counts; the encoder
//!   accumulates them once, so `le="+Inf"` always equals `_count`.
//! - A port exposes only the series of its protocol: the connection series
//!   for TCP, the `ringport_udp_*` series for UDP (bytes, ejections and
//!   readmissions for both).

mod expose;
mod process;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;

use crate::model::{Protocol, ServicePortName};

/// Metric names. Counters are named without `_total`: the exposition
/// format appends it (so `ringport_connections_accepted` is scraped as
/// `ringport_connections_accepted_total`).
pub mod names {
    pub const CONNECTIONS_ACCEPTED: &str = "ringport_connections_accepted";
    pub const CONNECTIONS_ACTIVE: &str = "ringport_connections_active";
    pub const BYTES: &str = "ringport_bytes";
    pub const CONNECT_FAILURES: &str = "ringport_connect_failures";
    pub const CONNECT_RETRIES: &str = "ringport_connect_retries";
    pub const CONNECTIONS_REFUSED: &str = "ringport_connections_refused";
    pub const PROXY_HEADERS_REFUSED: &str = "ringport_proxy_headers_refused";
    pub const CONNECTIONS_UNMATCHED: &str = "ringport_connections_unmatched";
    pub const EJECTIONS: &str = "ringport_endpoint_ejections";
    pub const READMISSIONS: &str = "ringport_endpoint_readmissions";
    pub const CONNECT_DURATION: &str = "ringport_connect_duration_seconds";
    pub const UDP_FLOWS_ACTIVE: &str = "ringport_udp_flows_active";
    pub const UDP_FLOWS_CREATED: &str = "ringport_udp_flows_created";
    pub const UDP_FLOWS_EXPIRED: &str = "ringport_udp_flows_expired";
    pub const UDP_DATAGRAMS: &str = "ringport_udp_datagrams";
    pub const UDP_DROPPED: &str = "ringport_udp_datagrams_dropped";
    pub const UDP_TRUNCATED: &str = "ringport_udp_datagrams_truncated";
    pub const SNAPSHOT_GENERATION: &str = "ringport_snapshot_generation";
    pub const SNAPSHOT_BUILD: &str = "ringport_snapshot_build_seconds";
    pub const RELOADS: &str = "ringport_reloads";
    pub const SYNC_DURATION: &str = "ringport_sync_duration_seconds";
    pub const SYNC_FAILURES: &str = "ringport_sync_failures";
    pub const SYNC_FULL: &str = "ringport_sync_full";
    pub const PROGRAMMED_RULES: &str = "ringport_programmed_rules";
    pub const LAST_SYNC: &str = "ringport_last_sync_timestamp_seconds";
    pub const BUILD_INFO: &str = "ringport_build_info";
    pub const SOURCE_IP_PRESERVED: &str = "ringport_source_ip_preserved";
    pub const SOURCE_IP_FALLBACK: &str = "ringport_source_ip_fallback";
    pub const SOURCE_IP_TRANSPARENT_READY: &str = "ringport_source_ip_transparent_ready";

    // kube-proxy's own names (pkg/proxy/metrics), where the meaning is the same.
    pub const KP_SYNC_DURATION: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
    pub const KP_LAST_SYNC: &str = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
    pub const KP_NETWORK_PROGRAMMING: &str = "kubeproxy_network_programming_duration_seconds";
    /// The same figure as kube-proxy's, in buckets fine enough for
    /// milliseconds (kube-proxy's first bounds are 0, 0.25 s and 0.5 s).
    pub const NETWORK_PROGRAMMING: &str = "ringport_network_programming_duration_seconds";
    pub const KP_ENDPOINT_CHANGES: &str = "kubeproxy_sync_proxy_rules_endpoint_changes";
    pub const KP_ENDPOINT_CHANGES_PENDING: &str = "kubeproxy_sync_proxy_rules_endpoint_changes_pending";
    pub const KP_SERVICE_CHANGES: &str = "kubeproxy_sync_proxy_rules_service_changes";
    pub const KP_SERVICE_CHANGES_PENDING: &str = "kubeproxy_sync_proxy_rules_service_changes_pending";

    // The process figures every Prometheus client library exports.
    pub const PROCESS_CPU: &str = "process_cpu_seconds";
    pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
    pub const PROCESS_VSZ: &str = "process_virtual_memory_bytes";
    pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
    pub const PROCESS_MAX_FDS: &str = "process_max_fds";
    pub const PROCESS_START: &str = "process_start_time_seconds";
}

/// The upper bounds (seconds) of one histogram's buckets, `+Inf` implied.
pub trait Buckets {
    const BOUNDS: &'static [f64];
}

/// Accept-to-connected time: 100 µs to 2.5 s.
#[derive(Debug)]
pub struct ConnectBuckets;
impl Buckets for ConnectBuckets {
    const BOUNDS: &'static [f64] =
        &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
}

/// Rule syncs, as kube-proxy's `sync_proxy_rules_duration_seconds`:
/// `ExponentialBuckets(0.001, 2, 15)`, 1 ms to 16.384 s.
#[derive(Debug)]
pub struct SyncBuckets;
impl Buckets for SyncBuckets {
    const BOUNDS: &'static [f64] = &exponential::<15>(0.001, 2.0);
}

/// Snapshot builds: 50 µs to 1.6 s, doubling.
#[derive(Debug)]
pub struct BuildBuckets;
impl Buckets for BuildBuckets {
    const BOUNDS: &'static [f64] = &exponential::<16>(0.00005, 2.0);
}

/// kube-proxy's `network_programming_duration_seconds`: 0 (its `merge()`
/// starts from one zero bound), 0.25 s and 0.5 s, each second to 59 s,
/// every 5 s to 115 s, every 30 s to 5 min: 81 bounds.
#[derive(Debug)]
pub struct ProgrammingBuckets;
impl Buckets for ProgrammingBuckets {
    const BOUNDS: &'static [f64] = &programming_bounds();
}

/// `ringport_network_programming_duration_seconds`: 0.5 ms to 60 s, with
/// bounds at 10 ms and 50 ms (the p50 and p99 goals of one change at 100k
/// service ports), so a goal reads off one bucket.
#[derive(Debug)]
pub struct FineProgrammingBuckets;
impl Buckets for FineProgrammingBuckets {
    const BOUNDS: &'static [f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        30.0, 60.0,
    ];
}

const fn exponential<const N: usize>(start: f64, factor: f64) -> [f64; N] {
    let mut out = [0.0; N];
    let (mut i, mut b) = (0, start);
    while i < N {
        out[i] = b;
        b *= factor;
        i += 1;
    }
    out
}

const fn programming_bounds() -> [f64; 81] {
    // (start, step, count) of kube-proxy's four merged linear ranges, after
    // the zero its `merge()` begins with.
    let ranges: [(f64, f64, usize); 4] = [(0.25, 0.25, 2), (1.0, 1.0, 59), (60.0, 5.0, 12), (120.0, 30.0, 7)];
    let mut out = [0.0; 81];
    let (mut r, mut i) = (0, 1);
    while r < ranges.len() {
        let (start, step, count) = ranges[r];
        let mut k = 0;
        while k < count {
            out[i] = start + step * k as f64;
            i += 1;
            k += 1;
        }
        r += 1;
    }
    out
}

/// Buckets, sum and count of a histogram, in atomics.
#[derive(Debug)]
pub struct AtomicHistogram<B: Buckets> {
    /// One per bound, plus +Inf last (per-bucket counts, not cumulative).
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
    layout: PhantomData<B>,
}

impl<B: Buckets> Default for AtomicHistogram<B> {
    fn default() -> Self {
        let buckets = (0..=B::BOUNDS.len()).map(|_| AtomicU64::new(0)).collect();
        Self { buckets, sum_nanos: AtomicU64::new(0), layout: PhantomData }
    }
}

impl<B: Buckets> AtomicHistogram<B> {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = B::BOUNDS.iter().position(|b| secs <= *b).unwrap_or(B::BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Add this histogram's per-bucket counts and sum into `counts`/`sum`.
    fn add_into(&self, counts: &mut [u64], sum: &mut f64) {
        for (c, b) in counts.iter_mut().zip(self.buckets.iter()) {
            *c += b.load(Ordering::Relaxed);
        }
        *sum += self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
    }
}

/// One worker's counters for one service port.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct PortCounters {
    pub accepted: AtomicU64,
    pub closed: AtomicU64,
    pub bytes_to_endpoint: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub connect_failures: AtomicU64,
    pub retries: AtomicU64,
    pub refused: AtomicU64,
    /// Clients reset for a malformed, refused or late PROXY header.
    pub proxy_headers_refused: AtomicU64,
    /// Endpoints ejected by passive health, and readmitted by a success.
    pub ejections: AtomicU64,
    pub readmissions: AtomicU64,
    pub connect_duration: AtomicHistogram<ConnectBuckets>,
    pub flows_created: AtomicU64,
    pub flows_closed: AtomicU64,
    pub flows_expired: AtomicU64,
    pub datagrams_to_endpoint: AtomicU64,
    pub datagrams_to_client: AtomicU64,
    pub datagrams_dropped: AtomicU64,
    pub truncated: AtomicU64,
    /// Connections and flows whose endpoint saw the client's address.
    pub source_preserved: AtomicU64,
    /// Those that asked for it and got the node's, by
    /// [`crate::source_ip::Fallback`] (`Fallback::ALL`'s order).
    pub source_fallback: [AtomicU64; crate::source_ip::Fallback::ALL.len()],
}

impl PortCounters {
    pub fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Count one connection's source: preserved, or a fallback.
    /// Count whose address a connection or flow got (nothing when its
    /// Service did not ask).
    pub fn source(&self, source: crate::source_ip::Source) {
        use crate::source_ip::Source;
        let counter = match source {
            Source::Client => &self.source_preserved,
            Source::Proxy(Some(why)) => &self.source_fallback[why as usize],
            Source::Proxy(None) => return,
        };
        self.add(counter, 1);
    }
}

/// The counters of one service port, one slot per worker.
#[derive(Debug)]
pub struct PortMetrics {
    name: ServicePortName,
    protocol: Protocol,
    workers: usize,
    /// Made at the port's first count: most of 100k service ports never
    /// see a connection, and a worker's slot is hundreds of bytes.
    slots: std::sync::OnceLock<Box<[PortCounters]>>,
}

impl PortMetrics {
    /// Worker `worker`'s slot (the last one if out of range, never a panic).
    pub fn slot(&self, worker: usize) -> &PortCounters {
        let slots =
            self.slots.get_or_init(|| (0..self.workers.max(1)).map(|_| PortCounters::default()).collect());
        &slots[worker.min(slots.len() - 1)]
    }

    /// The slots counted in so far (none before the first count: all zero).
    fn counted(&self) -> &[PortCounters] {
        self.slots.get().map_or(&[], |s| &s[..])
    }

    fn sum(&self, f: impl Fn(&PortCounters) -> &AtomicU64) -> u64 {
        self.counted().iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
    }
}

/// What a redirect-rule sync wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// The whole table or chains rewritten.
    Full,
    /// Only the difference.
    Partial,
    /// A periodic check that found the rules as left and nothing to do.
    Verify,
}

impl SyncKind {
    pub const ALL: [SyncKind; 3] = [SyncKind::Full, SyncKind::Partial, SyncKind::Verify];

    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Partial => "partial",
            SyncKind::Verify => "verify",
        }
    }
}

/// Why a redirect-rule sync rewrote everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullReason {
    /// Nothing was written yet (a start with no previous run's rules).
    First,
    /// The sync before failed: what is in place is not known.
    AfterFailure,
    /// The firewall (source ranges) changed, or the desired rules asked.
    Rewrite,
    /// A periodic resync found our own table's objects changed.
    ForeignWrite,
    /// A periodic resync could not tell: no generation id (iptables-legacy,
    /// or unreadable), or it moved and our table cannot be checked on its
    /// own (iptables-nft's shared tables, or unreadable).
    Unverifiable,
    /// The periodic whole rewrite (elements have no handles).
    Periodic,
}

impl FullReason {
    pub const ALL: [FullReason; 6] = [
        FullReason::First,
        FullReason::AfterFailure,
        FullReason::Rewrite,
        FullReason::ForeignWrite,
        FullReason::Unverifiable,
        FullReason::Periodic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FullReason::First => "first",
            FullReason::AfterFailure => "after_failure",
            FullReason::Rewrite => "rewrite",
            FullReason::ForeignWrite => "foreign_write",
            FullReason::Unverifiable => "unverifiable",
            FullReason::Periodic => "periodic",
        }
    }
}

/// Control-plane figures of the redirect-rule sync.
#[derive(Debug, Default)]
pub struct SyncMetrics {
    /// Successful syncs by [`SyncKind`], in its order (a failed one is
    /// only counted in `failures`: it wrote no known kind).
    duration: [AtomicHistogram<SyncBuckets>; 3],
    failures: AtomicU64,
    /// Successful full syncs by [`FullReason`], in its order.
    full: [AtomicU64; 6],
    programmed: AtomicU64,
    /// Unix time (ms) of the last successful sync; 0 before the first.
    last_success_ms: AtomicU64,
}

impl SyncMetrics {
    /// One sync that took `took`: its kind and the rules in place after
    /// it, or a failure.
    pub fn record(&self, took: Duration, result: Result<(SyncKind, Option<FullReason>, usize), ()>) {
        match result {
            Ok((kind, reason, programmed)) => {
                self.duration[kind as usize].observe(took);
                if let Some(r) = reason {
                    self.full[r as usize].fetch_add(1, Ordering::Relaxed);
                }
                self.programmed.store(programmed as u64, Ordering::Relaxed);
                self.last_success_ms.store(unix_ms(), Ordering::Relaxed);
            }
            Err(()) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Time since the last successful sync (`None` before the first).
    pub fn since_last_success(&self) -> Option<Duration> {
        match self.last_success_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(unix_ms().saturating_sub(ms))),
        }
    }
}

/// kube-proxy's figures of "syncing the proxy rules": for ringport, taking
/// a source's update into a published snapshot (listeners bound, balancers
/// built), whatever `--redirect` is.
#[derive(Debug, Default)]
pub struct ApplyMetrics {
    duration: AtomicHistogram<SyncBuckets>,
    last_ms: AtomicU64,
    programming: AtomicHistogram<ProgrammingBuckets>,
    programming_fine: AtomicHistogram<FineProgrammingBuckets>,
    endpoint_changes: AtomicU64,
    service_changes: AtomicU64,
    endpoint_pending: AtomicU64,
    service_pending: AtomicU64,
    /// Snapshot builds, every port (`full`) or the changed ones.
    build_full: AtomicHistogram<BuildBuckets>,
    build_partial: AtomicHistogram<BuildBuckets>,
}

/// How many service ports an update changed (or, counted by a source as
/// they arrive, how many objects).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Service ports whose endpoints changed (added and removed ports count).
    pub endpoints: u64,
    /// Service ports whose service fields changed (added and removed count).
    pub services: u64,
}

impl std::ops::AddAssign for Changes {
    fn add_assign(&mut self, other: Changes) {
        self.endpoints += other.endpoints;
        self.services += other.services;
    }
}

impl ApplyMetrics {
    /// Changes received and not yet published.
    pub fn queued(&self, changes: Changes) {
        self.endpoint_pending.fetch_add(changes.endpoints, Ordering::Relaxed);
        self.service_pending.fetch_add(changes.services, Ordering::Relaxed);
    }

    /// Changes [`ApplyMetrics::queued`] counted are no longer pending: the
    /// update carrying them was published (or refused). Changes queued
    /// since, in a later update, stay pending.
    pub fn unqueued(&self, changes: Changes) {
        let less = |n: u64| move |v: u64| Some(v.saturating_sub(n));
        let _ =
            self.endpoint_pending.fetch_update(Ordering::Relaxed, Ordering::Relaxed, less(changes.endpoints));
        let _ =
            self.service_pending.fetch_update(Ordering::Relaxed, Ordering::Relaxed, less(changes.services));
    }

    /// An update published: it was received at `received`.
    pub fn published(&self, received: Instant, changes: Changes) {
        self.duration.observe(received.elapsed());
        self.endpoint_changes.fetch_add(changes.endpoints, Ordering::Relaxed);
        self.service_changes.fetch_add(changes.services, Ordering::Relaxed);
        self.last_ms.store(unix_ms(), Ordering::Relaxed);
    }
}

impl ApplyMetrics {
    /// A snapshot was built in `took`, every port or only changed ones.
    pub fn snapshot_built(&self, took: Duration, full: bool) {
        let h = if full { &self.build_full } else { &self.build_partial };
        h.observe(took);
    }

    /// A change the API server stamped at `trigger` (an EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time`) is served now,
    /// as kube-proxy observes network programming latency.
    pub fn programmed(&self, trigger: SystemTime) {
        self.programmed_at(trigger, SystemTime::now());
    }

    /// As [`ApplyMetrics::programmed`], served since `served` (observed
    /// later, e.g. once the rule sync showed no rule changed). Into both
    /// kube-proxy's histogram and ringport's finer one; a stamp ahead of
    /// `served` (another clock) counts as 0.
    pub fn programmed_at(&self, trigger: SystemTime, served: SystemTime) {
        let took = served.duration_since(trigger).unwrap_or_default();
        self.programming.observe(took);
        self.programming_fine.observe(took);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `--per-service-metrics`: how much per-service-port detail `/metrics`
/// carries (each service port costs series on every node).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[repr(u8)]
pub enum PortDetail {
    /// Every family per service port (about 26 series per TCP port, 11
    /// per UDP port).
    #[default]
    Full = 0,
    /// Per service port only accepted and active connections and bytes
    /// (TCP: 4 series), or bytes, active flows and datagrams (UDP: 5); the
    /// rest summed over all service ports.
    Summary = 1,
    /// Every family summed over all service ports: no per-port series.
    Off = 2,
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    workers: usize,
    ports: Mutex<BTreeMap<(ServicePortName, Protocol), Weak<PortMetrics>>>,
    detail: AtomicU8,
    pub generation: AtomicU64,
    pub reloads_applied: AtomicU64,
    pub reloads_rejected: AtomicU64,
    /// `--transparent` set up and working (1), or not (0).
    pub transparent_ready: AtomicU64,
    pub sync: SyncMetrics,
    pub apply: ApplyMetrics,
    /// Connections a shared proxy port reset because their original
    /// destination is no service port's (none of the rules sent them), one
    /// slot per worker; every snapshot holds it.
    pub unmatched: Arc<[AtomicU64]>,
}

impl Metrics {
    pub fn new(workers: usize) -> Self {
        Self {
            workers: workers.max(1),
            ports: Mutex::new(BTreeMap::new()),
            detail: AtomicU8::new(PortDetail::Full as u8),
            generation: AtomicU64::new(0),
            reloads_applied: AtomicU64::new(0),
            reloads_rejected: AtomicU64::new(0),
            transparent_ready: AtomicU64::new(0),
            sync: SyncMetrics::default(),
            apply: ApplyMetrics::default(),
            unmatched: (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn set_detail(&self, detail: PortDetail) {
        self.detail.store(detail as u8, Ordering::Relaxed);
    }

    pub fn detail(&self) -> PortDetail {
        match self.detail.load(Ordering::Relaxed) {
            0 => PortDetail::Full,
            1 => PortDetail::Summary,
            _ => PortDetail::Off,
        }
    }

    /// The counters of a service port and protocol: the existing ones
    /// while held. A port whose protocol changes keeps both while the old
    /// one drains (their shared families sum them under one label set).
    pub fn port(&self, name: &ServicePortName, protocol: Protocol) -> Arc<PortMetrics> {
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        let key = (name.clone(), protocol);
        if let Some(m) = ports.get(&key).and_then(Weak::upgrade) {
            return m;
        }
        let slots = std::sync::OnceLock::new();
        let m = Arc::new(PortMetrics { name: name.clone(), protocol, workers: self.workers, slots });
        ports.insert(key, Arc::downgrade(&m));
        m
    }

    /// Forget these service ports where nothing holds them any more: after
    /// an update removed them, at the cost of what it removed.
    pub fn forget<'a>(&self, names: impl IntoIterator<Item = &'a ServicePortName>) {
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        for name in names {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let key = (name.clone(), protocol);
                if ports.get(&key).is_some_and(|m| m.strong_count() == 0) {
                    ports.remove(&key);
                }
            }
        }
    }

    /// How many service ports' counters are remembered (held or not yet
    /// forgotten).
    pub fn remembered(&self) -> usize {
        self.ports.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Forget service ports nothing holds any more.
    pub fn prune(&self) {
        self.ports.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, m| m.strong_count() > 0);
    }

    /// A registry exposing these metrics, for `/metrics`.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Arc::clone(self)));
        registry
    }

    fn live_ports(&self) -> Vec<Arc<PortMetrics>> {
        self.ports.lock().unwrap_or_else(|p| p.into_inner()).values().filter_map(Weak::upgrade).collect()
    }
}
