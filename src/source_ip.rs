//! Whose address an endpoint sees as a connection's source: the client's
//! (transparent mode) or the node's (plain proxying). Pure: no I/O.
//!
//! A transparent upstream socket (`IP_TRANSPARENT`, bound to the client's
//! address) only works when the endpoint's replies are sure to come back
//! through this node, where the policy routing of
//! `redirect/transparent.rs` hands them to ringport. Replies from an
//! endpoint on another node go to the client directly and are lost, so
//! each endpoint is judged when the snapshot is built ([`SourcePlan`]),
//! and each connection once more for what only it can tell (a client that
//! is the endpoint itself, or of the other family).
//!
//! Invariants:
//! - An endpoint gets the client's address only when its Service asks for
//!   it (`ringport.io/source-ip: preserve`, or `--transparent` and no
//!   `proxy`), the mechanism was set up, and the endpoint runs on this node
//!   (its `nodeName` is `--node-name`).
//! - Every other case that asked is a fallback with a reason, counted per
//!   connection (`ringport_source_ip_fallback_total{reason}`) and shown per
//!   endpoint in `/debug/snapshot`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde::Serialize;

use crate::model::{ClientAddr, EndpointAddr, ServicePort, SourceIp};

/// The process-wide settings of transparent mode.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    /// `--transparent`: Services without `ringport.io/source-ip` preserve
    /// the client's address.
    pub transparent: bool,
    /// Whether the mechanism works here: `IP_TRANSPARENT` allowed and the
    /// policy routing in place (checked once at start).
    pub ready: bool,
    /// Whether IPv6 has its policy routing too (not on a node without IPv6).
    pub ready6: bool,
    /// The mark ringport's reply rule sets (`--transparent-mark`).
    pub mark: u32,
    /// The node's addresses and connected prefixes, kept current by
    /// `redirect::transparent`'s reader.
    pub routes: Arc<ArcSwap<NodeRoutes>>,
}

/// What the node's routing says about an endpoint's replies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRoutes {
    /// The node's own addresses: an endpoint there answers from this host
    /// (OUTPUT), past the prerouting mark.
    pub local: Vec<IpAddr>,
    /// Directly connected prefixes (routes without a gateway) of the main
    /// table, with their interface.
    pub links: Vec<(IpNet, String)>,
}

impl NodeRoutes {
    /// Whether `ip` is this node's own (or loopback).
    pub fn is_local(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || self.local.contains(&ip)
    }

    /// Whether `a` and `b` sit in one connected prefix of one interface:
    /// their packets are switched past the node's routing.
    pub fn same_link(&self, a: IpAddr, b: IpAddr) -> bool {
        let (a, b) = (a.to_canonical(), b.to_canonical());
        self.links.iter().any(|(net, _)| net.contains(&a) && net.contains(&b))
    }

    /// The connected prefixes in `ip route show` output: lines whose
    /// destination is a prefix, with a `dev` and no `via`. A host route
    /// (`/32`, `/128`) is kept: only hairpin traffic fits in it.
    pub fn parse_links(routes: &str) -> Vec<(IpNet, String)> {
        routes
            .lines()
            .filter_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let net = words.first()?;
                let net = net.parse::<IpNet>().or_else(|_| net.parse::<IpAddr>().map(IpNet::from)).ok()?;
                if words.contains(&"via") {
                    return None;
                }
                let dev = words.iter().position(|w| *w == "dev").and_then(|i| words.get(i + 1))?;
                Some((net.trunc(), (*dev).to_string()))
            })
            .collect()
    }
}

/// Why a connection that asked for the client's address got the node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// The annotation asks, but ringport runs without `--transparent`.
    Disabled,
    /// `--transparent` is on but could not be set up here.
    Unavailable,
    /// The endpoint runs on another node: its replies would not come back.
    RemoteEndpoint,
    /// The endpoint names no node (or ringport has no `--node-name`).
    UnknownNode,
    /// The client is the endpoint itself: a packet from its own address
    /// would be dropped as martian.
    Hairpin,
    /// The client's address is of the other family, or loopback.
    ClientAddress,
    /// The client's address came from an inbound PROXY header: whoever
    /// sends the header could name any address (another pod's, a node's).
    ProxyHeader,
    /// The kernel refused `IP_TRANSPARENT` or the bind for this socket.
    Refused,
    /// The endpoint is an address of this node (host network, loopback):
    /// its replies leave through OUTPUT and never meet the reply mark.
    NodeAddress,
    /// Client and endpoint share a connected prefix of one interface (one
    /// bridge): the replies are switched to the client past the node.
    SameLink,
}

impl Fallback {
    pub const ALL: [Fallback; 10] = [
        Fallback::Disabled,
        Fallback::Unavailable,
        Fallback::RemoteEndpoint,
        Fallback::UnknownNode,
        Fallback::Hairpin,
        Fallback::ClientAddress,
        Fallback::Refused,
        Fallback::NodeAddress,
        Fallback::SameLink,
        Fallback::ProxyHeader,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Disabled => "disabled",
            Fallback::Unavailable => "unavailable",
            Fallback::RemoteEndpoint => "remote-endpoint",
            Fallback::UnknownNode => "unknown-node",
            Fallback::Hairpin => "hairpin",
            Fallback::ClientAddress => "client-address",
            Fallback::Refused => "refused",
            Fallback::NodeAddress => "node-address",
            Fallback::SameLink => "same-link",
            Fallback::ProxyHeader => "proxy-header",
        }
    }
}

/// One endpoint's source, as `/debug/snapshot` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "source", content = "reason")]
pub enum Source {
    /// The client's own address.
    Client,
    /// The node's address: not asked for (`None`), or a fallback.
    Proxy(Option<Fallback>),
}

/// What a new connection's upstream socket does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Bind this (the client's) address, port 0, with `IP_TRANSPARENT`.
    Transparent { bind: SocketAddr },
    /// A plain socket; `Some` when the Service asked and this is a fallback.
    Plain(Option<Fallback>),
}

/// A service port's sources, decided when the snapshot is built. A port
/// that did not ask for the client's address (most ports of a large node)
/// keeps nothing but an empty pointer: every endpoint of it is then what
/// `of` says of an unknown one.
#[derive(Clone, Debug, Default)]
pub struct SourcePlan(Option<Box<Plan>>);

/// The sources of a port that asked for the client's address.
#[derive(Clone, Debug)]
struct Plan {
    /// Sorted by address, as the spec's endpoints.
    endpoints: Vec<(EndpointAddr, Source)>,
    /// Whether any endpoint gets the client's address.
    active: bool,
    mark: u32,
    routes: Arc<ArcSwap<NodeRoutes>>,
}

impl SourcePlan {
    /// Judge each endpoint of `spec` for this node (`node_name`).
    pub fn build(spec: &ServicePort, options: &SourceOptions, node_name: Option<&str>) -> Self {
        let asked = match spec.source_ip {
            Some(SourceIp::Preserve) => true,
            Some(SourceIp::Proxy) => false,
            None => options.transparent,
        };
        let setup = match (asked, options.transparent, options.ready) {
            (false, _, _) => return Self(None),
            (true, false, _) => Some(Fallback::Disabled),
            (true, true, false) => Some(Fallback::Unavailable),
            (true, true, true) => None,
        };
        let routes = options.routes.load();
        let mut endpoints: Vec<(EndpointAddr, Source)> = spec
            .endpoints
            .iter()
            .map(|e| {
                let no_ipv6 = e.addr.0.ip().to_canonical().is_ipv6() && !options.ready6;
                let source = match (setup, e.node_name.as_deref(), node_name) {
                    (Some(why), _, _) => Source::Proxy(Some(why)),
                    (None, _, _) if no_ipv6 => Source::Proxy(Some(Fallback::Unavailable)),
                    (None, _, _) if routes.is_local(e.addr.0.ip()) => {
                        Source::Proxy(Some(Fallback::NodeAddress))
                    }
                    (None, Some(theirs), Some(ours)) if theirs == ours => Source::Client,
                    (None, Some(_), Some(_)) => Source::Proxy(Some(Fallback::RemoteEndpoint)),
                    (None, _, _) => Source::Proxy(Some(Fallback::UnknownNode)),
                };
                (e.addr, source)
            })
            .collect();
        endpoints.sort_by_key(|(a, _)| *a);
        let active = endpoints.iter().any(|(_, s)| *s == Source::Client);
        Self(Some(Box::new(Plan { endpoints, active, mark: options.mark, routes: options.routes.clone() })))
    }

    /// The mark the reply rule sets (`--transparent-mark`), when any
    /// endpoint of this port gets the client's address (then the reply
    /// rule must be in place).
    pub fn active_mark(&self) -> Option<u32> {
        self.0.as_ref().filter(|p| p.active).map(|p| p.mark)
    }

    /// The source an endpoint gets (not asked, for an unknown one).
    pub fn of(&self, endpoint: EndpointAddr) -> Source {
        let Some(plan) = &self.0 else { return Source::Proxy(None) };
        match plan.endpoints.binary_search_by_key(&endpoint, |(a, _)| *a) {
            Ok(i) => plan.endpoints[i].1,
            Err(_) => Source::Proxy(None),
        }
    }

    /// What the upstream socket of `client`'s connection to `endpoint` does;
    /// `from_header`: the client's address is what an inbound PROXY header
    /// named, not the connection's peer.
    pub fn decide(&self, endpoint: EndpointAddr, client: ClientAddr, from_header: bool) -> Decision {
        match self.of(endpoint) {
            Source::Proxy(why) => Decision::Plain(why),
            Source::Client if from_header => Decision::Plain(Some(Fallback::ProxyHeader)),
            Source::Client => {
                let ip = client.0.ip().to_canonical();
                if ip == endpoint.0.ip().to_canonical() {
                    Decision::Plain(Some(Fallback::Hairpin))
                } else if ip.is_loopback()
                    || ip.is_unspecified()
                    || ip.is_ipv4() != endpoint.0.ip().to_canonical().is_ipv4()
                {
                    Decision::Plain(Some(Fallback::ClientAddress))
                } else if self.0.as_ref().is_some_and(|p| p.routes.load().same_link(ip, endpoint.0.ip())) {
                    Decision::Plain(Some(Fallback::SameLink))
                } else {
                    Decision::Transparent { bind: SocketAddr::new(ip, 0) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Origin, Protocol, ServiceName, ServicePortName};

    fn spec(source_ip: Option<SourceIp>) -> ServicePort {
        let name = ServicePortName { service: ServiceName::new("default", "web"), port: "".into() };
        let mut sp = ServicePort::new(name, Origin::new("t"), Protocol::Tcp, 80);
        sp.source_ip = source_ip;
        let ep = |ip: [u8; 4], node: Option<&str>| {
            let mut e = Endpoint::ready(EndpointAddr(SocketAddr::from((ip, 8080))));
            e.node_name = node.map(Into::into);
            e
        };
        sp.endpoints =
            vec![ep([10, 220, 0, 5], Some("a")), ep([10, 221, 0, 5], Some("b")), ep([10, 222, 0, 5], None)];
        sp
    }

    fn addr(s: &str) -> EndpointAddr {
        EndpointAddr(s.parse().unwrap())
    }

    fn on() -> SourceOptions {
        SourceOptions { transparent: true, ready: true, ready6: true, mark: 0x80000, ..Default::default() }
    }

    #[test]
    fn only_endpoints_on_this_node_get_the_client_address_and_the_rest_say_why() {
        let plan = SourcePlan::build(&spec(None), &on(), Some("a"));
        assert_eq!(plan.active_mark(), Some(0x80000), "--transparent-mark");
        assert_eq!(plan.of(addr("10.220.0.5:8080")), Source::Client);
        assert_eq!(plan.of(addr("10.221.0.5:8080")), Source::Proxy(Some(Fallback::RemoteEndpoint)));
        assert_eq!(plan.of(addr("10.222.0.5:8080")), Source::Proxy(Some(Fallback::UnknownNode)));
        let client = ClientAddr("10.220.0.9:5000".parse().unwrap());
        assert_eq!(
            plan.decide(addr("10.220.0.5:8080"), client, false),
            Decision::Transparent { bind: "10.220.0.9:0".parse().unwrap() }
        );
        assert_eq!(
            plan.decide(addr("10.221.0.5:8080"), client, false),
            Decision::Plain(Some(Fallback::RemoteEndpoint))
        );
        let mapped = ClientAddr("[::ffff:10.1.2.3]:5000".parse().unwrap());
        assert_eq!(
            plan.decide(addr("10.220.0.5:8080"), mapped, false),
            Decision::Transparent { bind: "10.1.2.3:0".parse().unwrap() }
        );
    }

    #[test]
    fn the_endpoint_itself_loopback_and_the_other_family_fall_back_per_connection() {
        let plan = SourcePlan::build(&spec(None), &on(), Some("a"));
        let ep = addr("10.220.0.5:8080");
        let client = |s: &str| ClientAddr(s.parse().unwrap());
        assert_eq!(
            plan.decide(ep, client("10.220.0.5:4000"), false),
            Decision::Plain(Some(Fallback::Hairpin))
        );
        assert_eq!(
            plan.decide(ep, client("127.0.0.1:4000"), false),
            Decision::Plain(Some(Fallback::ClientAddress))
        );
        assert_eq!(
            plan.decide(ep, client("[fd00::1]:4000"), false),
            Decision::Plain(Some(Fallback::ClientAddress))
        );
    }

    #[test]
    fn the_annotation_overrides_the_flag_and_a_missing_setup_is_a_fallback() {
        let proxy = SourcePlan::build(&spec(Some(SourceIp::Proxy)), &on(), Some("a"));
        assert_eq!(proxy.active_mark(), None);
        assert_eq!(proxy.of(addr("10.220.0.5:8080")), Source::Proxy(None));
        let off = SourceOptions { transparent: false, ..on() };
        let asked = SourcePlan::build(&spec(Some(SourceIp::Preserve)), &off, Some("a"));
        assert_eq!(asked.of(addr("10.220.0.5:8080")), Source::Proxy(Some(Fallback::Disabled)));
        let not_asked = SourcePlan::build(&spec(None), &off, Some("a"));
        assert_eq!(not_asked.of(addr("10.220.0.5:8080")), Source::Proxy(None));
        let broken = SourceOptions { ready: false, ..on() };
        let plan = SourcePlan::build(&spec(None), &broken, Some("a"));
        assert_eq!(plan.active_mark(), None);
        let client = ClientAddr("10.220.0.9:5000".parse().unwrap());
        assert_eq!(
            plan.decide(addr("10.220.0.5:8080"), client, false),
            Decision::Plain(Some(Fallback::Unavailable))
        );
        let mut v6 = spec(None);
        v6.endpoints[0].addr = addr("[fd00::5]:8080");
        let v4_only = SourceOptions { ready6: false, ..on() };
        let plan = SourcePlan::build(&v6, &v4_only, Some("a"));
        assert_eq!(plan.of(addr("[fd00::5]:8080")), Source::Proxy(Some(Fallback::Unavailable)));
        assert_eq!(plan.of(addr("10.221.0.5:8080")), Source::Proxy(Some(Fallback::RemoteEndpoint)));
        let plan = SourcePlan::build(&v6, &on(), Some("a"));
        let client = ClientAddr("[fd00::9]:5000".parse().unwrap());
        assert_eq!(
            plan.decide(addr("[fd00::5]:8080"), client, false),
            Decision::Transparent { bind: "[fd00::9]:0".parse().unwrap() }
        );
        let nameless = SourcePlan::build(&spec(None), &on(), None);
        assert_eq!(nameless.of(addr("10.220.0.5:8080")), Source::Proxy(Some(Fallback::UnknownNode)));
    }

    #[test]
    fn endpoints_on_a_node_address_or_loopback_fall_back_as_node_address() {
        let options = on();
        options
            .routes
            .store(Arc::new(NodeRoutes { local: vec!["10.220.0.5".parse().unwrap()], links: vec![] }));
        let mut sp = spec(None);
        sp.endpoints[1].addr = addr("127.0.0.1:8080");
        sp.endpoints[1].node_name = Some("a".into());
        let plan = SourcePlan::build(&sp, &options, Some("a"));
        assert_eq!(plan.of(addr("10.220.0.5:8080")), Source::Proxy(Some(Fallback::NodeAddress)));
        assert_eq!(plan.of(addr("127.0.0.1:8080")), Source::Proxy(Some(Fallback::NodeAddress)));
        assert_eq!(plan.active_mark(), None);
    }

    #[test]
    fn a_client_on_the_endpoints_own_link_falls_back_as_same_link() {
        let routes = "default via 10.100.0.2 dev wire\n\
                      10.100.0.0/24 dev wire proto kernel scope link src 10.100.0.1\n\
                      10.220.0.5 dev cali-ep scope link\n\
                      10.230.0.0/24 dev br0 proto kernel scope link src 10.230.0.1\n\
                      blackhole 10.240.0.0/16\n\
                      fd00:220::/64 dev cali-ep proto kernel metric 256 pref medium\n";
        let links = NodeRoutes::parse_links(routes);
        let nets: Vec<String> = links.iter().map(|(n, d)| format!("{n} {d}")).collect();
        assert_eq!(
            nets,
            ["10.100.0.0/24 wire", "10.220.0.5/32 cali-ep", "10.230.0.0/24 br0", "fd00:220::/64 cali-ep"]
        );
        let options = on();
        options.routes.store(Arc::new(NodeRoutes { local: vec![], links }));
        let mut sp = spec(None);
        sp.endpoints[0].addr = addr("10.230.0.5:8080");
        let plan = SourcePlan::build(&sp, &options, Some("a"));
        let ep = addr("10.230.0.5:8080");
        let client = |s: &str| ClientAddr(s.parse().unwrap());
        assert_eq!(
            plan.decide(ep, client("10.230.0.6:4000"), false),
            Decision::Plain(Some(Fallback::SameLink))
        );
        assert_eq!(
            plan.decide(ep, client("10.220.0.6:4000"), false),
            Decision::Transparent { bind: "10.220.0.6:0".parse().unwrap() }
        );
    }

    #[test]
    fn a_client_address_named_by_an_inbound_proxy_header_is_never_a_transparent_source() {
        let plan = SourcePlan::build(&spec(None), &on(), Some("a"));
        let named = ClientAddr("10.220.0.9:5000".parse().unwrap());
        let ep = addr("10.220.0.5:8080");
        assert_eq!(plan.decide(ep, named, true), Decision::Plain(Some(Fallback::ProxyHeader)));
        assert_eq!(
            plan.decide(ep, named, false),
            Decision::Transparent { bind: "10.220.0.9:0".parse().unwrap() }
        );
        let remote = addr("10.221.0.5:8080");
        assert_eq!(plan.decide(remote, named, true), Decision::Plain(Some(Fallback::RemoteEndpoint)));
    }

    #[test]
    fn a_source_shows_as_client_or_proxy_with_its_reason() {
        let json = |s: Source| serde_json::to_string(&s).unwrap();
        assert_eq!(json(Source::Client), r#"{"source":"client"}"#);
        assert_eq!(json(Source::Proxy(None)), r#"{"source":"proxy","reason":null}"#);
        assert_eq!(
            json(Source::Proxy(Some(Fallback::RemoteEndpoint))),
            r#"{"source":"proxy","reason":"remote-endpoint"}"#
        );
    }

    #[test]
    fn a_port_that_did_not_ask_keeps_one_empty_pointer_and_its_endpoints_are_not_asked() {
        // Pinned: 100k service ports hold one each; the plan of a port
        // that asked is out of line.
        assert_eq!(std::mem::size_of::<SourcePlan>(), 8);
        let plan = SourcePlan::build(&spec(Some(SourceIp::Proxy)), &on(), Some("a"));
        assert!(plan.0.is_none(), "nothing kept");
        assert_eq!(plan.active_mark(), None);
        assert_eq!(plan.of(addr("10.220.0.5:8080")), Source::Proxy(None));
        let client = ClientAddr("10.220.0.9:5000".parse().unwrap());
        assert_eq!(plan.decide(addr("10.220.0.5:8080"), client, false), Decision::Plain(None));
    }
}
