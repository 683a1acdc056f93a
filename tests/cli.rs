//! The command line as an operator meets it: `--version`, `status` against
//! a running proxy (table and JSON) and against nothing, kube-proxy flags,
//! completions, the man page, and `check` printing each warning once.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::Duration;

use common::{Backend, Proxy, eventually, free_port, service_with_endpoints};

fn ringport(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ringport")).args(args).output().expect("run ringport")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_names_the_commit_and_build_date() {
    let out = ringport(&["--version"]);
    assert!(out.status.success());
    let v = text(&out.stdout);
    let rest = v.strip_prefix(&format!("ringport {} (commit ", env!("CARGO_PKG_VERSION"))).expect(&v);
    let (commit, date) = rest.split_once(", built ").expect(&v);
    assert!(!commit.is_empty(), "{v}");
    let date = date.trim_end().strip_suffix(')').expect(&v);
    assert_eq!(date.len(), 10, "YYYY-MM-DD: {v}");
    assert!(date.chars().enumerate().all(|(i, c)| if i == 4 || i == 7 {
        c == '-'
    } else {
        c.is_ascii_digit()
    }));
}

#[test]
fn status_shows_each_endpoints_state_connections_and_ejections() {
    let live = Backend::echo();
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let proxy = Proxy::start(&service_with_endpoints("svc", &[live.addr, dead]), &["--eject-after", "1"]);
    let target = proxy.proxy_addr("default/svc");
    for _ in 0..6 {
        common::echo_once(target, b"x");
    }
    // One connection held open: the live endpoint has one active.
    let mut held = TcpStream::connect(target).expect("connect");
    held.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    held.write_all(b"y").expect("send");
    let mut one = [0u8; 1];
    held.read_exact(&mut one).expect("echo");
    let addr = proxy.metrics.to_string();
    let json = || {
        let out = ringport(&["status", "--metrics-bind-address", &addr, "-o", "json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("status JSON")
    };
    eventually(Duration::from_secs(5), "the held connection to count as active", || {
        json()["service_ports"][0]["endpoints"].as_array().is_some_and(|eps| {
            eps.iter().any(|e| e["addr"] == live.addr.to_string() && e["health"]["active"] == 1)
        })
    });
    let status = json();
    let port = &status["service_ports"][0];
    assert_eq!(port["name"], "default/svc");
    assert_eq!(port["cluster_ips"][0], "10.96.7.7");
    let dead_ep =
        port["endpoints"].as_array().expect("endpoints").iter().find(|e| e["addr"] == dead.to_string());
    let ejections =
        dead_ep.and_then(|e| e["health"]["ejections"].as_u64()).expect("the dead endpoint's ejections");
    assert!(ejections >= 1, "{status:#}");

    let out = ringport(&["status", "--metrics-bind-address", &addr]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let header = table.lines().next().expect("a header");
    for col in ["SERVICE PORT", "VIPS", "PROXY PORT", "LISTENERS", "ENDPOINT", "STATE", "ACTIVE", "EJECTIONS"]
    {
        assert!(header.contains(col), "{table}");
    }
    let first = table.lines().nth(1).expect(&table);
    assert!(first.starts_with("default/svc") && first.contains("10.96.7.7"), "{table}");
    assert!(first.contains(&format!("proxy {target}")), "{table}");
    let live_row = table.lines().find(|l| l.contains(&live.addr.to_string())).expect(&table);
    let cells: Vec<&str> = live_row.split_whitespace().collect();
    assert_eq!(cells[cells.len() - 2..], ["1", "0"], "active 1, ejections 0: {table}");
    let dead_row = table.lines().find(|l| l.contains(&dead.to_string())).expect(&table);
    assert!(
        dead_row.split_whitespace().last().is_some_and(|e| e.parse::<u64>().is_ok_and(|n| n >= 1)),
        "{table}"
    );
    // Ejections are metrics too.
    let label = "{namespace=\"default\",service=\"svc\",port=\"\"}";
    assert!(proxy.metric(&format!("ringport_endpoint_ejections_total{label}")).is_some_and(|n| n >= 1.0));

    // The dead endpoint comes up and is readmitted: the back-off's count
    // resets, the EJECTIONS column does not.
    let _revived = Backend::echo_at(&dead.to_string());
    eventually(Duration::from_secs(10), "the revived endpoint readmitted", || {
        common::echo_once(target, b"x");
        json()["service_ports"][0]["endpoints"].as_array().is_some_and(|eps| {
            eps.iter().any(|e| {
                e["addr"] == dead.to_string()
                    && e["health"]["ejections"] == 0
                    && e["health"]["attempts"].as_u64() > Some(0)
                    && e["health"]["consecutive_failures"] == 0
                    && e["health"]["ejected"] == false
            })
        })
    });
    let table = text(&ringport(&["status", "--metrics-bind-address", &addr]).stdout);
    let dead_row = table.lines().find(|l| l.contains(&dead.to_string())).expect(&table);
    assert!(
        dead_row.split_whitespace().last().is_some_and(|e| e.parse::<u64>().is_ok_and(|n| n >= 1)),
        "ejections survive readmission: {table}"
    );
    assert!(table.contains("per (protocol, endpoint)"), "{table}");
    drop(held);
}

#[test]
fn status_against_an_unreachable_address_is_one_line_and_fails() {
    let addr = format!("127.0.0.1:{}", free_port());
    let out = ringport(&["status", "--metrics-bind-address", &addr]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&addr) && err.contains("cannot reach"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_kube_proxy_flag_is_refused_with_the_ringport_equivalent() {
    for (flag, equivalent) in [
        ("--proxy-mode=ipvs", "--redirect"),
        ("--masquerade-all", "masquerade"),
        ("--ipvs-scheduler", "--scheduler"),
    ] {
        let out = ringport(&["run", flag, "x"]);
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = text(&out.stderr);
        let name = flag.split('=').next().expect("a name");
        assert!(err.contains(&format!("{name} is a kube-proxy flag")) && err.contains(equivalent), "{err}");
    }
    // No flag of ringport's own is in the table of refused ones.
    for command in ["run", "check", "demo", "status"] {
        let help = text(&ringport(&[command, "--help"]).stdout);
        for word in help.split_whitespace() {
            let Some(flag) = word.strip_prefix("--") else { continue };
            let flag = flag.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
            assert!(
                !ringport::compat::KUBE_PROXY_FLAGS.iter().any(|(f, _)| *f == flag),
                "--{flag} is ringport's own flag yet refused as kube-proxy's"
            );
        }
    }
    // Same meaning, kube-proxy's spelling: accepted.
    let out = ringport(&["check", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/edge.yaml")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_kube_proxy_configuration_file_is_refused_by_check_and_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kube-proxy.yaml");
    std::fs::write(
        &path,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\n",
    )
    .expect("write");
    let path = path.to_str().expect("utf-8 path");
    for cmd in [&["check", "--config", path][..], &["run", "--config", path, "--redirect", "none"]] {
        let out = ringport(cmd);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("not kube-proxy's KubeProxyConfiguration"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn completions_and_the_man_page_are_generated() {
    let bash = ringport(&["completions", "bash"]);
    assert!(bash.status.success());
    let bash = text(&bash.stdout);
    assert!(
        bash.contains("_ringport()") && bash.contains("status") && bash.contains("--per-service-metrics")
    );
    let zsh = ringport(&["completions", "zsh"]);
    assert!(text(&zsh.stdout).starts_with("#compdef ringport"));
    let man = ringport(&["man"]);
    assert!(man.status.success());
    let man = text(&man.stdout);
    assert!(man.contains(".TH ringport 1") && man.contains("completions"), "{man}");
}

#[test]
fn check_prints_each_warning_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("svc.yaml");
    let manifest = service_with_endpoints("svc", &["127.0.0.1:9".parse().expect("addr")])
        .replace("spec:\n", "spec:\n  notAField: 1\n");
    std::fs::write(&path, manifest).expect("write");
    let out = ringport(&["check", "--config", path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert_eq!(err.matches("notAField").count(), 1, "{err}");
}

#[test]
fn json_logs_are_one_object_a_line() {
    let a = Backend::echo();
    let proxy = Proxy::start(
        &service_with_endpoints("svc", &[a.addr]),
        &["--log-format", "json", "--log-level", "info"],
    );
    let log = proxy.log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

#[test]
fn check_plans_the_ipv6_proxy_port_on_the_ipv6_proxy_address() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("svc.yaml");
    let manifest = "apiVersion: v1\nkind: Service\nmetadata: {name: web6, namespace: default}\n\
                    spec: {clusterIP: \"fd10:96::10\", ports: [{port: 80, targetPort: 8080}]}\n";
    std::fs::write(&path, manifest).expect("write");
    let path = path.to_str().expect("utf-8");
    let out = ringport(&["check", "--config", path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("proxy6 [fd72:696e:6770::1]:<auto>"), "{table}");
    assert!(!table.contains("proxy 169.254.99.1"), "an IPv6-only port needs no IPv4 proxy port: {table}");
    let out = ringport(&["check", "--config", path, "--proxy-address6", "fd72::9"]);
    assert!(text(&out.stdout).contains("proxy6 [fd72::9]:<auto>"), "{}", text(&out.stdout));
}

#[test]
fn shared_proxy_port_mode_is_planned_by_check_and_refused_without_rules() {
    let edge = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/edge.yaml");
    let out = ringport(&["check", "--config", edge, "--proxy-port-mode", "shared"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("proxy (shared) 169.254.99.1:<auto>"), "{table}");
    assert!(table.contains("nodePort 0.0.0.0:30080"), "node ports keep their own listeners: {table}");
    let own = text(&ringport(&["check", "--config", edge]).stdout);
    assert!(own.contains("proxy 169.254.99.1:<auto>") && !own.contains("(shared)"), "{own}");
    // A file source defaults to --redirect none: nothing would tell a
    // shared port which service a connection is for.
    let out = ringport(&["run", "--config", edge, "--proxy-port-mode", "shared"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--proxy-port-mode shared needs redirect rules"),
        "{}",
        text(&out.stderr)
    );
}
