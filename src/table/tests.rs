//! The table's change path: deltas and full states re-join only what they
//! touch, with the same errors a whole join reports.

use super::{Delta, Table};
use crate::config::{Manifests, join, parse_str};
use crate::model::{EndpointSlice, Service, ServiceName, ServicePort};
use std::sync::Arc;

/// A Service whose named targetPort no slice port carries: a
/// cross-object error (`join`), not an invalid object.
const UNMATCHED: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: web}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: other, port: 8080}]
endpoints: [{addresses: [10.1.0.1]}]
";

/// Two Services, each with a slice, and a third slice of `a` in another
/// object.
const TWO: &str = "\
apiVersion: v1
kind: Service
metadata: {name: a, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.1
  ports: [{name: http, port: 80, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.2
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-1, namespace: default, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-2, namespace: default, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.2]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: b-1, namespace: default, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.2.0.1]}]
";

fn named(name: &str) -> ServiceName {
    ServiceName::new("default", name)
}

fn addrs(table: &Table, service: &str) -> Vec<String> {
    let ports = table.ports();
    let port = ports.iter().find(|p| p.name.service.name == service).expect("port");
    port.endpoints.iter().map(|e| e.addr.to_string()).collect()
}

/// The table's ports are what a whole join of its objects gives.
fn agrees_with_join(table: &Table) {
    let services: Vec<_> = table.services.values().cloned().collect();
    let slices: Vec<_> = table.slices.values().cloned().collect();
    let (ports, _) = join(&services, &slices);
    assert_eq!(table.ports(), ports.into_iter().map(Arc::new).collect::<Vec<_>>());
}

fn manifests() -> Manifests {
    parse_str(TWO, "t.yaml").unwrap()
}

#[test]
fn strict_table_rejects_a_cross_object_error_and_tolerant_one_serves_the_rest() {
    let manifests = parse_str(UNMATCHED, "t.yaml").unwrap();
    assert!(Table::default().try_replace(manifests.clone()).is_err());
    let mut table = Table::tolerant();
    let change = table.try_replace(manifests).unwrap();
    assert_eq!(change.set.len(), 1);
    assert!(change.set[0].endpoints.is_empty(), "served, without the unmatched slice's endpoints");
}

#[test]
fn a_delta_sets_and_removes_objects_and_an_invalid_one_changes_nothing() {
    let manifests = parse_str(UNMATCHED, "t.yaml").unwrap();
    let mut table = Table::tolerant();
    table.try_replace(manifests.clone()).unwrap();
    let service = manifests.services[0].clone();
    let slice = manifests.slices[0].clone();

    // Remove the Service: no port left.
    let mut delta = Delta::default();
    delta.services.insert(service.name.clone(), None);
    let change = table.try_apply(delta).unwrap();
    assert_eq!(change.removed.len(), 1);
    assert!(table.ports().is_empty());

    // Put it back and drop the slice: served without endpoints.
    let mut delta = Delta::default();
    delta.services.insert(service.name.clone(), Some(service.clone()));
    let mut later = Delta::default();
    later.slices.insert(slice.id.clone(), None);
    delta.merge(later);
    assert_eq!(table.try_apply(delta).unwrap().set.len(), 1);
    assert_eq!(table.ports().len(), 1);

    // A strict table refuses the unmatched slice, and keeps what it had.
    let mut strict = Table::default();
    let mut only_service = manifests.clone();
    only_service.slices.clear();
    assert_eq!(strict.try_replace(only_service).unwrap().set.len(), 1);
    let mut delta = Delta::default();
    delta.slices.insert(slice.id.clone(), Some(slice));
    assert!(strict.try_apply(delta).is_err());
    assert!(strict.try_apply(Delta::default()).unwrap().is_empty(), "the strict table is as it was");
    assert_eq!(strict.ports().len(), 1);
}

#[test]
fn a_slice_moving_to_another_service_changes_both_and_only_them() {
    let mut table = Table::default();
    let m = manifests();
    assert_eq!(table.try_replace(m.clone()).unwrap().set.len(), 2);
    assert_eq!(addrs(&table, "a"), ["10.1.0.1:8080", "10.1.0.2:8080"]);

    let mut moved = EndpointSlice::clone(&m.slices[1]);
    moved.service = named("b");
    let mut delta = Delta::default();
    delta.slices.insert(moved.id.clone(), Some(Arc::new(moved)));
    let change = table.try_apply(delta).unwrap();
    let names: Vec<_> = change.set.iter().map(|p| p.name.service.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(change.changes.endpoints, 2);
    assert_eq!(change.changes.services, 0);
    assert_eq!(addrs(&table, "a"), ["10.1.0.1:8080"]);
    assert_eq!(addrs(&table, "b"), ["10.1.0.2:8080", "10.2.0.1:8080"]);
    agrees_with_join(&table);

    // A slice removed: only its Service changes.
    let mut delta = Delta::default();
    delta.slices.insert(named("b-1"), None);
    let change = table.try_apply(delta).unwrap();
    assert_eq!(change.set.len(), 1);
    assert_eq!(addrs(&table, "b"), ["10.1.0.2:8080"]);
    agrees_with_join(&table);

    // Nothing changed: nothing to do.
    assert!(table.try_apply(Delta::default()).unwrap().is_empty());
}

#[test]
fn a_service_removed_with_its_slices_left_comes_back_with_them() {
    let mut table = Table::default();
    let m = manifests();
    table.try_replace(m.clone()).unwrap();
    let mut delta = Delta::default();
    delta.services.insert(named("a"), None);
    let change = table.try_apply(delta).unwrap();
    assert_eq!(change.removed.len(), 1);
    assert_eq!(change.old.len(), 1);
    assert_eq!(table.ports().len(), 1);
    agrees_with_join(&table);

    let mut delta = Delta::default();
    delta.services.insert(named("a"), Some(m.services[0].clone()));
    let change = table.try_apply(delta).unwrap();
    assert_eq!(change.set.len(), 1);
    assert_eq!(addrs(&table, "a"), ["10.1.0.1:8080", "10.1.0.2:8080"], "its slices were kept");
    agrees_with_join(&table);
}

#[test]
fn a_full_state_is_diffed_and_duplicates_are_reported() {
    let mut table = Table::default();
    let m = manifests();
    table.try_replace(m.clone()).unwrap();
    // The same state again: nothing changes.
    assert!(table.try_replace(m.clone()).unwrap().is_empty());

    // One slice differs, one Service goes.
    let mut next = m.clone();
    Arc::make_mut(&mut next.slices[2]).endpoints[0]
        .set_addresses(vec!["10.2.0.9".parse::<std::net::IpAddr>().unwrap()]);
    next.services.remove(0);
    let change = table.try_replace(next.clone()).unwrap();
    assert_eq!(change.set.iter().map(|p| p.name.service.name.clone()).collect::<Vec<_>>(), ["b"]);
    assert_eq!(change.removed.len(), 1);
    agrees_with_join(&table);

    // A Service defined twice: a strict table refuses and keeps its state.
    let mut twice = next.clone();
    twice.services.push(twice.services[0].clone());
    let errors = table.try_replace(twice.clone()).unwrap_err();
    assert!(errors[0].to_string().contains("Service default/b"), "{}", errors[0]);
    assert_eq!(addrs(&table, "b"), ["10.2.0.9:8080"]);
    // A tolerant one serves the first definition.
    let mut tolerant = Table::tolerant();
    assert_eq!(tolerant.try_replace(twice).unwrap().set.len(), 1);
}

#[test]
fn a_node_port_clash_with_an_unchanged_service_is_found_and_cleared() {
    let mut table = Table::default();
    let m = manifests();
    table.try_replace(m.clone()).unwrap();
    // b takes a's nodePort: a clash with an object the delta leaves alone.
    let mut b = Service::clone(&m.services[1]);
    b.ports[0].node_port = Some(30080);
    let mut delta = Delta::default();
    delta.services.insert(b.name.clone(), Some(Arc::new(b)));
    let errors = table.try_apply(delta.clone()).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].to_string().contains("nodePort 30080/TCP is already used"), "{}", errors[0]);

    // Tolerant: served, and the clash goes once a is gone.
    let mut tolerant = Table::tolerant();
    tolerant.try_replace(m).unwrap();
    tolerant.try_apply(delta).unwrap();
    assert_eq!(tolerant.clashes.len(), 1);
    let mut delta = Delta::default();
    delta.services.insert(named("a"), None);
    tolerant.try_apply(delta).unwrap();
    assert!(tolerant.clashes.is_empty());
    let ports: Vec<Arc<ServicePort>> = tolerant.ports();
    assert_eq!(ports.len(), 1);
}

#[test]
fn a_prepared_change_not_committed_leaves_the_table_as_it_was() {
    let mut table = Table::default();
    table.try_replace(manifests()).unwrap();
    let mut delta = Delta::default();
    delta.services.insert(named("a"), None);
    let prepared = table.prepare(delta).unwrap();
    assert_eq!(prepared.change.removed.len(), 1);
    drop(prepared);
    assert_eq!(table.ports().len(), 2);
    agrees_with_join(&table);
}

#[test]
fn the_table_holds_the_objects_it_is_given_and_keeps_its_own_when_equal() {
    let mut table = Table::default();
    let m = manifests();
    table.try_replace(m.clone()).unwrap();
    let name = &m.services[0].name;
    assert!(Arc::ptr_eq(table.services.get(name).unwrap(), &m.services[0]), "one copy, shared");
    let key = (m.slices[0].id.clone(), m.slices[0].kind);
    assert!(Arc::ptr_eq(table.slices.get(&key).unwrap(), &m.slices[0]));

    // An equal object in another allocation changes nothing, and the table
    // keeps the copy it shares.
    let mut again = m.clone();
    again.services[0] = Arc::new(Service::clone(&m.services[0]));
    assert!(table.try_replace(again).unwrap().is_empty());
    assert!(Arc::ptr_eq(table.services.get(name).unwrap(), &m.services[0]));

    // A delta's object is taken as it is.
    let mut b = Service::clone(&m.services[1]);
    b.ports[0].port = 81;
    let b = Arc::new(b);
    let mut delta = Delta::default();
    delta.services.insert(b.name.clone(), Some(Arc::clone(&b)));
    table.try_apply(delta).unwrap();
    assert!(Arc::ptr_eq(table.services.get(&b.name).unwrap(), &b));
}

#[test]
fn a_service_name_has_one_entry_dropped_with_the_last_object_naming_it() {
    let mut table = Table::default();
    table.try_replace(manifests()).unwrap();
    assert_eq!(table.by_service.len(), 2);
    assert_eq!(table.by_service.get(&named("a")).unwrap().slices.len(), 2);
    assert!(
        matches!(table.by_service.get(&named("b")).unwrap().slices, super::SmallSet::One(_)),
        "one slice, no list"
    );
    assert!(
        matches!(table.by_service.get(&named("a")).unwrap().ports, super::Ports::One(_)),
        "one port, no list"
    );

    // The Service goes, its slices stay: the entry keeps only them.
    let mut delta = Delta::default();
    delta.services.insert(named("a"), None);
    table.try_apply(delta).unwrap();
    let a = &table.by_service.get(&named("a")).unwrap();
    assert!(a.ports.is_empty() && table.errors.is_empty());
    assert_eq!(a.slices.len(), 2);

    // Its slices go too: nothing is kept of the name.
    let mut delta = Delta::default();
    delta.slices.insert(named("a-1"), None);
    delta.slices.insert(named("a-2"), None);
    table.try_apply(delta).unwrap();
    assert!(!table.by_service.contains(&named("a")));
    assert_eq!(table.by_service.len(), 1);
}

#[test]
fn an_entry_holds_a_service_s_slices_and_ports_in_32_bytes() {
    // Was two maps' values, 24 + 48 bytes, under two copies of the name;
    // then 56, with its slices' keys in a `Vec` and its errors.
    assert_eq!(std::mem::size_of::<super::Entry>(), 32);
    assert_eq!(std::mem::size_of::<super::SmallSet<super::BySlice>>(), 16);
    assert_eq!(std::mem::size_of::<super::Ports>(), 16);
}

#[test]
fn new_keys_are_merged_in_order_whether_the_set_is_rebuilt_or_not() {
    use std::collections::BTreeSet;
    let mut set: BTreeSet<u32> = (0..10).map(|k| k * 2).collect();
    let mut expected = set.clone();
    let small = vec![1, 5];
    let large: Vec<_> = (0..20).map(|k| k * 2 + 101).collect();
    for batch in [small, large] {
        expected.extend(batch.iter().copied());
        super::keyed::insert_sorted(&mut set, batch);
        assert_eq!(set, expected);
    }
    assert_eq!(set.len(), 32);
}

#[test]
fn a_small_set_keeps_its_values_sorted_one_inline_and_more_in_a_list() {
    let mut set = super::SmallSet::default();
    assert!(set.is_empty());
    set.insert(5);
    assert!(matches!(set, super::SmallSet::One(5)));
    set.insert(5);
    assert_eq!(&set[..], [5], "a value once");
    set.insert(9);
    set.insert(1);
    assert!(matches!(&set, super::SmallSet::Many(all) if all.len() == 3));
    assert_eq!(&set[..], [1, 5, 9]);
    set.remove(&7);
    set.remove(&5);
    set.remove(&1);
    assert!(matches!(set, super::SmallSet::One(9)));
    set.remove(&9);
    assert!(set.is_empty());
}

#[test]
fn a_service_of_two_ports_keeps_both_in_its_list() {
    const TWO_PORTS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {name: https, port: 443}]
";
    let mut table = Table::default();
    table.try_replace(parse_str(TWO_PORTS, "t.yaml").unwrap()).unwrap();
    assert!(matches!(table.by_service.get(&named("web")).unwrap().ports, super::Ports::Many(_)));
    let names: Vec<String> = table.ports().iter().map(|p| p.name.to_string()).collect();
    assert_eq!(names, ["default/web:http", "default/web:https"]);
    let https = crate::model::ServicePortName { service: named("web"), port: "https".into() };
    assert_eq!(table.port(&https).map(|p| p.port), Some(443));
}

#[test]
fn a_service_s_cross_object_errors_are_kept_apart_until_it_is_joined_without_them() {
    let manifests = parse_str(UNMATCHED, "t.yaml").unwrap();
    let mut table = Table::tolerant();
    table.try_replace(manifests.clone()).unwrap();
    let web = named("web");
    assert_eq!(table.errors.len(), 1);
    assert_eq!(table.errors[&web].len(), 1);
    assert!(table.errors[&web][0].contains("targetPort"), "{}", table.errors[&web][0]);

    // Its slice goes: joined again, without the error.
    let mut delta = Delta::default();
    delta.slices.insert(manifests.slices[0].id.clone(), None);
    table.try_apply(delta).unwrap();
    assert!(table.errors.is_empty());
    assert_eq!(table.ports().len(), 1);

    // Back; then the Service goes: its errors go with it, its slice stays.
    table.try_replace(manifests.clone()).unwrap();
    assert_eq!(table.errors.len(), 1);
    let mut delta = Delta::default();
    delta.services.insert(web.clone(), None);
    table.try_apply(delta).unwrap();
    assert!(table.errors.is_empty());
    assert!(table.by_service.get(&web).unwrap().ports.is_empty());
    assert_eq!(table.by_service.get(&web).unwrap().slices.len(), 1);
}
