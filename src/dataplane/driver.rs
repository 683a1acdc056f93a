//! A worker's ring driver: the only way its code reaches the kernel's
//! io_uring. It takes ops tagged with [`Token`]s, owns what they point to
//! until they complete, and is the one place that decides when to submit
//! and when to wait.
//!
//! Invariants:
//! - Every op carries a [`Token`] whose key has its object's generation
//!   (`slots.rs`), so a late completion never acts on a reused slot.
//! - A datagram's bytes are owned by the driver from its `SEND` until that
//!   send's completion is taken back ([`Driver::sent`]); the ring is
//!   declared first, so it is dropped (ending every op) before the bytes.
//! - A full submission queue, or a kernel that refuses a submit for now
//!   (`EBUSY`), never fails an op: it waits in order in the ring's backlog
//!   (`sys::Ring`), and the next turn submits it before waiting.
//! - A provided buffer (`--relay ring|auto`) is held from the receive that
//!   filled it until [`Driver::give_back`]; a `SEND` from it keeps it until
//!   that send's completion ([`Driver::sent`]). The buffers are declared
//!   after the ring too.

use std::io;
use std::os::fd::BorrowedFd;

use io_uring::types::Timespec;

use super::slots::Key;
use super::sys;
use super::token::Token;
use super::udp::SendTag;
use crate::dataplane::machine::Op;

pub(super) struct Driver {
    ring: sys::Ring,
    /// Declared after `ring`, so the ring is dropped first.
    sends: sys::Sends<SendTag>,
    /// The provided-buffer ring of `--relay ring|auto`; after `ring` too.
    buffers: Option<sys::Buffers>,
}

/// The buffer group id of a worker's provided-buffer ring (one per ring).
const BUFFER_GROUP: u16 = 0;

impl Driver {
    /// A ring of `entries`; with `buffers`, `(count, size)` provided
    /// buffers registered on it for receives.
    pub(super) fn new(entries: u32, buffers: Option<(u16, u32)>) -> io::Result<Self> {
        let mut ring = sys::Ring::new(entries)?;
        let buffers = match buffers {
            Some((count, size)) => Some(sys::Buffers::register(&mut ring, count, size, BUFFER_GROUP)?),
            None => None,
        };
        Ok(Self { ring, sends: sys::Sends::default(), buffers })
    }

    /// Receive once on `fd` into one provided buffer (see
    /// [`sys::Ring::recv_select`]).
    pub(super) fn recv(&mut self, fd: BorrowedFd<'_>, token: Token) -> io::Result<()> {
        let Some(buffers) = self.buffers.as_ref() else {
            return Err(io::Error::other("a ring receive without provided buffers"));
        };
        self.ring.recv_select(fd, buffers.group(), token.encode())
    }

    /// A receive's completion named buffer `bid`: it is held now.
    pub(super) fn received(&mut self, bid: u16) {
        if let Some(buffers) = self.buffers.as_mut() {
            buffers.received(bid);
        }
    }

    /// Send bytes `range` of held buffer `bid` on `fd`. False: not held
    /// (nothing submitted).
    pub(super) fn send_held(
        &mut self,
        fd: BorrowedFd<'_>,
        bid: u16,
        range: std::ops::Range<u32>,
        token: Token,
    ) -> io::Result<bool> {
        match self.buffers.as_mut() {
            Some(buffers) => buffers.send(&mut self.ring, fd, bid, range, token.encode()),
            None => Ok(false),
        }
    }

    /// The send from `bid` completed.
    pub(super) fn sent_held(&mut self, bid: u16) {
        if let Some(buffers) = self.buffers.as_mut() {
            buffers.sent(bid);
        }
    }

    /// Put held buffer `bid` back in the ring.
    pub(super) fn give_back(&mut self, bid: u16) {
        if let Some(buffers) = self.buffers.as_mut() {
            buffers.give_back(bid);
        }
    }

    /// Bytes in one provided buffer (0 without them).
    pub(super) fn buffer_size(&self) -> u32 {
        self.buffers.as_ref().map_or(0, |b| b.size())
    }

    /// Provided buffers out of the ring now.
    pub(super) fn buffers_out(&self) -> usize {
        self.buffers.as_ref().map_or(0, |b| b.out())
    }

    /// Poll `fd` once for `events`.
    pub(super) fn poll(&mut self, fd: BorrowedFd<'_>, events: i16, token: Token) -> io::Result<()> {
        self.ring.poll(fd, events, token.encode())
    }

    /// Accept on `fd` until cancelled.
    pub(super) fn accept(&mut self, fd: BorrowedFd<'_>, token: Token) -> io::Result<()> {
        self.ring.accept_multi(fd, token.encode())
    }

    /// Complete after `ts`.
    pub(super) fn timeout(&mut self, ts: &'static Timespec, token: Token) -> io::Result<()> {
        self.ring.timeout(ts, token.encode())
    }

    /// Wait for connection `key`'s connect on `fd` to end, at most `ts`.
    pub(super) fn connect(&mut self, fd: BorrowedFd<'_>, ts: &'static Timespec, key: Key) -> io::Result<()> {
        let (poll, limit) = (Token::Conn(key, Op::Connect), Token::Conn(key, Op::ConnectTimeout));
        self.ring.poll_with_timeout(fd, libc::POLLOUT, poll.encode(), ts, limit.encode())
    }

    /// Cancel the op of `target`; its completion still comes back.
    pub(super) fn cancel(&mut self, target: Token) -> io::Result<()> {
        self.ring.cancel(target.encode(), Token::Cancel.encode())
    }

    /// Send a datagram on `fd`, owning its bytes until it completes.
    pub(super) fn send(&mut self, fd: BorrowedFd<'_>, tag: SendTag, data: Vec<u8>) -> io::Result<()> {
        self.sends.send(&mut self.ring, fd, tag, data, |id| Token::UdpSent(id).encode())
    }

    /// The tag of a completed send (its bytes are freed now).
    pub(super) fn sent(&mut self, id: usize) -> Option<SendTag> {
        self.sends.done(id).map(|(tag, _bytes)| tag)
    }

    /// One turn of the loop: submit everything, wait for a completion when
    /// the worker has nothing else to do (`idle`), and take every ready one
    /// into `out` as `(user_data, result, flags)`.
    pub(super) fn turn(&mut self, idle: bool, out: &mut Vec<(u64, i32, u32)>) -> io::Result<()> {
        self.ring.submit_and_wait(idle)?;
        out.clear();
        self.ring.completions(out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::dataplane::machine::Dir;

    #[test]
    fn more_ops_than_the_submission_queue_holds_all_complete_and_linked_pairs_stay_whole() {
        // A 2-entry queue, and ops for 8 plus a linked poll+timeout pair.
        let mut driver = Driver::new(2, None).expect("io_uring (kernel 6.0+)");
        let ready = sys::eventfd().expect("eventfd");
        sys::eventfd_signal(ready.as_fd());
        let key = |index| Key { index, generation: 1 };
        for i in 0..8 {
            driver
                .poll(ready.as_fd(), libc::POLLIN, Token::Conn(key(i), Op::Readable(Dir::Up)))
                .expect("poll");
        }
        let ts = sys::timespec(std::time::Duration::from_secs(5));
        driver.connect(ready.as_fd(), ts, key(99)).expect("linked pair");
        let mut seen = Vec::new();
        let mut out = Vec::new();
        // Bounded: every op is ready at once, so a handful of turns do.
        for _ in 0..20 {
            if seen.len() == 10 {
                break;
            }
            driver.turn(true, &mut out).expect("turn");
            seen.extend(out.iter().map(|&(data, result, _)| (Token::decode(data), result)));
        }
        for i in 0..8 {
            assert!(
                seen.iter().any(|(t, r)| *t == Some(Token::Conn(key(i), Op::Readable(Dir::Up))) && *r > 0),
                "poll {i} completed: {seen:?}"
            );
        }
        // The poll of the pair saw readiness, so its timeout was cancelled:
        // only a linked pair ends that way.
        assert!(seen.contains(&(Some(Token::Conn(key(99), Op::Connect)), libc::POLLOUT as i32)), "{seen:?}");
        assert!(
            seen.contains(&(Some(Token::Conn(key(99), Op::ConnectTimeout)), -libc::ECANCELED)),
            "{seen:?}"
        );
        assert_eq!(driver.ring.backlog(), 0);
    }
}
