//! nftables' ruleset generation id, read over netlink (`NFT_MSG_GETGEN`):
//! the kernel bumps it by one on every committed nf_tables transaction (an
//! `nft -f` batch, an `iptables-nft` call, anyone's), and answering it
//! costs the kernel nothing, whatever the number of rules.
//!
//! The syncer compares it with the id its own last write produced: when
//! they are equal, nobody has touched any nf_tables table since, so the
//! periodic resync has nothing to repair and rewrites nothing. Listing the
//! table instead (`nft list table`) costs about a second of CPU at 100k
//! elements, since nft loads every element to print a single chain.
//!
//! One request, one answer, on a socket opened per read; no `unsafe`
//! (socket2 does the system calls).

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN` and `| NFT_MSG_NEWGEN`.
const GETGEN: u16 = (10 << 8) | 16;
const NEWGEN: u16 = (10 << 8) | 15;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
/// `NFTA_GEN_ID`, a big-endian u32.
const NFTA_GEN_ID: u16 = 1;
/// `struct nlmsghdr` and `struct nfgenmsg`.
const HEADER: usize = 16;
const NFGENMSG: usize = 4;

/// Whether a failure to read the id was logged at warn since the last
/// successful read.
static WARNED: AtomicBool = AtomicBool::new(false);

/// [`read`], its failure logged: at warn the first time after a success
/// (or at start), at debug while it keeps failing (every periodic resync
/// is then a full rewrite, which its own log line says).
pub fn read_logged() -> Option<u32> {
    match read() {
        Ok(id) => {
            WARNED.store(false, Ordering::Relaxed);
            Some(id)
        }
        Err(e) if !WARNED.swap(true, Ordering::Relaxed) => {
            tracing::warn!(error = %e, "cannot read the nftables generation id: each periodic resync rewrites the rules whole until it can");
            None
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the nftables generation id");
            None
        }
    }
}

/// The current ruleset generation id of this network namespace.
pub fn read() -> io::Result<u32> {
    let socket = netfilter_socket()?;
    socket.send(&request())?;
    let mut answer = [0u8; 512];
    let n = (&socket).read(&mut answer)?;
    parse(&answer[..n])
}

/// A netfilter netlink socket to ask the kernel about nf_tables, which
/// gives up on an answer after 1 s (this check and `handles`' dump).
pub(super) fn netfilter_socket() -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(libc::NETLINK_NETFILTER)),
    )?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(socket)
}

/// `NFT_MSG_GETGEN`, family `AF_UNSPEC`; the kernel (port 0) is the
/// destination of an unconnected netlink socket.
fn request() -> Vec<u8> {
    let mut req = Vec::with_capacity(HEADER + NFGENMSG);
    req.extend_from_slice(&((HEADER + NFGENMSG) as u32).to_ne_bytes());
    req.extend_from_slice(&GETGEN.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    req.extend_from_slice(&[0, 0, 0, 0]); // AF_UNSPEC, NFNETLINK_V0, res_id
    req
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The generation id in the kernel's answer, or the error it sent back.
fn parse(msg: &[u8]) -> io::Result<u32> {
    let u16_at = |i: usize| msg.get(i..i + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let len = msg.get(..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let len = len.ok_or_else(|| invalid("short netlink answer"))?.min(msg.len());
    match u16_at(4) {
        Some(NLMSG_ERROR) => {
            let code = msg.get(HEADER..HEADER + 4).ok_or_else(|| invalid("short netlink error"))?;
            let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
            Err(io::Error::from_raw_os_error(code.saturating_neg()))
        }
        Some(NEWGEN) => {
            let mut at = HEADER + NFGENMSG;
            while at + 4 <= len {
                let attr_len = usize::from(u16_at(at).unwrap_or(0));
                let attr_type = u16_at(at + 2).unwrap_or(0) & 0x3fff;
                if attr_len < 4 {
                    break;
                }
                if attr_type == NFTA_GEN_ID
                    && attr_len >= 8
                    && let Some(b) = msg.get(at + 4..at + 8)
                {
                    return Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                }
                at += (attr_len + 3) & !3;
            }
            Err(invalid("no NFTA_GEN_ID in NFT_MSG_NEWGEN"))
        }
        _ => Err(invalid("unexpected netlink answer to NFT_MSG_GETGEN")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(kind: u16, attrs: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((HEADER + NFGENMSG + attrs.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(attrs);
        m
    }

    #[test]
    fn the_generation_id_is_read_from_the_answer_and_an_error_answer_is_an_error() {
        // NFTA_GEN_ID = 0x01020304, then NFTA_GEN_PROC_PID.
        let attrs = [8, 0, 1, 0, 1, 2, 3, 4, 8, 0, 2, 0, 0, 0, 0, 9];
        assert_eq!(parse(&answer(NEWGEN, &attrs)).unwrap(), 0x0102_0304);
        // Only the PID: no id.
        assert!(parse(&answer(NEWGEN, &attrs[8..])).is_err());
        let mut error = answer(NLMSG_ERROR, &[]);
        error[HEADER..HEADER + 4].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(parse(&error).unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert!(parse(&[1, 2]).is_err(), "a short answer is an error, not a panic");
        assert!(
            parse(&answer(NEWGEN, &[0, 0, 1, 0, 9, 9])).is_err(),
            "a zero-length attribute ends the walk"
        );
        assert!(
            parse(&answer(NEWGEN, &[5, 0, 1, 0, 9, 0, 0, 0, 8, 0, 2, 0, 1, 2, 3, 4])).is_err(),
            "an id attribute too short for a u32 is no id"
        );
    }
}
