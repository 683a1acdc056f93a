//! Reloading manifests while traffic flows: valid changes apply to new
//! connections, open connections are untouched, and an invalid change keeps
//! the last good configuration serving.

mod common;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use common::{Backend, Proxy, eventually, free_port, whoami};

/// `svc`: greeters behind hand-written Endpoints; `extra`: an echo service
/// on an external IP (local, on loopback) and port.
fn manifest(svc_backends: &[SocketAddr], extra: Option<(SocketAddr, u16)>) -> String {
    let mut y = common::service_with_endpoints("svc", svc_backends);
    if let Some((backend, port)) = extra {
        y += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: extra, namespace: default}}\n\
             spec:\n  clusterIP: 10.96.7.8\n  externalIPs: [\"127.0.88.1\"]\n  ports:\n  - {{port: {port}, protocol: TCP}}\n\
             ---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: extra, namespace: default}}\n\
             subsets:\n- addresses: [{{ip: \"{}\"}}]\n  ports: [{{port: {}, protocol: TCP}}]\n",
            backend.ip(),
            backend.port()
        );
    }
    y
}

fn echo_once(c: &mut TcpStream, msg: &[u8]) {
    c.write_all(msg).expect("send on an open connection");
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).expect("echo on an open connection");
    assert_eq!(back, msg);
}

fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

fn open(addr: SocketAddr) -> TcpStream {
    let c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    c
}

#[test]
fn reloads_apply_to_new_connections_and_spare_open_ones() {
    let (a, b, echo) = (Backend::greeter(), Backend::greeter(), Backend::echo());
    let (port1, port2) = (free_port(), free_port());
    let proxy = Proxy::start(&manifest(&[a.addr], Some((echo.addr, port1))), &[]);
    let svc = proxy.proxy_addr("default/svc");
    let extra1 = SocketAddr::from(([127, 0, 88, 1], port1));

    // Open connections, one per service, mid-stream.
    let mut on_svc = open(svc);
    let mut greeting = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        on_svc.read_exact(&mut byte).expect("greeting");
        greeting.push(byte[0]);
    }
    let mut on_extra = open(extra1);
    echo_once(&mut on_extra, b"before");

    // 1. Add an endpoint: new connections reach both.
    let g = proxy.generation();
    proxy.write_manifest(&manifest(&[a.addr, b.addr], Some((echo.addr, port1))));
    proxy.wait_newer_than(g);
    let seen: HashSet<String> = (0..4).map(|_| whoami(svc)).collect();
    assert_eq!(seen, HashSet::from([a.addr.to_string(), b.addr.to_string()]));

    // 2. Change a port: the old address stops listening, the new one serves.
    let g = proxy.generation();
    proxy.write_manifest(&manifest(&[a.addr, b.addr], Some((echo.addr, port2))));
    proxy.wait_newer_than(g);
    let extra2 = SocketAddr::from(([127, 0, 88, 1], port2));
    echo_once(&mut open(extra2), b"moved");
    // Workers close a listener when they take the new generation, which
    // can come a moment after the publish this test waited for.
    eventually(Duration::from_secs(5), "the old port to stop listening", || refused(extra1));

    // 3. Remove a service: it stops listening.
    let g = proxy.generation();
    proxy.write_manifest(&manifest(&[a.addr, b.addr], None));
    proxy.wait_newer_than(g);
    eventually(Duration::from_secs(5), "the removed service to stop listening", || refused(extra2));
    assert!(!whoami(svc).is_empty(), "the proxy port of svc is unchanged");

    // The connections opened at the start ran through all of it.
    echo_once(&mut on_extra, b"after");
    echo_once(&mut on_svc, b"still here");
    on_extra.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    on_extra.read_to_end(&mut rest).expect("EOF after the last echo");
    assert!(rest.is_empty());
}

#[test]
fn invalid_change_is_logged_and_the_last_good_configuration_keeps_serving() {
    let a = Backend::greeter();
    let proxy = Proxy::start(&manifest(&[a.addr], None), &[]);
    let svc = proxy.proxy_addr("default/svc");
    let g = proxy.generation();

    let broken =
        manifest(&[a.addr], None).replace("- {port: 80, protocol: TCP}", "- {port: 70000, protocol: TCP}");
    assert_ne!(broken, manifest(&[a.addr], None), "the test must really break the manifest");
    proxy.write_manifest(&broken);
    eventually(Duration::from_secs(10), "the rejected reload to be logged", || {
        proxy.log().contains("reload rejected")
    });
    let log = proxy.log();
    assert!(log.contains("spec.ports[0].port"), "the error names the field:\n{log}");
    assert!(log.contains("default/svc"), "the error names the object:\n{log}");
    assert_eq!(proxy.generation(), g, "nothing new was published");
    assert_eq!(whoami(svc), a.addr.to_string(), "the old configuration still serves");

    // A fixed manifest is picked up again (one that differs from the last
    // good state: the same again would change nothing, and publish nothing).
    let fixed =
        manifest(&[a.addr], None).replace("- {port: 80, protocol: TCP}", "- {port: 81, protocol: TCP}");
    proxy.write_manifest(&fixed);
    let g = proxy.wait_newer_than(g)["generation"].as_u64().expect("generation");

    // SIGHUP rereads everything; with no change on disk it says so and
    // publishes nothing.
    // SAFETY: kill(2) with a pid we spawned and a valid signal number.
    assert_eq!(unsafe { libc::kill(proxy.pid() as i32, libc::SIGHUP) }, 0);
    eventually(Duration::from_secs(10), "the SIGHUP reload to be logged", || {
        proxy
            .log()
            .lines()
            .any(|l| l.contains("reloaded: nothing changed") && l.contains("trigger=\"SIGHUP\""))
    });
    assert_eq!(proxy.generation(), g, "a reread with nothing changed published a snapshot");
}

/// One file of a directory changes: one apply, the slice it changed is
/// served, and the slice's `last-change-trigger-time` is timed as the API
/// source's is; the other file is untouched.
#[test]
fn a_changed_file_of_a_directory_is_one_apply_and_its_slice_trigger_time_is_measured() {
    let a = Backend::greeter();
    let proxy = Proxy::start(&manifest(&[a.addr], None), &[]);
    let web = |ips: &[&str], trigger: &str| {
        let endpoints: Vec<String> = ips.iter().map(|ip| format!("{{addresses: [\"{ip}\"]}}")).collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec: {{clusterIP: 10.96.7.9, ports: [{{port: 80, protocol: TCP}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}},\n\
             \x20 annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"}}}}\n\
             addressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        )
    };
    let now = || humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    let write = |text: &str| {
        let tmp = proxy.dir.path().join(".web.yaml.tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, proxy.dir.path().join("web.yaml")).expect("rename");
    };
    let g = proxy.generation();
    write(&web(&["10.1.0.1"], &now()));
    let g = proxy.wait_newer_than(g)["generation"].as_u64().expect("generation");
    let count = "ringport_network_programming_duration_seconds_count";
    // The engine times a change just after its snapshot is published, so
    // the snapshot can be seen first: read the count once the first write
    // is timed (nothing before it carried a trigger time), not at once.
    // Read at once, the count could miss the first write's observation,
    // which then met the check meant for the second.
    eventually(Duration::from_secs(10), "the first change is timed", || proxy.metric(count) == Some(1.0));
    let timed = 1.0;

    write(&web(&["10.1.0.1", "10.1.0.2"], &now()));
    let snap = proxy.wait_newer_than(g);
    assert_eq!(snap["generation"].as_u64(), Some(g + 1), "one file changed, one apply");
    let port = snap["service_ports"]
        .as_array()
        .expect("service_ports")
        .iter()
        .find(|p| p["name"] == "default/web")
        .cloned();
    let endpoints = port.and_then(|p| p["endpoints"].as_array().map(Vec::len));
    assert_eq!(endpoints, Some(2), "{snap:#}");
    eventually(Duration::from_secs(10), "the change is timed", || proxy.metric(count) == Some(timed + 1.0));
    assert_eq!(whoami(proxy.proxy_addr("default/svc")), a.addr.to_string(), "the other file still serves");
}
