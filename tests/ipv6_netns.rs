//! IPv6 and dual-stack Services end to end, in network namespaces: the
//! real `ringport` binary in a dual-stack node namespace with real nft (or
//! iptables and ip6tables) rules, a client, three backends on both
//! families (each a real HTTP server and a UDP echo server that name
//! themselves), and a Calico-style pod behind a veth with no address but
//! its link-local one.
//!
//! From the client, the node and the pod, over TCP and UDP: an IPv6
//! ClusterIP, a NodePort on the node's IPv6 address, both ClusterIPs of a
//! dual-stack Service, session affinity for an IPv6 client, and
//! `loadBalancerSourceRanges` on an IPv6 LoadBalancer IP; then a bad
//! `ipFamilies` keeps the last good state serving, and `ringport cleanup`
//! removes both families' rules and both proxy addresses.
//!
//! Needs root and `ip`, `nft`, `iptables`, `ip6tables`, `curl`, `python3`
//! (CI has them through scripts/test.sh); without them every test here
//! fails saying so. Each test takes a few seconds.

mod netns;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use netns::{CLIENT_IP6, Lab, NODE_IP, NODE_IP6, ipv6_of};

const TOOLS: [&str; 7] = ["ip", "nft", "iptables", "ip6tables", "ip6tables-save", "curl", "python3"];
const BACKENDS: [(&str, &str); 3] = [("be1", "10.200.0.11"), ("be2", "10.200.0.12"), ("be3", "10.200.0.13")];
/// A second IPv6 address of the node, on the lab bridge.
const NODE_IP6_2: &str = "fd10:200::100";
/// The Calico-style pod: a /128 behind an address-less veth.
const POD_IP6: &str = "fd10:220::5";

/// An EndpointSlice of `family` for `service` with every backend's address
/// of that family (or only `only`'s), on `port`/`protocol`.
fn slice(service: &str, family: &str, port: u16, protocol: &str, only: Option<&str>) -> String {
    let addresses: Vec<String> = BACKENDS
        .iter()
        .filter(|(role, _)| only.is_none_or(|o| o == *role))
        .map(|(_, v4)| {
            let ip = if family == "IPv6" { ipv6_of(v4) } else { v4.to_string() };
            format!("  - addresses: [\"{ip}\"]\n")
        })
        .collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {service}-{}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\n\
         addressType: {family}\nports: [{{port: {port}, protocol: {protocol}}}]\nendpoints:\n{}",
        family.to_lowercase(),
        addresses.concat()
    )
}

/// `web6`: single-stack IPv6, ClusterIP and NodePort, three backends (and
/// an IPv4 slice, which it must not use); `dual`: a dual-stack ClusterIP
/// pair with ClientIP affinity; `echo`: UDP, dual-stack, with a NodePort;
/// `guarded`: an IPv6 LoadBalancer IP open to the client alone. With
/// `bad_families`, web6's `ipFamilies` contradicts its cluster IP.
fn manifest(bad_families: bool) -> String {
    let families = if bad_families { "[IPv4]" } else { "[IPv6]" };
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web6, namespace: default}}\nspec:\n  type: NodePort\n  \
         ipFamilyPolicy: SingleStack\n  ipFamilies: {families}\n  clusterIP: fd10:96::10\n  clusterIPs: [fd10:96::10]\n  \
         ports:\n  - {{port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}\n"
    );
    y += &slice("web6", "IPv6", 8080, "TCP", None);
    // An IPv4 endpoint behind an IPv6-only Service: not used (a warning).
    y += &slice("web6", "IPv4", 8080, "TCP", Some("be3"));
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: dual, namespace: default}\nspec:\n  \
          ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 10.96.0.20\n  \
          clusterIPs: [10.96.0.20, \"fd10:96::20\"]\n  sessionAffinity: ClientIP\n  \
          ports:\n  - {port: 80, targetPort: 8080, protocol: TCP}\n";
    y += &slice("dual", "IPv4", 8080, "TCP", None);
    y += &slice("dual", "IPv6", 8080, "TCP", None);
    // `split`: dual-stack, be1 its only IPv4 endpoint, be2 its only IPv6 one.
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: split, namespace: default}\nspec:\n  \
          ipFamilyPolicy: PreferDualStack\n  clusterIPs: [10.96.0.40, \"fd10:96::40\"]\n  \
          ports:\n  - {port: 80, targetPort: 8080, protocol: TCP}\n";
    y += &slice("split", "IPv4", 8080, "TCP", Some("be1"));
    y += &slice("split", "IPv6", 8080, "TCP", Some("be2"));
    // `half`: dual-stack, IPv4 endpoints only (TCP and UDP).
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: half, namespace: default}\nspec:\n  \
          clusterIPs: [10.96.0.60, \"fd10:96::60\"]\n  ports:\n  - {name: web, port: 80, targetPort: 8080}\n  \
          - {name: dns, port: 53, targetPort: 5353, protocol: UDP}\n";
    y += &format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: half-ipv4\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: half}}\naddressType: IPv4\n\
         ports: [{{name: web, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]\n\
         endpoints:\n  - addresses: [\"{}\"]\n",
        BACKENDS[0].1
    );
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\nspec:\n  type: NodePort\n  \
          ipFamilyPolicy: PreferDualStack\n  clusterIPs: [\"fd10:96::53\", 10.96.0.53]\n  \
          ports:\n  - {port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}\n";
    y += &slice("echo", "IPv4", 5353, "UDP", Some("be1"));
    y += &slice("echo", "IPv6", 5353, "UDP", Some("be1"));
    y += &format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: guarded, namespace: default}}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: fd10:96::30\n  loadBalancerSourceRanges: [\"{CLIENT_IP6}/128\"]\n  \
         ports:\n  - {{port: 80, targetPort: 8080, nodePort: 30081, protocol: TCP}}\n\
         status:\n  loadBalancer:\n    ingress: [{{ip: \"fd10:98::10\"}}]\n"
    );
    y += &slice("guarded", "IPv6", 8080, "TCP", Some("be2"));
    // `outside`: an IPv6 externalIP, not on the node (routed to it).
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: outside, namespace: default}\nspec:\n  \
          clusterIP: fd10:96::80\n  externalIPs: [\"fd10:97::10\"]\n  \
          ports:\n  - {port: 80, targetPort: 8080, protocol: TCP}\n";
    y += &slice("outside", "IPv6", 8080, "TCP", Some("be3"));
    // `web4`: single-stack IPv4 with a NodePort, and an IPv6 slice it must
    // not use: its node port listens on IPv4 node addresses only.
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: web4, namespace: default}\nspec:\n  type: NodePort\n  \
          clusterIP: 10.96.0.70\n  ports:\n  - {port: 80, targetPort: 8080, nodePort: 30070, protocol: TCP}\n";
    y += &slice("web4", "IPv4", 8080, "TCP", Some("be1"));
    y += &slice("web4", "IPv6", 8080, "TCP", Some("be2"));
    y
}

/// A UDP echo server naming itself, on both families (`::`, not v6-only).
const ECHO: &str = "import socket, sys\n\
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
s.bind(('::', 5353))\n\
while True:\n    d, a = s.recvfrom(2048)\n    s.sendto(sys.argv[1].encode(), a)\n";

/// One UDP question to `ip port`: prints `ANSWER SOURCE_IP SOURCE_PORT`,
/// or `timeout`. Unconnected, so a reply from another source would show.
const ASK: &str = "import socket, sys\n\
ip, port = sys.argv[1], int(sys.argv[2])\n\
s = socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET, socket.SOCK_DGRAM)\n\
s.settimeout(2)\n\
for _ in range(3):\n    s.sendto(b'hello', (ip, port))\n    try:\n        d, a = s.recvfrom(2048)\n        print(d.decode(), a[0], a[1])\n        break\n    except socket.timeout:\n        pass\n\
else:\n    print('timeout')\n";

struct Node {
    lab: Lab,
    ringport: usize,
    config: PathBuf,
    log: PathBuf,
}

impl Node {
    fn start(redirect: &str) -> Node {
        netns::require_privileges_and_tools(&TOOLS);
        let mut lab = Lab::new();
        lab.topology(&BACKENDS);
        lab.add_ipv6(&BACKENDS);
        // A second node address, not the one the kernel would choose as a
        // reply's source: a UDP reply from a wildcard socket leaves from it
        // only if IPV6_PKTINFO says so.
        let second = format!("{NODE_IP6_2}/64");
        netns::ip(&["-n", &lab.ns("node"), "-6", "addr", "add", &second, "dev", "br0", "nodad"]);
        add_calico_style_pod(&mut lab);
        for (role, _) in BACKENDS {
            let root = lab.scratch.path().join(role);
            std::fs::create_dir_all(&root).expect("backend dir");
            std::fs::write(root.join("whoami"), role).expect("backend file");
            let log = lab.scratch.path().join(format!("{role}.log"));
            let root = root.to_string_lossy().into_owned();
            // `--bind ::` serves both families (python's dual-stack server).
            lab.spawn(
                role,
                &["python3", "-m", "http.server", "--bind", "::", "8080", "--directory", &root],
                &log,
            );
            let log = lab.scratch.path().join(format!("{role}-echo.log"));
            lab.spawn(role, &["python3", "-c", ECHO, role], &log);
        }
        for (role, v4) in BACKENDS {
            for url in [format!("http://{v4}:8080/whoami"), format!("http://[{}]:8080/whoami", ipv6_of(v4))] {
                lab.eventually(Duration::from_secs(20), &format!("backend {role} serving {url}"), || {
                    lab.curl("node", &url).1 == role
                });
            }
        }
        let config = lab.scratch.path().join("manifests");
        std::fs::create_dir_all(&config).expect("manifest dir");
        std::fs::write(config.join("services.yaml"), manifest(false)).expect("manifest");
        let log = lab.scratch.path().join("ringport.log");
        let ringport = lab.spawn_ringport("node", &[], &config, redirect, &[], &log);
        lab.wait_ready("node", ringport, &log);
        Node { lab, ringport, config, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Which backends answer `n` requests to `url` from `role`.
    fn answers(&self, role: &str, url: &str, n: usize) -> BTreeSet<String> {
        (0..n)
            .map(|_| {
                let (code, body, err) = self.lab.curl_err(role, url);
                assert_eq!(code, 0, "curl {url} from {role}: exit {code}: {err}\n{}", self.log());
                body
            })
            .collect()
    }

    /// One UDP question from `role` to `ip port`: (answer, reply source).
    fn ask(&self, role: &str, ip: &str, port: u16) -> String {
        self.lab.ok(role, &["python3", "-c", ASK, ip, &port.to_string()]).trim().to_string()
    }

    fn rewrite_manifest(&self, text: &str) {
        let tmp = self.config.join(".services.yaml.tmp");
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.config.join("services.yaml")).expect("rename manifest");
    }
}

/// Calico/Cilium style: the pod has a /128 and routes everything via the
/// host side's link-local address; the host side has no other address, and
/// a /128 route to the pod. REDIRECT has no address to send to here (it
/// skips link-local ones); DNAT to the IPv6 proxy address does.
fn add_calico_style_pod(lab: &mut Lab) {
    let node = lab.ns("node");
    let pod = lab.add_ns("pod");
    netns::ip(&[
        "link", "add", "v-pod", "netns", &node, "type", "veth", "peer", "name", "eth0", "netns", &pod,
    ]);
    netns::ip(&["-n", &node, "-6", "addr", "add", "fe80::1/64", "dev", "v-pod", "nodad"]);
    netns::ip(&["-n", &node, "link", "set", "v-pod", "up"]);
    netns::ip(&["-n", &node, "-6", "route", "add", &format!("{POD_IP6}/128"), "dev", "v-pod"]);
    netns::ip(&["-n", &pod, "-6", "addr", "add", &format!("{POD_IP6}/128"), "dev", "eth0", "nodad"]);
    netns::ip(&["-n", &pod, "link", "set", "eth0", "up"]);
    netns::ip(&["-n", &pod, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"]);
    let global = lab.ok("node", &["ip", "-6", "-o", "addr", "show", "dev", "v-pod", "scope", "global"]);
    assert!(global.trim().is_empty(), "the pod's host-side veth must have no global address: {global}");
}

fn every_backend() -> BTreeSet<String> {
    BACKENDS.iter().map(|(role, _)| role.to_string()).collect()
}

fn one(role: &str) -> BTreeSet<String> {
    BTreeSet::from([role.to_string()])
}

/// Everything the issue asks for, with either redirect backend.
fn assert_ipv6_and_dual_stack_are_served(node: &Node) {
    // An IPv6 ClusterIP, round robin over its IPv6 endpoints, from another
    // host (PREROUTING), from the node itself (OUTPUT) and from a pod
    // behind an address-less veth. be3's IPv4 endpoint is not used, but be3
    // is reached on IPv6.
    for role in ["client", "node", "pod"] {
        assert_eq!(node.answers(role, "http://[fd10:96::10]/whoami", 6), every_backend(), "from {role}");
    }
    // A NodePort on the node's IPv6 address (the data plane listens on
    // `::`), from another host and from the node itself.
    let url = format!("http://[{NODE_IP6}]:30080/whoami");
    assert_eq!(node.answers("client", &url, 6), every_backend());
    assert_eq!(node.answers("node", &url, 6), every_backend());
    // A single-stack Service's NodePort listens in its own family only:
    // IPv6-only web6 is refused on the node's IPv4 address, IPv4-only web4
    // on its IPv6 address (a `[::]` listener would balance IPv6 clients
    // over IPv4 endpoints).
    assert_eq!(node.lab.probe("client", NODE_IP, 30080), "refused");
    assert_eq!(node.answers("client", &format!("http://{NODE_IP}:30070/whoami"), 2), one("be1"));
    assert_eq!(node.lab.probe("client", NODE_IP6, 30070), "refused");
    // Both ClusterIPs of the dual-stack Service; ClientIP affinity pins each
    // client (an IPv6 client included) to one backend.
    for role in ["client", "node", "pod"] {
        for vip in ["10.96.0.20", "[fd10:96::20]"] {
            if role == "pod" && !vip.starts_with('[') {
                continue; // the pod is IPv6-only
            }
            let seen = node.answers(role, &format!("http://{vip}/whoami"), 5);
            assert_eq!(seen.len(), 1, "affinity from {role} to {vip}: {seen:?}");
        }
    }
    // Each ClusterIP of a dual-stack Service uses the endpoints of its own
    // family only, as kube-proxy does.
    for role in ["client", "node"] {
        assert_eq!(node.answers(role, "http://10.96.0.40/whoami", 4), one("be1"), "from {role}");
        assert_eq!(node.answers(role, "http://[fd10:96::40]/whoami", 4), one("be2"), "from {role}");
    }
    // A dual-stack Service with IPv4 endpoints only: its IPv4 ClusterIP
    // serves, its IPv6 one refuses TCP at once (the IPv6 proxy port is
    // paused), as kube-proxy's IPv6 proxier, which sees no endpoint, would.
    assert_eq!(node.answers("client", "http://10.96.0.60/whoami", 2), one("be1"));
    assert_eq!(node.lab.probe("client", "fd10:96::60", 80), "refused");
    assert_eq!(node.ask("client", "10.96.0.60", 53), "be1 10.96.0.60 53");
    // UDP: the IPv6 and the IPv4 ClusterIP of a dual-stack Service, and a
    // NodePort on the node's IPv6 address (a wildcard socket: the reply
    // leaves from the address asked, through IPV6_PKTINFO). The reply must
    // come from the address and port the client sent to.
    for (role, ip, port) in [
        ("client", "fd10:96::53", 53),
        ("node", "fd10:96::53", 53),
        ("pod", "fd10:96::53", 53),
        ("client", "10.96.0.53", 53),
        ("client", NODE_IP6, 30053),
        ("client", NODE_IP6_2, 30053),
    ] {
        let answer = node.ask(role, ip, port);
        assert_eq!(answer, format!("be1 {ip} {port}"), "UDP from {role} to [{ip}]:{port}\n{}", node.log());
    }
    // An IPv6 externalIP (not local: DNATed to the IPv6 external proxy
    // port), from another host and from the node.
    for role in ["client", "node"] {
        assert_eq!(node.answers(role, "http://[fd10:97::10]/whoami", 2), one("be3"), "from {role}");
    }
    // loadBalancerSourceRanges on an IPv6 LB IP: the client's /128 is let
    // in, another host (be3) is dropped.
    assert_eq!(node.answers("client", "http://[fd10:98::10]/whoami", 2), one("be2"));
    assert_eq!(node.lab.probe("be3", "fd10:98::10", 80), "timeout", "be3 is outside the source ranges");
}

/// A bad `ipFamilies` is refused naming the Service and field, and the last
/// good state keeps serving; fixed, it is taken again.
fn assert_bad_families_keep_the_last_good_state(node: &Node) {
    node.rewrite_manifest(&manifest(true));
    node.lab.eventually(Duration::from_secs(10), "the bad ipFamilies reported", || {
        node.log().lines().any(|l| l.contains("Service default/web6") && l.contains("spec.ipFamilies[0]"))
    });
    assert_eq!(node.answers("client", "http://[fd10:96::10]/whoami", 3), every_backend());
    // Fixed, it is taken again: a reload is applied (a rejected one logs
    // "reload rejected", never "reloaded").
    let reloads = || node.log().lines().filter(|l| l.contains("reloaded")).count();
    let before = reloads();
    node.rewrite_manifest(&manifest(false));
    node.lab.eventually(Duration::from_secs(10), "the fixed manifest applied", || reloads() > before);
    assert_eq!(node.answers("client", "http://[fd10:96::10]/whoami", 3), every_backend());
}

fn assert_the_ipv4_endpoint_of_an_ipv6_service_is_not_used(node: &Node) {
    let text = node.lab.curl("node", "http://127.0.0.1:10249/debug/snapshot").1;
    let snapshot: serde_json::Value = serde_json::from_str(&text).expect("/debug/snapshot is JSON");
    let ports = snapshot["service_ports"].as_array().expect("service_ports");
    let web6 = ports.iter().find(|p| p["name"].as_str() == Some("default/web6")).expect("web6 is served");
    // IPv6-only: one proxy port, IPv6; one pair of balancers.
    let roles: Vec<&str> =
        web6["listeners"].as_array().expect("listeners").iter().filter_map(|l| l["role"].as_str()).collect();
    assert!(roles.contains(&"proxy6") && !roles.contains(&"proxy"), "{roles:?}");
    assert!(web6["internal"].is_object() && web6["ipv6"].is_null(), "{web6}");
    // Dual-stack: the balancers per family, the ones traffic uses.
    let split = ports.iter().find(|p| p["name"].as_str() == Some("default/split")).expect("split is served");
    let family = |f: &str| split[f]["internal"]["endpoints"].to_string();
    assert!(split["internal"].is_null(), "{split}");
    assert!(family("ipv4").contains("10.200.0.11") && !family("ipv4").contains("fd10"), "{split}");
    assert!(family("ipv6").contains("fd10:200::12") && !family("ipv6").contains("10.200"), "{split}");
    let endpoints = web6["endpoints"].to_string();
    assert!(endpoints.contains("fd10:200::13"), "{endpoints}");
    assert!(!endpoints.contains("10.200.0.13"), "web6 uses be3's IPv4 endpoint: {endpoints}");
    let log = node.log();
    assert!(log.contains("IPv4 endpoints are not used"), "no warning about be3's IPv4 slice:\n{log}");
}

/// Stop ringport and clean up: both families' rules, the IPv4 proxy
/// address and the IPv6 proxy route go, an administrator's addresses on
/// `lo` (IPv6 ones flagged as ringport's once were) stay, and a second
/// cleanup finds nothing.
fn stop_and_clean_up(node: &mut Node) {
    let ringport = node.ringport;
    node.lab.stop(ringport);
    // The IPv6 proxy address is a local route, never an address the kernel
    // could pick as a source.
    let addrs = node.lab.ok("node", &["ip", "-6", "addr", "show"]);
    assert!(!addrs.contains("fd72:696e:6770::1"), "the IPv6 proxy address is an address:\n{addrs}");
    let routes = node.lab.ok("node", &["ip", "-6", "route", "show", "table", "local", "proto", "114"]);
    assert!(routes.contains("local fd72:696e:6770::1 dev lo"), "no IPv6 proxy route on lo:\n{routes}");
    // An administrator's addresses, looking as ringport's IPv6 address once
    // did (nodad, deprecated), and an unlabelled IPv4 one.
    let admin = [
        vec!["-6", "addr", "add", "fd10:aa::1/64", "dev", "lo", "nodad", "preferred_lft", "0"],
        vec!["-6", "addr", "add", "fd10:ab::1/128", "dev", "lo", "nodad", "preferred_lft", "0"],
        vec!["addr", "add", "169.254.98.1/32", "dev", "lo", "scope", "host"],
    ];
    for args in &admin {
        node.lab.ok("node", &[&["ip"][..], args].concat());
    }
    let cleaned = node.lab.ok("node", &[env!("CARGO_BIN_EXE_ringport"), "cleanup"]);
    assert!(
        cleaned.contains("removed the local route of the proxy address fd72:696e:6770::1 from lo"),
        "{cleaned}"
    );
    assert!(cleaned.contains("removed the proxy address 169.254.99.1 from lo"), "{cleaned}");
    assert!(!cleaned.contains("fd10:a") && !cleaned.contains("169.254.98.1"), "{cleaned}");
    let lo = node.lab.ok("node", &["ip", "addr", "show", "dev", "lo"]);
    assert!(!lo.contains("169.254.99.1"), "{lo}");
    for kept in ["::1/128", "fd10:aa::1/64", "fd10:ab::1/128", "169.254.98.1/32"] {
        assert!(lo.contains(kept), "cleanup removed {kept} from lo:\n{lo}");
    }
    let routes = node.lab.ok("node", &["ip", "-6", "route", "show", "table", "local"]);
    assert!(!routes.contains("fd72:696e:6770::1"), "{routes}");
    let rules = node.lab.ok("node", &["nft", "list", "ruleset"])
        + &node.lab.ok("node", &["iptables-save"])
        + &node.lab.ok("node", &["ip6tables-save"]);
    assert!(!rules.contains("ringport") && !rules.contains("RINGPORT"), "{rules}");
    let again = node.lab.ok("node", &[env!("CARGO_BIN_EXE_ringport"), "cleanup"]);
    assert_eq!(again.trim(), "nothing to remove");
}

#[test]
fn nft_serves_ipv6_and_dual_stack_services_from_clients_nodes_and_address_less_pods() {
    let mut node = Node::start("nft");
    let table = node.lab.ok("node", &["nft", "list", "table", "inet", "ringport"]);
    println!("nft list table inet ringport:\n{table}");
    assert_eq!(table.matches("dnat ip6 to [fd72:696e:6770::1]").count(), 2, "{table}");
    assert!(table.contains("tcp . fd10:96::10 . 80 : "), "{table}");
    assert!(table.contains("udp . fd10:96::53 . 53 : "), "{table}");
    assert!(table.contains("ip6 daddr fd72:696e:6770::1 iif != \"lo\""), "{table}");
    // `half`'s IPv6 UDP ClusterIP has no IPv6 endpoint: rejected (ICMPv6).
    let noep6 = node.lab.ok("node", &["nft", "list", "set", "inet", "ringport", "noep6"]);
    assert!(noep6.contains("udp . fd10:96::60 . 53"), "{noep6}");
    assert_ipv6_and_dual_stack_are_served(&node);
    assert_the_ipv4_endpoint_of_an_ipv6_service_is_not_used(&node);
    assert_bad_families_keep_the_last_good_state(&node);
    stop_and_clean_up(&mut node);
}

#[test]
fn iptables_serves_ipv6_and_dual_stack_services_from_clients_nodes_and_address_less_pods() {
    let mut node = Node::start("iptables");
    let saved = node.lab.ok("node", &["ip6tables-save", "-t", "nat"]);
    println!("ip6tables-save -t nat:\n{saved}");
    assert!(
        saved.contains("-d fd10:96::10/128 -p tcp -m comment --comment \"default/web6\" -m tcp --dport 80 -j DNAT --to-destination [fd72:696e:6770::1]:"),
        "{saved}"
    );
    assert!(!node.lab.ok("node", &["nft", "list", "tables"]).contains("inet ringport"));
    let filter = node.lab.ok("node", &["ip6tables-save", "-t", "filter"]);
    assert!(
        filter.contains("-A RINGPORT-FORWARD -d fd10:96::60/128 -p udp -m udp --dport 53 -j REJECT --reject-with icmp6-port-unreachable"),
        "{filter}"
    );
    assert_ipv6_and_dual_stack_are_served(&node);
    assert_bad_families_keep_the_last_good_state(&node);
    stop_and_clean_up(&mut node);
}
