//! `ringport check` on good and bad manifests: the table on success; on
//! failure a non-zero exit and errors naming the file, object and field.

use std::path::Path;
use std::process::{Command, Output};

fn check(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ringport"))
        .args(["check", "--config"])
        .arg(path)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ringport check")
}

fn fixtures(kind: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(kind)
}

/// The `# expect: ...` line at the top of a bad fixture.
fn expected(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read fixture");
    let line = text.lines().find_map(|l| l.strip_prefix("# expect: ")).expect("an `# expect:` line");
    line.to_string()
}

#[test]
fn each_bad_manifest_fails_with_file_object_and_field() {
    let mut seen = 0;
    for entry in std::fs::read_dir(fixtures("bad")).expect("bad fixtures") {
        let path = entry.expect("entry").path();
        let out = check(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} passed check:\n{stderr}", path.display());
        let want = expected(&path);
        assert!(stderr.contains(&want), "{}: expected {want:?} in:\n{stderr}", path.display());
        assert!(stderr.contains(&path.display().to_string()), "the full path is named:\n{stderr}");
        seen += 1;
    }
    assert!(seen >= 6, "only {seen} bad fixtures");
}

#[test]
fn a_directory_of_bad_manifests_reports_every_file() {
    let out = check(&fixtures("bad"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for file in ["bad-ip.yaml", "port-out-of-range.yaml", "unknown-protocol.yaml", "bad-yaml-syntax.yaml"] {
        assert!(stderr.contains(file), "{file} not reported:\n{stderr}");
    }
}

#[test]
fn good_manifest_prints_the_service_port_table() {
    let out = check(&fixtures("good").join("edge.yaml"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("SERVICE PORT"), "{stdout}");
    assert!(stdout.contains("shop/web:http"), "{stdout}");
    assert!(stdout.contains("nodePort 0.0.0.0:30081"), "{stdout}");
    assert!(stdout.contains("127.0.0.2:18080 (terminating)"), "{stdout}");
}
