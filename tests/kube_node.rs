//! The real `ringport run --source kube` binary against the fake API server
//! (`fake_api`) on 127.0.0.1, as a node agent:
//! - `/livez` answers at once, `/readyz` stays 503 while the EndpointSlice
//!   list is held back, then turns 200 with the whole state published at
//!   once, and the proxy port reaches the endpoint the API named;
//! - `--master` is used instead of the in-cluster environment;
//! - the Node is watched: a zone relabel moves `PreferSameZone` traffic
//!   without a restart, and `/healthz` gives kube-proxy's JSON, 503 while
//!   the Node is being deleted or tainted `ToBeDeletedByClusterAutoscaler`;
//! - a `healthCheckNodePort` answers 200/503 as this node's endpoints come
//!   and go, and closes with its Service; a clashing one is rejected.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;
mod fake_api;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Backend, Proxy, eventually, free_port, whoami};
use fake_api::{FakeApi, kubeconfig_for, local_load_balancer, node, service, slice};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// A GET: (status, headers, body), or `None` if nothing answered.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, head.to_ascii_lowercase(), body.to_owned()))
}

fn status(addr: SocketAddr, path: &str) -> Option<u16> {
    get(addr, path).map(|(code, _, _)| code)
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// `ringport run --source kube` as node `node-1`, on loopback only.
struct Ringport {
    child: Child,
    healthz: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
    _dirs: Vec<tempfile::TempDir>,
}

impl Drop for Ringport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ringport {
    /// `api` names the API server (`--kubeconfig PATH` or `--master URL`).
    fn start(api: &[String], envs: &[(&str, String)], mut keep: Vec<tempfile::TempDir>) -> Ringport {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("ringport.log");
        let healthz = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_ringport"))
            // On the host: never touch its rules.
            .args(["run", "--redirect", "none", "--source", "kube", "--handover-socket", "none"])
            .args(api)
            .args(["--node-name", "node-1", "--workers", "1", "--no-pin", "--bind-address", "127.0.0.1"])
            .args(["--nodeport-addresses", "127.0.0.0/8"])
            .args(["--healthz-bind-address", &healthz.to_string()])
            .args(["--metrics-bind-address", &metrics.to_string()])
            .env("RUST_LOG", "info")
            .env_remove("KUBECONFIG")
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        keep.push(dir);
        Ringport { child, healthz, metrics, log, _dirs: keep }
    }

    fn with_kubeconfig(api: &FakeApi) -> Ringport {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = api.kubeconfig(dir.path());
        Ringport::start(&["--kubeconfig".into(), kubeconfig.display().to_string()], &[], vec![dir])
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&self) {
        eventually(WAIT, "/readyz turns 200", || status(self.metrics, "/readyz") == Some(200));
    }

    fn snapshot(&self) -> Value {
        let (code, _, body) = get(self.metrics, "/debug/snapshot").unwrap();
        assert_eq!(code, 200);
        json_of(&body)
    }

    fn proxy_port(&self) -> SocketAddr {
        let snapshot = self.snapshot();
        let port =
            snapshot["service_ports"][0]["proxy_port"].as_u64().unwrap_or_else(|| panic!("{snapshot:#}"));
        SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()))
    }
}

fn web(backend_port: u16) -> Value {
    service(
        "web",
        json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": backend_port, "protocol": "TCP"}]}),
    )
}

#[test]
fn ready_only_after_both_lists_then_proxies_to_the_listed_endpoint() {
    let backend = Backend::greeter();
    let api = FakeApi::start_with_slices_held(vec![
        web(backend.addr.port()),
        slice("web-1", "web", backend.addr.port(), &[("127.0.0.1", "node-1", "zone-a")]),
        node("node-1", "zone-a", json!({}), json!({})),
    ]);
    let ringport = Ringport::with_kubeconfig(&api);

    eventually(WAIT, "/livez answers", || status(ringport.healthz, "/livez") == Some(200));
    let listed = || api.requests().iter().any(|r| r.starts_with("/apis/discovery.k8s.io/v1/endpointslices?"));
    eventually(WAIT, "the EndpointSlice list is requested", listed);
    // Services are listed; slices are held back: not ready, nothing served.
    assert_eq!(status(ringport.metrics, "/readyz"), Some(503), "{}", ringport.logs());

    api.release_slices();
    ringport.wait_ready();
    // The whole state is swapped in once: one publish from the API (the
    // first update goes at once, so the Node's zone, read apart, may follow
    // it as a publish of its own).
    assert_eq!(whoami(ringport.proxy_port()), backend.addr.to_string());
    eventually(WAIT, "the Node's zone is read", || ringport.logs().contains("zone-a"));
    let logs = ringport.logs();
    let from_api = logs.lines().filter(|l| l.contains("reloaded") && l.contains("API change")).count();
    assert_eq!(from_api, 1, "{logs}");
    let from_node = logs.lines().filter(|l| l.contains("reloaded") && l.contains("Node zone")).count();
    let snapshot = ringport.snapshot();
    assert_eq!(snapshot["generation"], 1 + from_node, "{snapshot:#}\n{logs}");
}

#[test]
fn master_is_used_instead_of_the_in_cluster_environment() {
    let backend = Backend::greeter();
    let api = FakeApi::start(vec![
        web(backend.addr.port()),
        slice("web-1", "web", backend.addr.port(), &[("127.0.0.1", "node-1", "zone-a")]),
        node("node-1", "zone-a", json!({}), json!({})),
    ]);
    // The in-cluster environment names a dead address (a closed port), as
    // the `kubernetes` Service's cluster IP is before any rule exists; no
    // kubeconfig anywhere (HOME is empty).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let home = tempfile::tempdir().unwrap();
    let envs = [
        ("KUBERNETES_SERVICE_HOST", dead.ip().to_string()),
        ("KUBERNETES_SERVICE_PORT", dead.port().to_string()),
        ("HOME", home.path().display().to_string()),
    ];
    let ringport = Ringport::start(&["--master".into(), format!("http://{}", api.addr)], &envs, vec![]);
    ringport.wait_ready();
    assert_eq!(whoami(ringport.proxy_port()), backend.addr.to_string());
    assert!(ringport.logs().contains(&format!("api=http://{}/", api.addr)), "{}", ringport.logs());

    // A --master that names the dead address instead never gets ready:
    // the flag, not the environment, chose the server above.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig_for(dir.path(), "kubeconfig", &format!("http://{}", api.addr));
    let dead_master = Ringport::start(
        &[
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--master".into(),
            format!("http://{dead}"),
        ],
        &[],
        vec![dir],
    );
    eventually(WAIT, "the dead master is tried", || dead_master.logs().contains("watch error"));
    assert_eq!(status(dead_master.metrics, "/readyz"), Some(503));
}

#[test]
fn zone_relabel_moves_prefer_same_zone_traffic_without_a_restart() {
    let a = Backend::greeter_on("127.0.0.2:0");
    let port = a.addr.port();
    let b = Backend::greeter_on(&format!("127.0.0.3:{port}"));
    let api = FakeApi::start(vec![
        service(
            "web",
            json!({"clusterIP": "10.96.0.10", "trafficDistribution": "PreferSameZone",
                   "ports": [{"port": 80, "targetPort": port, "protocol": "TCP"}]}),
        ),
        slice("web-1", "web", port, &[("127.0.0.2", "node-a", "zone-a"), ("127.0.0.3", "node-b", "zone-b")]),
        node("node-1", "zone-a", json!({}), json!({})),
    ]);
    let ringport = Ringport::with_kubeconfig(&api);
    ringport.wait_ready();
    let proxy = ringport.proxy_port();
    let all_to = |backend: &Backend| (0..6).all(|_| whoami(proxy) == backend.addr.to_string());
    eventually(WAIT, "zone-a traffic goes to the zone-a endpoint", || all_to(&a));

    api.apply(node("node-1", "zone-b", json!({}), json!({})));
    eventually(WAIT, "after the relabel, traffic goes to the zone-b endpoint", || all_to(&b));
    assert!(ringport.logs().contains("trigger=\"Node zone\""), "{}", ringport.logs());
}

#[test]
fn healthz_gives_kube_proxys_json_and_fails_on_a_deleting_or_tainted_node() {
    let api = FakeApi::start(vec![node("node-1", "zone-a", json!({}), json!({}))]);
    let ringport = Ringport::with_kubeconfig(&api);
    ringport.wait_ready();
    let healthz = || get(ringport.healthz, "/healthz").unwrap();

    let (code, head, body) = healthz();
    assert_eq!(code, 200, "{body}");
    assert!(
        head.contains("content-type: application/json") && head.contains("x-content-type-options: nosniff")
    );
    let v = json_of(&body);
    assert_eq!(v["nodeEligible"], true, "{v}");
    assert!(v["lastUpdated"].as_str().unwrap().ends_with(" +0000 UTC"), "{v}");
    assert!(v["currentTime"].as_str().unwrap().ends_with(" +0000 UTC"), "{v}");

    let taint = json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]});
    api.apply(node("node-1", "zone-a", taint, json!({})));
    eventually(WAIT, "503 while tainted", || healthz().0 == 503);
    assert_eq!(json_of(&healthz().2)["nodeEligible"], false);
    assert_eq!(status(ringport.healthz, "/livez"), Some(200), "/livez ignores the Node");

    api.apply(node("node-1", "zone-a", json!({}), json!({})));
    eventually(WAIT, "200 once the taint is gone", || healthz().0 == 200);

    let deleting = json!({"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["test/hold"]});
    api.apply(node("node-1", "zone-a", json!({}), deleting));
    eventually(WAIT, "503 while being deleted", || healthz().0 == 503);
    assert_eq!(json_of(&healthz().2)["nodeEligible"], false);
}

fn local_lb(hc: u16, node_port: u16, backend_port: u16) -> Value {
    local_load_balancer("lb", "10.96.0.30", hc, node_port, backend_port)
}

#[test]
fn health_check_node_port_answers_200_with_local_endpoints_and_503_without() {
    let backend = Backend::greeter();
    let (hc, node_port) = (free_port(), free_port());
    let port = backend.addr.port();
    let lb = local_lb(hc, node_port, port);
    let api = FakeApi::start(vec![
        lb.clone(),
        slice("lb-1", "lb", port, &[("127.0.0.1", "node-1", "zone-a")]),
        node("node-1", "zone-a", json!({}), json!({})),
    ]);
    let ringport = Ringport::with_kubeconfig(&api);
    ringport.wait_ready();
    let hc_addr = SocketAddr::from(([127, 0, 0, 1], hc));
    eventually(WAIT, "the health check answers", || get(hc_addr, "/").is_some());
    assert_eq!(ringport.snapshot()["service_ports"][0]["health_check_node_port"], hc);

    let (code, head, body) = get(hc_addr, "/").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        head.contains("content-type: application/json") && head.contains("x-content-type-options: nosniff")
    );
    assert_eq!(
        json_of(&body),
        json!({"service": {"namespace": "default", "name": "lb"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );

    // The only endpoint moves to another node: none here.
    api.apply(slice("lb-1", "lb", port, &[("127.0.0.1", "node-2", "zone-a")]));
    eventually(WAIT, "503 without a local endpoint", || status(hc_addr, "/") == Some(503));
    assert_eq!(json_of(&get(hc_addr, "/").unwrap().2)["localEndpoints"], 0);

    api.apply(slice(
        "lb-1",
        "lb",
        port,
        &[("127.0.0.1", "node-1", "zone-a"), ("127.0.0.2", "node-1", "zone-a")],
    ));
    eventually(WAIT, "200 with two local endpoints", || {
        get(hc_addr, "/healthz").is_some_and(|(c, _, b)| c == 200 && json_of(&b)["localEndpoints"] == 2)
    });

    api.delete(&lb);
    eventually(WAIT, "the port closes with its Service", || TcpStream::connect(hc_addr).is_err());
}

#[test]
fn health_check_node_port_queues_probes_beyond_its_cap_and_drops_idle_ones() {
    let backend = Backend::greeter();
    let (hc, node_port) = (free_port(), free_port());
    let port = backend.addr.port();
    let api = FakeApi::start(vec![
        local_lb(hc, node_port, port),
        slice("lb-1", "lb", port, &[("127.0.0.1", "node-1", "zone-a")]),
        node("node-1", "zone-a", json!({}), json!({})),
    ]);
    let ringport = Ringport::with_kubeconfig(&api);
    ringport.wait_ready();
    let hc_addr = SocketAddr::from(([127, 0, 0, 1], hc));
    eventually(WAIT, "the health check answers", || status(hc_addr, "/") == Some(200));

    // Twice the gate's connections, none sending a request: the first
    // hold every permit, the rest wait in the kernel's accept queue.
    let idle: Vec<TcpStream> = (0..2 * ringport::admin::accept::GATE_CONNECTIONS)
        .map(|_| TcpStream::connect(hc_addr).unwrap())
        .collect();
    // A probe behind them is never closed unanswered: it waits its turn in
    // the queue and is answered once the server cuts the idle ones.
    let mut probe = TcpStream::connect(hc_addr).unwrap();
    probe.set_read_timeout(Some(WAIT)).unwrap();
    write!(probe, "GET / HTTP/1.1\r\nhost: lb\r\n\r\n").unwrap();
    let mut answer = String::new();
    probe.read_to_string(&mut answer).expect("the probe is answered, not timed out");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    // Every idle connection was closed by the server, unanswered; a read
    // that times out means it is still open, which is a failure.
    for (i, mut s) in idle.into_iter().enumerate() {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Ok(_) => panic!("idle connection {i} got an answer"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("idle connection {i} still open after {WAIT:?}: {e}"),
        }
    }
    eventually(WAIT, "probes answered after the idle connections are dropped", || {
        status(hc_addr, "/") == Some(200)
    });
}

#[test]
fn clashing_health_check_node_port_is_rejected_and_changes_nothing() {
    let backend = Backend::greeter();
    let (hc, node_port) = (free_port(), free_port());
    let manifest = |extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: a, namespace: default}}\n\
             spec: {{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: {hc},\n\
               ports: [{{port: 80, targetPort: {port}, nodePort: {node_port}}}]}}\n---\n\
             apiVersion: v1\nkind: Endpoints\nmetadata: {{name: a, namespace: default}}\n\
             subsets: [{{addresses: [{{ip: 127.0.0.1, nodeName: node-1}}], ports: [{{port: {port}}}]}}]\n{extra}",
            port = backend.addr.port()
        )
    };
    let proxy =
        Proxy::start(&manifest(""), &["--nodeport-addresses", "127.0.0.0/8", "--node-name", "node-1"]);
    let hc_addr = SocketAddr::from(([127, 0, 0, 1], hc));
    eventually(WAIT, "a's health check answers", || status(hc_addr, "/") == Some(200));
    let generation = proxy.generation();

    // b's healthCheckNodePort is a's nodePort.
    let b = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: b, namespace: default}}\n\
         spec: {{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: {node_port},\n\
           ports: [{{port: 81, nodePort: {}}}]}}\n",
        free_port()
    );
    proxy.write_manifest(&manifest(&b));
    let expected = format!(
        "Service default/b: spec.healthCheckNodePort: nodePort {node_port}/TCP is already used by Service default/a"
    );
    eventually(WAIT, "the clash is reported", || proxy.log().contains(&expected));
    assert_eq!(proxy.generation(), generation, "a rejected update changed the served state");
    assert_eq!(status(hc_addr, "/"), Some(200), "a's health check still serves");
}

#[test]
fn health_check_node_port_taken_by_a_node_port_from_the_api_is_logged_and_the_rest_served() {
    let backend = Backend::greeter();
    let port = backend.addr.port();
    let taken = free_port();
    let api = FakeApi::start(vec![
        local_load_balancer("a-lb", "10.96.0.30", taken, free_port(), port),
        slice("a-lb-1", "a-lb", port, &[("127.0.0.1", "node-1", "zone-a")]),
        service(
            "b-np",
            json!({"type": "NodePort", "clusterIP": "10.96.0.31",
                   "ports": [{"port": 80, "targetPort": port, "nodePort": taken, "protocol": "TCP"}]}),
        ),
        slice("b-np-1", "b-np", port, &[("127.0.0.1", "node-1", "zone-a")]),
        node("node-1", "zone-a", json!({}), json!({})),
    ]);
    let ringport = Ringport::with_kubeconfig(&api);
    ringport.wait_ready();
    let logs = || ringport.logs();
    eventually(WAIT, "the clash is logged with the Service and field", || {
        logs().contains("Service default/b-np: spec.ports[0].nodePort: nodePort")
            && logs().contains("service=default/a-lb field=\"spec.healthCheckNodePort\"")
    });
    // The node port keeps serving b-np.
    assert_eq!(whoami(SocketAddr::from(([127, 0, 0, 1], taken))), backend.addr.to_string());
}
