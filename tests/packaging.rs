//! Packaging, checked statically where nothing here can run it (no
//! container builder, no `kubectl`/`kustomize`, no image registry): the
//! LICENSE, the Containerfile's stages, the kustomize base and overlay
//! resolving to real objects; and systemd's readiness protocol against the
//! real binary.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use serde::Deserialize;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_license_is_apache_2_in_full() {
    let text = std::fs::read_to_string(root().join("LICENSE")).unwrap();
    assert!(text.contains("Apache License") && text.contains("Version 2.0, January 2004"));
    assert!(text.contains("END OF TERMS AND CONDITIONS"), "the full text, not a pointer");
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(cargo.contains("license = \"Apache-2.0\""));
}

/// Instructions of a Containerfile: (KEYWORD, arguments), continuations joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        current.push_str(line.strip_suffix('\\').unwrap_or(line));
        current.push(' ');
        if !line.ends_with('\\') {
            let (kw, args) = current.trim().split_once(' ').unwrap_or((current.trim(), ""));
            out.push((kw.to_uppercase(), args.trim().to_owned()));
            current.clear();
        }
    }
    out
}

#[test]
fn the_containerfile_builds_in_one_stage_and_ships_a_slim_one_with_the_rule_tools() {
    let text = std::fs::read_to_string(root().join("Containerfile")).unwrap();
    let steps = instructions(&text);
    let froms: Vec<usize> =
        steps.iter().enumerate().filter(|(_, (k, _))| k == "FROM").map(|(i, _)| i).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage: {steps:?}");
    let (build, run) = (&steps[froms[0]..froms[1]], &steps[froms[1]..]);
    assert!(build[0].1.ends_with(" AS build"), "{:?}", build[0]);
    assert!(
        build.iter().any(|(k, a)| k == "RUN" && a.contains("cargo build --release --locked")),
        "{build:?}"
    );
    assert!(run[0].1.contains("-slim"), "a small base: {:?}", run[0]);
    let installs = run.iter().find(|(k, a)| k == "RUN" && a.contains("apt-get install")).expect("an install");
    for tool in ["nftables", "iptables", "conntrack", "iproute2"] {
        assert!(installs.1.split_whitespace().any(|w| w == tool), "{tool} in {installs:?}");
    }
    assert!(
        installs.1.contains("--no-install-recommends") && installs.1.contains("rm -rf /var/lib/apt/lists")
    );
    assert!(run.iter().any(|(k, a)| k == "COPY" && a.starts_with("--from=build ")));
    assert!(run.iter().any(|(k, a)| k == "ENTRYPOINT" && a.contains("/usr/local/bin/ringport")));
    // The context leaves out build output (podman, buildah and docker all
    // read .dockerignore).
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target/" || l.trim() == "target"), "{ignore}");
    // Every file the build stage copies from the context exists.
    assert!(build.iter().any(|(k, a)| k == "COPY" && a == ". ."));
    assert!(root().join("Cargo.lock").exists() && root().join("build.rs").exists());
    let builders: Vec<&str> = ["podman", "buildah", "docker"]
        .into_iter()
        .filter(|b| {
            Command::new(b).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
        })
        .collect();
    eprintln!(
        "container builders installed: {builders:?} (the image is not built here: base images are not reachable)"
    );
}

fn yaml_docs(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            serde_norway::Value::deserialize(d)
                .and_then(serde_norway::from_value)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

fn kustomization(dir: &Path) -> serde_json::Value {
    let docs = yaml_docs(&dir.join("kustomization.yaml"));
    assert_eq!(docs.len(), 1);
    let k = docs.into_iter().next().unwrap();
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    k
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
}

#[test]
fn the_kustomize_base_and_overlay_resolve_to_the_deploy_objects() {
    let base_dir = root().join("deploy");
    let base = kustomization(&base_dir);
    let mut objects = Vec::new();
    for r in strings(&base["resources"]) {
        objects.extend(yaml_docs(&base_dir.join(&r)));
    }
    let ids: BTreeSet<(String, String)> = objects
        .iter()
        .map(|o| (o["kind"].as_str().unwrap().to_owned(), o["metadata"]["name"].as_str().unwrap().to_owned()))
        .collect();
    for kind in ["DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap"] {
        assert!(ids.iter().any(|(k, _)| k == kind), "the base has a {kind}: {ids:?}");
    }
    // Every manifest of deploy/ is in the base.
    for entry in std::fs::read_dir(&base_dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(strings(&base["resources"]).contains(&name), "{name} is not in the base");
        }
    }
    let ds: DaemonSet =
        serde_json::from_value(objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap().clone()).unwrap();
    let cm: ConfigMap =
        serde_json::from_value(objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap().clone()).unwrap();
    let container = &ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    assert_eq!(container.name, "ringport");
    let mounted = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .any(|v| v.config_map.as_ref().is_some_and(|c| Some(&c.name) == cm.metadata.name.as_ref()));
    assert!(mounted, "the DaemonSet mounts the base's ConfigMap");

    // The overlay: the base, the image renamed, the API server set.
    let overlay_dir = base_dir.join("overlays/example");
    let overlay = kustomization(&overlay_dir);
    let bases = strings(&overlay["resources"]);
    assert_eq!(bases.len(), 1);
    assert_eq!(overlay_dir.join(&bases[0]).canonicalize().unwrap(), base_dir.canonicalize().unwrap());
    let image = container.image.clone().unwrap();
    let image_name = image.split(':').next().unwrap();
    let images = overlay["images"].as_array().expect("images");
    assert!(
        images.iter().any(|i| i["name"] == image_name && i["newName"].is_string()),
        "{images:?} vs {image}"
    );
    let patches = overlay["patches"].as_array().expect("patches");
    assert_eq!(patches.len(), 1);
    let target = &patches[0]["target"];
    assert!(
        ids.contains(&(target["kind"].as_str().unwrap().into(), target["name"].as_str().unwrap().into()))
    );
    let ops = yaml_docs(&overlay_dir.join(patches[0]["path"].as_str().unwrap())).remove(0);
    let op = &ops.as_array().expect("a JSON patch")[0];
    assert_eq!(
        (op["op"].as_str(), op["path"].as_str()),
        (Some("add"), Some("/spec/template/spec/containers/0/args/-"))
    );
    let arg = op["value"].as_str().unwrap();
    let (flag, server) = arg.split_once('=').unwrap();
    assert!(server.starts_with("https://"), "{arg}");
    // The flag is ringport's own, and the base's args take one more.
    let help = Command::new(env!("CARGO_BIN_EXE_ringport")).args(["run", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains(&format!("{flag} <")), "{flag} is a run flag");
    assert!(container.args.as_ref().is_some_and(|a| a.first().map(String::as_str) == Some("run")));
}

#[test]
fn systemd_hears_ready_once_serving_and_stopping_on_term() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let backend = common::Backend::echo();
    let manifest = dir.path().join("svc.yaml");
    std::fs::write(&manifest, common::service_with_endpoints("svc", &[backend.addr])).unwrap();
    let admin = format!("127.0.0.1:{}", common::free_port());
    // One known proxy port, to connect through right after READY=1.
    let proxy_port = common::free_port();
    let log = dir.path().join("ringport.log");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringport"))
        // Never the host's rules: --redirect none said outright.
        .args([
            "run",
            "--redirect",
            "none",
            "--workers",
            "1",
            "--no-pin",
            "--bind-address",
            "127.0.0.1",
            "--handover-socket",
            "none",
            "--config",
        ])
        .arg(&manifest)
        .args(["--healthz-bind-address", &admin, "--metrics-bind-address", &admin])
        .args(["--proxy-port-range", &format!("{proxy_port}-{proxy_port}")])
        .env("NOTIFY_SOCKET", &socket_path)
        // Every step before READY=1 in the log, should it ever be late.
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log).unwrap_or_default();
    // Wait for one notification, failing at once (with the log) if the
    // process ends first.
    let next = |child: &mut std::process::Child| -> String {
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 256];
        loop {
            if let Ok(n) = socket.recv(&mut buf) {
                return String::from_utf8_lossy(&buf[..n]).into_owned();
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "ringport exited ({status}) without notifying, {:?} after start:\n{}",
                    started.elapsed(),
                    log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no notification {:?} after start:\n{}",
                started.elapsed(),
                log()
            );
        }
    };
    let ready = next(&mut child);
    // READY=1 means serving: a connection through the proxy works at once.
    let proxy = std::net::SocketAddr::from(([127, 0, 0, 1], proxy_port));
    let echoed = common::try_echo(proxy, b"ready?");
    // SIGTERM, as `systemctl stop` sends.
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let stopping = next(&mut child);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ready, "READY=1", "{}", log());
    let echoed =
        echoed.unwrap_or_else(|e| panic!("no echo through the proxy right after READY=1: {e}\n{}", log()));
    assert_eq!(echoed, b"ready?", "{}", log());
    assert_eq!(stopping, "STOPPING=1", "{}", log());
}
