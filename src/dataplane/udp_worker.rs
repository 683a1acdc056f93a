//! The worker's UDP side: receiving client datagrams in batches, sending
//! them to endpoints through io_uring, relaying replies back in batches,
//! and closing flows on idleness, ICMP errors and endpoint changes.
//!
//! A datagram costs no syscall of its own: client datagrams arrive up to 16
//! per `recvmmsg` (within the listener's byte budget per wake-up,
//! `udp_pace.rs`), go out as io_uring `SEND`s submitted together with
//! everything else of the loop turn, and replies return up to 16 per
//! `recvmmsg` / `sendmmsg` pair.
//!
//! Invariants:
//! - A datagram's bytes are owned by `Worker::sends` (`sys::Sends`) until
//!   the kernel reports its send complete; the completion finds its flow by
//!   key and generation, so a recycled slot is never mistaken for it.
//! - A flow is freed only when its machine (`udp_flow.rs`) says so: once
//!   its poll is no longer in flight.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use io_uring::types::Timespec;

use super::slots::Key;
use super::sys;
use super::token::Token;
use super::udp::{FlowError, SendTag};
use super::udp_flow::{FlowAction, Received};
use super::udp_pace::{Next, PACE};
use super::worker::Worker;
use crate::listen::{ListenRole, ListenerId};
use crate::model::ServicePort;
use crate::proxy_protocol::{self, Transport, Version};
use crate::snapshot::{Route, Snapshot};

/// The destination a PROXY header in front of a client's datagram names.
#[derive(Clone, Copy, Debug)]
pub(super) struct HeaderTo {
    addr: SocketAddr,
    /// `addr` as is; else its IP is replaced by the one each datagram
    /// arrived on.
    exact: bool,
}

/// Where the clients of listener `id` sent their datagrams. UDP keeps no
/// original destination through NAT, so: on a proxy port (cluster-IP
/// traffic) the Service's cluster IP of that port's family, and its port;
/// on an external proxy port the first of the Service's external and
/// load-balancer IPs of its family that the rules redirect there (not
/// local: those have their own listener), and its port (with several, which
/// one a datagram was sent to cannot be known); elsewhere (node ports,
/// local external and load-balancer IPs, which ringport listens on
/// directly) the address each datagram arrived on and the listener's port.
fn header_destination(
    snapshot: &Snapshot,
    id: ListenerId,
    role: ListenRole,
    spec: &ServicePort,
) -> Option<HeaderTo> {
    let listen = snapshot.listeners.iter().find(|l| l.id == id)?.addr;
    let cluster_ip = spec.cluster_ips.iter().find(|ip| ip.is_ipv4() == listen.is_ipv4());
    Some(match (role, cluster_ip) {
        (ListenRole::Proxy | ListenRole::Proxy6, Some(ip)) => {
            HeaderTo { addr: SocketAddr::new(*ip, spec.port), exact: true }
        }
        (ListenRole::ExternalProxy | ListenRole::ExternalProxy6, _) => {
            let local = |ip: IpAddr| {
                snapshot.listeners.iter().any(|l| {
                    l.key.port == spec.name
                        && matches!(l.key.role, ListenRole::External(a) | ListenRole::LoadBalancer(a) if a == ip)
                })
            };
            let redirected = spec
                .external_ips
                .iter()
                .chain(&spec.load_balancer_ips)
                .find(|ip| ip.is_ipv4() == listen.is_ipv4() && !local(**ip));
            match redirected {
                Some(ip) => HeaderTo { addr: SocketAddr::new(*ip, spec.port), exact: true },
                None => HeaderTo { addr: listen, exact: false },
            }
        }
        _ => HeaderTo { addr: listen, exact: false },
    })
}

/// Reply batches relayed per readiness event before yielding.
const BATCHES_PER_WAKE: usize = 8;

/// [`PACE`] as the kernel takes it.
static PACE_TIMESPEC: Timespec = Timespec::new().sec(PACE.as_secs()).nsec(PACE.subsec_nanos());

impl Worker {
    pub(super) fn arm_udp_listener(&mut self, slot: Key) -> io::Result<()> {
        let Some(a) = self.listeners.get_mut(slot) else { return Ok(()) };
        let Some(fd) = a.fd.as_ref() else { return self.forget_listener(slot) };
        a.armed = true;
        self.driver.poll(fd.as_fd(), libc::POLLIN, Token::UdpListen(slot))
    }

    /// Client datagrams are waiting on a listening socket (its poll or its
    /// pacing timer completed). A wake-up reads, and sends on, what the
    /// listener's byte budget allows (`udp_pace.rs`); a burst of large
    /// datagrams beyond it waits on the listener for the next round.
    pub(super) fn on_udp_listener(&mut self, slot: Key) -> io::Result<()> {
        let Some(a) = self.listeners.get_mut(slot) else { return Ok(()) };
        a.armed = false;
        if a.fd.is_none() {
            return self.forget_listener(slot);
        }
        let mut asked = a.pace.begin();
        let snapshot = self.shared.snapshot.load_full();
        // One route for the whole wake-up: every datagram here came to
        // the same listener.
        let Some(route) = snapshot.route(a.id) else { return self.arm_udp_listener(slot) };
        // Where clients sent their datagrams, for the PROXY header (only
        // looked up on ports that send one).
        let header_to = match route.port.spec.proxy_protocol.send {
            Some(_) => header_destination(&snapshot, a.id, a.role, &route.port.spec),
            None => None,
        };
        let now = Instant::now();
        while let Some(fd) = self.listeners.get(slot).and_then(|a| a.fd.as_ref()) {
            let n = match self.batch.recv_up_to(fd.as_fd(), asked) {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(worker = self.index, error = %e, "UDP receive failed");
                    0
                }
            };
            let bytes = (0..n).map(|i| self.batch.get(i).data.len()).sum();
            for i in 0..n {
                self.on_client_datagram(slot, &route, header_to, i, now)?;
            }
            let Some(a) = self.listeners.get_mut(slot) else { break };
            match a.pace.read(asked, n, bytes) {
                Next::Read(max) => asked = max,
                Next::Poll => break,
                Next::Later => {
                    // Same token as the poll: a listener leaving meanwhile
                    // cancels whichever is in flight.
                    a.armed = true;
                    return self.driver.timeout(&PACE_TIMESPEC, Token::UdpListen(slot));
                }
            }
        }
        self.arm_udp_listener(slot)
    }

    /// Datagram `i` of the batch, from a client on listener `slot`. With
    /// `header_to`, the port sends a PROXY v2 header in front of each
    /// datagram (see [`header_destination`]).
    fn on_client_datagram(
        &mut self,
        slot: Key,
        route: &Route<'_>,
        header_to: Option<HeaderTo>,
        i: usize,
        now: Instant,
    ) -> io::Result<()> {
        let counters = route.port.metrics.slot(self.index);
        let datagram = self.batch.get(i);
        let Some(client) = datagram.from else { return Ok(()) };
        let role = self.listeners.get(slot).map(|a| a.role);
        if role.is_some_and(|role| !crate::snapshot::admits(role, &route.port.spec, client.ip())) {
            counters.add(&counters.datagrams_dropped, 1);
            tracing::debug!(service = %route.port.spec.name, %client, "client outside loadBalancerSourceRanges");
            return Ok(());
        }
        if datagram.truncated {
            counters.add(&counters.truncated, 1);
            tracing::debug!(service = %route.port.spec.name, %client, "datagram truncated; dropped");
            return Ok(());
        }
        let local = datagram.to;
        let payload = datagram.data.len();
        let data = match header_to {
            Some(to) => {
                let ip = if to.exact { to.addr.ip() } else { local.unwrap_or(to.addr.ip()) };
                let destination = SocketAddr::new(ip, to.addr.port());
                let header = proxy_protocol::encode(Version::V2, Transport::Dgram, client, destination);
                [header.as_bytes(), datagram.data].concat()
            }
            None => datagram.data.to_vec(),
        };
        let key = match self.flows.find(slot, client) {
            Some(key) => key,
            None => {
                if self.flows.len() >= self.flows.max
                    && let Some(oldest) = self.flows.oldest()
                {
                    self.close_flow(oldest)?;
                }
                match self.flows.open(slot, client, local, route.port, route.balancer, self.index, now) {
                    Ok(key) => {
                        self.drive_flow(key)?;
                        key
                    }
                    Err(e) => {
                        counters.add(&counters.datagrams_dropped, 1);
                        if !matches!(e, FlowError::NoEndpoint) {
                            tracing::warn!(service = %route.port.spec.name, error = %e, "cannot open UDP flow");
                        }
                        return Ok(());
                    }
                }
            }
        };
        let Some(flow) = self.flows.get_mut(key) else { return Ok(()) };
        flow.machine.sent(now);
        counters.add(&counters.datagrams_to_endpoint, 1);
        counters.add(&counters.bytes_to_endpoint, payload as u64);
        let tag = SendTag { flow: key, generation: flow.generation };
        self.driver.send(flow.socket.as_fd(), tag, data)
    }

    pub(super) fn on_udp_sent(&mut self, id: usize, result: i32) -> io::Result<()> {
        let Some(sent) = self.driver.sent(id) else { return Ok(()) };
        if result >= 0 {
            return Ok(());
        }
        let flow = self.flows.get_mut(sent.flow).filter(|f| f.generation == sent.generation);
        let Some(flow) = flow.filter(|f| f.machine.is_open()) else { return Ok(()) };
        let c = flow.port.metrics.slot(self.index);
        c.add(&c.datagrams_dropped, 1);
        flow.machine.send_failed(-result == libc::ECONNREFUSED);
        self.drive_flow(sent.flow)
    }

    /// An endpoint's replies (or an ICMP error) wait on a flow's socket.
    pub(super) fn on_udp_flow(&mut self, key: usize, result: i32) -> io::Result<()> {
        let Some(flow) = self.flows.get_mut(key) else { return Ok(()) };
        flow.machine.polled(result);
        self.drive_flow(key)
    }

    /// Run the actions a flow's machine wants until it wants none.
    fn drive_flow(&mut self, key: usize) -> io::Result<()> {
        loop {
            let Some(flow) = self.flows.get_mut(key) else { return Ok(()) };
            let Some(action) = flow.machine.poll_action() else { return Ok(()) };
            match action {
                FlowAction::ArmPoll => {
                    self.driver.poll(flow.socket.as_fd(), libc::POLLIN, Token::UdpFlow(key))?;
                }
                FlowAction::Receive => {
                    let received = self.relay_replies(key);
                    if let Some(flow) = self.flows.get_mut(key) {
                        flow.machine.received(received, Instant::now());
                    }
                }
                FlowAction::Blame => {
                    tracing::debug!(service = %flow.port.spec.name, endpoint = ?flow.endpoint_addr(), "UDP endpoint unreachable");
                    if flow.balancer.failed(
                        crate::model::ClientAddr(flow.client),
                        flow.endpoint,
                        Instant::now(),
                    ) {
                        let c = flow.port.metrics.slot(self.index);
                        c.add(&c.ejections, 1);
                    }
                }
                FlowAction::Cancel => self.cancel(Token::UdpFlow(key))?,
                FlowAction::Free => {
                    self.flows.remove(key);
                    return Ok(());
                }
            }
        }
    }

    /// Relay the replies waiting on a flow's socket to its client, in
    /// batches.
    fn relay_replies(&mut self, key: usize) -> Received {
        let Some(flow) = self.flows.get(key) else { return Received::Failed };
        let (listener, client, local) = (flow.listener, flow.client, flow.local);
        let (port, balancer, endpoint) = (Arc::clone(&flow.port), Arc::clone(&flow.balancer), flow.endpoint);
        if self.listeners.get(listener).and_then(|a| a.fd.as_ref()).is_none() {
            // The listener left: replies have no way back.
            return Received::Failed;
        }
        let counters = port.metrics.slot(self.index);
        let mut relayed = 0;
        for _ in 0..BATCHES_PER_WAKE {
            let Some(flow) = self.flows.get(key) else { break };
            let n = match self.batch.recv(flow.socket.as_fd()) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => return Received::Refused,
                Err(e) => {
                    tracing::debug!(service = %port.spec.name, error = %e, "UDP receive from endpoint failed");
                    return Received::Failed;
                }
            };
            if n == 0 {
                break;
            }
            if balancer.answered(endpoint) {
                counters.add(&counters.readmissions, 1);
            }
            let replies: Vec<(SocketAddr, &[u8])> = (0..n)
                .map(|i| self.batch.get(i))
                .filter(|d| {
                    if d.truncated {
                        counters.add(&counters.truncated, 1);
                    }
                    !d.truncated
                })
                .map(|d| (client, d.data))
                .collect();
            let Some(fd) = self.listeners.get(listener).and_then(|a| a.fd.as_ref()) else { break };
            let sent = sys::send_batch(fd.as_fd(), local, &replies).unwrap_or(0);
            let bytes: usize = replies.iter().take(sent).map(|(_, d)| d.len()).sum();
            counters.add(&counters.datagrams_to_client, sent as u64);
            counters.add(&counters.bytes_to_client, bytes as u64);
            counters.add(&counters.datagrams_dropped, (replies.len() - sent) as u64);
            relayed += n;
            if n < sys::BATCH {
                break;
            }
        }
        Received::Replies { relayed }
    }

    pub(super) fn close_flow(&mut self, key: usize) -> io::Result<()> {
        self.flows.close(key);
        self.drive_flow(key)
    }

    /// Close flows idle for longer than the UDP timeout.
    pub(super) fn expire_flows(&mut self) -> io::Result<()> {
        for key in self.flows.idle(Instant::now()) {
            if let Some(flow) = self.flows.get(key) {
                let c = flow.port.metrics.slot(self.index);
                c.add(&c.flows_expired, 1);
            }
            self.close_flow(key)?;
        }
        Ok(())
    }

    /// After a new snapshot: close flows whose listener is gone or whose
    /// endpoint no longer receives this traffic.
    pub(super) fn reconcile_flows(&mut self, snapshot: &Snapshot) -> io::Result<()> {
        let listeners = &self.listeners;
        let stale = self.flows.matching(|f| {
            let Some(a) = listeners.get(f.listener).filter(|a| a.fd.is_some()) else { return true };
            match snapshot.route(a.id) {
                Some(route) => !route.balancer.endpoints().any(|e| Some(e) == f.endpoint_addr()),
                None => true,
            }
        });
        for key in stale {
            self.close_flow(key)?;
        }
        Ok(())
    }
}
