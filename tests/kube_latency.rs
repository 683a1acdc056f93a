//! How long one EndpointSlice change takes to reach new connections, with
//! the real binary against the fake API server holding `N` other Services
//! (each with a slice): a measurement, not a check, so it is ignored by
//! default and asserts nothing about time. Run it with a release binary:
//!
//! ```text
//! cargo build --release --bin ringport
//! RINGPORT_BIN=target/release/ringport LATENCY_SERVICES=10000 \
//!   cargo test --test kube_latency -- --ignored --nocapture
//! ```
//!
//! Each round moves the measured Service's one endpoint to the other of two
//! greeters on loopback and connects to its proxy port until the other one
//! answers; the time from the API change to that answer is printed, with
//! ringport's own `ringport_network_programming_duration_seconds` where the
//! binary has it. `RINGPORT_BIN` may name an older build to compare.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;
mod fake_api;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{Backend, free_port};
use fake_api::{FakeApi, service, slice};
use serde_json::{Value, json};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The measured Service's slice, on `backend`, stamped now.
fn web_slice(backend: SocketAddr) -> Value {
    let mut s = slice("web-1", "web", backend.port(), &[("127.0.0.1", "node-1", "zone-a")]);
    s["metadata"]["annotations"] = json!({
        "endpoints.kubernetes.io/last-change-trigger-time":
            humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
    });
    s
}

fn greeting(addr: SocketAddr) -> Option<String> {
    use std::io::BufRead;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).ok()?;
    Some(line.trim().to_owned())
}

fn get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text.split_once("\r\n\r\n")?.1.to_owned())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[test]
#[ignore = "a measurement: run it with --ignored and a release RINGPORT_BIN"]
fn one_slice_change_to_new_connections() {
    let n = env_or("LATENCY_SERVICES", 10_000);
    let rounds = env_or("LATENCY_ROUNDS", 30);
    let bin = std::env::var("RINGPORT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ringport").to_owned());
    let (a, b) = (Backend::greeter(), Backend::greeter());
    let mut objects = vec![
        service("web", json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]})),
        web_slice(a.addr),
    ];
    for i in 0..n {
        let name = format!("s{i}");
        let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
        objects.push(service(&name, json!({"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]})));
        // Endpoints on TEST-NET-1: never connected to (no traffic to them).
        let ep = format!("192.0.2.{}", 1 + i % 250);
        objects.push(slice(&format!("{name}-1"), &name, 8080, &[(ep.as_str(), "node-1", "zone-a")]));
    }
    let api = FakeApi::start(objects);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = Command::new(&bin)
        .args(["run", "--source", "kube", "--redirect", "none", "--handover-socket", "none"])
        .args(["--kubeconfig", &kubeconfig.display().to_string()])
        .args(["--workers", "1", "--no-pin", "--bind-address", "127.0.0.1"])
        .args([
            "--healthz-bind-address",
            &metrics.to_string(),
            "--metrics-bind-address",
            &metrics.to_string(),
        ])
        .env("RUST_LOG", std::env::var("LATENCY_RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
        .stdout(Stdio::null())
        .stderr(match std::env::var_os("LATENCY_LOG") {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::null(),
        })
        .spawn()
        .unwrap();
    let started = Instant::now();
    while get(metrics, "/readyz").is_none_or(|b| b.trim() != "ok") {
        assert!(started.elapsed() < Duration::from_secs(600), "not ready in 10 min");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ready = started.elapsed();
    let snap: Value = serde_json::from_str(&get(metrics, "/debug/snapshot").unwrap()).unwrap();
    let port = snap["service_ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "default/web")
        .and_then(|p| p["proxy_port"].as_u64())
        .unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()));
    assert_eq!(greeting(web).as_deref(), Some(a.addr.to_string().as_str()));

    let mut took = Vec::new();
    for round in 0..rounds {
        let to = if round % 2 == 0 { b.addr } else { a.addr };
        // Quiet between rounds: each change is a lone one.
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        api.apply(web_slice(to));
        while greeting(web).as_deref() != Some(to.to_string().as_str()) {
            assert!(t0.elapsed() < Duration::from_secs(30), "round {round}: not served in 30 s");
        }
        took.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    took.sort_by(f64::total_cmp);
    let text = get(metrics, "/metrics").unwrap_or_default();
    let sample = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let (sum, count) = (
        sample("ringport_network_programming_duration_seconds_sum"),
        sample("ringport_network_programming_duration_seconds_count"),
    );
    println!(
        "binary {bin}: {n} other Services, ready in {:.1} s; change -> new connection over {rounds} rounds: \
         p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms; ringport_network_programming_duration_seconds mean {:.2} ms over {count}",
        ready.as_secs_f64(),
        percentile(&took, 0.5),
        percentile(&took, 0.9),
        took[took.len() - 1],
        sum / count * 1e3,
    );
    let _ = child.kill();
    let _ = child.wait();
}
