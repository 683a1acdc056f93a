//! Listening sockets: where each service port listens (TCP: listening
//! sockets; UDP: bound datagram sockets), one per worker with
//! `SO_REUSEPORT`, and kept across reloads.
//!
//! The [`Binder`] turns the service ports of a new configuration into
//! [`Listener`]s. A listener whose [`ListenKey`] already existed in the
//! previous snapshot is reused as is, so an unchanged service port keeps its
//! sockets and its proxy port for the life of the process, and a reload
//! never drops a queued connection.
//!
//! Invariants:
//! - A listener holds one socket per worker, and each worker takes its own
//!   exactly once ([`Listener::take_socket`]): from then on the worker owns
//!   it and closes it when the listener leaves the snapshot.
//! - No two listeners of one configuration share an address and protocol.
//! - A port that cannot be bound is an error for that listener only.
//! - A port another process holds is an error, not a silent share: before
//!   the first bind of a port, a probe socket without `SO_REUSEPORT` binds
//!   it alone. (The kernel would otherwise let a second ringport, or any
//!   process of the same user setting `SO_REUSEPORT`, split the port's
//!   connections with us.) The probe is closed before the real sockets
//!   bind, so a process that binds with `SO_REUSEPORT` in that instant still
//!   shares the port; an address (IP and port) this process held once is
//!   not probed again (our own sockets may still hold it while workers let
//!   go); and a
//!   TCP port another process holds without listening (a ringport port with
//!   no endpoint, paused or not yet listening) cannot be told from a
//!   TIME_WAIT leftover, which the probe must tolerate, so it is not seen.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, Weak};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockRef, Socket, Type};

use crate::handover::Handed;

mod adopt;
use crate::model::{Protocol, ServicePort, ServicePortName};

mod held;
mod plan;
mod shared;
pub use held::Held;
use held::Used;
pub use plan::{NodeView, node_addresses, plan};
pub use shared::{ProxyPortMode, plan_port, shared_plan};

/// Backlog of every listening socket (the kernel caps it at somaxconn).
pub const BACKLOG: i32 = 4096;
/// Receive and send buffer asked for each UDP listening socket.
const UDP_BUFFER_BYTES: usize = 8 << 20;

/// What a listener is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ListenRole {
    /// The service port's proxy port on `--bind-address`: cluster-IP
    /// traffic is redirected here.
    Proxy,
    /// The service port's second proxy port, for its non-local externalIPs
    /// and LoadBalancer IPs: traffic redirected here keeps its external
    /// scope (`externalTrafficPolicy`). Only service ports that have such
    /// addresses get one.
    ExternalProxy,
    /// The IPv6 twins of the two above (on `bind_address6`), for IPv6
    /// addresses the rules redirect; same port number when it was free.
    Proxy6,
    ExternalProxy6,
    /// `nodePort` on one node address.
    NodePort(IpAddr),
    /// `spec.externalIPs[]` that is local to this node.
    External(IpAddr),
    /// `status.loadBalancer.ingress[].ip` that is local to this node.
    LoadBalancer(IpAddr),
}

impl fmt::Display for ListenRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenRole::Proxy => f.write_str("proxy"),
            ListenRole::ExternalProxy => f.write_str("externalProxy"),
            ListenRole::Proxy6 => f.write_str("proxy6"),
            ListenRole::ExternalProxy6 => f.write_str("externalProxy6"),
            ListenRole::NodePort(_) => f.write_str("nodePort"),
            ListenRole::External(_) => f.write_str("externalIP"),
            ListenRole::LoadBalancer(_) => f.write_str("loadBalancer"),
        }
    }
}

impl ListenRole {
    /// Whether this listener's port is chosen by ringport (a proxy port)
    /// rather than declared by the Service.
    pub fn is_proxy(self) -> bool {
        matches!(
            self,
            ListenRole::Proxy | ListenRole::ExternalProxy | ListenRole::Proxy6 | ListenRole::ExternalProxy6
        )
    }

    /// The IPv4 twin of an IPv6 proxy port, whose number it tries first.
    fn first_family(self) -> Option<ListenRole> {
        match self {
            ListenRole::Proxy6 => Some(ListenRole::Proxy),
            ListenRole::ExternalProxy6 => Some(ListenRole::ExternalProxy),
            _ => None,
        }
    }
}

/// What identifies a listener across reloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ListenKey {
    pub port: ServicePortName,
    pub protocol: Protocol,
    pub role: ListenRole,
    /// The port asked for; 0 for a proxy port (chosen at first bind).
    pub wanted_port: u16,
}

/// Unique for the life of the process; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ListenerId(pub u64);

/// Bound sockets for one listen address, one per worker.
pub struct Listener {
    pub id: ListenerId,
    pub key: ListenKey,
    /// The bound address (with the real port for a proxy port).
    pub addr: SocketAddr,
    /// The sockets no worker has taken yet.
    sockets: Vec<Mutex<Option<Arc<OwnedFd>>>>,
    /// Every socket, taken or not, while its holder keeps it open: what a
    /// handover sends (`crate::handover`). Weak, so a worker that lets go
    /// of a socket closes it at once.
    open: Vec<Weak<OwnedFd>>,
}

impl Listener {
    /// A listener that holds no socket: the control plane (rules,
    /// snapshots) sees only its key and address. For benchmarks and tests
    /// of the control plane at a scale no fd limit allows.
    pub fn without_sockets(id: ListenerId, key: ListenKey, addr: SocketAddr) -> Self {
        Self { id, key, addr, sockets: Vec::new(), open: Vec::new() }
    }

    /// Hand worker `worker` its socket. Some only the first time.
    pub fn take_socket(&self, worker: usize) -> Option<Arc<OwnedFd>> {
        let slot = self.sockets.get(worker)?;
        // A poisoned lock only means another worker panicked while taking
        // its own socket; this worker's slot is still intact.
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.take()
    }

    /// Start listening on the TCP sockets no worker has taken yet (a no-op
    /// for UDP, and for a socket already listening).
    pub fn listen_untaken(&self) -> io::Result<()> {
        if self.key.protocol != Protocol::Tcp {
            return Ok(());
        }
        for slot in &self.sockets {
            let slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(fd) = slot.as_ref() {
                SockRef::from(fd).listen(BACKLOG)?;
            }
        }
        Ok(())
    }

    /// Every socket of this listener still open, in worker order.
    pub fn open_sockets(&self) -> Vec<Arc<OwnedFd>> {
        self.open.iter().filter_map(Weak::upgrade).collect()
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener").field("id", &self.id).field("addr", &self.addr).finish()
    }
}

/// A listen address that is not served, and why.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{key_port} {role} {addr}: address is not local to this node")]
    NotLocal { key_port: ServicePortName, role: ListenRole, addr: SocketAddr },
    #[error("{key_port} {role} {addr}: also claimed by {other}")]
    Clash { key_port: ServicePortName, role: ListenRole, addr: SocketAddr, other: ServicePortName },
    #[error("{key_port} {role} {addr}: cannot listen")]
    Bind {
        key_port: ServicePortName,
        role: ListenRole,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{key_port} {role} {addr}: the port is held by another process (another ringport?)")]
    HeldElsewhere { key_port: ServicePortName, role: ListenRole, addr: SocketAddr },
    #[error("{key_port}: no free port left in --proxy-port-range {start}-{end}")]
    RangeExhausted { key_port: ServicePortName, start: u16, end: u16 },
    #[error(
        "{key_port} {field} {addr}: this is the proxy address (--bind-address or its IPv6 twin), where \
         ringport's own proxy ports listen; not served there"
    )]
    ProxyAddress { key_port: ServicePortName, field: String, addr: SocketAddr },
}

impl BindError {
    /// The service port whose address this is.
    pub fn port(&self) -> &ServicePortName {
        match self {
            BindError::NotLocal { key_port, .. }
            | BindError::Clash { key_port, .. }
            | BindError::Bind { key_port, .. }
            | BindError::HeldElsewhere { key_port, .. }
            | BindError::RangeExhausted { key_port, .. }
            | BindError::ProxyAddress { key_port, .. } => key_port,
        }
    }

    /// Whether this is expected on a healthy node (a non-local external
    /// address is the redirect rules' business, not a fault).
    pub fn is_benign(&self) -> bool {
        matches!(self, BindError::NotLocal { .. })
    }
}

/// Where listeners go, from the command line.
#[derive(Clone, Debug)]
pub struct ListenOptions {
    /// `--bind-address`: the address proxy ports listen on.
    pub bind_address: IpAddr,
    /// With rules and an IPv4 `bind_address`: the IPv6 proxy address, where
    /// service ports with IPv6 addresses to redirect get a second proxy
    /// port ([`ListenRole::Proxy6`]). `None`: one family only.
    pub bind_address6: Option<IpAddr>,
    /// `--proxy-port-range`; `None` lets the kernel choose.
    pub proxy_port_range: Option<RangeInclusive<u16>>,
    /// `--nodeport-addresses`; empty means every address.
    pub nodeport_addresses: Vec<IpNet>,
    /// One socket per worker on every listen address.
    pub workers: usize,
    /// Redirect rules are programmed (`--redirect` is not `none`): only
    /// then is an external proxy port needed, for the external and LB IPs
    /// that are not local (which the rules send to it).
    pub redirect_rules: bool,
    /// `--proxy-port-mode`: proxy ports per service port, or shared.
    pub proxy_port_mode: ProxyPortMode,
}

/// Binds listeners; remembers which proxy ports it handed out.
pub struct Binder {
    opts: ListenOptions,
    next_id: u64,
    range_cursor: u16,
    /// Addresses this process has bound: not probed again (module header).
    bound: HashSet<(SocketAddr, Protocol)>,
    /// Sockets the instance this one took over from handed over, waiting
    /// for the first bind that wants them (`crate::handover`).
    adopted: HashMap<ListenKey, Handed>,
    /// `(protocol, VIP, port) -> proxy port` of the rules a previous run
    /// left: the first bind binds those ports again, so that rules and
    /// ports agree from the first moment after a crash.
    preferred: HashMap<(Protocol, IpAddr, u16), u16>,
    /// The same read back the other way, `(protocol, proxy port) -> every
    /// (VIP, service port) sent to it`: a port is bound again for a service
    /// port only if all that points at it is that service port's.
    preferred_keys: HashMap<(Protocol, u16), Vec<(IpAddr, u16)>>,
    /// Shared proxy ports bound at start, before any configuration,
    /// waiting for the first bind (`Binder::bind_shared_at_start`).
    started_shared: Vec<Arc<Listener>>,
}

impl Binder {
    pub fn new(opts: ListenOptions) -> Self {
        let range_cursor = opts.proxy_port_range.as_ref().map_or(0, |r| *r.start());
        Self {
            opts,
            next_id: 1,
            range_cursor,
            bound: HashSet::new(),
            adopted: HashMap::new(),
            preferred: HashMap::new(),
            preferred_keys: HashMap::new(),
            started_shared: Vec::new(),
        }
    }

    pub fn options(&self) -> &ListenOptions {
        &self.opts
    }

    /// The listeners for `ports`, reusing those of `previous` whose key is
    /// unchanged. Errors concern single listeners; the rest are served.
    pub fn bind(
        &mut self,
        ports: &[ServicePort],
        previous: &[Arc<Listener>],
    ) -> (Vec<Arc<Listener>>, Vec<BindError>) {
        let held = Held::of(previous);
        let node = NodeView::now(&self.opts);
        let (mut listeners, errors) = self.bind_changed(ports, &held, &|_| true, &node);
        // A whole bind lists the shared proxy ports too, kept or new.
        for (role, _) in shared_plan(&self.opts) {
            if let Some(kept) = held.listener(&ListenKey::shared(role))
                && !listeners.iter().any(|l| l.id == kept.id)
            {
                listeners.insert(0, Arc::clone(kept));
            }
        }
        (listeners, errors)
    }

    /// The listeners for `ports`, the changed service ports of a
    /// configuration whose other ports keep the listeners `held` has. A
    /// listener `held` has with an unchanged key is reused; an address
    /// another port's listener holds is a clash, unless that port is
    /// `leaving` (it changes or goes with this update). Planned against
    /// `node`, the update's one view of the node.
    pub fn bind_changed(
        &mut self,
        ports: &[impl std::borrow::Borrow<ServicePort>],
        held: &Held,
        leaving: &dyn Fn(&ServicePortName) -> bool,
        node: &NodeView,
    ) -> (Vec<Arc<Listener>>, Vec<BindError>) {
        let mut claimed: HashMap<(SocketAddr, Protocol), ServicePortName> = HashMap::new();
        let mut used_proxy_ports = Used::new(held);
        // The shared proxy ports are bound once, with the first bind.
        let shared_held = shared_plan(&self.opts)
            .iter()
            .all(|(role, _)| held.listener(&ListenKey::shared(*role)).is_some());
        let (mut listeners, mut errors) = match shared_held {
            true => (Vec::new(), Vec::new()),
            false => self.bind_shared(held, &mut used_proxy_ports),
        };
        // A Service's listener on a shared port's address would join its
        // SO_REUSEPORT group and take a share of every redirected
        // connection: the shared ports are claimed first (bound now or
        // held: they never leave), so it clashes.
        let held_shared =
            shared_plan(&self.opts).into_iter().filter_map(|(r, _)| held.listener(&ListenKey::shared(r)));
        for l in listeners.iter().chain(held_shared) {
            claimed.insert((l.addr, l.key.protocol), l.key.port.clone());
        }

        for sp in ports {
            let sp: &ServicePort = sp.borrow();
            // An IPv6 twin asks for its IPv4 twin's number: maps read alike.
            let mut proxy_ports: HashMap<ListenRole, u16> = HashMap::new();
            for (role, ip, port) in plan_port(sp, &self.opts, node) {
                let key = ListenKey { port: sp.name.clone(), protocol: sp.protocol, role, wanted_port: port };
                let addr = SocketAddr::new(ip, port);
                let elsewhere = held.claimant(addr, sp.protocol).filter(|o| !leaving(o));
                if let Some(e) = self.refused_before_bind(sp, role, addr, &claimed, elsewhere) {
                    errors.push(e);
                    continue;
                }
                let twin = role.first_family().and_then(|r| proxy_ports.get(&r).copied());
                let result = match held.listener(&key) {
                    Some(existing) => Ok(Arc::clone(existing)),
                    None => match self.take_adopted(&key, ip, &mut used_proxy_ports) {
                        Some(adopted) => Ok(adopted),
                        None => match twin.and_then(|p| self.bind_twin(&key, SocketAddr::new(ip, p))) {
                            Some(listener) => Ok(listener),
                            None => match self.bind_preferred(sp, &key, ip, &mut used_proxy_ports) {
                                Some(listener) => Ok(listener),
                                None => self.bind_new(key, ip, &mut used_proxy_ports),
                            },
                        },
                    },
                };
                if let Ok(listener) = &result
                    && role.is_proxy()
                {
                    proxy_ports.insert(role, listener.addr.port());
                }
                match result {
                    Ok(listener) => {
                        let claim = (listener.addr, sp.protocol);
                        let elsewhere = held.claimant(listener.addr, sp.protocol).filter(|o| !leaving(o));
                        if let Some(other) = claimed.get(&claim).or(elsewhere) {
                            errors.push(BindError::Clash {
                                key_port: sp.name.clone(),
                                role,
                                addr: listener.addr,
                                other: other.clone(),
                            });
                            continue;
                        }
                        claimed.insert(claim, sp.name.clone());
                        listeners.push(listener);
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        self.first_bind_done();
        (listeners, errors)
    }

    /// Why a listener with a declared port (node port, external or LB IP)
    /// must not be bound at all, before binding joins a port group: its
    /// address is a proxy address (External or LoadBalancer on
    /// `bind_address`/`bind_address6`), or another listener of this
    /// configuration (a shared proxy port included) claimed it: one bound
    /// by this update (`claimed`) or one that stays (`elsewhere`).
    fn refused_before_bind(
        &self,
        sp: &ServicePort,
        role: ListenRole,
        addr: SocketAddr,
        claimed: &HashMap<(SocketAddr, Protocol), ServicePortName>,
        elsewhere: Option<&ServicePortName>,
    ) -> Option<BindError> {
        if role.is_proxy() {
            return None;
        }
        // Only with rules is the bind address the proxy address the rules
        // DNAT to; without them (the edge proxy) an external IP on it is
        // how a Service asks for a fixed port, and `claimed` keeps it off
        // a proxy port's group.
        let proxy_address = self.opts.redirect_rules
            && (addr.ip() == self.opts.bind_address || Some(addr.ip()) == self.opts.bind_address6);
        let field = match role {
            ListenRole::External(ip) => {
                sp.external_ips.iter().position(|e| *e == ip).map(|i| format!("spec.externalIPs[{i}]"))
            }
            ListenRole::LoadBalancer(ip) => sp
                .load_balancer_ips
                .iter()
                .position(|e| *e == ip)
                .map(|i| format!("status.loadBalancer.ingress[{i}].ip")),
            _ => None,
        };
        if let Some(field) = field.filter(|_| proxy_address) {
            return Some(BindError::ProxyAddress { key_port: sp.name.clone(), field, addr });
        }
        let other = claimed.get(&(addr, sp.protocol)).or(elsewhere)?;
        Some(BindError::Clash { key_port: sp.name.clone(), role, addr, other: other.clone() })
    }

    /// An IPv6 proxy port on its IPv4 twin's number, if that is free here.
    fn bind_twin(&mut self, key: &ListenKey, addr: SocketAddr) -> Option<Arc<Listener>> {
        let sockets = self.bind_checked(addr, key.protocol).ok()?;
        Some(self.listener(key.clone(), sockets))
    }

    // Bind errors are rare and off the hot path; their size does not matter.
    #[allow(clippy::result_large_err)]
    fn bind_new(
        &mut self,
        key: ListenKey,
        ip: IpAddr,
        used_proxy_ports: &mut Used<'_>,
    ) -> Result<Arc<Listener>, BindError> {
        let port = if key.role.is_proxy() {
            match self.opts.proxy_port_range.clone() {
                None => 0,
                Some(range) => return self.bind_in_range(key, ip, range, used_proxy_ports),
            }
        } else {
            key.wanted_port
        };
        let addr = SocketAddr::new(ip, port);
        let sockets = self.bind_checked(addr, key.protocol).map_err(|source| {
            let (key_port, role) = (key.port.clone(), key.role);
            match source.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => BindError::NotLocal { key_port, role, addr },
                Some(libc::EADDRINUSE) if port != 0 => BindError::HeldElsewhere { key_port, role, addr },
                _ => BindError::Bind { key_port, role, addr, source },
            }
        })?;
        Ok(self.listener(key, sockets))
    }

    #[allow(clippy::result_large_err)]
    fn bind_in_range(
        &mut self,
        key: ListenKey,
        ip: IpAddr,
        range: RangeInclusive<u16>,
        used: &mut Used<'_>,
    ) -> Result<Arc<Listener>, BindError> {
        let (start, end) = (*range.start(), *range.end());
        let span = usize::from(end - start) + 1;
        for _ in 0..span {
            let port = self.range_cursor;
            self.range_cursor = if port >= end { start } else { port + 1 };
            if used.contains(&port) {
                continue;
            }
            if let Ok(sockets) = self.bind_checked(SocketAddr::new(ip, port), key.protocol) {
                used.insert(port);
                return Ok(self.listener(key, sockets));
            }
        }
        Err(BindError::RangeExhausted { key_port: key.port, start, end })
    }

    /// The workers' sockets on `addr`, after a probe (module header) for a
    /// port this process has not bound before.
    fn bind_checked(&mut self, addr: SocketAddr, protocol: Protocol) -> io::Result<Vec<Socket>> {
        let freebind = self.opts.bind_address6 == Some(addr.ip());
        if addr.port() != 0 && !self.bound.contains(&(addr, protocol)) {
            drop(bind_one(addr, protocol, false, freebind)?);
        }
        let sockets = bind_reuseport(addr, protocol, self.opts.workers, freebind)?;
        if let Some(bound) = sockets.first().and_then(|s| s.local_addr().ok()).and_then(|a| a.as_socket()) {
            self.bound.insert((bound, protocol));
        }
        Ok(sockets)
    }

    fn listener(&mut self, key: ListenKey, sockets: Vec<Socket>) -> Arc<Listener> {
        let id = ListenerId(self.next_id);
        self.next_id += 1;
        let addr = sockets
            .first()
            .and_then(|s| s.local_addr().ok())
            .and_then(|a| a.as_socket())
            .unwrap_or_else(|| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
        let sockets: Vec<Arc<OwnedFd>> = sockets.into_iter().map(|s| Arc::new(OwnedFd::from(s))).collect();
        let open = sockets.iter().map(Arc::downgrade).collect();
        let sockets = sockets.into_iter().map(|s| Mutex::new(Some(s))).collect();
        Arc::new(Listener { id, key, addr, sockets, open })
    }
}

fn socket_type(protocol: Protocol) -> Type {
    match protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    }
}

/// One bound (not yet listening) socket on `addr`, sharing it through
/// `SO_REUSEPORT` or not; `freebind` for the IPv6 proxy address.
fn bind_one(addr: SocketAddr, protocol: Protocol, reuse_port: bool, freebind: bool) -> io::Result<Socket> {
    let kind = match protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let s = Socket::new(Domain::for_address(addr), kind.nonblocking().cloexec(), None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        // The IPv6 proxy address is a local route, not an address on an
        // interface (`redirect::proxy_address`): only a free bind takes it.
        s.set_freebind_v6(freebind)?;
    }
    // Two UDP sockets with SO_REUSEADDR share a port on Linux: a probe
    // that set it would see nothing.
    s.set_reuse_address(reuse_port || protocol == Protocol::Tcp)?;
    s.set_reuse_port(reuse_port)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// `n` sockets bound to one address (TCP ones not listening yet), sharing
/// it through SO_REUSEPORT. A port of 0 is chosen by the kernel through a
/// probe socket, and every socket then binds that port explicitly: a TCP
/// socket bound to port 0 would lose its port when paused (`shutdown`) and
/// resumed (`listen`).
fn bind_reuseport(addr: SocketAddr, protocol: Protocol, n: usize, freebind: bool) -> io::Result<Vec<Socket>> {
    let socket = |addr: SocketAddr| bind_one(addr, protocol, true, freebind);
    let mut addr = addr;
    // Held until every listener is bound, so nobody else takes the port.
    let _probe = if addr.port() == 0 {
        let probe = socket(addr)?;
        addr = probe.local_addr()?.as_socket().unwrap_or(addr);
        Some(probe)
    } else {
        None
    };
    (0..n.max(1))
        .map(|_| {
            let s = socket(addr)?;
            match protocol {
                // Not listening yet: each worker listens when it takes its
                // socket and the port has an endpoint (`dataplane::accept`),
                // so until then a connection is refused, never queued and
                // then reset.
                Protocol::Tcp => {}
                // One socket takes every client's datagrams for this worker:
                // a deep buffer rides out bursts. Past net.core.rmem_max
                // with CAP_NET_ADMIN, else capped by it; failing to grow
                // it is not an error.
                Protocol::Udp => {
                    let fd = std::os::fd::AsFd::as_fd(&s);
                    if crate::dataplane::sys::force_buffer_sizes(fd, UDP_BUFFER_BYTES).is_err() {
                        let _ = s.set_recv_buffer_size(UDP_BUFFER_BYTES);
                        let _ = s.set_send_buffer_size(UDP_BUFFER_BYTES);
                    }
                    // Replies must leave from the address each datagram was
                    // sent to (see `sys::Datagram::to`).
                    crate::dataplane::sys::enable_pktinfo(std::os::fd::AsFd::as_fd(&s), addr.is_ipv6())?;
                }
            }
            Ok(s)
        })
        .collect()
}

#[cfg(test)]
mod tests;
