//! Policy routing for transparent mode: an endpoint's replies to a
//! client's address are handed to ringport's transparent socket instead of
//! being forwarded to the client (who never opened that connection).
//!
//! Three pieces, as for TPROXY:
//! - a rule in the prerouting hook that marks packets belonging to a
//!   transparent socket (nft `socket transparent 1`, iptables
//!   `-m socket --transparent`), written with the other rules of the
//!   backend (table `inet ringport`, chain `transparent`; iptables mangle
//!   `RINGPORT-TRANSPARENT`) whenever the snapshot has an endpoint that gets
//!   its client's address;
//! - `ip rule pref 27010 fwmark MARK/MARK lookup 27010`;
//! - `ip route local 0.0.0.0/0 dev lo table 27010` (and `::/0`): a marked
//!   packet is delivered locally, to the socket it belongs to.
//!
//! No socket mark is needed (or wanted: a socket marked like the replies
//! would send its own SYNs into the local table). Both families: the
//! rules and routes of IPv6 are the same (`ip -6`, `local ::/0`).
//!
//! Invariants: [`setup`] is idempotent (a restart finds its state and keeps
//! it); [`cleanup`] removes exactly the rule and table set up here, and
//! `ringport cleanup` calls it.

use std::fmt::Write;

use super::{RedirectError, command};

/// The routing table and the rule's priority (before `main`, 32766).
pub const ROUTE_TABLE: u32 = 27010;
pub const RULE_PREF: u32 = 27010;
/// The default `--transparent-mark`: clear of kube-proxy's 0x4000/0x8000,
/// Cilium's 0x0f00 and Calico's default 0xffff0000 mask.
pub const DEFAULT_MARK: u32 = 0x1000;

/// Why transparent mode cannot work here.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("the kernel refuses IP_TRANSPARENT (ringport needs CAP_NET_ADMIN or CAP_NET_RAW)")]
    Refused(#[source] std::io::Error),
    #[error("no redirect rules (--redirect none) to mark the replies with")]
    NoRules,
    #[error("cannot install the policy routing (ip rule / local route table {ROUTE_TABLE})")]
    Routing(#[source] RedirectError),
}

/// At start: with `--transparent`, set up, and record in `options`
/// whether it worked (logged either way, once); then keep the node's
/// routes current for [`SourcePlan`](crate::source_ip::SourcePlan).
/// Without it, or when setup fails, remove the routing state an earlier
/// `--transparent` run may have left (a stale rule would hand marked
/// packets to a table nobody uses).
pub fn start(options: &mut crate::source_ip::SourceOptions, rules: bool) {
    let result = if options.transparent { setup(options.mark, rules).map(Some) } else { Ok(None) };
    match result {
        Ok(Some(ipv6)) => {
            (options.ready, options.ready6) = (true, ipv6);
            tracing::info!(mark = %format_args!("{:#x}", options.mark), table = ROUTE_TABLE, ipv6, "transparent mode: endpoints on this node see the client's address");
            options.routes.store(std::sync::Arc::new(read_routes()));
            let routes = options.routes.clone();
            let spawned = std::thread::Builder::new().name("ringport-routes".into()).spawn(move || {
                loop {
                    std::thread::sleep(ROUTES_REREAD);
                    let now = read_routes();
                    if **routes.load() != now {
                        routes.store(std::sync::Arc::new(now));
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "transparent mode: cannot start the route reader; the node's routes are read once");
            }
            return;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "transparent mode cannot work here: every endpoint sees the node's address (ringport_source_ip_fallback_total{{reason=\"unavailable\"}})");
        }
    }
    match cleanup() {
        Ok(true) => tracing::info!(
            table = ROUTE_TABLE,
            "removed the transparent-mode ip rule and route table of an earlier run"
        ),
        Ok(false) => {}
        Err(e) => tracing::debug!(error = %e, "no transparent-mode routing state to check (no `ip`?)"),
    }
}

/// How often the node's addresses and connected routes are read again.
const ROUTES_REREAD: std::time::Duration = std::time::Duration::from_secs(10);

/// The node's addresses and the connected prefixes of its main tables
/// (an unreadable family has none: its clients are then not judged by
/// link, which is what they were before).
pub fn read_routes() -> crate::source_ip::NodeRoutes {
    let mut local: Vec<std::net::IpAddr> =
        if_addrs::get_if_addrs().unwrap_or_default().into_iter().map(|i| i.ip()).collect();
    local.sort();
    local.dedup();
    let links = FAMILIES
        .iter()
        .filter_map(|family| command::run("ip", &[family, "route", "show", "table", "main"], None).ok())
        .flat_map(|routes| crate::source_ip::NodeRoutes::parse_links(&routes))
        .collect();
    crate::source_ip::NodeRoutes { local, links }
}

/// The `ip` flags of both address families.
const FAMILIES: [&str; 2] = ["-4", "-6"];

/// Check that `IP_TRANSPARENT` is allowed and install the policy routing
/// for `mark`. `rules`: whether a backend will write the marking rule.
/// IPv4 must work; the result says whether IPv6 does too (a node with
/// IPv6 off has none: its IPv6 clients then fall back).
pub fn setup(mark: u32, rules: bool) -> Result<bool, SetupError> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(SetupError::Refused)?;
    probe.set_ip_transparent_v4(true).map_err(SetupError::Refused)?;
    if !rules {
        return Err(SetupError::NoRules);
    }
    routing("-4", "0.0.0.0/0", mark).map_err(SetupError::Routing)?;
    match routing("-6", "::/0", mark) {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!(error = %e, "transparent mode: no IPv6 policy routing here; IPv6 clients get the node's address");
            Ok(false)
        }
    }
}

fn routing(family: &str, everything: &str, mark: u32) -> Result<(), RedirectError> {
    let (pref, table) = (RULE_PREF.to_string(), ROUTE_TABLE.to_string());
    let fwmark = format!("{mark:#x}/{mark:#x}");
    let listed = command::run("ip", &[family, "rule", "show", "pref", &pref], None)?;
    let wanted = format!("fwmark {fwmark} lookup {table}");
    if !(listed.lines().count() == 1 && listed.contains(&wanted)) {
        remove_rules(family)?;
        let add = [family, "rule", "add", "pref", &pref, "fwmark", &fwmark, "lookup", &table];
        command::run("ip", &add, None)?;
    }
    let route = [family, "route", "replace", "local", everything, "dev", "lo", "table", &table];
    command::run("ip", &route, None).map(drop)
}

/// Delete every rule at [`RULE_PREF`] that looks up [`ROUTE_TABLE`];
/// whether there was one. Bounded, in case a delete removes nothing.
fn remove_rules(family: &str) -> Result<bool, RedirectError> {
    let (pref, table) = (RULE_PREF.to_string(), ROUTE_TABLE.to_string());
    let mut removed = false;
    for _ in 0..16 {
        let listed = command::run("ip", &[family, "rule", "show", "pref", &pref], None)?;
        if !listed.contains(&format!("lookup {table}")) {
            break;
        }
        command::run("ip", &[family, "rule", "del", "pref", &pref, "lookup", &table], None)?;
        removed = true;
    }
    Ok(removed)
}

/// Remove the rules and the route tables of both families; whether
/// anything was there. A family the node does not have has nothing.
pub fn cleanup() -> Result<bool, RedirectError> {
    let mut removed = false;
    for family in FAMILIES {
        let v6 = family == "-6";
        match remove_rules(family) {
            Ok(r) => removed |= r,
            Err(_) if v6 => continue,
            Err(e) => return Err(e),
        }
        let table = ROUTE_TABLE.to_string();
        let routes = match command::run("ip", &[family, "route", "show", "table", &table], None) {
            Ok(routes) => routes,
            Err(RedirectError::Failed { stderr, .. }) if stderr.contains("does not exist") => String::new(),
            Err(_) if v6 => String::new(),
            Err(e) => return Err(e),
        };
        if !routes.trim().is_empty() {
            command::run("ip", &[family, "route", "flush", "table", &table], None)?;
            removed = true;
        }
    }
    Ok(removed)
}

/// The nft chain marking packets of transparent sockets (inside table
/// `inet ringport`). `mangle` (-150) runs before the routing decision.
pub fn nft_chain(s: &mut String, mark: u32) {
    s.push_str("  chain transparent {\n    type filter hook prerouting priority mangle; policy accept;\n");
    let _ = writeln!(
        s,
        "    meta l4proto {{ tcp, udp, icmp, ipv6-icmp }} socket transparent 1 meta mark set meta mark or {mark:#x}"
    );
    s.push_str("  }\n");
}

/// The iptables chain's rules (mangle `RINGPORT-TRANSPARENT`, either
/// family). ICMP too: the socket match looks up an ICMP error's inner
/// header, so a refusal reaches the socket it is about.
pub fn iptables_rules(s: &mut String, chain: &str, mark: u32, v6: bool) {
    for p in ["tcp", "udp", if v6 { "ipv6-icmp" } else { "icmp" }] {
        let _ =
            writeln!(s, "-A {chain} -p {p} -m socket --transparent -j MARK --set-xmark {mark:#x}/{mark:#x}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_marking_rule_keeps_other_marks_and_matches_only_transparent_sockets() {
        let mut nft = String::new();
        super::nft_chain(&mut nft, 0x1000);
        assert!(nft.contains("meta l4proto { tcp, udp, icmp, ipv6-icmp } socket transparent 1 meta mark set meta mark or 0x1000"), "{nft}");
        assert!(nft.contains("hook prerouting priority mangle"), "{nft}");
        let mut ipt = String::new();
        super::iptables_rules(&mut ipt, "RINGPORT-TRANSPARENT", 0x1000, false);
        assert_eq!(
            ipt,
            "-A RINGPORT-TRANSPARENT -p tcp -m socket --transparent -j MARK --set-xmark 0x1000/0x1000\n\
             -A RINGPORT-TRANSPARENT -p udp -m socket --transparent -j MARK --set-xmark 0x1000/0x1000\n\
             -A RINGPORT-TRANSPARENT -p icmp -m socket --transparent -j MARK --set-xmark 0x1000/0x1000\n"
        );
    }
}
