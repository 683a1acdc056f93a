//! Every manifest in `deploy/` parses into its `k8s-openapi` type (by
//! `kind`; an unknown kind fails), round-trips without losing a field (so a
//! misspelt field, which serde would silently drop, fails too), and says
//! what the node agent needs (among it: reaching the API server by its real
//! address, with no cluster DNS, so startup never depends on ringport's own
//! rules); the systemd unit has the keys it must have.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use serde::de::DeserializeOwned;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

#[derive(Default)]
struct Objects {
    daemonsets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
}

/// Deserializes `doc` as `T` and checks that nothing was dropped.
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &serde_json::Value, at: &str) -> T {
    let value: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{at}: {e}"));
    let back = serde_json::to_value(&value).unwrap();
    assert_eq!(&back, doc, "{at}: a field did not survive the round trip (misspelt or misplaced?)");
    value
}

fn load() -> Objects {
    let mut objects = Objects::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let at = format!("{} document {i}", file.display());
            let doc: serde_json::Value = serde_norway::Value::deserialize(doc)
                .and_then(serde_norway::from_value)
                .unwrap_or_else(|e| panic!("{at}: {e}"));
            let kind = (doc["apiVersion"].as_str().unwrap_or(""), doc["kind"].as_str().unwrap_or(""));
            match kind {
                // The kustomize base: tests/packaging.rs.
                ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {}
                ("apps/v1", "DaemonSet") => objects.daemonsets.push(typed(&doc, &at)),
                ("v1", "ServiceAccount") => objects.service_accounts.push(typed(&doc, &at)),
                ("v1", "ConfigMap") => objects.config_maps.push(typed(&doc, &at)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => objects.roles.push(typed(&doc, &at)),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    objects.bindings.push(typed(&doc, &at))
                }
                (api, kind) => panic!("{at}: unexpected {api}/{kind}"),
            }
        }
    }
    objects
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let o = load();
    let counts =
        (o.daemonsets.len(), o.service_accounts.len(), o.roles.len(), o.bindings.len(), o.config_maps.len());
    assert_eq!(counts, (1, 1, 1, 1, 1));
}

#[test]
fn daemonset_runs_the_kube_source_on_the_host_network_with_only_the_capabilities_it_needs() {
    let o = load();
    let spec = o.daemonsets[0].spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    assert!(
        spec.tolerations
            .as_ref()
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    assert_eq!(spec.service_account_name, o.service_accounts[0].metadata.name);

    let c = &spec.containers[0];
    let args = c.args.as_ref().unwrap().join(" ");
    assert!(
        args.starts_with("run ") && args.contains("--source kube") && args.contains("--redirect nft"),
        "{args}"
    );
    let node_name = c.env.as_ref().unwrap().iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node_name.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
    assert_eq!(field.field_path, "spec.nodeName");

    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let mut added = caps.add.clone().unwrap();
    added.sort();
    assert_eq!(added, ["NET_ADMIN", "NET_BIND_SERVICE"]);

    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
}

#[test]
fn probes_point_where_the_admin_server_serves() {
    let o = load();
    let c = &o.daemonsets[0].spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    let get = |p: &Option<k8s_openapi::api::core::v1::Probe>| p.as_ref().unwrap().http_get.clone().unwrap();
    let live = get(&c.liveness_probe);
    assert_eq!(
        (live.path.as_deref(), &live.port),
        (Some("/livez"), &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256))
    );
    // src/admin.rs serves /readyz on the metrics address, 127.0.0.1:10249.
    let ready = get(&c.readiness_probe);
    assert_eq!(ready.path.as_deref(), Some("/readyz"));
    assert_eq!(ready.host.as_deref(), Some("127.0.0.1"));
    assert_eq!(ready.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10249));
}

#[test]
fn cluster_role_grants_the_watches_and_is_bound_to_the_service_account() {
    let o = load();
    let rules = o.roles[0].rules.as_ref().unwrap();
    let allows = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.as_ref().is_some_and(|g| g.iter().any(|x| x == group))
                && r.resources.as_ref().is_some_and(|rs| rs.iter().any(|x| x == resource))
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for verb in ["list", "watch"] {
        assert!(allows("", "services", verb), "services {verb}");
        assert!(allows("discovery.k8s.io", "endpointslices", verb), "endpointslices {verb}");
    }
    for verb in ["get", "list", "watch"] {
        assert!(allows("", "nodes", verb), "nodes {verb}");
    }
    assert!(
        rules.iter().all(|r| r.verbs.iter().all(|v| ["get", "list", "watch"].contains(&v.as_str()))),
        "read only"
    );

    let binding = &o.bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), o.roles[0].metadata.name.as_ref());
    let sa = &o.service_accounts[0].metadata;
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), Some(&subject.name), subject.namespace.as_ref()),
        ("ServiceAccount", sa.name.as_ref(), sa.namespace.as_ref())
    );
    let ds = &o.daemonsets[0].metadata;
    assert_eq!(ds.namespace, sa.namespace);
}

#[test]
fn daemonset_upgrades_by_surge_and_hands_its_sockets_over_on_a_host_path() {
    let o = load();
    let ds = o.daemonsets[0].spec.as_ref().unwrap();
    let rolling = ds.update_strategy.as_ref().unwrap().rolling_update.as_ref().unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)), "the new pod starts beside the old one");
    assert_eq!(
        rolling.max_unavailable,
        Some(IntOrString::Int(0)),
        "the old one stays until the new is ready"
    );
    let spec = ds.template.spec.as_ref().unwrap();
    let c = &spec.containers[0];
    assert!(
        c.ports.as_ref().is_none_or(|p| p.is_empty()),
        "a hostNetwork port is a hostPort: it blocks the surge pod"
    );
    let args = c.args.as_ref().unwrap();
    assert!(args.iter().any(|a| a == "--wait-after-handover"), "{args:?}");
    let at = args.iter().position(|a| a == "--handover-socket").expect("--handover-socket is given");
    let socket = Path::new(&args[at + 1]);
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| socket.parent() == Some(Path::new(&m.mount_path)))
        .unwrap_or_else(|| panic!("nothing is mounted at {}", socket.display()));
    let volume = spec.volumes.as_ref().unwrap().iter().find(|v| v.name == mount.name).unwrap();
    let host = volume.host_path.as_ref().expect("a hostPath: both pods of a node see it");
    assert_eq!(Path::new(&host.path), socket.parent().unwrap());
    assert_ne!(mount.read_only, Some(true), "the new pod binds its own socket there");
}

#[test]
fn daemonset_reaches_the_api_server_by_its_real_address_without_cluster_dns() {
    let o = load();
    let spec = o.daemonsets[0].spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    // Cluster DNS is a Service: only the node's resolver works before
    // ringport's rules exist.
    assert_eq!(spec.dns_policy.as_deref(), Some("Default"));
    assert_ne!(spec.automount_service_account_token, Some(false), "the kubeconfig uses the pod's token");

    // --kubeconfig names a file of a mounted ConfigMap of deploy/.
    let c = &spec.containers[0];
    let args = c.args.as_ref().unwrap();
    let at = args.iter().position(|a| a == "--kubeconfig").expect("--kubeconfig is given");
    let path = Path::new(&args[at + 1]);
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| path.parent() == Some(Path::new(&m.mount_path)))
        .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()));
    let volume = spec.volumes.as_ref().unwrap().iter().find(|v| v.name == mount.name).unwrap();
    let map_name = &volume.config_map.as_ref().expect("a ConfigMap volume").name;
    let map = o.config_maps.iter().find(|m| m.metadata.name.as_ref() == Some(map_name)).unwrap();
    assert_eq!(map.metadata.namespace, o.daemonsets[0].metadata.namespace);
    let file = path.file_name().unwrap().to_str().unwrap();
    let text = &map.data.as_ref().unwrap()[file];

    // The kubeconfig: a real server address (not the `kubernetes`
    // Service, by name or through cluster DNS), the pod's own credentials.
    let kc = kube::config::Kubeconfig::from_yaml(text).unwrap();
    let cluster = kc.clusters[0].cluster.as_ref().unwrap();
    let server: axum::http::Uri = cluster.server.as_deref().unwrap().parse().unwrap();
    let host = server.host().unwrap();
    assert!(
        !host.starts_with("kubernetes") && !host.ends_with(".svc") && !host.contains(".svc."),
        "{host} goes through the kubernetes Service"
    );
    assert_eq!(server.scheme_str(), Some("https"));
    const SA: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
    assert_eq!(cluster.certificate_authority.as_deref(), Some(format!("{SA}/ca.crt").as_str()));
    let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
    assert_eq!(user.token_file.as_deref(), Some(format!("{SA}/token").as_str()));
    assert_eq!(kc.current_context.as_deref(), Some(kc.contexts[0].name.as_str()));
}

/// `[Section]` -> key -> values (a key may repeat).
fn unit(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.to_owned());
            continue;
        }
        let (key, value) =
            line.split_once('=').unwrap_or_else(|| panic!("line {}: not key=value: {line}", n + 1));
        let section = current.clone().unwrap_or_else(|| panic!("line {}: key outside a section", n + 1));
        sections
            .entry(section)
            .or_default()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    sections
}

#[test]
fn edge_unit_runs_the_file_source_with_the_keys_it_must_have() {
    let text = std::fs::read_to_string(deploy_dir().join("ringport-edge.service")).unwrap();
    let unit = unit(&text);
    let service = &unit["Service"];
    let one = |key: &str| -> &str {
        let values = service.get(key).unwrap_or_else(|| panic!("[Service] {key} is missing"));
        assert_eq!(values.len(), 1, "{key} given more than once");
        &values[0]
    };
    let exec = one("ExecStart");
    assert!(
        exec.ends_with("ringport run --config /etc/ringport/ --redirect none --handover-socket none"),
        "{exec}"
    );
    // A restart keeps the listening sockets in systemd's fd store
    // (tests/fd_store.rs): one per worker and listen address.
    assert!(one("FileDescriptorStoreMax").parse::<u64>().unwrap() >= 1024);
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("ExecStartPre"), "/usr/local/bin/ringport check --config /etc/ringport/");
    // Reload checks first: a failing check stops the signal.
    assert_eq!(
        service["ExecReload"],
        ["/usr/local/bin/ringport check --config /etc/ringport/", "/bin/kill -HUP $MAINPID"]
    );
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert!(one("LimitNOFILE").parse::<u64>().unwrap() >= 65536);
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(unit["Install"]["WantedBy"], ["multi-user.target"]);
    assert!(unit.contains_key("Unit"));
}
