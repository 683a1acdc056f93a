//! The PROXY protocol on a TCP connection's sockets: reading the header a
//! load balancer sends ahead of the client's bytes, and writing ringport's
//! own to an endpoint. The codec is `crate::proxy_protocol`; the order of
//! the steps is the connection's machine (`machine.rs`); this file does the
//! non-blocking syscalls in between.
//!
//! Invariants:
//! - Only header bytes are ever consumed from the client: bytes are peeked
//!   first, and read for good only as far as the decoder says the header
//!   goes, so whatever follows it stays in the socket for the relay.
//! - The inbound buffer is bounded (the decoder refuses a longer header),
//!   and exists only while a header is awaited.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use socket2::SockRef;

use super::sys::{self, Moved};
use crate::model::AcceptProxy;
use crate::proxy_protocol::{self, Accept, Decoded, Header, MAX_V2_BYTES, ProxyHeaderError, Transport};

pub use super::machine::HEADER_WAIT;

/// Why a client's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderRefusal {
    #[error("malformed PROXY header: {0}")]
    Malformed(#[from] ProxyHeaderError),
    #[error("client closed before its PROXY header was whole")]
    Closed,
    #[error("reading the PROXY header failed: {0}")]
    Io(#[source] io::Error),
    #[error("client {0} (from its PROXY header) is outside loadBalancerSourceRanges")]
    OutsideSourceRanges(std::net::IpAddr),
    #[error("PROXY header describes a datagram (DGRAM), but this is a TCP connection")]
    DatagramOnStream,
    #[error("no whole PROXY header within {HEADER_WAIT:?}")]
    TimedOut,
    #[error("no PROXY header was awaited")]
    NotAwaited,
    #[error("peer {0} is outside --proxy-protocol-trusted-cidrs; its PROXY header is not read")]
    UntrustedPeer(std::net::IpAddr),
}

/// Whether `peer` may send this node a PROXY header: with no trusted ranges
/// (`--proxy-protocol-trusted-cidrs` unset) every peer may, as with
/// HAProxy's `accept-proxy` and Envoy's listener filter; else only a peer
/// inside one of them.
pub fn trusted(trusted: &[ipnet::IpNet], peer: std::net::IpAddr) -> bool {
    let peer = peer.to_canonical();
    trusted.is_empty() || trusted.iter().any(|net| net.contains(&peer))
}

/// A client's PROXY header, as far as it has arrived.
pub struct Inbound {
    buf: [u8; MAX_V2_BYTES],
    /// Header bytes already read out of the socket.
    have: usize,
    accept: Accept,
}

impl Inbound {
    pub fn new(accept: AcceptProxy) -> Box<Self> {
        Box::new(Self { buf: [0; MAX_V2_BYTES], have: 0, accept })
    }

    /// Take what has arrived: `Ok(None)` while incomplete, the header once
    /// whole (and consumed, none of what follows it).
    pub fn read(&mut self, client: BorrowedFd<'_>) -> Result<Option<Header>, HeaderRefusal> {
        let have = self.have;
        let n = match sys::peek(client, &mut self.buf[have..]).map_err(HeaderRefusal::Io)? {
            Moved::Bytes(n) => n,
            Moved::WouldBlock => return Ok(None),
            Moved::Eof => return Err(HeaderRefusal::Closed),
        };
        let (consume, header) = match proxy_protocol::decode(&self.buf[..have + n], self.accept)? {
            // All of it is header: read it for good, so the next readiness
            // means new bytes (a peek alone would wake again at once).
            Decoded::NeedMore => (n, None),
            Decoded::Done { header, consumed } => (consumed - have, Some(header)),
        };
        let mut done = 0;
        while done < consume {
            match sys::read(client, &mut self.buf[have + done..have + consume]).map_err(HeaderRefusal::Io)? {
                Moved::Bytes(k) => done += k,
                // Peeked bytes are in the socket: neither can happen.
                Moved::Eof | Moved::WouldBlock => return Err(HeaderRefusal::Closed),
            }
        }
        self.have += consume;
        if header.and_then(|h| h.addresses).is_some_and(|a| a.transport == Transport::Dgram) {
            return Err(HeaderRefusal::DatagramOnStream);
        }
        Ok(header)
    }
}

/// Write (the rest of) `header` to `upstream`, from byte `at`: how far it
/// got.
pub fn send(upstream: &OwnedFd, header: &[u8], at: usize) -> io::Result<usize> {
    match sys::send(upstream.as_fd(), &header[at.min(header.len())..])? {
        Moved::Bytes(n) => Ok(at + n),
        Moved::WouldBlock => Ok(at),
        Moved::Eof => Err(io::Error::from(io::ErrorKind::WriteZero)),
    }
}

/// The address the client connected to: the original destination before
/// a DNAT or REDIRECT rule (a Service VIP:port), else the accepted
/// socket's own address. `None` only if the socket is already gone.
pub fn client_destination(client: &OwnedFd) -> Option<SocketAddr> {
    let local = SockRef::from(client).local_addr().ok()?.as_socket()?;
    // No conntrack entry (no NAT, or conntrack not loaded): the socket's
    // own address is where the client connected.
    Some(original_destination(client, local.is_ipv6()).unwrap_or(local))
}

/// Where a rule's DNAT or REDIRECT sent a connection from, on a socket of
/// a known family (`v6`): one getsockopt, no getsockname. `None` when no
/// rule rewrote its destination.
pub fn original_destination(client: &OwnedFd, v6: bool) -> Option<SocketAddr> {
    let sock = SockRef::from(client);
    let original = if v6 { sock.original_dst_v6() } else { sock.original_dst_v4() };
    original.ok()?.as_socket()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use std::time::Duration;

    use super::*;

    fn pair() -> (TcpStream, OwnedFd) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        (client, accepted.into())
    }

    /// Poll `read` until it is not `Ok(None)`, at most a second.
    fn read_until_done(inbound: &mut Inbound, fd: &OwnedFd) -> Result<Option<Header>, HeaderRefusal> {
        for _ in 0..200 {
            match inbound.read(fd.as_fd()) {
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                other => return other,
            }
        }
        Ok(None)
    }

    #[test]
    fn a_header_in_pieces_is_consumed_and_the_bytes_after_it_stay_for_the_relay() {
        let (mut client, accepted) = pair();
        let mut inbound = Inbound::new(AcceptProxy::Any);
        assert!(matches!(inbound.read(accepted.as_fd()), Ok(None)), "nothing sent yet");
        client.write_all(b"PROXY TCP4 192.0.2.9 ").unwrap();
        assert!(matches!(read_until_done(&mut inbound, &accepted), Ok(None)));
        client.write_all(b"198.51.100.1 4000 80\r\nhello").unwrap();
        let header = read_until_done(&mut inbound, &accepted).unwrap().expect("whole header");
        let addresses = header.addresses.unwrap();
        assert_eq!(addresses.source, "192.0.2.9:4000".parse().unwrap());
        assert_eq!(addresses.destination, "198.51.100.1:80".parse().unwrap());
        let mut rest = [0u8; 16];
        let mut stream = TcpStream::from(accepted);
        stream.set_nonblocking(false).unwrap();
        let n = stream.read(&mut rest).unwrap();
        assert_eq!(&rest[..n], b"hello");
    }

    #[test]
    fn a_stream_that_is_no_header_is_refused_and_one_that_ends_early_too() {
        let (mut client, accepted) = pair();
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let refused = read_until_done(&mut Inbound::new(AcceptProxy::V1), &accepted);
        assert!(
            matches!(refused, Err(HeaderRefusal::Malformed(ProxyHeaderError::BadSignature))),
            "{refused:?}"
        );
        let (mut client, accepted) = pair();
        client.write_all(&proxy_protocol::V2_SIGNATURE[..5]).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut inbound = Inbound::new(AcceptProxy::V2);
        let refused = read_until_done(&mut inbound, &accepted);
        assert!(matches!(refused, Err(HeaderRefusal::Closed)), "{refused:?}");
    }

    #[test]
    fn a_datagram_header_on_a_tcp_connection_is_refused() {
        let (mut client, accepted) = pair();
        let header = proxy_protocol::encode(
            proxy_protocol::Version::V2,
            Transport::Dgram,
            "192.0.2.9:4000".parse().unwrap(),
            "198.51.100.1:53".parse().unwrap(),
        );
        client.write_all(header.as_bytes()).unwrap();
        let refused = read_until_done(&mut Inbound::new(AcceptProxy::Any), &accepted);
        assert!(matches!(refused, Err(HeaderRefusal::DatagramOnStream)), "{refused:?}");
    }

    #[test]
    fn without_nat_the_destination_is_the_accepted_sockets_own_address() {
        let (client, accepted) = pair();
        assert_eq!(client_destination(&accepted), Some(client.peer_addr().unwrap()));
    }
}
