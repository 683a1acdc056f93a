//! Deleting stale conntrack entries of UDP service keys, with the care
//! kube-proxy takes: only UDP (a TCP connection holds no NAT that outlives
//! its proxy port: a dead one is refused and the client reconnects), and
//! only the `(VIP, port)` whose fate changed. A long-lived UDP client that
//! keeps its source port would otherwise stay pinned by its entry to a
//! proxy port that is gone (a restart, a changed proxy port), or stay
//! un-NATed after its rejected VIP got endpoints again.
//!
//! Uses the `conntrack` tool (Debian package `conntrack`). A change of a
//! key or two runs one `conntrack -D` per key; more keys at once (a start,
//! after a failed sync) first list the UDP entries once per family and
//! delete only the keys that have entries, so a node with 10k UDP Services
//! runs a few processes, not 10k. Without the tool (the program not found),
//! a warning is logged once and entries expire on their own (30 s for UDP
//! by default); any other failure is logged and tried at the next change.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use super::RedirectError;
use super::command;
use super::rules::RuleKey;

pub const CONNTRACK: &str = "conntrack";

/// Up to this many keys are deleted one process each, without a listing.
const DIRECT: usize = 2;

static MISSING_WARNED: AtomicBool = AtomicBool::new(false);

/// Delete the entries whose original destination is one of `keys` (UDP
/// keys only; others are skipped). Failures are logged, never fatal.
pub fn forget_udp(keys: &[RuleKey]) {
    for v6 in [false, true] {
        let keys: Vec<&RuleKey> = keys.iter().filter(|k| k.is_udp() && k.is_ipv6() == v6).collect();
        let keys = if keys.len() <= DIRECT {
            keys
        } else {
            match list(v6) {
                Ok(live) => keys.into_iter().filter(|k| live.contains(&(k.daddr.0, k.dport))).collect(),
                Err(e) => return report(&e, None),
            }
        };
        for key in keys {
            match delete(key) {
                Ok(n) if n > 0 => {
                    tracing::info!(vip = %key.daddr.0, port = key.dport, entries = n, "deleted stale UDP conntrack entries")
                }
                Ok(_) => {}
                Err(e) if missing(&e) => return report(&e, Some(key)),
                Err(e) => report(&e, Some(key)),
            }
        }
    }
}

/// Whether `e` says the tool is not installed.
fn missing(e: &RedirectError) -> bool {
    matches!(e, RedirectError::Spawn { source, .. } if source.kind() == ErrorKind::NotFound)
}

fn report(e: &RedirectError, key: Option<&RuleKey>) {
    if missing(e) {
        if !MISSING_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!("no `conntrack` tool: stale UDP conntrack entries are left to expire");
        }
        return;
    }
    match key {
        Some(key) => {
            tracing::warn!(vip = %key.daddr.0, port = key.dport, error = %e, "cannot delete UDP conntrack entries")
        }
        None => tracing::warn!(error = %e, "cannot list UDP conntrack entries"),
    }
}

/// The original `(destination, port)` of every UDP entry of one family.
fn list(v6: bool) -> Result<BTreeSet<(IpAddr, u16)>, RedirectError> {
    let family = if v6 { "ipv6" } else { "ipv4" };
    match command::run(CONNTRACK, &["-L", "-f", family, "-p", "udp"], None) {
        Ok(out) => Ok(original_destinations(&out)),
        Err(RedirectError::Failed { stderr, .. }) if stderr.contains(" 0 flow entries") => {
            Ok(BTreeSet::new())
        }
        Err(e) => Err(e),
    }
}

/// The original-direction `dst=` and `dport=` of each line of
/// `conntrack -L` (the first of each on a line; the reply's come after).
fn original_destinations(listing: &str) -> BTreeSet<(IpAddr, u16)> {
    let field = |line: &str, name: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(name)).map(str::to_owned)
    };
    listing
        .lines()
        .filter_map(|line| {
            let ip = field(line, "dst=")?.parse().ok()?;
            let port = field(line, "dport=")?.parse().ok()?;
            Some((ip, port))
        })
        .collect()
}
/// Delete one key's entries; how many went. "0 flow entries" is the tool's
/// exit 1, and no error.
fn delete(key: &RuleKey) -> Result<usize, RedirectError> {
    let family = if key.is_ipv6() { "ipv6" } else { "ipv4" };
    let (ip, port) = (key.daddr.0.to_string(), key.dport.to_string());
    let args = ["-D", "-f", family, "-p", "udp", "--orig-dst", &ip, "--orig-port-dst", &port];
    match command::run(CONNTRACK, &args, None) {
        // The count is on stderr, which a success does not keep: at least one.
        Ok(_) => Ok(1),
        Err(RedirectError::Failed { stderr, .. }) if stderr.contains(" 0 flow entries") => Ok(0),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_gives_each_entrys_original_destination_not_its_reply() {
        let listing = "\
udp      17 28 src=10.0.0.5 dst=10.96.0.10 sport=40000 dport=53 src=169.254.99.1 dst=10.0.0.5 sport=31000 dport=40000 mark=0 use=1
udp      17 3 src=10.0.0.6 dst=10.96.0.11 sport=40001 dport=5353 [UNREPLIED] src=10.96.0.11 dst=10.0.0.6 sport=5353 dport=40001 mark=0 use=1
udp      17 3 src=fd00::6 dst=fd00:96::11 sport=40001 dport=53 [UNREPLIED] src=fd00:96::11 dst=fd00::6 sport=53 dport=40001 mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.
";
        let got: Vec<(IpAddr, u16)> = original_destinations(listing).into_iter().collect();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(got, [(ip("10.96.0.10"), 53), (ip("10.96.0.11"), 5353), (ip("fd00:96::11"), 53)]);
    }

    #[test]
    fn only_a_tool_that_is_not_there_counts_as_missing() {
        let spawn = |kind: ErrorKind| RedirectError::Spawn { program: CONNTRACK.into(), source: kind.into() };
        assert!(missing(&spawn(ErrorKind::NotFound)));
        assert!(!missing(&spawn(ErrorKind::PermissionDenied)));
        assert!(!missing(&spawn(ErrorKind::OutOfMemory)));
    }
}
