//! The iptables backend, for nodes without a working `nft`: chains of
//! ringport's own, each jumped to first from its builtin chain:
//! - nat `RINGPORT-PREROUTING` (traffic from other hosts and pods) and
//!   `RINGPORT-OUTPUT` (traffic from the node itself): one rule per address,
//!   commented `ns/svc:port` as kube-proxy did; each family is DNATed to
//!   its proxy address (REDIRECTed when it has none);
//! - filter `RINGPORT-INPUT` (the proxy address answers only what was
//!   DNATed to it), `RINGPORT-FORWARD` and `RINGPORT-OUTPUT` (ICMP port
//!   unreachable for UDP service ports with no endpoints, a TCP reset for
//!   TCP ones on a shared proxy port);
//! - mangle `RINGPORT-FIREWALL` (`loadBalancerSourceRanges`, before NAT)
//!   and `RINGPORT-TRANSPARENT` (transparent mode's reply mark,
//!   `transparent.rs`).
//!
//! Each sync writes every chain whole with one `iptables-restore --noflush`
//! per family: declaring a chain in the batch flushes it, so the rewrite is
//! atomic and repairs any rule someone else removed. Matching here is a
//! linear walk of the chain; that is why nft is the default.

use std::fmt::Write;

use super::rules::{Diff, RuleSet};
use super::{Backend, Intercept, RedirectError, command};

/// `(table, builtin chain, ringport's chain)`, in batch order.
const CHAINS: [(&str, &str, &str); 7] = [
    ("nat", "PREROUTING", "RINGPORT-PREROUTING"),
    ("nat", "OUTPUT", "RINGPORT-OUTPUT"),
    ("filter", "INPUT", "RINGPORT-INPUT"),
    ("filter", "FORWARD", "RINGPORT-FORWARD"),
    ("filter", "OUTPUT", "RINGPORT-OUTPUT"),
    ("mangle", "PREROUTING", "RINGPORT-FIREWALL"),
    ("mangle", "PREROUTING", "RINGPORT-TRANSPARENT"),
];
const TABLES: [&str; 3] = ["nat", "filter", "mangle"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn port_unreachable(self) -> &'static str {
        match self {
            Family::V4 => "icmp-port-unreachable",
            Family::V6 => "icmp6-port-unreachable",
        }
    }
}

pub struct Iptables {
    pub to: Intercept,
}

impl Iptables {
    /// Whether iptables works here (the nat table can be listed).
    pub fn available() -> bool {
        command::works(Family::V4.iptables(), &["-w", "-t", "nat", "-S", "PREROUTING"])
    }
}

impl Backend for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn replace(&mut self, rules: &RuleSet) -> Result<(), RedirectError> {
        for family in Family::ALL {
            write_family(family, rules, self.to)?;
        }
        Ok(())
    }

    /// The chains are rewritten whole; only families the change touches
    /// are written.
    fn update(&mut self, diff: &Diff, rules: &RuleSet) -> Result<(), RedirectError> {
        for family in touched(diff) {
            write_family(family, rules, self.to)?;
        }
        Ok(())
    }

    /// iptables-nft programs nf_tables: the same generation id as nft.
    /// The legacy backend has none (each periodic resync then rewrites).
    fn generation(&self) -> Option<u32> {
        static NF_TABLES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let nf_tables = NF_TABLES.get_or_init(|| {
            command::run(Family::V4.iptables(), &["--version"], None).is_ok_and(|v| v.contains("nf_tables"))
        });
        nf_tables.then(super::genid::read_logged).flatten()
    }

    /// `iptables-restore` commits each table of its batch (nat, filter,
    /// mangle) on its own.
    fn transactions(&self, diff: Option<&Diff>) -> u32 {
        let families = diff.map_or(Family::ALL.len(), |d| touched(d).count());
        (families * TABLES.len()) as u32
    }

    /// The redirects of `RINGPORT-PREROUTING`, both families (the chains
    /// are rewritten whole on every sync, so only the proxy ports matter).
    fn read_back(&self) -> Option<super::ReadBack> {
        let mut redirects = super::rules::Rules::new();
        for family in Family::ALL {
            if let Ok(saved) = command::run(family.save(), &["-t", "nat"], None) {
                redirects.extend(parse_save(&saved));
            }
        }
        (!redirects.is_empty()).then_some(super::ReadBack { redirects, whole: None })
    }
}

/// The families whose keys `diff` touches.
fn touched(diff: &Diff) -> impl Iterator<Item = Family> + '_ {
    Family::ALL.into_iter().filter(|family| {
        let v6 = *family == Family::V6;
        let keys = diff.remove.iter().chain(diff.add.iter().map(|(k, _)| k));
        let mut keys = keys.chain(&diff.reject).chain(&diff.unreject).chain(&diff.drop).chain(&diff.undrop);
        keys.any(|k| k.is_ipv6() == v6)
    })
}

/// The redirects in `iptables-save -t nat` output: each
/// `-A RINGPORT-PREROUTING -d IP/N -p P ... --dport D -j DNAT
/// --to-destination A:PORT` (or `REDIRECT --to-ports PORT`).
pub fn parse_save(saved: &str) -> super::rules::Rules {
    let mut rules = super::rules::Rules::new();
    for line in saved.lines().filter(|l| l.starts_with("-A RINGPORT-PREROUTING ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after =
            |flag: &str| words.iter().position(|w| *w == flag).and_then(|i| words.get(i + 1)).copied();
        let parsed = (|| {
            let ip = after("-d")?.split('/').next()?.parse().ok()?;
            let protocol = match after("-p")? {
                "tcp" => crate::model::Protocol::Tcp,
                "udp" => crate::model::Protocol::Udp,
                _ => return None,
            };
            let dport = after("--dport")?.parse().ok()?;
            let proxy = match after("--to-destination") {
                Some(to) => to.rsplit_once(':')?.1.parse().ok()?,
                None => after("--to-ports")?.parse().ok()?,
            };
            let key = super::rules::RuleKey { protocol, daddr: crate::model::ServiceVip(ip), dport };
            Some((key, super::rules::Target::unnamed(crate::model::ProxyPort(proxy))))
        })();
        if let Some((key, target)) = parsed {
            rules.insert(key, target);
        }
    }
    rules
}

fn write_family(family: Family, rules: &RuleSet, to: Intercept) -> Result<(), RedirectError> {
    let missing: Vec<(&str, &str)> = CHAINS
        .iter()
        .filter(|(table, builtin, chain)| {
            !command::works(family.iptables(), &["-w", "-t", table, "-C", builtin, "-j", chain])
        })
        .map(|(table, builtin, _)| (*table, *builtin))
        .collect();
    let batch = render_restore(family, rules, to, &missing);
    command::run(family.restore(), &["-w", "--noflush"], Some(&batch)).map(drop)
}

/// The batch for one family: every chain declared (so flushed) and filled,
/// plus a jump from each `(table, builtin chain)` in `missing_jumps`.
pub fn render_restore(
    family: Family,
    rules: &RuleSet,
    to: Intercept,
    missing_jumps: &[(&str, &str)],
) -> String {
    let mine = |k: &super::rules::RuleKey| k.is_ipv6() == (family == Family::V6);
    let proto = |k: &super::rules::RuleKey| match k.protocol {
        crate::model::Protocol::Tcp => "tcp",
        crate::model::Protocol::Udp => "udp",
    };
    let prefix = family.host_prefix();
    let v6 = family == Family::V6;
    let dnat = to.dnat_to(v6);
    let mut s = String::new();
    for table in TABLES {
        let _ = writeln!(s, "*{table}");
        let chains = CHAINS.iter().filter(|(t, _, _)| *t == table);
        for (_, _, chain) in chains.clone() {
            let _ = writeln!(s, ":{chain} - [0:0]");
        }
        for (_, builtin, chain) in chains.filter(|(t, b, _)| missing_jumps.contains(&(*t, *b))) {
            let _ = writeln!(s, "-I {builtin} -m comment --comment \"ringport redirects\" -j {chain}");
        }
        match table {
            "nat" => {
                for (key, target) in rules.redirects.iter().filter(|(k, _)| mine(k)) {
                    let comment = target.name().to_string().replace('"', "");
                    let jump = match dnat {
                        Some(addr) => {
                            let to = std::net::SocketAddr::new(addr, target.proxy_port.0);
                            format!("DNAT --to-destination {to}")
                        }
                        None => format!("REDIRECT --to-ports {}", target.proxy_port.0),
                    };
                    for chain in ["RINGPORT-PREROUTING", "RINGPORT-OUTPUT"] {
                        let (p, ip, port) = (proto(key), key.daddr.0, key.dport);
                        let _ = writeln!(
                            s,
                            "-A {chain} -d {ip}/{prefix} -p {p} -m comment --comment \"{comment}\" -m {p} --dport {port} -j {jump}"
                        );
                    }
                }
            }
            "filter" => {
                if let Some(addr) = to.guarded(v6) {
                    let _ = writeln!(
                        s,
                        "-A RINGPORT-INPUT -d {addr}/{prefix} ! -i lo -m conntrack ! --ctstate DNAT -j DROP"
                    );
                }
                for key in rules.reject.iter().filter(|k| mine(k)) {
                    for chain in ["RINGPORT-FORWARD", "RINGPORT-OUTPUT"] {
                        let (p, ip, port) = (proto(key), key.daddr.0, key.dport);
                        let icmp = if key.is_udp() { family.port_unreachable() } else { "tcp-reset" };
                        let _ = writeln!(
                            s,
                            "-A {chain} -d {ip}/{prefix} -p {p} -m {p} --dport {port} -j REJECT --reject-with {icmp}"
                        );
                    }
                }
                for key in rules.dropped.iter().filter(|k| mine(k)) {
                    for chain in ["RINGPORT-FORWARD", "RINGPORT-OUTPUT"] {
                        let (p, ip, port) = (proto(key), key.daddr.0, key.dport);
                        let _ =
                            writeln!(s, "-A {chain} -d {ip}/{prefix} -p {p} -m {p} --dport {port} -j DROP");
                    }
                }
            }
            _ => {
                // A packet matches one key at most: RETURN ends our chain
                // for an allowed source, DROP catches the rest.
                for (key, ranges) in rules.firewall.iter().filter(|(k, _)| mine(k)) {
                    let m = format!(
                        "-d {}/{prefix} -p {p} -m {p} --dport {}",
                        key.daddr.0,
                        key.dport,
                        p = proto(key)
                    );
                    for r in ranges {
                        let _ = writeln!(s, "-A RINGPORT-FIREWALL {m} -s {} -j RETURN", r.trunc());
                    }
                    let _ = writeln!(s, "-A RINGPORT-FIREWALL {m} -j DROP");
                }
                if let Some(mark) = rules.transparent {
                    let v6 = family == Family::V6;
                    super::transparent::iptables_rules(&mut s, "RINGPORT-TRANSPARENT", mark, v6);
                }
            }
        }
        s.push_str("COMMIT\n");
    }
    s
}

/// Remove ringport's jumps and chains from both families; whether anything
/// was there. A family whose tools are missing has nothing of ours.
pub fn cleanup() -> Result<bool, RedirectError> {
    let mut removed = false;
    for family in Family::ALL {
        let Ok(before) = command::run(family.save(), &[], None) else { continue };
        if !before.contains("RINGPORT-") {
            continue;
        }
        removed = true;
        for (table, builtin, chain) in CHAINS {
            // Each delete removes one jump; a jump added twice takes two.
            // Bounded, in case a delete succeeds without removing anything.
            for _ in 0..16 {
                let spec = [
                    "-w",
                    "-t",
                    table,
                    "-D",
                    builtin,
                    "-m",
                    "comment",
                    "--comment",
                    "ringport redirects",
                    "-j",
                    chain,
                ];
                let plain = ["-w", "-t", table, "-D", builtin, "-j", chain];
                if !command::works(family.iptables(), &spec) && !command::works(family.iptables(), &plain) {
                    break;
                }
            }
        }
        for (table, _, chain) in CHAINS {
            let _ = command::run(family.iptables(), &["-w", "-t", table, "-F", chain], None);
            let _ = command::run(family.iptables(), &["-w", "-t", table, "-X", chain], None);
        }
        let after = command::run(family.save(), &[], None)?;
        if after.contains("RINGPORT-") {
            // Someone else's rule still jumps to our chain, or the chain is
            // busy: say so rather than claim a clean slate.
            return Err(RedirectError::Leftover {
                program: family.save().to_string(),
                what: "RINGPORT-* chains",
            });
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ProxyPort, ServiceName, ServicePortName, ServiceVip};
    use crate::redirect::rules::{RuleKey, Target};

    fn rules() -> RuleSet {
        let service = ServicePortName { service: ServiceName::new("default", "web"), port: "http".into() };
        let key =
            |ip: &str, protocol| RuleKey { protocol, daddr: ServiceVip(ip.parse().unwrap()), dport: 80 };
        let mut set = RuleSet::from_redirects(
            [("10.96.0.1", 31000), ("fd00::1", 31001)]
                .into_iter()
                .map(|(ip, proxy)| (key(ip, Protocol::Tcp), Target::named(ProxyPort(proxy), service.clone())))
                .collect(),
        );
        set.reject.insert(key("10.96.0.53", Protocol::Udp));
        set.firewall.insert(key("10.98.0.1", Protocol::Tcp), vec!["10.0.0.0/8".parse().unwrap()]);
        set
    }

    #[test]
    fn the_redirects_of_a_saved_nat_table_read_back() {
        let batch =
            render_restore(Family::V4, &rules(), Intercept::Dnat("169.254.99.1".parse().unwrap()), &[]);
        let read = parse_save(&batch);
        let written: Vec<_> =
            rules().redirects.iter().filter(|(k, _)| !k.is_ipv6()).map(|(k, t)| (*k, t.proxy_port)).collect();
        let read: Vec<_> = read.iter().map(|(k, t)| (*k, t.proxy_port)).collect();
        assert!(!written.is_empty());
        assert_eq!(read, written);
    }

    #[test]
    fn restore_batch_declares_every_chain_and_writes_dnat_guard_reject_and_firewall_rules() {
        let text = render_restore(
            Family::V4,
            &rules(),
            Intercept::ProxyAddress { v4: "169.254.99.1".parse().unwrap(), v6: None },
            &[("nat", "OUTPUT")],
        );
        assert_eq!(
            text,
            "*nat\n:RINGPORT-PREROUTING - [0:0]\n:RINGPORT-OUTPUT - [0:0]\n\
             -I OUTPUT -m comment --comment \"ringport redirects\" -j RINGPORT-OUTPUT\n\
             -A RINGPORT-PREROUTING -d 10.96.0.1/32 -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j DNAT --to-destination 169.254.99.1:31000\n\
             -A RINGPORT-OUTPUT -d 10.96.0.1/32 -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j DNAT --to-destination 169.254.99.1:31000\n\
             COMMIT\n\
             *filter\n:RINGPORT-INPUT - [0:0]\n:RINGPORT-FORWARD - [0:0]\n:RINGPORT-OUTPUT - [0:0]\n\
             -A RINGPORT-INPUT -d 169.254.99.1/32 ! -i lo -m conntrack ! --ctstate DNAT -j DROP\n\
             -A RINGPORT-FORWARD -d 10.96.0.53/32 -p udp -m udp --dport 80 -j REJECT --reject-with icmp-port-unreachable\n\
             -A RINGPORT-OUTPUT -d 10.96.0.53/32 -p udp -m udp --dport 80 -j REJECT --reject-with icmp-port-unreachable\n\
             COMMIT\n\
             *mangle\n:RINGPORT-FIREWALL - [0:0]\n:RINGPORT-TRANSPARENT - [0:0]\n\
             -A RINGPORT-FIREWALL -d 10.98.0.1/32 -p tcp -m tcp --dport 80 -s 10.0.0.0/8 -j RETURN\n\
             -A RINGPORT-FIREWALL -d 10.98.0.1/32 -p tcp -m tcp --dport 80 -j DROP\n\
             COMMIT\n"
        );
    }

    #[test]
    fn a_tcp_port_without_endpoints_on_a_shared_proxy_port_is_reset_by_a_rule() {
        use crate::redirect::rules::{Locality, PortRules, desired};
        use crate::snapshot::Emptiness;
        let name = ServicePortName { service: ServiceName::new("default", "empty"), port: "".into() };
        let mut sp = crate::model::ServicePort::new(name, crate::model::Origin::new("t"), Protocol::Tcp, 80);
        sp.cluster_ips = vec!["10.96.0.20".parse().unwrap()];
        let none = Emptiness { internal: true, external: true, has_endpoints: false };
        let spec = std::sync::Arc::new(sp);
        let port = |shared| PortRules {
            emptiness: [none; 2],
            shared,
            ..PortRules::new(&spec, "169.254.99.1:31000".parse().unwrap())
        };
        let own = desired([port(false)], &Locality::default()).rules;
        assert_eq!((own.redirects.len(), own.reject.len()), (1, 0), "a paused own proxy port refuses it");
        let shared = desired([port(true)], &Locality::default()).rules;
        assert_eq!((shared.redirects.len(), shared.reject.len()), (0, 1));
        let to = Intercept::ProxyAddress { v4: "169.254.99.1".parse().unwrap(), v6: None };
        let text = render_restore(Family::V4, &shared, to, &[]);
        for chain in ["RINGPORT-FORWARD", "RINGPORT-OUTPUT"] {
            let rule = format!(
                "-A {chain} -d 10.96.0.20/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset\n"
            );
            assert!(text.contains(&rule), "{text}");
        }
        let nft = super::super::nft::render_replace(&shared, to);
        assert!(
            nft.contains("meta l4proto tcp meta l4proto . ip daddr . th dport @noep4 reject with tcp reset")
        );
        assert!(nft.contains("add element inet ringport noep4 {\n  tcp . 10.96.0.20 . 80\n}\n"), "{nft}");
    }

    #[test]
    fn transparent_mode_marks_replies_in_its_own_mangle_chain_in_both_families() {
        let mut set = rules();
        set.transparent = Some(0x1000);
        let to = Intercept::ProxyAddress { v4: "169.254.99.1".parse().unwrap(), v6: None };
        let v4 = render_restore(Family::V4, &set, to, &[]);
        assert!(
            v4.contains(
                "-A RINGPORT-TRANSPARENT -p udp -m socket --transparent -j MARK --set-xmark 0x1000/0x1000\n"
            ),
            "{v4}"
        );
        assert!(v4.contains("-A RINGPORT-TRANSPARENT -p icmp -m socket --transparent"), "{v4}");
        let v6 = render_restore(Family::V6, &set, to, &[]);
        assert!(v6.contains("-A RINGPORT-TRANSPARENT -p ipv6-icmp -m socket --transparent"), "{v6}");
    }

    #[test]
    fn ipv6_batch_holds_only_ipv6_rules_dnated_to_the_ipv6_proxy_address_or_redirected_without_one() {
        let v4 = "169.254.99.1".parse().unwrap();
        let to = Intercept::ProxyAddress { v4, v6: Some(crate::redirect::DEFAULT_PROXY_ADDRESS6) };
        let text = render_restore(Family::V6, &rules(), to, &[]);
        assert!(text.contains("-d fd00::1/128 "), "{text}");
        assert!(text.contains("-j DNAT --to-destination [fd72:696e:6770::1]:31001"), "{text}");
        assert!(
            text.contains(
                "-A RINGPORT-INPUT -d fd72:696e:6770::1/128 ! -i lo -m conntrack ! --ctstate DNAT -j DROP"
            ),
            "{text}"
        );
        assert!(!text.contains("10.96.0.1") && !text.contains("169.254.99.1"), "{text}");
        assert!(!text.contains("-I "), "{text}");
        let text = render_restore(Family::V6, &rules(), Intercept::ProxyAddress { v4, v6: None }, &[]);
        assert!(text.contains("-j REDIRECT --to-ports 31001"), "{text}");
        assert!(!text.contains("RINGPORT-INPUT -d"), "{text}");
    }
}
