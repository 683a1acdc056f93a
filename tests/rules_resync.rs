//! The periodic resync of the nft rules, in a network namespace of the
//! test's own: the syncer runs on a thread moved into it, so the `nft` it
//! starts and the netlink socket it reads the ruleset generation id on are
//! in there too, never in the host's namespace.
//!
//! Needs root and `ip`, `nft`, `iptables` (nf_tables), `iptables-save`,
//! `iptables-restore`, `ip6tables-restore` (CI has them through
//! scripts/test.sh);
//! without them the test fails saying so.

mod netns;

use std::process::Command;

use netns::{Lab, in_namespace};
use ringport::model::{Protocol, ProxyPort, ServiceName, ServicePortName, ServiceVip};
use ringport::redirect::iptables::Iptables;
use ringport::redirect::nft::Nft;
use ringport::redirect::rules::{RuleKey, Rules, Target};
use ringport::redirect::syncer::SyncKind;
use ringport::redirect::{Intercept, Syncer, genid};

fn rules(n: u8) -> Rules {
    let service = ServicePortName { service: ServiceName::new("default", "web"), port: "".into() };
    (1..=n)
        .map(|i| {
            let key =
                RuleKey { protocol: Protocol::Tcp, daddr: ServiceVip([10, 96, 0, i].into()), dport: 80 };
            (key, Target::named(ProxyPort(31_000 + u16::from(i)), service.clone()))
        })
        .collect()
}

/// `nft args` in the current thread's namespace; its stdout.
fn nft(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().expect("nft runs");
    assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The interception rules and map elements of our table, as listed.
fn intercepts(listing: &str) -> (usize, usize) {
    (listing.matches("redirect to").count(), listing.matches(" : 310").count())
}

#[test]
fn an_outside_change_to_our_table_is_repaired_by_the_next_periodic_resync_and_an_untouched_table_is_not_rewritten()
 {
    netns::require_privileges_and_tools(&["ip", "nft"]);
    let mut lab = Lab::new();
    let ns = lab.add_ns("node");
    in_namespace(&ns, || {
        let mut s = Syncer::new(Box::new(Nft { to: Intercept::Redirect }));
        let periodic = |s: &mut Syncer| s.sync_rules(rules(3), true).expect("periodic resync");
        assert_eq!(s.sync_rules(rules(3), false).expect("first sync").kind, SyncKind::Full);
        let whole = nft(&["list", "table", "inet", "ringport"]);
        assert_eq!(intercepts(&whole), (4, 3), "{whole}");

        // Untouched: checked, not written (the generation id stays).
        let before = genid::read().expect("generation id");
        let r = periodic(&mut s);
        assert_eq!((r.kind, r.added, r.removed), (SyncKind::Verify, 0, 0));
        assert_eq!(genid::read().expect("generation id"), before, "a verify writes nothing");

        // A change is one batch; the table is still known as ours after it.
        let r = s.sync_rules(rules(4), false).expect("add one");
        assert_eq!((r.kind, r.added, r.removed), (SyncKind::Partial, 1, 0));
        assert_eq!(genid::read().expect("generation id"), before + 1, "one transaction");
        assert_eq!(s.sync_rules(rules(4), true).expect("resync").kind, SyncKind::Verify);

        // Someone deletes one of our rules by handle: repaired.
        let listed = nft(&["-a", "list", "chain", "inet", "ringport", "prerouting"]);
        let handle = listed
            .lines()
            .filter(|l| l.contains("redirect to"))
            .find_map(|l| l.rsplit_once("# handle ").map(|(_, h)| h.trim().to_string()))
            .expect("a rule handle");
        nft(&["delete", "rule", "inet", "ringport", "prerouting", "handle", &handle]);
        assert_eq!(intercepts(&nft(&["list", "table", "inet", "ringport"])).0, 3);
        let r = s.sync_rules(rules(4), true).expect("repair");
        assert_eq!(r.kind, SyncKind::Full);
        assert_eq!(intercepts(&nft(&["list", "table", "inet", "ringport"])), (4, 4));
        assert_eq!(s.sync_rules(rules(4), true).expect("resync").kind, SyncKind::Verify);

        // Someone flushes a chain and deletes a map element: repaired.
        nft(&["flush", "chain", "inet", "ringport", "output"]);
        nft(&["delete", "element", "inet", "ringport", "svc4", "{", "tcp", ".", "10.96.0.2", ".", "80", "}"]);
        assert_eq!(intercepts(&nft(&["list", "table", "inet", "ringport"])), (2, 3));
        assert_eq!(s.sync_rules(rules(4), true).expect("repair").kind, SyncKind::Full);
        assert_eq!(intercepts(&nft(&["list", "table", "inet", "ringport"])), (4, 4));

        // Someone writes to another table (as iptables-nft, a CNI or
        // firewalld do): the generation id moves, our table's handles do
        // not, so the resync only verifies and writes nothing.
        nft(&["add", "table", "inet", "someone-else"]);
        nft(&["add", "chain", "inet", "someone-else", "input", "{ type filter hook input priority 0; }"]);
        nft(&["add", "rule", "inet", "someone-else", "input", "tcp", "dport", "9", "accept"]);
        let moved = genid::read().expect("generation id");
        let r = s.sync_rules(rules(4), true).expect("resync");
        assert_eq!((r.kind, r.added, r.removed), (SyncKind::Verify, 0, 0));
        assert_eq!(genid::read().expect("generation id"), moved, "a verify writes nothing");
        // Between two of our syncs, too.
        nft(&["add", "rule", "inet", "someone-else", "input", "tcp", "dport", "10", "accept"]);
        assert_eq!(s.sync_rules(rules(5), false).expect("add one").kind, SyncKind::Partial);
        assert_eq!(s.sync_rules(rules(5), true).expect("resync").kind, SyncKind::Verify);
        assert_eq!(intercepts(&nft(&["list", "table", "inet", "ringport"])), (4, 5));

        // Someone deletes our table and makes an empty one of the name:
        // repaired.
        nft(&["delete", "table", "inet", "ringport"]);
        nft(&["add", "table", "inet", "ringport"]);
        assert_eq!(s.sync_rules(rules(5), true).expect("repair").kind, SyncKind::Full);
        assert_eq!(intercepts(&nft(&["list", "table", "inet", "ringport"])), (4, 5));
        assert_eq!(s.sync_rules(rules(5), true).expect("resync").kind, SyncKind::Verify);
    });
}

/// `iptables-save -t nat` lines of our prerouting chain.
fn our_nat_rules() -> usize {
    let out = Command::new("iptables-save").args(["-t", "nat"]).output().expect("iptables-save runs");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A RINGPORT-PREROUTING ")).count()
}

#[test]
fn iptables_nft_chains_flushed_by_someone_else_are_repaired_by_the_next_periodic_resync_and_untouched_ones_are_not_rewritten()
 {
    netns::require_privileges_and_tools(&[
        "ip",
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ip6tables-restore",
    ]);
    let version = Command::new("iptables").arg("--version").output().expect("iptables --version");
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("nf_tables"),
        "this test needs iptables-nft (the generation id is nf_tables'); iptables-legacy is rewritten whole at each resync"
    );
    let mut lab = Lab::new();
    let ns = lab.add_ns("node");
    in_namespace(&ns, || {
        let mut s = Syncer::new(Box::new(Iptables { to: Intercept::Redirect }));
        assert_eq!(s.sync_rules(rules(3), false).expect("first sync").kind, SyncKind::Full);
        assert_eq!(our_nat_rules(), 3);
        assert_eq!(s.sync_rules(rules(3), true).expect("resync").kind, SyncKind::Verify);
        assert_eq!(s.sync_rules(rules(4), false).expect("add one").kind, SyncKind::Partial);
        assert_eq!(s.sync_rules(rules(4), true).expect("resync").kind, SyncKind::Verify);
        let flushed =
            Command::new("iptables").args(["-w", "-t", "nat", "-F", "RINGPORT-PREROUTING"]).status();
        assert!(flushed.is_ok_and(|s| s.success()));
        assert_eq!(our_nat_rules(), 0);
        assert_eq!(s.sync_rules(rules(4), true).expect("repair").kind, SyncKind::Full);
        assert_eq!(our_nat_rules(), 4);
        assert_eq!(s.sync_rules(rules(4), true).expect("resync").kind, SyncKind::Verify);
    });
}
