//! Log volume at scale: a configuration of thousands of service ports is
//! one summary line at info, not one line per listener, and so is a change
//! on top of it (issue 13, item 5). No traffic: the endpoints (127.0.1.x,
//! port 1) are never contacted.
//!
//! CI runs 2,000 ports: binding proxy ports one by one dominates, and a
//! debug build took 68 s to bind 10,000 on the shared 2-core machine.
//! `LOG_VOLUME_PORTS=10000 cargo test --test log_volume` runs the 10k case.

mod common;

use std::fmt::Write;
use std::time::Duration;

use common::{Proxy, eventually};

fn services() -> usize {
    std::env::var("LOG_VOLUME_PORTS").ok().and_then(|n| n.parse().ok()).unwrap_or(2_000)
}

/// `n` Services of one TCP port each, with 2 or 3 endpoints; `moved`
/// gives Service 0 another endpoint.
fn manifest(n: usize, moved: bool) -> String {
    let mut y = String::new();
    for i in 0..n {
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        let eps: Vec<String> = (0..2 + i % 2)
            .map(|e| {
                let last = if i == 0 && moved && e == 0 { 250 } else { e + 1 };
                format!("{{addresses: [\"127.0.1.{last}\"]}}")
            })
            .collect();
        write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: scale}}\n\
             spec: {{clusterIP: \"{ip}\", ports: [{{name: p, port: 80, targetPort: 1}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: s{i}-1, namespace: scale, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
             addressType: IPv4\nports: [{{name: p, port: 1}}]\nendpoints: [{}]\n",
            eps.join(", ")
        )
        .expect("write to a string");
    }
    y
}

#[test]
fn thousands_of_service_ports_log_one_summary_line_per_update() {
    #[allow(non_snake_case)]
    let SERVICES = services();
    // One worker: 10k listening sockets fit well inside the fd limit.
    let started = std::time::Instant::now();
    let ready_within = Duration::from_secs(60 + SERVICES as u64 / 100);
    let proxy = Proxy::start_within(&manifest(SERVICES, false), &["--workers", "1"], None, ready_within);
    eprintln!("ready after {:?}", started.elapsed());
    let log = proxy.log();
    let lines = log.lines().count();
    assert!(lines < 50, "{lines} lines at info and above for one apply of {SERVICES} ports:\n{}", head(&log));
    let summary = log.lines().find(|l| l.contains("reloaded")).expect("a summary line");
    assert!(summary.contains(&format!("service_ports={SERVICES}")), "{summary}");
    assert!(summary.contains(&format!("listeners_added={SERVICES}")), "{summary}");
    assert!(summary.contains("bind_errors=0"), "{summary}");
    assert!(!log.contains("listening"), "per-listener lines are at debug:\n{}", head(&log));

    // One endpoint changes: one more summary line, one port changed.
    proxy.write_manifest(&manifest(SERVICES, true));
    // A summary line (not "reloaded: nothing changed", which a file caught
    // while being written may log first).
    let summary = |l: &&str| l.contains("reloaded") && l.contains("generation=");
    eventually(Duration::from_secs(10), "the change's summary line", || {
        proxy.log().lines().filter(summary).count() == 2
    });
    let log = proxy.log();
    let last = log.lines().rfind(summary).expect("summary");
    assert!(last.contains("ports_set=1") && last.contains("listeners_added=0"), "{last}");
    assert!(log.lines().count() < lines + 10, "a one-port change added lines:\n{}", head(&log));
}

/// A reload with many invalid objects names a few of them and counts the
/// rest on one line (S5).
#[test]
fn many_invalid_objects_log_a_few_lines_and_a_count() {
    let proxy = Proxy::start(&manifest(3, false), &["--workers", "1"]);
    let broken = manifest(40, false).replace("port: 80,", "port: 70000,");
    proxy.write_manifest(&broken);
    eventually(Duration::from_secs(10), "the rejected reload to be logged", || {
        proxy.log().contains("reload rejected")
    });
    let log = proxy.log();
    let named = log.lines().filter(|l| l.contains("invalid manifest") && l.contains("70000")).count();
    assert_eq!(named, ringport::log_cap::SHOWN, "lines naming an invalid object:\n{}", head(&log));
    assert!(
        log.lines().any(|l| l.contains("invalid manifest: 35 more (not shown)")),
        "the rest counted on one line:\n{}",
        head(&log)
    );
}

/// The first lines of a log, for a failure message.
fn head(log: &str) -> String {
    log.lines().take(40).collect::<Vec<_>>().join("\n")
}
