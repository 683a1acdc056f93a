//! Validated Services + slices -> one `model::ServicePort` per service port.
//!
//! A slice port serves a service port when it carries the service port's
//! name (the EndpointSlice controller names slice ports after service
//! ports, and kube-proxy matches on that) or, failing that, the name of a
//! named `targetPort`; the protocol must match too. Every endpoint is kept,
//! not-ready ones included: choosing among them is the balancer's job.
//!
//! Also the checks that need more than one object: duplicate objects,
//! nodePort clashes, and service ports no slice can serve. Output is sorted
//! by `ServicePortName`; endpoints by address, one per address.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use super::{ConfigError, ConfigErrorKind, ObjectRef, Warning, WarningKind, service_ref, slice_ref};
use crate::model::{
    self, Endpoint, EndpointAddr, IpFamily, Origin, Protocol, ServiceName, ServicePort, ServicePortName,
    ServicePortSpec, SliceKind, SlicePort, TargetPort,
};

/// What [`join_with_warnings`] found.
#[derive(Debug, Default)]
pub struct Joined {
    /// Sorted by name. A service port with a cross-object error is still
    /// here (possibly without endpoints), so a caller may choose to serve
    /// the rest; a duplicate Service is not (the first one wins).
    pub ports: Vec<ServicePort>,
    pub errors: Vec<ConfigError>,
    /// Also logged with `tracing::warn!`.
    pub warnings: Vec<Warning>,
}

/// [`join_with_warnings`] for callers that only log the warnings.
pub fn join(
    services: &[Arc<model::Service>],
    slices: &[Arc<model::EndpointSlice>],
) -> (Vec<ServicePort>, Vec<ConfigError>) {
    let joined = join_with_warnings(services, slices);
    (joined.ports, joined.errors)
}

/// Joins Services and slices into service ports, with the cross-object
/// errors and warnings.
pub fn join_with_warnings(services: &[Arc<model::Service>], slices: &[Arc<model::EndpointSlice>]) -> Joined {
    let mut joined = Joined::default();
    let services = unique_services(services, &mut joined.errors);
    let slices = unique_slices(slices, &mut joined.errors);
    let slices = slices_by_service(&services, slices, &mut joined.warnings);
    check_node_ports(&services, &mut joined.errors);

    for service in &services {
        let own = slices.get(&service.name).map(Vec::as_slice).unwrap_or_default();
        joined.ports.extend(join_service(service, own, &mut joined.errors, &mut joined.warnings));
    }
    joined.ports.sort_by(|a, b| a.name.cmp(&b.name));
    for warning in &joined.warnings {
        tracing::warn!(%warning, "manifest warning");
    }
    joined
}

/// One Service's service ports, from its slices as [`own_slices`] chose
/// them; the errors and warnings that concern it alone. In the Service's
/// port order.
pub fn join_service(
    service: &model::Service,
    own: &[&model::EndpointSlice],
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<Warning>,
) -> Vec<ServicePort> {
    warn_unserved_families(service, own, warnings);
    let mut ports = Vec::with_capacity(service.ports.len());
    for (i, spec) in service.ports.iter().enumerate() {
        let mut endpoints = endpoints_for(service, i, spec, own, errors);
        endpoints.retain(|e| serves(service, e.addr.0.ip()));
        ports.push(service_port(service, spec, endpoints));
    }
    ports
}

/// First definition wins; later ones are errors naming the first. Input
/// order is kept, so clash errors name the later definition.
pub(crate) fn unique_services<'a>(
    services: &'a [Arc<model::Service>],
    errors: &mut Vec<ConfigError>,
) -> Vec<&'a model::Service> {
    let mut seen: HashMap<&ServiceName, &Origin> = HashMap::new();
    let mut unique = Vec::with_capacity(services.len());
    for service in services.iter().map(|s| &**s) {
        if let Some(first) = seen.get(&service.name) {
            errors.push(duplicate(service_ref(&service.name), &service.origin, first));
        } else {
            seen.insert(&service.name, &service.origin);
            unique.push(service);
        }
    }
    unique
}

/// An Endpoints object and an EndpointSlice may share a name; two slices
/// of one kind may not.
pub(crate) fn unique_slices<'a>(
    slices: &'a [Arc<model::EndpointSlice>],
    errors: &mut Vec<ConfigError>,
) -> Vec<&'a model::EndpointSlice> {
    let mut seen: HashMap<(SliceKind, &ServiceName), &Origin> = HashMap::new();
    let mut unique = Vec::with_capacity(slices.len());
    for slice in slices.iter().map(|s| &**s) {
        if let Some(first) = seen.get(&(slice.kind, &slice.id)) {
            errors.push(duplicate(slice_ref(slice.kind, &slice.id), &slice.origin, first));
        } else {
            seen.insert((slice.kind, &slice.id), &slice.origin);
            unique.push(slice);
        }
    }
    unique
}

fn duplicate(object: ObjectRef, origin: &Origin, first: &Origin) -> ConfigError {
    ConfigError {
        origin: origin.clone(),
        object: Some(object),
        field: None,
        kind: ConfigErrorKind::DuplicateObject { first_origin: first.clone() },
    }
}

/// Groups slices under their Service, sorted by id for a stable endpoint
/// order. A Service with EndpointSlices ignores its Endpoints, as
/// kube-proxy does; a slice without a Service is only a warning, because
/// the Service may simply not be written yet.
fn slices_by_service<'a>(
    services: &[&model::Service],
    slices: Vec<&'a model::EndpointSlice>,
    warnings: &mut Vec<Warning>,
) -> HashMap<ServiceName, Vec<&'a model::EndpointSlice>> {
    let known: HashSet<&ServiceName> = services.iter().map(|s| &s.name).collect();
    let mut grouped: HashMap<ServiceName, Vec<&model::EndpointSlice>> = HashMap::new();
    for slice in slices {
        if known.contains(&slice.service) {
            grouped.entry(slice.service.clone()).or_default().push(slice);
        } else {
            let kind = WarningKind::NoSuchService(slice.service.clone());
            warnings.push(slice_warning(slice, kind));
        }
    }
    for group in grouped.values_mut() {
        own_slices(group, warnings);
    }
    grouped
}

/// The slices of one Service it uses: its EndpointSlices if it has any
/// (its Endpoints are then ignored, with a warning), sorted by id for a
/// stable endpoint order.
pub(crate) fn own_slices(group: &mut Vec<&model::EndpointSlice>, warnings: &mut Vec<Warning>) {
    if group.iter().any(|s| s.kind == SliceKind::EndpointSlice) {
        for shadowed in group.iter().filter(|s| matches!(s.kind, SliceKind::Endpoints { .. })) {
            warnings.push(slice_warning(shadowed, WarningKind::EndpointsShadowed));
        }
        group.retain(|s| s.kind == SliceKind::EndpointSlice);
    }
    group.sort_by(|a, b| a.id.cmp(&b.id));
}

/// Whether the Service uses an endpoint at `ip`: one of its families, or
/// any when it names none. A slice carries one family, and kube-proxy runs
/// one proxier per family, so an IPv6 endpoint behind an IPv4-only Service
/// (or the reverse) is never used.
fn serves(service: &model::Service, ip: std::net::IpAddr) -> bool {
    service.ip_families.is_empty() || service.ip_families.contains(&IpFamily::of(ip))
}

/// One warning per slice (and family) whose endpoints the Service does not
/// use because of their family.
fn warn_unserved_families(
    service: &model::Service,
    slices: &[&model::EndpointSlice],
    warnings: &mut Vec<Warning>,
) {
    let served = || service.ip_families.iter().map(ToString::to_string).collect::<Vec<_>>().join(" and ");
    for slice in slices {
        let mut unserved: Vec<IpFamily> = slice
            .endpoints
            .iter()
            .flat_map(|e| e.addresses())
            .filter(|ip| !serves(service, **ip))
            .map(|ip| IpFamily::of(*ip))
            .collect();
        unserved.sort();
        unserved.dedup();
        for family in unserved {
            let kind = WarningKind::EndpointFamilyNotServed {
                family,
                service: service.name.clone(),
                served: served(),
            };
            warnings.push(slice_warning(slice, kind));
        }
    }
}

pub(crate) fn slice_warning(slice: &model::EndpointSlice, kind: WarningKind) -> Warning {
    Warning {
        origin: slice.origin.clone(),
        object: Some(slice_ref(slice.kind, &slice.id)),
        field: None,
        kind,
    }
}

/// A nodePort is opened on every node address, so two service ports (of
/// any Services) cannot share one for the same protocol; nor can a
/// `healthCheckNodePort` (TCP, on the same addresses) share one with a
/// TCP nodePort or another Service's health check.
pub(crate) fn check_node_ports(services: &[&model::Service], errors: &mut Vec<ConfigError>) {
    let mut used: HashMap<(u16, Protocol), (&model::Service, String)> = HashMap::new();
    for service in services.iter().copied() {
        let ports = service.ports.iter().enumerate().filter_map(|(i, spec)| {
            Some((spec.node_port?, spec.protocol, format!("spec.ports[{i}].nodePort")))
        });
        let health =
            service.health_check_node_port.map(|p| (p, Protocol::Tcp, "spec.healthCheckNodePort".to_owned()));
        for (node_port, protocol, field) in ports.chain(health) {
            let Some((other, other_field)) = used.get(&(node_port, protocol)) else {
                used.insert((node_port, protocol), (service, field));
                continue;
            };
            errors.push(ConfigError {
                origin: service.origin.clone(),
                object: Some(service_ref(&service.name)),
                field: Some(field),
                kind: ConfigErrorKind::DuplicateNodePort {
                    node_port,
                    protocol,
                    other: service_ref(&other.name),
                    other_field: other_field.clone(),
                    other_origin: other.origin.clone(),
                },
            });
        }
    }
}

/// The slice port serving `spec`: by the service port's name first, then by
/// a named targetPort.
fn slice_port_for<'a>(spec: &ServicePortSpec, slice: &'a model::EndpointSlice) -> Option<&'a SlicePort> {
    let named = |name: &str| slice.ports.iter().find(|p| p.name == name && p.protocol == spec.protocol);
    named(&spec.name).or_else(|| match &spec.target_port {
        TargetPort::Name(target) => named(target),
        TargetPort::Number(_) => None,
    })
}

/// Every address × matching port of the Service's slices, sorted by address
/// and deduplicated. Records an error when the Service has slices carrying
/// ports but none serves this service port. Slices without ports are left
/// out of that check: the EndpointSlice controller writes such a slice for a
/// Service whose selector matches no pod.
fn endpoints_for(
    service: &model::Service,
    i: usize,
    spec: &ServicePortSpec,
    slices: &[&model::EndpointSlice],
    errors: &mut Vec<ConfigError>,
) -> Vec<Endpoint> {
    let mut endpoints = Vec::new();
    let mut matched = false;
    for slice in slices {
        let Some(port) = slice_port_for(spec, slice) else {
            continue;
        };
        matched = true;
        for endpoint in &slice.endpoints {
            endpoints.extend(endpoint.addresses().iter().map(|ip| Endpoint {
                addr: EndpointAddr(SocketAddr::new(*ip, port.port)),
                conditions: endpoint.conditions(),
                place: Arc::clone(endpoint.place()),
            }));
        }
    }
    if !matched && slices.iter().any(|s| !s.ports.is_empty()) {
        let kind = match &spec.target_port {
            TargetPort::Name(target) => ConfigErrorKind::TargetPortNameNotFound {
                target: target.to_string(),
                port_name: spec.name.to_string(),
                protocol: spec.protocol,
            },
            TargetPort::Number(target) => ConfigErrorKind::ServicePortNotFound {
                port_name: spec.name.to_string(),
                target: *target,
                protocol: spec.protocol,
            },
        };
        errors.push(ConfigError {
            origin: service.origin.clone(),
            object: Some(service_ref(&service.name)),
            field: Some(format!("spec.ports[{i}].targetPort")),
            kind,
        });
    }
    dedupe_by_address(endpoints)
}

/// Sorts by address; of several entries for one address keeps the first
/// ready one, or the first if none is ready. The sort is stable, so "first"
/// follows slice order.
fn dedupe_by_address(mut endpoints: Vec<Endpoint>) -> Vec<Endpoint> {
    endpoints.sort_by_key(|e| e.addr);
    let mut out: Vec<Endpoint> = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        match out.last_mut() {
            Some(last) if last.addr == endpoint.addr => {
                if !last.conditions.ready && endpoint.conditions.ready {
                    *last = endpoint;
                }
            }
            _ => out.push(endpoint),
        }
    }
    out
}

fn service_port(service: &model::Service, spec: &ServicePortSpec, endpoints: Vec<Endpoint>) -> ServicePort {
    ServicePort {
        name: ServicePortName { service: service.name.clone(), port: spec.name.clone() },
        origin: service.origin.clone(),
        protocol: spec.protocol,
        port: spec.port,
        node_port: spec.node_port.and_then(std::num::NonZeroU16::new),
        proxy_protocol: service.proxy_protocol.for_protocol(spec.protocol),
        settings: Arc::clone(&service.settings),
        endpoints,
    }
}
