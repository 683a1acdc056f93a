//! The per-connection state machines of each scenario, as `Worker` methods:
//! how a transaction starts, and what each completion moves it to.
//!
//! Transactions (`tcp-crr`, `tcp-rr`, `udp-rr`) send `size` bytes and expect
//! the same bytes back; every received chunk is compared with what was sent,
//! so a wrong or misrouted answer is a `mismatch`, never a success. UDP
//! requests carry a sequence number in their first 8 bytes so a late answer
//! to a timed-out request is skipped rather than taken for the current one.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use socket2::{Protocol, Type};

use super::{CONNECT_WINDOW, Direction, Phase, Scenario, TAG_CONNECT, TAG_RECV, TAG_SEND, Worker};
use crate::report::ErrorKind;

fn io_kind(e: &io::Error) -> ErrorKind {
    e.raw_os_error().map_or(ErrorKind::Other, ErrorKind::from_errno)
}

impl Worker {
    /// Starts the slot's next transaction (queued or woken by its timer).
    pub(super) fn begin(&mut self, slot: usize, now: Instant) {
        if !matches!(self.conns[slot].phase, Phase::Queued | Phase::Waiting) {
            return;
        }
        if !self.may_start(now) {
            return self.finish(slot);
        }
        match self.plan.scenario {
            Scenario::TcpCrr => {
                self.count_start(slot, now, now);
                self.connect(slot, now);
            }
            Scenario::TcpRr | Scenario::UdpRr => self.begin_rr(slot, now),
            Scenario::Idle | Scenario::TcpStream(_) => {}
        }
    }

    /// Marks the start of a transaction whose latency counts from `origin`.
    fn count_start(&mut self, slot: usize, origin: Instant, now: Instant) {
        let counted = origin >= self.plan.clock.measure_start || now >= self.plan.clock.measure_start;
        let c = &mut self.conns[slot];
        c.counted = counted;
        c.origin = origin;
        c.sent = 0;
        c.got = 0;
        if counted {
            self.started += 1;
            self.counts.attempted += 1;
        }
    }

    /// Opens a TCP socket and submits its connect.
    fn connect(&mut self, slot: usize, now: Instant) {
        let fd = match self.open_socket(slot, Type::STREAM, Protocol::TCP) {
            Ok(fd) => fd,
            Err(e) => return self.sync_fail(slot, io_kind(&e), now),
        };
        let c = &mut self.conns[slot];
        let fd = c.fd.insert(fd);
        match self.ring.connect(fd, c.addr, Self::tag(slot, TAG_CONNECT)) {
            Ok(op) => {
                c.op = Some(op);
                c.phase = Phase::Connecting;
                self.connecting += 1;
                self.set_deadline(slot, now);
            }
            Err(_) => self.sync_fail(slot, ErrorKind::Other, now),
        }
    }

    fn begin_rr(&mut self, slot: usize, now: Instant) {
        if self.conns[slot].fd.is_none() {
            // A (re)connect is not a transaction, but a failed one is
            // counted as a failed attempt: see `connected`.
            self.count_start(slot, now, now);
            if self.plan.scenario == Scenario::TcpRr {
                return self.connect(slot, now);
            }
            match self.open_socket(slot, Type::DGRAM, Protocol::UDP) {
                Ok(fd) => self.conns[slot].fd = Some(fd),
                Err(e) => return self.sync_fail(slot, io_kind(&e), now),
            }
            self.uncount_connect(slot);
        }
        let start = self.plan.clock.start;
        let origin = match &mut self.conns[slot].sched {
            None => now,
            Some(s) => {
                let intended = start + s.next_intended();
                if intended >= self.plan.clock.measure_end {
                    return self.finish(slot);
                }
                if intended > now {
                    self.conns[slot].phase = Phase::Waiting;
                    return self.set_wake(slot, intended);
                }
                s.take();
                intended
            }
        };
        self.count_start(slot, origin, now);
        let size = self.plan.size;
        let c = &mut self.conns[slot];
        if self.plan.scenario == Scenario::UdpRr && size >= 8 {
            c.seq += 1;
            let seq = c.seq.to_be_bytes();
            self.ring.buf_mut(c.tx)[..8].copy_from_slice(&seq);
        }
        self.set_deadline(slot, now);
        self.send_rest(slot, now);
    }

    fn uncount_connect(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        if c.counted {
            c.counted = false;
            self.started -= 1;
            self.counts.attempted -= 1;
        }
    }

    fn send_rest(&mut self, slot: usize, now: Instant) {
        let size = self.plan.size;
        let c = &mut self.conns[slot];
        let Some(fd) = c.fd.as_ref() else { return };
        match self.ring.send(fd, c.tx, c.sent..size, Self::tag(slot, TAG_SEND)) {
            Ok(op) => {
                c.op = Some(op);
                c.phase = Phase::Sending;
            }
            Err(_) => self.sync_fail(slot, ErrorKind::Other, now),
        }
    }

    fn recv_rest(&mut self, slot: usize, now: Instant) {
        let size = self.plan.size;
        let datagram = self.plan.scenario == Scenario::UdpRr;
        let c = &mut self.conns[slot];
        let Some(fd) = c.fd.as_ref() else { return };
        let rx_len = self.ring.buf(c.rx).len();
        let end = if datagram { rx_len } else { (size - c.got).min(rx_len) };
        match self.ring.recv(fd, c.rx, 0..end, Self::tag(slot, TAG_RECV)) {
            Ok(op) => {
                c.op = Some(op);
                c.phase = Phase::Receiving;
            }
            Err(_) => self.sync_fail(slot, ErrorKind::Other, now),
        }
    }

    /// Starts the connects of `idle` and `tcp-stream`, a window at a time.
    pub(super) fn fill_connect_window(&mut self) {
        if !matches!(self.plan.scenario, Scenario::Idle | Scenario::TcpStream(_)) {
            return;
        }
        while !self.stopped && self.connecting < CONNECT_WINDOW && self.next_connect < self.conns.len() {
            let slot = self.next_connect;
            self.next_connect += 1;
            let now = Instant::now();
            // Every long-lived connection is one attempt, warmup or not.
            self.conns[slot].counted = true;
            self.conns[slot].origin = now;
            self.counts.attempted += 1;
            self.connect(slot, now);
        }
    }

    /// Moves the slot on after a successful (or failed) completion.
    pub(super) fn advance(&mut self, slot: usize, tag: u64, result: i32, now: Instant) {
        if result < 0 {
            return self.fail(slot, ErrorKind::from_errno(-result), now);
        }
        let n = result as usize;
        match (self.conns[slot].phase, tag) {
            (Phase::Connecting, TAG_CONNECT) => self.connected(slot, now),
            (Phase::Sending, TAG_SEND) => {
                let c = &mut self.conns[slot];
                c.sent += n;
                if c.counted {
                    self.counts.bytes_sent += n as u64;
                }
                if c.sent < self.plan.size {
                    self.send_rest(slot, now);
                } else {
                    self.recv_rest(slot, now);
                }
            }
            (Phase::Receiving, TAG_RECV) => self.received(slot, n, now),
            (Phase::Holding, TAG_RECV) if n > 0 => self.hold(slot, now),
            (Phase::Streaming, TAG_SEND | TAG_RECV) if n > 0 => {
                if self.in_window(now) {
                    if tag == TAG_SEND {
                        self.counts.bytes_sent += n as u64;
                    } else {
                        self.counts.bytes_received += n as u64;
                    }
                }
                self.stream_op(slot, tag, now);
            }
            (Phase::Holding | Phase::Streaming, _) => self.fail(slot, ErrorKind::Short, now),
            _ => {}
        }
    }

    fn connected(&mut self, slot: usize, now: Instant) {
        self.conns[slot].deadline = None;
        match self.plan.scenario {
            Scenario::TcpCrr => self.send_rest(slot, now),
            Scenario::TcpRr | Scenario::UdpRr => {
                self.uncount_connect(slot);
                self.conns[slot].phase = Phase::Queued;
                self.begin(slot, now);
            }
            Scenario::Idle => {
                self.conns[slot].established = true;
                self.counts.established += 1;
                self.progress.established.fetch_add(1, Ordering::Relaxed);
                self.progress.resolved.fetch_add(1, Ordering::Relaxed);
                self.hold(slot, now);
            }
            Scenario::TcpStream(dir) => {
                self.conns[slot].established = true;
                self.counts.established += 1;
                self.conns[slot].phase = Phase::Streaming;
                if dir != Direction::Recv {
                    self.stream_op(slot, TAG_SEND, now);
                }
                if dir != Direction::Send && self.conns[slot].phase == Phase::Streaming {
                    self.stream_op(slot, TAG_RECV, now);
                }
            }
        }
    }

    /// Keeps a recv posted on a held connection, to notice the peer closing.
    fn hold(&mut self, slot: usize, now: Instant) {
        let c = &mut self.conns[slot];
        let Some(fd) = c.fd.as_ref() else { return };
        let len = self.ring.buf(c.rx).len();
        match self.ring.recv(fd, c.rx, 0..len, Self::tag(slot, TAG_RECV)) {
            Ok(op) => {
                c.op = Some(op);
                c.phase = Phase::Holding;
            }
            Err(_) => self.sync_fail(slot, ErrorKind::Other, now),
        }
    }

    /// Posts the next bulk send or recv of a streaming connection.
    fn stream_op(&mut self, slot: usize, tag: u64, now: Instant) {
        let both = self.plan.scenario == Scenario::TcpStream(Direction::Both);
        let c = &mut self.conns[slot];
        let Some(fd) = c.fd.as_ref() else { return };
        let posted = if tag == TAG_SEND {
            let len = self.ring.buf(c.tx).len();
            self.ring.send(fd, c.tx, 0..len, Self::tag(slot, TAG_SEND)).map(|op| c.op = Some(op))
        } else {
            let len = self.ring.buf(c.rx).len();
            self.ring.recv(fd, c.rx, 0..len, Self::tag(slot, TAG_RECV)).map(|op| {
                if both {
                    c.op2 = Some(op);
                } else {
                    c.op = Some(op);
                }
            })
        };
        if posted.is_err() {
            self.sync_fail(slot, ErrorKind::Other, now);
        }
    }

    fn received(&mut self, slot: usize, n: usize, now: Instant) {
        if n == 0 {
            return self.fail(slot, ErrorKind::Short, now);
        }
        let size = self.plan.size;
        let datagram = self.plan.scenario == Scenario::UdpRr;
        let c = &mut self.conns[slot];
        let rx = &self.ring.buf(c.rx)[..n];
        let tx = self.ring.buf(c.tx);
        if datagram && size >= 8 && n >= 8 && rx[..8] != tx[..8] {
            // A late answer to an earlier, timed-out request.
            return self.recv_rest(slot, now);
        }
        let verdict = if datagram && n < size {
            Some(ErrorKind::Short)
        } else if c.got + n > size || rx != &tx[c.got..c.got + n] {
            Some(ErrorKind::Mismatch)
        } else {
            None
        };
        if c.counted {
            self.counts.bytes_received += n as u64;
        }
        if let Some(kind) = verdict {
            return self.fail(slot, kind, now);
        }
        c.got += n;
        if c.got < size {
            return self.recv_rest(slot, now);
        }
        c.deadline = None;
        self.record_latency(slot, now);
        let c = &mut self.conns[slot];
        if self.plan.scenario == Scenario::TcpCrr {
            c.fd = None;
        }
        c.phase = Phase::Queued;
        self.runq.push(slot);
    }
}
