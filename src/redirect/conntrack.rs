//! Deleting stale conntrack entries of UDP service keys, with the care
//! kube-proxy takes: only UDP (a TCP connection holds no NAT that outlives
//! its proxy port: a dead one is refused and the client reconnects), and
//! only the `(VIP, port)` whose fate changed. A long-lived UDP client that
//! keeps its source port would otherwise stay pinned by its entry to a
//! proxy port that is gone (a restart, a changed proxy port), or stay
//! un-NATed after its rejected VIP got endpoints again.
//!
//! Uses the `conntrack` tool (Debian package `conntrack`), one process per
//! key; without the tool, a warning is logged once and entries expire on
//! their own (30 s for UDP by default).

use std::sync::atomic::{AtomicBool, Ordering};

use super::RedirectError;
use super::command;
use super::rules::RuleKey;

pub const CONNTRACK: &str = "conntrack";

static MISSING_WARNED: AtomicBool = AtomicBool::new(false);

/// Delete the entries whose original destination is one of `keys` (UDP
/// keys only; others are skipped). Failures are logged, never fatal.
pub fn forget_udp(keys: &[RuleKey]) {
    for key in keys.iter().filter(|k| k.is_udp()) {
        match delete(key) {
            Ok(n) if n > 0 => {
                tracing::info!(vip = %key.daddr.0, port = key.dport, entries = n, "deleted stale UDP conntrack entries")
            }
            Ok(_) => {}
            Err(RedirectError::Spawn { .. }) => {
                if !MISSING_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!("no `conntrack` tool: stale UDP conntrack entries are left to expire");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(vip = %key.daddr.0, port = key.dport, error = %e, "cannot delete UDP conntrack entries")
            }
        }
    }
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
