//! This node's own `v1/Node`, watched (`--node-name`): the zone label,
//! followed live into the snapshot, and kube-proxy's node-eligibility rule
//! for `/healthz`.
//!
//! The rule is kube-proxy's (`proxierHealthServer.SyncNode`): the node is
//! eligible until an event says otherwise, and not eligible while it has a
//! `deletionTimestamp` or the cluster autoscaler's
//! `ToBeDeletedByClusterAutoscaler` taint, or once it is deleted. A watch
//! error changes nothing: the last view stands while the watcher retries.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use super::{Events, KubeError, ZONE_LABEL, stream_error};

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// What ringport reads from its Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// `topology.kubernetes.io/zone`, if labelled.
    pub zone: Option<String>,
    /// kube-proxy's `nodeEligible`.
    pub eligible: bool,
}

impl NodeView {
    /// The view of one Node object.
    pub fn of(node: &Node) -> Self {
        let zone = node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).cloned();
        let deleting = node.metadata.deletion_timestamp.is_some();
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_deref())
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == TO_BE_DELETED_TAINT);
        Self { zone, eligible: !deleting && !tainted }
    }
}

/// The watch on one Node.
pub struct NodeWatch {
    events: Events<Node>,
    last: Option<NodeView>,
    /// The Node was seen since the current (re)list began.
    listed: bool,
}

impl NodeWatch {
    /// Watch Node `name` (a field selector: only that object is sent).
    pub fn watch(client: Client, name: &str) -> Self {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        Self::from_stream(watcher::watcher(Api::<Node>::all(client), config).default_backoff().boxed())
    }

    /// A watch over any event stream (tests feed synthetic ones).
    pub fn from_stream(events: Events<Node>) -> Self {
        Self { events, last: None, listed: false }
    }

    /// The next changed view. Stream errors are logged and retried inside;
    /// only a stream that ends is an error.
    pub async fn next(&mut self) -> Result<NodeView, KubeError> {
        loop {
            let view = match self.events.next().await {
                None => return Err(KubeError::StreamEnded("Node")),
                Some(Err(e)) => {
                    stream_error("Node", &e);
                    continue;
                }
                Some(Ok(Event::Init)) => {
                    self.listed = false;
                    continue;
                }
                Some(Ok(Event::InitApply(node) | Event::Apply(node))) => {
                    self.listed = true;
                    NodeView::of(&node)
                }
                Some(Ok(Event::Delete(_))) => self.gone(),
                // A relist without the Node: it was deleted meanwhile.
                Some(Ok(Event::InitDone)) if !self.listed => self.gone(),
                Some(Ok(Event::InitDone)) => continue,
            };
            if self.last.as_ref() != Some(&view) {
                self.last = Some(view.clone());
                return Ok(view);
            }
        }
    }

    /// A deleted Node keeps its last zone and is not eligible.
    fn gone(&self) -> NodeView {
        NodeView { zone: self.last.as_ref().and_then(|v| v.zone.clone()), eligible: false }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use futures::channel::mpsc;
    use k8s_openapi::api::core::v1::Node;
    use kube::runtime::watcher::Event;
    use serde_json::json;

    use super::{NodeView, NodeWatch};

    fn node(zone: &str, extra: serde_json::Value) -> Node {
        let mut value = json!({"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": zone}}});
        if let (Some(obj), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                if k == "metadata" {
                    for (mk, mv) in v.as_object().unwrap() {
                        obj["metadata"][mk] = mv.clone();
                    }
                } else {
                    obj.insert(k.clone(), v.clone());
                }
            }
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn deleting_or_autoscaler_tainted_nodes_are_not_eligible() {
        assert_eq!(
            NodeView::of(&node("z1", json!({}))),
            NodeView { zone: Some("z1".into()), eligible: true }
        );
        let deleting = node("z1", json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}));
        assert!(!NodeView::of(&deleting).eligible);
        let tainted = node(
            "z1",
            json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}}),
        );
        assert!(!NodeView::of(&tainted).eligible);
        let other = node("z1", json!({"spec": {"taints": [{"key": "dedicated", "effect": "NoSchedule"}]}}));
        assert!(NodeView::of(&other).eligible, "only the autoscaler's taint counts");
    }

    #[tokio::test]
    async fn watch_yields_each_change_once_and_a_deleted_node_as_not_eligible() {
        let (tx, rx) = mpsc::unbounded();
        let mut watch = NodeWatch::from_stream(Box::pin(rx));
        for e in [Event::Init, Event::InitApply(node("z1", json!({}))), Event::InitDone] {
            tx.unbounded_send(Ok(e)).unwrap();
        }
        assert_eq!(watch.next().await.unwrap().zone.as_deref(), Some("z1"));
        // The same view again (e.g. a heartbeat update) is not a change.
        tx.unbounded_send(Ok(Event::Apply(node("z1", json!({}))))).unwrap();
        tx.unbounded_send(Ok(Event::Apply(node("z2", json!({}))))).unwrap();
        assert_eq!(watch.next().await.unwrap(), NodeView { zone: Some("z2".into()), eligible: true });
        // A relist that no longer has the Node: deleted.
        for e in [Event::Init, Event::InitDone] {
            tx.unbounded_send(Ok(e)).unwrap();
        }
        assert_eq!(watch.next().await.unwrap(), NodeView { zone: Some("z2".into()), eligible: false });
        drop(tx);
        assert!(watch.next().await.is_err());
    }
}
