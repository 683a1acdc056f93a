//! A fake Kubernetes API server on 127.0.0.1 for the real `ringport run
//! --source kube` binary: Services, EndpointSlices and Nodes, listed and
//! watched with real resource versions. A test changes objects while
//! ringport runs ([`FakeApi::apply`], [`FakeApi::delete`]); every watch
//! replays the events after its `resourceVersion`, as the API server does,
//! so nothing is lost between a list and its watch.
//!
//! A watch wakes as soon as an object changes (no polling interval adds to
//! a measured latency), and [`FakeApi::expire`] ends every watch and
//! answers the next ones with 410 Gone, so clients must relist.
//!
//! Plain HTTP, no authentication: what it stands in for is the API's
//! list/watch protocol, not its security.
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::{Value, json};

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";

#[derive(Default)]
struct Store {
    /// The last resource version handed out.
    rv: u64,
    /// (collection path, namespace/name) -> object.
    objects: BTreeMap<(&'static str, String), Value>,
    /// (rv, collection path, watch event).
    events: Vec<(u64, &'static str, Value)>,
}

struct Inner {
    store: Mutex<Store>,
    /// The EndpointSlice list waits for a permit ([`FakeApi::release_slices`]).
    slices_gate: tokio::sync::Semaphore,
    log: Mutex<Vec<String>>,
    /// Woken at each change.
    changed: tokio::sync::Notify,
    /// Watches from a resource version below this get 410 Gone.
    expired_below: std::sync::atomic::AtomicU64,
    /// Bumped by [`FakeApi::expire`]: watches of an older epoch end.
    epoch: std::sync::atomic::AtomicU64,
}

/// The running fake API server.
pub struct FakeApi {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

fn path_of(object: &Value) -> &'static str {
    match object["kind"].as_str() {
        Some("Service") => SERVICES,
        Some("EndpointSlice") => SLICES,
        Some("Node") => NODES,
        other => panic!("the fake API does not serve {other:?}"),
    }
}

fn key_of(object: &Value) -> String {
    let meta = &object["metadata"];
    format!("{}/{}", meta["namespace"].as_str().unwrap_or(""), meta["name"].as_str().unwrap())
}

impl FakeApi {
    /// Serve `objects` (each with its `kind`) on 127.0.0.1, on its own
    /// thread.
    pub fn start(objects: Vec<Value>) -> FakeApi {
        FakeApi::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), objects)
    }

    /// As [`FakeApi::start`], on `bind` (e.g. an address a test's network
    /// namespaces can reach).
    pub fn start_on(bind: SocketAddr, objects: Vec<Value>) -> FakeApi {
        let inner = Arc::new(Inner {
            store: Mutex::default(),
            slices_gate: tokio::sync::Semaphore::new(1),
            log: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            expired_below: std::sync::atomic::AtomicU64::new(0),
            epoch: std::sync::atomic::AtomicU64::new(0),
        });
        let api = FakeApi { addr: serve(bind, Arc::clone(&inner)), inner };
        for o in objects {
            api.apply(o);
        }
        api
    }

    /// As [`FakeApi::start`], but the EndpointSlice list is held back
    /// until [`FakeApi::release_slices`].
    pub fn start_with_slices_held(objects: Vec<Value>) -> FakeApi {
        let api = FakeApi::start(objects);
        api.inner.slices_gate.forget_permits(1);
        api
    }

    pub fn release_slices(&self) {
        self.inner.slices_gate.add_permits(1);
    }

    /// Create or replace an object (an ADDED or MODIFIED event).
    pub fn apply(&self, mut object: Value) {
        let path = path_of(&object);
        let mut store = self.inner.store.lock().unwrap();
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = if store.objects.insert((path, key_of(&object)), object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.events.push((rv, path, json!({"type": kind, "object": object})));
        drop(store);
        self.inner.changed.notify_waiters();
    }

    /// Delete an object (a DELETED event).
    pub fn delete(&self, object: &Value) {
        let path = path_of(object);
        let mut store = self.inner.store.lock().unwrap();
        let Some(mut gone) = store.objects.remove(&(path, key_of(object))) else { return };
        store.rv += 1;
        let rv = store.rv;
        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
        store.events.push((rv, path, json!({"type": "DELETED", "object": gone})));
        drop(store);
        self.inner.changed.notify_waiters();
    }

    /// Forget the event history, as an API server's watch cache does: every
    /// open watch ends, and a watch from any resource version seen so far
    /// is answered 410 Gone, so clients relist.
    pub fn expire(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let rv = self.inner.store.lock().unwrap().rv;
        self.inner.expired_below.store(rv + 1, SeqCst);
        self.inner.epoch.fetch_add(1, SeqCst);
        self.inner.changed.notify_waiters();
    }

    /// Every request seen, as `path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.inner.log.lock().unwrap().clone()
    }

    /// A kubeconfig naming this server, written in `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        kubeconfig_for(dir, "kubeconfig", &format!("http://{}", self.addr))
    }
}

/// A kubeconfig (no credentials) naming `server`.
pub fn kubeconfig_for(dir: &Path, file: &str, server: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"{server}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n"
        ),
    )
    .unwrap();
    path
}

fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn json_response(body: Body) -> Response {
    Response::builder().header("content-type", "application/json").body(body).unwrap()
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    inner.log.lock().unwrap().push(format!("{path}?{query}"));
    let Some(collection) = [SERVICES, SLICES, NODES].into_iter().find(|p| *p == path) else {
        return Response::builder().status(404).body(Body::empty()).unwrap();
    };
    // `fieldSelector=metadata.name=X`, the one field selector ringport uses.
    let only = query_value(&query, "fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name%3D"))
        .map(str::to_owned);
    let matches = move |o: &Value| only.as_deref().is_none_or(|n| o["metadata"]["name"] == n);
    if matches!(query_value(&query, "watch"), Some("true" | "1")) {
        use std::sync::atomic::Ordering::SeqCst;
        let from: u64 = query_value(&query, "resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        if from < inner.expired_below.load(SeqCst) {
            let gone = json!({"type": "ERROR", "object": {
                "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
            return json_response(Body::from(format!("{gone}\n")));
        }
        let epoch = inner.epoch.load(SeqCst);
        let events = futures::stream::unfold((inner, from), move |(inner, mut last)| {
            let matches = matches.clone();
            async move {
                loop {
                    // Armed before the store is read, so no change is missed.
                    let mut changed = Box::pin(inner.changed.notified());
                    changed.as_mut().enable();
                    if inner.epoch.load(SeqCst) != epoch {
                        drop(changed);
                        return None;
                    }
                    let next = {
                        let store = inner.store.lock().unwrap();
                        store
                            .events
                            .iter()
                            .find(|(rv, p, e)| *rv > last && *p == collection && matches(&e["object"]))
                            .map(|(rv, _, e)| (*rv, e.clone()))
                    };
                    if let Some((rv, event)) = next {
                        drop(changed);
                        last = rv;
                        let line: Result<Bytes, std::io::Error> = Ok(Bytes::from(format!("{event}\n")));
                        return Some((line, (inner, last)));
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
                }
            }
        });
        return json_response(Body::from_stream(events));
    }
    if collection == SLICES {
        let _permit = inner.slices_gate.acquire().await.unwrap();
    }
    let (rv, items) = {
        let store = inner.store.lock().unwrap();
        let items: Vec<Value> = store
            .objects
            .iter()
            .filter(|((p, _), o)| *p == collection && matches(o))
            .map(|(_, o)| o.clone())
            .collect();
        (store.rv, items)
    };
    let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv.to_string()}, "items": items});
    json_response(Body::from(list.to_string()))
}

fn serve(bind: SocketAddr, inner: Arc<Inner>) -> SocketAddr {
    let listener = std::net::TcpListener::bind(bind).unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new().fallback(handle).with_state(inner);
            axum::serve(listener, app).await.unwrap();
        });
    });
    addr
}

/// A Node named `name` in `zone`, with `spec` (e.g. taints) and extra
/// `metadata` fields (e.g. a deletionTimestamp).
pub fn node(name: &str, zone: &str, spec: Value, extra_meta: Value) -> Value {
    let mut node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "spec": spec,
    });
    for (k, v) in extra_meta.as_object().unwrap() {
        node["metadata"][k] = v.clone();
    }
    node
}

/// A Service in `default` with `spec`.
pub fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": name}, "spec": spec})
}

/// One EndpointSlice of Service `service`: one unnamed TCP port, ready
/// endpoints at `(ip, nodeName, zone)`.
pub fn slice(name: &str, service: &str, port: u16, endpoints: &[(&str, &str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node, zone)| json!({"addresses": [ip], "nodeName": node, "zone": zone}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// A LoadBalancer Service with `externalTrafficPolicy: Local`, one TCP
/// port 80 -> `target_port` on `node_port`, and its `healthCheckNodePort`.
pub fn local_load_balancer(
    name: &str,
    cluster_ip: &str,
    health_check: u16,
    node_port: u16,
    target_port: u16,
) -> Value {
    service(
        name,
        json!({"type": "LoadBalancer", "clusterIP": cluster_ip, "externalTrafficPolicy": "Local",
               "healthCheckNodePort": health_check,
               "ports": [{"port": 80, "targetPort": target_port, "nodePort": node_port, "protocol": "TCP"}]}),
    )
}
