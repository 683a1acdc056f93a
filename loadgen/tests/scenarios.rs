//! End-to-end runs of every scenario against `loadgen serve` on loopback
//! ports the server picks itself (port 0, reported on its first stdout line).
//! Each check is about counts, never about time: attempted == completed +
//! errors, bytes match the payloads, and a healthy server yields no error.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_loadgen");

/// Kills the child on drop, so a failing test leaves no server behind.
struct Server {
    child: Child,
    listening: Vec<Value>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .args(["--duration", "120s", "--workers", "2"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn loadgen serve");
        let stdout = child.stdout.take().unwrap();
        let mut server = Server { child, listening: Vec::new() };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad first line {line:?}: {e}"));
        server.listening = v["listening"].as_array().unwrap().clone();
        server
    }

    fn addr(&self, mode: &str) -> String {
        let l = self.listening.iter().find(|l| l["mode"] == mode).unwrap();
        l["addr"].as_str().unwrap().to_string()
    }

    fn identity(&self, mode: &str) -> String {
        let l = self.listening.iter().find(|l| l["mode"] == mode).unwrap();
        l["identity"].as_str().unwrap().to_string()
    }
}

fn all_modes() -> Server {
    Server::start(&[
        "--tcp-echo",
        "127.0.0.1:0",
        "--tcp-sink",
        "127.0.0.1:0",
        "--tcp-source",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--udp-echo",
        "127.0.0.1:0",
        "--id",
        "backend-1",
    ])
}

fn loadgen(scenario: &str, target: &str, extra: &[&str]) -> Value {
    let out = Command::new(BIN)
        .args([scenario, "--target", target, "--duration", "1s", "--warmup", "200ms"])
        .args(["--timeout", "1s", "--workers", "2", "--json"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{scenario} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bad JSON {stdout:?}: {e}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn assert_healthy(v: &Value) {
    assert_eq!(n(v, "errors_total"), 0, "{v}");
    assert_eq!(n(v, "attempted"), n(v, "completed") + n(v, "errors_total"), "{v}");
    assert!(n(v, "completed") > 0, "{v}");
}

fn assert_echo_bytes(v: &Value, size: u64) {
    assert_eq!(n(v, "bytes_sent"), n(v, "attempted") * size, "{v}");
    assert_eq!(n(v, "bytes_received"), n(v, "completed") * size, "{v}");
    assert_eq!(v["latency_us"]["count"].as_u64(), Some(n(v, "completed")), "{v}");
}

#[test]
fn tcp_rr_closed_loop_gets_every_request_answered() {
    let s = all_modes();
    let v = loadgen("tcp-rr", &s.addr("echo"), &["--concurrency", "16", "--size", "100"]);
    assert_healthy(&v);
    assert_echo_bytes(&v, 100);
    assert_eq!(v["mode"], "closed");
    for k in ["p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(v["latency_us"][k].is_number(), "{k} in {v}");
    }
}

#[test]
fn tcp_rr_open_loop_counts_consistently_and_writes_hgrm_and_plot() {
    let s = all_modes();
    let dir = std::env::temp_dir().join(format!("loadgen-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (hgrm, svg) = (dir.join("rr.hgrm"), dir.join("rr.svg"));
    let v = loadgen(
        "tcp-rr",
        &s.addr("echo"),
        &["-c", "8", "--rate", "2000", "--hgrm", hgrm.to_str().unwrap(), "--plot", svg.to_str().unwrap()],
    );
    assert_healthy(&v);
    assert_echo_bytes(&v, 64);
    assert_eq!(v["mode"], "open");
    // The schedule never sends more than it is told to.
    assert!(n(&v, "attempted") <= 2000 + 8, "{v}");
    let text = std::fs::read_to_string(&hgrm).unwrap();
    assert!(text.contains("Total count") && text.contains(&format!("{}]", n(&v, "completed"))));
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tcp_rr_count_stops_after_exactly_that_many_requests() {
    let s = all_modes();
    let v = loadgen("tcp-rr", &s.addr("echo"), &["-c", "4", "--count", "1000"]);
    assert_healthy(&v);
    assert_eq!(n(&v, "attempted"), 1000);
}

#[test]
fn tcp_rr_spreads_over_source_addresses() {
    let s = all_modes();
    let v = loadgen("tcp-rr", &s.addr("echo"), &["-c", "8", "--source", "127.0.0.2-127.0.0.5"]);
    assert_healthy(&v);
    assert_eq!(n(&v, "sources"), 4);
}

#[test]
fn tcp_crr_completes_short_connections() {
    let s = all_modes();
    let v = loadgen("tcp-crr", &s.addr("echo"), &["-c", "8"]);
    assert_healthy(&v);
    assert_echo_bytes(&v, 64);
}

#[test]
fn udp_rr_echoes_large_datagrams() {
    let s = all_modes();
    let v = loadgen("udp-rr", &s.addr("udp-echo"), &["-c", "4", "--size", "1200"]);
    assert_healthy(&v);
    assert_echo_bytes(&v, 1200);
}

#[test]
fn tcp_stream_moves_bytes_in_each_direction() {
    let s = all_modes();
    let send = loadgen("tcp-stream", &s.addr("sink"), &["-c", "1", "--direction", "send"]);
    assert_healthy(&send);
    assert!(n(&send, "bytes_sent") > 0 && n(&send, "bytes_received") == 0, "{send}");
    let recv = loadgen("tcp-stream", &s.addr("source"), &["-c", "1", "--direction", "recv"]);
    assert_healthy(&recv);
    assert!(n(&recv, "bytes_received") > 0 && n(&recv, "bytes_sent") == 0, "{recv}");
    let both = loadgen("tcp-stream", &s.addr("echo"), &["-c", "2", "--direction", "both"]);
    assert_healthy(&both);
    assert!(n(&both, "bytes_received") > 0 && n(&both, "bytes_sent") > 0, "{both}");
    assert!(both["gbit_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn idle_holds_every_connection_and_writes_the_ready_file() {
    let s = all_modes();
    let ready = std::env::temp_dir().join(format!("loadgen-ready-{}", std::process::id()));
    let v = loadgen("idle", &s.addr("echo"), &["-c", "500", "--ready-file", ready.to_str().unwrap()]);
    assert_healthy(&v);
    assert_eq!((n(&v, "established"), n(&v, "held"), n(&v, "completed")), (500, 500, 500));
    assert_eq!(std::fs::read_to_string(&ready).unwrap(), "established=500 attempted=500\n");
    let _ = std::fs::remove_file(&ready);
}

#[test]
fn a_closed_port_is_counted_as_refused() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let v = loadgen("tcp-crr", &format!("127.0.0.1:{port}"), &["-c", "2"]);
    assert_eq!(n(&v, "completed"), 0, "{v}");
    assert!(v["errors"]["refused"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(n(&v, "attempted"), v["errors"]["refused"].as_u64().unwrap(), "{v}");
}

#[test]
fn non_loopback_targets_are_refused_before_any_traffic() {
    let out = Command::new(BIN).args(["tcp-rr", "-t", "192.0.2.1:80", "-d", "1s"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[test]
fn http_answers_keep_alive_requests_with_the_instance_identity() {
    let s = all_modes();
    let id = s.identity("http");
    assert!(id.starts_with("backend-1 127.0.0.1:"));
    let mut c = TcpStream::connect(s.addr("http")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(text.contains(&format!("X-Backend: {id}\r\n")));
    assert!(text.ends_with(&format!("\r\n\r\n{id}\n")));
}

#[test]
fn greet_mode_names_the_instance_first_and_then_echoes() {
    let s = Server::start(&["--tcp-echo", "127.0.0.1:0", "--greet", "--id", "g7"]);
    let mut c = TcpStream::connect(s.addr("echo")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, format!("g7 {}\n", s.addr("echo")));
    c.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    r.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
}

#[test]
fn udp_echo_answers_an_empty_datagram_with_its_identity() {
    let s = all_modes();
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    u.connect(s.addr("udp-echo")).unwrap();
    u.send(&[]).unwrap();
    let mut buf = [0u8; 256];
    let k = u.recv(&mut buf).unwrap();
    assert_eq!(std::str::from_utf8(&buf[..k]).unwrap(), s.identity("udp-echo"));
}

#[test]
fn serve_exits_cleanly_on_sigterm() {
    let mut s = Server::start(&["--tcp-echo", "127.0.0.1:0"]);
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "serve did not exit within 5 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
