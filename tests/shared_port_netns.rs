//! `--proxy-port-mode shared` end to end, in network namespaces: the real
//! `ringport` binary in a node namespace with real nft or iptables rules, a client
//! namespace, and two backend namespaces running real HTTP servers that
//! name themselves (be1 also runs the PROXY-protocol backend of
//! `fixtures/proxy_protocol_backend.py`, which parses the header itself).
//! Every TCP service port is served through one proxy port per family.
//!
//! Needs root and `ip`, `nft`, `iptables`, `curl`, `python3`, `ss` (CI has them through
//! scripts/test.sh); without them the test fails saying so.

mod netns;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use netns::{CLIENT_IP, Lab, in_namespace, ipv6_of};

const TOOLS: [&str; 6] = ["ip", "nft", "iptables", "curl", "python3", "ss"];
const BACKENDS: [(&str, &str); 2] = [("be1", "10.200.0.11"), ("be2", "10.200.0.12")];
const PROXY_BACKEND: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proxy_protocol_backend.py");
/// ringport's default proxy addresses (`--proxy-address`, `--proxy-address6`).
const PROXY_ADDRESS: &str = "169.254.99.1";
const PROXY_ADDRESS6: &str = "fd72:696e:6770::1";

/// A Service on `vips` (one per family; port 80) with an EndpointSlice per
/// family holding `backends`' addresses of it on `target`, and `extra`
/// lines in its spec and `annotations`.
fn service(
    name: &str,
    vips: &[&str],
    target: u16,
    backends: &[&str],
    spec: &str,
    annotations: &str,
) -> String {
    let dual = if vips.len() > 1 { "  ipFamilyPolicy: RequireDualStack\n" } else { "" };
    let all = vips.iter().map(|v| format!("\"{v}\"")).collect::<Vec<_>>().join(", ");
    let mut y = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  \
         annotations: {{{annotations}}}\nspec:\n  clusterIP: {}\n  clusterIPs: [{all}]\n{dual}{spec}  \
         ports:\n  - {{port: 80, targetPort: {target}, protocol: TCP}}\n",
        vips[0]
    );
    for vip in vips {
        let v6 = vip.contains(':');
        let addresses: Vec<String> = backends
            .iter()
            .map(|b| format!("\"{}\"", if v6 { ipv6_of(b) } else { (*b).to_owned() }))
            .collect();
        if addresses.is_empty() {
            continue;
        }
        let family = if v6 { "IPv6" } else { "IPv4" };
        y += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{}\n  \
             namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\n\
             ports: [{{port: {target}, protocol: TCP}}]\nendpoints:\n  - addresses: [{}]\n",
            family.to_lowercase(),
            addresses.join(", ")
        );
    }
    y
}

/// `a` (dual-stack, be1), `b` (be2, and a non-local externalIP), `sticky`
/// (both, ClientIP affinity), `pp` (be1's PROXY backend, a v1 header sent)
/// and `empty` (no endpoint, until `empty_served`).
fn manifest(empty_served: bool) -> String {
    let (be1, be2) = (BACKENDS[0].1, BACKENDS[1].1);
    let empty: &[&str] = if empty_served { &[be1] } else { &[] };
    [
        service("a", &["10.96.0.10", "fd10:96::10"], 8080, &[be1], "", ""),
        service("b", &["10.96.0.11"], 8080, &[be2], "  externalIPs: [\"10.97.0.11\"]\n", ""),
        service("sticky", &["10.96.0.12"], 8080, &[be1, be2], "  sessionAffinity: ClientIP\n", ""),
        service("pp", &["10.96.0.13"], 9090, &[be1], "", "ringport.io/proxy-protocol: v1"),
        service("empty", &["10.96.0.20"], 8080, empty, "", ""),
        UDP_SERVICE.replace("{be2}", be2),
    ]
    .concat()
}

/// A UDP Service beside the TCP ones: served on a proxy port of its own
/// (DNAT hides a datagram's original destination), be2's echo on 5353.
const UDP_SERVICE: &str = "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: dns\n  namespace: default\n\
spec:\n  clusterIP: 10.96.0.53\n  ports:\n  - {port: 53, targetPort: 5353, protocol: UDP}\n\
---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns\n  namespace: default\n  \
labels: {kubernetes.io/service-name: dns}\naddressType: IPv4\nports: [{port: 5353, protocol: UDP}]\n\
endpoints:\n  - addresses: [\"{be2}\"]\n";
/// be2's UDP echo: answers each datagram with "be2:" and the datagram.
const UDP_ECHO: &str = "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
s.bind((sys.argv[1], 5353))\nwhile True:\n    d, a = s.recvfrom(2048)\n    s.sendto(b'be2:' + d, a)\n";

struct Node {
    lab: Lab,
    config: PathBuf,
    log: PathBuf,
}

impl Node {
    fn start(redirect: &str) -> Node {
        netns::require_privileges_and_tools(&TOOLS);
        let mut lab = Lab::new();
        lab.topology(&BACKENDS);
        lab.add_ipv6(&BACKENDS);
        // As on a Kubernetes node: a cluster IP with no endpoint is not
        // DNATed, so its reject rule sits on the forward path.
        lab.ok("node", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for (role, ip) in BACKENDS {
            let root = lab.scratch.path().join(role);
            std::fs::create_dir_all(&root).expect("backend dir");
            std::fs::write(root.join("whoami"), role).expect("backend file");
            let root = root.to_string_lossy().into_owned();
            let log = lab.scratch.path().join(format!("{role}.log"));
            // `::` takes both families (python's http.server binds it dual-stack).
            lab.spawn(
                role,
                &["python3", "-m", "http.server", "--bind", "::", "8080", "--directory", &root],
                &log,
            );
            for url in [format!("http://{ip}:8080/whoami"), format!("http://[{}]:8080/whoami", ipv6_of(ip))] {
                lab.eventually(Duration::from_secs(20), &format!("{role} serving {url}"), || {
                    lab.curl("node", &url).1 == role
                });
            }
        }
        let pp_log = lab.scratch.path().join("pp.log");
        let pp_err = lab.scratch.path().join("pp.err");
        let args = ["python3", PROXY_BACKEND, BACKENDS[0].1, "9090", "9053", pp_log.to_str().expect("path")];
        lab.spawn(BACKENDS[0].0, &args, &pp_err);
        lab.eventually(Duration::from_secs(20), "the PROXY backend listening", || {
            std::fs::read_to_string(&pp_log).is_ok_and(|l| l.contains("ready"))
        });
        let echo_log = lab.scratch.path().join("udp-echo.log");
        lab.spawn(BACKENDS[1].0, &["python3", "-c", UDP_ECHO, BACKENDS[1].1], &echo_log);
        let config = lab.scratch.path().join("manifests");
        std::fs::create_dir_all(&config).expect("manifest dir");
        std::fs::write(config.join("services.yaml"), manifest(false)).expect("manifest");
        let log = lab.scratch.path().join("ringport.log");
        let ringport =
            lab.spawn_ringport("node", &[], &config, redirect, &["--proxy-port-mode", "shared"], &log);
        lab.wait_ready("node", ringport, &log);
        Node { lab, config, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, role: &str, url: &str) -> String {
        let (code, body) = self.lab.curl(role, url);
        assert_eq!(code, 0, "curl {url} from {role}: exit {code}\n{}", self.log());
        body
    }

    /// The local addresses of the node's listening TCP sockets on `ip`.
    fn listening_on(&self, ip: &str) -> Vec<String> {
        self.bound_on(ip, "-Hltn")
    }

    /// The local addresses of the node's sockets `ss flags` lists on `ip`.
    fn bound_on(&self, ip: &str, flags: &str) -> Vec<String> {
        let out = self.lab.ok("node", &["ss", flags]);
        out.lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter(|local| {
                local.trim_start_matches('[').starts_with(&format!("{ip}]:"))
                    || local.starts_with(&format!("{ip}:"))
            })
            .map(str::to_owned)
            .collect()
    }

    /// The sum of every sample of counter `name` on ringport's /metrics.
    fn counter(&self, name: &str) -> f64 {
        let (_, body) = self.lab.curl("node", "http://127.0.0.1:10249/metrics");
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// From namespace `ns`: connect to `to`, send a line, read one back.
fn exchange(ns: &str, to: SocketAddr) -> (SocketAddr, String) {
    in_namespace(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let local = s.local_addr().expect("local addr");
        s.write_all(b"hello\n").expect("send");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("read");
        (local, line.trim().to_owned())
    })
}

/// From namespace `ns`: send "ping" over UDP to `to` (up to 5 tries, 1 s
/// each), and the answer.
fn udp_exchange(ns: &str, to: SocketAddr) -> Option<String> {
    in_namespace(ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let mut buf = [0u8; 256];
        for _ in 0..5 {
            s.send_to(b"ping", to).ok()?;
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    })
}

fn count(path: &Path, what: &str) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().matches(what).count()
}

#[test]
fn one_proxy_port_per_family_serves_every_tcp_service_by_its_original_destination_with_nft() {
    one_proxy_port_per_family_serves_every_tcp_service("nft");
}

#[test]
fn one_proxy_port_per_family_serves_every_tcp_service_by_its_original_destination_with_iptables() {
    one_proxy_port_per_family_serves_every_tcp_service("iptables");
}

fn one_proxy_port_per_family_serves_every_tcp_service(redirect: &str) {
    let node = Node::start(redirect);

    // (1) Each cluster IP reaches its own Service's backend, from the
    // client (PREROUTING) and from the node itself (OUTPUT), over IPv4 and
    // IPv6, and a non-local externalIP too.
    for (from, url, want) in [
        ("client", "http://10.96.0.10/whoami", "be1"),
        ("client", "http://10.96.0.11/whoami", "be2"),
        ("client", "http://[fd10:96::10]/whoami", "be1"),
        ("client", "http://10.97.0.11/whoami", "be2"),
        ("node", "http://10.96.0.10/whoami", "be1"),
        ("node", "http://10.96.0.11/whoami", "be2"),
    ] {
        assert_eq!(node.get(from, url), want, "{from} -> {url}");
    }

    // (2) Through one proxy port per family: one listening socket per
    // worker (2) on one port, whatever the number of TCP service ports (5).
    for ip in [PROXY_ADDRESS, PROXY_ADDRESS6] {
        let sockets = node.listening_on(ip);
        let ports: BTreeSet<&str> = sockets.iter().filter_map(|s| s.rsplit(':').next()).collect();
        assert_eq!((sockets.len(), ports.len()), (2, 1), "listening on {ip}: {sockets:?}");
    }
    let (_, snapshot) = node.lab.curl("node", "http://127.0.0.1:10249/debug/snapshot");
    let snapshot: serde_json::Value = serde_json::from_str(&snapshot).expect("snapshot JSON");
    assert_eq!(snapshot["shared_proxy_ports"].as_array().map(Vec::len), Some(2), "{snapshot}");

    // (3) Session affinity: one client stays on one of the two endpoints.
    let sticky: BTreeSet<String> = (0..8).map(|_| node.get("client", "http://10.96.0.12/whoami")).collect();
    assert_eq!(sticky.len(), 1, "{sticky:?}");

    // (4) The PROXY header names the cluster IP the client connected to:
    // the original destination the shared port read.
    let (local, line) = exchange(&node.lab.ns("client"), "10.96.0.13:80".parse().expect("addr"));
    assert_eq!(line, format!("v1 {CLIENT_IP} {} 10.96.0.13 80 hello", local.port()), "{}", node.log());

    // (5) No endpoint: refused by the rule (RST to the SYN), not accepted.
    assert_eq!(node.lab.probe("client", "10.96.0.20", 80), "refused");
    assert_eq!(node.lab.probe("node", "10.96.0.20", 80), "refused");
    std::fs::write(node.config.join("services.yaml"), manifest(true)).expect("manifest");
    node.lab.eventually(Duration::from_secs(20), "empty served once it has an endpoint", || {
        node.lab.curl("client", "http://10.96.0.20/whoami").1 == "be1"
    });
    // ... and when it loses its last endpoint again, the rule resets it
    // again (no per-service listener to pause).
    std::fs::write(node.config.join("services.yaml"), manifest(false)).expect("manifest");
    node.lab.eventually(Duration::from_secs(20), "empty refused by its rule again", || {
        node.lab.probe("client", "10.96.0.20", 80) == "refused"
    });

    // (6) Straight to the shared port, not through a rule: reset and counted.
    let shared = node.listening_on(PROXY_ADDRESS)[0].rsplit(':').next().expect("port").parse().expect("port");
    let before = node.counter("ringport_connections_unmatched_total");
    assert_eq!(node.lab.probe("node", PROXY_ADDRESS, shared), "reset");
    node.lab.eventually(Duration::from_secs(5), "the unmatched connection counted", || {
        node.counter("ringport_connections_unmatched_total") == before + 1.0
    });

    // (7) A UDP Service beside them keeps its own proxy port, not the
    // shared one, and is served through it.
    let answer = udp_exchange(&node.lab.ns("client"), "10.96.0.53:53".parse().expect("addr"));
    assert_eq!(answer.as_deref(), Some("be2:ping"), "{}", node.log());
    let udp = node.bound_on(PROXY_ADDRESS, "-Hlun");
    let udp_ports: BTreeSet<u16> = udp.iter().filter_map(|s| s.rsplit(':').next()?.parse().ok()).collect();
    assert_eq!(udp_ports.len(), 1, "one UDP proxy port: {udp:?}");
    assert!(!udp_ports.contains(&shared), "not the shared port {shared}: {udp:?}");
    assert_eq!(count(&node.log, "panicked"), 0, "{}", node.log());
}

#[test]
fn a_shared_port_that_cannot_bind_stops_the_start() {
    netns::require_privileges_and_tools(&TOOLS);
    let mut lab = Lab::new();
    lab.add_ns("node");
    // Another process holds one port on every address of the node, and
    // that port is the only one --proxy-port-range leaves.
    let held = in_namespace(&lab.ns("node"), || std::net::TcpListener::bind("0.0.0.0:0").expect("bind"));
    let port = held.local_addr().expect("addr").port();
    let config = lab.scratch.path().join("manifests");
    std::fs::create_dir_all(&config).expect("manifest dir");
    std::fs::write(config.join("services.yaml"), service("a", &["10.96.0.10"], 8080, &[], "", ""))
        .expect("manifest");
    let log = lab.scratch.path().join("ringport.log");
    let range = format!("{port}-{port}");
    let extra = ["--proxy-port-mode", "shared", "--proxy-port-range", &range];
    let ringport = lab.spawn_ringport("node", &[], &config, "nft", &extra, &log);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = lab.exit_status(ringport) {
            break status;
        }
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(std::time::Instant::now() < deadline, "still running without its shared port:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{log}");
    assert!(log.contains("cannot bind the shared proxy port"), "{log}");
    drop(held);
}
