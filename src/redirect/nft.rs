//! The nftables backend: one table of ringport's own, two maps
//! (`l4proto . daddr . dport -> proxy port`, one per address family), one
//! interception rule per family in a prerouting and an output nat chain,
//! and three small filter chains: the firewall (`loadBalancerSourceRanges`,
//! before NAT), the input guard (the proxy address answers only what the
//! rules sent it) and the rejects (ICMP port unreachable for UDP service
//! ports with no endpoints, a TCP reset for TCP ones on a shared proxy
//! port, which cannot pause; on the forward and output paths, since a
//! rejected VIP is not NATed and so is routed like any other address; on
//! the same paths, the drops of keys whose endpoints are all out of scope,
//! TCP and UDP).
//!
//! Each family is DNATed to its proxy address ([`Intercept::ProxyAddress`]),
//! which works whatever interface the packet came in on, address-less veths
//! included; a family without one is REDIRECTed.
//!
//! Matching is one hash lookup whatever the number of services. A change
//! adds and deletes map and set elements in one `nft -f -` transaction
//! (all deletes of a map in one `delete element` statement); only a start,
//! a firewall change, the sync after a failure, or a periodic resync that
//! finds the ruleset generation id moved by someone else rewrites the
//! whole table, and that too is one transaction (add, delete, redefine),
//! so no packet ever sees a half-built table.

use std::fmt::Write;

use super::rules::{Diff, RuleKey, RuleSet, Target};
use super::{Backend, Intercept, RedirectError, command};

pub const NFT: &str = "nft";
pub const FAMILY: &str = "inet";
pub const TABLE: &str = "ringport";
const MAP4: &str = "svc4";
const MAP6: &str = "svc6";
const REJECT4: &str = "noep4";
const REJECT6: &str = "noep6";
const DROP4: &str = "noloc4";
const DROP6: &str = "noloc6";

pub struct Nft {
    pub to: Intercept,
}

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

    fn replace(&mut self, rules: &RuleSet) -> Result<(), RedirectError> {
        apply(&render_replace(rules, self.to))
    }

    fn update(&mut self, diff: &Diff, _rules: &RuleSet) -> Result<(), RedirectError> {
        if diff.is_empty() {
            return Ok(());
        }
        apply(&render_update(diff))
    }

    fn generation(&self) -> Option<u32> {
        super::genid::read_logged()
    }

    fn own_handles(&self) -> Option<Vec<(u16, u64)>> {
        super::handles::read(libc::NFPROTO_INET as u8, TABLE)
            .map_err(|e| tracing::debug!(error = %e, "cannot read the handles of our nftables table"))
            .ok()
    }

    fn read_back(&self) -> Option<super::ReadBack> {
        let listing = command::run(NFT, &["list", "table", FAMILY, TABLE], None).ok()?;
        let rules = parse_table(&listing)?;
        // The firewall's sets are not read back: with any, the first sync
        // rewrites the table whole.
        let firewall = listing.contains("set fw4 {") || listing.contains("set fw6 {");
        Some(super::ReadBack { redirects: rules.redirects.clone(), whole: (!firewall).then_some(rules) })
    }
}

/// The redirects, rejects and drops of a listing of ringport's table (a
/// previous run's), with no service names (the listing has none) and no
/// firewall (`fw4`, `fw6` are not read); `None` unless every map and set
/// parses.
pub fn parse_table(listing: &str) -> Option<RuleSet> {
    let mut rules = RuleSet::default();
    for name in [MAP4, MAP6, REJECT4, REJECT6, DROP4, DROP6] {
        let start = listing.find(&format!("{name} {{"))?;
        let block = &listing[start..];
        let block = &block[..block.find('}')?];
        let Some(elements) = block.split_once("elements = {").map(|(_, e)| e) else { continue };
        for element in elements.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (key, port) = match element.rsplit_once(" : ") {
                Some((k, p)) => (k, Some(p.trim().parse::<u16>().ok()?)),
                None => (element, None),
            };
            let mut parts = key.split(" . ").map(str::trim);
            let protocol = match parts.next()? {
                "tcp" | "6" => crate::model::Protocol::Tcp,
                "udp" | "17" => crate::model::Protocol::Udp,
                _ => return None,
            };
            let daddr = crate::model::ServiceVip(parts.next()?.parse().ok()?);
            let key = RuleKey { protocol, daddr, dport: parts.next()?.parse().ok()? };
            match (name, port) {
                (MAP4 | MAP6, Some(p)) => {
                    rules.redirects.insert(key, Target::unnamed(crate::model::ProxyPort(p)));
                }
                (REJECT4 | REJECT6, None) => drop(rules.reject.insert(key)),
                (DROP4 | DROP6, None) => drop(rules.dropped.insert(key)),
                _ => return None,
            }
        }
    }
    Some(rules)
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
pub fn render_replace(rules: &RuleSet, to: Intercept) -> String {
    let mut s = format!("add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n");
    s += &format!("table {FAMILY} {TABLE} {{\n");
    s += &format!("  map {MAP4} {{ type inet_proto . ipv4_addr . inet_service : inet_service; }}\n");
    s += &format!("  map {MAP6} {{ type inet_proto . ipv6_addr . inet_service : inet_service; }}\n");
    s += &format!("  set {REJECT4} {{ type inet_proto . ipv4_addr . inet_service; }}\n");
    s += &format!("  set {REJECT6} {{ type inet_proto . ipv6_addr . inet_service; }}\n");
    s += &format!("  set {DROP4} {{ type inet_proto . ipv4_addr . inet_service; }}\n");
    s += &format!("  set {DROP6} {{ type inet_proto . ipv6_addr . inet_service; }}\n");
    // DNAT names its target, so it works whatever interface a packet came
    // in on; REDIRECT (no proxy address of the family) needs an address on
    // that interface.
    let intercept = |v6: bool| {
        let (ip, map) = if v6 { ("ip6", MAP6) } else { ("ip", MAP4) };
        let lookup = format!("meta l4proto . {ip} daddr . th dport map @{map}");
        match to.dnat_to(v6) {
            Some(addr) if v6 => format!("dnat ip6 to [{addr}]:{lookup}"),
            Some(addr) => format!("dnat ip to {addr} : {lookup}"),
            None => format!("redirect to {lookup}"),
        }
    };
    for (chain, hook) in [("prerouting", "prerouting"), ("output", "output")] {
        // -100 is `dstnat`; nft 1.0.6 accepts the name for prerouting only.
        s += &format!("  chain {chain} {{\n    type nat hook {hook} priority -100; policy accept;\n");
        // nft 1.0.6 needs the l4proto match before `th dport` in a concatenation.
        s += &format!("    meta l4proto {{ tcp, udp }} {}\n", intercept(false));
        s += &format!("    meta l4proto {{ tcp, udp }} {}\n", intercept(true));
        s += "  }\n";
    }
    for (chain, hook) in [("forward", "forward"), ("reject_output", "output")] {
        s += &format!("  chain {chain} {{\n    type filter hook {hook} priority 0; policy accept;\n");
        s += &format!("    meta l4proto udp meta l4proto . ip daddr . th dport @{REJECT4} reject\n");
        s += &format!("    meta l4proto udp meta l4proto . ip6 daddr . th dport @{REJECT6} reject\n");
        s += &format!(
            "    meta l4proto tcp meta l4proto . ip daddr . th dport @{REJECT4} reject with tcp reset\n"
        );
        s += &format!(
            "    meta l4proto tcp meta l4proto . ip6 daddr . th dport @{REJECT6} reject with tcp reset\n"
        );
        s += &format!("    meta l4proto {{ tcp, udp }} meta l4proto . ip daddr . th dport @{DROP4} drop\n");
        s += &format!("    meta l4proto {{ tcp, udp }} meta l4proto . ip6 daddr . th dport @{DROP6} drop\n");
        s += "  }\n";
    }
    let guarded: Vec<_> = [false, true].into_iter().filter_map(|v6| to.guarded(v6)).collect();
    if !guarded.is_empty() {
        // Only what the rules DNATed, or the node itself, reaches a proxy
        // address: a host that routes it to us is dropped.
        s += "  chain input {\n    type filter hook input priority 0; policy accept;\n";
        for addr in guarded {
            let ip = if addr.is_ipv6() { "ip6" } else { "ip" };
            s += &format!("    {ip} daddr {addr} iif != \"lo\" ct status & dnat != dnat drop\n");
        }
        s += "  }\n";
    }
    render_firewall(&mut s, rules);
    if let Some(mark) = rules.transparent {
        super::transparent::nft_chain(&mut s, mark);
    }
    s += "}\n";
    // The elements (100k at 100k service ports) in room taken at once, as
    // long as their text: grown by doubling, the text would take up to
    // twice its size, and a copy at each growth, at the first sync (the
    // load's peak).
    let redirects = rules.redirects.iter().map(|(k, t)| element_len(k, Some(t.proxy_port.0)));
    let others = rules.reject.iter().chain(&rules.dropped).map(|k| element_len(k, None));
    s.reserve(redirects.chain(others).sum::<usize>() + 6 * 64);
    for (map, v6) in [(MAP4, false), (MAP6, true)] {
        let of_family = rules.redirects.iter().filter(|(k, _)| k.is_ipv6() == v6);
        add_elements(&mut s, "add", map, of_family.map(|(k, t)| element(k, Some(t.proxy_port.0))));
    }
    for (keys, set4, set6) in [(&rules.reject, REJECT4, REJECT6), (&rules.dropped, DROP4, DROP6)] {
        for (set, v6) in [(set4, false), (set6, true)] {
            add_elements(
                &mut s,
                "add",
                set,
                keys.iter().filter(|k| k.is_ipv6() == v6).map(|k| element(k, None)),
            );
        }
    }
    for (fam, v6) in [("4", false), ("6", true)] {
        let guarded: Vec<_> = rules.firewall.iter().filter(|(k, _)| k.is_ipv6() == v6).collect();
        add_elements(&mut s, "add", &format!("fw{fam}"), guarded.iter().map(|(k, _)| element(k, None)));
        let allowed = guarded.iter().flat_map(|(k, ranges)| {
            ranges.iter().map(move |r| format!("{} . {}", element(k, None), r.trunc()))
        });
        add_elements(&mut s, "add", &format!("allow{fam}"), allowed);
    }
    s
}

/// `loadBalancerSourceRanges`: a set of guarded keys, a set of
/// `key . allowed source range`, and one drop rule per family, ahead of
/// NAT so that a denied packet is never redirected. Only written when some
/// Service has ranges.
fn render_firewall(s: &mut String, rules: &RuleSet) {
    let families = [("4", "ipv4_addr", "ip", false), ("6", "ipv6_addr", "ip6", true)];
    let used: Vec<_> =
        families.iter().filter(|f| rules.firewall.keys().any(|k| k.is_ipv6() == f.3)).collect();
    if used.is_empty() {
        return;
    }
    for (fam, addr, _, _) in &used {
        let _ = writeln!(s, "  set fw{fam} {{ type inet_proto . {addr} . inet_service; }}");
        let _ = writeln!(
            s,
            "  set allow{fam} {{ type inet_proto . {addr} . inet_service . {addr}; flags interval; }}"
        );
    }
    s.push_str("  chain firewall {\n    type filter hook prerouting priority -110; policy accept;\n");
    for (fam, _, saddr, _) in &used {
        let _ = writeln!(
            s,
            "    meta l4proto {{ tcp, udp }} meta l4proto . {saddr} daddr . th dport @fw{fam} \
             meta l4proto . {saddr} daddr . th dport . {saddr} saddr != @allow{fam} drop"
        );
    }
    s.push_str("  }\n");
}

/// Deletions first, so a key whose target changed is deleted and re-added.
pub fn render_update(diff: &Diff) -> String {
    let mut s = String::new();
    for (map, v6) in [(MAP4, false), (MAP6, true)] {
        let removed = diff.remove.iter().filter(|k| k.is_ipv6() == v6).map(|k| element(k, None));
        add_elements(&mut s, "delete", map, removed);
    }
    let sets =
        [((REJECT4, REJECT6), &diff.unreject, &diff.reject), ((DROP4, DROP6), &diff.undrop, &diff.drop)];
    for (verb, gone) in [("delete", true), ("add", false)] {
        for ((set4, set6), removed, added) in sets {
            let keys = if gone { removed } else { added };
            for (set, v6) in [(set4, false), (set6, true)] {
                add_elements(
                    &mut s,
                    verb,
                    set,
                    keys.iter().filter(|k| k.is_ipv6() == v6).map(|k| element(k, None)),
                );
            }
        }
    }
    for (map, v6) in [(MAP4, false), (MAP6, true)] {
        let added = diff.add.iter().filter(|(k, _)| k.is_ipv6() == v6).map(|(k, p)| element(k, Some(p.0)));
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

/// The length of `element`'s text and its separator (`,\n  `), counted
/// without writing it (an IPv6 address is written: rare, and its
/// shortening rules are many).
fn element_len(key: &RuleKey, proxy_port: Option<u16>) -> usize {
    let digits = |n: u32| n.checked_ilog10().map_or(1, |d| d as usize + 1);
    let ip = match key.daddr.0 {
        std::net::IpAddr::V4(v4) => v4.octets().iter().map(|o| digits(u32::from(*o))).sum::<usize>() + 3,
        v6 => v6.to_string().len(),
    };
    let port = proxy_port.map_or(0, |p| 3 + digits(u32::from(p)));
    4 + "tcp . ".len() + ip + " . ".len() + digits(u32::from(key.dport)) + port
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

    #[test]
    fn a_listing_of_the_table_reads_back_as_the_rules_written() {
        let listing = "table inet ringport {\n\tmap svc4 {\n\t\ttype inet_proto . ipv4_addr . inet_service : inet_service\n\t\telements = { udp . 10.96.0.10 . 53 : 40000,\n\t\t\t     tcp . 10.96.0.1 . 80 : 34567 }\n\t}\n\tmap svc6 {\n\t\ttype inet_proto . ipv6_addr . inet_service : inet_service\n\t}\n\tset noep4 {\n\t\telements = { 17 . 10.96.0.11 . 53 }\n\t}\n\tset noep6 {\n\t}\n\tset noloc4 {\n\t}\n\tset noloc6 {\n\t}\n}\n";
        let rules = parse_table(listing).expect("parses");
        let ports: Vec<_> = rules.redirects.iter().map(|(k, t)| (k.dport, t.proxy_port.0)).collect();
        assert_eq!(ports, [(80, 34567), (53, 40000)]);
        assert_eq!(rules.reject.len(), 1);
        assert!(parse_table(&listing.replace("34567", "http")).is_none(), "a partial read is none");
        assert!(parse_table("table inet ringport {\n}\n").is_none(), "no maps: none");
    }

    fn rule(daddr: &str, dport: u16, proxy: u16) -> (RuleKey, Target) {
        let key = RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip(daddr.parse().unwrap()), dport };
        let service = ServicePortName { service: ServiceName::new("default", "web"), port: "http".into() };
        (key, Target::named(ProxyPort(proxy), service))
    }

    #[test]
    fn a_whole_table_is_rendered_into_room_taken_once_as_long_as_its_text() {
        let ip = |i: u32| std::net::Ipv4Addr::from(0x0a60_0000 + i).to_string();
        let mut rules = RuleSet::from_redirects((0..3000).map(|i| rule(&ip(i), 80, 30000)).collect());
        rules.redirects.insert(rule("fd00::1", 443, 31001).0, rule("fd00::1", 443, 31001).1);
        rules.reject.insert(rule(&ip(5000), 53, 0).0);
        let text = render_replace(&rules, Intercept::Redirect);
        assert_eq!(text.matches(" : 30000").count(), 3000);
        // The element's lengths are counted exactly; the head is a guess.
        assert!(text.capacity() <= text.len() + 6 * 64, "{} bytes in {}", text.len(), text.capacity());
    }

    #[test]
    fn replace_recreates_the_table_and_fills_each_family_map() {
        let rules = RuleSet::from_redirects(
            [rule("10.96.0.1", 80, 31000), rule("fd00::1", 443, 31001)].into_iter().collect(),
        );
        let text = render_replace(&rules, Intercept::Redirect);
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
    fn dnat_sends_ipv4_to_the_proxy_address_and_guards_it_and_ranges_make_a_firewall() {
        let (lb, _) = rule("10.98.0.1", 80, 0);
        let mut rules = RuleSet::from_redirects([rule("10.96.0.1", 80, 31000)].into_iter().collect());
        rules.firewall.insert(lb, vec!["10.0.0.0/8".parse().unwrap(), "192.168.1.7/24".parse().unwrap()]);
        let v4_only = Intercept::ProxyAddress { v4: "169.254.99.1".parse().unwrap(), v6: None };
        let text = render_replace(&rules, v4_only);
        assert_eq!(text.matches("dnat ip to 169.254.99.1 : meta l4proto").count(), 2, "{text}");
        assert_eq!(text.matches("redirect to").count(), 2, "IPv6 without a proxy address: {text}");
        assert!(text.contains("ip daddr 169.254.99.1 iif != \"lo\" ct status & dnat != dnat drop"), "{text}");
        assert!(text.contains("saddr != @allow4 drop"), "{text}");
        assert!(
            text.contains("add element inet ringport allow4 {\n  tcp . 10.98.0.1 . 80 . 10.0.0.0/8,\n  tcp . 10.98.0.1 . 80 . 192.168.1.0/24\n}"),
            "{text}"
        );
        assert!(!render_replace(&RuleSet::default(), Intercept::Redirect).contains("chain input"));
        let chosen = render_replace(&RuleSet::default(), Intercept::Dnat("10.200.0.1".parse().unwrap()));
        assert!(chosen.contains("dnat ip to 10.200.0.1 : "), "{chosen}");
        assert!(chosen.contains("redirect to meta l4proto . ip6 daddr"), "{chosen}");
        assert!(!chosen.contains("chain input"), "a --bind-address is not ringport's to guard: {chosen}");
    }

    #[test]
    fn ipv6_is_dnated_to_the_ipv6_proxy_address_and_both_proxy_addresses_are_guarded() {
        let to = Intercept::ProxyAddress {
            v4: "169.254.99.1".parse().unwrap(),
            v6: Some(crate::redirect::DEFAULT_PROXY_ADDRESS6),
        };
        let text = render_replace(&RuleSet::default(), to);
        assert_eq!(
            text.matches("dnat ip6 to [fd72:696e:6770::1]:meta l4proto . ip6 daddr . th dport map @svc6")
                .count(),
            2,
            "{text}"
        );
        assert!(!text.contains("redirect"), "{text}");
        assert!(
            text.contains("ip6 daddr fd72:696e:6770::1 iif != \"lo\" ct status & dnat != dnat drop"),
            "{text}"
        );
        assert!(text.contains("ip daddr 169.254.99.1 iif != \"lo\""), "{text}");
    }

    #[test]
    fn update_deletes_before_it_adds_and_skips_empty_maps() {
        let (gone, _) = rule("10.96.0.2", 80, 0);
        let (changed, _) = rule("10.96.0.3", 80, 0);
        let diff =
            Diff { remove: vec![gone, changed], add: vec![(changed, ProxyPort(31003))], ..Diff::default() };
        assert_eq!(
            render_update(&diff),
            "delete element inet ringport svc4 {\n  tcp . 10.96.0.2 . 80,\n  tcp . 10.96.0.3 . 80\n}\n\
             add element inet ringport svc4 {\n  tcp . 10.96.0.3 . 80 : 31003\n}\n"
        );
        assert_eq!(render_update(&Diff::default()), "");
    }
}
