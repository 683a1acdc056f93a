//! The iptables backend, for nodes without a working `nft`: two chains of
//! ringport's own in the nat table, `RINGPORT-PREROUTING` (traffic from
//! other hosts and pods) and `RINGPORT-OUTPUT` (traffic from the node
//! itself), jumped to first from `PREROUTING` and `OUTPUT`. One rule per
//! address, commented `ns/svc:port` as kube-proxy did; ip6tables likewise
//! for IPv6.
//!
//! Each sync writes both chains whole with one `iptables-restore --noflush`
//! per family: declaring a chain in the batch flushes it, so the rewrite is
//! atomic and repairs any rule someone else removed. Matching here is a
//! linear walk of the chain; that is why nft is the default.

use std::fmt::Write;

use super::rules::{Diff, Rules};
use super::{Backend, RedirectError, command};

/// `(builtin chain, ringport's chain)`.
const CHAINS: [(&str, &str); 2] = [("PREROUTING", "RINGPORT-PREROUTING"), ("OUTPUT", "RINGPORT-OUTPUT")];

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
}

pub struct Iptables;

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

    fn replace(&mut self, rules: &Rules) -> Result<(), RedirectError> {
        for family in Family::ALL {
            write_family(family, rules)?;
        }
        Ok(())
    }

    /// The chains are rewritten whole; only families the change touches
    /// are written.
    fn update(&mut self, diff: &Diff, rules: &Rules) -> Result<(), RedirectError> {
        for family in Family::ALL {
            let v6 = family == Family::V6;
            let touched = diff.remove.iter().any(|k| k.is_ipv6() == v6)
                || diff.add.iter().any(|(k, _)| k.is_ipv6() == v6);
            if touched {
                write_family(family, rules)?;
            }
        }
        Ok(())
    }
}

fn write_family(family: Family, rules: &Rules) -> Result<(), RedirectError> {
    let missing: Vec<&str> = CHAINS
        .iter()
        .filter(|(builtin, chain)| {
            !command::works(family.iptables(), &["-w", "-t", "nat", "-C", builtin, "-j", chain])
        })
        .map(|(builtin, _)| *builtin)
        .collect();
    let batch = render_restore(family, rules, &missing);
    command::run(family.restore(), &["-w", "--noflush"], Some(&batch)).map(drop)
}

/// The batch for one family: both chains declared (so flushed) and filled,
/// plus a jump from each builtin chain in `missing_jumps`.
pub fn render_restore(family: Family, rules: &Rules, missing_jumps: &[&str]) -> String {
    let mut s = String::from("*nat\n");
    for (_, chain) in CHAINS {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for (builtin, chain) in CHAINS.iter().filter(|(b, _)| missing_jumps.contains(b)) {
        let _ = writeln!(s, "-I {builtin} -m comment --comment \"ringport redirects\" -j {chain}");
    }
    let mine = rules.iter().filter(|(k, _)| k.is_ipv6() == (family == Family::V6));
    for (key, target) in mine {
        let proto = match key.protocol {
            crate::model::Protocol::Tcp => "tcp",
            crate::model::Protocol::Udp => "udp",
        };
        let comment = target.service.to_string().replace('"', "");
        for (_, chain) in CHAINS {
            let _ = writeln!(
                s,
                "-A {chain} -d {}/{} -p {proto} -m comment --comment \"{comment}\" -m {proto} --dport {} -j REDIRECT --to-ports {}",
                key.daddr.0,
                family.host_prefix(),
                key.dport,
                target.proxy_port.0
            );
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// Remove ringport's jumps and chains from both families; whether anything
/// was there. A family whose tools are missing has nothing of ours.
pub fn cleanup() -> Result<bool, RedirectError> {
    let mut removed = false;
    for family in Family::ALL {
        let Ok(before) = command::run(family.save(), &["-t", "nat"], None) else { continue };
        if !before.contains("RINGPORT-") {
            continue;
        }
        removed = true;
        for (builtin, chain) in CHAINS {
            // Each delete removes one jump; a jump added twice takes two.
            // Bounded, in case a delete succeeds without removing anything.
            for _ in 0..16 {
                let spec = [
                    "-w",
                    "-t",
                    "nat",
                    "-D",
                    builtin,
                    "-m",
                    "comment",
                    "--comment",
                    "ringport redirects",
                    "-j",
                    chain,
                ];
                let plain = ["-w", "-t", "nat", "-D", builtin, "-j", chain];
                if !command::works(family.iptables(), &spec) && !command::works(family.iptables(), &plain) {
                    break;
                }
            }
        }
        for (_, chain) in CHAINS {
            let _ = command::run(family.iptables(), &["-w", "-t", "nat", "-F", chain], None);
            let _ = command::run(family.iptables(), &["-w", "-t", "nat", "-X", chain], None);
        }
        let after = command::run(family.save(), &["-t", "nat"], None)?;
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

    fn rules() -> Rules {
        let service = ServicePortName { service: ServiceName::new("default", "web"), port: "http".into() };
        [("10.96.0.1", 31000), ("fd00::1", 31001)]
            .into_iter()
            .map(|(ip, proxy)| {
                let key =
                    RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip(ip.parse().unwrap()), dport: 80 };
                (key, Target { proxy_port: ProxyPort(proxy), service: service.clone() })
            })
            .collect()
    }

    #[test]
    fn restore_batch_declares_both_chains_and_writes_one_rule_per_chain_per_address() {
        assert_eq!(
            render_restore(Family::V4, &rules(), &["OUTPUT"]),
            "*nat\n:RINGPORT-PREROUTING - [0:0]\n:RINGPORT-OUTPUT - [0:0]\n\
             -I OUTPUT -m comment --comment \"ringport redirects\" -j RINGPORT-OUTPUT\n\
             -A RINGPORT-PREROUTING -d 10.96.0.1/32 -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j REDIRECT --to-ports 31000\n\
             -A RINGPORT-OUTPUT -d 10.96.0.1/32 -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j REDIRECT --to-ports 31000\n\
             COMMIT\n"
        );
    }

    #[test]
    fn ipv6_batch_holds_only_ipv6_rules() {
        let text = render_restore(Family::V6, &rules(), &[]);
        assert!(text.contains("-d fd00::1/128 "), "{text}");
        assert!(!text.contains("10.96.0.1"), "{text}");
        assert!(!text.contains("-I "), "{text}");
    }
}
