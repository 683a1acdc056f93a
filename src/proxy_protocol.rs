//! The HAProxy PROXY protocol (versions 1 and 2) as a pure codec: no I/O.
//!
//! A PROXY header is the first thing a proxy writes on a connection (or, for
//! UDP, in front of every datagram) to tell the next hop who the client is
//! and which address it connected to. ringport encodes it towards endpoints
//! (`ringport.io/proxy-protocol`) and decodes it from a load balancer in
//! front of it (`ringport.io/accept-proxy-protocol`).
//!
//! The decoder is incremental and strict. It is fed the bytes received so
//! far and answers [`Decoded::NeedMore`], [`Decoded::Done`] with how many
//! bytes the header took (the rest belongs to the stream), or an error that
//! says what is wrong. It decides as early as it can: a first byte that
//! starts neither signature is refused at once, a v1 line must end in CRLF
//! within 107 bytes, a v2 header may not exceed [`MAX_V2_BYTES`].
//!
//! Invariants:
//! - Every byte before `consumed` is header; a `NeedMore` answer means
//!   every byte given so far is header too, so a reader may consume them.
//! - LOCAL (v2), UNSPEC/UNIX families (v2) and UNKNOWN (v1) headers are
//!   accepted with no addresses: the receiver uses the connection's own, as
//!   the spec says.
//! - Encoded headers fit in [`Encoded`] (at most 107 bytes): no allocation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature that opens every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// What opens every v1 header.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line, CRLF included (the spec's bound).
pub const V1_MAX_BYTES: usize = 107;
/// The longest v2 header accepted, TLVs included: the 16-byte fixed part
/// and 216 bytes of UNIX addresses plus 304 bytes of TLVs. The spec says a
/// header is always smaller than an MSS; 536 is the smallest IPv4 TCP MSS.
pub const MAX_V2_BYTES: usize = 536;

/// A PROXY protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

/// The transport a header describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Stream,
    Dgram,
}

/// Who connected to what, as a header carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addresses {
    pub transport: Transport,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    /// `None` for LOCAL, UNKNOWN, UNSPEC or UNIX: use the connection's own.
    pub addresses: Option<Addresses>,
}

/// What the bytes received so far amount to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A valid beginning of a header: read more.
    NeedMore,
    /// A whole header, which took the first `consumed` bytes.
    Done { header: Header, consumed: usize },
}

/// Why bytes are not a valid PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol signature at the start of the stream")]
    BadSignature,
    #[error("PROXY {0:?} header received, but this port accepts only {1:?}")]
    VersionNotAccepted(Version, Version),
    #[error("v1 line not ended by CRLF within {V1_MAX_BYTES} bytes")]
    V1TooLong,
    #[error("v1 line is not UTF-8 text")]
    V1NotText,
    #[error("v1 protocol {0:?} is not TCP4, TCP6 or UNKNOWN")]
    V1UnknownProtocol(String),
    #[error("v1 line has {0} fields after the protocol; expected 4")]
    V1FieldCount(usize),
    #[error("v1 {field} {value:?} is not a valid {expected}")]
    V1BadField { field: &'static str, value: String, expected: &'static str },
    #[error("v2 version/command byte {0:#04x}: version must be 2, command LOCAL or PROXY")]
    V2BadVersionCommand(u8),
    #[error("v2 family/protocol byte {0:#04x} is not one the spec defines")]
    V2BadFamily(u8),
    #[error("v2 length {length} is too short for the {needed} address bytes of its family")]
    V2LengthTooShort { length: usize, needed: usize },
    #[error("v2 header of {0} bytes exceeds the {MAX_V2_BYTES} accepted")]
    V2TooLong(usize),
    #[error("v2 TLV at offset {0} runs past the header's end")]
    V2BadTlv(usize),
}

/// Which versions a receiver accepts (`ringport.io/accept-proxy-protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accept {
    V1,
    V2,
    /// Either version, told apart by its first byte.
    Any,
}

impl Accept {
    /// The one version accepted, if only one is.
    fn only(self) -> Option<Version> {
        match self {
            Accept::V1 => Some(Version::V1),
            Accept::V2 => Some(Version::V2),
            Accept::Any => None,
        }
    }
}

/// Decode the start of `buf` as a PROXY header of an accepted version.
pub fn decode(buf: &[u8], accept: Accept) -> Result<Decoded, ProxyHeaderError> {
    let version = if is_prefix(buf, V1_PREFIX) {
        Version::V1
    } else if is_prefix(buf, &V2_SIGNATURE) {
        Version::V2
    } else {
        return Err(ProxyHeaderError::BadSignature);
    };
    if buf.is_empty() {
        return Ok(Decoded::NeedMore);
    }
    if let Some(only) = accept.only()
        && only != version
    {
        return Err(ProxyHeaderError::VersionNotAccepted(version, only));
    }
    match version {
        Version::V1 => decode_v1(buf),
        Version::V2 => decode_v2(buf),
    }
}

/// `buf` and `sig` agree on their common length.
fn is_prefix(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    buf[..n] == sig[..n]
}

fn decode_v1(buf: &[u8]) -> Result<Decoded, ProxyHeaderError> {
    let window = &buf[..buf.len().min(V1_MAX_BYTES)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX_BYTES {
            Err(ProxyHeaderError::V1TooLong)
        } else {
            Ok(Decoded::NeedMore)
        };
    };
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end]).map_err(|_| ProxyHeaderError::V1NotText)?;
    let consumed = end + 2;
    let (protocol, rest) = line.split_once(' ').unwrap_or((line, ""));
    let v6 = match protocol {
        // Whatever follows UNKNOWN is ignored, as the spec says.
        "UNKNOWN" => {
            return Ok(Decoded::Done { header: Header { version: Version::V1, addresses: None }, consumed });
        }
        "TCP4" => false,
        "TCP6" => true,
        other => return Err(ProxyHeaderError::V1UnknownProtocol(other.to_owned())),
    };
    let fields: Vec<&str> = rest.split(' ').collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyHeaderError::V1FieldCount(fields.len()));
    };
    let ip = |field: &'static str, value: &str| -> Result<IpAddr, ProxyHeaderError> {
        let bad = || ProxyHeaderError::V1BadField {
            field,
            value: value.to_owned(),
            expected: if v6 { "IPv6 address" } else { "IPv4 address" },
        };
        if v6 {
            value.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| bad())
        } else {
            value.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| bad())
        }
    };
    let source = SocketAddr::new(ip("source address", src)?, v1_port("source port", sport)?);
    let destination = SocketAddr::new(ip("destination address", dst)?, v1_port("destination port", dport)?);
    let addresses = Addresses { transport: Transport::Stream, source, destination };
    Ok(Decoded::Done { header: Header { version: Version::V1, addresses: Some(addresses) }, consumed })
}

/// A v1 port: decimal digits, no sign, no leading zero, at most 65535.
fn v1_port(field: &'static str, value: &str) -> Result<u16, ProxyHeaderError> {
    let canonical = !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_digit())
        && (value == "0" || !value.starts_with('0'));
    value.parse::<u16>().ok().filter(|_| canonical).ok_or_else(|| ProxyHeaderError::V1BadField {
        field,
        value: value.to_owned(),
        expected: "port (0 to 65535, decimal)",
    })
}

fn decode_v2(buf: &[u8]) -> Result<Decoded, ProxyHeaderError> {
    if buf.len() > 12 && (buf[12] >> 4 != 2 || buf[12] & 0x0f > 1) {
        return Err(ProxyHeaderError::V2BadVersionCommand(buf[12]));
    }
    if buf.len() > 13 {
        let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
        if family > 3 || transport > 2 {
            return Err(ProxyHeaderError::V2BadFamily(buf[13]));
        }
    }
    if buf.len() < 16 {
        return Ok(Decoded::NeedMore);
    }
    let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + length;
    if total > MAX_V2_BYTES {
        return Err(ProxyHeaderError::V2TooLong(total));
    }
    // LOCAL: the block is discarded whole, family included (the spec), so
    // neither its length nor its content is checked.
    let local = buf[12] & 0x0f == 0;
    let needed = match buf[13] >> 4 {
        _ if local => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if length < needed {
        return Err(ProxyHeaderError::V2LengthTooShort { length, needed });
    }
    if buf.len() < total {
        return Ok(Decoded::NeedMore);
    }
    if !local {
        check_tlvs(&buf[16 + needed..total], 16 + needed)?;
    }
    let transport = match buf[13] & 0x0f {
        1 => Some(Transport::Stream),
        2 => Some(Transport::Dgram),
        _ => None,
    };
    let a = &buf[16..];
    let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
    // `needed` bytes are there: a LOCAL header (which may have fewer)
    // reads none.
    let pair = match buf[13] >> 4 {
        _ if local => None,
        1 => {
            let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
            Some((SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10))))
        }
        2 => {
            let ip = |i: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[i..i + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            Some((SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34))))
        }
        _ => None,
    };
    let addresses = match (transport, pair) {
        (Some(transport), Some((source, destination))) => Some(Addresses { transport, source, destination }),
        _ => None,
    };
    Ok(Decoded::Done { header: Header { version: Version::V2, addresses }, consumed: total })
}

/// TLVs (type, 16-bit length, value) must tile the rest of the header.
fn check_tlvs(mut tlvs: &[u8], mut offset: usize) -> Result<(), ProxyHeaderError> {
    while !tlvs.is_empty() {
        if tlvs.len() < 3 {
            return Err(ProxyHeaderError::V2BadTlv(offset));
        }
        let len = 3 + usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        if len > tlvs.len() {
            return Err(ProxyHeaderError::V2BadTlv(offset));
        }
        tlvs = &tlvs[len..];
        offset += len;
    }
    Ok(())
}

/// An encoded header: a fixed buffer, so encoding never allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoded {
    bytes: [u8; V1_MAX_BYTES],
    len: u8,
}

impl Encoded {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn push(&mut self, data: &[u8]) {
        let start = usize::from(self.len);
        // Callers never exceed the buffer (see the bounds in `encode`).
        debug_assert!(start + data.len() <= V1_MAX_BYTES, "an encoded header outgrew its buffer");
        let end = (start + data.len()).min(V1_MAX_BYTES);
        self.bytes[start..end].copy_from_slice(&data[..end - start]);
        self.len = end as u8;
    }
}

impl std::fmt::Write for Encoded {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

/// A source and destination in one family, since a header carries one.
enum Pair {
    V4([Ipv4Addr; 2]),
    V6([Ipv6Addr; 2]),
}

/// IPv4 if both are (or map to) IPv4, else both as IPv6 (IPv4-mapped where
/// needed).
fn same_family(a: IpAddr, b: IpAddr) -> Pair {
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    match (a.to_canonical(), b.to_canonical()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => Pair::V4([a, b]),
        (a, b) => Pair::V6([v6(a), v6(b)]),
    }
}

/// A PROXY header for a connection (`Stream`) or a datagram (`Dgram`, v2
/// only: v1 has no datagram form, so a v1 request for `Dgram` encodes v2).
pub fn encode(
    version: Version,
    transport: Transport,
    source: SocketAddr,
    destination: SocketAddr,
) -> Encoded {
    let pair = same_family(source.ip(), destination.ip());
    let mut out = Encoded { bytes: [0; V1_MAX_BYTES], len: 0 };
    if version == Version::V1 && transport == Transport::Stream {
        use std::fmt::Write;
        let (sport, dport) = (source.port(), destination.port());
        // At most 104 bytes: "PROXY TCP6 " + 2 x 39 + 2 x 5 + 3 spaces + CRLF.
        let _ = match pair {
            Pair::V4([s, d]) => write!(out, "PROXY TCP4 {s} {d} {sport} {dport}\r\n"),
            Pair::V6([s, d]) => write!(out, "PROXY TCP6 {s} {d} {sport} {dport}\r\n"),
        };
        return out;
    }
    let transport = match transport {
        Transport::Stream => 1,
        Transport::Dgram => 2,
    };
    out.push(&V2_SIGNATURE);
    // Version 2, command PROXY.
    match pair {
        Pair::V4([s, d]) => {
            out.push(&[0x21, 0x10 | transport, 0, 12]);
            out.push(&s.octets());
            out.push(&d.octets());
        }
        Pair::V6([s, d]) => {
            out.push(&[0x21, 0x20 | transport, 0, 36]);
            out.push(&s.octets());
            out.push(&d.octets());
        }
    }
    out.push(&source.port().to_be_bytes());
    out.push(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
#[path = "proxy_protocol_tests.rs"]
mod tests;
