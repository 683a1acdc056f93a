//! Files, directories, documents, Lists and kinds; and the CLI fixtures.

use std::fs;
use std::path::{Path, PathBuf};

use super::{assert_error, manifests};
use crate::config::{WarningKind, load_path, parse_str};
use crate::model::ServiceName;

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";

/// A fresh empty directory under the system temp dir; removed by the
/// test when it passes.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringport-config-{}-{test}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixtures(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(kind)
}

/// Errors of loading `path` and then joining what loaded.
fn load_and_join_errors(path: &Path) -> Vec<String> {
    match load_path(path) {
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
        Ok(m) => crate::config::join(&m.services, &m.slices).1.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn documents_are_numbered_from_one_and_empty_ones_are_ignored() {
    let text =
        format!("---\n{SERVICE}---\n---\n# only a comment\n---\n{}---\n", SERVICE.replace("web", "api"));
    let m = manifests(&text);
    let origins: Vec<_> = m.services.iter().map(|s| s.origin.to_string()).collect();
    assert_eq!(origins, ["t.yaml (document 1)", "t.yaml (document 4)"]);
    assert!(m.warnings.is_empty());
    assert!(manifests("").services.is_empty());
}

#[test]
fn a_v1_list_is_read_item_by_item() {
    let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: web}\n  spec: {ports: [{port: 80}]}\n\
                - apiVersion: v1\n  kind: Service\n  metadata: {name: api}\n  spec: {ports: [{port: 0}]}\n";
    assert_error(
        text,
        "t.yaml (document 1, items[1]): Service default/api: spec.ports[0].port: ",
        "out of range",
    );
    let good = manifests(&text.replace("port: 0", "port: 81"));
    let origins: Vec<_> = good.services.iter().map(|s| s.origin.to_string()).collect();
    assert_eq!(origins, ["t.yaml (document 1, items[0])", "t.yaml (document 1, items[1])"]);
}

#[test]
fn typed_list_items_may_omit_api_version_and_kind() {
    let text = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSliceList\nitems:\n\
                - metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\n  addressType: IPv4\n  endpoints: []\n";
    assert_eq!(manifests(text).slices[0].id.name, "web-1");
}

#[test]
fn a_slice_after_its_service_shares_the_services_name() {
    let slice = |service: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nendpoints: []\n\
             metadata: {{name: {service}-1, labels: {{kubernetes.io/service-name: {service}}}}}\n"
        )
    };
    let m = manifests(&format!("{SERVICE}---\n{}---\n{}", slice("web"), slice("api")));
    let (service, [web, api]) = (&m.services[0].name, &m.slices[..]) else { panic!("{m:?}") };
    assert_eq!(web.service, *service);
    assert!(web.service.name.shares(&service.name), "one allocation for the two");
    assert_eq!(api.service, ServiceName::new("default", "api"), "another Service's slice keeps its own name");
}

#[test]
fn a_files_objects_are_kept_at_their_count() {
    let text: Vec<String> = (0..5).map(|i| SERVICE.replace("name: web", &format!("name: web{i}"))).collect();
    let m = manifests(&text.join("---\n"));
    assert_eq!((m.services.len(), m.services.capacity()), (5, 5), "no room left from growing");
}

#[test]
fn unknown_kinds_are_skipped_with_a_warning() {
    let text =
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg}}\ndata: {{a: b}}\n---\n{SERVICE}");
    let m = manifests(&text);
    assert_eq!(m.services.len(), 1);
    assert_eq!(
        m.warnings[0].to_string(),
        "t.yaml (document 1): ConfigMap default/cfg: v1/ConfigMap is not something ringport serves; skipped"
    );
    let old_slice = "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\n";
    assert!(matches!(manifests(old_slice).warnings[0].kind, WarningKind::UnknownKind { .. }));
}

#[test]
fn a_type_error_names_the_field_path() {
    let text = SERVICE.replace("port: 80", "port: eighty");
    assert_error(
        &text,
        "t.yaml (document 1): Service default/web: spec.ports[0].port: ",
        "invalid type: string \"eighty\"",
    );
}

#[test]
fn a_yaml_syntax_error_names_the_document_and_line() {
    let text = format!("{SERVICE}---\nkind: [\n");
    assert_error(&text, "t.yaml (document 2): invalid YAML: ", "line");
}

#[test]
fn documents_need_api_version_kind_and_a_mapping() {
    assert_error(
        "kind: Service\n",
        "t.yaml (document 1): Service default/<unnamed>: apiVersion: ",
        "is required",
    );
    assert_error("apiVersion: v1\n", "t.yaml (document 1): object default/<unnamed>: kind: ", "is required");
    assert_error("- a\n- b\n", "t.yaml (document 1): ", "not a Kubernetes object");
}

#[test]
fn misspelt_fields_are_warned_about_not_silently_dropped() {
    let text = SERVICE.replace("port: 80", "port: 80, targetport: 8080");
    let warning = manifests(&text).warnings.remove(0);
    assert_eq!(
        warning.to_string(),
        "t.yaml (document 1): Service default/web: spec.ports[0].targetport: unknown field, ignored"
    );
    let nulls = SERVICE.replace("metadata: {name: web}", "metadata: {name: web, creationTimestamp: null}");
    assert!(manifests(&nulls).warnings.is_empty());
}

#[test]
fn json_files_may_hold_several_objects() {
    let svc = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}"#;
    let text = format!("{svc}\n{}", svc.replace("web", "api").replace("80", "99999"));
    match parse_str(&text, "svc.json") {
        Ok(m) => panic!("expected an error, got {m:?}"),
        Err(e) => assert!(
            e.to_string().starts_with("svc.json (document 2): Service default/api: spec.ports[0].port: "),
            "{e}"
        ),
    }
    assert_eq!(parse_str(svc, "svc.json").unwrap().services.len(), 1);
    assert!(parse_str("{\"kind\": ", "svc.json").unwrap_err().to_string().contains("invalid JSON"));
}

#[test]
fn a_directory_reports_the_errors_of_every_bad_file() {
    let dir = scratch_dir("dir");
    fs::write(dir.join("a-good.yaml"), SERVICE).unwrap();
    fs::write(dir.join("b-bad.yml"), SERVICE.replace("web", "one").replace("80", "0")).unwrap();
    fs::write(
        dir.join("c-bad.json"),
        "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"two\"}}",
    )
    .unwrap();
    fs::write(dir.join("README.md"), "not a manifest").unwrap();
    fs::write(dir.join(".hidden.yaml"), "{ not: [ yaml").unwrap();
    fs::create_dir(dir.join("nested.yaml")).unwrap();
    let errors = load_path(&dir).unwrap_err().to_string();
    let lines: Vec<_> = errors.lines().collect();
    let b = dir.join("b-bad.yml").display().to_string();
    let c = dir.join("c-bad.json").display().to_string();
    assert_eq!(lines.len(), 2, "{errors}");
    assert!(
        lines[0].starts_with(&format!("{b} (document 1): Service default/one: spec.ports[0].port: ")),
        "{errors}"
    );
    assert!(
        lines[1].starts_with(&format!("{c} (document 1): Service default/two: spec.ports: ")),
        "{errors}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_directory_without_manifests_is_a_warning_and_a_missing_path_an_error() {
    let dir = scratch_dir("empty");
    let m = load_path(&dir).unwrap();
    assert_eq!(m.warnings[0].kind, WarningKind::EmptyDirectory);
    let missing = dir.join("nope.yaml");
    let error = load_path(&missing).unwrap_err().to_string();
    assert!(error.starts_with(&format!("{}: cannot read: ", missing.display())), "{error}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_good_fixture_loads_and_joins_cleanly() {
    let m = load_path(&fixtures("good")).unwrap_or_else(|e| panic!("{e}"));
    assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    let joined = crate::config::join_with_warnings(&m.services, &m.slices);
    assert!(joined.errors.is_empty(), "{:?}", joined.errors);
    assert!(joined.warnings.is_empty(), "{:?}", joined.warnings);
    let names: Vec<_> = joined.ports.iter().map(|p| p.name.to_string()).collect();
    assert_eq!(names, ["shop/admin", "shop/legacy", "shop/web:http", "shop/web:metrics"]);
    assert!(joined.ports.iter().all(|p| !p.endpoints.is_empty()));
    let all_loopback = joined.ports.iter().flat_map(|p| &p.endpoints).all(|e| e.addr.0.ip().is_loopback());
    assert!(all_loopback);
}

/// Each bad fixture says on top (`# expect: ...`) which error it must
/// produce; this keeps the fixtures and the messages in step.
#[test]
fn every_bad_fixture_produces_the_error_its_header_names() {
    let mut files: Vec<_> = fs::read_dir(fixtures("bad")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert_eq!(files.len(), 6);
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let expected: Vec<_> = text.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expected.is_empty(), "{} has no `# expect:` line", file.display());
        let errors = load_and_join_errors(&file);
        for fragment in expected {
            assert!(
                errors.iter().any(|e| e.contains(fragment)),
                "{}: expected `{fragment}` in {errors:#?}",
                file.display()
            );
        }
    }
}
