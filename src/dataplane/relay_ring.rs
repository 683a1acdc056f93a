//! One direction relayed through the worker's provided-buffer ring
//! (`--relay ring`, and `auto` while its messages are small): a one-shot
//! `RECV` with buffer select on the source fills a buffer the kernel picks
//! when data arrives, each is sent
//! straight from that buffer to the sink with `SEND`, and goes back to the
//! ring when its last byte is sent. No syscall of its own: every op rides
//! the worker's one `io_uring_enter` per loop turn.
//!
//! This file is the bookkeeping only, without I/O: which buffers the
//! direction holds, in order, and what it wants in flight next. The worker
//! submits what it asks for through its driver; [`Switch`] is the pure
//! policy `--relay auto` uses to move a direction between this path and
//! readiness-first `splice`.
//!
//! Invariants:
//! - Held buffers are sent in the order they were received, one `SEND` at a
//!   time, so a short send is finished before the next buffer's bytes.
//! - A direction holds at most [`HELD_MAX`] buffers, a hard bound: one
//!   receive is in flight at a time, it takes one buffer, and it is armed
//!   only while fewer than `HELD_MAX` are held (backpressure until the
//!   sends catch up). A multishot receive made this bound soft (until its
//!   cancel landed it drained the socket's queue into free buffers: a
//!   blocked 16 MiB echo held 201 of 256), so it is not used. An idle
//!   direction holds none (the kernel takes a buffer only when data
//!   arrives).
//! - The ring is an optimisation, never a dependency: under `auto`
//!   ([`Switch`]) a direction that finds the ring empty (`ENOBUFS`) or holds
//!   its whole share moves to splice as soon as it holds no bytes, so a
//!   connection whose peer never reads cannot make others wait for
//!   buffers.
//! - End of file is forwarded only after every held byte was sent.
//! - A receive that ran out of buffers (`ENOBUFS`) is re-armed only after
//!   some buffer went back to the ring, never in a loop.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;

use super::relay::{End, RelayError};

/// Provided buffers per worker, and the bytes of each: the ring's budget,
/// 4 MiB per worker with `--relay ring|auto` (none otherwise). A buffer is
/// out of the ring only while it holds bytes not yet sent; an idle
/// connection holds none. When every buffer is out, receives wait
/// (`ENOBUFS`) until one comes back.
pub const RING_BUFFERS: u16 = 256;
pub const RING_BUFFER_BYTES: u32 = 16 * 1024;

/// Buffers a direction may hold: no receive is armed at this many.
pub const HELD_MAX: usize = 8;

/// Receives that filled their whole buffer, in a row, before `auto` moves a
/// direction to splice: a bulk transfer.
pub const TO_SPLICE: u8 = 4;
/// Splice reads smaller than one provided buffer, in a row, before `auto`
/// moves a direction back to the ring: small messages again.
pub const TO_RING: u8 = 8;

/// Bytes `start..end` of buffer `bid` are not sent yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    bid: u16,
    start: u32,
    end: u32,
}

/// What a receive completion meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// This many bytes are held now.
    Bytes(u32),
    /// The source reached end of file.
    Eof,
    /// No buffer was free (`ENOBUFS`); re-arm after one goes back.
    Starved,
    /// The receive was cancelled, or the completion carried nothing.
    Nothing,
    /// The source failed; the next pump reports it.
    Failed,
}

/// A send's completion: the buffer it read, the bytes it moved, and whether
/// that buffer is fully sent (to go back to the ring).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    pub bid: u16,
    pub bytes: u32,
    pub done: bool,
}

/// What a direction on the ring wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// These ops in flight: a receive (else cancel one that is), a send of
    /// the first held buffer.
    Ops { recv: bool, send: bool },
    /// Every held byte is sent and the source ended: forward end of file.
    Eof,
    /// Nothing in flight, nothing held: the direction may leave the ring.
    Leave,
}

/// The ring half of one direction.
#[derive(Debug, Default)]
pub struct RingHalf {
    held: VecDeque<Held>,
    eof: bool,
    starved: bool,
    error: Option<(End, i32)>,
}

impl RingHalf {
    /// A receive completed with `result`, naming buffer `bid` if it took one
    /// (the caller gives back a buffer that came with no bytes).
    pub fn received(&mut self, result: i32, bid: Option<u16>) -> Received {
        match (result, bid) {
            (n, Some(bid)) if n > 0 => {
                self.held.push_back(Held { bid, start: 0, end: n as u32 });
                Received::Bytes(n as u32)
            }
            (0, _) => {
                self.eof = true;
                Received::Eof
            }
            (e, _) if e == -libc::ENOBUFS => {
                self.starved = true;
                Received::Starved
            }
            (e, _) if e == -libc::ECANCELED || e > 0 => Received::Nothing,
            (e, _) => {
                self.error.get_or_insert((End::Source, -e));
                Received::Failed
            }
        }
    }

    /// A buffer went back to the ring: a starved receive may be re-armed.
    /// True if this direction was starved.
    pub fn unstarve(&mut self) -> bool {
        std::mem::take(&mut self.starved)
    }

    /// Buffers held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The buffer and bytes the next send takes.
    pub fn front(&self) -> Option<(u16, Range<u32>)> {
        self.held.front().map(|h| (h.bid, h.start..h.end))
    }

    /// The send of the first held buffer completed with `result`.
    pub fn sent(&mut self, result: i32) -> Option<Sent> {
        let front = self.held.front_mut()?;
        let bid = front.bid;
        match result {
            n if n > 0 => {
                front.start = front.end.min(front.start + n as u32);
                let done = front.start == front.end;
                if done {
                    self.held.pop_front();
                }
                Some(Sent { bid, bytes: n as u32, done })
            }
            e if e == -libc::ECANCELED => Some(Sent { bid, bytes: 0, done: false }),
            0 => {
                self.error.get_or_insert((End::Sink, libc::EPIPE));
                Some(Sent { bid, bytes: 0, done: false })
            }
            e => {
                self.error.get_or_insert((End::Sink, -e));
                Some(Sent { bid, bytes: 0, done: false })
            }
        }
    }

    /// Every buffer still held, to give back once nothing is in flight.
    pub fn take_held(&mut self) -> impl Iterator<Item = u16> + '_ {
        self.held.drain(..).map(|h| h.bid)
    }

    /// What to have in flight now, given whether the receive is (`recv_armed`)
    /// and whether the direction should leave the ring (`leave`).
    pub fn step(&mut self, recv_armed: bool, leave: bool) -> Result<Step, RelayError> {
        if let Some((end, errno)) = self.error.take() {
            return Err(RelayError { end, source: io::Error::from_raw_os_error(errno) });
        }
        if self.held.is_empty() && self.eof {
            return Ok(Step::Eof);
        }
        if leave && self.held.is_empty() && !recv_armed {
            self.starved = false;
            return Ok(Step::Leave);
        }
        let recv = !self.eof && !self.starved && !leave && self.held.len() < HELD_MAX;
        Ok(Step::Ops { recv, send: !self.held.is_empty() })
    }
}

/// `--relay auto`'s choice for one direction, from the sizes it sees: a
/// direction whose receives keep filling whole buffers is bulk and moves to
/// splice; one whose splice reads stay smaller than a buffer is small
/// messages and moves back to the ring. Pure: sizes in, a choice out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    on_ring: bool,
    /// Transfers in a row that point to the other path.
    streak: u8,
    /// The ring ran dry or the direction holds its whole share: leave it
    /// now, whatever the sizes say.
    crowded: bool,
}

impl Default for Switch {
    fn default() -> Self {
        Self::new()
    }
}

impl Switch {
    /// A direction starts on the ring: most Service traffic is small
    /// messages, and an idle connection holds nothing there.
    pub fn new() -> Self {
        Self { on_ring: true, streak: 0, crowded: false }
    }

    /// The direction found the ring empty (`ENOBUFS`) or holds
    /// [`HELD_MAX`] buffers: the ring is no place to wait, splice is.
    pub fn crowded(&mut self) {
        if self.on_ring {
            self.crowded = true;
        }
    }

    /// A transfer of `moved` bytes on the current path; `buffer` is the
    /// size of one provided buffer.
    pub fn observe(&mut self, moved: usize, buffer: usize) {
        let other = if self.on_ring { moved >= buffer } else { moved < buffer };
        self.streak = if other { self.streak.saturating_add(1) } else { 0 };
    }

    /// Whether the direction should be on the ring now.
    pub fn wants_ring(&self) -> bool {
        if self.on_ring && self.crowded {
            return false;
        }
        let limit = if self.on_ring { TO_SPLICE } else { TO_RING };
        self.on_ring != (self.streak >= limit)
    }

    /// The direction moved to the ring (`true`) or to splice.
    pub fn moved(&mut self, on_ring: bool) {
        if on_ring != self.on_ring {
            self.on_ring = on_ring;
            self.streak = 0;
            self.crowded = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_buffers_are_sent_in_order_and_a_short_send_finishes_first() {
        let mut half = RingHalf::default();
        assert_eq!(half.received(100, Some(3)), Received::Bytes(100));
        assert_eq!(half.received(50, Some(1)), Received::Bytes(50));
        assert_eq!(half.step(true, false).expect("step"), Step::Ops { recv: true, send: true });
        assert_eq!(half.front(), Some((3, 0..100)));
        assert_eq!(half.sent(60), Some(Sent { bid: 3, bytes: 60, done: false }));
        assert_eq!(half.front(), Some((3, 60..100)), "the rest of a short send goes first");
        assert_eq!(half.sent(40), Some(Sent { bid: 3, bytes: 40, done: true }));
        assert_eq!(half.front(), Some((1, 0..50)));
        assert_eq!(half.sent(50), Some(Sent { bid: 1, bytes: 50, done: true }));
        assert_eq!(half.step(true, false).expect("step"), Step::Ops { recv: true, send: false });
    }

    #[test]
    fn end_of_file_waits_for_every_held_byte() {
        let mut half = RingHalf::default();
        half.received(10, Some(0));
        assert_eq!(half.received(0, None), Received::Eof);
        assert_eq!(half.step(false, false).expect("step"), Step::Ops { recv: false, send: true });
        half.sent(10);
        assert_eq!(half.step(false, false).expect("step"), Step::Eof);
    }

    #[test]
    fn a_full_direction_stops_receiving_until_its_sends_catch_up() {
        let mut half = RingHalf::default();
        for bid in 0..HELD_MAX as u16 {
            half.received(16, Some(bid));
        }
        assert_eq!(half.step(true, false).expect("step"), Step::Ops { recv: false, send: true });
        half.sent(16);
        assert_eq!(half.step(false, false).expect("step"), Step::Ops { recv: true, send: true });
    }

    #[test]
    fn a_starved_receive_waits_for_a_buffer_to_come_back() {
        let mut half = RingHalf::default();
        assert_eq!(half.received(-libc::ENOBUFS, None), Received::Starved);
        assert_eq!(half.step(false, false).expect("step"), Step::Ops { recv: false, send: false });
        assert_eq!(half.step(false, false).expect("step"), Step::Ops { recv: false, send: false }, "no spin");
        assert!(half.unstarve());
        assert_eq!(half.step(false, false).expect("step"), Step::Ops { recv: true, send: false });
    }

    #[test]
    fn failures_name_the_end_that_failed() {
        let mut half = RingHalf::default();
        assert_eq!(half.received(-libc::ECONNRESET, None), Received::Failed);
        assert_eq!(half.step(false, false).expect_err("reset").end, End::Source);
        half.received(5, Some(2));
        half.sent(-libc::EPIPE);
        let e = half.step(false, false).expect_err("broken pipe");
        assert_eq!((e.end, e.source.raw_os_error()), (End::Sink, Some(libc::EPIPE)));
        assert_eq!(half.received(-libc::ECANCELED, None), Received::Nothing, "our own cancel");
    }

    #[test]
    fn leaving_the_ring_waits_for_the_receive_and_the_held_bytes() {
        let mut half = RingHalf::default();
        half.received(16, Some(0));
        assert_eq!(half.step(true, true).expect("step"), Step::Ops { recv: false, send: true });
        half.sent(16);
        assert_eq!(
            half.step(true, true).expect("step"),
            Step::Ops { recv: false, send: false },
            "the cancelled receive's last completion is not in yet"
        );
        assert_eq!(half.step(false, true).expect("step"), Step::Leave);
    }

    #[test]
    fn a_crowded_ring_sends_the_direction_to_splice_at_once_and_lets_it_come_back() {
        let mut switch = Switch::new();
        switch.observe(64, 16384);
        switch.crowded();
        assert!(!switch.wants_ring(), "no buffer, or its whole share held: leave now");
        switch.observe(64, 16384);
        assert!(!switch.wants_ring(), "small sizes do not keep it on a crowded ring");
        switch.moved(false);
        assert!(!switch.wants_ring(), "on splice");
        switch.crowded();
        assert!(!switch.wants_ring(), "no effect off the ring");
        for _ in 0..TO_RING {
            switch.observe(64, 16384);
        }
        assert!(switch.wants_ring(), "the usual policy brings it back");
        switch.moved(true);
        assert!(switch.wants_ring(), "back on the ring, not crowded");
    }

    #[test]
    fn a_starved_direction_holding_nothing_leaves_the_ring_in_the_same_step() {
        let mut half = RingHalf::default();
        assert_eq!(half.received(-libc::ENOBUFS, None), Received::Starved);
        assert_eq!(half.step(false, true).expect("step"), Step::Leave);
    }

    #[test]
    fn a_direction_at_its_share_leaves_once_its_sends_are_done() {
        let mut half = RingHalf::default();
        for bid in 0..HELD_MAX as u16 {
            half.received(16, Some(bid));
        }
        assert_eq!(half.held(), HELD_MAX);
        assert_eq!(half.step(false, true).expect("step"), Step::Ops { recv: false, send: true });
        for _ in 0..HELD_MAX {
            half.sent(16);
        }
        assert_eq!(half.step(false, true).expect("step"), Step::Leave);
    }

    #[test]
    fn switch_moves_bulk_to_splice_and_small_messages_back_to_the_ring() {
        let mut switch = Switch::new();
        assert!(switch.wants_ring());
        for _ in 0..TO_SPLICE - 1 {
            switch.observe(16384, 16384);
        }
        assert!(switch.wants_ring(), "not yet");
        switch.observe(100, 16384);
        switch.observe(16384, 16384);
        assert!(switch.wants_ring(), "a small one breaks the streak");
        for _ in 0..TO_SPLICE {
            switch.observe(16384, 16384);
        }
        assert!(!switch.wants_ring(), "bulk: to splice");
        switch.moved(false);
        assert!(!switch.wants_ring());
        switch.observe(200_000, 16384);
        for _ in 0..TO_RING - 1 {
            switch.observe(64, 16384);
        }
        assert!(!switch.wants_ring(), "not yet");
        switch.observe(64, 16384);
        assert!(switch.wants_ring(), "small again: back to the ring");
        switch.moved(true);
        assert!(switch.wants_ring());
    }
}
