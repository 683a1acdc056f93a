//! The admin endpoints, on kube-proxy's conventions: `/healthz` and
//! `/livez` on the health address, `/readyz` and `/debug/snapshot` on the
//! metrics address. Read-only views of the current snapshot; nothing here
//! changes what is served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;

use crate::metrics::Metrics;
use crate::redirect::rules;
use crate::snapshot::SharedSnapshot;

#[derive(Clone)]
pub struct AdminState {
    pub snapshot: SharedSnapshot,
    /// True once the sources have synced and a snapshot is published.
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// With redirect rules: how long the rule sync may go without a success
    /// before `/healthz` fails (`None`: no rules, always healthy).
    pub sync_stall: Option<std::time::Duration>,
    pub started: std::time::Instant,
}

async fn ok() -> &'static str {
    "ok\n"
}

async fn healthz(State(s): State<AdminState>) -> impl IntoResponse {
    let Some(limit) = s.sync_stall else { return (StatusCode::OK, "ok\n") };
    let since = s.metrics.sync.since_last_success().unwrap_or_else(|| s.started.elapsed());
    if since <= limit {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "redirect rules have not synced for over twice the sync period\n")
    }
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Acquire) {
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
        .iter()
        .map(|(key, target)| RuleView {
            protocol: key.protocol.to_string(),
            daddr: key.daddr.0,
            dport: key.dport,
            proxy_port: target.proxy_port.0,
            service_port: target.service.to_string(),
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

/// Bind both admin addresses and serve them on the current tokio runtime.
/// When the two addresses are the same, one listener serves every route.
pub async fn serve(state: AdminState, health: SocketAddr, metrics: SocketAddr) -> Result<(), AdminError> {
    let bind = |what, addr| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|source| AdminError { what, addr, source })
    };
    let spawn = |listener: tokio::net::TcpListener, router: Router| {
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "admin server stopped");
            }
        })
    };
    if health == metrics {
        let listener = bind("health and metrics", health).await?;
        spawn(listener, health_routes().merge(metrics_routes()).with_state(state));
        return Ok(());
    }
    let h = bind("health", health).await?;
    let m = bind("metrics", metrics).await?;
    spawn(h, health_routes().with_state(state.clone()));
    spawn(m, metrics_routes().with_state(state));
    Ok(())
}
