//! Unit tests of the metrics: summing worker slots, histogram exposition,
//! label escaping, per-service-port detail.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::model::{Protocol, ServiceName, ServicePortName};

fn scrape(metrics: &Arc<Metrics>) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).expect("encodes");
    text
}

fn web() -> ServicePortName {
    ServicePortName { service: ServiceName::new("default", "web"), port: "http".into() }
}

const WEB: &str = "namespace=\"default\",service=\"web\",port=\"http\"";

#[test]
fn per_worker_counters_are_summed_at_scrape() {
    let metrics = Arc::new(Metrics::new(2));
    let port = metrics.port(&web(), Protocol::Tcp);
    port.slot(0).add(&port.slot(0).accepted, 3);
    port.slot(1).add(&port.slot(1).accepted, 4);
    port.slot(1).add(&port.slot(1).closed, 2);
    let text = scrape(&metrics);
    assert!(text.contains(&format!("ringport_connections_accepted_total{{{WEB}}} 7")), "{text}");
    assert!(text.contains(&format!("ringport_connections_active{{{WEB}}} 5")), "{text}");
}

#[test]
fn a_port_takes_its_worker_slots_at_its_first_count_and_scrapes_as_zero_before() {
    let metrics = Arc::new(Metrics::new(2));
    let port = metrics.port(&web(), Protocol::Tcp);
    assert!(port.counted().is_empty(), "no slot before any count");
    let text = scrape(&metrics);
    assert!(text.contains(&format!("ringport_connections_accepted_total{{{WEB}}} 0")), "{text}");
    port.slot(1).add(&port.slot(1).accepted, 2);
    assert_eq!(port.counted().len(), 2, "one slot per worker, made together");
    let text = scrape(&metrics);
    assert!(text.contains(&format!("ringport_connections_accepted_total{{{WEB}}} 2")), "{text}");
}

#[test]
fn histogram_buckets_are_cumulative_once_and_inf_equals_count() {
    let metrics = Arc::new(Metrics::new(2));
    let port = metrics.port(&web(), Protocol::Tcp);
    // 300 µs, 300 µs, 3 ms, 10 s: buckets 0.0005 -> 2, 0.005 -> 3, +Inf -> 4.
    for (w, d) in [(0, 300), (1, 300), (0, 3_000), (1, 10_000_000)] {
        port.slot(w).connect_duration.observe(Duration::from_micros(d));
    }
    let text = scrape(&metrics);
    let bucket = |le: &str| {
        let key = format!("ringport_connect_duration_seconds_bucket{{le=\"{le}\",{WEB}}} ");
        let line = text.lines().find(|l| l.starts_with(&key)).unwrap_or_else(|| panic!("{key} in {text}"));
        line[key.len()..].parse::<u64>().expect("a count")
    };
    assert_eq!(bucket("0.00025"), 0);
    assert_eq!(bucket("0.0005"), 2);
    assert_eq!(bucket("0.0025"), 2);
    assert_eq!(bucket("0.005"), 3);
    assert_eq!(bucket("2.5"), 3);
    assert_eq!(bucket("+Inf"), 4);
    assert!(text.contains(&format!("ringport_connect_duration_seconds_count{{{WEB}}} 4")), "{text}");
}

#[test]
fn rule_syncs_use_kube_proxys_buckets() {
    assert_eq!(SyncBuckets::BOUNDS.len(), 15);
    assert_eq!(SyncBuckets::BOUNDS[0], 0.001);
    assert!((SyncBuckets::BOUNDS[14] - 16.384).abs() < 1e-9);
    // kube-proxy's layout, written out as its pkg/proxy/metrics/metrics.go
    // builds it: merge() starts with one 0, then LinearBuckets(0.25, 0.25,
    // 2), (1, 1, 59), (60, 5, 12), (120, 30, 7).
    let mut expected = vec![0.0, 0.25, 0.5];
    expected.extend((1..=59).map(f64::from));
    expected.extend((0..12).map(|k| 60.0 + 5.0 * f64::from(k)));
    expected.extend((0..7).map(|k| 120.0 + 30.0 * f64::from(k)));
    assert_eq!(ProgrammingBuckets::BOUNDS, expected.as_slice());
    assert_eq!(ProgrammingBuckets::BOUNDS.len(), 81);
    let exponential: Vec<f64> = (0..15).map(|k| 0.001 * f64::from(1u32 << k)).collect();
    assert!(SyncBuckets::BOUNDS.iter().zip(&exponential).all(|(a, b)| (a - b).abs() < 1e-12));
    let metrics = Arc::new(Metrics::new(1));
    metrics.sync.record(
        Duration::from_millis(3),
        Ok((crate::metrics::SyncKind::Full, Some(crate::metrics::FullReason::First), 2)),
    );
    let text = scrape(&metrics);
    assert!(text.contains("ringport_sync_duration_seconds_bucket{le=\"0.004\",kind=\"full\"} 1"), "{text}");
    assert!(text.contains("ringport_sync_duration_seconds_bucket{le=\"0.002\",kind=\"full\"} 0"), "{text}");
    assert!(text.contains("ringport_sync_duration_seconds_count{kind=\"verify\"} 0"), "{text}");
    assert!(!text.contains("kubeproxy_sync_full_proxy_rules"), "not fed from what feeds kube-proxy's total");
    metrics.sync.record(Duration::from_micros(50), Ok((crate::metrics::SyncKind::Verify, None, 2)));
    metrics.sync.record(Duration::from_millis(3), Ok((crate::metrics::SyncKind::Partial, None, 2)));
    // A failed sync is counted as a failure, under no kind.
    metrics.sync.record(Duration::from_millis(3), Err(()));
    let text = scrape(&metrics);
    assert!(text.contains("ringport_sync_duration_seconds_count{kind=\"partial\"} 1"), "{text}");
    assert!(text.contains("ringport_sync_duration_seconds_count{kind=\"full\"} 1"), "{text}");
    assert!(text.contains("ringport_sync_failures_total 1"), "{text}");
    assert!(text.contains("ringport_sync_full_total{reason=\"first\"} 1"), "{text}");
    assert!(text.contains("ringport_sync_full_total{reason=\"foreign_write\"} 0"), "{text}");
    assert!(!text.contains("kubeproxy_sync_partial_proxy_rules"), "{text}");
    assert!(text.contains("ringport_sync_duration_seconds_bucket{le=\"0.001\",kind=\"verify\"} 1"), "{text}");
}

#[test]
fn a_label_value_cannot_inject_a_series() {
    let metrics = Arc::new(Metrics::new(1));
    let evil = ServicePortName {
        service: ServiceName::new("default", "web"),
        port: "x\"} 1\nringport_injected_total{a=\"\\".into(),
    };
    let _port = metrics.port(&evil, Protocol::Tcp);
    let text = scrape(&metrics);
    assert!(!text.lines().any(|l| l.starts_with("ringport_injected")), "{text}");
    assert!(text.contains(r#"port="x\"} 1\nringport_injected_total{a=\"\\"}"#), "{text}");
}

#[test]
fn summary_and_off_detail_cut_per_port_series() {
    let metrics = Arc::new(Metrics::new(1));
    let ports: Vec<_> = (0..3)
        .map(|i| {
            let p = metrics.port(
                &ServicePortName { service: ServiceName::new("ns", format!("s{i}")), port: "p".into() },
                Protocol::Tcp,
            );
            p.slot(0).add(&p.slot(0).retries, 2);
            p.slot(0).connect_duration.observe(Duration::from_millis(1));
            p
        })
        .collect();
    let per_port = |text: &str| text.lines().filter(|l| l.contains("namespace=\"ns\"")).count();
    let full = per_port(&scrape(&metrics));
    metrics.set_detail(PortDetail::Summary);
    let summary = scrape(&metrics);
    assert_eq!(per_port(&summary), 3 * 4, "{summary}");
    assert!(summary.contains("ringport_connect_retries_total 6"), "{summary}");
    assert!(summary.contains("ringport_connect_duration_seconds_count 3"), "{summary}");
    metrics.set_detail(PortDetail::Off);
    let off = scrape(&metrics);
    assert_eq!(per_port(&off), 0, "{off}");
    assert!(full > 3 * 20, "full detail has about 26 series per TCP port: {full}");
    drop(ports);
}

#[test]
fn a_port_nothing_holds_is_no_longer_exposed() {
    let metrics = Arc::new(Metrics::new(1));
    let name = ServicePortName { service: ServiceName::new("default", "gone"), port: "".into() };
    drop(metrics.port(&name, Protocol::Tcp));
    metrics.prune();
    assert!(!scrape(&metrics).contains("\"gone\""));
}

#[test]
fn build_info_and_kube_proxy_names_are_exposed() {
    let metrics = Arc::new(Metrics::new(1));
    metrics.apply.queued(Changes { endpoints: 2, services: 1 });
    let pending = scrape(&metrics);
    assert!(pending.contains("kubeproxy_sync_proxy_rules_endpoint_changes_pending 2"), "{pending}");
    metrics.apply.published(Instant::now(), Changes { endpoints: 2, services: 1 });
    metrics.apply.unqueued(Changes { endpoints: 2, services: 1 });
    let text = scrape(&metrics);
    for line in [
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 2",
        "kubeproxy_sync_proxy_rules_service_changes_total 1",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
        "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
        "kubeproxy_network_programming_duration_seconds_count 0",
        "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
        "# TYPE process_cpu_seconds counter",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    let info = format!(
        "ringport_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        crate::version::VERSION,
        crate::version::COMMIT
    );
    assert!(text.contains(&info), "{text}");
}

#[test]
fn each_port_exposes_only_the_series_of_its_protocol() {
    let metrics = Arc::new(Metrics::new(1));
    let name = |n: &str| ServicePortName { service: ServiceName::new("default", n), port: "".into() };
    let (_web, _dns) = (metrics.port(&name("web"), Protocol::Tcp), metrics.port(&name("dns"), Protocol::Udp));
    let text = scrape(&metrics);
    let series = |service: &str| -> Vec<&str> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&format!("service=\"{service}\"")))
            .collect()
    };
    let (web, dns) = (series("web"), series("dns"));
    assert!(web.iter().all(|l| !l.starts_with("ringport_udp_")), "{web:#?}");
    assert!(web.iter().any(|l| l.starts_with("ringport_connections_accepted_total")), "{web:#?}");
    assert!(dns.iter().all(|l| !l.starts_with("ringport_connect")), "{dns:#?}");
    assert!(dns.iter().any(|l| l.starts_with("ringport_udp_flows_created_total")), "{dns:#?}");
    assert!(dns.iter().any(|l| l.starts_with("ringport_bytes_total")), "bytes for both: {dns:#?}");
}

/// kubeproxy_sync_proxy_rules_last_timestamp_seconds of a scrape.
fn kube_proxy_last_sync(metrics: &Arc<Metrics>) -> f64 {
    let text = scrape(metrics);
    text.lines()
        .find_map(|l| l.strip_prefix("kubeproxy_sync_proxy_rules_last_timestamp_seconds "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no last sync in {text}"))
}

#[test]
fn a_periodic_rule_sync_stamps_kube_proxys_last_sync_too() {
    let metrics = Arc::new(Metrics::new(1));
    assert_eq!(kube_proxy_last_sync(&metrics), 0.0, "nothing synced yet");
    // A resync with no update published: kube-proxy stamps it as well.
    metrics.sync.record(
        Duration::from_millis(2),
        Ok((crate::metrics::SyncKind::Full, Some(crate::metrics::FullReason::Periodic), 4)),
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let stamped = kube_proxy_last_sync(&metrics);
    assert!(stamped > now - 60.0 && stamped <= now + 1.0, "{stamped} vs {now}");
    // A failed sync stamps nothing.
    let metrics = Arc::new(Metrics::new(1));
    metrics.sync.record(Duration::from_millis(2), Err(()));
    assert_eq!(kube_proxy_last_sync(&metrics), 0.0);
}

#[test]
fn network_programming_is_timed_from_the_trigger_time() {
    let metrics = Arc::new(Metrics::new(1));
    let now = std::time::SystemTime::now();
    metrics.apply.programmed(now - Duration::from_secs(3));
    // Clock skew: a trigger time ahead of this node counts as 0.
    metrics.apply.programmed(now + Duration::from_secs(60));
    let text = scrape(&metrics);
    for line in [
        "kubeproxy_network_programming_duration_seconds_count 2",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.0\"} 1",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"2.0\"} 1",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"4.0\"} 2",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
}

#[test]
fn network_programming_has_millisecond_buckets_beside_kube_proxys() {
    let metrics = Arc::new(Metrics::new(1));
    let trigger = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    // Served 3 ms, 40 ms and 2 s after the change.
    for ms in [3, 40, 2000] {
        metrics.apply.programmed_at(trigger, trigger + Duration::from_millis(ms));
    }
    let text = scrape(&metrics);
    for line in [
        "ringport_network_programming_duration_seconds_count 3",
        "ringport_network_programming_duration_seconds_bucket{le=\"0.0025\"} 0",
        "ringport_network_programming_duration_seconds_bucket{le=\"0.005\"} 1",
        "ringport_network_programming_duration_seconds_bucket{le=\"0.01\"} 1",
        "ringport_network_programming_duration_seconds_bucket{le=\"0.05\"} 2",
        "ringport_network_programming_duration_seconds_bucket{le=\"2.5\"} 3",
        "ringport_network_programming_duration_seconds_sum 2.043",
        // kube-proxy's coarse one sees the same three.
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"} 2",
        "kubeproxy_network_programming_duration_seconds_count 3",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
}

#[test]
fn pending_changes_fall_by_what_an_update_carried_not_to_zero() {
    let metrics = Arc::new(Metrics::new(1));
    metrics.apply.queued(Changes { endpoints: 3, services: 1 });
    metrics.apply.queued(Changes { endpoints: 2, services: 0 });
    metrics.apply.published(Instant::now(), Changes { endpoints: 1, services: 1 });
    metrics.apply.unqueued(Changes { endpoints: 3, services: 1 });
    let text = scrape(&metrics);
    assert!(text.contains("kubeproxy_sync_proxy_rules_endpoint_changes_pending 2"), "{text}");
    assert!(text.contains("kubeproxy_sync_proxy_rules_service_changes_pending 0"), "{text}");
    metrics.apply.unqueued(Changes { endpoints: 5, services: 5 });
    assert!(
        scrape(&metrics).contains("kubeproxy_sync_proxy_rules_endpoint_changes_pending 0"),
        "never below 0"
    );
}

#[test]
fn a_port_that_changes_protocol_keeps_both_counters_under_one_series() {
    let metrics = Arc::new(Metrics::new(1));
    let name = ServicePortName { service: ServiceName::new("ns", "dns"), port: "dns".into() };
    // The TCP port still drains while its UDP successor serves.
    let tcp = metrics.port(&name, Protocol::Tcp);
    let udp = metrics.port(&name, Protocol::Udp);
    assert!(!Arc::ptr_eq(&tcp, &udp));
    assert!(Arc::ptr_eq(&tcp, &metrics.port(&name, Protocol::Tcp)), "the TCP counters are kept");
    tcp.slot(0).add(&tcp.slot(0).bytes_to_endpoint, 5);
    udp.slot(0).add(&udp.slot(0).bytes_to_endpoint, 7);
    let text = scrape(&metrics);
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("ringport_bytes_total{") && l.contains("to_endpoint"))
        .collect();
    assert_eq!(series.len(), 1, "one series per label set: {text}");
    assert!(series[0].ends_with(" 12"), "{series:?}");
}
