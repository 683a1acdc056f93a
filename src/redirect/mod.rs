//! Redirect rules: send `ClusterIP:port` traffic (and that of non-local
//! externalIPs and LoadBalancer IPs) to the service port's proxy port.
//!
//! snapshot -> desired rules ([`rules`], pure) -> diff with what was last
//! applied -> one batch for the backend ([`nft`] or [`iptables`]), run by
//! the [`syncer`] on a thread of its own, so neither the data plane nor
//! the control loop ever waits on a rule tool.
//!
//! Intercepted traffic is DNATed to the *proxy address* of its family (by
//! default 169.254.99.1 and fd72:696e:6770::1 on `lo`, [`proxy_address`]),
//! the one address per family proxy ports listen on: unlike REDIRECT, DNAT needs no address on the interface a
//! packet came in on, so address-less (Calico/Cilium-style) pod veths work,
//! and the proxy ports are reachable by nothing the rules did not send
//! there. docs/redirect.md gives the measurements behind the choice.
//!
//! Invariants:
//! - ringport only ever touches its own table (`inet ringport`), its own
//!   chains (`RINGPORT-*`, and one jump to each), its IPv4 proxy address
//!   and IPv6 proxy route on `lo`, and conntrack entries of its own UDP
//!   service keys.
//! - Every sync is one process per table or family, never one per rule:
//!   every add and delete of a sync in one batch (one nf_tables
//!   transaction with nft; with iptables-restore, one per table written).
//! - A service port with no usable endpoints needs no special rule for
//!   TCP: its proxy port stays bound but stops listening, so the kernel
//!   answers a redirected SYN with RST at once.

pub mod command;
pub mod conntrack;
pub mod desired;
pub mod genid;
pub mod handles;
pub mod iptables;
pub mod nft;
pub mod rules;
pub mod syncer;
pub mod transparent;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::ExitStatus;

pub use syncer::{RESYNC, Syncer, SyncerThread};

use rules::{Diff, RuleKey, RuleSet};

impl Intercept {
    /// The address DNAT sends keys of this family to, if any (else they
    /// are REDIRECTed).
    pub fn dnat_to(self, v6: bool) -> Option<IpAddr> {
        match (self, v6) {
            (Intercept::ProxyAddress { v4, .. } | Intercept::Dnat(v4), false) => Some(v4.into()),
            (Intercept::ProxyAddress { v6: Some(a), .. }, true) => Some(a.into()),
            _ => None,
        }
    }

    /// The proxy address of this family the input guard protects, if any.
    pub fn guarded(self, v6: bool) -> Option<IpAddr> {
        match self {
            Intercept::ProxyAddress { .. } => self.dnat_to(v6),
            Intercept::Dnat(_) | Intercept::Redirect => None,
        }
    }
}

/// The default proxy address: link-local, so no network routes it, and
/// clear of 169.254.169.254 (cloud metadata) and 169.254.20.10
/// (NodeLocal DNSCache).
pub const DEFAULT_PROXY_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 99, 1);

/// The default IPv6 proxy address: a unique-local /128 (`fd` + "ringp" in
/// ASCII), clear of `fd00::/16`, where many clusters put their own
/// service and pod ranges (kind uses `fd00:10:96::/112`).
pub const DEFAULT_PROXY_ADDRESS6: Ipv6Addr = Ipv6Addr::new(0xfd72, 0x696e, 0x6770, 0, 0, 0, 0, 1);

/// How intercepted traffic reaches the proxy ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intercept {
    /// `dnat to ADDR:proxyPort` to ringport's own proxy address of the
    /// key's family on `lo`, with proxy ports listening on it alone; an
    /// input rule drops whatever reaches it from another interface without
    /// having been DNATed. Without an IPv6 one (IPv6 is off on this node),
    /// IPv6 keys are REDIRECTed.
    ProxyAddress { v4: Ipv4Addr, v6: Option<Ipv6Addr> },
    /// IPv4: `dnat to ADDR:proxyPort` to a `--bind-address` the operator
    /// chose. It is not ringport's, so it gets no guard.
    Dnat(Ipv4Addr),
    /// `redirect to :proxyPort`: to the address of the incoming interface,
    /// which an address-less pod veth does not have. Kept for an IPv6
    /// `--bind-address` and for comparison.
    Redirect,
}

/// `--redirect`: which rules program the redirects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RedirectMode {
    /// nft when `nft list tables` works, else iptables, else none.
    Auto,
    Nft,
    Iptables,
    /// No rules (the edge proxy, or tests): only proxy ports, node ports and
    /// local addresses are served.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot make the proxy address {addr} local on lo")]
    ProxyAddress {
        addr: IpAddr,
        #[source]
        source: Box<RedirectError>,
    },
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program} {args}` failed ({status}): {stderr}")]
    Failed { program: String, args: String, status: ExitStatus, stderr: String },
    #[error("{what} are still there after cleanup (see `{program}`)")]
    Leftover { program: String, what: &'static str },
    #[error("--redirect {mode}: {program} does not work here")]
    Unavailable { mode: &'static str, program: &'static str },
}

/// A way of programming the rules.
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    /// Make ringport's rules exactly `rules`, whatever was there before (a
    /// stale run's state included).
    fn replace(&mut self, rules: &RuleSet) -> Result<(), RedirectError>;
    /// Apply `diff` to the rules last applied; `rules` is the result.
    fn update(&mut self, diff: &Diff, rules: &RuleSet) -> Result<(), RedirectError>;
    /// Delete the conntrack entries of these UDP keys, so a long-lived
    /// client (same source port) is NATed afresh to the key's new fate.
    fn forget_udp(&mut self, keys: &[RuleKey]) {
        conntrack::forget_udp(keys);
    }
    /// A number that changes whenever anyone changes the rules this
    /// backend writes, and by exactly [`Backend::transactions`] for each
    /// write of its own (nftables' ruleset generation id, per namespace:
    /// anyone's write moves it): `None` when there is none, and the
    /// periodic resync then rewrites everything.
    fn generation(&self) -> Option<u32> {
        None
    }
    /// The handles of every object of this backend's own table (see
    /// [`handles`]): equal to those read after our last whole rewrite
    /// when nobody added, deleted or flushed anything in it since.
    /// `None` when the backend has no table of its own (iptables' chains
    /// live in shared tables) or it cannot be read: the periodic resync
    /// then trusts the generation id alone.
    fn own_handles(&self) -> Option<Vec<(u16, u64)>> {
        None
    }
    /// How many transactions (generations) writing `diff` commits, or
    /// rewriting everything when `None`.
    fn transactions(&self, diff: Option<&Diff>) -> u32 {
        diff.map_or(1, |d| u32::from(!d.is_empty()))
    }
    /// What this backend's own table or chains hold now, a previous run's
    /// rules (after a crash, `kill -9`): `None` when there are none or
    /// they cannot be read.
    fn read_back(&self) -> Option<ReadBack> {
        None
    }
}

/// A previous run's rules, read back at start.
#[derive(Clone, Debug, Default)]
pub struct ReadBack {
    /// Every redirect: the proxy ports the rules send traffic to, which
    /// the Binder binds again so rules and ports agree from the start.
    pub redirects: rules::Rules,
    /// The whole rule set, when the backend reads all of it back (nft): the
    /// first sync is then a difference, and leaves what is unchanged as it
    /// is (service names, unknown to the rules, are taken as equal).
    pub whole: Option<RuleSet>,
}

/// `--redirect none`.
pub struct NoRules;

impl Backend for NoRules {
    fn name(&self) -> &'static str {
        "none"
    }

    fn replace(&mut self, _rules: &RuleSet) -> Result<(), RedirectError> {
        Ok(())
    }

    fn update(&mut self, _diff: &Diff, _rules: &RuleSet) -> Result<(), RedirectError> {
        Ok(())
    }

    fn forget_udp(&mut self, _keys: &[RuleKey]) {}

    /// Nothing is written, so nothing can be touched: a periodic resync
    /// is a verify.
    fn generation(&self) -> Option<u32> {
        Some(0)
    }

    fn transactions(&self, _diff: Option<&Diff>) -> u32 {
        0
    }
}

/// The backend `mode` asks for; `auto` falls back to iptables, then to
/// no rules with a warning.
pub fn backend(mode: RedirectMode, to: Intercept) -> Result<Box<dyn Backend>, RedirectError> {
    match mode {
        RedirectMode::None => Ok(Box::new(NoRules)),
        RedirectMode::Nft if nft::Nft::available() => Ok(Box::new(nft::Nft { to })),
        RedirectMode::Nft => Err(RedirectError::Unavailable { mode: "nft", program: "nft list tables" }),
        RedirectMode::Iptables if iptables::Iptables::available() => Ok(Box::new(iptables::Iptables { to })),
        RedirectMode::Iptables => {
            Err(RedirectError::Unavailable { mode: "iptables", program: "iptables -t nat -S" })
        }
        RedirectMode::Auto if nft::Nft::available() => Ok(Box::new(nft::Nft { to })),
        RedirectMode::Auto if iptables::Iptables::available() => Ok(Box::new(iptables::Iptables { to })),
        RedirectMode::Auto => {
            tracing::warn!(
                "--redirect auto: neither nft nor iptables works here; no redirect rules, so cluster IPs are not served"
            );
            Ok(Box::new(NoRules))
        }
    }
}

/// Remove the state of the backends other than `keep` (a previous run may
/// have used another one); `keep` replaces its own state on its first sync.
pub fn remove_stale(keep: &str) -> Result<(), RedirectError> {
    if keep != "nft" && nft::cleanup()? {
        tracing::info!("removed a stale nft table inet ringport");
    }
    if keep != "iptables" && iptables::cleanup()? {
        tracing::info!("removed stale RINGPORT-* iptables chains");
    }
    Ok(())
}

/// The label ringport gives the proxy address on `lo`, so `cleanup` removes
/// exactly the addresses it added (whatever `--proxy-address` was), and
/// never one an administrator put there.
pub const PROXY_ADDRESS_LABEL: &str = "lo:ringport";

/// The routing protocol number ringport's IPv6 proxy route carries
/// (`proto 114`, ASCII `r`, unassigned in iproute2's `rt_protos`): the mark
/// by which `cleanup` finds exactly the routes it added.
pub const PROXY_ROUTE_PROTO: &str = "114";

/// Make the proxy address local to this node, where proxy ports can bind it,
/// marked as ringport's so that `cleanup` removes exactly what it added:
/// - IPv4: a /32 on `lo` labelled [`PROXY_ADDRESS_LABEL`], `scope host`,
///   which keeps the kernel from choosing it as the source of connections
///   to other hosts (a pod behind an address-less veth would otherwise be
///   dialled from it, and its replies dropped by the input guard);
/// - IPv6 has neither labels nor a host scope for an address, and a
///   deprecated one is still chosen as a source where it beats the others
///   on scope (RFC 6724 rule 2 before rule 3: a node whose uplink has only
///   a link-local address). So no address at all: a `local` /128 route on
///   `lo`, `proto` [`PROXY_ROUTE_PROTO`], delivers what the rules DNAT to
///   it, source address selection never sees it, and the proxy ports bind
///   it with `IPV6_FREEBIND`.
///
/// Idempotent: a restart finds it there. An address (or local route)
/// someone else put there is used as it is, and left to them.
pub fn proxy_address(addr: IpAddr) -> Result<(), RedirectError> {
    let error = |e| RedirectError::ProxyAddress { addr, source: Box::new(e) };
    if addr.is_ipv6() {
        let cidr = format!("{addr}/128");
        let local = ["-6", "route", "show", "table", "local", "exact", &cidr];
        let present = command::run("ip", &local, None).map_err(error)?;
        let ours =
            command::run("ip", &[&local[..], &["proto", PROXY_ROUTE_PROTO]].concat(), None).map_err(error)?;
        if !present.trim().is_empty() && ours.trim().is_empty() {
            tracing::info!(%addr, "the IPv6 proxy address is already local, not made so by ringport: using it as it is");
            return Ok(());
        }
        let add = [
            "-6",
            "route",
            "replace",
            "local",
            &cidr,
            "dev",
            "lo",
            "table",
            "local",
            "proto",
            PROXY_ROUTE_PROTO,
        ];
        return command::run("ip", &add, None).map(drop).map_err(error);
    }
    let cidr = format!("{addr}/32");
    let present =
        command::run("ip", &["-o", "-4", "addr", "show", "dev", "lo", "to", &cidr], None).map_err(error)?;
    if !present.trim().is_empty() && !present.contains(PROXY_ADDRESS_LABEL) {
        tracing::info!(%addr, "the proxy address is already on lo, not added by ringport: using it as it is");
        return Ok(());
    }
    let args = ["addr", "replace", &cidr, "dev", "lo", "scope", "host", "label", PROXY_ADDRESS_LABEL];
    command::run("ip", &args, None).map(drop).map_err(error)
}

/// What `ringport cleanup` removed, and what it could not.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub nft_table: bool,
    pub iptables_chains: bool,
    /// The IPv4 proxy addresses ringport had added to `lo`.
    pub proxy_addresses: Vec<IpAddr>,
    /// The IPv6 proxy addresses whose local route ringport had added.
    pub proxy_routes: Vec<IpAddr>,
    /// Transparent mode's `ip rule` and local route table.
    pub transparent_routing: bool,
    /// Every step that failed; the others still ran.
    pub errors: Vec<RedirectError>,
}

impl Cleaned {
    pub fn is_empty(&self) -> bool {
        !self.nft_table
            && !self.iptables_chains
            && self.proxy_addresses.is_empty()
            && self.proxy_routes.is_empty()
            && !self.transparent_routing
    }
}

/// Remove every rule, chain and table ringport made, with either backend,
/// in both families, then every address and route ringport added (the
/// IPv4 addresses labelled [`PROXY_ADDRESS_LABEL`] and the IPv6 routes of
/// `proto` [`PROXY_ROUTE_PROTO`], whatever `--proxy-address[6]` was), and
/// transparent mode's policy routing. Rules go first, so none is left
/// sending traffic to an address that is gone; each step runs whatever the
/// others did, and its failure is collected.
/// Nothing to remove is a success.
pub fn cleanup() -> Cleaned {
    let mut cleaned = Cleaned::default();
    match nft::cleanup() {
        Ok(removed) => cleaned.nft_table = removed,
        Err(e) => cleaned.errors.push(e),
    }
    match iptables::cleanup() {
        Ok(removed) => cleaned.iptables_chains = removed,
        Err(e) => cleaned.errors.push(e),
    }
    let labelled = ["-o", "-4", "addr", "show", "dev", "lo", "label", PROXY_ADDRESS_LABEL];
    match command::run("ip", &labelled, None) {
        Ok(listed) => {
            for addr in labelled_addresses(&listed) {
                match command::run("ip", &["addr", "del", &format!("{addr}/32"), "dev", "lo"], None) {
                    Ok(_) => cleaned.proxy_addresses.push(addr),
                    Err(e) => cleaned.errors.push(e),
                }
            }
        }
        Err(e) => cleaned.errors.push(e),
    }
    // A node without IPv6 has no IPv6 route to remove.
    let ours = ["-6", "route", "show", "table", "local", "proto", PROXY_ROUTE_PROTO];
    for addr in local_routes(&command::run("ip", &ours, None).unwrap_or_default()) {
        let cidr = format!("{addr}/128");
        let del =
            ["-6", "route", "del", "local", &cidr, "dev", "lo", "table", "local", "proto", PROXY_ROUTE_PROTO];
        match command::run("ip", &del, None) {
            Ok(_) => cleaned.proxy_routes.push(addr),
            Err(e) => cleaned.errors.push(e),
        }
    }
    match transparent::cleanup() {
        Ok(removed) => cleaned.transparent_routing = removed,
        Err(e) => cleaned.errors.push(e),
    }
    cleaned
}

/// The addresses of `ip -o addr show` lines
/// (`1: lo    inet 169.254.99.1/32 scope host lo:ringport ...`, or `inet6`).
fn labelled_addresses(listing: &str) -> Vec<IpAddr> {
    listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// The destinations of `ip -6 route show table local` lines
/// (`local fd72:696e:6770::1 dev lo proto 114 metric 1024 pref medium`).
fn local_routes(listing: &str) -> Vec<IpAddr> {
    listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "local").then_some(())?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn cleanup_reads_the_addresses_of_ip_o_addr_show() {
        let listing = "1: lo    inet 169.254.99.2/32 scope host lo:ringport\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(super::labelled_addresses(listing), [std::net::IpAddr::from([169, 254, 99, 2])]);
        assert!(super::labelled_addresses("").is_empty());
    }

    #[test]
    fn cleanup_reads_the_local_routes_of_ip_route_show() {
        let listing = "local fd72:696e:6770::1 dev lo proto 114 metric 1024 pref medium\n";
        assert_eq!(super::local_routes(listing), [std::net::IpAddr::from(super::DEFAULT_PROXY_ADDRESS6)]);
        assert!(super::local_routes("").is_empty());
    }
}
