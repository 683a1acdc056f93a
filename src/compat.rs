//! kube-proxy's command line, for an operator carrying flags over: each
//! kube-proxy flag ringport does not take gets an error naming it and the
//! ringport equivalent, instead of clap's bare "unexpected argument". Flags
//! with the same meaning (`--bind-address`, `--healthz-bind-address`,
//! `--metrics-bind-address`, `--nodeport-addresses`, `--proxy-port-range`,
//! `--udp-timeout`, `--kubeconfig`, `--master`, `--hostname-override`,
//! `--cleanup`)
//! are ringport's own and never reach this table.

use std::ffi::OsString;
use std::path::Path;

/// A kube-proxy flag that ringport does not take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompatError {
    #[error("--{flag} is a kube-proxy flag that ringport does not take: {hint}")]
    KubeProxyFlag { flag: &'static str, hint: &'static str },
    #[error(
        "{path}: --config names Kubernetes manifests (Services, EndpointSlices), not kube-proxy's KubeProxyConfiguration; set its fields as ringport flags instead (README, \"Coming from kube-proxy\")"
    )]
    KubeProxyConfiguration { path: String },
}

const SYNC: &str = "ringport applies every change at once and checks its rules every 30 s (nftables; iptables-legacy rewrites them), rewriting them when someone changed them and whole every 10 min";
const CONNTRACK: &str = "ringport sets no conntrack sysctls; set them with sysctl on the node if needed";
const NO_MASQ: &str =
    "ringport proxies in userspace, so backends see the node's address; there is no masquerade rule";
const LOCAL: &str =
    "ringport needs no local-traffic detection: every redirected connection reaches the proxy";

/// kube-proxy's flags that ringport lacks, with what to do instead.
pub const KUBE_PROXY_FLAGS: &[(&str, &str)] = &[
    (
        "proxy-mode",
        "ringport is always a userspace proxy; --redirect nft|iptables|none|auto chooses how traffic reaches it",
    ),
    ("v", "use -v (debug), -vv (trace) or --log-level"),
    ("logging-format", "use --log-format text|json"),
    (
        "ipvs-scheduler",
        "use --scheduler (rr, random, lc, p2c, sh, maglev) or the ringport.io/scheduler annotation",
    ),
    ("masquerade-all", NO_MASQ),
    ("cluster-cidr", NO_MASQ),
    ("iptables-masquerade-bit", NO_MASQ),
    ("iptables-sync-period", SYNC),
    ("iptables-min-sync-period", SYNC),
    ("ipvs-sync-period", SYNC),
    ("ipvs-min-sync-period", SYNC),
    ("nftables-sync-period", SYNC),
    ("nftables-min-sync-period", SYNC),
    ("config-sync-period", "ringport watches Services and EndpointSlices; there is no resync period"),
    (
        "iptables-localhost-nodeports",
        "NodePorts on 127.0.0.1 are served when --nodeport-addresses includes it",
    ),
    ("ipvs-exclude-cidrs", "there is no IPVS mode"),
    ("ipvs-strict-arp", "there is no IPVS mode"),
    ("ipvs-tcp-timeout", "there is no IPVS mode"),
    ("ipvs-tcpfin-timeout", "there is no IPVS mode"),
    ("ipvs-udp-timeout", "use --udp-timeout"),
    ("conntrack-max-per-core", CONNTRACK),
    ("conntrack-min", CONNTRACK),
    ("conntrack-tcp-timeout-established", CONNTRACK),
    ("conntrack-tcp-timeout-close-wait", CONNTRACK),
    ("conntrack-tcp-be-liberal", CONNTRACK),
    ("conntrack-udp-timeout", CONNTRACK),
    ("conntrack-udp-timeout-stream", CONNTRACK),
    ("detect-local-mode", LOCAL),
    ("pod-bridge-interface", LOCAL),
    ("pod-interface-name-prefix", LOCAL),
    ("healthz-port", "use --healthz-bind-address ADDRESS:PORT"),
    ("metrics-port", "use --metrics-bind-address ADDRESS:PORT"),
    ("oom-score-adj", "set OOMScoreAdjust= in the systemd unit, or the pod's resources"),
    ("feature-gates", "ringport has no feature gates"),
    ("kube-api-qps", "ringport's watches need no client-side rate limit"),
    ("kube-api-burst", "ringport's watches need no client-side rate limit"),
    ("kube-api-content-type", "ringport always uses JSON"),
    ("profiling", "ringport has no profiling endpoint; use perf"),
    ("write-config-to", "ringport has no configuration file of its own"),
    ("init-only", "ringport sets no sysctls at start"),
    ("bind-address-hard-fail", "ringport logs each address it cannot bind and serves the rest"),
    ("show-hidden-metrics-for-version", "ringport hides no metrics"),
];

/// The first kube-proxy flag in `args` that ringport does not take (the
/// program name first, as in `std::env::args_os`). Stops at `--`.
pub fn check_args(args: &[OsString]) -> Result<(), CompatError> {
    for arg in args.iter().skip(1) {
        let Some(arg) = arg.to_str() else { continue };
        if arg == "--" {
            break;
        }
        let Some(name) = arg.strip_prefix("--") else { continue };
        let name = name.split_once('=').map_or(name, |(n, _)| n);
        if let Some((flag, hint)) = KUBE_PROXY_FLAGS.iter().find(|(f, _)| *f == name) {
            return Err(CompatError::KubeProxyFlag { flag, hint });
        }
    }
    Ok(())
}

/// `--config` given a kube-proxy configuration file: a clear error rather
/// than "no Service in ...". Only each YAML document's own top-level `kind`
/// and `apiVersion` count (a ConfigMap that carries a kube-proxy
/// configuration in its data is an ordinary object). Directories,
/// unreadable, oversized or too deeply nested files and unparsable
/// documents pass (the manifest loader reports those): the file is read
/// and parsed under the loader's own bounds.
pub fn check_config(path: &Path) -> Result<(), CompatError> {
    let Ok(text) = crate::config::read_manifest(path) else { return Ok(()) };
    if crate::config::too_deep(&text) {
        return Ok(());
    }
    for doc in serde_norway::Deserializer::from_str(&text) {
        // The first document that does not parse ends the scan: the
        // parser may report it again for every later one, without end.
        match type_meta(doc) {
            Some(meta) if meta.is_kube_proxy_configuration() => {
                return Err(CompatError::KubeProxyConfiguration { path: path.display().to_string() });
            }
            Some(_) => {}
            None => break,
        }
    }
    Ok(())
}

/// A document's top level, as far as telling kube-proxy's own kinds apart.
#[derive(serde::Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

/// A document's top-level kind and apiVersion; `None` when it is not
/// YAML, or not a mapping.
fn type_meta(doc: serde_norway::Deserializer<'_>) -> Option<TypeMeta> {
    use serde::Deserialize;
    TypeMeta::deserialize(doc).ok()
}

impl TypeMeta {
    fn is_kube_proxy_configuration(&self) -> bool {
        self.kind.as_deref() == Some("KubeProxyConfiguration")
            || self.api_version.as_deref().is_some_and(|v| v.starts_with("kubeproxy.config.k8s.io/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_kube_proxy_flag_is_named_with_its_equivalent() {
        let err = check_args(&args(&["ringport", "run", "--proxy-mode=iptables"])).unwrap_err();
        assert_eq!(
            err.to_string().split(':').next(),
            Some("--proxy-mode is a kube-proxy flag that ringport does not take")
        );
        assert!(err.to_string().contains("--redirect"), "{err}");
        let err = check_args(&args(&["ringport", "run", "--ipvs-scheduler", "wrr"])).unwrap_err();
        assert!(err.to_string().contains("--scheduler"), "{err}");
    }

    #[test]
    fn ringport_flags_and_values_after_a_double_dash_pass() {
        assert_eq!(
            check_args(&args(&["ringport", "run", "--udp-timeout", "1s", "--redirect", "none"])),
            Ok(())
        );
        assert_eq!(check_args(&args(&["ringport", "run", "--", "--proxy-mode"])), Ok(()));
    }

    #[test]
    fn a_kube_proxy_configuration_file_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kube-proxy.yaml");
        std::fs::write(
            &path,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\n",
        )
        .expect("write");
        let err = check_config(&path).unwrap_err();
        assert!(err.to_string().contains("not kube-proxy's KubeProxyConfiguration"), "{err}");
        std::fs::write(&path, "apiVersion: v1\nkind: Service\n").expect("write");
        assert_eq!(check_config(&path), Ok(()));
        // The second document of a stream, by its apiVersion alone.
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Service\n---\napiVersion: kubeproxy.config.k8s.io/v1alpha1\n",
        )
        .expect("write");
        assert!(check_config(&path).is_err());
    }

    #[test]
    fn a_yaml_syntax_error_ends_the_scan_and_passes_to_the_loader() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "apiVersion: v1\nkind: Service\n---\nkind: [unclosed\n---\nkind: Service\n")
            .expect("write");
        assert_eq!(check_config(&path), Ok(()));
    }

    #[test]
    fn a_manifest_that_carries_a_kube_proxy_configmap_passes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("services.yaml");
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n---\n\
                    apiVersion: v1\nkind: ConfigMap\nmetadata: {name: kube-proxy, namespace: kube-system}\n\
                    data:\n  config.conf: |-\n    apiVersion: kubeproxy.config.k8s.io/v1alpha1\n    \
                    kind: KubeProxyConfiguration\n    mode: iptables\n";
        std::fs::write(&path, text).expect("write");
        assert_eq!(check_config(&path), Ok(()));
    }
}
