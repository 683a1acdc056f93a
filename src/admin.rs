//! The admin endpoints, on kube-proxy's conventions: `/healthz` and
//! `/livez` on the health address, `/readyz` and `/debug/snapshot` on the
//! metrics address. Read-only views of the current snapshot; nothing here
//! changes what is served.
//!
//! `/healthz` answers as kube-proxy's does: a JSON body with
//! `lastUpdated`, `currentTime` and `nodeEligible`, and 503 when the rule
//! sync has stalled or a data-plane worker failed ([`ProxyHealth`]), or
//! the Node is not eligible (being
//! deleted, or tainted `ToBeDeletedByClusterAutoscaler`; see
//! `source::kube::NodeView`). `/livez` ignores the Node, as kube-proxy's.
//!
//! The admin ports face the network (the health port binds `0.0.0.0` by
//! default), so they must never take what the data plane needs:
//! - each server has its own [`accept::Gate`]: a bounded number of
//!   connections, a cap per outside source, and permits kept for the node
//!   itself, so kubelet's probes never wait behind outside clients; beyond
//!   that, clients wait in the kernel's accept queue, holding no fd of ours
//!   ([`MAX_CONNECTIONS`] bounds all servers together; the fd budget
//!   reserves exactly this many);
//! - a request's headers must arrive within [`HEADER_READ_TIMEOUT`], which
//!   also bounds an idle keep-alive connection, so slowloris clients are
//!   cut; and no connection lives past [`CONNECTION_LIFETIME`], whatever it
//!   does (e.g. never reading its response);
//! - a failed accept (out of fds) backs off instead of spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

pub mod accept;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;

use crate::dataplane::Faults;
use crate::handover::HandedAdmin;
use crate::metrics::Metrics;
use crate::redirect::rules;
use crate::snapshot::SharedSnapshot;

#[derive(Clone)]
pub struct AdminState {
    pub snapshot: SharedSnapshot,
    /// True once the sources have synced and a snapshot is published.
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub health: ProxyHealth,
    /// kube-proxy's `nodeEligible`: true until the Node watch says
    /// otherwise (and always without one).
    pub node_eligible: Arc<AtomicBool>,
    /// True while a successor holds our sockets, until it confirms or goes
    /// away: /readyz answers 503, so a probe sees the old instance leaving.
    pub handing_over: Arc<AtomicBool>,
}

/// Whether the proxy itself is healthy, kube-proxy's `IsHealthy`: the
/// redirect rules have synced within the allowed stall, and no data-plane
/// worker has failed. Shared by
/// `/healthz` and the `healthCheckNodePort` servers
/// (`serviceProxyHealthy`).
#[derive(Clone)]
pub struct ProxyHealth {
    pub metrics: Arc<Metrics>,
    /// With redirect rules: how long the rule sync may go without a success
    /// before the proxy is unhealthy (`None`: no rules, always healthy).
    pub sync_stall: Option<Duration>,
    pub started: Instant,
    /// Data-plane workers that failed: any makes the proxy unhealthy.
    pub faults: Arc<Faults>,
}

impl ProxyHealth {
    /// Healthy or not, and when the rules last synced (`None`: never, or
    /// no rules).
    pub fn check(&self) -> (bool, Option<SystemTime>) {
        let workers_ok = self.faults.count() == 0;
        let Some(limit) = self.sync_stall else { return (workers_ok, None) };
        let since = self.metrics.sync.since_last_success();
        let last = since.and_then(|d| SystemTime::now().checked_sub(d));
        (workers_ok && since.unwrap_or_else(|| self.started.elapsed()) <= limit, last)
    }
}

/// A time as Go's `time.Time.String()` prints it in UTC (what kube-proxy's
/// `%q` gives, less the monotonic-clock suffix); the zero time when `None`.
pub fn go_time(t: Option<SystemTime>) -> String {
    let ts = t.and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok());
    match ts {
        Some(ts) => ts.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string(),
        None => "0001-01-01 00:00:00 +0000 UTC".to_owned(),
    }
}

/// kube-proxy's JSON headers.
const JSON_HEADERS: [(&str, &str); 2] =
    [("content-type", "application/json"), ("x-content-type-options", "nosniff")];

/// The most connections open at once over every HTTP server ringport runs:
/// the health server, the metrics server and all `healthCheckNodePort`
/// servers together, each with its own [`accept::Gate`]. The fd budget
/// reserves this many fds for them.
pub const MAX_CONNECTIONS: usize = 3 * accept::GATE_CONNECTIONS;
/// A request's headers must be complete this soon after the connection
/// opens or the previous response ends (kubelet probes and Prometheus
/// scrapes send theirs at once).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// No admin connection lives longer than this.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

const HTTP: accept::Http = accept::Http {
    header_timeout: HEADER_READ_TIMEOUT,
    lifetime: CONNECTION_LIFETIME,
    keep_alive: true,
    title_case_headers: false,
};

async fn ok() -> &'static str {
    "ok\n"
}

async fn healthz(State(s): State<AdminState>) -> impl IntoResponse {
    let (healthy, last_updated) = s.health.check();
    let eligible = s.node_eligible.load(Ordering::Acquire);
    let now = SystemTime::now();
    // As kube-proxy: a healthy answer reports lastUpdated as now.
    let (status, last_updated) = if healthy && eligible {
        (StatusCode::OK, Some(now))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, last_updated)
    };
    let body = format!(
        "{{\"lastUpdated\": {:?},\"currentTime\": {:?}, \"nodeEligible\": {eligible}}}",
        go_time(last_updated),
        go_time(Some(now))
    );
    (status, JSON_HEADERS, body)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.handing_over.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "handing over\n")
    } else if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n")
    }
}

/// The served state, plus the redirect rules it asks for (what the
/// syncer programs unless `--redirect none`).
async fn snapshot(State(s): State<AdminState>) -> impl IntoResponse {
    let snapshot = s.snapshot.load_full();
    let desired = rules::from_snapshot(&snapshot, &rules::Locality::from_interfaces());
    let rules: Vec<RuleView> = desired
        .rules
        .redirects
        .iter()
        .map(|(key, target)| RuleView {
            protocol: key.protocol.to_string(),
            daddr: key.daddr.0,
            dport: key.dport,
            proxy_port: target.proxy_port.0,
            service_port: target.name().to_string(),
        })
        .collect();
    Json(SnapshotWithRules { snapshot: snapshot.view(), redirect_rules: rules })
}

#[derive(serde::Serialize)]
struct SnapshotWithRules {
    #[serde(flatten)]
    snapshot: crate::snapshot::SnapshotView,
    redirect_rules: Vec<RuleView>,
}

#[derive(serde::Serialize)]
struct RuleView {
    protocol: String,
    daddr: std::net::IpAddr,
    dport: u16,
    proxy_port: u16,
    service_port: String,
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &s.metrics.registry()) {
        Ok(()) => (
            StatusCode::OK,
            [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            text,
        ),
        Err(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, [("content-type", "text/plain")], "encoding failed\n".into())
        }
    }
}

fn health_routes() -> Router<AdminState> {
    Router::new().route("/healthz", get(healthz)).route("/livez", get(ok))
}

fn metrics_routes() -> Router<AdminState> {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/snapshot", get(snapshot))
}

#[derive(Debug, thiserror::Error)]
#[error("cannot serve {what} on {addr}")]
pub struct AdminError {
    what: &'static str,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// The admin servers running: their accept loops, and a copy of each
/// listening socket for a handover.
#[derive(Default)]
pub struct AdminServers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sockets: Vec<HandedAdmin>,
}

impl AdminServers {
    /// Copies of the listening sockets, to hand to a successor.
    pub fn sockets(&self) -> Vec<HandedAdmin> {
        self.sockets
            .iter()
            .filter_map(|a| {
                let socket = a.socket.try_clone().ok()?;
                Some(HandedAdmin { name: a.name.clone(), addr: a.addr, socket })
            })
            .collect()
    }

    /// Stop accepting (a successor serves these sockets now); connections
    /// already accepted finish on their own.
    pub fn stop_accepting(&mut self) {
        self.tasks.drain(..).for_each(|t| t.abort());
        self.sockets.clear();
    }
}

/// Bind both admin addresses (or serve the sockets a predecessor handed
/// over for them, `adopted`) and serve them on the current tokio runtime,
/// each with its own [`accept::Gate`]. When the two addresses are the same,
/// one listener serves every route.
pub async fn serve(
    state: AdminState,
    health: SocketAddr,
    metrics: SocketAddr,
    mut adopted: Vec<HandedAdmin>,
) -> Result<AdminServers, AdminError> {
    let mut servers = AdminServers::default();
    let mut bind = async |what: &'static str, addr: SocketAddr| {
        let err = |source| AdminError { what, addr, source };
        let listener = match adopted.iter().position(|a| a.name == what && a.addr == addr) {
            Some(i) => {
                let std = std::net::TcpListener::from(adopted.swap_remove(i).socket);
                std.set_nonblocking(true).map_err(err)?;
                tokio::net::TcpListener::from_std(std).map_err(err)?
            }
            None => tokio::net::TcpListener::bind(addr).await.map_err(err)?,
        };
        let socket = std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned().map_err(err)?;
        Ok::<_, AdminError>((listener, HandedAdmin { name: what.into(), addr, socket }))
    };
    let mut spawn =
        |(listener, handed): (tokio::net::TcpListener, HandedAdmin), router: Router, name: &'static str| {
            servers.tasks.push(tokio::spawn(accept::serve(listener, router, accept::Gate::new(name), HTTP)));
            servers.sockets.push(handed);
        };
    if health == metrics {
        let listener = bind("health and metrics", health).await?;
        spawn(listener, health_routes().merge(metrics_routes()).with_state(state), "admin");
        return Ok(servers);
    }
    let h = bind("health", health).await?;
    let m = bind("metrics", metrics).await?;
    spawn(h, health_routes().with_state(state.clone()), "health");
    spawn(m, metrics_routes().with_state(state), "metrics");
    Ok(servers)
}
