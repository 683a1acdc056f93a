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
//! - Outside traffic cannot pin the server: every port is served through
//!   the admin server's accept loop (`admin::accept`) with one gate over
//!   all ports: a bounded number of connections, taken before accepting
//!   (beyond it, probes wait in the kernel's queue), a cap per outside
//!   source and permits kept for the node itself; one request per
//!   connection (`Connection: close`), and a connection that has not been
//!   answered within [`TIMEOUT`] is dropped.
//! - A port that cannot be bound is logged (naming the Service and field)
//!   and tried again at the next sync; the other Services are served.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::ProxyHealth;
use crate::admin::accept::{self, Gate};
use crate::model::{ServiceName, ServicePort};
use crate::snapshot::Snapshot;

/// The whole life of one probe connection: request head in, answer out.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// One request per connection (`Connection: close`), header names as Go
/// writes them.
const HTTP: accept::Http =
    accept::Http { header_timeout: TIMEOUT, lifetime: TIMEOUT, keep_alive: false, title_case_headers: true };

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
    /// One gate over every port's listeners.
    gate: Arc<Gate>,
    servers: BTreeMap<u16, Server>,
    /// Ports that could not be bound, so each failure is logged at error
    /// once, not at every update.
    failing: BTreeMap<u16, ServiceName>,
}

impl ServiceHealth {
    /// Servers on `node_ips` (as `listen::node_addresses` gives
    /// them) counting endpoints of node `node_name`.
    pub fn new(node_ips: Vec<IpAddr>, node_name: Option<String>, proxy: ProxyHealth) -> Self {
        let gate = Gate::new("healthCheckNodePort");
        Self { node_ips, node_name, proxy, gate, servers: BTreeMap::new(), failing: BTreeMap::new() }
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
    ///
    /// Cost: a walk over every health-checked port and its endpoints (H
    /// ports) at each publication, changed or not: the counts are made
    /// afresh rather than kept up to date per changed port
    /// (docs/architecture.md, "What stays O(N) per update").
    pub fn sync(&mut self, snapshot: &Snapshot) {
        let wanted = Self::wanted(snapshot.health_checked().map(|p| &*p.spec), self.node_name.as_deref());
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
            let serve = accept::serve(listener, router(answer), Arc::clone(&self.gate), HTTP);
            server.tasks.push(tokio::spawn(serve));
        }
        Ok(server)
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    if addr.is_ipv6() {
        // `[::]` beside `0.0.0.0` (`listen::node_addresses`): IPv6 only.
        socket2::SockRef::from(&socket).set_only_v6(true)?;
    }
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// What one server answers.
#[derive(Clone)]
struct Answer {
    service: ServiceName,
    local_endpoints: Arc<AtomicUsize>,
    proxy: ProxyHealth,
}

impl Answer {
    /// kube-proxy's status and body, byte for byte.
    fn response(&self) -> (StatusCode, String) {
        let count = self.local_endpoints.load(Ordering::Relaxed);
        let (healthy, _) = self.proxy.check();
        let status = if count != 0 && healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let body = format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\
             \"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
            self.service.namespace, self.service.name
        );
        (status, body)
    }
}

async fn answer(State(answer): State<Answer>) -> impl IntoResponse {
    let (status, body) = answer.response();
    (status, [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")], body)
}

/// Every path and method gets the answer, as from kube-proxy.
fn router(answer: Answer) -> Router {
    Router::new().fallback(self::answer).with_state(answer)
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
        let mut sp = ServicePort::new(name, Origin::new("t"), Protocol::Tcp, 80);
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
