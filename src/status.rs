//! `ringport status`: what a running ringport serves, read from its admin
//! endpoint (`/debug/snapshot`) and printed as a table (one row per
//! endpoint, like HAProxy's `show stat`) or as JSON.
//!
//! Invariants: only reads; an admin address that does not answer, or
//! answers with something that is not a snapshot, is one error naming the
//! address, never a panic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::balance::health::HealthView;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach ringport's admin endpoint at {addr} (is `ringport run` serving --metrics-bind-address there?)"
    )]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}/debug/snapshot answered HTTP {code}")]
    Http { addr: SocketAddr, code: u16 },
    #[error("{addr}/debug/snapshot did not answer with a snapshot")]
    Malformed {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
}

/// What `status` shows: the served generation and each service port.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub generation: u64,
    pub service_ports: Vec<PortStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PortStatus {
    pub name: String,
    pub protocol: String,
    pub port: u16,
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub external_ips: Vec<String>,
    #[serde(default)]
    pub load_balancer_ips: Vec<String>,
    pub proxy_port: Option<u16>,
    pub listeners: Vec<ListenerStatus>,
    pub endpoints: Vec<EndpointStatus>,
    /// Passive health per endpoint of cluster-IP traffic; filled into
    /// `endpoints` by [`fetch`] and not printed again.
    #[serde(default, skip_serializing)]
    internal: Option<BalancerHealth>,
    #[serde(default, skip_serializing)]
    external: Option<BalancerHealth>,
    /// A dual-stack port's, per family.
    #[serde(default, skip_serializing)]
    ipv4: Option<FamilyHealth>,
    #[serde(default, skip_serializing)]
    ipv6: Option<FamilyHealth>,
}

#[derive(Debug, Default, Deserialize)]
struct FamilyHealth {
    internal: Option<BalancerHealth>,
    external: Option<BalancerHealth>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub role: String,
    pub addr: SocketAddr,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Passive health; `None` for an endpoint no balancer uses on this node.
    #[serde(default)]
    pub health: Option<HealthView>,
}

#[derive(Debug, Default, Deserialize)]
struct BalancerHealth {
    endpoints: Vec<(SocketAddr, HealthView)>,
}

impl EndpointStatus {
    /// One word: ejected, terminating, not-ready or up.
    pub fn state(&self) -> &'static str {
        match &self.health {
            Some(h) if h.ejected => "ejected",
            _ if self.terminating => "terminating",
            _ if !self.ready => "not-ready",
            _ => "up",
        }
    }
}

/// GET `/debug/snapshot` from the admin endpoint at `addr`.
pub fn fetch(addr: SocketAddr, timeout: Duration) -> Result<Status, StatusError> {
    let unreachable = |source| StatusError::Unreachable { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    stream.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    stream.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    write!(stream, "GET /debug/snapshot HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")
        .map_err(unreachable)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(unreachable)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if code != 200 {
        return Err(StatusError::Http { addr, code });
    }
    let mut status: Status =
        serde_json::from_str(body).map_err(|source| StatusError::Malformed { addr, source })?;
    for port in &mut status.service_ports {
        let families =
            [&port.ipv4, &port.ipv6].into_iter().flatten().flat_map(|f| [&f.internal, &f.external]);
        let health: Vec<&(SocketAddr, HealthView)> = [&port.internal, &port.external]
            .into_iter()
            .chain(families)
            .flatten()
            .flat_map(|b| &b.endpoints)
            .collect();
        for ep in &mut port.endpoints {
            ep.health = health.iter().find(|(a, _)| *a == ep.addr).map(|(_, h)| h.clone());
        }
    }
    Ok(status)
}

/// The table: one row per endpoint; a service port's own columns on its
/// first row only.
pub fn render(status: &Status) -> String {
    let mut rows: Vec<[String; 9]> = Vec::new();
    for p in &status.service_ports {
        let vips: Vec<&str> = p
            .cluster_ips
            .iter()
            .chain(&p.external_ips)
            .chain(&p.load_balancer_ips)
            .map(String::as_str)
            .collect();
        let listeners: Vec<String> = p.listeners.iter().map(|l| format!("{} {}", l.role, l.addr)).collect();
        let port_cells = [
            p.name.clone(),
            format!("{}/{}", p.port, p.protocol),
            or_dash(vips.join(",")),
            p.proxy_port.map_or_else(|| "-".into(), |n| n.to_string()),
            or_dash(listeners.join(",")),
        ];
        if p.endpoints.is_empty() {
            let [a, b, c, d, e] = port_cells;
            rows.push([a, b, c, d, e, "(none)".into(), "-".into(), "-".into(), "-".into()]);
            continue;
        }
        for (i, ep) in p.endpoints.iter().enumerate() {
            let [a, b, c, d, e] = if i == 0 { port_cells.clone() } else { Default::default() };
            let h = ep.health.as_ref();
            rows.push([
                a,
                b,
                c,
                d,
                e,
                ep.addr.to_string(),
                ep.state().into(),
                h.map_or_else(|| "-".into(), |h| h.active.to_string()),
                h.map_or_else(|| "-".into(), |h| h.ejections_total.to_string()),
            ]);
        }
    }
    let header = [
        "SERVICE PORT",
        "PORT",
        "VIPS",
        "PROXY PORT",
        "LISTENERS",
        "ENDPOINT",
        "STATE",
        "ACTIVE",
        "EJECTIONS",
    ];
    let mut out = crate::text_table::render(header, &rows);
    out.push_str(&format!(
        "generation {}, {} service ports\n",
        status.generation,
        status.service_ports.len()
    ));
    out.push_str(
        "ACTIVE and EJECTIONS are per (protocol, endpoint), over every service port that has it; \
         EJECTIONS counts every ejection since the endpoint appeared, readmissions included\n",
    );
    out
}

fn or_dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}
