//! A balancer's endpoints as it keeps them: one 24-byte slot each, the
//! address packed and, beside it, the rotation's entry at that position.
//! A balancer (one or two per service port, 250k endpoints at 100k
//! service ports) then needs no allocation of its own for its rotation,
//! and no room per endpoint for a health state it has not made yet (its
//! states come together, at the first that matters: `health::HealthCells`).
//!
//! Invariant: a slot gives back exactly the address it was made with.

use crate::model::EndpointAddr;

/// One endpoint of a balancer, and the rotation's entry at its position.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    addr: PackedAddr,
    /// The candidate index at this position of the rotation (round robin,
    /// least connections); the position itself in address order.
    pub(super) rotated: u32,
}

impl Slot {
    pub(super) fn new(addr: EndpointAddr, rotated: u32) -> Self {
        Self { addr: PackedAddr::from(addr), rotated }
    }

    pub(super) fn addr(&self) -> EndpointAddr {
        self.addr.into()
    }
}

/// An endpoint's address in 20 bytes, not a `SocketAddr`'s 32 (an IPv6
/// one's flow info and scope id, which an endpoint's address never has:
/// Kubernetes gives IPs without zones).
#[derive(Clone, Copy, Debug)]
struct PackedAddr {
    /// An IPv4 address is kept as its IPv6-mapped form.
    ip: [u8; 16],
    port: u16,
    v4: bool,
}

impl From<EndpointAddr> for PackedAddr {
    fn from(addr: EndpointAddr) -> Self {
        let ip = match addr.0.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        Self { ip: ip.octets(), port: addr.0.port(), v4: addr.0.is_ipv4() }
    }
}

impl From<PackedAddr> for EndpointAddr {
    fn from(addr: PackedAddr) -> Self {
        let v6 = std::net::Ipv6Addr::from(addr.ip);
        let ip = match addr.v4 {
            true => v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            false => std::net::IpAddr::V6(v6),
        };
        EndpointAddr(std::net::SocketAddr::new(ip, addr.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_gives_back_the_address_it_was_made_with() {
        for a in ["10.0.0.1:80", "[fd00::1]:8080", "[::ffff:10.0.0.1]:80", "0.0.0.0:0", "[::]:65535"] {
            let addr = EndpointAddr(a.parse().unwrap());
            assert_eq!(Slot::new(addr, 7).addr(), addr, "{a}");
        }
    }

    #[test]
    fn an_endpoint_costs_its_balancer_24_bytes_until_it_matters() {
        // The address and its rotation entry; the health state (and the
        // registry's entry) comes only with the first attempt. A field
        // added here is paid 250k times at 100k service ports.
        assert_eq!(std::mem::size_of::<Slot>(), 24);
    }
}
