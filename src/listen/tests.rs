//! Unit tests of the binder: proxy ports, clashes, probes and buffers.

use super::*;
use crate::model::{Origin, ServiceName};

fn port(name: &str, ext: Vec<IpAddr>, node_port: Option<u16>) -> ServicePort {
    let name = ServicePortName { service: ServiceName::new("default", name), port: "".into() };
    let mut sp = ServicePort::new(name, Origin::new("test"), Protocol::Tcp, 8080);
    sp.external_ips = ext;
    sp.node_port = node_port.and_then(std::num::NonZeroU16::new);
    sp
}

fn binder() -> Binder {
    Binder::new(ListenOptions {
        bind_address: Ipv4Addr::LOCALHOST.into(),
        bind_address6: None,
        proxy_port_range: None,
        nodeport_addresses: vec![],
        workers: 2,
        redirect_rules: true,
        proxy_port_mode: ProxyPortMode::PerService,
    })
}

#[test]
fn udp_listeners_get_their_full_buffer_with_cap_net_admin_or_what_rmem_max_allows() {
    let sockets = bind_reuseport((Ipv4Addr::LOCALHOST, 0).into(), Protocol::Udp, 1, false).expect("bind");
    let got = sockets[0].recv_buffer_size().expect("SO_RCVBUF");
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("net.core.rmem_max");
    // The kernel reports twice what was set (its bookkeeping share).
    let probe = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("socket");
    let forced = crate::dataplane::sys::force_buffer_sizes(std::os::fd::AsFd::as_fd(&probe), 4096).is_ok();
    let want = if forced { 2 * UDP_BUFFER_BYTES } else { 2 * UDP_BUFFER_BYTES.min(rmem_max) };
    assert_eq!(got, want, "CAP_NET_ADMIN: {forced}, rmem_max {rmem_max}");
}

#[test]
fn an_external_proxy_port_only_with_rules_and_a_non_local_external_ip() {
    let roles = |b: &mut Binder, ips: &[&str]| {
        let ext = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        let (ls, _) = b.bind(&[port("a", ext, None)], &[]);
        ls.iter().filter(|l| l.key.role == ListenRole::ExternalProxy).count()
    };
    let mut rules = binder();
    assert_eq!(roles(&mut rules, &["127.0.0.1"]), 0, "every external IP local: no external proxy port");
    assert_eq!(roles(&mut rules, &["127.0.0.1", "192.0.2.1"]), 1);
    let mut none = Binder::new(ListenOptions { redirect_rules: false, ..binder().opts });
    assert_eq!(roles(&mut none, &["192.0.2.1"]), 0, "--redirect none: nothing sends traffic to one");
}

#[test]
fn unchanged_service_port_keeps_its_proxy_port_across_rebinds() {
    let mut b = binder();
    let ports = vec![port("a", vec![], None)];
    let (first, errors) = b.bind(&ports, &[]);
    assert!(errors.is_empty(), "{errors:?}");
    let (second, _) = b.bind(&ports, &first);
    assert_eq!(first[0].id, second[0].id);
    assert_eq!(first[0].addr, second[0].addr);
    assert_ne!(first[0].addr.port(), 0);
}

#[test]
fn every_worker_takes_its_own_socket_once() {
    let mut b = binder();
    let (ls, _) = b.bind(&[port("a", vec![], None)], &[]);
    assert!(ls[0].take_socket(0).is_some());
    assert!(ls[0].take_socket(0).is_none());
    assert!(ls[0].take_socket(1).is_some());
    assert!(ls[0].take_socket(2).is_none());
}

#[test]
fn non_local_external_ip_is_reported_as_not_local() {
    let mut b = binder();
    // 192.0.2.1 (TEST-NET-1) is never assigned here; bind only, no traffic.
    let (ls, errors) = b.bind(&[port("a", vec!["192.0.2.1".parse().unwrap()], None)], &[]);
    assert_eq!(ls.len(), 2, "the proxy ports still listen");
    assert_eq!(ls[1].key.role, ListenRole::ExternalProxy);
    assert!(matches!(errors[..], [BindError::NotLocal { .. }]), "{errors:?}");
}

#[test]
fn two_service_ports_on_one_address_clash_and_the_first_keeps_it() {
    let mut b = binder();
    let ip: IpAddr = "127.0.0.77".parse().unwrap();
    let (ls, errors) = b.bind(&[port("a", vec![ip], None), port("b", vec![ip], None)], &[]);
    assert_eq!(ls.len(), 5, "two proxy ports each, and one of the two external listeners");
    assert!(matches!(errors[..], [BindError::Clash { .. }]), "{errors:?}");
}

#[test]
fn a_service_port_on_the_shared_ports_address_clashes_and_does_not_join_its_group() {
    let mut b = Binder::new(ListenOptions { proxy_port_mode: ProxyPortMode::Shared, ..binder().opts });
    let (ls, errors) = b.bind(&[], &[]);
    assert!(errors.is_empty(), "{errors:?}");
    let shared = ls[0].addr;
    // An external IP on another loopback address, on the shared port's
    // number: bound, and unrelated.
    let mut elsewhere = port("a", vec!["127.0.0.78".parse().unwrap()], None);
    elsewhere.port = shared.port();
    // A node port on the shared port's address (as with the node IP as
    // --bind-address): never bound.
    let mut on_it = port("b", vec![], Some(shared.port()));
    on_it.cluster_ips = vec!["10.96.0.1".parse().unwrap()];
    b.opts.nodeport_addresses = vec!["127.0.0.1/32".parse().unwrap()];
    let (ls2, errors) = b.bind(&[elsewhere, on_it], &ls);
    assert!(
        matches!(&errors[..], [BindError::Clash { addr, other, .. }] if *addr == shared && *other == ls[0].key.port),
        "{errors:?}"
    );
    assert_eq!(ls2.iter().filter(|l| l.addr == shared).count(), 1, "only the shared port: {ls2:?}");
    assert!(ls2.iter().any(|l| l.key.role == ListenRole::External("127.0.0.78".parse().unwrap())));
}

#[test]
fn an_external_or_lb_ip_on_the_proxy_address_is_refused_naming_its_field() {
    let mut sp = port("a", vec!["127.0.0.79".parse().unwrap(), "127.0.0.1".parse().unwrap()], None);
    sp.load_balancer_ips = vec!["127.0.0.1".parse().unwrap()];
    // Without rules (the edge proxy) the bind address is no proxy address:
    // an external IP on it is served.
    let mut without_rules = Binder::new(ListenOptions { redirect_rules: false, ..binder().opts });
    let mut edge = sp.clone();
    edge.load_balancer_ips.clear();
    let (ls, errors) = without_rules.bind(&[edge], &[]);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(ls.iter().any(|l| l.key.role == ListenRole::External(Ipv4Addr::LOCALHOST.into())), "{ls:?}");
    drop(ls);
    let (ls, errors) = binder().bind(&[sp], &[]);
    let fields: Vec<String> = errors
        .iter()
        .map(|e| match e {
            BindError::ProxyAddress { field, .. } => field.clone(),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(fields, ["spec.externalIPs[1]", "status.loadBalancer.ingress[0].ip"]);
    assert!(errors[0].to_string().contains("default/a"), "{}", errors[0]);
    assert!(!ls.iter().any(|l| l.addr.ip() == Ipv4Addr::LOCALHOST && !l.key.role.is_proxy()), "{ls:?}");
}

#[test]
fn a_port_another_process_shares_through_reuseport_is_held_elsewhere() {
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        // What a second ringport does for a port it serves:
        // SO_REUSEPORT sockets, bound, and listening for TCP.
        let other = bind_reuseport("127.0.0.1:0".parse().unwrap(), protocol, 1, false).unwrap();
        if protocol == Protocol::Tcp {
            other[0].listen(BACKLOG).unwrap();
        }
        let taken = other[0].local_addr().unwrap().as_socket().unwrap().port();
        let mut sp = port("a", vec![], Some(taken));
        sp.protocol = protocol;
        let mut b = binder();
        b.opts.nodeport_addresses = vec!["127.0.0.1/32".parse().unwrap()];
        let (ls, errors) = b.bind(&[sp], &[]);
        assert_eq!(ls.len(), 1, "{protocol}: the proxy port still listens");
        assert!(matches!(errors[..], [BindError::HeldElsewhere { .. }]), "{protocol}: {errors:?}");
    }
}

#[test]
fn proxy_ports_come_from_the_range() {
    let mut b = Binder::new(ListenOptions { proxy_port_range: Some(24310..=24319), ..binder().opts });
    let (ls, errors) = b.bind(&[port("a", vec![], None), port("b", vec![], None)], &[]);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(ls.iter().all(|l| (24310..=24319).contains(&l.addr.port())));
    assert_ne!(ls[0].addr.port(), ls[1].addr.port());
}
