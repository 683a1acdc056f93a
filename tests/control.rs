//! The control plane driven directly, as the engine drives it, on
//! loopback only: incremental updates must leave the same listeners, in
//! the same hands, as the same objects applied whole. No traffic; the
//! listeners are real sockets (external IPs are loopback addresses, served
//! directly since no rules are programmed).

mod common;
mod netns;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use ringport::balance::BalanceOptions;
use ringport::balance::health::HealthRegistry;
use ringport::budget::Budget;
use ringport::config::{Manifests, parse_str};
use ringport::control::Control;
use ringport::dataplane::{DataPlane, WorkerConfig};
use ringport::listen::{Binder, ListenOptions, ListenRole, ProxyPortMode};
use ringport::metrics::Metrics;
use ringport::model::{Origin, ServiceName};
use ringport::snapshot::Snapshot;
use ringport::table::Delta;

struct Rig {
    control: Control,
    metrics: Arc<Metrics>,
    data_plane: Option<DataPlane>,
}

impl Rig {
    /// A control plane on loopback with one worker; `tolerant`: as for the
    /// API source (serve through cross-object errors).
    fn new(tolerant: bool) -> Self {
        Self::with(tolerant, Vec::new())
    }

    /// As [`Rig::new`], node ports on the node addresses in `nodeport`.
    fn with(tolerant: bool, nodeport: Vec<ipnet::IpNet>) -> Self {
        Self::build(tolerant, nodeport, None)
    }

    /// As [`Rig::new`], refusing what does not fit `budget`.
    fn with_budget(budget: Budget) -> Self {
        Self::build(false, Vec::new(), Some(budget))
    }

    /// As [`Rig::with_budget`], every service port served through the
    /// shared proxy ports.
    fn shared_with_budget(budget: Budget) -> Self {
        Self::build_in(ProxyPortMode::Shared, false, Vec::new(), Some(budget))
    }

    fn build(tolerant: bool, nodeport: Vec<ipnet::IpNet>, budget: Option<Budget>) -> Self {
        Self::build_in(ProxyPortMode::PerService, tolerant, nodeport, budget)
    }

    fn build_in(
        mode: ProxyPortMode,
        tolerant: bool,
        nodeport: Vec<ipnet::IpNet>,
        budget: Option<Budget>,
    ) -> Self {
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let metrics = Arc::new(Metrics::new(1));
        let config = WorkerConfig { workers: 1, pin: false, ..WorkerConfig::default() };
        let data_plane = DataPlane::start(Arc::clone(&snapshot), config).expect("data plane");
        let binder = Binder::new(ListenOptions {
            bind_address: Ipv4Addr::LOCALHOST.into(),
            bind_address6: None,
            proxy_port_range: None,
            nodeport_addresses: nodeport,
            workers: 1,
            redirect_rules: false,
            proxy_port_mode: mode,
        });
        let control = Control::new(
            binder,
            BalanceOptions::default(),
            HealthRegistry::default(),
            Arc::clone(&metrics),
            snapshot,
            Arc::new(AtomicBool::new(false)),
        );
        let control = if tolerant { control.tolerate_cross_object_errors() } else { control };
        let control = match budget {
            Some(budget) => control.with_budget(budget),
            None => control,
        };
        Self { control, metrics, data_plane: Some(data_plane) }
    }

    /// Add or replace the objects of `yaml`.
    fn set(&mut self, yaml: &str) -> ringport::control::Applied {
        self.try_set(yaml).expect("update applied").expect("a change")
    }

    /// [`Rig::set`], refused or not.
    fn try_set(
        &mut self,
        yaml: &str,
    ) -> Result<Option<ringport::control::Applied>, ringport::control::Rejected> {
        let m = parse_str(yaml, "test").expect("manifest");
        let mut delta = Delta::default();
        for s in m.services {
            delta.services.insert(s.name.clone(), Some(s));
        }
        for sl in m.slices {
            delta.slices.insert(sl.id.clone(), Some(sl));
        }
        self.control.apply(delta, self.data_plane.as_ref().expect("running"))
    }

    /// Remove the Service `name` and its slice `name-1`.
    fn delete(&mut self, name: &str) {
        let mut delta = Delta::default();
        delta.services.insert(ServiceName::new("t", name), None);
        delta.slices.insert(ServiceName::new("t", format!("{name}-1")), None);
        self.control
            .apply(delta, self.data_plane.as_ref().expect("running"))
            .expect("delete applied")
            .expect("a change");
    }

    fn replace(&mut self, manifests: Manifests) {
        self.control
            .replace(manifests, self.data_plane.as_ref().expect("running"))
            .expect("replace applied")
            .expect("a change");
    }

    /// The service holding each external-IP listener, by address.
    fn external_owners(&self) -> Vec<(SocketAddr, String)> {
        let snapshot = self.control.current();
        let mut owners: Vec<(SocketAddr, String)> = snapshot
            .listeners
            .iter()
            .filter(|l| matches!(l.key.role, ListenRole::External(_)))
            .map(|l| (l.addr, l.key.port.service.name.to_string()))
            .collect();
        owners.sort();
        owners
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(d) = self.data_plane.take() {
            d.stop();
        }
    }
}

/// A TCP Service `name` in namespace `t` on cluster IP 10.96.0.`n`, port
/// `port`, with `external` IPs, and a slice `name-1` of `endpoints`.
fn service(name: &str, n: u8, port: u16, external: &[&str], endpoints: &[SocketAddr]) -> String {
    let ext = external.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
    let target = endpoints.first().map_or(8080, |e| e.port());
    let addrs: String = endpoints.iter().map(|e| format!("{{addresses: [\"{}\"]}}, ", e.ip())).collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\n\
         spec:\n  clusterIP: 10.96.0.{n}\n  externalIPs: [{ext}]\n  ports: [{{name: p, port: {port}, protocol: TCP}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: p, port: {target}}}]\nendpoints: [{addrs}]\n"
    )
}

fn backend() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9))
}

/// M4: a port whose endpoint a new listener catches keeps its listeners;
/// caught twice, it must still hold each of them once.
#[test]
fn a_port_caught_twice_holds_each_listener_once() {
    let mut rig = Rig::new(true);
    let port = common::free_port();
    let (seven, eight) = (SocketAddr::from(([127, 0, 0, 7], port)), SocketAddr::from(([127, 0, 0, 8], port)));
    rig.set(&service("u", 1, 80, &[], &[seven, eight]));
    // Each new external listener is where one of u's endpoints points.
    rig.set(&service("b", 2, port, &["127.0.0.7"], &[backend()]));
    rig.set(&service("c", 3, port, &["127.0.0.8"], &[backend()]));
    let snapshot = rig.control.current();
    let ids: Vec<_> = snapshot.listeners.iter().map(|l| l.id).collect();
    let unique: HashSet<_> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "a listener listed twice: {:?}", snapshot.listeners);
    // u (proxy), b and c (proxy, external).
    assert_eq!(ids.len(), 5, "{:?}", snapshot.listeners);
}

/// A new listener is checked against the unchanged ports only where some
/// endpoint uses its port number (a count kept change by change): the
/// count must follow endpoints that come and go, so an endpoint added by a
/// delta, on a number another port stopped using, is still caught.
#[test]
fn a_new_listener_catches_an_endpoint_on_its_number_after_others_came_and_went() {
    let mut rig = Rig::new(true);
    let (port, other) = (common::free_port(), common::free_port());
    let seven = SocketAddr::from(([127, 0, 0, 7], port));
    // (One target port per slice: the endpoints of a Service share it.)
    let (nine, nine_other) =
        (SocketAddr::from(([127, 0, 0, 9], port)), SocketAddr::from(([127, 0, 0, 9], other)));
    // v uses the number, then leaves; u takes it up in a later delta.
    rig.set(&service("v", 4, 80, &[], &[seven]));
    rig.set(&service("u", 1, 80, &[], &[nine_other]));
    rig.delete("v");
    rig.set(&service("u", 1, 80, &[], &[nine, seven]));
    let endpoints = |rig: &Rig| -> Vec<SocketAddr> {
        let snapshot = rig.control.current();
        let u = snapshot.ports.iter().find(|p| p.spec.name.service.name == "u").expect("u");
        u.spec.endpoints.iter().map(|e| e.addr.0).collect()
    };
    assert_eq!(endpoints(&rig), [seven, nine]);
    // b's new external listener is where u's second endpoint points.
    rig.set(&service("b", 2, port, &["127.0.0.7"], &[backend()]));
    assert_eq!(endpoints(&rig), [nine], "u's endpoint on b's listener is left out");
}

/// M1: a clash loser listens once the winner is gone, without a change
/// of its own.
#[test]
fn a_clash_loser_listens_once_the_winner_leaves() {
    let mut rig = Rig::new(true);
    let port = common::free_port();
    let addr = SocketAddr::from(([127, 0, 0, 5], port));
    rig.set(&service("a", 1, port, &["127.0.0.5"], &[backend()]));
    let loser = rig.set(&service("b", 2, port, &["127.0.0.5"], &[backend()]));
    assert_eq!(loser.summary.bind_errors, 1, "b clashes with a");
    assert_eq!(rig.external_owners(), vec![(addr, "a".to_string())]);
    rig.delete("a");
    assert_eq!(rig.external_owners(), vec![(addr, "b".to_string())], "b retried when a left");
}

/// M2: the first Service by name holds a clashed address, whatever the
/// order the Services came in (the rules pick the same one).
#[test]
fn the_clash_winner_is_the_first_by_name_in_any_order() {
    let port = common::free_port();
    let addr = SocketAddr::from(([127, 0, 0, 6], port));
    let (a, b) = (
        service("a", 1, port, &["127.0.0.6"], &[backend()]),
        service("b", 2, port, &["127.0.0.6"], &[backend()]),
    );
    let mut incremental = Rig::new(true);
    incremental.set(&b);
    incremental.set(&a);
    assert_eq!(incremental.external_owners(), vec![(addr, "a".to_string())]);
    drop(incremental);
    let mut whole = Rig::new(true);
    whole.replace(parse_str(&(b + &a), "test").expect("manifest"));
    assert_eq!(whole.external_owners(), vec![(addr, "a".to_string())]);
}

/// S3: a change that changes no service port (a resync, a SIGHUP with
/// nothing changed) publishes nothing.
#[test]
fn an_empty_change_publishes_nothing() {
    let mut rig = Rig::new(false);
    let port = common::free_port();
    let yaml = service("a", 1, port, &[], &[backend()]);
    let first = rig.set(&yaml);
    let plane = rig.data_plane.as_ref().expect("running");
    let empty = rig.control.apply(Delta::default(), plane).expect("accepted");
    assert!(empty.is_none(), "an empty delta published {empty:?}");
    let same = rig.control.replace(parse_str(&yaml, "test").expect("manifest"), plane).expect("accepted");
    assert!(same.is_none(), "the same state again published {same:?}");
    assert_eq!(rig.control.current().generation, first.generation);
}

/// M3: node ports follow the node's addresses: one added to an interface
/// is listened on at the next update, though the port did not change.
#[test]
fn node_ports_follow_an_address_added_to_the_node() {
    netns::require_privileges_and_tools(&["ip"]);
    let mut lab = netns::Lab::new();
    let ns = lab.add_ns("node");
    netns::ip(&["-n", &ns, "addr", "add", "10.77.0.1/32", "dev", "lo"]);
    let node_ports = |rig: &Rig| -> Vec<String> {
        let snapshot = rig.control.current();
        let mut v: Vec<String> = snapshot
            .listeners
            .iter()
            .filter(|l| matches!(l.key.role, ListenRole::NodePort(_)))
            .map(|l| l.addr.to_string())
            .collect();
        v.sort();
        v
    };
    let ns2 = ns.clone();
    netns::in_namespace(&ns, move || {
        let mut rig = Rig::with(false, vec!["10.77.0.0/16".parse().expect("net")]);
        let a = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: t}\n\
                 spec:\n  type: NodePort\n  clusterIP: 10.96.0.1\n  ports: [{name: p, port: 80, nodePort: 30080}]\n\
                 ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: a-1, namespace: t, labels: {kubernetes.io/service-name: a}}\n\
                 addressType: IPv4\nports: [{name: p, port: 8080}]\nendpoints: [{addresses: [\"10.1.0.1\"]}]\n";
        rig.set(a);
        assert_eq!(node_ports(&rig), vec!["10.77.0.1:30080".to_string()]);
        netns::ip(&["-n", &ns2, "addr", "add", "10.77.0.2/32", "dev", "lo"]);
        // Another Service changes; a does not.
        rig.set(&service("b", 2, 81, &[], &[backend()]));
        assert_eq!(node_ports(&rig), vec!["10.77.0.1:30080".to_string(), "10.77.0.2:30080".to_string()]);
        netns::ip(&["-n", &ns2, "addr", "del", "10.77.0.1/32", "dev", "lo"]);
        rig.set(&service("b", 2, 82, &[], &[backend()]));
        assert_eq!(node_ports(&rig), vec!["10.77.0.2:30080".to_string()]);
    });
    drop(lab);
}

/// S8: a snapshot counts as a full build when every port was built: the
/// first update of a table (however it came), not one that follows an
/// empty snapshot.
#[test]
fn a_build_is_full_when_every_port_is_built() {
    let mut rig = Rig::new(false);
    let (a, b) = (service("a", 1, 80, &[], &[backend()]), service("b", 2, 81, &[], &[backend()]));
    rig.set(&(a.clone() + &b));
    rig.set(&service("b", 2, 82, &[], &[backend()]));
    // Every port changes at once: a full build too.
    rig.set(&(service("a", 1, 83, &[], &[backend()]) + &service("b", 2, 84, &[], &[backend()])));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &rig.metrics.registry()).expect("encodes");
    let count = |kind: &str| {
        let line = format!("ringport_snapshot_build_seconds_count{{kind=\"{kind}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(line.as_str())).map(str::to_string)
    };
    assert_eq!(count("full").as_deref(), Some("2"), "{text}");
    assert_eq!(count("partial").as_deref(), Some("1"), "{text}");
}

/// S7: random changes applied one by one leave what the same objects give
/// when applied whole to a fresh control plane: the same service ports,
/// listeners (by service, role and address; proxy port numbers aside),
/// and routes. Clashes on external IPs are frequent; external
/// IPs are on `127.0.<net>.x`, a net of each control plane's own.
#[test]
fn random_changes_match_the_same_state_applied_whole() {
    const SERVICES: usize = 6;
    const STEPS: usize = 40;
    let base = common::free_port();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    eprintln!("seed {seed:#x}");
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // Per service: None (absent) or (port offset, external IP, endpoints).
    type Shape = Option<(u16, Option<u8>, u8)>;
    let yaml = |shapes: &[Shape], net: u8| -> String {
        let mut y = String::new();
        for (i, s) in shapes.iter().enumerate() {
            let Some((port, ext, eps)) = s else { continue };
            let ext: Vec<String> = ext.iter().map(|e| format!("127.0.{net}.{e}")).collect();
            let ext: Vec<&str> = ext.iter().map(String::as_str).collect();
            let endpoints: Vec<SocketAddr> =
                (0..*eps).map(|e| SocketAddr::from(([10, 1, i as u8, e + 1], 8080))).collect();
            y += &service(&format!("s{i}"), i as u8 + 1, base + port, &ext, &endpoints);
        }
        y
    };
    let view = |rig: &Rig| {
        let snapshot = rig.control.current();
        let ports: Vec<String> = snapshot
            .ports
            .iter()
            .map(|p| {
                let mut spec = ringport::model::ServicePort::clone(&p.spec);
                spec.origin = Origin::new("");
                format!("{spec:?}")
            })
            .collect();
        let mut listeners: Vec<String> = snapshot
            .listeners
            .iter()
            .map(|l| {
                let addr =
                    if l.key.role.is_proxy() { "proxy".to_string() } else { l.addr.port().to_string() };
                let route = snapshot.route(l.id).map(|r| r.port.spec.name.to_string());
                let ip = match l.key.role {
                    ListenRole::External(std::net::IpAddr::V4(v4)) => v4.octets()[3].to_string(),
                    _ => String::new(),
                };
                format!("{} {} {ip} {addr} -> {route:?}", l.key.port, l.key.role)
            })
            .collect();
        listeners.sort();
        (ports, listeners)
    };
    let mut shapes: Vec<Shape> = vec![None; SERVICES];
    let mut incremental = Rig::new(true);
    for step in 0..STEPS {
        let i = next(SERVICES as u64) as usize;
        let was = shapes[i];
        shapes[i] = match next(4) {
            0 => None,
            _ => Some((next(2) as u16, (next(3) > 0).then(|| 5 + next(2) as u8), next(3) as u8)),
        };
        let one = std::slice::from_ref(&shapes[i]);
        let mut delta = Delta::default();
        let name = format!("s{i}");
        match &shapes[i] {
            Some(_) => {
                let mut single = vec![None; SERVICES];
                single[i] = one[0];
                let m = parse_str(&yaml(&single, 20), "test").expect("manifest");
                for s in m.services {
                    delta.services.insert(s.name.clone(), Some(s));
                }
                for sl in m.slices {
                    delta.slices.insert(sl.id.clone(), Some(sl));
                }
            }
            None if was.is_some() => {
                delta.services.insert(ServiceName::new("t", &name), None);
                delta.slices.insert(ServiceName::new("t", format!("{name}-1")), None);
            }
            None => continue,
        }
        let plane = incremental.data_plane.as_ref().expect("running");
        incremental.control.apply(delta, plane).expect("applied");
        let mut whole = Rig::new(true);
        let m = parse_str(&yaml(&shapes, 21), "test").expect("manifest");
        let plane = whole.data_plane.as_ref().expect("running");
        whole.control.replace(m, plane).expect("applied");
        let (ports_a, listeners_a) = view(&incremental);
        let (ports_b, listeners_b) = view(&whole);
        // Port specs name their external IPs: compare them net-blind.
        let blind =
            |v: Vec<String>, net: &str| v.into_iter().map(|s| s.replace(net, "127.0.N.")).collect::<Vec<_>>();
        assert_eq!(blind(ports_a, "127.0.20."), blind(ports_b, "127.0.21."), "step {step}: service ports");
        assert_eq!(listeners_a, listeners_b, "step {step}: listeners ({shapes:?})");
    }
}

/// S4: the counters of a Service deleted are forgotten by the update that
/// deletes it, not kept until a periodic sweep.
#[test]
fn a_deleted_port_is_forgotten_by_its_update() {
    let mut rig = Rig::new(false);
    rig.set(&(service("a", 1, 80, &[], &[backend()]) + &service("b", 2, 81, &[], &[backend()])));
    assert_eq!(rig.metrics.remembered(), 2);
    // The worker follows the first snapshot meanwhile (while it holds it,
    // a's counters are held, and left to the periodic sweep).
    std::thread::sleep(std::time::Duration::from_millis(200));
    rig.delete("a");
    assert_eq!(rig.metrics.remembered(), 1, "the deleted port's counters are still remembered");
}

/// In shared mode a port without an external IP counts no listen address
/// of its own (the shared proxy port counts once): one that gains an
/// address and gives it back counts it while it holds it, and only then.
#[test]
fn the_budget_counts_a_shared_mode_port_s_own_addresses_as_they_come_and_go() {
    let fixed = Budget { limit: 0, workers: 1, udp_max_flows: 0 }.demand_of(0, false).fixed;
    // The shared proxy port and one external IP, no more.
    let mut rig = Rig::shared_with_budget(Budget { limit: fixed + 2, workers: 1, udp_max_flows: 0 });
    let port = common::free_port();
    rig.set(&service("a", 1, port, &[], &[backend()]));
    rig.set(&service("b", 2, port, &[], &[backend()]));
    rig.set(&service("a", 1, port, &["127.0.0.9"], &[backend()]));
    let refused = rig.try_set(&service("b", 2, port, &["127.0.0.10"], &[backend()])).expect_err("3 > 2");
    let why: Vec<String> = refused.0.iter().map(ToString::to_string).collect();
    assert!(why.iter().any(|e| e.contains("3 listen addresses")), "{why:?}");
    // a gives its address back (counting none again): b's fits, and a
    // port changed without a change to what it counts still counts none.
    rig.set(&service("a", 1, port, &[], &[backend()]));
    rig.set(&service("b", 2, port, &["127.0.0.10"], &[backend()]));
    rig.set(&service("a", 1, port, &[], &[backend(), SocketAddr::from(([127, 0, 0, 2], 9))]));
    assert_eq!(rig.external_owners(), vec![(SocketAddr::from(([127, 0, 0, 10], port)), "b".to_string())]);
    let refused = rig.try_set(&service("a", 1, port, &["127.0.0.9"], &[backend()])).expect_err("3 > 2");
    assert!(refused.0.iter().any(|e| e.to_string().contains("3 listen addresses")));
}

/// The fd budget counts what a change adds less what the ports it replaces
/// counted (from one view of the node per update): a port that gains an
/// address fits where counting its old addresses too would not.
#[test]
fn the_budget_counts_what_a_change_adds_less_what_it_replaces() {
    let fixed = Budget { limit: 0, workers: 1, udp_max_flows: 0 }.demand_of(0, false).fixed;
    // Room for three listen addresses on the one worker, no more.
    let mut rig = Rig::with_budget(Budget { limit: fixed + 3, workers: 1, udp_max_flows: 0 });
    let port = common::free_port();
    rig.set(&service("a", 1, port, &[], &[backend()]));
    rig.set(&service("b", 2, port, &[], &[backend()]));
    // a: a proxy port and an external IP; 2 + 1 for b.
    rig.set(&service("a", 1, port, &["127.0.0.9"], &[backend()]));
    let generation = rig.control.current().generation;
    let refused = rig.try_set(&service("b", 2, port, &["127.0.0.10"], &[backend()])).expect_err("4 > 3");
    let why: Vec<String> = refused.0.iter().map(ToString::to_string).collect();
    assert!(why.iter().any(|e| e.contains("4 listen addresses")), "{why:?}");
    assert_eq!(rig.control.current().generation, generation, "the last good state serves");
    // a gives its address back: b's fits.
    rig.set(&service("a", 1, port, &[], &[backend()]));
    rig.set(&service("b", 2, port, &["127.0.0.10"], &[backend()]));
    assert_eq!(rig.external_owners(), vec![(SocketAddr::from(([127, 0, 0, 10], port)), "b".to_string())]);
}
