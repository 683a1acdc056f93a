//! `loadBalancerSourceRanges` enforced by the data plane itself, with no
//! rules at all (`--redirect none`): a LoadBalancer IP local to the node
//! (127.0.0.77 on loopback) serves TCP and UDP to a client inside the
//! ranges and drops one outside them. Loopback only; backends started here.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::{Backend, Proxy, free_port, udp_backend, whoami};

const LB_IP: &str = "127.0.0.77";
const ALLOWED: &str = "127.0.0.5";
const DENIED: &str = "127.0.0.6";

fn manifest(tcp: SocketAddr, udp: SocketAddr, tcp_port: u16, udp_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: default}}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.77\n  loadBalancerSourceRanges: [\"{ALLOWED}/32\"]\n  \
         ports:\n  - {{name: tcp, port: {tcp_port}, protocol: TCP}}\n  - {{name: udp, port: {udp_port}, protocol: UDP}}\n\
         status:\n  loadBalancer:\n    ingress: [{{ip: \"{LB_IP}\"}}]\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: lb, namespace: default}}\nsubsets:\n\
         - addresses: [{{ip: \"127.0.0.1\"}}]\n  ports: [{{name: tcp, port: {}, protocol: TCP}}]\n\
         - addresses: [{{ip: \"127.0.0.1\"}}]\n  ports: [{{name: udp, port: {}, protocol: UDP}}]\n",
        tcp.port(),
        udp.port()
    )
}

/// One UDP exchange from `source`, up to 3 tries of 300 ms.
fn udp_from(source: &str, to: SocketAddr) -> Option<String> {
    let c = UdpSocket::bind((source, 0)).expect("bind client");
    c.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        c.send_to(b"ping", to).expect("send");
        if let Ok((n, _)) = c.recv_from(&mut buf) {
            return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    None
}

/// A TCP connection from `source`: what it reads before EOF (empty when
/// the proxy closed it without a byte).
fn tcp_from(source: &str, to: SocketAddr) -> String {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let bind: SocketAddr = format!("{source}:0").parse().expect("source");
    socket.bind(&bind.into()).expect("bind client");
    socket.connect(&to.into()).expect("connect: the listener accepts, then decides");
    let mut s = TcpStream::from(socket);
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

#[test]
fn a_local_load_balancer_ip_serves_tcp_and_udp_only_to_sources_in_its_ranges() {
    let (tcp_backend, udp_backend) = (Backend::greeter(), udp_backend(Some(b"hello")));
    let (tcp_port, udp_port) = (free_port(), free_port());
    let proxy = Proxy::start(&manifest(tcp_backend.addr, udp_backend, tcp_port, udp_port), &[]);
    let tcp_lb: SocketAddr = format!("{LB_IP}:{tcp_port}").parse().expect("addr");
    let udp_lb: SocketAddr = format!("{LB_IP}:{udp_port}").parse().expect("addr");

    assert_eq!(udp_from(ALLOWED, udp_lb).as_deref(), Some("hello"), "{}", proxy.log());
    assert_eq!(udp_from(DENIED, udp_lb), None, "a UDP source outside the ranges was served");
    let dropped = proxy
        .metric("ringport_udp_datagrams_dropped_total{namespace=\"default\",service=\"lb\",port=\"udp\"}");
    assert!(dropped.is_some_and(|n| n >= 3.0), "denied datagrams are counted as dropped: {dropped:?}");

    assert!(tcp_from(ALLOWED, tcp_lb).starts_with(&tcp_backend.addr.to_string()), "{}", proxy.log());
    assert_eq!(tcp_from(DENIED, tcp_lb), "", "a TCP source outside the ranges was served");
    // The proxy port (cluster-IP traffic) is not a LoadBalancer path: no ranges.
    assert_eq!(whoami(proxy.proxy_addr("default/lb:tcp")), tcp_backend.addr.to_string());
}
