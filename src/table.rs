//! The table: every validated Service and EndpointSlice the sources know,
//! merged into one list of service ports.
//!
//! Sources feed the table; the table never reaches out to them. A change is
//! tried on a copy first ([`Table::try_replace`]), so an invalid change
//! leaves the table (and therefore the served snapshot) as it was.
//!
//! A [`Table::tolerant`] table (the Kubernetes API source's) still rejects
//! nothing per object (the source has already kept each object's last good
//! version) but serves through cross-object findings of `join`, such as a
//! service port no slice port matches: it logs each new one once and serves
//! the rest, as kube-proxy does, instead of freezing every update.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{self, ConfigError, Manifests};
use crate::model::{EndpointSlice, Service, ServiceName, ServicePort};

#[derive(Clone, Debug, Default)]
pub struct Table {
    services: BTreeMap<ServiceName, Service>,
    slices: BTreeMap<ServiceName, EndpointSlice>,
    /// `Some` for a tolerant table: the cross-object errors last reported,
    /// so each is logged when it appears, not on every update.
    tolerated: Option<BTreeSet<String>>,
}

impl Table {
    /// A table that serves through cross-object errors (see the module
    /// header); for sources whose objects are validated one by one.
    pub fn tolerant() -> Self {
        Self { tolerated: Some(BTreeSet::new()), ..Self::default() }
    }

    /// Whether this table serves through cross-object errors.
    pub fn is_tolerant(&self) -> bool {
        self.tolerated.is_some()
    }

    /// Replace the whole contents (a file source's reload), but only if the
    /// result is valid. On error the table is unchanged.
    pub fn try_replace(&mut self, manifests: Manifests) -> Result<Vec<ServicePort>, Vec<ConfigError>> {
        // Join the lists as given, so duplicates are reported, not collapsed.
        let (ports, errors) = config::join(&manifests.services, &manifests.slices);
        if let Some(reported) = &mut self.tolerated {
            let now: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
            for error in now.difference(reported) {
                tracing::warn!(%error, "served without what this error concerns");
            }
            *reported = now;
        } else if !errors.is_empty() {
            return Err(errors);
        }
        self.services = manifests.services.into_iter().map(|s| (s.name.clone(), s)).collect();
        self.slices = manifests.slices.into_iter().map(|s| (s.id.clone(), s)).collect();
        Ok(ports)
    }

    /// Apply a change to some objects, but only if the result is valid. On
    /// error the table is unchanged.
    pub fn try_apply(&mut self, delta: Delta) -> Result<Vec<ServicePort>, Vec<ConfigError>> {
        let mut services = self.services.clone();
        let mut slices = self.slices.clone();
        delta.services.into_iter().for_each(|(name, s)| set(&mut services, name, s));
        delta.slices.into_iter().for_each(|(id, s)| set(&mut slices, id, s));
        let manifests = Manifests {
            services: services.into_values().collect(),
            slices: slices.into_values().collect(),
            warnings: Vec::new(),
        };
        self.try_replace(manifests)
    }
}

/// A change to some of the table's objects, by name: each is set to the
/// value given, or removed (`None`). A source that knows what changed
/// sends one instead of its whole state.
#[derive(Clone, Debug, Default)]
pub struct Delta {
    pub services: BTreeMap<ServiceName, Option<Service>>,
    /// Keyed by the slice's own name (`EndpointSlice::id`).
    pub slices: BTreeMap<ServiceName, Option<EndpointSlice>>,
}

impl Delta {
    /// Fold a later change in: per object, the later one wins.
    pub fn merge(&mut self, later: Delta) {
        self.services.extend(later.services);
        self.slices.extend(later.slices);
    }
}

fn set<V>(map: &mut BTreeMap<ServiceName, V>, key: ServiceName, value: Option<V>) {
    match value {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Delta, Table};
    use crate::config::parse_str;

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

    #[test]
    fn strict_table_rejects_a_cross_object_error_and_tolerant_one_serves_the_rest() {
        let manifests = parse_str(UNMATCHED, "t.yaml").unwrap();
        assert!(Table::default().try_replace(manifests.clone()).is_err());
        let ports = Table::tolerant().try_replace(manifests).unwrap();
        assert_eq!(ports.len(), 1);
        assert!(ports[0].endpoints.is_empty(), "served, without the unmatched slice's endpoints");
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
        assert!(table.try_apply(delta).unwrap().is_empty());

        // Put it back and drop the slice: served without endpoints.
        let mut delta = Delta::default();
        delta.services.insert(service.name.clone(), Some(service.clone()));
        let mut later = Delta::default();
        later.slices.insert(slice.id.clone(), None);
        delta.merge(later);
        let ports = table.try_apply(delta).unwrap();
        assert_eq!(ports.len(), 1);

        // A strict table refuses the unmatched slice, and keeps what it had.
        let mut strict = Table::default();
        let mut only_service = manifests.clone();
        only_service.slices.clear();
        assert_eq!(strict.try_replace(only_service).unwrap().len(), 1);
        let mut delta = Delta::default();
        delta.slices.insert(slice.id.clone(), Some(slice));
        assert!(strict.try_apply(delta).is_err());
        assert_eq!(strict.try_apply(Delta::default()).unwrap().len(), 1, "the strict table is as it was");
    }
}
