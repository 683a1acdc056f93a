//! Hostile input through the real binary: pathological YAML, names and
//! addresses, fd exhaustion by configuration, a second process on our
//! port, endpoint loops, files caught mid-write, and signal storms. Each
//! case of issue 10 on the input side, plus the ones that already passed
//! (malformed and oversized manifests, alias bombs, deep block nesting,
//! SIGHUP storms), so that they stay closed.
//!
//! Only loopback traffic; every loop is bounded in count and time.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{Backend, Proxy, eventually, free_port, service_with_endpoints, whoami};

fn check_text(name: &str, text: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(name);
    std::fs::write(&file, text).expect("write manifest");
    check(&file, args)
}

/// `ringport check --config path`, stopped after [`HANG`]: every case here
/// is refused in well under a second, and one that hangs (a parser gone
/// quadratic) must fail the test, not stall the suite. A hang, not a speed,
/// is what the bound catches.
fn check(path: &Path, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg(HANG.as_secs().to_string())
        .arg(env!("CARGO_BIN_EXE_ringport"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .args(args)
        .output()
        .expect("run ringport check under timeout");
    // timeout(1) exits 124 when it had to stop the command.
    assert_ne!(
        out.status.code(),
        Some(124),
        "ringport check --config {} still running after {HANG:?}",
        path.display()
    );
    out
}

const HANG: Duration = Duration::from_secs(60);

/// Check failed cleanly (status 1, not a panic's 101) and said `what`.
fn assert_refused(out: &Output, what: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected a clean failure:\n{}", cut(&stderr));
    for w in what {
        assert!(stderr.contains(w), "missing {w:?} in:\n{}", cut(&stderr));
    }
    stderr
}

fn cut(s: &str) -> &str {
    let mut end = s.len().min(4000);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn service(name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n")
}

/// One Service with `n` named ports (1..=n).
fn many_ports(n: u16) -> String {
    let mut y = String::from("apiVersion: v1\nkind: Service\nmetadata: {name: many}\nspec:\n  ports:\n");
    for p in 1..=n {
        y += &format!("  - {{name: p{p}, port: {p}}}\n");
    }
    y
}

#[test]
fn flow_nesting_a_hundred_thousand_deep_fails_fast_naming_the_file() {
    let text = format!("x: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let out = check_text("deep.yaml", &text, &[]);
    assert_refused(&out, &["deep.yaml", "nest deeper than 64"]);
}

/// A comment ends at any line break libyaml knows, a lone `\r` too: the
/// bound must see the brackets on the line after it (it once took `#\r`
/// for a comment running on, and the parser then spent seconds on them).
#[test]
fn flow_nesting_after_a_comment_ended_by_a_carriage_return_is_refused() {
    for text in [
        format!("#\rx: {}{}\n", "[".repeat(100), "]".repeat(100)),
        format!("#\u{2028}x: {}{}\n", "[".repeat(100), "]".repeat(100)),
    ] {
        let out = check_text("deep.yaml", &text, &[]);
        assert_refused(&out, &["deep.yaml", "nest deeper than 64"]);
    }
}

/// JSON objects nested 200k deep: the JSON parser stops at its recursion
/// limit, and the kube-proxy-configuration scan of `--config` (a YAML
/// parse, quadratic in flow depth: over 20 s for 100k deep) must not see
/// the text first.
#[test]
fn json_objects_two_hundred_thousand_deep_fail_fast_naming_the_file() {
    let text = format!("{}1{}\n", "{\"a\": ".repeat(200_000), "}".repeat(200_000));
    let out = check_text("deep.json", &text, &[]);
    assert_refused(&out, &["deep.json", "recursion limit exceeded"]);
}

#[test]
fn a_file_over_the_size_bound_is_not_read() {
    let text = format!("# {}\n{}", "x".repeat(17 << 20), service("web", "{ports: [{port: 80}]}"));
    let out = check_text("huge.yaml", &text, &[]);
    assert_refused(&out, &["huge.yaml", "at most 16777216"]);
}

#[test]
fn an_alias_bomb_is_refused() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        text += &format!("a{i}: &a{i} [{refs}]\n");
    }
    let out = check_text("bomb.yaml", &text, &[]);
    assert_refused(&out, &["bomb.yaml", "repetition limit exceeded"]);
}

#[test]
fn deep_block_nesting_is_refused() {
    // 2,000 levels of block mappings (about 2 MB: indentation grows).
    let mut text = String::new();
    for depth in 0..2_000 {
        text += &format!("{}k:\n", " ".repeat(depth));
    }
    let out = check_text("block.yaml", &text, &[]);
    assert_refused(&out, &["block.yaml", "recursion limit exceeded"]);
}

#[test]
fn a_malformed_manifest_names_file_and_place() {
    let out = check_text("bad.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [\n", &[]);
    assert_refused(&out, &["bad.yaml (document 1)", "invalid YAML"]);
}

#[test]
fn a_megabyte_service_name_is_refused_without_a_panic_or_a_megabyte_message() {
    let name = "a".repeat(1 << 20);
    let out = check_text("big-name.yaml", &service(&name, "{ports: [{port: 80}]}"), &[]);
    let stderr = assert_refused(&out, &["metadata.name", "DNS-1035", "(1048576 bytes)"]);
    assert!(stderr.len() < 2000, "the error repeats the name: {} bytes", stderr.len());
}

#[test]
fn names_follow_the_api_servers_rules() {
    let cases = [
        (service("Web_1", "{ports: [{port: 80}]}"), "metadata.name"),
        (service("web", "{ports: [{port: 80, name: \"x\\\"}\\nfake 1\"}]}"), "spec.ports[0].name"),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: Prod.ns}\nspec: {ports: [{port: 80}]}\n"
                .to_owned(),
            "metadata.namespace",
        ),
    ];
    for (text, field) in cases {
        let out = check_text("names.yaml", &text, &[]);
        assert_refused(&out, &[field, "is not a DNS-"]);
    }
}

#[test]
fn unusable_endpoint_addresses_are_refused_and_link_local_is_warned_about() {
    for (address, refused) in
        [("0.0.0.0", true), ("224.0.0.1", true), ("255.255.255.255", true), ("169.254.169.254", false)]
    {
        let text = service("web", "{ports: [{port: 80}]}")
            + "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\n"
            + &format!("subsets: [{{addresses: [{{ip: \"{address}\"}}], ports: [{{port: 8080}}]}}]\n");
        let out = check_text("eps.yaml", &text, &[]);
        if refused {
            assert_refused(&out, &["subsets[0].addresses[0].ip", "cannot be an endpoint"]);
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{stderr}");
            assert!(stderr.contains("warning:") && stderr.contains("link-local"), "{stderr}");
        }
    }
}

#[test]
fn check_refuses_more_listening_sockets_than_the_fd_limit_allows() {
    // 6,000 proxy ports on 4 workers: 24,000 sockets, past any hard limit
    // of 20k; whatever this machine's limit, say it through prlimit.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("many.yaml");
    std::fs::write(&file, many_ports(6_000)).expect("write manifest");
    let out = Command::new("prlimit")
        .arg("--nofile=20000:20000")
        .arg(env!("CARGO_BIN_EXE_ringport"))
        .args(["check", "--workers", "4", "--config"])
        .arg(&file)
        .output()
        .expect("run prlimit ringport check (util-linux)");
    assert_refused(&out, &["RLIMIT_NOFILE is 20000", "6000 listen addresses x 4 workers"]);
}

#[test]
fn check_refuses_an_endpoint_that_is_its_own_node_port() {
    let node_port = free_port();
    let text = service("web", &format!("{{type: NodePort, ports: [{{port: 80, nodePort: {node_port}}}]}}"))
        + "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\n"
        + &format!("subsets: [{{addresses: [{{ip: 127.0.0.1}}], ports: [{{port: {node_port}}}]}}]\n");
    let out = check_text("loop.yaml", &text, &[]);
    assert_refused(&out, &["Service default/web", "ringport's own nodePort listener", "would loop"]);
}

#[test]
fn a_reload_past_the_fd_budget_is_refused_and_the_last_good_state_serves() {
    let backend = Backend::greeter();
    let proxy = Proxy::start_with_nofile(&service_with_endpoints("svc", &[backend.addr]), &[], Some(2048));
    let generation = proxy.generation();
    // 600 listen addresses x 2 workers, plus the reserves, pass 2,048.
    proxy.write_manifest(&(service_with_endpoints("svc", &[backend.addr]) + "---\n" + &many_ports(600)));
    eventually(Duration::from_secs(10), "the reload is refused for the fd budget", || {
        proxy.log().contains("RLIMIT_NOFILE is 2048")
    });
    assert_eq!(proxy.generation(), generation, "{}", proxy.log());
    assert_eq!(proxy.get("/readyz").map(|(code, _)| code), Some(200));
    assert_eq!(whoami(proxy.proxy_addr("default/svc")), backend.addr.to_string());
}

#[test]
fn a_port_another_ringport_holds_is_an_error_not_a_share() {
    let (a, b) = (Backend::greeter(), Backend::greeter());
    let node_port = free_port();
    let manifest =
        |name: &str, backend: SocketAddr| {
            service_with_endpoints(name, &[backend])
                .replacen("spec:\n", "spec:\n  type: NodePort\n", 1)
                .replacen("protocol: TCP}", &format!("protocol: TCP, nodePort: {node_port}}}"), 1)
        };
    let args = ["--nodeport-addresses", "127.0.0.1/32"];
    let first = Proxy::start(&manifest("first", a.addr), &args);
    let second = Proxy::start(&manifest("second", b.addr), &args);
    let at = SocketAddr::from(([127, 0, 0, 1], node_port));
    assert!(second.log().contains("held by another process"), "{}", second.log());
    // Every connection goes to the first proxy's backend; none is split off.
    for _ in 0..40 {
        assert_eq!(whoami(at), a.addr.to_string(), "{}", first.log());
    }
}

#[test]
fn a_reload_that_would_loop_into_a_node_port_is_refused() {
    let backend = Backend::greeter();
    let node_port = free_port();
    let proxy = Proxy::start(&service_with_endpoints("svc", &[backend.addr]), &[]);
    let generation = proxy.generation();
    let looping =
        service("web", &format!("{{type: NodePort, ports: [{{port: 80, nodePort: {node_port}}}]}}"))
            + "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\n"
            + &format!("subsets: [{{addresses: [{{ip: 127.0.0.1}}], ports: [{{port: {node_port}}}]}}]\n");
    proxy.write_manifest(&(service_with_endpoints("svc", &[backend.addr]) + "---\n" + &looping));
    eventually(Duration::from_secs(10), "the looping reload is refused", || {
        proxy.log().contains("would loop")
    });
    assert_eq!(proxy.generation(), generation);
    assert!(TcpStream::connect(("127.0.0.1", node_port)).is_err(), "the refused nodePort must not listen");
}

#[test]
fn an_emptied_manifest_is_a_write_in_progress_and_keeps_serving() {
    let backend = Backend::greeter();
    let proxy = Proxy::start(&service_with_endpoints("svc", &[backend.addr]), &[]);
    let svc = proxy.proxy_addr("default/svc");
    // Truncated in place, as an editor writing over the file does.
    std::fs::write(proxy.dir.path().join("services.yaml"), "").expect("truncate");
    eventually(Duration::from_secs(10), "the empty file is noticed", || {
        proxy.log().contains("write in progress")
    });
    assert_eq!(whoami(svc), backend.addr.to_string(), "{}", proxy.log());
}

#[test]
fn a_dangling_manifest_link_is_an_error_naming_it() {
    let backend = Backend::greeter();
    let proxy = Proxy::start(&service_with_endpoints("svc", &[backend.addr]), &[]);
    let generation = proxy.generation();
    let link = proxy.dir.path().join("gone.yaml");
    std::os::unix::fs::symlink(proxy.dir.path().join("nowhere.yaml"), &link).expect("symlink");
    eventually(Duration::from_secs(10), "the dangling link is reported", || {
        let log = proxy.log();
        log.contains("gone.yaml") && log.contains("dangling")
    });
    assert_eq!(proxy.generation(), generation);
    assert_eq!(whoami(proxy.proxy_addr("default/svc")), backend.addr.to_string());
}

#[test]
fn a_pathological_reload_fails_fast_and_probes_keep_answering() {
    let backend = Backend::greeter();
    let proxy = Proxy::start(&service_with_endpoints("svc", &[backend.addr]), &[]);
    let generation = proxy.generation();
    let deep = format!("x: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    std::fs::write(proxy.dir.path().join("deep.yaml"), deep).expect("write");
    eventually(Duration::from_secs(10), "the deep file is refused, naming it", || {
        proxy.log().contains("deep.yaml: YAML flow collections")
    });
    assert_eq!(proxy.get("/readyz").map(|(code, _)| code), Some(200));
    assert_eq!(proxy.generation(), generation);
}

#[test]
fn a_sighup_storm_leaves_the_proxy_serving() {
    let backend = Backend::greeter();
    let proxy = Proxy::start(&service_with_endpoints("svc", &[backend.addr]), &[]);
    for _ in 0..200 {
        let status = Command::new("kill").args(["-HUP", &proxy.pid().to_string()]).status().expect("kill");
        assert!(status.success());
    }
    eventually(Duration::from_secs(10), "the reloads settle", || proxy.log().contains("trigger=\"SIGHUP\""));
    assert_eq!(proxy.get("/readyz").map(|(code, _)| code), Some(200));
    assert_eq!(whoami(proxy.proxy_addr("default/svc")), backend.addr.to_string());
}
