//! The handles of one nf_tables table's objects (the table itself, its
//! chains, rules and sets), read over netlink with one dump request per
//! kind (`NFT_MSG_GETTABLE`, `GETCHAIN`, `GETRULE`, `GETSET`).
//!
//! The kernel gives every object a new handle when it is created, and the
//! table a new one (from a per-namespace counter) each time it is made
//! again, so the handles recorded after our last whole rewrite are equal
//! to the ones read later exactly when nobody added, deleted or flushed
//! anything of our table since (a flush deletes the chain's rules). Map and
//! set *elements* have no handles: a foreign element delete is not seen
//! here (the syncer rewrites everything every [`super::syncer::FULL_RESYNC`]
//! for that). Our table holds a handful of chains, rules and sets whatever
//! the number of services (elements are not dumped), so the read costs
//! about as little as the generation id's, and it is what the periodic
//! resync checks when that id says someone, somewhere, wrote.
//!
//! No `unsafe` (socket2 does the system calls), as in [`super::genid`].

use std::io::{self, Read};

const SUBSYS: u16 = 10 << 8;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ROOT | NLM_F_MATCH`.
const NLM_F_DUMP: u16 = 0x300;
const HEADER: usize = 16;
const NFGENMSG: usize = 4;
/// The attribute holding the table's name is type 1 for all four kinds.
const ATTR_TABLE: u16 = 1;

/// One kind of object: the request, the answer's message type, and the
/// attribute holding the handle (a big-endian u64).
#[derive(Clone, Copy)]
struct Kind {
    get: u16,
    new: u16,
    handle: u16,
}

const TABLES: Kind = Kind { get: 1, new: 0, handle: 4 };
const CHAINS: Kind = Kind { get: 4, new: 3, handle: 2 };
const RULES: Kind = Kind { get: 7, new: 6, handle: 3 };
const SETS: Kind = Kind { get: 10, new: 9, handle: 16 };

/// Every handle of table `table` of nf_tables family `family` (e.g.
/// `NFPROTO_INET`, 1), each with its kind's message type, sorted: empty
/// when there is no such table.
pub fn read(family: u8, table: &str) -> io::Result<Vec<(u16, u64)>> {
    let mut all = Vec::new();
    for kind in [TABLES, CHAINS, RULES, SETS] {
        dump(kind, family, table, &mut all)?;
    }
    all.sort_unstable();
    Ok(all)
}

fn dump(kind: Kind, family: u8, table: &str, out: &mut Vec<(u16, u64)>) -> io::Result<()> {
    let socket = super::genid::netfilter_socket()?;
    socket.send(&request(kind, family, table))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = (&socket).read(&mut buf)?;
        if n == 0 || parse(&buf[..n], kind, table, out)? {
            return Ok(());
        }
    }
}

/// A dump request for `kind`, with the table's name as a filter (the
/// kernel applies it to rules and sets; the answer is filtered again here).
fn request(kind: Kind, family: u8, table: &str) -> Vec<u8> {
    let name_len = 4 + table.len() + 1;
    let len = HEADER + NFGENMSG + ((name_len + 3) & !3);
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&(SUBSYS | kind.get).to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[family, 0, 0, 0]);
    req.extend_from_slice(&(name_len as u16).to_ne_bytes());
    req.extend_from_slice(&ATTR_TABLE.to_ne_bytes());
    req.extend_from_slice(table.as_bytes());
    req.resize(len, 0);
    req
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The handles of `table`'s objects in one read of a dump answer; whether
/// the dump is done.
fn parse(buf: &[u8], kind: Kind, table: &str, out: &mut Vec<(u16, u64)>) -> io::Result<bool> {
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let mut at = 0;
    while at + HEADER <= buf.len() {
        let len = buf.get(at..at + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let len = len.ok_or_else(|| invalid("short netlink message"))?;
        let msg = buf.get(at..at + len).ok_or_else(|| invalid("truncated netlink message"))?;
        if len < HEADER {
            return Err(invalid("netlink message shorter than its header"));
        }
        match u16_at(msg, 4) {
            Some(NLMSG_DONE) => return Ok(true),
            Some(NLMSG_ERROR) => {
                let code = msg.get(HEADER..HEADER + 4).ok_or_else(|| invalid("short netlink error"))?;
                let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(code.saturating_neg()));
                }
            }
            Some(t) if t == SUBSYS | kind.new => {
                let (mut name, mut handle) = (None, None);
                let mut a = HEADER + NFGENMSG;
                while a + 4 <= len {
                    let attr_len = usize::from(u16_at(msg, a).unwrap_or(0));
                    let attr_type = u16_at(msg, a + 2).unwrap_or(0) & 0x3fff;
                    if attr_len < 4 {
                        break;
                    }
                    let value = msg.get(a + 4..a + attr_len);
                    if attr_type == ATTR_TABLE {
                        name = value.map(|v| v.split(|&c| c == 0).next().unwrap_or(v));
                    } else if attr_type == kind.handle
                        && let Some(v) = value.filter(|v| v.len() >= 8)
                    {
                        handle = Some(u64::from_be_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]));
                    }
                    a += (attr_len + 3) & !3;
                }
                if name == Some(table.as_bytes())
                    && let Some(h) = handle
                {
                    out.push((kind.new, h));
                }
            }
            _ => return Err(invalid("unexpected netlink answer to an nf_tables dump")),
        }
        at += (len + 3) & !3;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, attrs: &[&[u8]]) -> Vec<u8> {
        let body: Vec<u8> = attrs.concat();
        let mut m = Vec::new();
        m.extend_from_slice(&((HEADER + NFGENMSG + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[1, 0, 0, 0]);
        m.extend_from_slice(&body);
        m
    }

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    #[test]
    fn only_the_named_tables_handles_are_kept_and_done_or_an_error_ends_the_dump() {
        let ours = attr(ATTR_TABLE, b"ringport\0");
        let theirs = attr(ATTR_TABLE, b"filter\0");
        let handle = |h: u64| attr(RULES.handle, &h.to_be_bytes());
        let mut buf = message(SUBSYS | RULES.new, &[&ours, &attr(2, b"prerouting\0"), &handle(7)]);
        buf.extend(message(SUBSYS | RULES.new, &[&theirs, &handle(8)]));
        let mut out = Vec::new();
        assert!(!parse(&buf, RULES, "ringport", &mut out).unwrap(), "not done yet");
        assert_eq!(out, vec![(RULES.new, 7)]);
        let done = message(NLMSG_DONE, &[]);
        assert!(parse(&done, RULES, "ringport", &mut out).unwrap());
        let mut error = message(NLMSG_ERROR, &[]);
        error[HEADER..HEADER + 4].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(parse(&error, RULES, "ringport", &mut out).unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert!(parse(&buf[..20], RULES, "ringport", &mut out).is_err(), "truncated: an error, not a panic");
        assert!(parse(&message(SUBSYS | SETS.new, &[]), RULES, "ringport", &mut out).is_err());
        // A request names the table, NUL-terminated and padded.
        let req = request(SETS, 1, "ringport");
        assert_eq!(req.len(), HEADER + NFGENMSG + 16);
        assert_eq!(&req[HEADER + NFGENMSG + 4..HEADER + NFGENMSG + 13], b"ringport\0");
    }
}
