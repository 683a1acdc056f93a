//! The PROXY protocol end to end, with real peers that parse it on their
//! own: a Python backend with its own v1/v2 parser
//! (`fixtures/proxy_protocol_backend.py`), and nginx's stream module with
//! `proxy_protocol` on its listener. ringport runs in a node namespace with
//! nft rules, the client in a client namespace (tests/netns), over IPv4 and
//! IPv6 (dual-stack cluster IPs); an IPv6 client is also tested on loopback
//! (`::1`, an externalIP ringport listens on).
//!
//! Needs root and `ip`, `nft`, `curl`, `python3`, `nginx` (CI has them
//! through scripts/test.sh); without them the namespace tests fail saying so.

mod common;
mod netns;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use netns::{CLIENT_IP, CLIENT_IP6, Lab, NODE_IP, in_namespace, ipv6_of};

const BACKEND: (&str, &str) = ("be1", "10.200.0.11");
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proxy_protocol_backend.py");

/// A Service `name` on cluster IPs `vips` (one per family) and `port`, to
/// `BACKEND`'s address of each family at `target` (an EndpointSlice per
/// family), with ringport annotations `annotations` and extra spec lines
/// `spec`.
fn service(
    name: &str,
    vips: &[&str],
    port: u16,
    target: u16,
    protocol: &str,
    annotations: &str,
    spec: &str,
) -> String {
    let node_port = if spec.contains("NodePort") { ", nodePort: 30044" } else { "" };
    let dual = if vips.len() > 1 { "  ipFamilyPolicy: RequireDualStack\n" } else { "" };
    let mut y = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  annotations: {{{annotations}}}\n\
         spec:\n  clusterIP: {first}\n  clusterIPs: [{all}]\n{dual}{spec}  \
         ports:\n  - {{port: {port}, targetPort: {target}, protocol: {protocol}{node_port}}}\n",
        first = vips[0],
        all = vips.iter().map(|v| format!("\"{v}\"")).collect::<Vec<_>>().join(", "),
    );
    for vip in vips {
        let (family, ip) =
            if vip.contains(':') { ("IPv6", ipv6_of(BACKEND.1)) } else { ("IPv4", BACKEND.1.to_owned()) };
        y += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{}\n  \
             namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\n\
             ports: [{{port: {target}, protocol: {protocol}}}]\nendpoints:\n  - addresses: [\"{ip}\"]\n",
            family.to_lowercase()
        );
    }
    y
}

/// `pp-v1`, `pp-v2` (TCP, header sent), `pp-udp` (v2 on each datagram;
/// NodePort 30044/UDP and externalIP 10.100.0.43), all dual-stack, `edge`
/// (NodePort 30044/TCP: accepts any header, sends v2 onward), and
/// `lb-edge` (a LoadBalancer IP with source ranges, accepting v1).
fn manifest() -> String {
    [
        service(
            "pp-v1",
            &["10.96.0.41", "fd10:96::41"],
            80,
            8080,
            "TCP",
            "ringport.io/proxy-protocol: v1",
            "",
        ),
        service(
            "pp-v2",
            &["10.96.0.42", "fd10:96::42"],
            80,
            8080,
            "TCP",
            "ringport.io/proxy-protocol: v2",
            "",
        ),
        service(
            "pp-udp",
            &["10.96.0.43", "fd10:96::43"],
            53,
            5353,
            "UDP",
            "ringport.io/proxy-protocol: v2",
            "  type: NodePort\n  externalIPs: [\"10.100.0.43\"]\n",
        ),
        service(
            "edge",
            &["10.96.0.44"],
            80,
            8080,
            "TCP",
            "ringport.io/accept-proxy-protocol: any, ringport.io/proxy-protocol: v2",
            "  type: NodePort\n",
        ),
        // The documented edge setup: the ranges are the real clients', the
        // balancer (the client namespace) is outside them.
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: lb-edge\n  namespace: default\n  \
             annotations: {{ringport.io/accept-proxy-protocol: v1, ringport.io/proxy-protocol: v2}}\n\
             spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.45\n  loadBalancerSourceRanges: [\"203.0.113.0/24\"]\n  \
             ports:\n  - {{port: 80, targetPort: 8080, protocol: TCP}}\n\
             status:\n  loadBalancer:\n    ingress: [{{ip: \"{LB_IP}\"}}]\n\
             ---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: lb-edge, namespace: default}}\n\
             subsets:\n- addresses: [{{ip: \"{}\"}}]\n  ports: [{{port: 8080, protocol: TCP}}]\n",
            BACKEND.1
        ),
    ]
    .concat()
}

/// `lb-edge`'s LoadBalancer IP: not on the node, redirected by the rules.
const LB_IP: &str = "10.100.0.45";

/// A lab with ringport (nft rules) in the node namespace on `manifest`,
/// and `backend` started in be1 once its namespace exists.
struct Node {
    lab: Lab,
    log: PathBuf,
}

impl Node {
    fn start(tools: &[&str], manifest: &str, backend: impl FnOnce(&mut Lab)) -> Node {
        netns::require_privileges_and_tools(tools);
        let mut lab = Lab::new();
        lab.topology(&[BACKEND]);
        backend(&mut lab);
        let config = lab.scratch.path().join("manifests");
        std::fs::create_dir_all(&config).expect("manifest dir");
        std::fs::write(config.join("services.yaml"), manifest).expect("manifest");
        let log = lab.scratch.path().join("ringport.log");
        let ringport = lab.spawn_ringport("node", &[], &config, "nft", &[], &log);
        lab.wait_ready("node", ringport, &log);
        Node { lab, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

/// Start the Python backend in be1 on `ip`, and wait until it listens.
fn python_backend(lab: &mut Lab, ip: &str) -> PathBuf {
    let log = lab.scratch.path().join(format!("backend-{ip}.log"));
    let stderr = lab.scratch.path().join(format!("backend-{ip}.err"));
    lab.spawn(BACKEND.0, &["python3", FIXTURE, ip, "8080", "5353", log.to_str().expect("path")], &stderr);
    wait_ready(&log);
    log
}

fn wait_ready(log: &Path) {
    common::eventually(Duration::from_secs(20), "the PROXY backend listening", || {
        std::fs::read_to_string(log).is_ok_and(|l| l.contains("ready"))
    });
}

/// From namespace `ns`: connect to `to`, send `bytes`, read one line.
/// Returns (the client's own address, the line or the error).
fn exchange(ns: &str, to: SocketAddr, bytes: Vec<u8>) -> (SocketAddr, Result<String, String>) {
    in_namespace(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let local = s.local_addr().expect("local addr");
        s.write_all(&bytes).expect("send");
        let mut line = String::new();
        let got = match BufReader::new(s).read_line(&mut line) {
            Ok(0) => Err("eof".to_owned()),
            Ok(_) => Ok(line.trim().to_owned()),
            Err(e) => Err(format!("{:?}", e.kind())),
        };
        (local, got)
    })
}

/// A v2 PROXY header for TCP, built here byte by byte from the spec.
fn v2_tcp6(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x21, 0, 36]);
    h.extend(src.parse::<std::net::Ipv6Addr>().expect("ip").octets());
    h.extend(dst.parse::<std::net::Ipv6Addr>().expect("ip").octets());
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h
}

fn count(log: &Path, line: &str) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| *l == line).count()
}

#[test]
fn backends_see_the_client_namespace_address_over_ipv4_and_ipv6_in_v1_v2_and_udp_headers_and_the_edge_takes_one_from_a_balancer()
 {
    let mut backend_log = PathBuf::new();
    let node = Node::start(&["ip", "nft", "curl", "python3"], &manifest(), |lab| {
        lab.add_ipv6(&[BACKEND]);
        backend_log = python_backend(lab, BACKEND.1);
        python_backend(lab, &ipv6_of(BACKEND.1));
    });
    let client = node.lab.ns("client");
    let edge: SocketAddr = format!("{NODE_IP}:30044").parse().expect("addr");
    // A client that starts a header and never finishes it: reset after the
    // header wait (5 s), checked at the end.
    let late = in_namespace(&client, move || {
        let mut s = TcpStream::connect_timeout(&edge, Duration::from_secs(3)).expect("connect");
        s.write_all(b"PROXY TCP4 192.0.2.1").expect("send");
        s
    });

    // (1) Header sent to the endpoint, v1 and v2, through the nft rules,
    // over IPv4 and IPv6: the client namespace's address, and the cluster
    // IP it connected to.
    for (version, vip, client_ip) in [
        ("v1", "10.96.0.41", CLIENT_IP),
        ("v2", "10.96.0.42", CLIENT_IP),
        ("v1", "fd10:96::41", CLIENT_IP6),
        ("v2", "fd10:96::42", CLIENT_IP6),
    ] {
        let to = SocketAddr::new(vip.parse().expect("ip"), 80);
        let (local, got) = exchange(&client, to, b"hello\n".to_vec());
        assert_eq!(local.ip().to_string(), client_ip);
        assert_eq!(
            got,
            Ok(format!("{version} {client_ip} {} {vip} 80 hello", local.port())),
            "{}",
            node.log()
        );
    }

    // (2) UDP: a v2 DGRAM header on each datagram; replies come back bare.
    // A non-local externalIP (redirected to the external proxy port) and
    // the NodePort (30044/UDP) are named as such.
    for (vip, port, bind, client_ip) in [
        ("10.96.0.43", 53, "0.0.0.0:0", CLIENT_IP),
        ("fd10:96::43", 53, "[::]:0", CLIENT_IP6),
        ("10.100.0.43", 53, "0.0.0.0:0", CLIENT_IP),
        (NODE_IP, 30044, "0.0.0.0:0", CLIENT_IP),
    ] {
        let to = SocketAddr::new(vip.parse().expect("ip"), port);
        let (udp_port, replies) = in_namespace(&client, move || {
            let s = UdpSocket::bind(bind).expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
            let mut replies = Vec::new();
            for i in 0..3 {
                s.send_to(format!("ping{i}").as_bytes(), to).expect("send");
                let mut buf = [0u8; 2048];
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    replies.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            (s.local_addr().expect("local").port(), replies)
        });
        assert_eq!(replies.len(), 3, "every datagram to {vip} answered: {replies:?}\n{}", node.log());
        for (i, reply) in replies.iter().enumerate() {
            assert!(reply.starts_with(&format!("v2 {client_ip} {udp_port} ")), "{reply}");
            assert!(
                reply.ends_with(&format!(" {vip} {port} ping{i}")),
                "where the client sent it as destination, and the payload whole after the header: {reply}"
            );
        }
    }

    // (3) The edge: a balancer's header names the client; ringport uses it
    // and sends it onward as v2 (bytes after the header are relayed).
    let header = b"PROXY TCP4 203.0.113.7 198.51.100.80 5555 443\r\nhello\n".to_vec();
    let (_, got) = exchange(&client, edge, header);
    assert_eq!(got, Ok("v2 203.0.113.7 5555 198.51.100.80 443 hello".to_owned()), "{}", node.log());
    let mut header = v2_tcp6("2001:db8::7", "2001:db8::1", 4444, 443);
    header.extend(b"hi\n");
    let (_, got) = exchange(&client, edge, header);
    assert_eq!(got, Ok("v2 2001:db8::7 4444 2001:db8::1 443 hi".to_owned()), "an IPv6 client in the header");

    // (4) A malformed header: the client is reset, nothing reaches the
    // backend, and it is counted.
    let connections = count(&backend_log, "conn");
    let (_, got) = exchange(&client, edge, b"GET / HTTP/1.0\r\n\r\n".to_vec());
    assert!(got.is_err(), "a client without a PROXY header was served: {got:?}");
    let (_, got) = exchange(&client, edge, b"PROXY TCP4 203.0.113.7 nonsense 1 2\r\nhello\n".to_vec());
    assert!(got.is_err(), "a malformed v1 line was accepted: {got:?}");
    // (5) ... and the late one is reset once its wait is over.
    let late = in_namespace(&client, move || {
        let mut late = late;
        late.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut buf = [0u8; 16];
        late.read(&mut buf).map_err(|e| e.kind())
    });
    assert_eq!(late, Err(std::io::ErrorKind::ConnectionReset), "a late header ends in a reset");
    assert_eq!(count(&backend_log, "conn"), connections, "nothing was forwarded for a refused header");
    node.lab.eventually(Duration::from_secs(5), "3 refused headers counted", || {
        node.counter("ringport_proxy_headers_refused_total") == 3.0
    });

    // (6) A LoadBalancer IP with source ranges, behind a balancer outside
    // them: the firewall lets the balancer through, and the client its
    // header names is judged against the ranges.
    let lb: SocketAddr = format!("{LB_IP}:80").parse().expect("addr");
    let header = format!("PROXY TCP4 203.0.113.7 {LB_IP} 5555 80\r\nhello\n").into_bytes();
    let (_, got) = exchange(&client, lb, header);
    assert_eq!(got, Ok(format!("v2 203.0.113.7 5555 {LB_IP} 80 hello")), "{}", node.log());
    let connections = count(&backend_log, "conn");
    let header = format!("PROXY TCP4 198.51.100.9 {LB_IP} 5555 80\r\nhello\n").into_bytes();
    let (_, got) = exchange(&client, lb, header);
    assert!(got.is_err(), "a header naming a client outside the ranges was served: {got:?}");
    assert_eq!(count(&backend_log, "conn"), connections, "nothing was forwarded for it");
    node.lab.eventually(Duration::from_secs(5), "the refusal counted", || {
        node.counter("ringport_proxy_headers_refused_total") == 4.0
    });
}

#[test]
fn nginx_with_proxy_protocol_on_logs_the_client_namespace_address() {
    let mut access_log = PathBuf::new();
    let manifest = [
        service("pp-v1", &["10.96.0.41"], 80, 8080, "TCP", "ringport.io/proxy-protocol: v1", ""),
        service("pp-v2", &["10.96.0.42"], 80, 8080, "TCP", "ringport.io/proxy-protocol: v2", ""),
    ]
    .concat();
    let node = Node::start(&["ip", "nft", "curl", "nginx"], &manifest, |lab| {
        let dir = lab.scratch.path().to_path_buf();
        access_log = dir.join("nginx-access.log");
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                 daemon off;\nmaster_process off;\npid {pid};\nerror_log {err} info;\n\
                 events {{ worker_connections 64; }}\n\
                 stream {{\n  log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr';\n  \
                 server {{\n    listen {ip}:8080 proxy_protocol;\n    access_log {access} pp;\n    \
                 return \"$proxy_protocol_addr\\n\";\n  }}\n}}\n",
                pid = dir.join("nginx.pid").display(),
                err = dir.join("nginx-error.log").display(),
                ip = BACKEND.1,
                access = access_log.display(),
            ),
        )
        .expect("nginx.conf");
        let stderr = dir.join("nginx.stderr");
        lab.spawn(
            BACKEND.0,
            &["nginx", "-c", conf.to_str().expect("path"), "-p", dir.to_str().expect("path")],
            &stderr,
        );
        lab.eventually(Duration::from_secs(20), "nginx listening", || {
            lab.ok(BACKEND.0, &["ss", "-ltn"]).contains(&format!("{}:8080", BACKEND.1))
        });
    });
    let client = node.lab.ns("client");
    let mut ports = Vec::new();
    for vip in ["10.96.0.41", "10.96.0.42"] {
        let (local, got) = exchange(&client, format!("{vip}:80").parse().expect("addr"), Vec::new());
        assert_eq!(got, Ok(CLIENT_IP.to_owned()), "nginx answers with $proxy_protocol_addr\n{}", node.log());
        ports.push(local.port());
    }
    node.lab.eventually(Duration::from_secs(10), "nginx logged both sessions", || {
        let log = std::fs::read_to_string(&access_log).unwrap_or_default();
        ports.iter().all(|p| log.lines().any(|l| l == format!("{CLIENT_IP} {p} {NODE_IP}")))
    });
}

/// The Python backend on loopback, killed on drop.
struct LocalBackend {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for LocalBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn local_backend(tcp: u16, udp: u16) -> LocalBackend {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("backend.log");
    let child = Command::new("python3")
        .args([FIXTURE, "127.0.0.1", &tcp.to_string(), &udp.to_string(), log.to_str().expect("path")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 (scripts/test.sh installs it)");
    wait_ready(&log);
    LocalBackend { child, log, _dir: dir }
}

#[test]
fn an_ipv6_client_on_loopback_reaches_the_backend_in_a_tcp6_header_and_a_bad_annotation_keeps_the_last_good_state()
 {
    let (tcp, udp, port) = (common::free_port(), common::free_port(), common::free_port());
    let backend = local_backend(tcp, udp);
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: six\n  namespace: default\n  \
         annotations: {{ringport.io/proxy-protocol: v1}}\n\
         spec:\n  clusterIP: 10.96.0.46\n  externalIPs: [\"::1\"]\n  ports:\n  - {{port: {port}, targetPort: {tcp}}}\n\
         ---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: six, namespace: default}}\n\
         subsets:\n- addresses: [{{ip: \"127.0.0.1\"}}]\n  ports: [{{port: {tcp}}}]\n"
    );
    let proxy = common::Proxy::start(&manifest, &[]);
    let to: SocketAddr = format!("[::1]:{port}").parse().expect("addr");
    let ask = || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).expect("ringport listens on ::1");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let local = s.local_addr().expect("local");
        s.write_all(b"hello\n").expect("send");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("answer");
        (local, line.trim().to_owned())
    };
    let (local, line) = ask();
    assert_eq!(
        line,
        format!("v1 ::1 {} ::1 {port} hello", local.port()),
        "backend log: {}\n{}",
        std::fs::read_to_string(&backend.log).unwrap_or_default(),
        proxy.log()
    );

    // An unknown value is an error naming the Service and the annotation;
    // the last good configuration keeps serving.
    let generation = proxy.generation();
    proxy.write_manifest(&manifest.replace("proxy-protocol: v1", "proxy-protocol: v3"));
    common::eventually(Duration::from_secs(10), "the rejected reload logged", || {
        proxy.log().contains("reload rejected")
    });
    let log = proxy.log();
    assert!(
        log.contains("default/six") && log.contains(r#"metadata.annotations["ringport.io/proxy-protocol"]"#),
        "{log}"
    );
    assert_eq!(proxy.generation(), generation, "nothing new was published");
    let (local, line) = ask();
    assert_eq!(line, format!("v1 ::1 {} ::1 {port} hello", local.port()), "the last good state serves");
    let snapshot = proxy.snapshot();
    let port_view = &snapshot["service_ports"][0];
    assert_eq!(port_view["proxy_protocol"]["send"], "v1", "{snapshot:#}");
    assert_eq!(port_view["proxy_protocol"]["accept"], serde_json::Value::Null);
}
