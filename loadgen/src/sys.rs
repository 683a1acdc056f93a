//! The only home of `unsafe` in loadgen: a small, owning io_uring wrapper.
//!
//! The kernel reads or writes a buffer long after the submitting call has
//! returned, so the memory of every in-flight operation must stay put. This
//! module enforces that itself instead of trusting callers:
//! - buffers live in an arena of `Box<[u8]>` owned by the [`Ring`]; the boxes
//!   never move (only the `Vec` of box pointers may grow) and are reused, not
//!   freed, until the ring is dropped;
//! - each buffer tracks in-flight readers (send) and a writer (recv), and
//!   `buf`/`buf_mut` refuse access that would race with the kernel;
//! - connect addresses are boxed and owned by the ring for its whole life;
//! - on drop the ring cancels everything and waits for the completions; if
//!   the kernel does not answer in time the arena is leaked, never freed
//!   under an in-flight operation.
//!
//! Operation ids carry a generation, so cancelling an operation that already
//! completed can never hit a newer one that reused its slot.

#![allow(unsafe_code)]

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue, types};
use socket2::{SockAddr, Socket};

/// A buffer in the ring's arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufId(u32);

/// A connect address owned by the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrId(u32);

/// A submitted operation, usable to cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpId(u64);

/// One finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The caller's tag given at submission.
    pub user: u64,
    /// The raw result: a count or fd when `>= 0`, `-errno` otherwise.
    pub result: i32,
    /// For a successful accept, the new connection.
    pub accepted: Option<OwnedFd>,
}

struct Buf {
    data: Box<[u8]>,
    readers: u32,
    writer: bool,
    free_pending: bool,
}

#[derive(Clone, Copy)]
enum Kind {
    Plain,
    Accept,
    /// The ring's own cancel requests; their completions are swallowed.
    Cancel,
}

struct OpRecord {
    user: u64,
    generation: u32,
    kind: Kind,
    buf: Option<(BufId, bool)>,
}

/// An io_uring instance with its own buffer arena and operation table.
pub struct Ring {
    ring: IoUring,
    bufs: Vec<Buf>,
    free_bufs: Vec<BufId>,
    // Boxed on purpose: the kernel holds pointers to these while the Vec
    // may grow and move its elements.
    #[allow(clippy::vec_box)]
    addrs: Vec<Box<SockAddr>>,
    ops: Vec<Option<OpRecord>>,
    free_ops: Vec<u32>,
    next_gen: u32,
    in_flight: usize,
}

impl Ring {
    /// A ring with `entries` submission slots and room for 4x completions.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let ring = IoUring::builder().setup_cqsize(entries * 4).build(entries)?;
        Ok(Ring {
            ring,
            bufs: Vec::new(),
            free_bufs: Vec::new(),
            addrs: Vec::new(),
            ops: Vec::new(),
            free_ops: Vec::new(),
            next_gen: 0,
            in_flight: 0,
        })
    }

    /// Operations submitted and not yet completed (including cancels).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// A zeroed buffer of `len` bytes, reusing a freed one of the same size.
    pub fn alloc_buf(&mut self, len: usize) -> BufId {
        if let Some(pos) = self.free_bufs.iter().rposition(|b| self.bufs[b.0 as usize].data.len() == len) {
            return self.free_bufs.swap_remove(pos);
        }
        self.bufs.push(Buf {
            data: vec![0u8; len].into_boxed_slice(),
            readers: 0,
            writer: false,
            free_pending: false,
        });
        BufId(self.bufs.len() as u32 - 1)
    }

    /// Returns a buffer to the arena once no operation uses it any more.
    pub fn free_buf(&mut self, id: BufId) {
        let b = &mut self.bufs[id.0 as usize];
        if b.readers == 0 && !b.writer {
            self.free_bufs.push(id);
        } else {
            b.free_pending = true;
        }
    }

    /// Read access; panics if the kernel is writing into the buffer.
    pub fn buf(&self, id: BufId) -> &[u8] {
        let b = &self.bufs[id.0 as usize];
        assert!(!b.writer, "buffer read while a recv is in flight");
        &b.data
    }

    /// Write access; panics if any operation uses the buffer.
    pub fn buf_mut(&mut self, id: BufId) -> &mut [u8] {
        let b = &mut self.bufs[id.0 as usize];
        assert!(b.readers == 0 && !b.writer, "buffer written while in flight");
        &mut b.data
    }

    /// Keeps `addr` alive for the ring's life for use by [`Ring::connect`].
    pub fn add_addr(&mut self, addr: SockAddr) -> AddrId {
        self.addrs.push(Box::new(addr));
        AddrId(self.addrs.len() as u32 - 1)
    }

    fn record(&mut self, user: u64, kind: Kind, buf: Option<(BufId, bool)>) -> u64 {
        self.next_gen = self.next_gen.wrapping_add(1);
        let generation = self.next_gen;
        let rec = OpRecord { user, generation, kind, buf };
        let idx = match self.free_ops.pop() {
            Some(i) => {
                self.ops[i as usize] = Some(rec);
                i
            }
            None => {
                self.ops.push(Some(rec));
                self.ops.len() as u32 - 1
            }
        };
        if let Some((id, writes)) = buf {
            let b = &mut self.bufs[id.0 as usize];
            if writes {
                b.writer = true;
            } else {
                b.readers += 1;
            }
        }
        self.in_flight += 1;
        (u64::from(generation) << 32) | u64::from(idx)
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every pointer inside `entry` refers to memory owned by
            // this ring (arena buffers, boxed addresses) that is neither moved
            // nor freed while the operation is in flight (see module docs), or
            // to a file the kernel pins itself once submitted.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn checked_range(&self, id: BufId, range: &Range<usize>) -> (*mut u8, u32) {
        let b = &self.bufs[id.0 as usize];
        assert!(range.start <= range.end && range.end <= b.data.len(), "range outside buffer");
        // The pointer is derived from the boxed slice, which never moves.
        let ptr = b.data.as_ptr().wrapping_add(range.start) as *mut u8;
        (ptr, (range.end - range.start) as u32)
    }

    /// Connects `fd` to a registered address.
    pub fn connect(&mut self, fd: &OwnedFd, addr: AddrId, user: u64) -> io::Result<OpId> {
        let a = &self.addrs[addr.0 as usize];
        let entry = opcode::Connect::new(types::Fd(fd.as_raw_fd()), a.as_ptr().cast(), a.len()).build();
        let ud = self.record(user, Kind::Plain, None);
        self.push(entry.user_data(ud))?;
        Ok(OpId(ud))
    }

    /// Sends `buf[range]` on `fd`.
    pub fn send(&mut self, fd: &OwnedFd, buf: BufId, range: Range<usize>, user: u64) -> io::Result<OpId> {
        assert!(!self.bufs[buf.0 as usize].writer, "send from a buffer being received into");
        let (ptr, len) = self.checked_range(buf, &range);
        let entry = opcode::Send::new(types::Fd(fd.as_raw_fd()), ptr, len).flags(libc::MSG_NOSIGNAL).build();
        let ud = self.record(user, Kind::Plain, Some((buf, false)));
        self.push(entry.user_data(ud))?;
        Ok(OpId(ud))
    }

    /// Receives into `buf[range]` from `fd`.
    pub fn recv(&mut self, fd: &OwnedFd, buf: BufId, range: Range<usize>, user: u64) -> io::Result<OpId> {
        let b = &self.bufs[buf.0 as usize];
        assert!(b.readers == 0 && !b.writer, "recv into a buffer in flight");
        let (ptr, len) = self.checked_range(buf, &range);
        let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), ptr, len).build();
        let ud = self.record(user, Kind::Plain, Some((buf, true)));
        self.push(entry.user_data(ud))?;
        Ok(OpId(ud))
    }

    /// Accepts one connection on a listening `fd`.
    pub fn accept(&mut self, fd: &OwnedFd, user: u64) -> io::Result<OpId> {
        let entry =
            opcode::Accept::new(types::Fd(fd.as_raw_fd()), std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC)
                .build();
        let ud = self.record(user, Kind::Accept, None);
        self.push(entry.user_data(ud))?;
        Ok(OpId(ud))
    }

    /// Asks the kernel to cancel `op`; harmless if it already finished.
    pub fn cancel(&mut self, op: OpId) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(op.0).build();
        let ud = self.record(0, Kind::Cancel, None);
        self.push(entry.user_data(ud))
    }

    /// Submits queued operations and waits for at least one completion or
    /// until `timeout` passes.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves every available completion into `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        let mut raw = Vec::new();
        raw.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for (ud, result) in raw {
            let idx = (ud & 0xffff_ffff) as usize;
            let generation = (ud >> 32) as u32;
            let Some(rec) = self.ops.get_mut(idx).and_then(|r| r.take_if(|r| r.generation == generation))
            else {
                continue;
            };
            self.free_ops.push(idx as u32);
            self.in_flight -= 1;
            if let Some((id, writes)) = rec.buf {
                let b = &mut self.bufs[id.0 as usize];
                if writes {
                    b.writer = false;
                } else {
                    b.readers -= 1;
                }
                if b.free_pending && b.readers == 0 && !b.writer {
                    b.free_pending = false;
                    self.free_bufs.push(id);
                }
            }
            let accepted = match rec.kind {
                Kind::Cancel => continue,
                // SAFETY: a successful accept returns a new descriptor that
                // nothing else owns; wrapping it once gives it a single owner.
                Kind::Accept if result >= 0 => Some(unsafe { OwnedFd::from_raw_fd(result) }),
                _ => None,
            };
            out.push(Completion { user: rec.user, result, accepted });
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build();
        let ud = self.record(0, Kind::Cancel, None);
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        if self.push(entry.user_data(ud)).is_ok() {
            while self.in_flight > 0 && Instant::now() < deadline {
                if self.wait(Duration::from_millis(50)).is_err() {
                    break;
                }
                self.drain(&mut done);
            }
        }
        if self.in_flight > 0 {
            // The kernel may still touch the arena: never free it.
            std::mem::forget(std::mem::take(&mut self.bufs));
            std::mem::forget(std::mem::take(&mut self.addrs));
        }
    }
}

/// Lets connect() pick the source port, so one source address can have far
/// more than 28k connections to distinct targets (IP_BIND_ADDRESS_NO_PORT).
pub fn set_bind_address_no_port(sock: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `sock` is a valid open socket for the duration of the call and
    // the option value points to a live c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn wait_one(ring: &mut Ring) -> Completion {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.is_empty() && Instant::now() < deadline {
            ring.wait(Duration::from_millis(100)).unwrap();
            ring.drain(&mut out);
        }
        out.pop().expect("a completion within 5 s")
    }

    #[test]
    fn ring_sends_and_receives_over_a_loopback_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        let fd = OwnedFd::from(ours);
        let mut ring = Ring::new(8).unwrap();
        let buf = ring.alloc_buf(5);
        ring.buf_mut(buf).copy_from_slice(b"hello");
        ring.send(&fd, buf, 0..5, 7).unwrap();
        let c = wait_one(&mut ring);
        assert_eq!((c.user, c.result), (7, 5));
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        peer.write_all(b"abc").unwrap();
        ring.recv(&fd, buf, 1..5, 8).unwrap();
        let c = wait_one(&mut ring);
        assert_eq!((c.user, c.result), (8, 3));
        assert_eq!(&ring.buf(buf)[..4], b"habc");
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn cancelling_a_pending_recv_completes_it_with_ecanceled() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        let fd = OwnedFd::from(ours);
        let mut ring = Ring::new(8).unwrap();
        let buf = ring.alloc_buf(16);
        let op = ring.recv(&fd, buf, 0..16, 1).unwrap();
        ring.free_buf(buf);
        ring.cancel(op).unwrap();
        let c = wait_one(&mut ring);
        assert_eq!((c.user, c.result), (1, -libc::ECANCELED));
        assert_eq!(ring.alloc_buf(16), buf, "the freed buffer is reused once idle");
    }

    #[test]
    #[should_panic(expected = "in flight")]
    fn writing_a_buffer_the_kernel_is_filling_panics() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        let fd = OwnedFd::from(ours);
        let mut ring = Ring::new(8).unwrap();
        let buf = ring.alloc_buf(16);
        ring.recv(&fd, buf, 0..16, 1).unwrap();
        ring.buf_mut(buf)[0] = 1;
    }
}
