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
}

#[cfg(test)]
mod tests {
    use super::Table;
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
}
