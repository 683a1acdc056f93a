//! A fake Kubernetes API server for the namespace labs: Services,
//! EndpointSlices and Nodes held in memory, listed and *watched* as the
//! real API does (a change is sent to every open watch as ADDED, MODIFIED
//! and DELETED events), so a test can change endpoints under a running
//! `ringport --source kube`. It serves plain HTTP from a thread that
//! enters one of the lab's network namespaces, so it is reachable only
//! there (and from what that namespace routes to).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::{Value, json};

/// The objects served, keyed by `(kind, namespace/name)`.
type Objects = BTreeMap<(&'static str, String), Value>;

/// What the server holds; shared with its thread.
struct Shared {
    objects: Mutex<(u64, Objects)>,
    changed: tokio::sync::watch::Sender<u64>,
}

/// A running fake API server.
pub struct FakeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

const SERVICE: &str = "Service";
const SLICE: &str = "EndpointSlice";
const NODE: &str = "Node";

impl FakeApi {
    /// Serve on `addr` inside the network namespace `ns` (its full name).
    pub fn start(ns: &str, addr: SocketAddr) -> FakeApi {
        let (changed, _) = tokio::sync::watch::channel(1);
        let shared = Arc::new(Shared { objects: Mutex::new((1, Objects::new())), changed });
        let theirs = Arc::clone(&shared);
        let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: setns on a valid, open namespace fd; it moves only this
            // thread (never the test's other threads) into the lab namespace.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&netns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.expect("bind the fake API");
                tx.send(()).expect("started");
                let app = axum::Router::new().fallback(serve).with_state(theirs);
                let _ = axum::serve(listener, app).await;
            });
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the fake API did not start");
        FakeApi { addr, shared }
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n",
            self.addr
        )
    }

    /// Add or replace objects (`kind` and `metadata` are read from each).
    pub fn apply(&self, objects: impl IntoIterator<Item = Value>) {
        let mut guard = self.shared.objects.lock().expect("lock");
        guard.0 += 1;
        let version = guard.0;
        for mut object in objects {
            let kind = match object["kind"].as_str() {
                Some("Service") => SERVICE,
                Some("EndpointSlice") => SLICE,
                Some("Node") => NODE,
                other => panic!("the fake API does not serve {other:?}"),
            };
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            guard.1.insert((kind, key(&object)), object);
        }
        drop(guard);
        self.shared.changed.send_replace(version);
    }
}

fn key(object: &Value) -> String {
    let meta = &object["metadata"];
    format!("{}/{}", meta["namespace"].as_str().unwrap_or(""), meta["name"].as_str().unwrap_or(""))
}

fn json_response(status: u16, body: String) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap_or_default()
}

async fn serve(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let watch = req.uri().query().unwrap_or("").contains("watch=true");
    let (kind, list_kind, api_version) = match path.as_str() {
        "/api/v1/services" => (SERVICE, "ServiceList", "v1"),
        "/apis/discovery.k8s.io/v1/endpointslices" => (SLICE, "EndpointSliceList", "discovery.k8s.io/v1"),
        p if p.starts_with("/api/v1/nodes/") => {
            let name = p.trim_start_matches("/api/v1/nodes/");
            let guard = shared.objects.lock().expect("lock");
            return match guard.1.get(&(NODE, format!("/{name}"))) {
                Some(node) => json_response(200, node.to_string()),
                None => json_response(404, json!({"kind": "Status", "code": 404}).to_string()),
            };
        }
        _ => return json_response(404, json!({"kind": "Status", "code": 404}).to_string()),
    };
    if watch {
        return watch_response(shared, kind);
    }
    let guard = shared.objects.lock().expect("lock");
    let items: Vec<&Value> = guard.1.iter().filter(|((k, _), _)| *k == kind).map(|(_, v)| v).collect();
    let list = json!({"apiVersion": api_version, "kind": list_kind,
                      "metadata": {"resourceVersion": guard.0.to_string()}, "items": items});
    json_response(200, list.to_string())
}

/// A watch: from its start, every change to objects of `kind` as events,
/// one JSON object per line, held open until the client goes.
fn watch_response(shared: Arc<Shared>, kind: &'static str) -> Response {
    let mut changed = shared.changed.subscribe();
    let of_kind = move |objects: &Objects| -> BTreeMap<String, Value> {
        objects.iter().filter(|((k, _), _)| *k == kind).map(|((_, n), v)| (n.clone(), v.clone())).collect()
    };
    let mut seen = of_kind(&shared.objects.lock().expect("lock").1);
    let stream = async_stream(move |tx: tokio::sync::mpsc::Sender<String>| async move {
        while changed.changed().await.is_ok() {
            let now = of_kind(&shared.objects.lock().expect("lock").1);
            let mut lines = String::new();
            for (name, object) in &now {
                match seen.get(name) {
                    Some(old) if old == object => {}
                    Some(_) => lines += &format!("{}\n", json!({"type": "MODIFIED", "object": object})),
                    None => lines += &format!("{}\n", json!({"type": "ADDED", "object": object})),
                }
            }
            for (name, object) in &seen {
                if !now.contains_key(name) {
                    lines += &format!("{}\n", json!({"type": "DELETED", "object": object}));
                }
            }
            seen = now;
            if !lines.is_empty() && tx.send(lines).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

/// A body stream fed by a task through a channel.
fn async_stream<F, Fut>(
    producer: F,
) -> impl futures::Stream<Item = Result<axum::body::Bytes, std::io::Error>> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<String>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(producer(tx));
    futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        Some((Ok(axum::body::Bytes::from(line)), rx))
    })
}

/// A Service object. `extra` is merged into `spec`.
pub fn service(name: &str, cluster_ip: &str, ports: Value, extra: Value) -> Value {
    let mut spec = json!({"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            if k != "status" {
                spec.insert(k.clone(), v.clone());
            }
        }
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"namespace": "default", "name": name},
           "spec": spec, "status": extra.get("status").cloned().unwrap_or(json!({}))})
}

/// An EndpointSlice for Service `service`: `(ip, node)` endpoints, all
/// ready, on one unnamed port.
pub fn slice(service: &str, protocol: &str, port: u16, endpoints: &[(&str, &str)]) -> Value {
    named_slice(service, &format!("{service}-1"), ("", protocol, port), endpoints)
}

/// An EndpointSlice `name` for Service `service`, on one `(port name,
/// protocol, port)`.
pub fn named_slice(service: &str, name: &str, port: (&str, &str, u16), endpoints: &[(&str, &str)]) -> Value {
    let (port_name, protocol, port) = port;
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"namespace": "default", "name": name,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4",
           "ports": [{"name": port_name, "port": port, "protocol": protocol}],
           "endpoints": endpoints})
}

/// A Node object.
pub fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}}})
}
