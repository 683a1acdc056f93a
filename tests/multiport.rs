//! A multi-port Service whose ports are resolved through an EndpointSlice,
//! one of them by a named targetPort, end to end.

mod common;

use common::{Backend, Proxy, whoami};

#[test]
fn multi_port_service_with_named_target_port_reaches_each_port_backend() {
    let (web, metrics) = (Backend::greeter(), Backend::greeter());
    let manifest = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: multi, namespace: default}}
spec:
  clusterIP: 10.96.9.9
  ports:
  - {{name: http, port: 80, targetPort: web}}
  - {{name: metrics, port: 9090, targetPort: 9100}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: multi-abc
  namespace: default
  labels: {{kubernetes.io/service-name: multi}}
addressType: IPv4
ports:
- {{name: http, port: {web}, protocol: TCP}}
- {{name: metrics, port: {metrics}, protocol: TCP}}
endpoints:
- addresses: ["127.0.0.1"]
"#,
        web = web.addr.port(),
        metrics = metrics.addr.port()
    );
    let proxy = Proxy::start(&manifest, &[]);
    assert_eq!(whoami(proxy.proxy_addr("default/multi:http")), web.addr.to_string());
    assert_eq!(whoami(proxy.proxy_addr("default/multi:metrics")), metrics.addr.to_string());
}
