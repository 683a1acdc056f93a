//! Moving the bytes of one direction of a connection, readiness first.
//!
//! A [`Half`] moves bytes from a source socket to a sink socket through a
//! chunk borrowed from the worker's [`Pool`]: a pipe (zero-copy `splice`, the
//! default) or a byte buffer (`read`/`send`, kept to measure against). The
//! worker polls for readiness with io_uring and calls [`Half::pump`], which
//! makes non-blocking syscalls until one would block, so no io_uring op can
//! park a kernel io-wq thread on an idle socket.
//!
//! Invariants:
//! - A chunk is held only while it holds bytes in flight; an idle direction
//!   holds none, so an idle connection costs only its two sockets.
//! - Nothing is read while earlier bytes are undelivered (backpressure).
//! - End of file is forwarded as `shutdown(SHUT_WR)` only after every byte
//!   before it was delivered (correct half-close).

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::sys::{self, Moved};

/// How bytes move through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum RelayMode {
    /// `splice(2)` through a pooled pipe: the bytes never enter user space.
    Splice,
    /// `read(2)` / `send(2)` through a pooled user-space buffer.
    Copy,
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
            RelayMode::Splice => Chunk::Pipe(match self.pipes.pop() {
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

impl Half {
    #[cfg(test)]
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Move bytes until a syscall would block, the budget runs out, or the
    /// direction finishes.
    pub fn pump(
        &mut self,
        source: BorrowedFd<'_>,
        sink: BorrowedFd<'_>,
        pool: &mut Pool,
    ) -> Result<Wait, RelayError> {
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
                self.finished = true;
                // The peer may already be gone; its own direction reports
                // that, so a failed shutdown here changes nothing.
                let _ = socket2::SockRef::from(&sink).shutdown(Shutdown::Write);
                return Ok(Wait::Finished);
            }
            // A read that did not fill the chunk emptied the socket: waiting
            // for readiness now saves a read that would only say EAGAIN.
            if std::mem::take(&mut self.drained) || !self.fill(source, pool)? {
                self.release(pool);
                return Ok(Wait::SourceReadable);
            }
        }
        Ok(Wait::Yield)
    }

    /// Read once from the source into an empty chunk. False: would block.
    fn fill(&mut self, source: BorrowedFd<'_>, pool: &mut Pool) -> Result<bool, RelayError> {
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
        let mut half = Half::default();

        writer.write_all(b"hello, relay").expect("write");
        writer.shutdown(Shutdown::Write).expect("shutdown");
        let mut waits = Vec::new();
        for _ in 0..100 {
            let wait = half.pump(src.as_fd(), sink.as_fd(), &mut pool).expect("pump");
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
        let mut half = Half::default();
        let wait = half.pump(src.as_fd(), sink.as_fd(), &mut pool).expect("pump");
        assert_eq!(wait, Wait::SourceReadable);
        assert!(half.chunk.is_none());
        assert_eq!(pool.idle(), 1);
    }
}
