//! The redirect rules end to end, in network namespaces: the real
//! `ringport` binary in a node namespace with real nft (or iptables)
//! rules, a client namespace, and three backend namespaces each running a
//! real HTTP server that names itself; the first also runs a real DNS
//! server (dnsmasq) behind a UDP cluster IP.
//!
//! Needs root and `ip`, `nft`, `iptables`, `curl`, `python3`, `dnsmasq`,
//! `dig` (CI has them
//! through scripts/test.sh); without them every test here fails saying so.

mod netns;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use netns::{Lab, NODE_IP};

const TOOLS: [&str; 8] = ["ip", "nft", "iptables", "iptables-save", "curl", "python3", "dnsmasq", "dig"];
const BACKENDS: [(&str, &str); 3] = [("be1", "10.200.0.11"), ("be2", "10.200.0.12"), ("be3", "10.200.0.13")];

/// `web`: cluster IP, NodePort, a non-local externalIP and a local one (the
/// node's own address), a LoadBalancer ingress IP; three backends.
/// `empty`: a cluster IP with no endpoints. `extra` (when asked for): one
/// more cluster IP on be1, to delete later.
fn manifest(with_extra: bool) -> String {
    let endpoints = |name: &str, ips: &[&str]| {
        let addresses: Vec<String> = ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
        format!(
            "---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: default}}\n\
             subsets:\n- addresses: [{}]\n  ports: [{{port: 8080, protocol: TCP}}]\n",
            addresses.join(", ")
        )
    };
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: 10.96.0.10\n  externalIPs: [\"10.97.0.10\", \"{NODE_IP}\"]\n  \
         ports:\n  - {{port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}\n\
         status:\n  loadBalancer:\n    ingress: [{{ip: \"10.98.0.10\"}}]\n"
    );
    y += &endpoints("web", &BACKENDS.map(|(_, ip)| ip));
    // `dns`: UDP 53 on a cluster IP, answered by dnsmasq in be1 on 5353.
    y += &format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.0.53\n  ports:\n  - {{port: 53, targetPort: 5353, protocol: UDP}}\n\
         ---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: dns, namespace: default}}\n\
         subsets:\n- addresses: [{{ip: \"{}\"}}]\n  ports: [{{port: 5353, protocol: UDP}}]\n",
        BACKENDS[0].1
    );
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: default}\n\
          spec:\n  clusterIP: 10.96.0.20\n  ports:\n  - {port: 80, targetPort: 8080, protocol: TCP}\n";
    if with_extra {
        y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: default}\n\
              spec:\n  clusterIP: 10.96.0.30\n  ports:\n  - {port: 80, targetPort: 8080, protocol: TCP}\n";
        y += &endpoints("extra", &[BACKENDS[0].1]);
    }
    y
}

/// A lab with backends serving and ringport running in the node namespace.
struct Node {
    lab: Lab,
    ringport: usize,
    config: PathBuf,
    log: PathBuf,
}

impl Node {
    fn start(redirect: &str) -> Node {
        Self::start_with(redirect, &[])
    }

    /// Like `start`, with `extra` arguments for `ringport run`.
    fn start_with(redirect: &str, extra: &[&str]) -> Node {
        netns::require_privileges_and_tools(&TOOLS);
        let mut lab = Lab::new();
        lab.topology(&BACKENDS);
        for (role, ip) in BACKENDS {
            let root = lab.scratch.path().join(role);
            std::fs::create_dir_all(&root).expect("backend dir");
            std::fs::write(root.join("whoami"), role).expect("backend file");
            let log = lab.scratch.path().join(format!("{role}.log"));
            let root = root.to_string_lossy().into_owned();
            lab.spawn(
                role,
                &["python3", "-m", "http.server", "--bind", ip, "8080", "--directory", &root],
                &log,
            );
        }
        let hosts = lab.scratch.path().join("hosts");
        std::fs::write(&hosts, "10.1.2.3 web.ringport.test\n").expect("hosts file");
        let dns_log = lab.scratch.path().join("dnsmasq.log");
        let (be1, be1_ip) = BACKENDS[0];
        lab.spawn(
            be1,
            &[
                "dnsmasq",
                "--no-daemon",
                "--bind-interfaces",
                &format!("--listen-address={be1_ip}"),
                "--port=5353",
                "--no-resolv",
                "--no-hosts",
                &format!("--addn-hosts={}", hosts.display()),
                "--pid-file=",
                "--user=root",
            ],
            &dns_log,
        );
        for (role, ip) in BACKENDS {
            let url = format!("http://{ip}:8080/whoami");
            lab.eventually(Duration::from_secs(20), &format!("backend {role} serving"), || {
                lab.curl("node", &url).1 == role
            });
        }
        let config = lab.scratch.path().join("manifests");
        std::fs::create_dir_all(&config).expect("manifest dir");
        std::fs::write(config.join("services.yaml"), manifest(true)).expect("manifest");
        let log = lab.scratch.path().join("ringport.log");
        let ringport = lab.spawn_ringport("node", &[], &config, redirect, extra, &log);
        lab.wait_ready("node", ringport, &log);
        Node { lab, ringport, config, log }
    }

    /// `ip netns exec` execs the command: the child is ringport itself.
    fn pid(&self) -> u32 {
        self.lab.child_id(self.ringport)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Which backends answer `n` requests to `url` from `role`.
    fn answers(&self, role: &str, url: &str, n: usize) -> BTreeSet<String> {
        (0..n)
            .map(|_| {
                let (code, body) = self.lab.curl(role, url);
                assert_eq!(code, 0, "curl {url} from {role}: exit {code}\n{}", self.log());
                body
            })
            .collect()
    }

    fn rewrite_manifest(&self, text: &str) {
        let tmp = self.config.join(".services.yaml.tmp");
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.config.join("services.yaml")).expect("rename manifest");
    }

    fn cleanup(&self) -> String {
        self.lab.ok("node", &[env!("CARGO_BIN_EXE_ringport"), "cleanup"])
    }
}

fn every_backend() -> BTreeSet<String> {
    BACKENDS.iter().map(|(role, _)| role.to_string()).collect()
}

/// Everything a client should reach, from the client and from the node.
fn assert_web_is_served(node: &Node) {
    // (1) The cluster IP, round robin over every backend, from another
    // host (PREROUTING) and from the node itself (OUTPUT).
    assert_eq!(node.answers("client", "http://10.96.0.10/whoami", 6), every_backend());
    assert_eq!(node.answers("node", "http://10.96.0.10/whoami", 6), every_backend());
    // (2) NodePort on the node's address; a non-local externalIP and a
    // LoadBalancer IP routed to the node; a local externalIP (no rule: the
    // data plane listens on it).
    for url in [
        format!("http://{NODE_IP}:30080/whoami"),
        "http://10.97.0.10/whoami".into(),
        "http://10.98.0.10/whoami".into(),
        format!("http://{NODE_IP}/whoami"),
    ] {
        assert_eq!(node.answers("client", &url, 3), every_backend(), "{url}");
    }
}

/// A real DNS client reaches the UDP cluster IP, from another host and from
/// the node itself; the replies come back from the cluster IP (conntrack
/// undoes the REDIRECT), or dig would not accept them.
fn assert_dns_through_cluster_ip(node: &Node) {
    for role in ["client", "node"] {
        node.lab.eventually(Duration::from_secs(10), &format!("DNS through 10.96.0.53 from {role}"), || {
            let out = node
                .lab
                .exec(role, &["dig", "+short", "+tries=2", "+time=1", "@10.96.0.53", "web.ringport.test"]);
            String::from_utf8_lossy(&out.stdout).trim() == "10.1.2.3"
        });
    }
}

/// (3) A service with no endpoints is refused at once, never by a timeout:
/// its proxy port is paused (not listening, port kept), so the kernel
/// answers the redirected SYN with RST.
fn assert_no_endpoints_fails_fast(node: &Node) {
    for role in ["client", "node"] {
        let outcome = node.lab.probe(role, "10.96.0.20", 80);
        assert_eq!(outcome, "refused", "no-endpoint service from {role}");
    }
}

/// (4) Deleting `extra` removes its rule: its cluster IP is no longer
/// intercepted, so a connection to it goes nowhere.
fn delete_extra_and_check(node: &Node, rules_mention: impl Fn() -> bool) {
    assert_eq!(node.answers("client", "http://10.96.0.30/whoami", 1), BTreeSet::from(["be1".to_string()]));
    assert!(rules_mention(), "extra's rule is missing before its deletion");
    node.rewrite_manifest(&manifest(false));
    node.lab.eventually(Duration::from_secs(10), "extra's rule removed", || !rules_mention());
    let (code, _) = node.lab.curl("client", "http://10.96.0.30/whoami");
    assert_ne!(code, 0, "10.96.0.30 still answers after its service was deleted");
    assert_eq!(node.answers("client", "http://10.96.0.10/whoami", 3), every_backend());
}

#[test]
fn nft_rules_serve_cluster_external_and_load_balancer_ips_and_clean_up() {
    let mut node = Node::start("nft");
    let table = node.lab.ok("node", &["nft", "list", "table", "inet", "ringport"]);
    println!("nft list table inet ringport:\n{table}");
    for vip in ["10.96.0.10", "10.97.0.10", "10.98.0.10", "10.96.0.20", "10.96.0.30"] {
        assert!(table.contains(&format!("tcp . {vip} . 80 : ")), "no element for {vip}:\n{table}");
    }
    assert!(!table.contains(&format!("{NODE_IP} . 80")), "a local externalIP got a rule:\n{table}");
    assert_eq!(
        table.matches("dnat ip to 169.254.99.1").count(),
        2,
        "IPv4: one DNAT rule per chain:\n{table}"
    );
    assert_eq!(
        table.matches("dnat ip6 to [fd72:696e:6770::1]").count(),
        2,
        "IPv6: one DNAT rule per chain, to the IPv6 proxy address:\n{table}"
    );
    assert!(!table.contains("redirect to"), "{table}");

    assert!(table.contains("udp . 10.96.0.53 . 53 : "), "no element for the UDP cluster IP:\n{table}");

    assert_web_is_served(&node);
    assert_dns_through_cluster_ip(&node);
    assert_no_endpoints_fails_fast(&node);
    delete_extra_and_check(&node, || {
        node.lab.ok("node", &["nft", "list", "map", "inet", "ringport", "svc4"]).contains("10.96.0.30")
    });

    // (5) Rules stay when ringport stops (see docs/redirect.md); cleanup
    // removes them and is happy to find nothing the second time.
    let ringport = node.ringport;
    node.lab.stop(ringport);
    assert!(node.lab.ok("node", &["nft", "list", "tables"]).contains("ringport"));
    assert!(node.lab.ok("node", &["ip", "addr", "show", "lo"]).contains("169.254.99.1/32"));
    let cleaned = node.cleanup();
    assert!(cleaned.contains("removed nft table inet ringport"), "{cleaned}");
    assert!(cleaned.contains("removed the proxy address 169.254.99.1 from lo"), "{cleaned}");
    let ruleset = node.lab.ok("node", &["nft", "list", "ruleset"]);
    assert!(!ruleset.contains("ringport") && !ruleset.contains("RINGPORT"), "{ruleset}");
    let lo = node.lab.ok("node", &["ip", "addr", "show", "lo"]);
    assert!(!lo.contains("169.254.99.1"), "the proxy address is still on lo:\n{lo}");
    assert_eq!(node.cleanup().trim(), "nothing to remove");
}

#[test]
fn iptables_rules_serve_cluster_external_and_load_balancer_ips_and_clean_up() {
    // A proxy address of the operator's choosing, which cleanup must find.
    let mut node = Node::start_with("iptables", &["--proxy-address", "169.254.99.2"]);
    let saved = node.lab.ok("node", &["iptables-save", "-t", "nat"]);
    println!("iptables-save -t nat:\n{saved}");
    assert!(
        saved.contains("-A PREROUTING -m comment --comment \"ringport redirects\" -j RINGPORT-PREROUTING")
    );
    assert!(saved.contains("-A OUTPUT -m comment --comment \"ringport redirects\" -j RINGPORT-OUTPUT"));
    assert!(
        saved.contains("-A RINGPORT-PREROUTING -d 10.96.0.10/32 -p tcp -m comment --comment \"default/web\"")
    );
    assert!(!saved.contains(&format!("-d {NODE_IP}/32")), "a local externalIP got a rule:\n{saved}");
    assert!(!node.lab.ok("node", &["nft", "list", "tables"]).contains("inet ringport"));

    assert_web_is_served(&node);
    assert_dns_through_cluster_ip(&node);
    assert_no_endpoints_fails_fast(&node);
    delete_extra_and_check(&node, || {
        node.lab.ok("node", &["iptables-save", "-t", "nat"]).contains("10.96.0.30")
    });

    let ringport = node.ringport;
    node.lab.stop(ringport);
    // An address on lo that ringport did not add must survive cleanup.
    node.lab.ok("node", &["ip", "addr", "add", "169.254.99.9/32", "dev", "lo"]);
    assert!(node.lab.ok("node", &["ip", "addr", "show", "lo"]).contains("169.254.99.2/32"));
    let cleaned = node.cleanup();
    assert!(cleaned.contains("removed RINGPORT-* iptables chains"), "{cleaned}");
    assert!(cleaned.contains("removed the proxy address 169.254.99.2 from lo"), "{cleaned}");
    let lo = node.lab.ok("node", &["ip", "addr", "show", "lo"]);
    assert!(!lo.contains("169.254.99.2"), "the custom proxy address is still on lo:\n{lo}");
    assert!(lo.contains("169.254.99.9/32"), "cleanup removed an address it did not add:\n{lo}");
    let saved = node.lab.ok("node", &["iptables-save"]) + &node.lab.ok("node", &["ip6tables-save"]);
    assert!(!saved.contains("RINGPORT"), "{saved}");
    assert!(!node.lab.ok("node", &["nft", "list", "ruleset"]).contains("RINGPORT"));
    assert_eq!(node.cleanup().trim(), "nothing to remove");
}

/// (6) A test that fails half-way still leaves no namespace and no process.
#[test]
fn a_failing_lab_still_removes_its_namespaces_and_processes() {
    netns::require_privileges_and_tools(&TOOLS);
    let (tx, rx) = std::sync::mpsc::channel();
    let failed = std::thread::spawn(move || {
        let node = Node::start("nft");
        tx.send((node.lab.namespaces().to_vec(), node.pid())).expect("send");
        panic!("a deliberate failure with ringport, backends and rules in place");
    })
    .join();
    assert!(failed.is_err(), "the inner test was meant to fail");
    let (namespaces, pid) = rx.recv().expect("the lab was built before the failure");
    assert_eq!(namespaces.len(), 5, "{namespaces:?}");
    let left: Vec<String> =
        netns::existing_namespaces().into_iter().filter(|n| namespaces.contains(n)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "ringport {pid} left running");
}

#[test]
fn systemd_hears_ready_only_once_the_rules_exist() {
    netns::require_privileges_and_tools(&TOOLS);
    let mut lab = Lab::new();
    lab.topology(&BACKENDS);
    let config = lab.scratch.path().join("manifests");
    std::fs::create_dir_all(&config).expect("manifest dir");
    std::fs::write(config.join("services.yaml"), manifest(false)).expect("manifest");
    // A path socket: reachable from the node namespace (paths are not
    // per network namespace).
    let notify = lab.scratch.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify).expect("notify socket");
    socket.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let log = lab.scratch.path().join("ringport.log");
    let env = format!("NOTIFY_SOCKET={}", notify.display());
    lab.spawn_ringport("node", &["env", &env], &config, "nft", &[], &log);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no notification: {e}\n{}", read_log()));
    // At once, before anything else can catch up: the rules are in place.
    let table = lab.exec("node", &["nft", "list", "table", "inet", "ringport"]);
    assert_eq!(&buf[..n], b"READY=1", "{}", read_log());
    let listing = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success() && listing.contains("tcp . 10.96.0.10 . 80 : "),
        "READY=1 before the rules: {}{listing}\n{}",
        String::from_utf8_lossy(&table.stderr),
        read_log()
    );
}
