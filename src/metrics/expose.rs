//! The exposition of [`Metrics`]: each family written by one helper
//! (counter, gauge, histogram), per service port or summed over them as
//! `--per-service-metrics` asks, with every label value escaped.
//!
//! Invariants: a label value from outside (a namespace, Service or port
//! name) goes out only through [`LabelValue`], which escapes `\`, `"` and
//! newlines, so no name can end a series or inject one.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{AtomicHistogram, Buckets, Metrics, PortCounters, PortDetail, PortMetrics, names, process};
use crate::model::Protocol;

/// A label value, escaped as the text format asks.
#[derive(Clone, Debug)]
pub(super) struct LabelValue(pub String);

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

type Enc<'a> = DescriptorEncoder<'a>;
type Labels = Vec<(&'static str, LabelValue)>;

/// The series of one family: each with its labels and the service ports it
/// sums (one each per port, or all of them under no labels).
struct Groups<'a>(Vec<(Labels, Vec<&'a PortMetrics>)>);

impl<'a> Groups<'a> {
    fn new(ports: &'a [Arc<PortMetrics>], per_port: bool) -> Self {
        if !per_port {
            return Self(vec![(Vec::new(), ports.iter().map(Arc::as_ref).collect())]);
        }
        // One series per service port name: its TCP and UDP counters (both
        // live only while a port that changed protocol drains) sum into it.
        // `ports` comes sorted by name, so those are neighbours.
        let mut groups: Vec<(Labels, Vec<&PortMetrics>)> = Vec::new();
        for p in ports {
            match groups.last_mut() {
                Some((_, last)) if last[0].name == p.name => last.push(p),
                _ => groups.push((port_labels(p), vec![p.as_ref()])),
            }
        }
        Self(groups)
    }
}

fn port_labels(p: &PortMetrics) -> Labels {
    vec![
        ("namespace", LabelValue(p.name.service.namespace.to_string())),
        ("service", LabelValue(p.name.service.name.to_string())),
        ("port", LabelValue(p.name.port.to_string())),
    ]
}

/// Encode each series of a family with `f`. A series without labels is
/// written bare (no `{}`); it is then the family's only one.
fn each_series<T>(
    mut family: MetricEncoder<'_>,
    series: impl IntoIterator<Item = (Labels, T)>,
    f: impl Fn(MetricEncoder<'_>, T) -> std::fmt::Result,
) -> std::fmt::Result {
    for (labels, value) in series {
        if labels.is_empty() {
            return f(family, value);
        }
        f(family.encode_family(&labels)?, value)?;
    }
    Ok(())
}

fn counter(enc: &mut Enc<'_>, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut Enc<'_>, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

fn gauge_f64(enc: &mut Enc<'_>, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One histogram family; each series sums the histograms it is given.
fn histogram<B: Buckets>(
    enc: &mut Enc<'_>,
    name: &str,
    help: &str,
    series: &[(Labels, Vec<&AtomicHistogram<B>>)],
) -> std::fmt::Result {
    let family = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    let totals = series.iter().map(|(labels, parts)| {
        let mut counts = vec![0u64; B::BOUNDS.len() + 1];
        let mut sum = 0.0;
        for h in parts {
            h.add_into(&mut counts, &mut sum);
        }
        (labels.clone(), (counts, sum))
    });
    each_series(family, totals, |mut m, (counts, sum)| {
        let count = counts.iter().sum();
        // Per-bucket counts: the encoder accumulates them (once).
        let buckets: Vec<(f64, u64)> =
            B::BOUNDS.iter().chain([f64::MAX].iter()).copied().zip(counts).collect();
        m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    })
}

/// Picks one counter out of a worker slot.
type Field = fn(&PortCounters) -> &AtomicU64;

/// A counter family; with `directions`, one series per `(direction, counter)`.
fn port_counter(
    enc: &mut Enc<'_>,
    groups: &Groups<'_>,
    name: &str,
    help: &str,
    directions: &[(&str, Field)],
) -> std::fmt::Result {
    let family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    let series = groups.0.iter().flat_map(|(labels, ports)| {
        directions.iter().map(move |(dir, f)| {
            let mut labels = labels.clone();
            if !dir.is_empty() {
                labels.push(("direction", LabelValue((*dir).to_owned())));
            }
            (labels, ports.iter().map(|p| p.sum(f)).sum::<u64>())
        })
    });
    each_series(family, series, |m, n| ConstCounter::new(n).encode(m))
}

/// A gauge family of things open now: opened minus closed.
fn port_open_now(
    enc: &mut Enc<'_>,
    groups: &Groups<'_>,
    name: &str,
    help: &str,
    (opened, closed): (Field, Field),
) -> std::fmt::Result {
    let family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    let series = groups.0.iter().map(|(labels, ports)| {
        (labels.clone(), ports.iter().map(|p| p.sum(opened).saturating_sub(p.sum(closed))).sum::<u64>())
    });
    each_series(family, series, |m, n| ConstGauge::new(n as i64).encode(m))
}

/// One series per group, without a direction.
fn total(f: Field) -> [(&'static str, Field); 1] {
    [("", f)]
}

impl Metrics {
    fn encode_ports(&self, e: &mut Enc<'_>) -> std::fmt::Result {
        use names::*;
        let ports = self.live_ports();
        let of = |protocol| -> Vec<_> { ports.iter().filter(|p| p.protocol == protocol).cloned().collect() };
        let (tcp, udp) = (of(Protocol::Tcp), of(Protocol::Udp));
        let detail = self.detail();
        // Per protocol (and for all ports): the families a summary keeps
        // per port, and the rest, summed unless in full detail.
        let groups = |ports| {
            (Groups::new(ports, detail != PortDetail::Off), Groups::new(ports, detail == PortDetail::Full))
        };
        let (all_main, all_rest) = groups(&ports);
        let (main, rest) = groups(&tcp);
        port_counter(e, &main, CONNECTIONS_ACCEPTED, "Connections accepted", &total(|c| &c.accepted))?;
        let tcp_open: (Field, Field) = (|c| &c.accepted, |c| &c.closed);
        port_open_now(e, &main, CONNECTIONS_ACTIVE, "Connections open now", tcp_open)?;
        let bytes: [(&str, Field); 2] =
            [("to_endpoint", |c| &c.bytes_to_endpoint), ("to_client", |c| &c.bytes_to_client)];
        port_counter(e, &all_main, BYTES, "Bytes relayed", &bytes)?;
        let failures = "Failed connect attempts to endpoints";
        port_counter(e, &rest, CONNECT_FAILURES, failures, &total(|c| &c.connect_failures))?;
        let retries = "Connect attempts after a failed one";
        port_counter(e, &rest, CONNECT_RETRIES, retries, &total(|c| &c.retries))?;
        let refused = "Client connections reset because every attempt failed";
        port_counter(e, &rest, CONNECTIONS_REFUSED, refused, &total(|c| &c.refused))?;
        let headers = "Client connections reset for a malformed, refused or late PROXY protocol header";
        port_counter(e, &rest, PROXY_HEADERS_REFUSED, headers, &total(|c| &c.proxy_headers_refused))?;
        let ejections = "Endpoints ejected after consecutive connect failures";
        port_counter(e, &all_rest, EJECTIONS, ejections, &total(|c| &c.ejections))?;
        let readmissions = "Ejected endpoints readmitted by a successful connect or answer";
        port_counter(e, &all_rest, READMISSIONS, readmissions, &total(|c| &c.readmissions))?;
        let hists: Vec<_> = rest
            .0
            .iter()
            .map(|(l, ps)| {
                (l.clone(), ps.iter().flat_map(|p| p.counted().iter().map(|s| &s.connect_duration)).collect())
            })
            .collect();
        histogram(e, CONNECT_DURATION, "Time from accept to a connected endpoint", &hists)?;
        let (main, rest) = groups(&udp);

        let udp_open: (Field, Field) = (|c| &c.flows_created, |c| &c.flows_closed);
        port_open_now(e, &main, UDP_FLOWS_ACTIVE, "UDP flows open now", udp_open)?;
        port_counter(e, &rest, UDP_FLOWS_CREATED, "UDP flows created", &total(|c| &c.flows_created))?;
        let expired = "UDP flows closed by the idle timeout";
        port_counter(e, &rest, UDP_FLOWS_EXPIRED, expired, &total(|c| &c.flows_expired))?;
        let datagrams: [(&str, Field); 2] =
            [("to_endpoint", |c| &c.datagrams_to_endpoint), ("to_client", |c| &c.datagrams_to_client)];
        port_counter(e, &main, UDP_DATAGRAMS, "UDP datagrams relayed", &datagrams)?;
        let dropped = "UDP datagrams dropped (no endpoint, flow limit, full buffers)";
        port_counter(e, &rest, UDP_DROPPED, dropped, &total(|c| &c.datagrams_dropped))?;
        let truncated = "UDP datagrams larger than the buffer, dropped";
        port_counter(e, &rest, UDP_TRUNCATED, truncated, &total(|c| &c.truncated))
    }

    fn encode_control(&self, e: &mut Enc<'_>) -> std::fmt::Result {
        use names::*;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(e, SNAPSHOT_GENERATION, "Generation of the served snapshot", load(&self.generation) as i64)?;
        let mut reloads =
            e.encode_descriptor(RELOADS, "Configuration updates by result", None, MetricType::Counter)?;
        for (result, n) in [("applied", &self.reloads_applied), ("rejected", &self.reloads_rejected)] {
            ConstCounter::new(load(n)).encode(reloads.encode_family(&[("result", result)])?)?;
        }
        let unmatched = self.unmatched.iter().map(load).sum();
        let help = "Connections to a shared proxy port reset because no service port has their original destination: sent to it directly, or by a stale rule between a Service's deletion and the next rule sync";
        counter(e, CONNECTIONS_UNMATCHED, help, unmatched)?;
        let s = &self.sync;
        let by_kind: Vec<(Labels, Vec<_>)> = super::SyncKind::ALL
            .iter()
            .map(|k| (vec![("kind", LabelValue(k.as_str().to_owned()))], vec![&s.duration[*k as usize]]))
            .collect();
        histogram(
            e,
            SYNC_DURATION,
            "Redirect-rule sync duration, by kind (full, partial, verify)",
            &by_kind,
        )?;
        counter(e, SYNC_FAILURES, "Failed redirect-rule syncs", load(&s.failures))?;
        let help = "Redirect-rule syncs that rewrote everything, by reason";
        let family = e.encode_descriptor(SYNC_FULL, help, None, MetricType::Counter)?;
        let by_reason = super::FullReason::ALL
            .iter()
            .map(|r| (vec![("reason", LabelValue(r.as_str().to_owned()))], load(&s.full[*r as usize])));
        each_series(family, by_reason, |m, n| ConstCounter::new(n).encode(m))?;
        gauge(e, PROGRAMMED_RULES, "Redirect rules programmed", load(&s.programmed) as i64)?;
        let last = load(&s.last_success_ms) as f64 / 1e3;
        gauge_f64(e, LAST_SYNC, "Unix time of the last successful redirect-rule sync", last)?;

        let a = &self.apply;
        let sync = "Time to take an update into the served snapshot (kube-proxy's rule sync)";
        histogram(e, KP_SYNC_DURATION, sync, &[(Vec::new(), vec![&a.duration])])?;
        // As kube-proxy stamps every successful sync, the periodic resync
        // included: the later of the last publish and the last successful
        // rule sync (with `--redirect none`, its no-op pass every 30 s).
        let last = load(&a.last_ms).max(load(&s.last_success_ms)) as f64 / 1e3;
        let help = "Unix time of the last published update or successful redirect-rule sync";
        gauge_f64(e, KP_LAST_SYNC, help, last)?;
        let programming = "Time from an EndpointSlice's last-change-trigger-time to its change being served";
        histogram(e, KP_NETWORK_PROGRAMMING, programming, &[(Vec::new(), vec![&a.programming])])?;
        histogram(e, NETWORK_PROGRAMMING, programming, &[(Vec::new(), vec![&a.programming_fine])])?;
        let changes = "Service ports whose endpoints changed";
        counter(e, KP_ENDPOINT_CHANGES, changes, load(&a.endpoint_changes))?;
        let pending = "Service ports whose endpoint changes are not yet served";
        gauge(e, KP_ENDPOINT_CHANGES_PENDING, pending, load(&a.endpoint_pending) as i64)?;
        counter(e, KP_SERVICE_CHANGES, "Service ports whose service changed", load(&a.service_changes))?;
        let pending = "Service ports whose service changes are not yet served";
        gauge(e, KP_SERVICE_CHANGES_PENDING, pending, load(&a.service_pending) as i64)?;
        let build = "Time to build a snapshot: every service port (full) or the changed ones (partial)";
        let kind = |k: &str| -> Labels { vec![("kind", LabelValue(k.to_owned()))] };
        histogram(
            e,
            SNAPSHOT_BUILD,
            build,
            &[(kind("full"), vec![&a.build_full]), (kind("partial"), vec![&a.build_partial])],
        )
    }

    fn encode_process(e: &mut Enc<'_>) -> std::fmt::Result {
        use names::*;
        let mut info =
            e.encode_descriptor(BUILD_INFO, "ringport's version and commit", None, MetricType::Gauge)?;
        let labels = [
            ("version", LabelValue(crate::version::VERSION.to_owned())),
            ("commit", LabelValue(crate::version::COMMIT.to_owned())),
        ];
        ConstGauge::new(1).encode(info.encode_family(&labels)?)?;
        // /proc unreadable: no process figures rather than wrong ones.
        let Some(p) = process::read() else { return Ok(()) };
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(e.encode_descriptor(
            PROCESS_CPU,
            "User and system CPU time",
            None,
            MetricType::Counter,
        )?)?;
        gauge(e, PROCESS_RSS, "Resident memory size", p.resident_bytes as i64)?;
        gauge(e, PROCESS_VSZ, "Virtual memory size", p.virtual_bytes as i64)?;
        gauge(e, PROCESS_OPEN_FDS, "Open file descriptors", p.open_fds as i64)?;
        gauge(e, PROCESS_MAX_FDS, "Most file descriptors allowed", p.max_fds as i64)?;
        gauge_f64(e, PROCESS_START, "Unix time the process started", p.start_time_seconds)
    }
}

impl Metrics {
    /// Transparent mode, summed over every service port: how many
    /// connections kept the client's address, and why the others did not.
    fn encode_source(&self, e: &mut Enc<'_>) -> std::fmt::Result {
        let ports = self.live_ports();
        let sum = |f: &dyn Fn(&PortCounters) -> &AtomicU64| -> u64 { ports.iter().map(|p| p.sum(f)).sum() };
        let help = "Connections and UDP flows whose endpoint saw the client's own address";
        counter(e, names::SOURCE_IP_PRESERVED, help, sum(&|c| &c.source_preserved))?;
        let ready = self.transparent_ready.load(Ordering::Relaxed) as i64;
        let help = "1 when --transparent is set up and working (IP_TRANSPARENT allowed, policy routing in place), else 0";
        gauge(e, names::SOURCE_IP_TRANSPARENT_READY, help, ready)?;
        let help =
            "Connections and UDP flows that asked for the client's address and got the node's, by reason";
        let mut family = e.encode_descriptor(names::SOURCE_IP_FALLBACK, help, None, MetricType::Counter)?;
        for why in crate::source_ip::Fallback::ALL {
            let n = sum(&|c| &c.source_fallback[why as usize]);
            ConstCounter::new(n).encode(family.encode_family(&[("reason", why.as_str())])?)?;
        }
        Ok(())
    }
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        self.encode_ports(&mut enc)?;
        self.encode_source(&mut enc)?;
        self.encode_control(&mut enc)?;
        Self::encode_process(&mut enc)
    }
}
