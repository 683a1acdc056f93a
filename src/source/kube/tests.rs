//! The Kubernetes source fed synthetic watcher events built from real
//! `k8s-openapi` objects, as `kube-runtime`'s own reflector tests do. The
//! watcher itself (list, watch, BOOKMARK, 410 Gone, dropped streams) is
//! exercised against a fake API server in `tests/kube_source.rs`.
#![allow(clippy::unwrap_used, clippy::panic)]

use futures::channel::mpsc;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use serde_json::json;

use super::{ClusterState, Filter, KubeSource, Outcome, SERVICE_PROXY_NAME_LABEL};
use crate::config::Manifests;
use crate::source::Change;

fn service(name: &str, ip: &str, port: i32) -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name, "resourceVersion": "1"},
        "spec": {"clusterIP": ip, "ports": [{"port": port, "targetPort": 8080}]}
    }))
    .unwrap()
}

fn labelled(mut svc: Service, key: &str, value: &str) -> Service {
    svc.metadata.labels.get_or_insert_with(Default::default).insert(key.to_owned(), value.to_owned());
    svc
}

fn slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {
            "namespace": "default", "name": name, "resourceVersion": "1",
            "labels": {"kubernetes.io/service-name": service}
        },
        "addressType": "IPv4",
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip]})).collect::<Vec<_>>()
    }))
    .unwrap()
}

fn names(m: &Manifests) -> Vec<String> {
    m.services.iter().map(|s| s.name.to_string()).collect()
}

fn endpoint_count(m: &Manifests) -> usize {
    m.slices.iter().map(|s| s.endpoints.len()).sum()
}

/// A state that has listed `services` and `slices` and published them.
fn listed(filter: Filter, services: Vec<Service>, slices: Vec<EndpointSlice>) -> (ClusterState, Manifests) {
    let mut state = ClusterState::new(filter);
    state.handle_service(Event::Init);
    for s in services {
        state.handle_service(Event::InitApply(s));
    }
    state.handle_service(Event::InitDone);
    state.handle_slice(Event::Init);
    for s in slices {
        state.handle_slice(Event::InitApply(s));
    }
    state.handle_slice(Event::InitDone);
    let Some(Change::Whole(first)) = state.take_update() else { panic!("a synced state publishes it whole") };
    (state, first)
}

/// The state after an update was taken (which must be there).
fn updated(state: &mut ClusterState) -> Manifests {
    assert!(state.take_update().is_some(), "nothing published");
    state.manifests()
}

/// The source's state after its next update.
async fn next(source: &mut KubeSource) -> Manifests {
    source.next().await.unwrap();
    source.manifests()
}

#[test]
fn publishes_nothing_until_both_watchers_have_listed() {
    let mut state = ClusterState::default();
    state.handle_service(Event::Init);
    state.handle_service(Event::InitApply(service("web", "10.0.0.1", 80)));
    assert!(state.take_update().is_none(), "mid-list");
    state.handle_service(Event::InitDone);
    assert!(!state.synced());
    assert!(state.take_update().is_none(), "Services listed, slices not yet");
    state.handle_slice(Event::Init);
    state.handle_slice(Event::InitApply(slice("web-1", "web", &["10.1.0.1"])));
    assert!(state.take_update().is_none(), "slices mid-list");
    state.handle_slice(Event::InitDone);
    assert!(state.synced());
    let m = updated(&mut state);
    assert_eq!(names(&m), ["default/web"]);
    assert_eq!(endpoint_count(&m), 1);
    assert!(state.take_update().is_none(), "nothing changed since");
}

#[test]
fn apply_and_delete_of_services_and_slices_change_the_state() {
    let (mut state, _) = listed(Filter::default(), vec![service("web", "10.0.0.1", 80)], vec![]);
    state.handle_service(Event::Apply(service("db", "10.0.0.2", 5432)));
    state.handle_slice(Event::Apply(slice("web-1", "web", &["10.1.0.1", "10.1.0.2"])));
    let m = updated(&mut state);
    assert_eq!(names(&m), ["default/db", "default/web"]);
    assert_eq!(endpoint_count(&m), 2);

    state.handle_slice(Event::Apply(slice("web-1", "web", &["10.1.0.3"])));
    assert_eq!(endpoint_count(&updated(&mut state)), 1);

    state.handle_service(Event::Delete(service("db", "10.0.0.2", 5432)));
    state.handle_slice(Event::Delete(slice("web-1", "web", &[])));
    let m = updated(&mut state);
    assert_eq!(names(&m), ["default/web"]);
    assert_eq!(endpoint_count(&m), 0);
}

#[test]
fn services_of_another_proxy_are_skipped_unless_the_name_matches() {
    let ours = labelled(service("ours", "10.0.0.1", 80), SERVICE_PROXY_NAME_LABEL, "ringport");
    let theirs = labelled(service("theirs", "10.0.0.2", 80), SERVICE_PROXY_NAME_LABEL, "other");
    let plain = service("plain", "10.0.0.3", 80);
    let all = || vec![ours.clone(), theirs.clone(), plain.clone()];

    let (_, m) = listed(Filter::default(), all(), vec![]);
    assert_eq!(names(&m), ["default/plain"], "without --service-proxy-name every labelled one is skipped");

    let filter = Filter { service_proxy_name: Some("ringport".to_owned()) };
    let (mut state, m) = listed(filter, all(), vec![]);
    assert_eq!(names(&m), ["default/ours", "default/plain"]);

    // Relabelling a served Service to another proxy withdraws it.
    let moved = labelled(service("plain", "10.0.0.3", 80), SERVICE_PROXY_NAME_LABEL, "other");
    assert!(
        matches!(state.handle_service(Event::Apply(moved)), Outcome::Skipped(reason) if reason.contains("other"))
    );
    assert_eq!(names(&updated(&mut state)), ["default/ours"]);
}

#[test]
fn headless_and_external_name_services_are_skipped() {
    let headless = service("headless", "None", 80);
    let external: Service = serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": "ext"},
        "spec": {"type": "ExternalName", "externalName": "example.com"}
    }))
    .unwrap();
    let mut state = ClusterState::default();
    assert!(matches!(state.handle_service(Event::Apply(headless)), Outcome::Skipped(_)));
    assert!(matches!(state.handle_service(Event::Apply(external)), Outcome::Skipped(_)));
    let (_, m) = listed(Filter::default(), vec![service("headless", "None", 80)], vec![]);
    assert!(m.services.is_empty());
}

#[test]
fn invalid_service_is_rejected_and_its_last_good_version_kept() {
    let (mut state, _) = listed(Filter::default(), vec![service("web", "10.0.0.1", 80)], vec![]);
    let Outcome::Rejected(errors) = state.handle_service(Event::Apply(service("web", "10.0.0.1", 70000)))
    else {
        panic!("an out-of-range port must be rejected");
    };
    let text = errors.to_string();
    assert!(text.contains("Service default/web") && text.contains("spec.ports[0].port"), "{text}");
    // The rejected version changed nothing: no update, and the next one
    // still carries port 80.
    assert!(state.take_update().is_none());
    state.handle_service(Event::Apply(service("db", "10.0.0.2", 5432)));
    let m = updated(&mut state);
    let web = m.services.iter().find(|s| s.name.name == "web").unwrap();
    assert_eq!(web.ports[0].port, 80);

    // An invalid object with no earlier version is simply absent.
    assert!(matches!(
        state.handle_service(Event::Apply(service("new", "not-an-ip", 80))),
        Outcome::Rejected(_)
    ));
    state.handle_service(Event::Apply(service("db", "10.0.0.2", 5433)));
    assert_eq!(names(&updated(&mut state)), ["default/db", "default/web"]);
}

#[test]
fn invalid_object_in_a_relist_keeps_its_last_good_version() {
    let (mut state, _) = listed(Filter::default(), vec![service("web", "10.0.0.1", 80)], vec![]);
    state.handle_service(Event::Init);
    assert!(matches!(
        state.handle_service(Event::InitApply(service("web", "10.0.0.1", 0))),
        Outcome::Rejected(_)
    ));
    state.handle_service(Event::InitDone);
    assert!(state.take_update().is_none(), "the relist changed nothing served");
    assert_eq!(state.manifests().services[0].ports[0].port, 80);
}

#[test]
fn relist_removes_absent_objects_and_never_publishes_a_partial_state() {
    let (mut state, first) = listed(
        Filter::default(),
        vec![service("a", "10.0.0.1", 80), service("b", "10.0.0.2", 80)],
        vec![slice("a-1", "a", &["10.1.0.1"]), slice("b-1", "b", &["10.1.0.2"])],
    );
    assert_eq!(names(&first), ["default/a", "default/b"]);

    // A 410 Gone: the watcher relists. Until InitDone the old state stands.
    state.handle_service(Event::Init);
    state.handle_service(Event::InitApply(service("c", "10.0.0.3", 80)));
    assert!(state.take_update().is_none(), "nothing is published mid-relist");
    state.handle_slice(Event::Apply(slice("a-1", "a", &["10.1.0.9"])));
    let during = updated(&mut state);
    assert_eq!(names(&during), ["default/a", "default/b"], "the last full list serves mid-relist");

    state.handle_service(Event::InitApply(service("a", "10.0.0.1", 80)));
    state.handle_service(Event::InitDone);
    let after = updated(&mut state);
    assert_eq!(names(&after), ["default/a", "default/c"], "b was not relisted: deleted");
    assert_eq!(after.slices.len(), 1, "b's slice is left out with its Service");
}

#[test]
fn slices_of_unknown_services_are_left_out() {
    let (_, m) =
        listed(Filter::default(), vec![service("a", "10.0.0.1", 80)], vec![slice("x-1", "x", &["10.1.0.1"])]);
    assert!(m.slices.is_empty());
}

type Tx<K> = mpsc::UnboundedSender<Result<Event<K>, watcher::Error>>;

fn channel_source(filter: Filter) -> (KubeSource, Tx<Service>, Tx<EndpointSlice>) {
    let (stx, srx) = mpsc::unbounded();
    let (etx, erx) = mpsc::unbounded();
    (KubeSource::from_streams(Box::pin(srx), Box::pin(erx), filter), stx, etx)
}

#[tokio::test]
async fn source_yields_first_after_both_lists_then_one_update_per_burst() {
    let (mut source, services, slices) = channel_source(Filter::default());
    for e in [Event::Init, Event::InitApply(service("web", "10.0.0.1", 80)), Event::InitDone] {
        services.unbounded_send(Ok(e)).unwrap();
    }
    slices.unbounded_send(Ok(Event::Init)).unwrap();
    // Only one watcher has listed: the source must still be waiting.
    let waiting = futures::poll!(std::pin::pin!(source.next()));
    assert!(waiting.is_pending(), "yielded before the slices were listed");
    slices.unbounded_send(Ok(Event::InitDone)).unwrap();
    let first = next(&mut source).await;
    assert_eq!(names(&first), ["default/web"]);

    // A storm of 200 slice updates, all arrived at once, is one update
    // carrying the last of them.
    for i in 1..=200u8 {
        let ips: Vec<String> = (0..i % 7 + 1).map(|j| format!("10.1.{i}.{j}")).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        slices.unbounded_send(Ok(Event::Apply(slice("web-1", "web", &ips)))).unwrap();
    }
    let burst = next(&mut source).await;
    assert_eq!(endpoint_count(&burst), 200 % 7 + 1);
    assert!(!source.state.pending(), "the whole burst went into one update");
}

#[tokio::test]
async fn stream_errors_publish_nothing_and_keep_the_state() {
    let (mut source, services, slices) = channel_source(Filter::default());
    for e in [Event::Init, Event::InitApply(service("web", "10.0.0.1", 80)), Event::InitDone] {
        services.unbounded_send(Ok(e)).unwrap();
    }
    for e in [Event::Init, Event::InitApply(slice("web-1", "web", &["10.1.0.1"])), Event::InitDone] {
        slices.unbounded_send(Ok(e)).unwrap();
    }
    source.next().await.unwrap();

    // The API goes away, then a relist begins and is cut short.
    services.unbounded_send(Err(watcher::Error::NoResourceVersion)).unwrap();
    slices.unbounded_send(Err(watcher::Error::NoResourceVersion)).unwrap();
    services.unbounded_send(Ok(Event::Init)).unwrap();
    let waiting = futures::poll!(std::pin::pin!(source.next()));
    assert!(waiting.is_pending(), "an error or a half relist published something");
    assert!(!source.state.pending());

    // The relist completes: exactly its contents, never an empty state.
    services.unbounded_send(Ok(Event::InitApply(service("web", "10.0.0.1", 81)))).unwrap();
    services.unbounded_send(Ok(Event::InitDone)).unwrap();
    let relisted = next(&mut source).await;
    assert_eq!(names(&relisted), ["default/web"]);
    assert_eq!(relisted.services[0].ports[0].port, 81);
    assert_eq!(endpoint_count(&relisted), 1);
}

#[tokio::test]
async fn source_reports_a_stream_that_ends() {
    let (mut source, services, _slices) = channel_source(Filter::default());
    drop(services);
    assert!(matches!(source.next().await, Err(super::KubeError::StreamEnded("Service"))));
}

/// The `_changes_pending` gauges of a scrape.
fn pending(metrics: &std::sync::Arc<crate::metrics::Metrics>) -> (String, String) {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).unwrap();
    let value = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')).unwrap_or("absent").to_owned()
    };
    (
        value("kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
        value("kubeproxy_sync_proxy_rules_service_changes_pending"),
    )
}

#[tokio::test]
async fn changes_are_pending_from_their_event_until_the_update_carrying_them_is_published() {
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new(1));
    let (source, services, slices) = channel_source(Filter::default());
    let mut source = source.with_metrics(std::sync::Arc::clone(&metrics));
    for e in [Event::Init, Event::InitApply(service("web", "10.0.0.1", 80)), Event::InitDone] {
        services.unbounded_send(Ok(e)).unwrap();
    }
    for e in [Event::Init, Event::InitDone] {
        slices.unbounded_send(Ok(e)).unwrap();
    }
    source.next().await.unwrap();
    metrics.apply.unqueued(source.take_counted());
    assert_eq!(pending(&metrics), ("0".to_owned(), "0".to_owned()));

    // Three slice changes and one Service change: one update carries them,
    // and they are pending until it is published.
    for ip in ["10.1.0.1", "10.1.0.2", "10.1.0.3"] {
        slices.unbounded_send(Ok(Event::Apply(slice("web-1", "web", &[ip])))).unwrap();
    }
    services.unbounded_send(Ok(Event::Apply(service("web", "10.0.0.1", 81)))).unwrap();
    source.next().await.unwrap();
    let first = source.take_counted();
    assert_eq!(pending(&metrics), ("3".to_owned(), "1".to_owned()));

    // Two more arrive in a second update while the first is applied: the
    // first's publication leaves the second's pending (the engine merges
    // it into its next work).
    for ip in ["10.1.0.4", "10.1.0.5"] {
        slices.unbounded_send(Ok(Event::Apply(slice("web-1", "web", &[ip])))).unwrap();
    }
    source.next().await.unwrap();
    let second = source.take_counted();
    assert_eq!(pending(&metrics), ("5".to_owned(), "1".to_owned()));
    metrics.apply.unqueued(first);
    assert_eq!(pending(&metrics), ("2".to_owned(), "0".to_owned()), "the second update's stay pending");
    metrics.apply.unqueued(second);
    assert_eq!(pending(&metrics), ("0".to_owned(), "0".to_owned()), "publishing clears them");
}

fn triggered(mut s: EndpointSlice, at: std::time::SystemTime) -> EndpointSlice {
    let stamp = humantime::format_rfc3339_nanos(at).to_string();
    s.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(crate::config::TRIGGER_TIME_ANNOTATION.to_owned(), stamp);
    s
}

#[tokio::test]
async fn each_slice_change_hands_over_its_trigger_time_with_its_update() {
    let (mut source, services, slices) = channel_source(Filter::default());
    let started = std::time::SystemTime::now();
    let t = |ms: u64| started + std::time::Duration::from_millis(ms);
    for e in [Event::Init, Event::InitApply(service("web", "10.0.0.1", 80)), Event::InitDone] {
        services.unbounded_send(Ok(e)).unwrap();
    }
    // A listed slice is not a change seen as it happened: not timed.
    for e in [
        Event::Init,
        Event::InitApply(triggered(slice("web-1", "web", &["10.1.0.1"]), t(1))),
        Event::InitDone,
    ] {
        slices.unbounded_send(Ok(e)).unwrap();
    }
    source.next().await.unwrap();
    assert!(source.take_triggers().is_empty());

    // Two stamped changes, one without the annotation, and one stamped
    // before this source began (kube-proxy skips those too).
    let before = started - std::time::Duration::from_secs(3600);
    for s in [
        triggered(slice("web-1", "web", &["10.1.0.2"]), t(2)),
        slice("web-1", "web", &["10.1.0.3"]),
        triggered(slice("web-1", "web", &["10.1.0.4"]), before),
        triggered(slice("web-1", "web", &["10.1.0.5"]), t(5)),
    ] {
        slices.unbounded_send(Ok(Event::Apply(s))).unwrap();
    }
    source.next().await.unwrap();
    assert_eq!(source.take_triggers(), [t(2), t(5)]);
    assert!(source.take_triggers().is_empty(), "handed over once");
}

mod delta;
