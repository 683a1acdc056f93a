//! Prometheus metrics: per-service-port counters kept per worker (summed at
//! scrape, so cores never contend on a cache line), control-plane figures,
//! and their exposition through `prometheus-client`.
//!
//! Invariants:
//! - Every metric name is a constant in [`names`]; nothing else spells one.
//! - A worker writes only its own slot of a [`PortMetrics`] (relaxed
//!   atomics, 128-byte aligned); the scrape reads and sums all slots.
//! - Counters of a service port live as long as any snapshot or connection
//!   holds them, so they keep counting across reloads that keep the port.
//! - A port exposes only the series of its protocol: the connection series
//!   for TCP, the `ringport_udp_*` series for UDP (bytes for both).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
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
    pub const CONNECT_DURATION: &str = "ringport_connect_duration_seconds";
    pub const UDP_FLOWS_ACTIVE: &str = "ringport_udp_flows_active";
    pub const UDP_FLOWS_CREATED: &str = "ringport_udp_flows_created";
    pub const UDP_FLOWS_EXPIRED: &str = "ringport_udp_flows_expired";
    pub const UDP_DATAGRAMS: &str = "ringport_udp_datagrams";
    pub const UDP_DROPPED: &str = "ringport_udp_datagrams_dropped";
    pub const UDP_TRUNCATED: &str = "ringport_udp_datagrams_truncated";
    pub const SNAPSHOT_GENERATION: &str = "ringport_snapshot_generation";
    pub const RELOADS: &str = "ringport_reloads";
    pub const SYNC_DURATION: &str = "ringport_sync_duration_seconds";
    pub const SYNC_FAILURES: &str = "ringport_sync_failures";
    pub const PROGRAMMED_RULES: &str = "ringport_programmed_rules";
    pub const LAST_SYNC: &str = "ringport_last_sync_timestamp_seconds";
}

/// Upper bounds (seconds) of the connect-duration histogram buckets.
pub const CONNECT_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Buckets, sum and count of a histogram, in atomics.
#[derive(Debug, Default)]
pub struct AtomicHistogram {
    /// One per bound, plus +Inf last (non-cumulative counts).
    buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = CONNECT_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(CONNECT_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn add_into(&self, counts: &mut [u64], sum: &mut f64) {
        for (c, b) in counts.iter_mut().zip(&self.buckets) {
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
    pub connect_duration: AtomicHistogram,
    pub flows_created: AtomicU64,
    pub flows_closed: AtomicU64,
    pub flows_expired: AtomicU64,
    pub datagrams_to_endpoint: AtomicU64,
    pub datagrams_to_client: AtomicU64,
    pub datagrams_dropped: AtomicU64,
    pub truncated: AtomicU64,
}

impl PortCounters {
    pub fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The counters of one service port, one slot per worker.
#[derive(Debug)]
pub struct PortMetrics {
    label: String,
    protocol: Protocol,
    slots: Box<[PortCounters]>,
}

impl PortMetrics {
    /// Worker `worker`'s slot (the last one if out of range, never a panic).
    pub fn slot(&self, worker: usize) -> &PortCounters {
        &self.slots[worker.min(self.slots.len() - 1)]
    }

    fn sum(&self, f: impl Fn(&PortCounters) -> &AtomicU64) -> u64 {
        self.slots.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
    }
}

/// Control-plane figures of the redirect-rule sync.
#[derive(Debug, Default)]
pub struct SyncMetrics {
    duration: AtomicHistogram,
    failures: AtomicU64,
    programmed: AtomicU64,
    /// Unix time (ms) of the last successful sync; 0 before the first.
    last_success_ms: AtomicU64,
}

impl SyncMetrics {
    pub fn record(&self, took: Duration, result: Result<usize, ()>) {
        self.duration.observe(took);
        match result {
            Ok(programmed) => {
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

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    workers: usize,
    ports: Mutex<BTreeMap<ServicePortName, Weak<PortMetrics>>>,
    pub generation: AtomicU64,
    pub reloads_applied: AtomicU64,
    pub reloads_rejected: AtomicU64,
    pub sync: SyncMetrics,
}

impl Metrics {
    pub fn new(workers: usize) -> Self {
        Self {
            workers: workers.max(1),
            ports: Mutex::new(BTreeMap::new()),
            generation: AtomicU64::new(0),
            reloads_applied: AtomicU64::new(0),
            reloads_rejected: AtomicU64::new(0),
            sync: SyncMetrics::default(),
        }
    }

    /// The counters of a service port: the existing ones while held (and
    /// the protocol is unchanged).
    pub fn port(&self, name: &ServicePortName, protocol: Protocol) -> Arc<PortMetrics> {
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = ports.get(name).and_then(Weak::upgrade).filter(|m| m.protocol == protocol) {
            return m;
        }
        let slots = (0..self.workers).map(|_| PortCounters::default()).collect();
        let m = Arc::new(PortMetrics { label: name.to_string(), protocol, slots });
        ports.insert(name.clone(), Arc::downgrade(&m));
        m
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

type Enc<'a> = DescriptorEncoder<'a>;
type Labels = [(&'static str, String)];
/// One labelled histogram series, summed from several parts.
type Series<'a> = (&'a Labels, Vec<&'a AtomicHistogram>);

fn counter(enc: &mut Enc<'_>, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut Enc<'_>, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

fn histogram(enc: &mut Enc<'_>, name: &str, help: &str, hists: &[Series<'_>]) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, parts) in hists {
        let mut counts = [0u64; CONNECT_BUCKETS.len() + 1];
        let mut sum = 0.0;
        for h in parts {
            h.add_into(&mut counts, &mut sum);
        }
        let mut cumulative = 0;
        let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(counts.len());
        for (bound, count) in CONNECT_BUCKETS.iter().chain([f64::MAX].iter()).zip(counts) {
            cumulative += count;
            buckets.push((*bound, cumulative));
        }
        family.encode_family(labels)?.encode_histogram::<NoLabelSet>(sum, cumulative, &buckets, None)?;
    }
    Ok(())
}

/// Picks one counter out of a worker slot.
type Field = fn(&PortCounters) -> &AtomicU64;

/// A per-service-port counter family; with `directions`, one series per
/// `(direction label, counter)`.
fn port_counter(
    enc: &mut Enc<'_>,
    ports: &[Arc<PortMetrics>],
    name: &str,
    help: &str,
    directions: &[(&str, Field)],
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for p in ports {
        for (dir, f) in directions {
            let mut labels = vec![("service_port", p.label.clone())];
            if !dir.is_empty() {
                labels.push(("direction", (*dir).to_owned()));
            }
            ConstCounter::new(p.sum(f)).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// A per-service-port gauge of things open now: opened minus closed.
fn port_open_now(
    enc: &mut Enc<'_>,
    ports: &[Arc<PortMetrics>],
    name: &str,
    help: &str,
    opened: Field,
    closed: Field,
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for p in ports {
        let n = p.sum(opened).saturating_sub(p.sum(closed));
        ConstGauge::new(n as i64).encode(family.encode_family(&[("service_port", p.label.clone())])?)?;
    }
    Ok(())
}

/// One series per service port, without a direction.
fn total(f: Field) -> [(&'static str, Field); 1] {
    [("", f)]
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use names::*;
        let ports = self.live_ports();
        let of = |protocol| -> Vec<_> { ports.iter().filter(|p| p.protocol == protocol).cloned().collect() };
        let (tcp, udp) = (of(Protocol::Tcp), of(Protocol::Udp));
        let e = &mut enc;
        let p = &tcp;
        port_counter(e, p, CONNECTIONS_ACCEPTED, "Connections accepted", &total(|c| &c.accepted))?;
        port_open_now(e, p, CONNECTIONS_ACTIVE, "Connections open now", |c| &c.accepted, |c| &c.closed)?;
        let bytes: [(&str, Field); 2] =
            [("to_endpoint", |c| &c.bytes_to_endpoint), ("to_client", |c| &c.bytes_to_client)];
        port_counter(e, &ports, BYTES, "Bytes relayed", &bytes)?;
        port_counter(
            e,
            p,
            CONNECT_FAILURES,
            "Failed connect attempts to endpoints",
            &total(|c| &c.connect_failures),
        )?;
        port_counter(e, p, CONNECT_RETRIES, "Connect attempts after a failed one", &total(|c| &c.retries))?;
        let refused = "Client connections reset because every attempt failed";
        port_counter(e, p, CONNECTIONS_REFUSED, refused, &total(|c| &c.refused))?;
        let labels: Vec<Vec<(&'static str, String)>> =
            tcp.iter().map(|p| vec![("service_port", p.label.clone())]).collect();
        let hists: Vec<Series<'_>> = tcp
            .iter()
            .zip(&labels)
            .map(|(p, l)| (l.as_slice(), p.slots.iter().map(|s| &s.connect_duration).collect()))
            .collect();
        histogram(e, CONNECT_DURATION, "Time from accept to a connected endpoint", &hists)?;
        let p = &udp;

        port_open_now(
            e,
            p,
            UDP_FLOWS_ACTIVE,
            "UDP flows open now",
            |c| &c.flows_created,
            |c| &c.flows_closed,
        )?;
        port_counter(e, p, UDP_FLOWS_CREATED, "UDP flows created", &total(|c| &c.flows_created))?;
        port_counter(
            e,
            p,
            UDP_FLOWS_EXPIRED,
            "UDP flows closed by the idle timeout",
            &total(|c| &c.flows_expired),
        )?;
        let datagrams: [(&str, Field); 2] =
            [("to_endpoint", |c| &c.datagrams_to_endpoint), ("to_client", |c| &c.datagrams_to_client)];
        port_counter(e, p, UDP_DATAGRAMS, "UDP datagrams relayed", &datagrams)?;
        let dropped = "UDP datagrams dropped (no endpoint, flow limit, full buffers)";
        port_counter(e, p, UDP_DROPPED, dropped, &total(|c| &c.datagrams_dropped))?;
        let truncated = "UDP datagrams larger than the buffer, dropped";
        port_counter(e, p, UDP_TRUNCATED, truncated, &total(|c| &c.truncated))?;

        gauge(
            e,
            SNAPSHOT_GENERATION,
            "Generation of the served snapshot",
            self.generation.load(Ordering::Relaxed) as i64,
        )?;
        let mut reloads =
            e.encode_descriptor(RELOADS, "Configuration updates by result", None, MetricType::Counter)?;
        for (result, n) in [("applied", &self.reloads_applied), ("rejected", &self.reloads_rejected)] {
            ConstCounter::new(n.load(Ordering::Relaxed))
                .encode(reloads.encode_family(&[("result", result)])?)?;
        }
        let none: &Labels = &[];
        histogram(e, SYNC_DURATION, "Redirect-rule sync duration", &[(none, vec![&self.sync.duration])])?;
        counter(e, SYNC_FAILURES, "Failed redirect-rule syncs", self.sync.failures.load(Ordering::Relaxed))?;
        gauge(
            e,
            PROGRAMMED_RULES,
            "Redirect rules programmed",
            self.sync.programmed.load(Ordering::Relaxed) as i64,
        )?;
        let last = self.sync.last_success_ms.load(Ordering::Relaxed) / 1000;
        gauge(e, LAST_SYNC, "Unix time of the last successful sync", last as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceName;

    #[test]
    fn per_worker_counters_are_summed_at_scrape() {
        let metrics = Arc::new(Metrics::new(2));
        let name = ServicePortName { service: ServiceName::new("default", "web"), port: "http".into() };
        let port = metrics.port(&name, Protocol::Tcp);
        port.slot(0).add(&port.slot(0).accepted, 3);
        port.slot(1).add(&port.slot(1).accepted, 4);
        port.slot(1).add(&port.slot(1).closed, 2);
        port.slot(0).connect_duration.observe(Duration::from_micros(300));
        port.slot(1).connect_duration.observe(Duration::from_secs(10));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).unwrap();
        assert!(
            text.contains("ringport_connections_accepted_total{service_port=\"default/web:http\"} 7"),
            "{text}"
        );
        assert!(text.contains("ringport_connections_active{service_port=\"default/web:http\"} 5"), "{text}");
        assert!(
            text.contains("ringport_connect_duration_seconds_count{service_port=\"default/web:http\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "ringport_connect_duration_seconds_bucket{le=\"0.0005\",service_port=\"default/web:http\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_port_nothing_holds_is_no_longer_exposed() {
        let metrics = Arc::new(Metrics::new(1));
        let name = ServicePortName { service: ServiceName::new("default", "gone"), port: String::new() };
        drop(metrics.port(&name, Protocol::Tcp));
        metrics.prune();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).unwrap();
        assert!(!text.contains("default/gone"), "{text}");
    }

    #[test]
    fn each_port_exposes_only_the_series_of_its_protocol() {
        let metrics = Arc::new(Metrics::new(1));
        let name = |n: &str| ServicePortName { service: ServiceName::new("default", n), port: String::new() };
        let (_web, _dns) =
            (metrics.port(&name("web"), Protocol::Tcp), metrics.port(&name("dns"), Protocol::Udp));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).unwrap();
        let series = |port: &str| -> Vec<&str> {
            text.lines().filter(|l| !l.starts_with('#') && l.contains(port)).collect()
        };
        let (web, dns) = (series("\"default/web\""), series("\"default/dns\""));
        assert!(web.iter().all(|l| !l.starts_with("ringport_udp_")), "{web:#?}");
        assert!(web.iter().any(|l| l.starts_with("ringport_connections_accepted_total")), "{web:#?}");
        assert!(dns.iter().all(|l| !l.starts_with("ringport_connect")), "{dns:#?}");
        assert!(dns.iter().any(|l| l.starts_with("ringport_udp_flows_created_total")), "{dns:#?}");
        assert!(dns.iter().any(|l| l.starts_with("ringport_bytes_total")), "bytes for both: {dns:#?}");
    }
}
