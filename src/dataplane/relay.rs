//! Moving the bytes of one direction of a connection.
//!
//! A [`Half`] moves bytes from a source socket to a sink socket, readiness
//! first through a chunk borrowed from the worker's [`Pool`]: a pipe
//! (zero-copy `splice`, the default) or a byte buffer (`read`/`send`, kept
//! to measure against). The worker polls for readiness with io_uring and
//! calls [`Half::pump`], which makes non-blocking syscalls until one would
//! block, so no io_uring op can park a kernel io-wq thread on an idle socket.
//! With `--relay ring` a direction instead rides the worker's provided
//! buffers (`relay_ring.rs`): [`Half::pump`] then says which ring ops it
//! wants, and `--relay auto` moves each direction between the two paths by
//! the sizes it sees ([`Switch`]), only when nothing of it is in flight.
//!
//! Invariants:
//! - A chunk is held only while it holds bytes in flight; an idle direction
//!   holds none, so an idle connection costs only its two sockets.
//! - Nothing is read while earlier bytes are undelivered (backpressure).
//! - End of file is forwarded as `shutdown(SHUT_WR)` only after every byte
//!   before it was delivered (correct half-close), on either path.
//! - A switch between paths happens only with no byte held and no op in
//!   flight on the direction, so bytes stay in order and one socket is
//!   never read by two ops at once.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::relay_ring::{HELD_MAX, Received, RingHalf, Sent, Step, Switch};
use super::sys::{self, Moved};

/// How bytes move through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum RelayMode {
    /// `splice(2)` through a pooled pipe: the bytes never enter user space.
    Splice,
    /// `read(2)` / `send(2)` through a pooled user-space buffer.
    Copy,
    /// `RECV` into the worker's provided-buffer ring and `SEND` from it: no
    /// syscall per message. A direction holds at most 8 buffers; when the
    /// ring runs dry a receive waits for one to come back.
    Ring,
    /// Each direction on the ring while its messages are small, on splice
    /// while they fill whole buffers, or when the ring is empty or the
    /// direction holds its share of it.
    Auto,
}

impl RelayMode {
    /// Whether the worker needs a provided-buffer ring.
    pub fn uses_ring(self) -> bool {
        matches!(self, RelayMode::Ring | RelayMode::Auto)
    }
}

/// Pipe capacity asked of the kernel (it may refuse and keep 64 KiB).
const PIPE_BYTES: usize = 256 * 1024;
/// Buffer size in copy mode.
const BUFFER_BYTES: usize = 64 * 1024;
/// Idle chunks a worker keeps for reuse at most; beyond this they are freed.
const POOL_KEEP: usize = 64;
/// Chunks moved per wake-up before yielding to other connections.
const BUDGET: usize = 16;

/// A pipe used as an in-kernel buffer.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

enum Chunk {
    Pipe(Pipe),
    /// Bytes `start..end` of the buffer are undelivered.
    Buffer {
        bytes: Box<[u8]>,
        start: usize,
        end: usize,
    },
}

/// A worker's idle chunks. Not shared: each worker has its own.
///
/// The pool shrinks by itself: [`Pool::trim`], called on the worker's
/// housekeeping tick, frees the chunks that stayed idle for a whole tick, so
/// after a burst the fds and memory go back to what steady traffic needs.
pub struct Pool {
    mode: RelayMode,
    pipes: Vec<Pipe>,
    buffers: Vec<Box<[u8]>>,
    /// The fewest idle chunks seen since the last trim: that many were not
    /// needed during the whole period.
    low_water: usize,
}

impl Pool {
    pub fn new(mode: RelayMode) -> Self {
        Self { mode, pipes: Vec::new(), buffers: Vec::new(), low_water: 0 }
    }

    /// Free the chunks no transfer needed since the last trim.
    pub fn trim(&mut self) {
        let surplus = self.low_water.min(self.idle());
        self.pipes.truncate(self.pipes.len().saturating_sub(surplus));
        self.buffers.truncate(self.buffers.len().saturating_sub(surplus));
        self.low_water = self.idle();
    }

    fn take(&mut self) -> io::Result<Chunk> {
        let chunk = self.take_inner();
        self.low_water = self.low_water.min(self.idle());
        chunk
    }

    fn take_inner(&mut self) -> io::Result<Chunk> {
        Ok(match self.mode {
            RelayMode::Splice | RelayMode::Ring | RelayMode::Auto => Chunk::Pipe(match self.pipes.pop() {
                Some(pipe) => pipe,
                None => {
                    let (read, write) = sys::pipe(PIPE_BYTES)?;
                    let capacity = sys::pipe_capacity(write.as_fd());
                    Pipe { read, write, capacity }
                }
            }),
            RelayMode::Copy => Chunk::Buffer {
                bytes: self.buffers.pop().unwrap_or_else(|| vec![0; BUFFER_BYTES].into_boxed_slice()),
                start: 0,
                end: 0,
            },
        })
    }

    /// Return an empty chunk. A chunk with bytes still in it must never come
    /// back (its bytes would leak into another connection): such a chunk is
    /// dropped instead, which closes the pipe.
    fn give_back(&mut self, chunk: Chunk, empty: bool) {
        if !empty {
            return;
        }
        match chunk {
            Chunk::Pipe(pipe) if self.pipes.len() < POOL_KEEP => self.pipes.push(pipe),
            Chunk::Buffer { bytes, .. } if self.buffers.len() < POOL_KEEP => self.buffers.push(bytes),
            _ => {}
        }
    }

    /// Idle chunks held (for tests and metrics).
    pub fn idle(&self) -> usize {
        self.pipes.len() + self.buffers.len()
    }
}

/// What a direction waits for after a pump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The source has nothing to read yet.
    SourceReadable,
    /// The sink cannot take more yet.
    SinkWritable,
    /// Yielded after its budget with more to do: pump again soon.
    Yield,
    /// End of file was forwarded; this direction is finished.
    Finished,
    /// On the ring: have a receive in flight (else cancel the one that
    /// is), and a send of the first held buffer.
    Ring { recv: bool, send: bool },
}

/// Which end of a direction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Sink,
}

/// A transfer failed: the connection is reset on both sides.
#[derive(Debug, thiserror::Error)]
#[error("{end:?} failed")]
pub struct RelayError {
    pub end: End,
    #[source]
    pub source: io::Error,
}

/// One direction of a connection.
#[derive(Default)]
pub struct Half {
    /// The direction is on the provided-buffer ring now.
    on_ring: bool,
    ring: RingHalf,
    /// `--relay auto`'s policy for this direction.
    switch: Option<Switch>,
    /// Bytes of `delivered` already reported by [`Half::take_moved`].
    reported: u64,
    chunk: Option<Chunk>,
    /// Bytes in the chunk not yet delivered.
    pending: usize,
    eof: bool,
    /// The last read took less than the chunk holds: the source is empty.
    drained: bool,
    finished: bool,
    /// Bytes delivered to the sink so far.
    pub delivered: u64,
}

/// What a pump may need besides its two sockets.
pub struct PumpCtx<'a> {
    pub pool: &'a mut Pool,
    /// This direction's ring receive is in flight.
    pub recv_armed: bool,
    /// Bytes in one provided buffer (0: no ring).
    pub buffer: usize,
}

impl Half {
    /// A direction relayed in `mode`.
    pub fn new(mode: RelayMode) -> Self {
        Self {
            on_ring: mode.uses_ring(),
            switch: (mode == RelayMode::Auto).then(Switch::new),
            ..Self::default()
        }
    }

    #[cfg(test)]
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Bytes delivered since the last call.
    pub fn take_moved(&mut self) -> u64 {
        let moved = self.delivered - self.reported;
        self.reported = self.delivered;
        moved
    }

    /// A ring receive completed (see [`RingHalf::received`]).
    pub fn received(&mut self, result: i32, bid: Option<u16>, buffer: usize) -> Received {
        let received = self.ring.received(result, bid);
        if let Some(switch) = self.switch.as_mut() {
            match received {
                Received::Bytes(n) => {
                    switch.observe(n as usize, buffer);
                    if self.ring.held() >= HELD_MAX {
                        switch.crowded();
                    }
                }
                Received::Starved => switch.crowded(),
                _ => {}
            }
        }
        received
    }

    /// A ring send completed (see [`RingHalf::sent`]).
    pub fn sent(&mut self, result: i32) -> Option<Sent> {
        let sent = self.ring.sent(result);
        if let Some(s) = sent {
            self.delivered += u64::from(s.bytes);
        }
        sent
    }

    /// The buffer and bytes the next ring send takes.
    pub fn ring_front(&self) -> Option<(u16, std::ops::Range<u32>)> {
        self.ring.front()
    }

    /// The ring's view of this direction (held buffers, starvation).
    pub fn ring(&mut self) -> &mut RingHalf {
        &mut self.ring
    }

    /// Move bytes until a syscall would block, the budget runs out, or the
    /// direction finishes; on the ring, say which ops to have in flight.
    pub fn pump(
        &mut self,
        source: BorrowedFd<'_>,
        sink: BorrowedFd<'_>,
        ctx: PumpCtx<'_>,
    ) -> Result<Wait, RelayError> {
        if self.finished {
            return Ok(Wait::Finished);
        }
        if self.on_ring {
            let leave = self.switch.is_some_and(|s| !s.wants_ring());
            match self.ring.step(ctx.recv_armed, leave)? {
                Step::Ops { recv, send } => return Ok(Wait::Ring { recv, send }),
                Step::Eof => return Ok(self.forward_eof(sink)),
                Step::Leave => self.move_to(false),
            }
        }
        let pool = ctx.pool;
        for _ in 0..BUDGET {
            if self.finished {
                return Ok(Wait::Finished);
            }
            if self.pending > 0 {
                if !self.deliver(sink)? {
                    return Ok(Wait::SinkWritable);
                }
                continue;
            }
            if self.eof {
                self.release(pool);
                return Ok(self.forward_eof(sink));
            }
            // A read that did not fill the chunk emptied the socket: waiting
            // for readiness now saves a read that would only say EAGAIN.
            if std::mem::take(&mut self.drained) || !self.fill(source, pool, ctx.buffer)? {
                self.release(pool);
                if self.switch.is_some_and(|s| s.wants_ring()) {
                    // Nothing held, no poll in flight: the ring takes over.
                    self.move_to(true);
                    return Ok(Wait::Ring { recv: true, send: false });
                }
                return Ok(Wait::SourceReadable);
            }
        }
        Ok(Wait::Yield)
    }

    fn move_to(&mut self, on_ring: bool) {
        self.on_ring = on_ring;
        if let Some(switch) = self.switch.as_mut() {
            switch.moved(on_ring);
        }
    }

    /// Every byte before end of file was delivered: pass the end on.
    fn forward_eof(&mut self, sink: BorrowedFd<'_>) -> Wait {
        self.finished = true;
        // The peer may already be gone; its own direction reports that, so
        // a failed shutdown here changes nothing.
        let _ = socket2::SockRef::from(&sink).shutdown(Shutdown::Write);
        Wait::Finished
    }

    /// Read once from the source into an empty chunk. False: would block.
    fn fill(&mut self, source: BorrowedFd<'_>, pool: &mut Pool, buffer: usize) -> Result<bool, RelayError> {
        let err = |source| RelayError { end: End::Source, source };
        if self.chunk.is_none() {
            self.chunk = Some(pool.take().map_err(err)?);
        }
        let (moved, capacity) = match self.chunk.as_mut() {
            Some(Chunk::Pipe(pipe)) => {
                (sys::splice(source, pipe.write.as_fd(), pipe.capacity).map_err(err)?, pipe.capacity)
            }
            Some(Chunk::Buffer { bytes, start, end }) => {
                (*start, *end) = (0, 0);
                let moved = sys::read(source, bytes).map_err(err)?;
                if let Moved::Bytes(n) = moved {
                    *end = n;
                }
                (moved, bytes.len())
            }
            None => return Ok(false),
        };
        Ok(match moved {
            Moved::Bytes(n) => {
                self.pending = n;
                self.drained = n < capacity;
                if let Some(switch) = self.switch.as_mut() {
                    switch.observe(n, buffer);
                }
                true
            }
            Moved::Eof => {
                self.eof = true;
                true
            }
            Moved::WouldBlock => false,
        })
    }

    /// Write once from the chunk to the sink. False: would block.
    fn deliver(&mut self, sink: BorrowedFd<'_>) -> Result<bool, RelayError> {
        let err = |source| RelayError { end: End::Sink, source };
        let moved = match self.chunk.as_mut() {
            Some(Chunk::Pipe(pipe)) => sys::splice(pipe.read.as_fd(), sink, self.pending),
            Some(Chunk::Buffer { bytes, start, end }) => {
                let moved = sys::send(sink, &bytes[*start..*end]);
                if let Ok(Moved::Bytes(n)) = moved {
                    *start += n;
                }
                moved
            }
            None => return Ok(false),
        }
        .map_err(err)?;
        match moved {
            Moved::Bytes(n) => {
                self.pending -= n;
                self.delivered += n as u64;
                Ok(true)
            }
            Moved::WouldBlock => Ok(false),
            // A zero-byte splice out of a non-empty pipe: the sink is gone.
            Moved::Eof => Err(err(io::Error::from(io::ErrorKind::WriteZero))),
        }
    }

    /// Return the chunk to the pool if it is empty.
    fn release(&mut self, pool: &mut Pool) {
        if let Some(chunk) = self.chunk.take() {
            pool.give_back(chunk, self.pending == 0);
        }
    }

    /// Drop the chunk at connection close (empty ones go back to the pool).
    pub fn close(&mut self, pool: &mut Pool) {
        self.release(pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let a = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (b, _) = listener.accept().expect("accept");
        a.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        (a, b)
    }

    fn moves_bytes_then_forwards_eof(mode: RelayMode) {
        // writer -> src_peer ==> (src) half (sink) ==> sink_peer -> reader
        let (mut writer, src) = pair();
        let (sink, mut reader) = pair();
        let mut pool = Pool::new(mode);
        let mut half = Half::new(mode);

        writer.write_all(b"hello, relay").expect("write");
        writer.shutdown(Shutdown::Write).expect("shutdown");
        let mut waits = Vec::new();
        for _ in 0..100 {
            let ctx = PumpCtx { pool: &mut pool, recv_armed: false, buffer: 0 };
            let wait = half.pump(src.as_fd(), sink.as_fd(), ctx).expect("pump");
            if wait == Wait::Finished {
                break;
            }
            waits.push(wait);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(half.is_finished());
        assert_eq!(half.delivered, 12);
        reader.set_nonblocking(false).expect("blocking");
        let mut got = Vec::new();
        reader.read_to_end(&mut got).expect("read to eof");
        assert_eq!(got, b"hello, relay");
        assert_eq!(pool.idle(), 1, "the drained chunk went back to the pool");
        pool.trim();
        assert_eq!(pool.idle(), 1, "used during this period: kept");
        pool.trim();
        assert_eq!(pool.idle(), 0, "idle for a whole period: freed");
    }

    #[test]
    fn splice_moves_bytes_then_forwards_eof() {
        moves_bytes_then_forwards_eof(RelayMode::Splice);
    }

    #[test]
    fn copy_moves_bytes_then_forwards_eof() {
        moves_bytes_then_forwards_eof(RelayMode::Copy);
    }

    #[test]
    fn idle_direction_holds_no_chunk() {
        let (_writer, src) = pair();
        let (sink, _reader) = pair();
        let mut pool = Pool::new(RelayMode::Splice);
        let mut half = Half::new(RelayMode::Splice);
        let ctx = PumpCtx { pool: &mut pool, recv_armed: false, buffer: 0 };
        let wait = half.pump(src.as_fd(), sink.as_fd(), ctx).expect("pump");
        assert_eq!(wait, Wait::SourceReadable);
        assert!(half.chunk.is_none());
        assert_eq!(pool.idle(), 1);
    }
}
