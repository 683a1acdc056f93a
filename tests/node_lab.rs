//! A two-node cluster in network namespaces, each node running the real
//! `ringport run --source kube` against a fake API server, with real pods
//! (namespaces running real servers), real rules and real clients.
//!
//! ```text
//!             wire (a bridge: the nodes' L2 network, 10.100.0.0/24)
//!   ┌──────────────┬───────────────┬──────────────┬──────────────┐
//!  node a .1      node b .2        out .9          out2 .10
//!  Calico-style:  bridge CNI:      outside client  outside client
//!  pa1 10.220.0.5/32 behind an     + the fake API  outside the LB
//!  address-less veth (proxy_arp,   (tests/fake_api source ranges
//!                                  on :6443)
//!  default via 169.254.1.1)
//!                 pb1 10.221.0.5/24 on cni0 (10.221.0.1)
//! ```
//!
//! Needs root and `ip`, `nft`, `iptables`, `curl`, `python3`, `dnsmasq`,
//! `dig`, `conntrack` (scripts/test.sh installs them); without them every
//! test here fails saying so.

mod fake_api;
mod netns;

use std::collections::BTreeSet;
use std::time::Duration;

use fake_api::FakeApi;
use netns::Lab;
use serde_json::{Value, json};

const TOOLS: [&str; 9] =
    ["ip", "nft", "iptables", "curl", "python3", "dnsmasq", "dig", "conntrack", "sysctl"];
const API: &str = "10.100.0.9:6443";
const NODE_A: &str = "10.100.0.1";
const NODE_B: &str = "10.100.0.2";
const PA1: &str = "10.220.0.5";
const PB1: &str = "10.221.0.5";
/// `web`: ClusterIP + NodePort, externalTrafficPolicy Cluster.
const WEB: &str = "10.96.0.10";
/// `lb-local`: LoadBalancer with externalTrafficPolicy Local and
/// loadBalancerSourceRanges [out's address].
const LB_LOCAL_CLUSTER: &str = "10.96.0.11";
const LB_IP: &str = "10.98.0.11";
const DNS: &str = "10.96.0.53";
const ECHO: &str = "10.96.0.54";
const NO_ENDPOINTS_UDP: &str = "10.96.0.55";
/// `hc`'s healthCheckNodePort (`externalTrafficPolicy: Local`, one
/// endpoint, on node a).
const HC_PORT: u16 = 30300;

/// Answers a UDP datagram with the name given as its argument.
const UDP_ECHO: &str = "import socket, sys\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
s.bind((sys.argv[1], 7007))\n\
while True:\n    d, a = s.recvfrom(2048)\n    s.sendto(sys.argv[2].encode(), a)\n";

/// One datagram from a fixed source port on a connected socket; prints the
/// answer, `refused` (ICMP port unreachable), `rejected` (EPERM: a local
/// sender's packet rejected in the output hook) or `timeout` (1 s).
const UDP_ASK: &str = "import socket, sys\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
s.bind(('0.0.0.0', int(sys.argv[3])))\n\
s.connect((sys.argv[1], int(sys.argv[2])))\n\
s.settimeout(1)\n\
try:\n    s.send(b'ping')\n    print(s.recv(2048).decode())\n\
except ConnectionRefusedError: print('refused')\n\
except PermissionError: print('rejected')\n\
except socket.timeout: print('timeout')\n";

/// A TCP connect alone (no data asked for): prints `connected`, `refused`
/// or `timeout` (2 s).
const TCP_CONNECT: &str = "import socket, sys\n\
s = socket.socket()\n\
s.settimeout(2)\n\
try:\n    s.connect((sys.argv[1], int(sys.argv[2])))\n    print('connected')\n\
except ConnectionRefusedError: print('refused')\n\
except socket.timeout: print('timeout')\n";

fn objects(echo_on: &str) -> Vec<Value> {
    let echo_ep = if echo_on == "pa1" { (PA1, "node-a") } else { (PB1, "node-b") };
    vec![
        fake_api::node("node-a", "zone-a", json!({}), json!({})),
        fake_api::node("node-b", "zone-a", json!({}), json!({})),
        service("web", WEB, json!({"type": "NodePort"}), &[("", "TCP", 80, 8080, Some(30080))]),
        slice("web", "", ("", "TCP", 8080), &[(PA1, "node-a"), (PB1, "node-b")]),
        lb_local(json!(["10.100.0.9/32"])),
        slice("lb-local", "-1", ("http", "TCP", 8080), &[(PA1, "node-a"), (PB1, "node-b")]),
        slice("lb-local", "-2", ("echo", "UDP", 7007), &[(PA1, "node-a"), (PB1, "node-b")]),
        fake_api::local_load_balancer("hc", "10.96.0.12", HC_PORT, 30083, 8080),
        fake_api::slice("hc-1", "hc", 8080, &[(PA1, "node-a", "zone-a")]),
        service("dns", DNS, json!({}), &[("", "UDP", 53, 5353, None)]),
        slice("dns", "", ("", "UDP", 5353), &[(PB1, "node-b")]),
        service("echo", ECHO, json!({}), &[("", "UDP", 7, 7007, None)]),
        slice("echo", "", ("", "UDP", 7007), &[echo_ep]),
        service("silent", NO_ENDPOINTS_UDP, json!({}), &[("", "UDP", 53, 53, None)]),
    ]
}

/// A Service with `spec` plus its cluster IP and `(name, protocol, port,
/// targetPort, nodePort)` ports; a `status` key in `spec` becomes its status.
fn service(
    name: &str,
    cluster_ip: &str,
    spec: Value,
    ports: &[(&str, &str, u16, u16, Option<u16>)],
) -> Value {
    let mut spec = spec;
    let status = spec.as_object_mut().and_then(|s| s.remove("status"));
    spec["clusterIP"] = json!(cluster_ip);
    spec["ports"] = ports
        .iter()
        .map(|(name, protocol, port, target, node_port)| {
            let mut p = json!({"name": name, "protocol": protocol, "port": port, "targetPort": target});
            if let Some(n) = node_port {
                p["nodePort"] = json!(n);
            }
            p
        })
        .collect();
    let mut object = fake_api::service(name, spec);
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

/// EndpointSlice `<service><suffix>` on one `(port name, protocol, port)`,
/// ready endpoints at `(ip, nodeName)`.
fn slice(service: &str, suffix: &str, port: (&str, &str, u16), endpoints: &[(&str, &str)]) -> Value {
    let (port_name, protocol, port) = port;
    let endpoints: Vec<Value> =
        endpoints.iter().map(|(ip, node)| json!({"addresses": [ip], "nodeName": node})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"namespace": "default", "name": format!("{service}{suffix}"),
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4",
           "ports": [{"name": port_name, "port": port, "protocol": protocol}],
           "endpoints": endpoints})
}

/// `lb-local`: TCP 80 (with a NodePort) and UDP 7 on a LoadBalancer IP and
/// on an externalIP that is node a's own address (served by a listener
/// there, not by a rule), `externalTrafficPolicy: Local`, source ranges
/// `ranges` (which apply to the LB IP only, as in kube-proxy).
fn lb_local(ranges: Value) -> Value {
    service(
        "lb-local",
        LB_LOCAL_CLUSTER,
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
               "loadBalancerSourceRanges": ranges, "externalIPs": [NODE_A],
               "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}}),
        &[("http", "TCP", 80, 8080, Some(30081)), ("echo", "UDP", 7, 7007, Some(30082))],
    )
}

struct Cluster {
    lab: Lab,
    api: FakeApi,
    backend: &'static str,
    /// The lab child index of ringport on node a and node b.
    ringport: [usize; 2],
    restarts: usize,
}

impl Cluster {
    fn start(backend: &'static str) -> Cluster {
        netns::require_privileges_and_tools(&TOOLS);
        let mut lab = Lab::new();
        wire(&mut lab);
        calico_pod(&mut lab, "a", "pa1", PA1);
        bridge_pod(&mut lab, "b", "pb1", PB1);
        for (pod, ip) in [("pa1", PA1), ("pb1", PB1)] {
            serve_pod(&mut lab, pod, ip);
        }
        let bind = API.parse().expect("address");
        let api = netns::in_namespace(&lab.ns("out"), move || FakeApi::start_on(bind, objects("pb1")));
        api.kubeconfig(lab.scratch.path());
        let mut cluster = Cluster { lab, api, backend, ringport: [0, 0], restarts: 0 };
        cluster.ringport = [cluster.spawn_ringport("a"), cluster.spawn_ringport("b")];
        for node in ["a", "b"] {
            cluster.wait_ready(node);
        }
        cluster
    }

    fn spawn_ringport(&mut self, node: &str) -> usize {
        self.restarts += 1;
        let log = self.log_path(node);
        let kubeconfig = self.lab.scratch.path().join("kubeconfig");
        let args = [
            env!("CARGO_BIN_EXE_ringport"),
            "run",
            "--source",
            "kube",
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8 path"),
            "--node-name",
            if node == "a" { "node-a" } else { "node-b" },
            "--redirect",
            self.backend,
            "--workers",
            "2",
            "--no-pin",
            "--drain-timeout",
            "1s",
            "--healthz-bind-address",
            "0.0.0.0:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            // A restart here is a crash and a fresh start (read-back), not a
            // handover; and no socket file is left in the host's /run.
            "--handover-socket",
            "none",
        ];
        // Each run logs to a file of its own, so a restart keeps the first log.
        let _ = std::fs::rename(&log, log.with_extension(format!("log.{}", self.restarts)));
        self.lab.spawn(node, &args, &log)
    }

    fn log_path(&self, node: &str) -> std::path::PathBuf {
        self.lab.scratch.path().join(format!("ringport-{node}.log"))
    }

    fn logs(&self) -> String {
        ["a", "b"]
            .iter()
            .map(|n| {
                format!(
                    "--- ringport on {n}:\n{}",
                    std::fs::read_to_string(self.log_path(n)).unwrap_or_default()
                )
            })
            .collect()
    }

    fn wait_ready(&self, node: &str) {
        self.lab.eventually(Duration::from_secs(30), &format!("ringport on {node} ready"), || {
            self.lab.curl(node, "http://127.0.0.1:10249/readyz").1 == "ok"
        });
    }

    /// Which pods answer `n` requests to `url` from `role`.
    fn answers(&self, role: &str, url: &str, n: usize) -> BTreeSet<String> {
        (0..n)
            .map(|_| {
                let (code, body, err) = self.lab.curl_err(role, url);
                assert_eq!(code, 0, "curl {url} from {role}: exit {code}: {err}\n{}", self.logs());
                body
            })
            .collect()
    }

    /// `role` asks a UDP `ip:port` from source port `sport`.
    fn udp_ask(&self, role: &str, ip: &str, port: u16, sport: u16) -> String {
        self.lab
            .ok(role, &["python3", "-c", UDP_ASK, ip, &port.to_string(), &sport.to_string()])
            .trim()
            .to_string()
    }

    /// How a TCP connect from `role` to `ip:port` ends.
    fn connect(&self, role: &str, ip: &str, port: u16) -> String {
        self.lab.ok(role, &["python3", "-c", TCP_CONNECT, ip, &port.to_string()]).trim().to_string()
    }

    /// The proxy port of service `name` on `node`, from /debug/snapshot.
    fn proxy_port(&self, node: &str, name: &str) -> u16 {
        let text =
            self.lab.ok(node, &["curl", "-sS", "--noproxy", "*", "http://127.0.0.1:10249/debug/snapshot"]);
        let snapshot: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let ports = snapshot["service_ports"].as_array().cloned().unwrap_or_default();
        let port = ports.iter().find(|p| p["name"].as_str() == Some(&format!("default/{name}")));
        let proxy = port.and_then(|p| p["proxy_port"].as_u64()).unwrap_or_else(|| panic!("{snapshot:#}"));
        u16::try_from(proxy).expect("a port")
    }

    fn restart(&mut self, node: &str) {
        let i = usize::from(node == "b");
        self.lab.stop(self.ringport[i]);
        self.ringport[i] = self.spawn_ringport(node);
        self.wait_ready(node);
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The nodes' network: a bridge in `wire`, the nodes and two outside
/// hosts on it. Nodes forward, route each other's pod ranges, and send the
/// rest (cluster IPs included) to a default gateway, as real nodes do.
fn wire(lab: &mut Lab) {
    let wire = lab.add_ns("wire");
    netns::ip(&["-n", &wire, "link", "add", "br0", "type", "bridge"]);
    netns::ip(&["-n", &wire, "link", "set", "br0", "up"]);
    for (role, addr) in [("a", NODE_A), ("b", NODE_B), ("out", "10.100.0.9"), ("out2", "10.100.0.10")] {
        let ns = lab.add_ns(role);
        let port = format!("u-{role}");
        netns::ip(&[
            "link", "add", &port, "netns", &wire, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        netns::ip(&["-n", &wire, "link", "set", &port, "master", "br0", "up"]);
        netns::ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        netns::ip(&["-n", &ns, "link", "set", "eth0", "up"]);
    }
    for (node, other_pods, other) in [("a", "10.221.0.0/24", NODE_B), ("b", "10.220.0.0/24", NODE_A)] {
        lab.ok(node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        netns::ip(&["-n", &lab.ns(node), "route", "add", other_pods, "via", other]);
        netns::ip(&["-n", &lab.ns(node), "route", "add", "default", "via", "10.100.0.9"]);
    }
    // The load balancer (here: a route) sends the LB IP to node a. The
    // proxy address is routed to node a too, to show nobody else reaches it.
    for out in ["out", "out2"] {
        netns::ip(&["-n", &lab.ns(out), "route", "add", LB_IP, "via", NODE_A]);
        netns::ip(&["-n", &lab.ns(out), "route", "add", "169.254.99.1", "via", NODE_A]);
    }
}

/// A Calico/Cilium-style pod: a /32 behind a host-side veth with no
/// address, `default via 169.254.1.1`, answered by proxy ARP.
fn calico_pod(lab: &mut Lab, node: &str, pod: &str, ip: &str) {
    let (node_ns, pod_ns) = (lab.ns(node), lab.add_ns(pod));
    let host_side = format!("cali{pod}");
    netns::ip(&[
        "link", "add", &host_side, "netns", &node_ns, "type", "veth", "peer", "name", "eth0", "netns",
        &pod_ns,
    ]);
    netns::ip(&["-n", &node_ns, "link", "set", &host_side, "up"]);
    lab.ok(node, &["sysctl", "-qw", &format!("net.ipv4.conf.{host_side}.proxy_arp=1")]);
    netns::ip(&["-n", &node_ns, "route", "add", &format!("{ip}/32"), "dev", &host_side]);
    netns::ip(&["-n", &pod_ns, "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    netns::ip(&["-n", &pod_ns, "link", "set", "eth0", "up"]);
    netns::ip(&["-n", &pod_ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
    netns::ip(&["-n", &pod_ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
}

/// A flannel/kindnet-style pod: on the node's `cni0` bridge, whose address
/// is the pod's gateway.
fn bridge_pod(lab: &mut Lab, node: &str, pod: &str, ip: &str) {
    let (node_ns, pod_ns) = (lab.ns(node), lab.add_ns(pod));
    netns::ip(&["-n", &node_ns, "link", "add", "cni0", "type", "bridge"]);
    netns::ip(&["-n", &node_ns, "addr", "add", "10.221.0.1/24", "dev", "cni0"]);
    netns::ip(&["-n", &node_ns, "link", "set", "cni0", "up"]);
    let host_side = format!("veth{pod}");
    netns::ip(&[
        "link", "add", &host_side, "netns", &node_ns, "type", "veth", "peer", "name", "eth0", "netns",
        &pod_ns,
    ]);
    netns::ip(&["-n", &node_ns, "link", "set", &host_side, "master", "cni0", "up"]);
    netns::ip(&["-n", &pod_ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    netns::ip(&["-n", &pod_ns, "link", "set", "eth0", "up"]);
    netns::ip(&["-n", &pod_ns, "route", "add", "default", "via", "10.221.0.1"]);
}

/// In each pod: an HTTP server naming the pod on 8080, a UDP echo naming it
/// on 7007; pb1 also runs dnsmasq on 5353.
fn serve_pod(lab: &mut Lab, pod: &str, ip: &str) {
    let root = lab.scratch.path().join(pod);
    std::fs::create_dir_all(&root).expect("pod dir");
    std::fs::write(root.join("whoami"), pod).expect("pod file");
    let root = root.to_string_lossy().into_owned();
    let log = lab.scratch.path().join(format!("{pod}-http.log"));
    lab.spawn(pod, &["python3", "-m", "http.server", "--bind", ip, "8080", "--directory", &root], &log);
    let log = lab.scratch.path().join(format!("{pod}-echo.log"));
    lab.spawn(pod, &["python3", "-c", UDP_ECHO, ip, pod], &log);
    if pod == "pb1" {
        let hosts = lab.scratch.path().join("hosts");
        std::fs::write(&hosts, "10.1.2.3 web.ringport.test\n").expect("hosts file");
        let log = lab.scratch.path().join("dnsmasq.log");
        let args = [
            "dnsmasq".to_string(),
            "--no-daemon".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={ip}"),
            "--port=5353".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            format!("--addn-hosts={}", hosts.display()),
            "--pid-file=".into(),
            "--user=root".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn(pod, &args, &log);
    }
    let url = format!("http://{ip}:8080/whoami");
    lab.eventually(Duration::from_secs(20), &format!("{pod} serving"), || lab.curl(pod, &url).1 == pod);
}

/// Pods on both nodes (address-less veth and bridge), and both nodes
/// themselves, reach a ClusterIP with a local and a remote endpoint.
fn pods_and_hosts_reach_cluster_ips(c: &Cluster) {
    let url = format!("http://{WEB}/whoami");
    for role in ["pa1", "pb1", "a", "b"] {
        assert_eq!(c.answers(role, &url, 8), set(&["pa1", "pb1"]), "{role} -> {WEB}");
    }
}

/// NodePorts answer from outside; proxy ports do not, on the node's
/// address (nothing listens there) nor on the proxy address routed to the
/// node (the input guard drops it).
fn outside_reaches_node_ports_and_not_proxy_ports(c: &Cluster) {
    for node in [NODE_A, NODE_B] {
        let url = format!("http://{node}:30080/whoami");
        assert_eq!(c.answers("out", &url, 8), set(&["pa1", "pb1"]), "{url}");
    }
    let proxy = c.proxy_port("a", "web");
    assert_eq!(c.connect("out", NODE_A, proxy), "refused", "the node's address:proxy port");
    assert_eq!(c.connect("out", "169.254.99.1", proxy), "timeout", "the proxy address routed to the node");
    assert_eq!(c.connect("a", "169.254.99.1", proxy), "connected", "the node itself may connect");
    assert_eq!(
        c.answers("pa1", &format!("http://{WEB}/whoami"), 1).len(),
        1,
        "the guard spares DNATed traffic"
    );
}

/// `externalTrafficPolicy: Local` on every external path: the redirected
/// LB IP (routed to node a) and the NodePort of each node reach only that
/// node's pod; `loadBalancerSourceRanges` let `out` in and drop `out2`.
fn external_traffic_keeps_its_scope(c: &Cluster) {
    assert_eq!(c.answers("out", &format!("http://{LB_IP}/whoami"), 6), set(&["pa1"]));
    assert_eq!(c.answers("out", &format!("http://{NODE_A}:30081/whoami"), 6), set(&["pa1"]));
    assert_eq!(c.answers("out", &format!("http://{NODE_B}:30081/whoami"), 6), set(&["pb1"]));
    // A local externalIP: node a listens on it itself.
    assert_eq!(c.answers("out2", &format!("http://{NODE_A}/whoami"), 6), set(&["pa1"]));
    assert_eq!(c.udp_ask("out2", NODE_A, 7, 0), "pa1");
    assert_eq!(c.connect("out2", LB_IP, 80), "timeout", "a source outside the ranges is dropped");
    assert_eq!(c.connect("out", LB_IP, 80), "connected");
    // UDP on the same LB IP: the same scope, the same ranges.
    assert_eq!(c.udp_ask("out", LB_IP, 7, 0), "pa1");
    assert_eq!(c.udp_ask("out2", LB_IP, 7, 0), "timeout", "a UDP source outside the ranges is dropped");
    // Ranges that do not parse: the error names the Service and the field,
    // and the last good version keeps serving (and guarding).
    c.api.apply(lb_local(json!(["10.100.0.9/33"])));
    c.lab.eventually(Duration::from_secs(10), "the bad ranges are reported", || {
        c.logs().contains("spec.loadBalancerSourceRanges[0]")
    });
    let logs = c.logs();
    let line = logs.lines().find(|l| l.contains("spec.loadBalancerSourceRanges[0]")).unwrap_or_default();
    assert!(line.contains("default/lb-local"), "the error names the Service: {line}");
    assert_eq!(c.connect("out", LB_IP, 80), "connected");
    assert_eq!(c.connect("out2", LB_IP, 80), "timeout", "the last good ranges still guard");
    // lb-local's endpoints only on node a, and the load balancer sends the
    // LB IP to node b: endpoints exist, none local there. kube-proxy drops
    // such traffic (it rejects only when there are no endpoints at all),
    // TCP and UDP alike: a timeout, not a refusal.
    let only_a = |suffix, port| slice("lb-local", suffix, port, &[(PA1, "node-a")]);
    c.api.apply(only_a("-1", ("http", "TCP", 8080)));
    c.api.apply(only_a("-2", ("echo", "UDP", 7007)));
    netns::ip(&["-n", &c.lab.ns("out"), "route", "replace", LB_IP, "via", NODE_B]);
    c.lab.eventually(Duration::from_secs(15), "node b drops TCP to the LB IP", || {
        c.connect("out", LB_IP, 80) == "timeout"
    });
    let udp = c.udp_ask("out", LB_IP, 7, 0);
    netns::ip(&["-n", &c.lab.ns("out"), "route", "replace", LB_IP, "via", NODE_A]);
    assert_eq!(udp, "timeout", "UDP to a node without local endpoints is dropped, not refused");
    c.api.apply(slice("lb-local", "-1", ("http", "TCP", 8080), &[(PA1, "node-a"), (PB1, "node-b")]));
    c.api.apply(slice("lb-local", "-2", ("echo", "UDP", 7007), &[(PA1, "node-a"), (PB1, "node-b")]));
    c.lab.eventually(Duration::from_secs(15), "node b serves lb-local again", || {
        c.connect("out", NODE_B, 30081) == "connected"
    });
    assert_eq!(c.answers("out", &format!("http://{NODE_B}:30081/whoami"), 2), set(&["pb1"]));
    // Cluster-internal traffic to the same Service keeps its own scope.
    let cluster = format!("http://{LB_LOCAL_CLUSTER}/whoami");
    assert_eq!(c.answers("pa1", &cluster, 8), set(&["pa1", "pb1"]));
    // healthCheckNodePort of `hc` (its one endpoint is on node a), asked
    // from outside as a cloud load balancer does: 200 on a, 503 on b.
    for (node, code, local) in [(NODE_A, "200", 1), (NODE_B, "503", 0)] {
        let url = format!("http://{node}:{HC_PORT}/healthz");
        let out = c
            .lab
            .ok("out", &["curl", "-sS", "--noproxy", "*", "--max-time", "5", "-w", "\n%{http_code}", &url]);
        let (body, status) = out.trim().rsplit_once('\n').unwrap_or_default();
        assert_eq!(status, code, "{url}: {out}");
        let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(body["localEndpoints"], local, "{url}: {body}");
        assert_eq!(body["service"], json!({"namespace": "default", "name": "hc"}), "{url}: {body}");
    }
}

/// DNS over UDP from an address-less-veth pod to a ClusterIP whose endpoint
/// is on the other node; a UDP ClusterIP with no endpoints answers ICMP
/// port unreachable at once.
fn udp_like_kube_proxy(c: &Cluster) {
    c.lab.eventually(Duration::from_secs(10), "DNS through the ClusterIP from pa1", || {
        let out = c
            .lab
            .exec("pa1", &["dig", "+short", "+tries=2", "+time=1", &format!("@{DNS}"), "web.ringport.test"]);
        String::from_utf8_lossy(&out.stdout).trim() == "10.1.2.3"
    });
    assert_eq!(c.udp_ask("pa1", NO_ENDPOINTS_UDP, 53, 0), "refused", "no endpoints, from a pod");
    let from_node = c.udp_ask("a", NO_ENDPOINTS_UDP, 53, 0);
    assert!(
        ["refused", "rejected"].contains(&from_node.as_str()),
        "no endpoints, from the node: {from_node}"
    );
}

/// A UDP client that keeps its source port follows an endpoint change, and
/// survives a restart of ringport (which binds the proxy ports its rules
/// point at again, so the client's conntrack entry stays valid).
fn udp_client_keeps_its_source_port_across_changes(c: &mut Cluster) {
    const SPORT: u16 = 41000;
    let ask = |c: &Cluster, want: &str, what: &str| {
        c.lab.eventually(Duration::from_secs(15), what, || c.udp_ask("pa1", ECHO, 7, SPORT) == want);
    };
    ask(c, "pb1", "echo from pb1");
    for object in objects("pa1") {
        c.api.apply(object);
    }
    ask(c, "pa1", "echo from pa1 after the endpoint change, same source port");
    let before = c.proxy_port("a", "echo");
    c.restart("a");
    assert_eq!(before, c.proxy_port("a", "echo"), "a restart keeps the proxy ports the rules point at");
    ask(c, "pa1", "echo after ringport restarted, same source port");
    let entries = c.lab.ok("a", &["conntrack", "-L", "-p", "udp", "--orig-dst", ECHO]);
    assert!(entries.contains(&format!("sport={SPORT}")), "the client's entry is back:\n{entries}");
}

fn every_case(backend: &'static str) {
    let mut c = Cluster::start(backend);
    pods_and_hosts_reach_cluster_ips(&c);
    outside_reaches_node_ports_and_not_proxy_ports(&c);
    external_traffic_keeps_its_scope(&c);
    udp_like_kube_proxy(&c);
    udp_client_keeps_its_source_port_across_changes(&mut c);
}

#[test]
fn two_nodes_calico_and_bridge_pods_under_nft() {
    every_case("nft");
}

#[test]
fn two_nodes_calico_and_bridge_pods_under_iptables() {
    every_case("iptables");
}
