//! The io_uring submission side of `sys`: a ring whose pushes never fail
//! for lack of room, and the ownership of datagrams being sent. Part of the
//! data plane's only home for `unsafe`; every block says why it is sound.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{IoUring, opcode, squeue, types};

/// A single-issuer io_uring whose pushes never fail for lack of room.
///
/// An entry that finds the submission queue full is first made room for by
/// a submit; if the kernel refuses that for now (`EBUSY`/`EAGAIN`: the
/// completion queue overflowed, and completions must be reaped first), the
/// entry waits in order in a backlog that [`Ring::submit_and_wait`] feeds to
/// the kernel before anything else. A linked pair (a poll and its timeout)
/// is pushed as one group, so a full queue never splits it.
pub struct Ring {
    ring: IoUring,
    backlog: VecDeque<Group>,
}

/// One entry, or a poll linked to its timeout.
type Group = (squeue::Entry, Option<squeue::Entry>);

fn busy(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN))
}

impl Ring {
    /// A ring of `entries` submissions and four times as many completions.
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        Ok(Self { ring, backlog: VecDeque::new() })
    }

    /// Entries waiting for room in the submission queue.
    #[cfg(test)]
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    /// Push a group if the queue has room for all of it.
    ///
    /// # Safety
    /// Every buffer, timespec or address the entries point to must stay
    /// valid and unmoved until the kernel is done with them.
    unsafe fn try_push(&mut self, group: &Group) -> bool {
        let mut sq = self.ring.submission();
        let need = 1 + usize::from(group.1.is_some());
        if sq.capacity() - sq.len() < need {
            return false;
        }
        // SAFETY: room for the whole group was checked above; the memory
        // contract is forwarded from this function's.
        unsafe {
            let _ = sq.push(&group.0);
            if let Some(second) = &group.1 {
                let _ = sq.push(second);
            }
        }
        true
    }

    /// # Safety
    /// As [`Ring::try_push`]: what the entries point to outlives them.
    unsafe fn push(&mut self, group: Group) -> io::Result<()> {
        if self.backlog.is_empty() {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.try_push(&group) } {
                return Ok(());
            }
            match self.ring.submit() {
                // SAFETY: as above.
                Ok(_) if unsafe { self.try_push(&group) } => return Ok(()),
                Ok(_) => {}
                Err(e) if busy(&e) || e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        self.backlog.push_back(group);
        Ok(())
    }

    /// Move backlogged entries into the submission queue while they fit.
    fn flush(&mut self) {
        while let Some(group) = self.backlog.pop_front() {
            // SAFETY: every backlogged group was pushed under `push`'s
            // contract, which holds until the kernel has completed it.
            if !unsafe { self.try_push(&group) } {
                self.backlog.push_front(group);
                return;
            }
        }
    }

    /// The one place that submits: hand every queued and backlogged entry
    /// to the kernel, and, when `wait` and nothing is left behind, sleep
    /// until at least one completion is ready. A refusal for now (`EBUSY`)
    /// returns at once, so the caller reaps completions and comes back.
    pub fn submit_and_wait(&mut self, wait: bool) -> io::Result<()> {
        loop {
            self.flush();
            let want = usize::from(wait && self.backlog.is_empty());
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if busy(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
            if self.backlog.is_empty() {
                return Ok(());
            }
        }
    }

    /// Take every ready completion: `(user_data, result, flags)`.
    pub fn completions(&mut self, out: &mut Vec<(u64, i32, u32)>) {
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
    }

    /// Poll `fd` for `events` (one shot).
    pub fn poll(&mut self, fd: BorrowedFd<'_>, events: i16, user_data: u64) -> io::Result<()> {
        let entry =
            opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), events as u32).build().user_data(user_data);
        // SAFETY: a poll points at no memory of ours (the kernel holds its
        // own reference to the file).
        unsafe { self.push((entry, None)) }
    }

    /// Accept on `fd` until cancelled (multishot), non-blocking and
    /// close-on-exec sockets.
    pub fn accept_multi(&mut self, fd: BorrowedFd<'_>, user_data: u64) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(types::Fd(fd.as_raw_fd()))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data);
        // SAFETY: a multishot accept without an address points at no memory.
        unsafe { self.push((entry, None)) }
    }

    /// Cancel the op whose user data is `target`.
    pub fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target).build().user_data(user_data);
        // SAFETY: a cancel points at no memory of ours.
        unsafe { self.push((entry, None)) }
    }

    /// Complete after `ts`.
    pub fn timeout(&mut self, ts: &'static types::Timespec, user_data: u64) -> io::Result<()> {
        let entry = opcode::Timeout::new(ts).build().user_data(user_data);
        // SAFETY: the timespec is 'static.
        unsafe { self.push((entry, None)) }
    }

    /// Poll `fd` for `events`, cancelled by a linked timeout after `ts`.
    /// Both complete: the poll with its result or `-ECANCELED`, the timeout
    /// with `-ETIME` or `-ECANCELED`.
    pub fn poll_with_timeout(
        &mut self,
        fd: BorrowedFd<'_>,
        events: i16,
        user_data: u64,
        ts: &'static types::Timespec,
        timeout_user_data: u64,
    ) -> io::Result<()> {
        let poll = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), events as u32)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(user_data);
        let limit = opcode::LinkTimeout::new(ts).build().user_data(timeout_user_data);
        // SAFETY: a poll points at no memory of ours and the timespec is
        // 'static; the pair is pushed as one group.
        unsafe { self.push((poll, Some(limit))) }
    }
}

/// A timespec for timeouts handed to the kernel by pointer. Leaked on
/// purpose: it must outlive every op that may use it, and a worker makes
/// a handful, once, at start.
pub fn timespec(d: std::time::Duration) -> &'static types::Timespec {
    Box::leak(Box::new(types::Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos())))
}

/// Datagrams on their way out through io_uring `SEND`s: the bytes are
/// owned here until their completion is taken back with [`Sends::done`].
///
/// The ring must be dropped before this (declare it first in the owning
/// struct): closing the ring ends every op that could still read the bytes.
pub struct Sends<T> {
    pending: slab::Slab<(T, Vec<u8>)>,
}

impl<T> Default for Sends<T> {
    fn default() -> Self {
        Self { pending: slab::Slab::new() }
    }
}

impl<T> Sends<T> {
    /// Send `data` on `fd`; its completion carries `user_data(key)`, where
    /// `key` identifies it for [`Sends::done`].
    pub fn send(
        &mut self,
        ring: &mut Ring,
        fd: BorrowedFd<'_>,
        tag: T,
        data: Vec<u8>,
        user_data: impl FnOnce(usize) -> u64,
    ) -> io::Result<()> {
        let key = self.pending.insert((tag, data));
        let bytes = &self.pending[key].1;
        let entry = opcode::Send::new(types::Fd(fd.as_raw_fd()), bytes.as_ptr(), bytes.len() as u32)
            .build()
            .user_data(user_data(key));
        // SAFETY: the bytes live on the heap in `self.pending[key]` until
        // `done(key)`, which the caller calls only on this send's
        // completion (however long it waits in the ring's backlog); moving
        // the slab entry does not move the Vec's buffer.
        unsafe { ring.push((entry, None)) }
    }

    /// The tag and bytes of a completed send.
    pub fn done(&mut self, key: usize) -> Option<(T, Vec<u8>)> {
        self.pending.try_remove(key)
    }
}

/// What a provided buffer is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BufState {
    /// In the ring: the kernel may write into it at any time.
    Ring,
    /// Filled by a receive and handed to us: the kernel does not touch it.
    Held,
    /// A `SEND` reads from it until its completion.
    Sending,
}

/// The kernel's `struct io_uring_buf`: one entry of a provided-buffer ring.
/// Entry 0's `resv` field is the ring's tail, which the kernel reads.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`): `count` buffers of
/// `size` bytes, registered as buffer group `group` of one [`Ring`]. A
/// multishot receive with buffer select takes one only when data arrives,
/// so an idle socket holds none.
///
/// Every buffer is in one of three states ([`BufState`]), and every move
/// between them is checked here, so safe code can never hand the kernel a
/// buffer it is writing into, nor give back one a send still reads.
///
/// The ring must be dropped before this (declare it first in the owning
/// struct): closing the ring ends every op that could touch the memory.
pub struct Buffers {
    ring: std::ptr::NonNull<RawBuf>,
    ring_layout: std::alloc::Layout,
    memory: std::ptr::NonNull<u8>,
    memory_layout: std::alloc::Layout,
    size: u32,
    group: u16,
    /// Our copy of the tail; the kernel's is entry 0's `resv`.
    tail: u16,
    state: Vec<BufState>,
    /// Buffers out of the ring (held or sending).
    out: usize,
}

const PAGE: usize = 4096;

impl Buffers {
    /// `count` (a power of two, at most 32768) buffers of `size` bytes each,
    /// registered with `ring` as group `group`, every one in the ring.
    pub fn register(ring: &mut Ring, count: u16, size: u32, group: u16) -> io::Result<Self> {
        use std::alloc::{Layout, alloc_zeroed};
        if !count.is_power_of_two() || count > 32768 || size == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
        let ring_layout = Layout::from_size_align(usize::from(count) * std::mem::size_of::<RawBuf>(), PAGE)
            .map_err(invalid)?;
        let memory_layout =
            Layout::from_size_align(usize::from(count) * size as usize, PAGE).map_err(invalid)?;
        // SAFETY: both layouts have a non-zero size (count and size > 0).
        let (ring_ptr, memory_ptr) = unsafe { (alloc_zeroed(ring_layout), alloc_zeroed(memory_layout)) };
        let (Some(ring_mem), Some(memory)) =
            (std::ptr::NonNull::new(ring_ptr.cast::<RawBuf>()), std::ptr::NonNull::new(memory_ptr))
        else {
            // SAFETY: a non-null pointer here came from alloc_zeroed with
            // that very layout, and is freed once.
            unsafe {
                if !ring_ptr.is_null() {
                    std::alloc::dealloc(ring_ptr, ring_layout);
                }
                if !memory_ptr.is_null() {
                    std::alloc::dealloc(memory_ptr, memory_layout);
                }
            }
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        };
        let mut buffers = Self {
            ring: ring_mem,
            ring_layout,
            memory,
            memory_layout,
            size,
            group,
            tail: 0,
            state: vec![BufState::Held; usize::from(count)],
            out: usize::from(count),
        };
        for bid in 0..count {
            buffers.give_back(bid);
        }
        // SAFETY: the ring memory is page aligned, `count` entries long and
        // initialised; it and the buffers it points to are freed only when
        // `buffers` drops, after the ring (the owner declares the ring
        // first), so the kernel never sees freed memory.
        unsafe {
            ring.ring.submitter().register_buf_ring_with_flags(ring_ptr as u64, count, group, 0)?;
        }
        Ok(buffers)
    }

    /// The buffer group to name in a receive.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Bytes in each buffer: a receive that filled one moved this many.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Buffers out of the ring now (held by connections, or being sent).
    pub fn out(&self) -> usize {
        self.out
    }

    /// A receive's completion handed us buffer `bid`. False if it was not
    /// in the ring (a kernel or bookkeeping bug; nothing changes).
    pub fn received(&mut self, bid: u16) -> bool {
        match self.state.get_mut(usize::from(bid)) {
            Some(state @ BufState::Ring) => {
                *state = BufState::Held;
                self.out += 1;
                true
            }
            _ => false,
        }
    }

    /// Put held buffer `bid` back in the ring for the kernel to fill. A
    /// buffer that is not held (in the ring, or still being sent) is left
    /// alone: false.
    pub fn give_back(&mut self, bid: u16) -> bool {
        let count = self.state.len();
        match self.state.get_mut(usize::from(bid)) {
            Some(state @ BufState::Held) => *state = BufState::Ring,
            _ => return false,
        }
        self.out -= 1;
        let slot = usize::from(self.tail) & (count - 1);
        let addr = self.memory.as_ptr() as u64 + u64::from(bid) * u64::from(self.size);
        // SAFETY: `slot < count`, inside the ring allocation. The kernel
        // reads only the entries between its head and the published tail,
        // and this one is at the tail, so nobody reads it concurrently. The
        // fields are written through raw pointers so that no reference
        // covers entry 0's `resv`, the tail the kernel reads.
        unsafe {
            let entry = self.ring.as_ptr().add(slot);
            std::ptr::addr_of_mut!((*entry).addr).write(addr);
            std::ptr::addr_of_mut!((*entry).len).write(self.size);
            std::ptr::addr_of_mut!((*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: entry 0's `resv` is the ring's tail (a u16, aligned as
        // one, inside the allocation). The kernel loads it with acquire;
        // the release store publishes the entry written above before it.
        unsafe {
            let tail =
                std::ptr::addr_of_mut!((*self.ring.as_ptr()).resv).cast::<std::sync::atomic::AtomicU16>();
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
        true
    }

    /// Send bytes `start..end` of held buffer `bid` on `fd`; the buffer is
    /// ours until [`Buffers::sent`] is called on this send's completion.
    /// False (nothing submitted) if it is not held or the range is outside.
    pub fn send(
        &mut self,
        ring: &mut Ring,
        fd: BorrowedFd<'_>,
        bid: u16,
        range: std::ops::Range<u32>,
        user_data: u64,
    ) -> io::Result<bool> {
        let Some(state) = self.state.get_mut(usize::from(bid)) else { return Ok(false) };
        if *state != BufState::Held || range.start >= range.end || range.end > self.size {
            return Ok(false);
        }
        *state = BufState::Sending;
        // SAFETY: bid < count and range.end <= size: inside the allocation.
        let ptr =
            unsafe { self.memory.as_ptr().add(usize::from(bid) * self.size as usize + range.start as usize) };
        let entry = opcode::Send::new(types::Fd(fd.as_raw_fd()), ptr, range.end - range.start)
            .build()
            .user_data(user_data);
        // SAFETY: the bytes stay allocated until `self` drops, after the
        // ring; the buffer is `Sending`, so it is neither given back to the
        // kernel (which would overwrite it) nor sent again until `sent`.
        unsafe { ring.push((entry, None)) }?;
        Ok(true)
    }

    /// The send from `bid` completed: the buffer is held again.
    pub fn sent(&mut self, bid: u16) {
        if let Some(state @ BufState::Sending) = self.state.get_mut(usize::from(bid)) {
            *state = BufState::Held;
        }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: both were allocated with these layouts in `register`, and
        // the ring that used them was dropped first (see the type's doc).
        unsafe {
            std::alloc::dealloc(self.ring.as_ptr().cast(), self.ring_layout);
            std::alloc::dealloc(self.memory.as_ptr(), self.memory_layout);
        }
    }
}

impl Ring {
    /// Receive once on `fd` into one buffer of `group`, which the kernel
    /// picks when data arrives (one shot, not multishot: a receive takes at
    /// most one buffer, so a direction holds no more buffers than it armed
    /// receives for; a multishot drains the whole socket queue into free
    /// buffers until a cancel lands).
    pub fn recv_select(&mut self, fd: BorrowedFd<'_>, group: u16, user_data: u64) -> io::Result<()> {
        let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), std::ptr::null_mut(), 0)
            .buf_group(group)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data);
        // SAFETY: with buffer select and no address of ours, the kernel
        // writes only into the group's registered buffers, which `Buffers`
        // keeps allocated until after the ring.
        unsafe { self.push((entry, None)) }
    }
}
