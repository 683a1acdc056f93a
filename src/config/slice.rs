//! `discovery.k8s.io/v1/EndpointSlice` and hand-written `v1/Endpoints` ->
//! `model::EndpointSlice`.
//!
//! Both shapes end up as slices: a list of ports and a list of endpoints,
//! each endpoint serving on every port (an Endpoints object gives one slice
//! per subset). Condition defaults follow the API
//! contract: `ready` absent = true, `serving` absent = `ready`,
//! `terminating` absent = false. An Endpoints object's `addresses` are ready
//! and its `notReadyAddresses` neither ready nor serving. All errors of an
//! object are reported, not just the first.

use std::collections::HashMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{EndpointAddress, Endpoints};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{
    AddressUse, ConfigErrorKind, ConfigErrors, Conversion, Diagnostics, NameRule, ObjectRef, Skip,
    WarningKind, check_name, endpoint_address, ip, namespace_of, port_number, protocol, required_name,
};
use crate::model::{
    self, Conditions, Hints, Name, Origin, Placement, ServiceName, SliceEndpoint, SliceKind, SlicePort,
};

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
    let name = required_name(&mut diag, meta, NameRule::Dns1123Subdomain);
    let namespace = namespace_of(meta);
    let service = meta
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .filter(|service| !service.is_empty());
    match service {
        None => diag.error("metadata.labels", ConfigErrorKind::MissingServiceLabel),
        Some(service) => {
            let field = || format!("metadata.labels[\"{SERVICE_NAME_LABEL}\"]");
            diag.check(field, check_name(service, NameRule::LabelValue));
        }
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(Family::V4),
        "IPv6" => Some(Family::V6),
        "FQDN" => {
            return diag.into_result(()).map(|_| Conversion::Skipped(Skip::FqdnAddressType));
        }
        "" => {
            diag.error("addressType", ConfigErrorKind::Required);
            None
        }
        other => {
            let kind =
                ConfigErrorKind::UnknownValue { value: other.to_owned(), expected: "IPv4, IPv6 or FQDN" };
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
    // Sized up front: collecting through `filter_map` would start at four
    // (a slice has two or three endpoints at 100k Services, and 100k slices
    // pay for the slack).
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        endpoints.extend(slice_endpoint(&mut diag, i, endpoint, family));
    }

    // Placeholders only where an error was recorded, so `finish` fails.
    let value = model::EndpointSlice {
        id: ServiceName::new(namespace, name.unwrap_or_default()),
        kind: SliceKind::EndpointSlice,
        service: ServiceName::new(namespace, service.cloned().unwrap_or_default()),
        origin: diag.origin().clone(),
        ports: SlicePort::shared(&ports),
        endpoints: endpoints.into(),
        trigger: trigger_time(meta),
    };
    diag.finish(value)
}

/// The annotation the endpoint-slice (and endpoints) controller stamps with
/// the time of the change (Pod or Service) that caused it.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// An object's trigger time, when it carries a readable one (RFC 3339); an
/// unreadable stamp only goes untimed.
pub fn trigger_time(meta: &ObjectMeta) -> Option<std::time::SystemTime> {
    let value = meta.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?;
    humantime::parse_rfc3339_weak(value).ok()
}

/// Converts a hand-written `v1/Endpoints` into one slice per subset (each
/// subset carries its own ports), with `id` and `service` both the
/// Endpoints' own `namespace/name`. An Endpoints with no subsets gives one
/// empty slice: the Service has endpoints declared, and none of them.
pub fn slice_from_endpoints(
    ep: &Endpoints,
    origin: Origin,
) -> Result<(Vec<model::EndpointSlice>, Vec<super::Warning>), ConfigErrors> {
    let mut diag = Diagnostics::new(origin, ObjectRef::from_meta("Endpoints", &ep.metadata));
    // An Endpoints is named after its Service.
    let name = required_name(&mut diag, &ep.metadata, NameRule::Dns1123Subdomain).unwrap_or_default();
    let id = ServiceName::new(namespace_of(&ep.metadata), name);
    let origin = diag.origin().clone();
    let slice = |subset: usize, ports: Vec<SlicePort>, endpoints: Vec<SliceEndpoint>| model::EndpointSlice {
        id: id.clone(),
        // No input holds 2^32 subsets (the loader bounds its size).
        kind: SliceKind::Endpoints { subset: u32::try_from(subset).unwrap_or(u32::MAX) },
        service: id.clone(),
        origin: origin.clone(),
        ports: SlicePort::shared(&ports),
        endpoints: endpoints.into(),
        trigger: trigger_time(&ep.metadata),
    };
    let mut slices = Vec::new();
    for (i, subset) in ep.subsets.iter().flatten().enumerate() {
        let raw_ports = subset.ports.iter().flatten().map(|p| RawPort {
            name: p.name.as_deref(),
            port: Some(p.port),
            protocol: p.protocol.as_deref(),
        });
        let ports = slice_ports(&mut diag, &format!("subsets[{i}].ports"), raw_ports);
        let mut endpoints = Vec::new();
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
        slices.push(slice(i, ports, endpoints));
    }
    if slices.is_empty() {
        slices.push(slice(0, Vec::new(), Vec::new()));
    }
    diag.into_result(slices)
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
    let mut names: HashMap<Name, usize> = HashMap::new();
    let mut out = Vec::with_capacity(raw.size_hint().0);
    for (i, raw) in raw.enumerate() {
        let at = |f: &str| format!("{field}[{i}].{f}");
        let name = Name::interned(raw.name.unwrap_or_default());
        if !name.is_empty() {
            diag.check(|| at("name"), check_name(&name, NameRule::Dns1123Label));
        }
        let port = match raw.port {
            Some(port) => diag.check(|| at("port"), port_number(port)),
            None => {
                diag.error(at("port"), ConfigErrorKind::SlicePortRequired);
                None
            }
        };
        let protocol = diag.check(|| at("protocol"), protocol(raw.protocol.filter(|p| !p.is_empty())));
        if let Some(first) = names.insert(name.clone(), i) {
            let kind = ConfigErrorKind::DuplicatePortName {
                name: name.to_string(),
                first: format!("{field}[{first}].name"),
            };
            diag.error(at("name"), kind);
        }
        if let (Some(port), Some(protocol)) = (port, protocol) {
            out.push(SlicePort { name, port, protocol });
        }
    }
    out
}

/// `endpoints[i]`; `None` when an address is invalid (its error recorded).
fn slice_endpoint(
    diag: &mut Diagnostics,
    i: usize,
    endpoint: &Endpoint,
    family: Option<Family>,
) -> Option<SliceEndpoint> {
    if endpoint.addresses.is_empty() {
        diag.error(format!("endpoints[{i}].addresses"), ConfigErrorKind::NoAddresses);
        return None;
    }
    let mut addresses = Vec::with_capacity(endpoint.addresses.len());
    for (j, raw) in endpoint.addresses.iter().enumerate() {
        let at = || format!("endpoints[{i}].addresses[{j}]");
        let checked = ip(raw).and_then(|addr| match family {
            Some(family) if !family.matches(addr) => {
                Err(ConfigErrorKind::WrongFamily { ip: addr, address_type: family.address_type() })
            }
            _ => usable(diag, at(), addr),
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
    let hints_zones = hints.and_then(|h| h.for_zones.as_deref()).unwrap_or_default();
    let hints_nodes = hints.and_then(|h| h.for_nodes.as_deref()).unwrap_or_default();
    let interned = |name: &String| Name::interned(name);
    let place = Placement {
        node_name: non_empty(endpoint.node_name.as_deref()),
        zone: non_empty(endpoint.zone.as_deref()),
        hints: Hints::new(
            hints_zones.iter().map(|z| interned(&z.name)).collect(),
            hints_nodes.iter().map(|n| interned(&n.name)).collect(),
        ),
    };
    Some(SliceEndpoint::new(addresses, conditions, place.shared()))
}

/// One `subsets[i].addresses[j]` or `notReadyAddresses[j]`.
fn address_endpoint(
    diag: &mut Diagnostics,
    field: String,
    address: &EndpointAddress,
    ready: bool,
) -> Option<SliceEndpoint> {
    let checked = ip(&address.ip).and_then(|addr| usable(diag, field.clone(), addr));
    let addr = diag.check(|| field, checked)?;
    let place = Placement { node_name: non_empty(address.node_name.as_deref()), ..Placement::default() };
    Some(SliceEndpoint::new(addr, Conditions { ready, serving: ready, terminating: false }, place.shared()))
}

/// `addr` unless no connection can go there; a link-local one is warned
/// about against `field`.
fn usable(diag: &mut Diagnostics, field: String, addr: IpAddr) -> Result<IpAddr, ConfigErrorKind> {
    if endpoint_address(addr)? == AddressUse::LinkLocal {
        diag.warn(field, WarningKind::LinkLocalEndpoint(addr));
    }
    Ok(addr)
}

/// Node names and zones repeat across endpoints: interned.
fn non_empty(value: Option<&str>) -> Option<Name> {
    value.filter(|v| !v.is_empty()).map(Name::interned)
}
