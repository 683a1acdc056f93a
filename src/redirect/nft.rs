//! The nftables backend: one table of ringport's own, two maps
//! (`l4proto . daddr . dport -> proxy port`, one per address family) and
//! one `redirect` rule per family in a prerouting and an output nat chain.
//!
//! Matching is one hash lookup whatever the number of services. A change
//! adds and deletes map elements in one `nft -f -` transaction; only a
//! start, a periodic resync or the sync after a failure rewrites the whole
//! table, and that too is one transaction (add, delete, redefine), so no
//! packet ever sees a half-built table.
//!
//! Where ICMP-unreachable rejects for UDP service ports with no endpoints
//! will go (a later issue): a set `noep4`/`noep6` of
//! `l4proto . daddr . dport`, matched by a `reject` rule placed before the
//! redirect rule in both chains. TCP needs none: the data plane keeps a
//! paused proxy port bound without listening, so the kernel answers a
//! redirected SYN with RST.

use std::fmt::Write;

use super::rules::{Diff, RuleKey, Rules};
use super::{Backend, RedirectError, command};

pub const NFT: &str = "nft";
pub const FAMILY: &str = "inet";
pub const TABLE: &str = "ringport";
const MAP4: &str = "svc4";
const MAP6: &str = "svc6";

pub struct Nft;

impl Nft {
    /// Whether nftables works here (`nft list tables` succeeds).
    pub fn available() -> bool {
        command::works(NFT, &["list", "tables"])
    }
}

impl Backend for Nft {
    fn name(&self) -> &'static str {
        "nft"
    }

    fn replace(&mut self, rules: &Rules) -> Result<(), RedirectError> {
        apply(&render_replace(rules))
    }

    fn update(&mut self, diff: &Diff, _rules: &Rules) -> Result<(), RedirectError> {
        if diff.is_empty() {
            return Ok(());
        }
        apply(&render_update(diff))
    }
}

fn apply(script: &str) -> Result<(), RedirectError> {
    command::run(NFT, &["-f", "-"], Some(script)).map(drop)
}

/// Remove ringport's table; whether there was one. Listing the table
/// first would cost a second at 100k elements, so this just deletes and
/// reads "no such table" as nothing to remove.
pub fn cleanup() -> Result<bool, RedirectError> {
    if !Nft::available() {
        return Ok(false);
    }
    match apply(&format!("delete table {FAMILY} {TABLE}\n")) {
        Ok(()) => Ok(true),
        Err(RedirectError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The whole table, replacing whatever ringport's table held before (a
/// stale one from an earlier run included): `add` makes sure the `delete`
/// finds a table, and all of it is one transaction.
pub fn render_replace(rules: &Rules) -> String {
    let mut s = format!("add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n");
    s += &format!("table {FAMILY} {TABLE} {{\n");
    s += &format!("  map {MAP4} {{ type inet_proto . ipv4_addr . inet_service : inet_service; }}\n");
    s += &format!("  map {MAP6} {{ type inet_proto . ipv6_addr . inet_service : inet_service; }}\n");
    for (chain, hook) in [("prerouting", "prerouting"), ("output", "output")] {
        // -100 is `dstnat`; nft 1.0.6 accepts the name for prerouting only.
        s += &format!("  chain {chain} {{\n    type nat hook {hook} priority -100; policy accept;\n");
        // nft 1.0.6 needs the l4proto match before `th dport` in a concatenation.
        s += &format!(
            "    meta l4proto {{ tcp, udp }} redirect to meta l4proto . ip daddr . th dport map @{MAP4}\n"
        );
        s += &format!(
            "    meta l4proto {{ tcp, udp }} redirect to meta l4proto . ip6 daddr . th dport map @{MAP6}\n"
        );
        s += "  }\n";
    }
    s += "}\n";
    let (v4, v6): (Vec<_>, Vec<_>) = rules.iter().partition(|(k, _)| !k.is_ipv6());
    add_elements(&mut s, "add", MAP4, v4.iter().map(|(k, t)| element(k, Some(t.proxy_port.0))));
    add_elements(&mut s, "add", MAP6, v6.iter().map(|(k, t)| element(k, Some(t.proxy_port.0))));
    s
}

/// Deletions first, so a key whose target changed is deleted and re-added.
pub fn render_update(diff: &Diff) -> String {
    let mut s = String::new();
    for (map, v6) in [(MAP4, false), (MAP6, true)] {
        let removed = diff.remove.iter().filter(|k| k.is_ipv6() == v6).map(|k| element(k, None));
        add_elements(&mut s, "delete", map, removed);
    }
    for (map, v6) in [(MAP4, false), (MAP6, true)] {
        let added =
            diff.add.iter().filter(|(k, _)| k.is_ipv6() == v6).map(|(k, t)| element(k, Some(t.proxy_port.0)));
        add_elements(&mut s, "add", map, added);
    }
    s
}

/// One statement for all elements, one element per line: nft parses a
/// single statement far faster than one per element, and an error echoes
/// only the line at fault.
fn add_elements(s: &mut String, verb: &str, map: &str, elements: impl Iterator<Item = String>) {
    let mut elements = elements.peekable();
    if elements.peek().is_none() {
        return;
    }
    let _ = writeln!(s, "{verb} element {FAMILY} {TABLE} {map} {{");
    for (i, e) in elements.enumerate() {
        s.push_str(if i == 0 { "  " } else { ",\n  " });
        s.push_str(&e);
    }
    s.push_str("\n}\n");
}

fn element(key: &RuleKey, proxy_port: Option<u16>) -> String {
    let proto = match key.protocol {
        crate::model::Protocol::Tcp => "tcp",
        crate::model::Protocol::Udp => "udp",
    };
    match proxy_port {
        Some(p) => format!("{proto} . {} . {} : {p}", key.daddr.0, key.dport),
        None => format!("{proto} . {} . {}", key.daddr.0, key.dport),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ProxyPort, ServiceName, ServicePortName, ServiceVip};
    use crate::redirect::rules::Target;

    fn rule(daddr: &str, dport: u16, proxy: u16) -> (RuleKey, Target) {
        let key = RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip(daddr.parse().unwrap()), dport };
        let service = ServicePortName { service: ServiceName::new("default", "web"), port: "http".into() };
        (key, Target { proxy_port: ProxyPort(proxy), service })
    }

    #[test]
    fn replace_recreates_the_table_and_fills_each_family_map() {
        let rules: Rules = [rule("10.96.0.1", 80, 31000), rule("fd00::1", 443, 31001)].into_iter().collect();
        let text = render_replace(&rules);
        assert!(
            text.starts_with("add table inet ringport\ndelete table inet ringport\ntable inet ringport {\n")
        );
        assert_eq!(text.matches("redirect to").count(), 4, "{text}");
        assert!(
            text.contains("add element inet ringport svc4 {\n  tcp . 10.96.0.1 . 80 : 31000\n}\n"),
            "{text}"
        );
        assert!(
            text.contains("add element inet ringport svc6 {\n  tcp . fd00::1 . 443 : 31001\n}\n"),
            "{text}"
        );
    }

    #[test]
    fn update_deletes_before_it_adds_and_skips_empty_maps() {
        let (gone, _) = rule("10.96.0.2", 80, 0);
        let (changed, _) = rule("10.96.0.3", 80, 0);
        let diff = Diff { remove: vec![gone, changed], add: vec![rule("10.96.0.3", 80, 31003)] };
        assert_eq!(
            render_update(&diff),
            "delete element inet ringport svc4 {\n  tcp . 10.96.0.2 . 80,\n  tcp . 10.96.0.3 . 80\n}\n\
             add element inet ringport svc4 {\n  tcp . 10.96.0.3 . 80 : 31003\n}\n"
        );
        assert_eq!(render_update(&Diff::default()), "");
    }
}
