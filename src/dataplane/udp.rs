//! UDP flows of one worker: a flow is a client `ip:port` on one listening
//! socket, with its own socket connected to the endpoint the balancer
//! picked (affinity honoured). Replies read from that socket go back to the
//! client from the listening socket the client sent to, so under REDIRECT
//! conntrack rewrites their source back to the service address.
//!
//! Invariants:
//! - One flow per (listener, client); SO_REUSEPORT's 4-tuple hash keeps a
//!   client's datagrams on one worker, so flows are never shared.
//! - A flow counts as active on its endpoint (for least-connections) from
//!   open to close, through its `Drop`.
//! - Flows expire after the idle timeout, checked on the worker's tick (no
//!   timer per packet or per flow); at the flow cap the least recently used
//!   flow is evicted first, so the fd limit is never reached.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;
use socket2::Type;

use super::slots::Key;
use super::udp_flow::FlowMachine;
use super::upstream;
use crate::balance::Balancer;
use crate::model::{ClientAddr, EndpointAddr};
use crate::snapshot::PortState;
use crate::source_ip::Decision;

pub struct Flow {
    /// The worker's slot of the listening socket the client sent to.
    pub listener: Key,
    pub client: SocketAddr,
    /// The address the client sent to: replies leave from it.
    pub local: Option<std::net::IpAddr>,
    pub socket: OwnedFd,
    pub port: Arc<PortState>,
    pub balancer: Arc<Balancer>,
    /// Candidate index of the endpoint in `balancer`.
    pub endpoint: usize,
    /// What happens next, and whether its poll is in flight.
    pub machine: FlowMachine,
    /// Tells this flow from a later one in the same slab slot.
    pub generation: u64,
    worker: usize,
}

impl Flow {
    /// The endpoint this flow is connected to.
    pub fn endpoint_addr(&self) -> Option<EndpointAddr> {
        self.balancer.endpoint(self.endpoint)
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.balancer.closed(self.endpoint);
        let c = self.port.metrics.slot(self.worker);
        c.add(&c.flows_closed, 1);
    }
}

/// Which flow a datagram on its way to an endpoint belongs to: the flow's
/// slot and generation, so a send completing after its flow was freed
/// never reaches a later flow in the same slot.
pub struct SendTag {
    pub flow: usize,
    pub generation: u64,
}

/// Why a flow could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("no usable endpoint")]
    NoEndpoint,
    #[error("cannot open a socket to {endpoint}")]
    Socket {
        endpoint: EndpointAddr,
        #[source]
        source: io::Error,
    },
}

pub struct Flows {
    flows: Slab<Flow>,
    index: HashMap<(Key, SocketAddr), usize>,
    next_generation: u64,
    /// Most flows this worker keeps.
    pub max: usize,
    pub timeout: Duration,
}

impl Flows {
    pub fn new(max: usize, timeout: Duration) -> Self {
        Self { flows: Slab::new(), index: HashMap::new(), next_generation: 1, max: max.max(1), timeout }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn get(&self, key: usize) -> Option<&Flow> {
        self.flows.get(key)
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut Flow> {
        self.flows.get_mut(key)
    }

    /// The open flow of `client` on `listener`. A flow whose machine closed
    /// it (the endpoint refused) is not found: the next datagram repicks.
    pub fn find(&self, listener: Key, client: SocketAddr) -> Option<usize> {
        let key = self.index.get(&(listener, client)).copied()?;
        self.flows.get(key).filter(|f| f.machine.is_open()).map(|_| key)
    }

    /// Open a flow: pick the endpoint and connect a socket to it.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        &mut self,
        listener: Key,
        client: SocketAddr,
        local: Option<std::net::IpAddr>,
        port: &Arc<PortState>,
        balancer: &Arc<Balancer>,
        worker: usize,
        now: Instant,
    ) -> Result<usize, FlowError> {
        let mut candidates = balancer.pick(ClientAddr(client), now, 1);
        let i = balancer.next_candidate(&mut candidates, now).ok_or(FlowError::NoEndpoint)?;
        let endpoint_addr = balancer.endpoint(i).ok_or(FlowError::NoEndpoint)?;
        let decision = port.source.decide(endpoint_addr, ClientAddr(client), false);
        let (socket, source) = connect(endpoint_addr.0, decision)
            .map_err(|source| FlowError::Socket { endpoint: endpoint_addr, source })?;
        balancer.attempting(i);
        balancer.flow_opened(ClientAddr(client), i, now);
        let c = port.metrics.slot(worker);
        c.add(&c.flows_created, 1);
        c.source(source);
        let generation = self.next_generation;
        self.next_generation += 1;
        let key = self.flows.insert(Flow {
            listener,
            client,
            local,
            socket,
            port: Arc::clone(port),
            balancer: Arc::clone(balancer),
            endpoint: i,
            machine: FlowMachine::new(now),
            generation,
            worker,
        });
        self.index.insert((listener, client), key);
        Ok(key)
    }

    /// Begin closing a flow; its machine says when it may be freed. From
    /// now on [`Flows::find`] no longer finds it.
    pub fn close(&mut self, key: usize) {
        if let Some(flow) = self.flows.get_mut(key) {
            flow.machine.close();
        }
    }

    /// Drop a flow its machine freed, and its index entry unless a newer
    /// flow of the same client took it.
    pub fn remove(&mut self, key: usize) {
        if let Some(flow) = self.flows.try_remove(key) {
            let k = (flow.listener, flow.client);
            if self.index.get(&k) == Some(&key) {
                self.index.remove(&k);
            }
        }
    }

    /// Open flows idle for longer than the timeout.
    pub fn idle(&self, now: Instant) -> Vec<usize> {
        self.flows.iter().filter(|(_, f)| f.machine.expired(now, self.timeout)).map(|(k, _)| k).collect()
    }

    /// The least recently active open flow (evicted first at the cap).
    pub fn oldest(&self) -> Option<usize> {
        self.flows
            .iter()
            .filter(|(_, f)| f.machine.is_open())
            .min_by_key(|(_, f)| f.machine.last_active())
            .map(|(k, _)| k)
    }

    /// Keys of every open flow matching `pred`.
    pub fn matching(&self, pred: impl Fn(&Flow) -> bool) -> Vec<usize> {
        self.flows.iter().filter(|(_, f)| f.machine.is_open() && pred(f)).map(|(k, _)| k).collect()
    }
}

/// A non-blocking UDP socket connected to `endpoint`, so replies and ICMP
/// errors from it (and only it) arrive on this socket; bound to the
/// client's address when `decision` says so (transparent mode).
fn connect(endpoint: SocketAddr, decision: Decision) -> io::Result<(OwnedFd, crate::source_ip::Source)> {
    let (socket, source) = upstream::open(endpoint, Type::DGRAM, decision)?;
    socket.connect(&endpoint.into())?;
    Ok((socket.into(), source))
}
