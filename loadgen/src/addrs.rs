//! Target and source address parsing, with no I/O.
//!
//! Invariant kept: every address this module hands out is a loopback
//! address (127.0.0.0/8 or ::1). loadgen is a benchmark tool for this
//! project's own machine; refusing anything else here means no scenario can
//! ever send traffic off the host by a typo.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The most source addresses one `--source` range may expand to.
pub const MAX_SOURCES: u128 = 65_536;

/// A target or source specification that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("`{0}` is not an address (expected e.g. 127.0.0.1:9000)")]
    BadSocketAddr(String),
    #[error("`{0}` is not an IP address")]
    BadIp(String),
    #[error("{0} is not a loopback address; loadgen only sends to 127.0.0.0/8 and ::1")]
    NotLoopback(IpAddr),
    #[error("range `{0}` mixes IPv4 and IPv6 or runs backwards")]
    BadRange(String),
    #[error("range `{0}` has more than {MAX_SOURCES} addresses")]
    RangeTooLarge(String),
    #[error("no target given")]
    NoTarget,
}

fn loopback(ip: IpAddr) -> Result<IpAddr, AddrError> {
    if ip.is_loopback() { Ok(ip) } else { Err(AddrError::NotLoopback(ip)) }
}

/// Parses targets given as repeated flags and/or comma lists.
pub fn parse_targets<S: AsRef<str>>(specs: &[S]) -> Result<Vec<SocketAddr>, AddrError> {
    let mut out = Vec::new();
    for item in specs.iter().flat_map(|s| s.as_ref().split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let addr: SocketAddr = item.parse().map_err(|_| AddrError::BadSocketAddr(item.to_string()))?;
        loopback(addr.ip())?;
        out.push(addr);
    }
    if out.is_empty() {
        return Err(AddrError::NoTarget);
    }
    Ok(out)
}

/// Parses listen addresses for `serve` (comma lists, port 0 allowed).
pub fn parse_listen<S: AsRef<str>>(specs: &[S]) -> Result<Vec<SocketAddr>, AddrError> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    parse_targets(specs)
}

/// Expands source specifications such as `127.0.0.2-127.0.0.50`,
/// `127.0.0.7` or comma lists of both into individual addresses.
pub fn parse_sources<S: AsRef<str>>(specs: &[S]) -> Result<Vec<IpAddr>, AddrError> {
    let mut out = Vec::new();
    for item in specs.iter().flat_map(|s| s.as_ref().split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        match item.split_once('-') {
            None => out.push(loopback(parse_ip(item)?)?),
            Some((a, b)) => out.extend(expand_range(item, parse_ip(a)?, parse_ip(b)?)?),
        }
    }
    Ok(out)
}

fn parse_ip(s: &str) -> Result<IpAddr, AddrError> {
    s.trim().parse().map_err(|_| AddrError::BadIp(s.to_string()))
}

fn expand_range(spec: &str, a: IpAddr, b: IpAddr) -> Result<Vec<IpAddr>, AddrError> {
    let (lo, hi, v4) = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, true),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), false),
        _ => return Err(AddrError::BadRange(spec.to_string())),
    };
    if hi < lo {
        return Err(AddrError::BadRange(spec.to_string()));
    }
    if hi - lo >= MAX_SOURCES {
        return Err(AddrError::RangeTooLarge(spec.to_string()));
    }
    (lo..=hi)
        .map(|n| {
            let ip = if v4 { IpAddr::V4(Ipv4Addr::from(n as u32)) } else { IpAddr::V6(Ipv6Addr::from(n)) };
            loopback(ip)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn source_range_expands_inclusively() {
        let v = parse_sources(&["127.0.0.2-127.0.0.50"]).unwrap();
        assert_eq!(v.len(), 49);
        assert_eq!(v[0], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(v[48], "127.0.0.50".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn sources_mix_ranges_singles_and_repeats() {
        let v = parse_sources(&["127.0.0.2-127.0.0.3,127.0.0.9", "::1"]).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[3], "::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn backwards_or_mixed_ranges_are_rejected() {
        assert!(matches!(parse_sources(&["127.0.0.9-127.0.0.2"]), Err(AddrError::BadRange(_))));
        assert!(matches!(parse_sources(&["127.0.0.1-::1"]), Err(AddrError::BadRange(_))));
    }

    #[test]
    fn ranges_leaving_loopback_are_rejected() {
        assert!(matches!(parse_sources(&["127.255.255.254-128.0.0.1"]), Err(AddrError::NotLoopback(_))));
        assert!(matches!(parse_sources(&["127.0.0.0-127.255.255.255"]), Err(AddrError::RangeTooLarge(_))));
    }

    #[test]
    fn targets_accept_comma_lists_and_repeats() {
        let v = parse_targets(&["127.0.0.1:1,127.0.0.1:2", "[::1]:3"]).unwrap();
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn non_loopback_targets_are_refused() {
        assert_eq!(parse_targets(&["10.0.0.1:80"]), Err(AddrError::NotLoopback("10.0.0.1".parse().unwrap())));
        assert_eq!(parse_targets::<&str>(&[]), Err(AddrError::NoTarget));
    }
}
