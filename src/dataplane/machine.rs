//! The life of one proxied TCP connection as an I/O-free state machine:
//! events and `now` in, wanted operations ([`Action`]s) out. It opens no
//! socket, reads no clock and submits no SQE; the worker does those and
//! feeds the outcomes back (quinn-proto's shape: `handle_event` in,
//! `poll_transmit` out). So its whole life is unit-tested without sockets.
//!
//! ```text
//! [Header] --PROXY header read--> Connecting --dialed/connect ok--> [Preamble]
//!    |                             |  \__ attempt failed or timed out,      |
//!    |                             |      or the header could not be sent:  |
//!    |                             |      dial the next candidate  <--------+
//!    |                             |                                        v
//!    |                             |        Closing <--both EOFs forwarded-- Relaying
//!    +-- malformed, late ----------+-- candidates exhausted, reset, drain -->  ^
//! Closing --last in-flight op completed--> Freed
//! ```
//!
//! The bracketed phases are the PROXY protocol's (`proxy_protocol.rs`):
//! `Header` reads one from the client before any endpoint is picked (its
//! addresses decide affinity and source ranges), `Preamble` writes one to
//! each endpoint that connects, before any client byte.
//!
//! Invariants:
//! - Every op the machine asks for ([`Action::ArmConnect`],
//!   [`Action::ArmPoll`]) is counted in flight until its completion is fed
//!   back, and [`Action::Free`] is issued exactly once, only when the
//!   machine is closing and nothing is in flight: a completion never finds
//!   a freed slot's successor. Linked connect timeouts are counted, not
//!   flagged, since a failed attempt's timeout may still be completing
//!   while the next attempt's is armed.
//! - A close after any failure, on drain expiry or on idleness is a reset
//!   (RST); only a connection whose both directions forwarded end of file
//!   closes with FIN, so a cut-off transfer never looks complete.
//! - At most one op per (kind, direction) is in flight: one poll, one
//!   receive, one send. A receive is cancelled at most once and
//!   counts as in flight until its last completion (no `MORE` flag).
//! - No client byte reaches an endpoint before its PROXY header is whole,
//!   and none is relayed from a client whose header was refused or late.

use std::time::{Duration, Instant};

use super::relay::Wait;

/// The two directions of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to endpoint.
    Up = 0,
    /// Endpoint to client.
    Down = 1,
}

/// An io_uring op a connection can have in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Poll for the end of a non-blocking connect.
    Connect,
    /// The timeout linked to that poll.
    ConnectTimeout,
    /// Poll the source of a direction for readable.
    Readable(Dir),
    /// Poll the sink of a direction for writable.
    Writable(Dir),
    /// A receive from a direction's source into a provided buffer
    /// (`--relay ring|auto`; one-shot today); in flight until a completion
    /// without `MORE`.
    Recv(Dir),
    /// A send of one held buffer to a direction's sink.
    Send(Dir),
}

impl Op {
    fn bit(self) -> u16 {
        match self {
            Op::Connect => 1,
            Op::ConnectTimeout => 2,
            Op::Readable(Dir::Up) => 4,
            Op::Readable(Dir::Down) => 8,
            Op::Writable(Dir::Up) => 16,
            Op::Writable(Dir::Down) => 32,
            Op::Recv(Dir::Up) => 64,
            Op::Recv(Dir::Down) => 128,
            Op::Send(Dir::Up) => 256,
            Op::Send(Dir::Down) => 512,
        }
    }

    pub const ALL: [Op; 10] = [
        Op::Connect,
        Op::ConnectTimeout,
        Op::Readable(Dir::Up),
        Op::Readable(Dir::Down),
        Op::Writable(Dir::Up),
        Op::Writable(Dir::Down),
        Op::Recv(Dir::Up),
        Op::Recv(Dir::Down),
        Op::Send(Dir::Up),
        Op::Send(Dir::Down),
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the client's PROXY header (`accept-proxy-protocol`).
    Header,
    Connecting,
    /// Writing the PROXY header to the connected endpoint.
    Preamble,
    Relaying,
    /// Waiting for in-flight ops to complete before the fds close.
    Closing,
    /// [`Action::Free`] was issued: the slot may be reused.
    Freed,
}

/// The outcome of starting a dial to the next candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialed {
    /// Connected at once (possible on loopback).
    Connected,
    /// In progress; this was attempt number `attempt` (from 0).
    InProgress { attempt: usize },
    /// No candidate is left, or this host ran out of resources.
    Exhausted,
}

/// The outcome of pumping one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pumped {
    Wait(Wait),
    /// A transfer failed: the connection is reset.
    Failed,
}

/// The outcome of reading the client's PROXY header so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderRead {
    /// Incomplete: wait for more bytes.
    More,
    /// Whole and admitted: pick and dial endpoints now.
    Done,
    /// Malformed, refused, or the client left: reset it.
    Refused,
}

/// The outcome of writing the PROXY header to the endpoint so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreambleSent {
    /// All of it: relay now.
    All,
    /// Part of it: wait until the endpoint can take the rest.
    Partial,
    /// The endpoint failed before taking it: try the next candidate.
    Failed,
}

/// What the machine wants done next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read (what is there of) the client's PROXY header, then report
    /// [`Machine::header_read`].
    ReadHeader,
    /// Start a non-blocking connect to the next candidate, then report
    /// [`Machine::dialed`].
    Dial,
    /// Write (the rest of) the PROXY header to the endpoint, then report
    /// [`Machine::preamble_sent`].
    SendPreamble,
    /// Poll the upstream for writable, linked to timeout number `timeout`
    /// of the configured list (the last repeats for later attempts).
    ArmConnect { timeout: u8 },
    /// A connect poll completed: read the socket's error, count an
    /// endpoint failure if there is one (`timed_out`: the attempt's timeout
    /// fired, no need to look), then report [`Machine::connect_checked`].
    CheckConnect { timed_out: bool },
    /// The current attempt connected: count it as active on its endpoint.
    Connected,
    /// Submit a poll for `op`.
    ArmPoll(Op),
    /// Submit ring op `op` ([`Op::Recv`], or [`Op::Send`] of the
    /// direction's first held buffer).
    Start(Op),
    /// Move bytes in `dir` now, then report [`Machine::pumped`].
    Pump(Dir),
    /// `dir` yielded with work left: pump it again later this loop turn.
    PumpLater(Dir),
    /// Cancel the in-flight `op`; its completion still comes back.
    Cancel(Op),
    /// Give back the buffers; with `reset`, make the close send RST.
    Close { reset: bool },
    /// Nothing is in flight any more: drop the connection, close its fds.
    Free,
}

/// One TCP connection's state.
#[derive(Debug)]
pub struct Machine {
    phase: Phase,
    /// Ops in flight, one bit per [`Op`] (not the timeouts).
    armed: u16,
    /// Ops whose cancel was asked for and whose last completion is not in.
    cancelling: u16,
    /// Linked connect timeouts in flight.
    timeouts: u8,
    /// How many per-attempt connect timeouts are configured (at least 1).
    connect_timeouts: usize,
    finished: [bool; 2],
    /// Bytes moved since the last [`Machine::idle_for`].
    active: bool,
    idle_since: Instant,
    /// Whether each connected endpoint first gets a PROXY header.
    preamble: bool,
    actions: Actions<Action, 8>,
}

/// How long a client on a port that accepts the PROXY protocol may take to
/// send its header (checked on the worker's tick, so up to one tick more).
pub const HEADER_WAIT: Duration = Duration::from_secs(5);

/// The PROXY protocol steps of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Preambles {
    /// Read a header from the client first, within [`HEADER_WAIT`].
    pub accept: bool,
    /// Write a header to each endpoint before relaying.
    pub send: bool,
}

/// The actions a machine wants, in order: a fixed ring inside the machine,
/// so a connection or flow costs no heap allocation of its own.
///
/// For a connection, the most ever queued is a close with four polls in
/// flight (itself, 4 cancels, a free: a close first clears the queue);
/// otherwise at most 3 (a connect's `Connected` and two pumps), and the
/// worker takes each before feeding the event it causes, which adds at most
/// one. So 8 always suffice; a flow needs 4.
#[derive(Debug)]
pub(super) struct Actions<A: Copy, const N: usize> {
    buf: [Option<A>; N],
    head: u8,
    len: u8,
}

impl<A: Copy + std::fmt::Debug, const N: usize> Actions<A, N> {
    pub(super) fn new() -> Self {
        Self { buf: [None; N], head: 0, len: 0 }
    }

    pub(super) fn push_back(&mut self, action: A) {
        // Past the bounds above only through a bug in the machines; the
        // queue refuses loudly in tests and keeps what it has otherwise.
        debug_assert!((self.len as usize) < N, "action queue full: {self:?}");
        if (self.len as usize) < N {
            self.buf[(self.head as usize + self.len as usize) % N] = Some(action);
            self.len += 1;
        }
    }

    pub(super) fn pop_front(&mut self) -> Option<A> {
        if self.len == 0 {
            return None;
        }
        let action = self.buf[self.head as usize].take();
        self.head = ((self.head as usize + 1) % N) as u8;
        self.len -= 1;
        action
    }

    pub(super) fn extend(&mut self, actions: impl IntoIterator<Item = A>) {
        actions.into_iter().for_each(|a| self.push_back(a));
    }

    /// Keep only the queued actions `keep` accepts, in order.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&A) -> bool) {
        let mut kept = Self::new();
        while let Some(a) = self.pop_front() {
            if keep(&a) {
                kept.push_back(a);
            }
        }
        *self = kept;
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = A> + '_ {
        (0..self.len as usize).filter_map(|i| self.buf[(self.head as usize + i) % N])
    }
}

impl Machine {
    /// A connection accepted at `now`; `connect_timeouts` per-attempt
    /// timeouts are configured.
    pub fn new(now: Instant, connect_timeouts: usize) -> Self {
        Self::with_preambles(now, connect_timeouts, Preambles::default())
    }

    /// A connection accepted at `now` on a port with PROXY protocol steps.
    pub fn with_preambles(now: Instant, connect_timeouts: usize, preambles: Preambles) -> Self {
        let mut machine = Self {
            phase: Phase::Connecting,
            armed: 0,
            cancelling: 0,
            timeouts: 0,
            connect_timeouts: connect_timeouts.max(1),
            finished: [false; 2],
            active: false,
            idle_since: now,
            preamble: preambles.send,
            actions: Actions::new(),
        };
        if preambles.accept {
            machine.phase = Phase::Header;
            // The header may already be there: read before polling.
            machine.actions.push_back(Action::ReadHeader);
        } else {
            machine.actions.push_back(Action::Dial);
        }
        machine
    }

    #[cfg(test)]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the client's PROXY header is still awaited.
    pub fn awaits_header(&self) -> bool {
        self.phase == Phase::Header
    }

    /// The next wanted operation.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether any op of this connection is in flight.
    pub fn in_flight(&self) -> bool {
        self.armed != 0 || self.timeouts != 0
    }

    pub fn is_armed(&self, op: Op) -> bool {
        match op {
            Op::ConnectTimeout => self.timeouts > 0,
            _ => self.armed & op.bit() != 0,
        }
    }

    /// The outcome of an [`Action::Dial`].
    pub fn dialed(&mut self, dialed: Dialed) {
        if self.phase != Phase::Connecting {
            return;
        }
        match dialed {
            Dialed::Connected => self.connected(),
            Dialed::InProgress { attempt } => {
                self.armed |= Op::Connect.bit();
                self.timeouts += 1;
                // At most 255: --connect-timeouts allows far fewer.
                let timeout = attempt.min(self.connect_timeouts - 1).min(255) as u8;
                self.actions.push_back(Action::ArmConnect { timeout });
            }
            Dialed::Exhausted => self.close(true),
        }
    }

    /// An op of this connection completed (`result` is the CQE's result).
    pub fn completed(&mut self, op: Op, result: i32) {
        self.completed_more(op, result, false);
    }

    /// A completion of `op`; with `more` (a multishot's `IORING_CQE_F_MORE`)
    /// the op stays in flight and will complete again.
    pub fn completed_more(&mut self, op: Op, result: i32, more: bool) {
        match op {
            Op::ConnectTimeout => self.timeouts = self.timeouts.saturating_sub(1),
            _ if more => {}
            _ => {
                self.armed &= !op.bit();
                self.cancelling &= !op.bit();
            }
        }
        match (self.phase, op) {
            (Phase::Closing, _) => self.free_if_idle(),
            (Phase::Connecting, Op::Connect) => {
                // A poll cut short by its linked timeout ends in ECANCELED.
                let timed_out = result == -libc::ECANCELED;
                self.actions.push_back(Action::CheckConnect { timed_out });
            }
            (Phase::Relaying, Op::Readable(dir) | Op::Writable(dir) | Op::Recv(dir) | Op::Send(dir)) => {
                self.actions.push_back(Action::Pump(dir));
            }
            (Phase::Header, Op::Readable(Dir::Up)) => self.actions.push_back(Action::ReadHeader),
            (Phase::Preamble, Op::Writable(Dir::Up)) => self.actions.push_back(Action::SendPreamble),
            _ => {}
        }
    }

    /// The result of an [`Action::CheckConnect`]: on failure the next
    /// candidate is dialed.
    pub fn connect_checked(&mut self, connected: bool) {
        if self.phase != Phase::Connecting {
            return;
        }
        if connected {
            self.connected();
        } else {
            self.actions.push_back(Action::Dial);
        }
    }

    /// The outcome of an [`Action::ReadHeader`].
    pub fn header_read(&mut self, read: HeaderRead) {
        if self.phase != Phase::Header {
            return;
        }
        match read {
            HeaderRead::More => self.arm(Op::Readable(Dir::Up)),
            HeaderRead::Done => {
                self.phase = Phase::Connecting;
                self.actions.push_back(Action::Dial);
            }
            HeaderRead::Refused => self.close(true),
        }
    }

    /// The outcome of an [`Action::SendPreamble`]. A failure before the
    /// header was taken moves on to the next candidate: no client byte
    /// has reached any endpoint yet.
    pub fn preamble_sent(&mut self, sent: PreambleSent) {
        if self.phase != Phase::Preamble {
            return;
        }
        match sent {
            PreambleSent::All => self.relay(),
            PreambleSent::Partial => self.arm(Op::Writable(Dir::Up)),
            PreambleSent::Failed => {
                self.phase = Phase::Connecting;
                self.actions.push_back(Action::Dial);
            }
        }
    }

    /// The outcome of an [`Action::Pump`] that moved `moved` bytes.
    pub fn pumped(&mut self, dir: Dir, moved: u64, outcome: Pumped) {
        if self.phase != Phase::Relaying {
            return;
        }
        if moved > 0 {
            self.active = true;
        }
        match outcome {
            Pumped::Wait(Wait::SourceReadable) => self.arm(Op::Readable(dir)),
            Pumped::Wait(Wait::SinkWritable) => self.arm(Op::Writable(dir)),
            Pumped::Wait(Wait::Yield) => self.actions.push_back(Action::PumpLater(dir)),
            Pumped::Wait(Wait::Ring { recv, send }) => {
                if send {
                    self.start(Op::Send(dir));
                }
                if recv {
                    self.start(Op::Recv(dir));
                } else {
                    self.stop(Op::Recv(dir));
                }
            }
            Pumped::Wait(Wait::Finished) => {
                self.finished[dir as usize] = true;
                if self.finished == [true, true] {
                    self.close(false);
                }
            }
            Pumped::Failed => self.close(true),
        }
    }

    /// A direction that yielded is pumped again.
    pub fn resume(&mut self, dir: Dir) {
        if self.phase == Phase::Relaying && !self.finished[dir as usize] {
            self.actions.push_back(Action::Pump(dir));
        }
    }

    /// How long this connection has moved no byte, as of `now`. Activity
    /// is sampled here, on the worker's tick: one timer per worker.
    pub fn idle_for(&mut self, now: Instant) -> Duration {
        if std::mem::take(&mut self.active) {
            self.idle_since = now;
        }
        now.saturating_duration_since(self.idle_since)
    }

    /// The worker's tick: a relayed connection idle for `limit` is reset.
    /// True if it was.
    /// A client still owing its PROXY header past its deadline is reset
    /// too, and so is an endpoint that takes no byte of its header for
    /// `limit` (a header fits any fresh socket's buffer: only an endpoint
    /// that never reads can stall it).
    pub fn tick(&mut self, now: Instant, limit: Option<Duration>) -> bool {
        // Until the header is read no byte moved: `idle_since` is the accept.
        if self.phase == Phase::Header && now.saturating_duration_since(self.idle_since) >= HEADER_WAIT {
            self.close(true);
            return true;
        }
        let idle = self.idle_for(now);
        let counted = matches!(self.phase, Phase::Relaying | Phase::Preamble);
        if counted && limit.is_some_and(|l| idle >= l) {
            self.close(true);
            return true;
        }
        false
    }

    /// Cut the connection short with a reset (drain expiry, shutdown).
    pub fn reset(&mut self) {
        self.close(true);
    }

    /// An endpoint connected: its PROXY header first, if it gets one.
    fn connected(&mut self) {
        if self.preamble {
            self.phase = Phase::Preamble;
            self.actions.push_back(Action::SendPreamble);
        } else {
            self.relay();
        }
    }

    fn relay(&mut self) {
        self.phase = Phase::Relaying;
        self.actions.extend([Action::Connected, Action::Pump(Dir::Up), Action::Pump(Dir::Down)]);
    }

    fn arm(&mut self, op: Op) {
        if self.armed & op.bit() == 0 {
            self.armed |= op.bit();
            self.actions.push_back(Action::ArmPoll(op));
        }
    }

    fn start(&mut self, op: Op) {
        if self.armed & op.bit() == 0 {
            self.armed |= op.bit();
            self.actions.push_back(Action::Start(op));
        }
    }

    /// Cancel `op` if it is in flight and not already being cancelled; it
    /// stays in flight until its last completion comes back.
    fn stop(&mut self, op: Op) {
        if self.armed & op.bit() != 0 && self.cancelling & op.bit() == 0 {
            self.cancelling |= op.bit();
            self.actions.push_back(Action::Cancel(op));
        }
    }

    fn close(&mut self, reset: bool) {
        if matches!(self.phase, Phase::Closing | Phase::Freed) {
            return;
        }
        self.phase = Phase::Closing;
        // Ops asked for but not yet run are moot now; a poll that was never
        // submitted is not in flight.
        while let Some(action) = self.actions.pop_front() {
            match action {
                Action::ArmPoll(op) | Action::Start(op) => self.armed &= !op.bit(),
                Action::ArmConnect { .. } => {
                    self.armed &= !Op::Connect.bit();
                    self.timeouts = self.timeouts.saturating_sub(1);
                }
                _ => {}
            }
        }
        self.actions.push_back(Action::Close { reset });
        // A linked timeout goes with its poll: only the poll is cancelled.
        for op in Op::ALL {
            if op != Op::ConnectTimeout && self.is_armed(op) && self.cancelling & op.bit() == 0 {
                self.actions.push_back(Action::Cancel(op));
            }
        }
        self.free_if_idle();
    }

    fn free_if_idle(&mut self) {
        if self.phase == Phase::Closing && !self.in_flight() {
            self.phase = Phase::Freed;
            self.actions.push_back(Action::Free);
        }
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
