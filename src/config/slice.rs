//! `discovery.k8s.io/v1/EndpointSlice` and hand-written `v1/Endpoints` ->
//! `model::EndpointSlice`.
//!
//! Both shapes end up as one slice: a list of ports and a list of endpoints,
//! each endpoint serving on every port. Condition defaults follow the API
//! contract: `ready` absent = true, `serving` absent = `ready`,
//! `terminating` absent = false. An Endpoints object's `addresses` are ready
//! and its `notReadyAddresses` neither ready nor serving. All errors of an
//! object are reported, not just the first.

use std::collections::HashMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{EndpointAddress, Endpoints};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::{
    ConfigErrorKind, ConfigErrors, Conversion, Diagnostics, ObjectRef, Skip, ip, namespace_of,
    port_number, protocol, required_name,
};
use crate::model::{self, Conditions, Origin, ServiceName, SliceEndpoint, SliceKind, SlicePort};

/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Validates one EndpointSlice. `Ok(Conversion::Skipped(_))` for
/// `addressType: FQDN`, which a proxy cannot use.
pub fn slice_from_k8s(
    slice: &EndpointSlice,
    origin: Origin,
) -> Result<Conversion<model::EndpointSlice>, ConfigErrors> {
    let meta = &slice.metadata;
    let mut diag = Diagnostics::new(origin, ObjectRef::from_meta("EndpointSlice", meta));
    let name = required_name(&mut diag, meta);
    let namespace = namespace_of(meta);
    let service = meta
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .filter(|service| !service.is_empty());
    if service.is_none() {
        diag.error("metadata.labels", ConfigErrorKind::MissingServiceLabel);
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(Family::V4),
        "IPv6" => Some(Family::V6),
        "FQDN" => {
            return diag
                .into_result(())
                .map(|_| Conversion::Skipped(Skip::FqdnAddressType));
        }
        other => {
            let kind = ConfigErrorKind::UnknownValue {
                value: other.to_owned(),
                expected: "IPv4, IPv6 or FQDN",
            };
            diag.error("addressType", kind);
            None
        }
    };

    let raw_ports = slice.ports.as_deref().unwrap_or_default();
    let raw_ports = raw_ports.iter().map(|p| RawPort {
        name: p.name.as_deref(),
        port: p.port,
        protocol: p.protocol.as_deref(),
    });
    let ports = slice_ports(&mut diag, "ports", raw_ports);
    let endpoints = slice
        .endpoints
        .iter()
        .enumerate()
        .filter_map(|(i, endpoint)| slice_endpoint(&mut diag, i, endpoint, family))
        .collect();

    // Placeholders only where an error was recorded, so `finish` fails.
    let value = model::EndpointSlice {
        id: ServiceName::new(namespace.clone(), name.unwrap_or_default()),
        kind: SliceKind::EndpointSlice,
        service: ServiceName::new(namespace, service.cloned().unwrap_or_default()),
        origin: diag.origin().clone(),
        ports,
        endpoints,
    };
    diag.finish(value)
}

/// Converts a hand-written `v1/Endpoints` into one slice with `id` and
/// `service` both the Endpoints' own `namespace/name`. Every subset must
/// carry the same ports, because the model has one port list per slice.
pub fn slice_from_endpoints(
    ep: &Endpoints,
    origin: Origin,
) -> Result<model::EndpointSlice, ConfigErrors> {
    let mut diag = Diagnostics::new(origin, ObjectRef::from_meta("Endpoints", &ep.metadata));
    let name = required_name(&mut diag, &ep.metadata);
    let namespace = namespace_of(&ep.metadata);

    let mut ports: Option<Vec<SlicePort>> = None;
    let mut endpoints = Vec::new();
    for (i, subset) in ep.subsets.iter().flatten().enumerate() {
        let raw_ports = subset.ports.iter().flatten().map(|p| RawPort {
            name: p.name.as_deref(),
            port: Some(p.port),
            protocol: p.protocol.as_deref(),
        });
        let field = format!("subsets[{i}].ports");
        let subset_ports = slice_ports(&mut diag, &field, raw_ports);
        match &ports {
            None => ports = Some(subset_ports),
            Some(first) if same_ports(first, &subset_ports) => {}
            Some(_) => diag.error(field, ConfigErrorKind::SubsetPortsDiffer),
        }
        let lists = [
            ("addresses", &subset.addresses, true),
            ("notReadyAddresses", &subset.not_ready_addresses, false),
        ];
        for (list, addresses, ready) in lists {
            for (j, address) in addresses.iter().flatten().enumerate() {
                let field = format!("subsets[{i}].{list}[{j}].ip");
                endpoints.extend(address_endpoint(&mut diag, field, address, ready));
            }
        }
    }

    let name = name.unwrap_or_default();
    let value = model::EndpointSlice {
        id: ServiceName::new(namespace.clone(), name.clone()),
        kind: SliceKind::Endpoints,
        service: ServiceName::new(namespace, name),
        origin: diag.origin().clone(),
        ports: ports.unwrap_or_default(),
        endpoints,
    };
    diag.into_result(value).map(|(value, _)| value)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn address_type(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn matches(self, ip: IpAddr) -> bool {
        ip.is_ipv4() == (self == Family::V4)
    }
}

/// The fields the two port shapes (`discovery/v1` and `core/v1`) share.
struct RawPort<'a> {
    name: Option<&'a str>,
    port: Option<i32>,
    protocol: Option<&'a str>,
}

/// Validates `{field}[i]` for each port. Names must be unique: the join
/// finds a slice port by name.
fn slice_ports<'a>(
    diag: &mut Diagnostics,
    field: &str,
    raw: impl Iterator<Item = RawPort<'a>>,
) -> Vec<SlicePort> {
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, raw) in raw.enumerate() {
        let at = |f: &str| format!("{field}[{i}].{f}");
        let name = raw.name.unwrap_or_default().to_owned();
        let port = match raw.port {
            Some(port) => diag.check(|| at("port"), port_number(port)),
            None => {
                diag.error(at("port"), ConfigErrorKind::SlicePortRequired);
                None
            }
        };
        let protocol = diag.check(
            || at("protocol"),
            protocol(raw.protocol.filter(|p| !p.is_empty())),
        );
        if let Some(first) = names.insert(name.clone(), i) {
            let kind = ConfigErrorKind::DuplicatePortName {
                name: name.clone(),
                first: format!("{field}[{first}].name"),
            };
            diag.error(at("name"), kind);
        }
        if let (Some(port), Some(protocol)) = (port, protocol) {
            out.push(SlicePort {
                name,
                port,
                protocol,
            });
        }
    }
    out
}

/// Order does not matter when comparing two subsets' ports.
fn same_ports(a: &[SlicePort], b: &[SlicePort]) -> bool {
    let key = |ports: &[SlicePort]| {
        let mut keys: Vec<_> = ports
            .iter()
            .map(|p| (p.name.clone(), p.port, p.protocol))
            .collect();
        keys.sort();
        keys
    };
    key(a) == key(b)
}

/// `endpoints[i]`; `None` when an address is invalid (its error recorded).
fn slice_endpoint(
    diag: &mut Diagnostics,
    i: usize,
    endpoint: &Endpoint,
    family: Option<Family>,
) -> Option<SliceEndpoint> {
    if endpoint.addresses.is_empty() {
        diag.error(
            format!("endpoints[{i}].addresses"),
            ConfigErrorKind::NoAddresses,
        );
        return None;
    }
    let mut addresses = Vec::with_capacity(endpoint.addresses.len());
    for (j, raw) in endpoint.addresses.iter().enumerate() {
        let at = || format!("endpoints[{i}].addresses[{j}]");
        let checked = ip(raw).and_then(|addr| match family {
            Some(family) if !family.matches(addr) => Err(ConfigErrorKind::WrongFamily {
                ip: addr,
                address_type: family.address_type(),
            }),
            _ => Ok(addr),
        });
        addresses.extend(diag.check(at, checked));
    }
    if addresses.len() != endpoint.addresses.len() {
        return None;
    }
    let raw = endpoint.conditions.clone().unwrap_or_default();
    let ready = raw.ready.unwrap_or(true);
    let conditions = Conditions {
        ready,
        serving: raw.serving.unwrap_or(ready),
        terminating: raw.terminating.unwrap_or(false),
    };
    let hints = endpoint.hints.as_ref();
    let hints_zones = hints
        .and_then(|h| h.for_zones.as_deref())
        .unwrap_or_default();
    let hints_nodes = hints
        .and_then(|h| h.for_nodes.as_deref())
        .unwrap_or_default();
    Some(SliceEndpoint {
        addresses,
        conditions,
        node_name: non_empty(endpoint.node_name.as_deref()),
        zone: non_empty(endpoint.zone.as_deref()),
        hints_zones: hints_zones.iter().map(|z| z.name.clone()).collect(),
        hints_nodes: hints_nodes.iter().map(|n| n.name.clone()).collect(),
    })
}

/// One `subsets[i].addresses[j]` or `notReadyAddresses[j]`.
fn address_endpoint(
    diag: &mut Diagnostics,
    field: String,
    address: &EndpointAddress,
    ready: bool,
) -> Option<SliceEndpoint> {
    let addr = diag.check(|| field, ip(&address.ip))?;
    Some(SliceEndpoint {
        addresses: vec![addr],
        conditions: Conditions {
            ready,
            serving: ready,
            terminating: false,
        },
        node_name: non_empty(address.node_name.as_deref()),
        zone: None,
        hints_zones: Vec::new(),
        hints_nodes: Vec::new(),
    })
}

fn non_empty(value: Option<&str>) -> Option<String> {
    value.filter(|v| !v.is_empty()).map(str::to_owned)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::WarningKind;
    use crate::config::testing::{assert_error, manifests};
    use crate::model::Protocol;

    const AT: &str = "t.yaml (document 1): EndpointSlice default/web-abc: ";

    /// An IPv4 slice `default/web-abc` of Service `web` with the given
    /// flow-style `ports` and `endpoints`.
    fn slice_text(ports: &str, endpoints: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-abc, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n"
        )
    }

    fn slice(ports: &str, endpoints: &str) -> model::EndpointSlice {
        manifests(&slice_text(ports, endpoints)).slices.remove(0)
    }

    fn bad(ports: &str, endpoints: &str, field: &str, problem: &str) {
        assert_error(
            &slice_text(ports, endpoints),
            &format!("{AT}{field}: "),
            problem,
        );
    }

    #[test]
    fn slice_belongs_to_the_labelled_service_in_its_own_namespace() {
        let text = slice_text("[{name: http, port: 8080}]", "[{addresses: [127.0.0.1]}]")
            .replace("name: web-abc,", "name: web-abc, namespace: shop,");
        let s = manifests(&text).slices.remove(0);
        assert_eq!(s.id, ServiceName::new("shop", "web-abc"));
        assert_eq!(s.service, ServiceName::new("shop", "web"));
        assert_eq!(s.kind, SliceKind::EndpointSlice);
        let port = SlicePort {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Tcp,
        };
        assert_eq!(s.ports, [port]);
    }

    #[test]
    fn missing_service_name_label_is_an_error_naming_metadata_labels() {
        let text = slice_text("[]", "[]")
            .replace("labels: {kubernetes.io/service-name: web}", "labels: {}");
        assert_error(
            &text,
            &format!("{AT}metadata.labels: "),
            "kubernetes.io/service-name label is required",
        );
    }

    #[test]
    fn conditions_default_to_ready_serving_follows_ready_terminating_false() {
        let s = slice(
            "[{port: 80}]",
            "[{addresses: [127.0.0.1]}, {addresses: [127.0.0.2], conditions: {ready: false}}, \
              {addresses: [127.0.0.3], conditions: {ready: false, serving: true, terminating: true}}]",
        );
        let conditions: Vec<_> = s.endpoints.iter().map(|e| e.conditions).collect();
        let c = |ready, serving, terminating| Conditions {
            ready,
            serving,
            terminating,
        };
        assert_eq!(
            conditions,
            [
                c(true, true, false),
                c(false, false, false),
                c(false, true, true)
            ]
        );
    }

    #[test]
    fn node_zone_and_hints_are_kept() {
        let s = slice(
            "[{port: 80}]",
            "[{addresses: [127.0.0.1], nodeName: node-a, zone: zone-1, \
               hints: {forZones: [{name: zone-1}], forNodes: [{name: node-a}]}}]",
        );
        let e = &s.endpoints[0];
        assert_eq!(
            (e.node_name.as_deref(), e.zone.as_deref()),
            (Some("node-a"), Some("zone-1"))
        );
        assert_eq!(
            (e.hints_zones.as_slice(), e.hints_nodes.as_slice()),
            (&["zone-1".to_owned()][..], &["node-a".to_owned()][..])
        );
    }

    #[test]
    fn fqdn_slices_are_skipped_with_a_warning() {
        let text =
            slice_text("[{port: 80}]", "[{addresses: [db.example.org]}]").replace("IPv4", "FQDN");
        let manifests = manifests(&text);
        assert!(manifests.slices.is_empty());
        assert_eq!(
            manifests.warnings[0].kind,
            WarningKind::Skipped(Skip::FqdnAddressType)
        );
    }

    #[test]
    fn unknown_address_type_is_an_error() {
        let text = slice_text("[{port: 80}]", "[]").replace("IPv4", "IPv5");
        assert_error(
            &text,
            &format!("{AT}addressType: "),
            "unknown value \"IPv5\"",
        );
    }

    #[test]
    fn addresses_must_parse_and_match_the_address_type() {
        bad(
            "[{port: 80}]",
            "[{addresses: [127.0.0.1, '::1']}]",
            "endpoints[0].addresses[1]",
            "::1 is not an IPv4 address",
        );
        bad(
            "[{port: 80}]",
            "[{addresses: [127.0.0.256]}]",
            "endpoints[0].addresses[0]",
            "not a valid IP address",
        );
        bad(
            "[{port: 80}]",
            "[{addresses: []}]",
            "endpoints[0].addresses",
            "at least one address is required",
        );
        let v6 = slice_text("[{port: 80}]", "[{addresses: ['::1']}]").replace("IPv4", "IPv6");
        assert_eq!(
            manifests(&v6).slices[0].endpoints[0].addresses,
            ["::1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn slice_ports_need_a_port_in_range_and_a_known_protocol() {
        bad("[{name: http}]", "[]", "ports[0].port", "port is required");
        bad(
            "[{name: http, port: null}]",
            "[]",
            "ports[0].port",
            "port is required",
        );
        bad(
            "[{name: http, port: 65536}]",
            "[]",
            "ports[0].port",
            "65536 is out of range 1-65535",
        );
        bad(
            "[{name: http, port: 80, protocol: SCTP}]",
            "[]",
            "ports[0].protocol",
            "SCTP is not supported",
        );
        bad(
            "[{name: http, port: 80, protocol: tcp}]",
            "[]",
            "ports[0].protocol",
            "unknown protocol",
        );
    }

    #[test]
    fn slice_port_names_are_unique_and_absent_means_empty() {
        bad(
            "[{name: a, port: 80}, {name: a, port: 81}]",
            "[]",
            "ports[1].name",
            "duplicate port name \"a\"",
        );
        bad(
            "[{port: 80}, {port: 81}]",
            "[]",
            "ports[1].name",
            "duplicate port name \"\"",
        );
        assert_eq!(slice("[{port: 80}]", "[]").ports[0].name, "");
    }

    const ENDPOINTS: &str = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: legacy}\nsubsets:\n";

    #[test]
    fn endpoints_become_one_slice_with_ready_and_not_ready_addresses() {
        let text = format!(
            "{ENDPOINTS}- addresses: [{{ip: 127.0.0.1, nodeName: node-a}}]\n  \
             notReadyAddresses: [{{ip: 127.0.0.2}}]\n  ports: [{{port: 9000}}]\n"
        );
        let s = manifests(&text).slices.remove(0);
        assert_eq!(
            (s.kind, &s.id, &s.service),
            (
                SliceKind::Endpoints,
                &ServiceName::new("default", "legacy"),
                &s.id
            )
        );
        assert_eq!(
            s.ports,
            [SlicePort {
                name: String::new(),
                port: 9000,
                protocol: Protocol::Tcp
            }]
        );
        let ready = &s.endpoints[0];
        assert_eq!(
            (ready.conditions, ready.node_name.as_deref()),
            (Conditions::default(), Some("node-a"))
        );
        let not_ready = Conditions {
            ready: false,
            serving: false,
            terminating: false,
        };
        assert_eq!(s.endpoints[1].conditions, not_ready);
    }

    #[test]
    fn endpoints_subsets_must_share_their_ports() {
        let text = format!(
            "{ENDPOINTS}- addresses: [{{ip: 127.0.0.1}}]\n  ports: [{{port: 9000}}]\n\
             - addresses: [{{ip: 127.0.0.2}}]\n  ports: [{{port: 9001}}]\n"
        );
        let at = "t.yaml (document 1): Endpoints default/legacy: subsets[1].ports: ";
        assert_error(&text, at, "differs from subsets[0].ports");
        let same = text.replace("9001", "9000");
        assert_eq!(manifests(&same).slices[0].endpoints.len(), 2);
    }

    #[test]
    fn endpoints_errors_name_the_subset_list_and_port() {
        let text = format!(
            "{ENDPOINTS}- notReadyAddresses: [{{ip: 127.0.0.x}}]\n  ports: [{{port: 0, protocol: SCTP}}]\n"
        );
        let at = "t.yaml (document 1): Endpoints default/legacy: ";
        assert_error(
            &text,
            &format!("{at}subsets[0].notReadyAddresses[0].ip: "),
            "not a valid IP",
        );
        assert_error(
            &text,
            &format!("{at}subsets[0].ports[0].port: "),
            "out of range",
        );
        assert_error(
            &text,
            &format!("{at}subsets[0].ports[0].protocol: "),
            "SCTP is not supported",
        );
    }

    #[test]
    fn slice_from_k8s_takes_an_api_object_and_its_origin() {
        let raw: EndpointSlice =
            serde_yaml::from_str(&slice_text("[{port: 80}]", "[{addresses: [127.0.0.1]}]"))
                .unwrap();
        let Conversion::Accepted { value, warnings } =
            slice_from_k8s(&raw, Origin("api".into())).unwrap()
        else {
            panic!("skipped");
        };
        assert_eq!((value.origin.0.as_str(), warnings.len()), ("api", 0));
    }
}
