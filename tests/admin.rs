//! The admin endpoints of the real binary: health, readiness, and the
//! Prometheus metrics counting real traffic.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Backend, Proxy, eventually, free_port, service_with_endpoints};

#[test]
fn health_and_readiness_answer() {
    let a = Backend::echo();
    let proxy = Proxy::start(&service_with_endpoints("svc", &[a.addr]), &[]);
    for path in ["/healthz", "/livez", "/readyz"] {
        assert_eq!(proxy.get(path).map(|(code, _)| code), Some(200), "{path}");
    }
}

#[test]
fn debug_snapshot_shows_ports_proxy_ports_endpoints_and_the_rules_they_ask_for() {
    let a = Backend::echo();
    let proxy = Proxy::start(&service_with_endpoints("svc", &[a.addr]), &[]);
    let snap = proxy.snapshot();
    let port = &snap["service_ports"][0];
    assert_eq!(port["name"], "default/svc");
    let proxy_port = port["proxy_port"].as_u64().expect("a proxy port");
    assert_eq!(port["endpoints"][0]["addr"], a.addr.to_string());
    let rules = snap["redirect_rules"].as_array().expect("redirect_rules");
    assert_eq!(rules.len(), 1, "{snap:#}");
    assert_eq!(rules[0]["daddr"], "10.96.7.7");
    assert_eq!(rules[0]["dport"], 80);
    assert_eq!(rules[0]["protocol"], "TCP");
    assert_eq!(rules[0]["proxy_port"].as_u64(), Some(proxy_port));
}

#[test]
fn metrics_count_connections_bytes_retries_and_connect_time() {
    let a = Backend::echo();
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let proxy = Proxy::start(&service_with_endpoints("svc", &[a.addr, dead]), &[]);
    let target = proxy.proxy_addr("default/svc");
    for _ in 0..20 {
        assert_eq!(common::echo_once(target, b"hello"), b"hello");
    }
    let label = "{namespace=\"default\",service=\"svc\",port=\"\"}";
    let m = |name: &str| proxy.metric(&format!("{name}{label}"));
    eventually(Duration::from_secs(5), "every connection to be counted closed", || {
        m("ringport_connections_active") == Some(0.0)
    });
    assert_eq!(m("ringport_connections_accepted_total"), Some(20.0));
    assert_eq!(m("ringport_connect_duration_seconds_count"), Some(20.0));
    let bytes = |dir: &str| {
        proxy.metric(&format!(
            "ringport_bytes_total{{namespace=\"default\",service=\"svc\",port=\"\",direction=\"{dir}\"}}"
        ))
    };
    assert_eq!(bytes("to_endpoint"), Some(100.0));
    assert_eq!(bytes("to_client"), Some(100.0));
    let failures = m("ringport_connect_failures_total").expect("failures");
    assert!(failures >= 1.0, "the dead endpoint was tried at least once");
    assert_eq!(m("ringport_connect_retries_total"), Some(failures), "each failure was followed by a retry");
    assert_eq!(m("ringport_connections_refused_total"), Some(0.0));
    assert_eq!(proxy.metric("ringport_snapshot_generation"), Some(1.0));
}
