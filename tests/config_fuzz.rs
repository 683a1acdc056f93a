//! A config fuzz target on stable Rust: `proptest` feeds arbitrary bytes
//! and structured-but-hostile manifests through `ringport check`'s own code
//! path (`check::check_text`: load, validate, join, fd budget, loops) and
//! asserts that nothing panics and that what it reports stays bounded in
//! size, whatever the input.
//!
//! `cargo test` runs a short fixed number of cases; run more locally with
//! `RINGPORT_FUZZ_CASES=100000 cargo test --release --test config_fuzz`.
//! Time is not asserted (the machine is shared); inputs are bounded in size
//! instead, and the linear pre-scan and the parser's limits bound the work.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use proptest::test_runner::Config;
use ringport::budget::Budget;
use ringport::check::{Report, check_text};
use ringport::listen::ListenOptions;

fn cases() -> u32 {
    std::env::var("RINGPORT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96)
}

fn check(text: &str, file: &str) -> Report {
    let opts = ListenOptions {
        bind_address: Ipv4Addr::LOCALHOST.into(),
        bind_address6: None,
        proxy_port_range: Some(20000..=20999),
        nodeport_addresses: vec![],
        workers: 2,
        redirect_rules: false,
        proxy_port_mode: ringport::listen::ProxyPortMode::PerService,
    };
    let budget = Budget { limit: 20_000, workers: 2, udp_max_flows: 8192 };
    check_text(text, file, &opts, &budget)
}

/// Every line of the report is short, whatever the input's names.
fn assert_bounded(report: &Report) -> Result<(), TestCaseError> {
    for line in report.errors.iter().chain(&report.warnings) {
        prop_assert!(line.len() < 16 * 1024, "a {} byte line", line.len());
    }
    Ok(())
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("web".to_owned()),
        Just("Web_1".to_owned()),
        Just("x\"}\nfake 1".to_owned()),
        Just("a".repeat(70_000)),
        Just("&a [*a, *a]".to_owned()),
        Just("[[[[[[[[".to_owned()),
        Just("{{{{".to_owned()),
        Just("é€😀".to_owned()),
        Just(String::new()),
        proptest::collection::vec(any::<char>(), 0..24).prop_map(|c| c.into_iter().collect()),
    ]
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        (0i64..70_000).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        Just("1e309".to_owned()),
        Just("\"80\"".to_owned()),
        Just("null".to_owned()),
    ]
}

fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| Ipv4Addr::from(o).to_string()),
        Just("0.0.0.0".to_owned()),
        Just("::".to_owned()),
        Just("169.254.169.254".to_owned()),
        Just("fe80::1".to_owned()),
        Just("not-an-ip".to_owned()),
    ]
}

/// A Service and its Endpoints with hostile values, then possibly cut short
/// or with bytes spliced in.
fn manifest() -> impl Strategy<Value = String> {
    (
        (token(), token(), token(), prop_oneof![Just("ClusterIP"), Just("NodePort"), Just("Bogus")]),
        (number(), number(), number(), address(), number()),
        (any::<bool>(), any::<u16>(), proptest::collection::vec(any::<u8>(), 0..16)),
    )
        .prop_map(|((name, ns, port_name, kind), (port, target, node_port, ip, ep_port), (cut, at, junk))| {
            let text = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name:?}, namespace: {ns:?}}}\n\
                 spec: {{type: {kind}, ports: [{{name: {port_name:?}, port: {port}, targetPort: {target}, nodePort: {node_port}}}]}}\n\
                 ---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name:?}, namespace: {ns:?}}}\n\
                 subsets: [{{addresses: [{{ip: {ip:?}}}], ports: [{{name: {port_name:?}, port: {ep_port}}}]}}]\n"
            );
            let mut bytes = text.into_bytes();
            let at = usize::from(at) % (bytes.len() + 1);
            if cut {
                bytes.truncate(at);
            } else {
                bytes.splice(at..at, junk);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
}

proptest! {
    #![proptest_config(Config { cases: cases(), failure_persistence: None, ..Config::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_check(bytes in proptest::collection::vec(any::<u8>(), 0..4096), json in any::<bool>()) {
        let text = String::from_utf8_lossy(&bytes);
        assert_bounded(&check(&text, if json { "f.json" } else { "f.yaml" }))?;
    }

    #[test]
    fn hostile_manifests_never_panic_check(text in manifest(), json in any::<bool>()) {
        assert_bounded(&check(&text, "f.yaml"))?;
        if json {
            assert_bounded(&check(&text, "f.json"))?;
        }
    }

    #[test]
    fn repeated_hostile_documents_never_panic_check(docs in proptest::collection::vec(manifest(), 1..8)) {
        assert_bounded(&check(&docs.join("---\n"), "f.yaml"))?;
    }
}

#[test]
fn a_valid_manifest_passes_the_same_path() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n\
                ---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\n\
                subsets: [{addresses: [{ip: 127.0.0.1}], ports: [{port: 8080}]}]\n";
    let report = check(text, "f.yaml");
    assert!(report.ok(), "{:?}", report.errors);
    assert_eq!(report.service_ports, 1);
}
