//! What an io_uring completion belongs to: the `user_data` of every op a
//! worker submits.
//!
//! A token is `kind << 56 | payload`. Listener and connection tokens carry a
//! generation-checked [`Key`], so a completion that arrives after its
//! object was freed finds nothing, even when a new object took the slot.
//! UDP flows keep their own generation for sends (see `udp.rs`) and are
//! freed only once their poll is no longer in flight.

use super::conn::Op;
use super::slots::Key;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Token {
    Wake,
    Tick,
    Drain,
    Cancel,
    Accept(Key),
    /// The back-off timer of an accept that failed for lack of resources.
    AcceptRetry(Key),
    Conn(Key, Op),
    /// A UDP listening socket is readable.
    UdpListen(Key),
    /// A UDP flow's endpoint socket is readable.
    UdpFlow(usize),
    /// A datagram to an endpoint was sent.
    UdpSent(usize),
}

const PAYLOAD: u64 = (1 << 56) - 1;

impl Token {
    pub(super) fn encode(self) -> u64 {
        let (kind, payload): (u64, u64) = match self {
            Token::Wake => (1, 0),
            Token::Drain => (2, 0),
            Token::Cancel => (3, 0),
            Token::Accept(k) => (4, k.pack()),
            Token::AcceptRetry(k) => (5, k.pack()),
            Token::Tick => (6, 0),
            Token::Conn(k, op) => (8 + op_index(op), k.pack()),
            Token::UdpListen(k) => (20, k.pack()),
            Token::UdpFlow(k) => (21, k as u64),
            Token::UdpSent(k) => (22, k as u64),
        };
        kind << 56 | (payload & PAYLOAD)
    }

    pub(super) fn decode(v: u64) -> Option<Token> {
        let payload = v & PAYLOAD;
        let key = Key::unpack(payload);
        Some(match v >> 56 {
            1 => Token::Wake,
            2 => Token::Drain,
            3 => Token::Cancel,
            4 => Token::Accept(key),
            5 => Token::AcceptRetry(key),
            6 => Token::Tick,
            k @ 8..=17 => Token::Conn(key, Op::ALL[(k - 8) as usize]),
            20 => Token::UdpListen(key),
            21 => Token::UdpFlow(payload as usize),
            22 => Token::UdpSent(payload as usize),
            _ => return None,
        })
    }
}

fn op_index(op: Op) -> u64 {
    Op::ALL.iter().position(|o| *o == op).unwrap_or(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::conn::Dir;

    #[test]
    fn tokens_round_trip_with_their_generation() {
        let key = |index, generation| Key { index, generation };
        let tokens = [
            Token::Wake,
            Token::Tick,
            Token::Drain,
            Token::Cancel,
            Token::Accept(key(7, 3)),
            Token::AcceptRetry(key(9, super::super::slots::GENERATIONS - 1)),
            Token::Conn(key(123_456, 77), Op::Connect),
            Token::Conn(key(1, 0), Op::ConnectTimeout),
            Token::Conn(key(2, 5), Op::Readable(Dir::Down)),
            Token::Conn(key(u32::MAX, 1), Op::Writable(Dir::Up)),
            Token::Conn(key(3, 2), Op::Recv(Dir::Up)),
            Token::Conn(key(3, 2), Op::Send(Dir::Down)),
            Token::UdpListen(key(4, 8)),
            Token::UdpFlow(5),
            Token::UdpSent(6),
        ];
        for t in tokens {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_ne!(
            Token::AcceptRetry(key(9, 1)).encode(),
            Token::AcceptRetry(key(9, 2)).encode(),
            "a later listener in the same slot has another token"
        );
    }
}
