//! Who may send ringport a PROXY header: `--proxy-protocol-trusted-cidrs`
//! admits only the load balancers it names, and the client a trusted header
//! names is judged against `loadBalancerSourceRanges` (the peer itself, the
//! load balancer, need not be inside them). On loopback with
//! `--redirect none`: a LoadBalancer IP local to the node, an echo backend
//! that counts what reaches it. Loopback only; backends started here.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Backend, Proxy, free_port};

const LB_IP: &str = "127.0.0.79";
/// The load balancer: trusted, and outside the Service's source ranges.
const BALANCER: &str = "127.0.0.9";
/// Any other peer on the node: not trusted.
const STRANGER: &str = "127.0.0.6";
/// The client named in headers, inside the source ranges.
const CLIENT: &str = "127.0.0.5";
/// A client named in headers, outside the source ranges.
const OUTSIDER: &str = "127.0.0.8";

fn manifest(backend: SocketAddr, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: edge\n  namespace: default\n  \
         annotations: {{ringport.io/accept-proxy-protocol: v1}}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.79\n  loadBalancerSourceRanges: [\"{CLIENT}/32\"]\n  \
         ports:\n  - {{name: tcp, port: {port}, protocol: TCP}}\n\
         status:\n  loadBalancer:\n    ingress: [{{ip: \"{LB_IP}\"}}]\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: edge, namespace: default}}\nsubsets:\n\
         - addresses: [{{ip: \"127.0.0.1\"}}]\n  ports: [{{name: tcp, port: {}, protocol: TCP}}]\n",
        backend.port()
    )
}

/// From `peer`, send a v1 header naming `client`, then `hello`: what comes
/// back before EOF or reset (empty when refused).
fn send_from(peer: &str, client: &str, to: SocketAddr) -> String {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let bind: SocketAddr = format!("{peer}:0").parse().expect("peer");
    socket.bind(&bind.into()).expect("bind peer");
    socket.connect(&to.into()).expect("connect: the listener accepts, then decides");
    let mut s = TcpStream::from(socket);
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let header = format!("PROXY TCP4 {client} {} 40000 {}\r\nhello", to.ip(), to.port());
    // A refused peer may be reset before or while this is written.
    if s.write_all(header.as_bytes()).is_ok() {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

#[test]
fn only_trusted_peers_may_name_a_client_and_the_named_client_meets_the_source_ranges() {
    let backend = Backend::echo();
    let port = free_port();
    let proxy = Proxy::start(
        &manifest(backend.addr, port),
        &["--proxy-protocol-trusted-cidrs", &format!("{BALANCER}/32")],
    );
    let lb: SocketAddr = format!("{LB_IP}:{port}").parse().expect("addr");
    let refused = || {
        proxy
            .metric(
                "ringport_proxy_headers_refused_total{namespace=\"default\",service=\"edge\",port=\"tcp\"}",
            )
            .unwrap_or(0.0)
    };

    // The balancer names a client inside the ranges: served, though the
    // balancer's own address is outside them.
    assert_eq!(send_from(BALANCER, CLIENT, lb), "hello", "{}", proxy.log());
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(refused(), 0.0);

    // Any other peer cannot name a client, even an allowed one: reset,
    // counted, nothing forwarded.
    assert_eq!(send_from(STRANGER, CLIENT, lb), "", "an untrusted peer's header was served");
    assert_eq!(refused(), 1.0, "{}", proxy.log());

    // The balancer names a client outside the ranges: reset, counted as a
    // refused header, nothing forwarded.
    assert_eq!(send_from(BALANCER, OUTSIDER, lb), "", "a client outside the ranges was served");
    assert_eq!(refused(), 2.0, "{}", proxy.log());
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 1, "a refused connection reached the backend");
}

#[test]
fn without_a_trust_list_any_peer_may_name_a_client() {
    let backend = Backend::echo();
    let port = free_port();
    let proxy = Proxy::start(&manifest(backend.addr, port), &[]);
    let lb: SocketAddr = format!("{LB_IP}:{port}").parse().expect("addr");
    assert_eq!(send_from(STRANGER, CLIENT, lb), "hello", "{}", proxy.log());
    assert_eq!(send_from(BALANCER, OUTSIDER, lb), "", "a client outside the ranges was served");
}
