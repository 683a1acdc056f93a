//! `healthCheckNodePort` servers: for every LoadBalancer Service with
//! `externalTrafficPolicy: Local`, a small HTTP server on the node
//! addresses (every address, or those of `--nodeport-addresses`, as node
//! ports) that tells cloud load balancers whether this node has a ready
//! local endpoint. Driven from the snapshot (snapshot -> servers), like the
//! redirect rules.
//!
//! The answer is kube-proxy's (`pkg/proxy/healthcheck/service_health.go`):
//! any path, `application/json` with `X-Content-Type-Options: nosniff`;
//! 200 when the Service has local ready endpoints and the proxy is healthy
//! ([`ProxyHealth`]), else 503; the body names the Service and gives
//! `localEndpoints` (ready endpoints on this node, counted by IP over the
//! Service's ports) and `serviceProxyHealthy`.
//!
//! Invariants:
//! - A port is served for one Service at a time: the first Service (in
//!   snapshot order) claiming it keeps it; `config::join` reports the clash
//!   (a file source's update is then rejected whole).
//! - Outside traffic cannot pin the server: at most [`MAX_CONNECTIONS`]
//!   connections over all ports (beyond that a connection is closed at
//!   once), one request each (`Connection: close`), and a connection that
//!   has not sent its request head within [`TIMEOUT`] is dropped. A probe
//!   is one GET, so nothing more of HTTP is needed.
//! - A port that cannot be bound is logged (naming the Service and field)
//!   and tried again at the next sync; the other Services are served.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::admin::ProxyHealth;
use crate::model::{ServiceName, ServicePort};
use crate::snapshot::Snapshot;

/// Connections served at once, over every healthCheckNodePort.
pub const MAX_CONNECTIONS: usize = 64;
/// The whole life of one probe connection: request head in, answer out.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The most request-head bytes read.
const MAX_HEAD: usize = 4096;

/// One Service's health-check server: its count and its listeners' tasks.
struct Server {
    service: ServiceName,
    local_endpoints: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Every healthCheckNodePort server of this node.
pub struct ServiceHealth {
    node_ips: Vec<IpAddr>,
    node_name: Option<String>,
    proxy: ProxyHealth,
    permits: Arc<Semaphore>,
    servers: BTreeMap<u16, Server>,
    /// Ports that could not be bound, so each failure is logged at error
    /// once, not at every update.
    failing: BTreeMap<u16, ServiceName>,
}

impl ServiceHealth {
    /// Servers on `node_ips` (as `dataplane::listen::node_addresses` gives
    /// them) counting endpoints of node `node_name`.
    pub fn new(node_ips: Vec<IpAddr>, node_name: Option<String>, proxy: ProxyHealth) -> Self {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        Self { node_ips, node_name, proxy, permits, servers: BTreeMap::new(), failing: BTreeMap::new() }
    }

    /// What service ports (a snapshot's, in order) ask for: port ->
    /// (Service, local ready endpoints). The first Service claiming a port
    /// keeps it.
    pub fn wanted<'a>(
        ports: impl IntoIterator<Item = &'a ServicePort>,
        node_name: Option<&str>,
    ) -> BTreeMap<u16, (ServiceName, usize)> {
        let mut wanted: BTreeMap<u16, (ServiceName, BTreeSet<IpAddr>)> = BTreeMap::new();
        for spec in ports {
            let Some(hc) = spec.health_check_node_port else { continue };
            let (service, ips) =
                wanted.entry(hc).or_insert_with(|| (spec.name.service.clone(), BTreeSet::new()));
            if *service != spec.name.service {
                continue;
            }
            // kube-proxy's LocalReadyEndpoints: ready (not terminating)
            // endpoints on this node, counted by IP across the ports.
            let local = spec
                .endpoints
                .iter()
                .filter(|e| e.conditions.ready && node_name.is_some() && e.node_name.as_deref() == node_name);
            ips.extend(local.map(|e| e.addr.0.ip()));
        }
        wanted.into_iter().map(|(port, (service, ips))| (port, (service, ips.len()))).collect()
    }

    /// Bring the servers to match `snapshot`: open new ports, close
    /// dropped ones, update every count. Must run on a tokio runtime.
    pub fn sync(&mut self, snapshot: &Snapshot) {
        let wanted = Self::wanted(snapshot.ports.iter().map(|p| &p.spec), self.node_name.as_deref());
        self.servers.retain(|port, server| {
            let keep = wanted.get(port).is_some_and(|(service, _)| *service == server.service);
            if !keep {
                tracing::info!(service = %server.service, port, "healthCheckNodePort closed");
            }
            keep
        });
        self.failing.retain(|port, service| wanted.get(port).is_some_and(|(s, _)| s == service));
        for (port, (service, local)) in wanted {
            if let Some(server) = self.servers.get(&port) {
                server.local_endpoints.store(local, Ordering::Relaxed);
                continue;
            }
            match self.open(port, &service, local) {
                Ok(server) => {
                    tracing::info!(%service, port, local_endpoints = local, "healthCheckNodePort serving");
                    self.failing.remove(&port);
                    self.servers.insert(port, server);
                }
                Err((addr, e)) if self.failing.get(&port) == Some(&service) => {
                    tracing::debug!(%service, field = "spec.healthCheckNodePort", %addr, error = %e, "still cannot serve the health check");
                }
                Err((addr, e)) => {
                    tracing::error!(
                        %service, field = "spec.healthCheckNodePort", %addr, error = %e,
                        "cannot serve the health check; retried at each update"
                    );
                    self.failing.insert(port, service);
                }
            }
        }
    }

    /// Bind `port` on every node address and serve it; on any error,
    /// nothing stays bound.
    fn open(
        &self,
        port: u16,
        service: &ServiceName,
        local: usize,
    ) -> Result<Server, (SocketAddr, std::io::Error)> {
        let local_endpoints = Arc::new(AtomicUsize::new(local));
        let mut server = Server { service: service.clone(), local_endpoints, tasks: Vec::new() };
        for ip in &self.node_ips {
            let addr = SocketAddr::new(*ip, port);
            let listener = bind(addr).map_err(|e| (addr, e))?;
            let answer = Answer {
                service: service.clone(),
                local_endpoints: Arc::clone(&server.local_endpoints),
                proxy: self.proxy.clone(),
            };
            server.tasks.push(tokio::spawn(serve(listener, answer, Arc::clone(&self.permits))));
        }
        Ok(server)
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// What one server answers.
struct Answer {
    service: ServiceName,
    local_endpoints: Arc<AtomicUsize>,
    proxy: ProxyHealth,
}

impl Answer {
    /// kube-proxy's status line and body, byte for byte.
    fn response(&self) -> String {
        let count = self.local_endpoints.load(Ordering::Relaxed);
        let (healthy, _) = self.proxy.check();
        let status = if count != 0 && healthy { "200 OK" } else { "503 Service Unavailable" };
        let body = format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\
             \"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
            self.service.namespace, self.service.name
        );
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}

async fn serve(listener: TcpListener, answer: Answer, permits: Arc<Semaphore>) {
    let answer = Arc::new(answer);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(service = %answer.service, error = %e, "healthCheckNodePort accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // At the cap, the connection is closed unanswered (dropped here).
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else { continue };
        let answer = Arc::clone(&answer);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(TIMEOUT, respond(stream, &answer)).await;
            drop(permit);
        });
    }
}

/// Read the request head (up to [`MAX_HEAD`] bytes), then answer.
async fn respond(stream: TcpStream, answer: &Answer) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        stream.readable().await?;
        let n = match stream.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let response = answer.response();
    let mut rest = response.as_bytes();
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ServiceHealth;
    use crate::model::{
        Conditions, Endpoint, EndpointAddr, Origin, Protocol, ServiceName, ServicePort, ServicePortName,
    };

    fn ep(addr: &str, node: &str, ready: bool) -> Endpoint {
        let mut e = Endpoint::ready(EndpointAddr(addr.parse().unwrap()));
        e.node_name = Some(node.into());
        e.conditions = Conditions { ready, serving: true, terminating: !ready };
        e
    }

    fn port(service: &str, name: &str, hc: Option<u16>, endpoints: Vec<Endpoint>) -> ServicePort {
        let name = ServicePortName { service: ServiceName::new("default", service), port: name.into() };
        let mut sp = ServicePort::new(name, Origin("t".into()), Protocol::Tcp, 80);
        sp.health_check_node_port = hc;
        sp.endpoints = endpoints;
        sp
    }

    #[test]
    fn local_ready_endpoints_are_counted_by_ip_across_ports_and_the_first_service_keeps_a_port() {
        let s = [
            port(
                "a",
                "http",
                Some(32000),
                vec![ep("10.0.0.1:80", "n1", true), ep("10.0.0.2:80", "n2", true)],
            ),
            port(
                "a",
                "https",
                Some(32000),
                vec![ep("10.0.0.1:443", "n1", true), ep("10.0.0.3:443", "n1", false)],
            ),
            port("b", "", Some(32000), vec![ep("10.0.0.9:80", "n1", true)]),
            port("c", "", Some(32001), vec![ep("10.0.0.4:80", "n2", true)]),
            port("d", "", None, vec![ep("10.0.0.5:80", "n1", true)]),
        ];
        let wanted = ServiceHealth::wanted(&s, Some("n1"));
        let got: Vec<(u16, String, usize)> =
            wanted.into_iter().map(|(p, (svc, n))| (p, svc.to_string(), n)).collect();
        assert_eq!(got, [(32000, "default/a".to_owned(), 1), (32001, "default/c".to_owned(), 0)]);
        let nameless = ServiceHealth::wanted(&s, None);
        assert!(nameless.values().all(|(_, n)| *n == 0), "no node name: nothing is local");
    }
}
