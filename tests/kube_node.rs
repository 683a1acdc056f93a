//! The real `ringport run --source kube` binary against a fake API server on
//! 127.0.0.1: `/livez` answers at once, `/readyz` stays 503 while the
//! EndpointSlice list is held back (Services already listed), then turns
//! 200 with the whole state published at once, and a connection through
//! the proxy port reaches the endpoint the API named. The zone is read
//! from the Node before the first publish.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use common::{Backend, eventually, free_port};
use serde_json::json;

struct Api {
    backend: SocketAddr,
    /// The EndpointSlice list waits for a permit.
    gate: Arc<tokio::sync::Semaphore>,
    log: Mutex<Vec<String>>,
}

fn json_response(body: String) -> Response {
    Response::builder().header("content-type", "application/json").body(Body::from(body)).unwrap()
}

async fn api(State(api): State<Arc<Api>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    api.log.lock().unwrap().push(format!("{path}?{query}"));
    if query.contains("watch=true") {
        // Held open, no events.
        let held = futures::stream::pending::<Result<axum::body::Bytes, std::io::Error>>();
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(held))
            .unwrap();
    }
    let list = |kind: &str, items: serde_json::Value| {
        json_response(
            json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "5"}, "items": items})
                .to_string(),
        )
    };
    match path.as_str() {
        "/api/v1/services" => list(
            "ServiceList",
            json!([{
                "metadata": {"namespace": "default", "name": "web", "resourceVersion": "3"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}
            }]),
        ),
        "/apis/discovery.k8s.io/v1/endpointslices" => {
            let _permit = api.gate.acquire().await.unwrap();
            list(
                "EndpointSliceList",
                json!([{
                    "metadata": {"namespace": "default", "name": "web-1", "resourceVersion": "4",
                                 "labels": {"kubernetes.io/service-name": "web"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "", "port": api.backend.port(), "protocol": "TCP"}],
                    "endpoints": [{"addresses": [api.backend.ip().to_string()]}]
                }]),
            )
        }
        "/api/v1/nodes/node-1" => json_response(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "resourceVersion": "1",
                   "labels": {"topology.kubernetes.io/zone": "zone-a"}}})
            .to_string(),
        ),
        _ => Response::builder().status(404).body(Body::empty()).unwrap(),
    }
}

/// Serves the fake API on its own thread; returns its address.
fn start_api(api: Arc<Api>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new().fallback(self::api).with_state(api);
            axum::serve(listener, app).await.unwrap();
        });
    });
    addr
}

fn get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ready_only_after_both_lists_then_proxies_to_the_listed_endpoint() {
    let backend = Backend::greeter();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let api = Arc::new(Api { backend: backend.addr, gate: Arc::clone(&gate), log: Mutex::default() });
    let server = start_api(Arc::clone(&api));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{server}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("ringport.log");
    let healthz = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = Command::new(env!("CARGO_BIN_EXE_ringport"))
        // On the host: never touch its rules.
        .args(["run", "--redirect", "none", "--source", "kube", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--node-name", "node-1", "--workers", "1", "--no-pin", "--bind-address", "127.0.0.1"])
        .args(["--nodeport-addresses", "127.0.0.0/8"])
        .args([
            "--healthz-bind-address",
            &healthz.to_string(),
            "--metrics-bind-address",
            &metrics.to_string(),
        ])
        .env("RUST_LOG", "info")
        .env_remove("KUBECONFIG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _child = Killed(child);
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    eventually(Duration::from_secs(20), "/livez answers", || get(healthz, "/livez") == Some(200));
    let listed =
        || api.log.lock().unwrap().iter().any(|r| r.starts_with("/apis/discovery.k8s.io/v1/endpointslices?"));
    eventually(Duration::from_secs(20), "the EndpointSlice list is requested", listed);
    // Services are listed; slices are held back: not ready, nothing served.
    assert_eq!(get(metrics, "/readyz"), Some(503), "{}", logs());

    gate.add_permits(1);
    eventually(Duration::from_secs(20), "/readyz turns 200", || get(metrics, "/readyz") == Some(200));
    let snapshot = {
        let mut s = TcpStream::connect(metrics).unwrap();
        write!(s, "GET /debug/snapshot HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1.to_owned();
        serde_json::from_str::<serde_json::Value>(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    assert_eq!(snapshot["generation"], 1, "the whole state is swapped in once: {snapshot:#}");
    let port = snapshot["service_ports"][0]["proxy_port"].as_u64().unwrap_or_else(|| panic!("{snapshot:#}"));

    let c = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()))).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = String::new();
    BufReader::new(c).read_line(&mut greeting).unwrap();
    assert_eq!(greeting.trim(), backend.addr.to_string());
    assert!(logs().contains("zone-a"), "the Node's zone was not read:\n{}", logs());
}
