//! `/metrics` of the real binary after known traffic, read by a real
//! exposition parser (the `prometheus-parse` crate): histograms consistent,
//! kube-proxy's names with their types and buckets, build and process
//! figures, the per-service-port switch, and the Grafana dashboard's
//! queries all answered by a real scrape.

mod common;

use std::time::Duration;

use common::{Backend, Proxy, eventually, service_with_endpoints};
use prometheus_parse::{Sample, Scrape, Value};

const SVC: &str = "{namespace=\"default\",service=\"svc\",port=\"\"}";

fn parse(body: &str) -> Scrape {
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("the exposition parses")
}

fn scrape(proxy: &Proxy) -> (String, Scrape) {
    let (code, body) = proxy.get("/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    let parsed = parse(&body);
    (body, parsed)
}

/// `n` echo round trips through the proxy, then wait until all are closed.
fn echo_connections(proxy: &Proxy, n: usize) {
    echo_connections_counted(proxy, n, &format!("ringport_connections_active{SVC}"));
}

/// The same, with the sample that counts open connections.
fn echo_connections_counted(proxy: &Proxy, n: usize, active: &str) {
    let target = proxy.proxy_addr("default/svc");
    for _ in 0..n {
        assert_eq!(common::echo_once(target, b"ping"), b"ping");
    }
    eventually(Duration::from_secs(5), "every connection counted closed", || {
        proxy.metric(active) == Some(0.0)
    });
}

fn sample<'a>(scrape: &'a Scrape, metric: &str, label: Option<(&str, &str)>) -> &'a Sample {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {metric} {label:?}"))
}

fn value(s: &Sample) -> f64 {
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{} is not a single value: {other:?}", s.metric),
    }
}

/// Every histogram: bounds rise, counts never fall, the last bound is
/// +Inf, and its count is the series' `_count`. Returns how many there were.
fn assert_histograms_consistent(scrape: &Scrape) -> usize {
    let mut seen = 0;
    for s in &scrape.samples {
        let Value::Histogram(buckets) = &s.value else { continue };
        seen += 1;
        assert!(!buckets.is_empty(), "{} has no buckets", s.metric);
        for w in buckets.windows(2) {
            assert!(w[0].less_than < w[1].less_than, "{}: bounds not rising: {buckets:?}", s.metric);
            assert!(w[0].count <= w[1].count, "{}: counts fall: {buckets:?}", s.metric);
        }
        let last = buckets.last().expect("a bucket");
        assert!(last.less_than.is_infinite(), "{}: last bucket is not +Inf: {buckets:?}", s.metric);
        let count = scrape
            .samples
            .iter()
            .find(|c| c.metric == format!("{}_count", s.metric) && c.labels == s.labels)
            .unwrap_or_else(|| panic!("no {}_count for {:?}", s.metric, s.labels));
        assert_eq!(last.count, value(count), "{}: +Inf != _count", s.metric);
    }
    seen
}

fn buckets(s: &Sample) -> Vec<f64> {
    match &s.value {
        Value::Histogram(b) => b.iter().map(|b| b.less_than).collect(),
        other => panic!("{} is not a histogram: {other:?}", s.metric),
    }
}

#[test]
fn a_real_scrape_after_known_traffic_has_consistent_histograms() {
    let a = Backend::echo();
    let proxy = Proxy::start(&service_with_endpoints("svc", &[a.addr]), &[]);
    const N: usize = 25;
    echo_connections(&proxy, N);
    let (body, scrape) = scrape(&proxy);
    assert!(assert_histograms_consistent(&scrape) >= 4, "{body}");
    let connect = sample(&scrape, "ringport_connect_duration_seconds", Some(("service", "svc")));
    let Value::Histogram(b) = &connect.value else { panic!("not a histogram") };
    assert_eq!(b.last().map(|b| b.count), Some(N as f64), "{body}");
    let count = sample(&scrape, "ringport_connect_duration_seconds_count", Some(("service", "svc")));
    assert_eq!(value(count), N as f64, "_count equals the connections made");
    let accepted = sample(&scrape, "ringport_connections_accepted_total", Some(("service", "svc")));
    assert_eq!(value(accepted), N as f64);
    assert_eq!(accepted.labels.get("namespace"), Some("default"));
}

#[test]
fn kube_proxys_names_build_info_and_process_figures_are_scraped() {
    let a = Backend::echo();
    let proxy = Proxy::start(&service_with_endpoints("svc", &[a.addr]), &[]);
    let (body, scrape) = scrape(&proxy);
    // Types as kube-proxy declares them.
    for (name, ty) in [
        ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
        ("kubeproxy_network_programming_duration_seconds", "histogram"),
        ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
        ("kubeproxy_sync_proxy_rules_endpoint_changes", "counter"),
        ("kubeproxy_sync_proxy_rules_service_changes", "counter"),
        ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "gauge"),
        ("kubeproxy_sync_proxy_rules_service_changes_pending", "gauge"),
        ("ringport_sync_duration_seconds", "histogram"),
        ("ringport_build_info", "gauge"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
    ] {
        assert!(body.contains(&format!("# TYPE {name} {ty}\n")), "{name} {ty} in {body}");
    }
    // kube-proxy's bucket layouts.
    let sync = buckets(sample(&scrape, "kubeproxy_sync_proxy_rules_duration_seconds", None));
    assert_eq!(sync.len(), 16, "15 exponential buckets and +Inf: {sync:?}");
    assert_eq!((sync[0], sync[14]), (0.001, 16.384));
    let prog = buckets(sample(&scrape, "kubeproxy_network_programming_duration_seconds", None));
    assert_eq!(prog.len(), 82, "81 bounds as kube-proxy's merge() makes them, and +Inf: {prog:?}");
    assert_eq!((prog[0], prog[1], prog[3], prog[80]), (0.0, 0.25, 1.0, 300.0));
    // The first load is one sync that added one service port.
    let one_sync = sample(&scrape, "kubeproxy_sync_proxy_rules_duration_seconds_count", None);
    assert_eq!(value(one_sync), 1.0);
    // Ready means the first rule sync is done, and a first one is full.
    let full = sample(&scrape, "ringport_sync_duration_seconds_count", Some(("kind", "full")));
    assert_eq!(value(full), 1.0);
    assert!(
        !scrape.samples.iter().any(|s| s.metric.starts_with("kubeproxy_sync_full_proxy_rules")),
        "kube-proxy's full/partial split is of its own total, which the rule sync does not feed"
    );
    assert_eq!(value(sample(&scrape, "kubeproxy_sync_proxy_rules_endpoint_changes_total", None)), 1.0);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let last = value(sample(&scrape, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", None));
    assert!(last > now - 600.0 && last <= now + 1.0, "last sync {last}, now {now}");

    let info = sample(&scrape, "ringport_build_info", None);
    assert_eq!(value(info), 1.0);
    assert_eq!(info.labels.get("version"), Some(env!("CARGO_PKG_VERSION")));
    let version =
        std::process::Command::new(env!("CARGO_BIN_EXE_ringport")).arg("--version").output().expect("run");
    let version = String::from_utf8_lossy(&version.stdout);
    let commit = info.labels.get("commit").expect("a commit label");
    assert!(version.contains(&format!("commit {commit},")), "{version} vs {commit}");

    assert!(value(sample(&scrape, "process_resident_memory_bytes", None)) > 1e6);
    assert!(value(sample(&scrape, "process_open_fds", None)) >= 3.0);
    let start = value(sample(&scrape, "process_start_time_seconds", None));
    assert!(start > now - 3600.0 && start <= now + 1.0, "start {start}, now {now}");
}

#[test]
fn per_service_metrics_can_be_cut_to_a_summary_or_off() {
    let a = Backend::echo();
    let manifest = service_with_endpoints("svc", &[a.addr]);
    let per_port = |args: &[&str]| {
        let proxy = Proxy::start(&manifest, args);
        let active = if args.contains(&"off") {
            "ringport_connections_active"
        } else {
            &format!("ringport_connections_active{SVC}")
        };
        echo_connections_counted(&proxy, 2, active);
        let (body, scrape) = scrape(&proxy);
        assert_histograms_consistent(&scrape);
        let n = body.lines().filter(|l| !l.starts_with('#') && l.contains("service=\"svc\"")).count();
        (n, body)
    };
    let (full, _) = per_port(&[]);
    let (summary, body) = per_port(&["--per-service-metrics", "summary"]);
    assert_eq!(summary, 4, "a TCP port keeps accepted, active and bytes (2): {body}");
    assert!(body.contains("ringport_connect_duration_seconds_count 2\n"), "summed over ports: {body}");
    let (off, body) = per_port(&["--per-service-metrics", "off"]);
    assert_eq!(off, 0, "{body}");
    assert!(body.contains("ringport_connections_accepted_total 2\n"), "{body}");
    assert!(full > 20, "full detail: {full} series");
}

/// Metric names in a PromQL expression: identifiers followed by `{`, `[`
/// or `)` or space that are not functions or keywords.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if !(c.is_ascii_alphabetic() || c == '_') {
            continue;
        }
        let mut end = i + c.len_utf8();
        while let Some(&(j, d)) = chars.peek() {
            if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                end = j + 1;
                chars.next();
            } else {
                break;
            }
        }
        let word = &expr[i..end];
        let preceded_by_digit = expr[..i].ends_with(|p: char| p.is_ascii_digit() || p == '.');
        if !preceded_by_digit
            && (word.starts_with("ringport_")
                || word.starts_with("kubeproxy_")
                || word.starts_with("process_"))
        {
            names.push(word.to_owned());
        }
    }
    names
}

#[test]
fn every_metric_the_grafana_dashboard_queries_exists_in_a_real_scrape() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read the dashboard"))
            .expect("dashboard JSON");
    let mut exprs = Vec::new();
    fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => collect(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "the dashboard has panels: {exprs:?}");
    // A TCP and a UDP service port: each protocol exposes its own families.
    let a = Backend::echo();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP endpoint");
    let udp_port = udp.local_addr().expect("addr").port();
    let manifest = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.7.8\n  ports:\n  - {{port: 53, protocol: UDP}}\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: dns, namespace: default}}\nsubsets:\n\
         - addresses: [{{ip: \"127.0.0.1\"}}]\n  ports: [{{port: {udp_port}, protocol: UDP}}]\n",
        service_with_endpoints("svc", &[a.addr])
    );
    let proxy = Proxy::start(&manifest, &[]);
    echo_connections(&proxy, 1);
    let (body, scrape) = scrape(&proxy);
    let mut known: std::collections::HashSet<String> =
        scrape.samples.iter().map(|s| s.metric.clone()).collect();
    // Histograms are parsed into one sample; PromQL queries `_bucket`.
    for s in &scrape.samples {
        if matches!(s.value, Value::Histogram(_)) {
            known.insert(format!("{}_bucket", s.metric));
        }
    }
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr:?}");
        for name in names {
            assert!(known.contains(&name), "{name} (queried by {expr:?}) is not in a real scrape:\n{body}");
        }
    }
}

#[test]
fn an_ejected_endpoint_that_answers_again_counts_as_readmitted() {
    let live = Backend::echo();
    let port = common::free_port();
    let revived: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let proxy = Proxy::start(
        &service_with_endpoints("svc", &[live.addr, revived]),
        &["--eject-after", "1", "--eject-backoff", "20ms", "--eject-max", "20ms"],
    );
    let m = |name: &str| proxy.metric(&format!("{name}{SVC}")).unwrap_or(0.0);
    // Nothing listens there yet: connections fail over to the live one and
    // eject it.
    eventually(Duration::from_secs(10), "an ejection", || {
        echo_connections(&proxy, 2);
        m("ringport_endpoint_ejections_total") >= 1.0
    });
    assert_eq!(m("ringport_endpoint_readmissions_total"), 0.0);
    // It comes up: once its ejection ends, a connect to it succeeds.
    let _back = Backend::echo_at(&revived.to_string());
    eventually(Duration::from_secs(10), "a readmission", || {
        echo_connections(&proxy, 2);
        m("ringport_endpoint_readmissions_total") >= 1.0
    });
}
