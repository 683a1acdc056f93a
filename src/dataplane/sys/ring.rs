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
