//! `ringport check`: validate manifests and show the service-port table
//! they would produce, without binding anything.
//!
//! The checks are those `run` applies to a reload, in the same code: load
//! and validate, join, the fd budget (against this process's limit and the
//! given `--workers`) and endpoint loops (as far as they can be known
//! without binding, see `loops`). Nothing here may panic on any input: the
//! fuzz test in `tests/config_fuzz.rs` feeds it arbitrary bytes.

use std::net::IpAddr;
use std::path::Path;

use crate::budget::Budget;
use crate::config::{self, ConfigErrors, Manifests};
use crate::listen::{self, ListenOptions, ListenRole, NodeView};
use crate::loops;
use crate::model::{Endpoint, ServicePort};

/// What `ringport check` found.
#[derive(Debug, Default)]
pub struct Report {
    /// One line each; non-fatal.
    pub warnings: Vec<String>,
    /// One line each; any makes the check fail.
    pub errors: Vec<String>,
    /// The service-port table, when there are no errors.
    pub table: String,
    pub service_ports: usize,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Check the manifests at `path` (a file or a directory).
pub fn check_path(path: &Path, opts: &ListenOptions, budget: &Budget) -> Report {
    judge(config::load_path(path), opts, budget)
}

/// Check one file's text; `file` names it (and `.json` selects JSON).
pub fn check_text(text: &str, file: &str, opts: &ListenOptions, budget: &Budget) -> Report {
    judge(config::parse_str(text, file), opts, budget)
}

fn judge(loaded: Result<Manifests, ConfigErrors>, opts: &ListenOptions, budget: &Budget) -> Report {
    let manifests = match loaded {
        Ok(m) => m,
        Err(errors) => {
            return Report { errors: errors.iter().map(ToString::to_string).collect(), ..Report::default() };
        }
    };
    let mut report = Report {
        warnings: manifests.warnings.iter().map(ToString::to_string).collect(),
        ..Report::default()
    };
    let joined = config::join_with_warnings(&manifests.services, &manifests.slices);
    report.warnings.extend(joined.warnings.iter().map(ToString::to_string));
    report.errors.extend(joined.errors.iter().map(ToString::to_string));
    let ports = joined.ports;
    // One view of the node for every check, as for one update of `run`.
    let node = NodeView::now(opts);
    if let Err(e) = budget.check(&ports, opts, &node) {
        report.errors.push(format!("the configuration: {e}"));
    }
    let own = loops::planned(&ports, opts, &node);
    report.errors.extend(loops::find(&ports, &own, &node.local).iter().map(ToString::to_string));
    if report.ok() {
        report.table = render(&ports, opts, &node);
        report.service_ports = ports.len();
    }
    report
}

/// The table `ringport check` prints: one row per service port, with where
/// it would listen on `node` and every endpoint with its conditions.
pub fn render(ports: &[ServicePort], opts: &ListenOptions, node: &NodeView) -> String {
    let rows: Vec<[String; 5]> = ports
        .iter()
        .map(|sp| {
            [
                sp.name.to_string(),
                sp.protocol.to_string(),
                sp.port.to_string(),
                listens(sp, opts, node),
                endpoints(&sp.endpoints),
            ]
        })
        .collect();
    crate::text_table::render(["SERVICE PORT", "PROTO", "PORT", "LISTENS", "ENDPOINTS"], &rows)
}

fn listens(sp: &ServicePort, opts: &ListenOptions, node: &NodeView) -> String {
    let at = |ip: IpAddr| {
        let ip = if ip.is_ipv6() { format!("[{ip}]") } else { ip.to_string() };
        match &opts.proxy_port_range {
            Some(r) => format!("{ip}:{}-{}", r.start(), r.end()),
            None => format!("{ip}:<auto>"),
        }
    };
    let proxy = at(opts.bind_address);
    let proxy6 = opts.bind_address6.map(at).unwrap_or_default();
    let shared = listen::shared_plan(opts).into_iter().filter(|_| sp.protocol == crate::model::Protocol::Tcp);
    let shared = shared.map(|(role, ip)| format!("{role} (shared) {}", at(ip)));
    let own = listen::plan_port(sp, opts, node).into_iter().map(|(role, ip, port)| match role {
        ListenRole::Proxy => format!("proxy {proxy}"),
        ListenRole::ExternalProxy => format!("externalProxy {proxy}"),
        ListenRole::Proxy6 => format!("proxy6 {proxy6}"),
        ListenRole::ExternalProxy6 => format!("externalProxy6 {proxy6}"),
        _ => format!("{role} {}", std::net::SocketAddr::new(ip, port)),
    });
    shared.chain(own).collect::<Vec<_>>().join(", ")
}

fn endpoints(eps: &[Endpoint]) -> String {
    if eps.is_empty() {
        return "(none)".into();
    }
    eps.iter()
        .map(|e| {
            let c = e.conditions;
            let mut states = Vec::new();
            if c.ready {
                states.push("ready");
            }
            if c.serving {
                states.push("serving");
            }
            if c.terminating {
                states.push("terminating");
            }
            if states.is_empty() {
                states.push("not-ready");
            }
            format!("{} ({})", e.addr, states.join(","))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
