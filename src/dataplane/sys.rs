//! The data plane's only home for `unsafe`: raw syscalls the std library and
//! socket2 do not cover (splice, pipes, eventfd, CPU pinning) and pushing
//! entries onto an io_uring submission queue.
//!
//! Every function here takes and returns owned or borrowed fds (`OwnedFd`,
//! `BorrowedFd`), never a bare integer someone must remember to close, and
//! every `unsafe` block says why it is sound. The io_uring submission side
//! lives in `sys/ring.rs`, part of this module.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub mod fdpass;
mod ring;

pub use ring::{Buffers, Ring, Sends, timespec};

/// Outcome of a non-blocking transfer.
#[derive(Debug, PartialEq, Eq)]
pub enum Moved {
    /// This many bytes moved (never 0).
    Bytes(usize),
    /// The source reached end of file (orderly shutdown).
    Eof,
    /// Nothing could move now; wait for readiness.
    WouldBlock,
}

fn classify(ret: isize) -> io::Result<Moved> {
    match ret {
        0 => Ok(Moved::Eof),
        n if n > 0 => Ok(Moved::Bytes(n as usize)),
        _ => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock { Ok(Moved::WouldBlock) } else { Err(err) }
        }
    }
}

/// `splice(2)` up to `len` bytes from `from` to `to` without blocking.
/// One of the two must be a pipe.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<Moved> {
    let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    loop {
        // SAFETY: both fds are borrowed for the duration of the call, null
        // offsets are valid for pipes and sockets, and splice reads no
        // memory of ours.
        let ret = unsafe {
            libc::splice(
                from.as_raw_fd(),
                std::ptr::null_mut(),
                to.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                flags,
            )
        };
        if ret < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return classify(ret);
    }
}

/// `read(2)` into `buf` without blocking (the fd is O_NONBLOCK).
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Moved> {
    loop {
        // SAFETY: `buf` is a valid, writable slice for its whole length.
        let ret = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if ret < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return classify(ret);
    }
}

/// `recv(2)` with `MSG_PEEK` into `buf` without blocking: the bytes stay
/// in the socket for a later read.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Moved> {
    loop {
        // SAFETY: `buf` is a valid, writable slice for its whole length.
        let ret = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if ret < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return classify(ret);
    }
}

/// `send(2)` from `buf` without blocking and without SIGPIPE.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<Moved> {
    loop {
        // SAFETY: `buf` is a valid, readable slice for its whole length.
        let ret = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if ret < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if ret == 0 && !buf.is_empty() {
            return Ok(Moved::WouldBlock);
        }
        return classify(ret);
    }
}

/// A non-blocking pipe: `(read end, write end)`, resized to `size` bytes
/// when the kernel allows it (the default 64 KiB otherwise).
pub fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ takes an int argument; failure leaves the pipe
    // at its default size, which is still correct, only slower.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    Ok((r, w))
}

/// Capacity of a pipe in bytes.
pub fn pipe_capacity(fd: BorrowedFd<'_>) -> usize {
    // SAFETY: F_GETPIPE_SZ takes no argument and only reads kernel state.
    let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if ret > 0 { ret as usize } else { 65_536 }
}

/// A non-blocking eventfd, used to wake a worker's ring from another thread.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd succeeded, so `fd` is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Add one to an eventfd's counter (wakes whoever polls it).
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN) means
    // a wake-up is already pending, which is all we want.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Reset an eventfd's counter to zero.
pub fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut buf: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64; EAGAIN (already zero)
    // is fine.
    unsafe { libc::read(fd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
}

/// `RLIMIT_NOFILE` as (soft, hard), after raising the soft limit to the
/// hard one if it was lower (every fd the proxy may need is then usable).
/// The raise is best effort: if it fails, the limits as they are.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the live struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit only reads the live struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Pin the calling thread to one CPU. Best effort: a failure (e.g. a CPU
/// set restricted by a container) is returned for the caller to log.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bitmask; zeroed is the empty set, and
    // CPU_SET writes inside it for any cpu < CPU_SETSIZE (checked).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Own fd `fd`, inherited from the service manager (`$LISTEN_FDS`), if it
/// is open; it is made close-on-exec. For `systemd::listen_fds` only,
/// which calls it once per inherited fd number at start.
pub fn take_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_GETFD reads the fd's flags and touches no memory; it fails
    // with EBADF if the number is not open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return None;
    }
    // SAFETY: as above; sets FD_CLOEXEC on an open fd.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: the number is open (checked above) and was passed to this
    // process by its service manager for it to own: nothing else in the
    // process owns it, and it is taken once (LISTEN_FDS numbers, at start).
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The new fd of a successful accept completion (`result >= 0`).
pub fn accepted(result: i32) -> Option<OwnedFd> {
    // SAFETY: a non-negative accept result is a new fd that nothing else
    // owns.
    (result >= 0).then(|| unsafe { OwnedFd::from_raw_fd(result) })
}

/// Datagrams per `recvmmsg` / `sendmmsg` call.
pub const BATCH: usize = 16;
/// Room for the largest UDP payload (65 507 bytes over IPv4; 65 527 over
/// IPv6 without jumbograms), so nothing legal is ever truncated.
pub const DATAGRAM_BYTES: usize = 65_536;

/// Room for the ancillary data of one datagram (an `in_pktinfo`, or an
/// `in6_pktinfo`: `CMSG_SPACE` of either is at most 40 bytes).
const CONTROL_BYTES: usize = 64;

/// Reusable buffers for receiving up to [`BATCH`] datagrams in one call.
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    addrs: Vec<socket2::SockAddrStorage>,
    /// u64 words keep the control buffers aligned for `cmsghdr`.
    controls: Vec<[u64; CONTROL_BYTES / 8]>,
    lens: [usize; BATCH],
    addr_lens: [libc::socklen_t; BATCH],
    control_lens: [usize; BATCH],
    flags: [libc::c_int; BATCH],
}

/// One received datagram.
pub struct Datagram<'a> {
    pub from: Option<std::net::SocketAddr>,
    /// The address it was sent to (`IP_PKTINFO` / `IPV6_PKTINFO`, when
    /// enabled on the socket): a reply must come from it, so that conntrack can undo a
    /// REDIRECT; a wildcard-bound socket would otherwise pick another source.
    pub to: Option<std::net::IpAddr>,
    pub data: &'a [u8],
    /// The datagram was larger than the buffer (`MSG_TRUNC`).
    pub truncated: bool,
}

/// Ask the kernel for each datagram's destination address: `IP_PKTINFO`,
/// or `IPV6_RECVPKTINFO` on an IPv6 socket.
pub fn enable_pktinfo(fd: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    let (level, option) =
        if v6 { (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO) } else { (libc::IPPROTO_IP, libc::IP_PKTINFO) };
    set_int(fd, level, option, 1)
}

/// Set `fd`'s receive and send buffers to `bytes` past `net.core.rmem_max`
/// / `wmem_max` (`SO_RCVBUFFORCE`, `SO_SNDBUFFORCE`); needs CAP_NET_ADMIN,
/// and fails without it (then the caller asks within the limits).
pub fn force_buffer_sizes(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes)
}

fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

impl RecvBatch {
    pub fn new() -> Self {
        Self {
            bufs: (0..BATCH).map(|_| vec![0u8; DATAGRAM_BYTES].into_boxed_slice()).collect(),
            addrs: (0..BATCH).map(|_| socket2::SockAddrStorage::zeroed()).collect(),
            controls: vec![[0u64; CONTROL_BYTES / 8]; BATCH],
            lens: [0; BATCH],
            addr_lens: [0; BATCH],
            control_lens: [0; BATCH],
            flags: [0; BATCH],
        }
    }

    /// `recvmmsg(2)` without blocking: how many datagrams arrived (0 when
    /// none was waiting).
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.recv_up_to(fd, BATCH)
    }

    /// [`RecvBatch::recv`] of at most `max` datagrams (1 to [`BATCH`]).
    pub fn recv_up_to(&mut self, fd: BorrowedFd<'_>, max: usize) -> io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() })
            .collect();
        // SAFETY: mmsghdr is plain old data; it is fully set up below.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, m) in msgs.iter_mut().enumerate() {
            // SockAddrStorage is a transparent sockaddr_storage.
            m.msg_hdr.msg_name = (&mut self.addrs[i] as *mut socket2::SockAddrStorage).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<socket2::SockAddrStorage>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = self.controls[i].as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = CONTROL_BYTES as _;
        }
        loop {
            // SAFETY: every header points at a live buffer, iovec and
            // address slot owned by `self`/`iovs`, which outlive the call.
            let n = unsafe {
                libc::recvmmsg(
                    fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    max.clamp(1, BATCH) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(0),
                    _ => return Err(err),
                }
            }
            let n = n as usize;
            for (i, m) in msgs.iter().enumerate().take(n) {
                self.lens[i] = m.msg_len as usize;
                self.addr_lens[i] = m.msg_hdr.msg_namelen;
                self.control_lens[i] = m.msg_hdr.msg_controllen;
                self.flags[i] = m.msg_hdr.msg_flags;
            }
            return Ok(n);
        }
    }

    /// Datagram `i` of the last [`RecvBatch::recv`].
    pub fn get(&self, i: usize) -> Datagram<'_> {
        let len = self.lens[i].min(self.bufs[i].len());
        // SAFETY: the kernel wrote a valid address of `addr_lens[i]` bytes
        // into `addrs[i]` (0 bytes for a connected socket's datagram), and
        // copying it with `ptr::read` is sound: it is plain old data with
        // no destructor.
        let from = (self.addr_lens[i] > 0)
            .then(|| {
                unsafe { socket2::SockAddr::new(std::ptr::read(&self.addrs[i]), self.addr_lens[i]) }
                    .as_socket()
            })
            .flatten();
        Datagram {
            from,
            to: self.pktinfo(i),
            data: &self.bufs[i][..len],
            truncated: self.flags[i] & libc::MSG_TRUNC != 0,
        }
    }

    /// The destination of datagram `i`, from its `IP_PKTINFO` or
    /// `IPV6_PKTINFO`.
    fn pktinfo(&self, i: usize) -> Option<std::net::IpAddr> {
        // SAFETY: a msghdr describing exactly the control bytes the kernel
        // wrote for datagram `i`; the CMSG_* macros only walk inside them,
        // and `in_pktinfo` / `in6_pktinfo` is read unaligned from within
        // one cmsg whose level and type say which it is.
        unsafe {
            let mut hdr: libc::msghdr = std::mem::zeroed();
            hdr.msg_control = self.controls[i].as_ptr() as *mut _;
            hdr.msg_controllen = self.control_lens[i].min(CONTROL_BYTES) as _;
            let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                    let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    return Some(std::net::Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)).into());
                }
                if (*cmsg).cmsg_level == libc::IPPROTO_IPV6 && (*cmsg).cmsg_type == libc::IPV6_PKTINFO {
                    let info: libc::in6_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    return Some(std::net::Ipv6Addr::from(info.ipi6_addr.s6_addr).into());
                }
                cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
            }
            None
        }
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// `sendmmsg(2)` without blocking: each datagram to its own address, in
/// order, from `from` when given (an `IP_PKTINFO` or `IPV6_PKTINFO`
/// source, of the socket's family). Returns how
/// many were sent (the rest would block, or failed).
pub fn send_batch(
    fd: BorrowedFd<'_>,
    from: Option<std::net::IpAddr>,
    datagrams: &[(std::net::SocketAddr, &[u8])],
) -> io::Result<usize> {
    // The same source for every datagram of the batch: one control block.
    let mut control = [0u64; CONTROL_BYTES / 8];
    let control_len = match from {
        Some(std::net::IpAddr::V4(src)) => {
            // SAFETY: `control` is aligned and large enough for one cmsg
            // holding an in_pktinfo (CMSG_SPACE of it is at most 32 bytes).
            unsafe {
                let space = libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
                let mut hdr: libc::msghdr = std::mem::zeroed();
                hdr.msg_control = control.as_mut_ptr().cast();
                hdr.msg_controllen = space as _;
                let cmsg = libc::CMSG_FIRSTHDR(&hdr);
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr { s_addr: u32::from(src).to_be() },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                space
            }
        }
        Some(std::net::IpAddr::V6(src)) => {
            // SAFETY: `control` is aligned and large enough for one cmsg
            // holding an in6_pktinfo (CMSG_SPACE of it is 40 bytes).
            unsafe {
                let space = libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                let mut hdr: libc::msghdr = std::mem::zeroed();
                hdr.msg_control = control.as_mut_ptr().cast();
                hdr.msg_controllen = space as _;
                let cmsg = libc::CMSG_FIRSTHDR(&hdr);
                (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as _;
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr { s6_addr: src.octets() },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                space
            }
        }
        None => 0,
    };
    let mut sent = 0;
    for chunk in datagrams.chunks(BATCH) {
        let addrs: Vec<socket2::SockAddr> = chunk.iter().map(|(a, _)| socket2::SockAddr::from(*a)).collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(_, d)| libc::iovec { iov_base: d.as_ptr() as *mut _, iov_len: d.len() })
            .collect();
        // SAFETY: mmsghdr is plain old data; it is fully set up below.
        let mut msgs: Vec<libc::mmsghdr> = (0..chunk.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = addrs[i].as_ptr() as *mut _;
            m.msg_hdr.msg_namelen = addrs[i].len();
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            if control_len > 0 {
                m.msg_hdr.msg_control = control.as_mut_ptr().cast();
                m.msg_hdr.msg_controllen = control_len as _;
            }
        }
        // SAFETY: the headers point at addresses, iovecs, payloads and the
        // control block, which all live until the call returns; the kernel
        // only reads them.
        let n = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock || sent > 0 {
                return Ok(sent);
            }
            return Err(err);
        }
        sent += n as usize;
        if (n as usize) < chunk.len() {
            return Ok(sent);
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
    use std::os::fd::AsFd;
    use std::time::Duration;

    use super::*;

    /// The mechanics of IPV6_RECVPKTINFO / IPV6_PKTINFO on loopback: the
    /// address asked is read back, and a reply carrying it as its source
    /// is accepted by the kernel (a malformed cmsg fails with EINVAL). That
    /// the source is honoured is shown end to end by tests/ipv6_netns.rs
    /// (a NodePort asked on a node address the kernel would not choose).
    #[test]
    fn ipv6_pktinfo_reads_the_address_asked_and_a_reply_leaves_from_it() {
        let server = UdpSocket::bind("[::]:0").expect("bind [::]:0");
        server.set_nonblocking(true).expect("nonblocking");
        enable_pktinfo(server.as_fd(), true).expect("IPV6_RECVPKTINFO");
        let port = server.local_addr().expect("addr").port();
        let client = UdpSocket::bind("[::1]:0").expect("bind [::1]:0");
        client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        client.send_to(b"hello", (Ipv6Addr::LOCALHOST, port)).expect("send");
        let mut batch = RecvBatch::new();
        let mut n = 0;
        for _ in 0..500 {
            n = batch.recv(server.as_fd()).expect("recvmmsg");
            if n > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(n, 1, "the datagram did not arrive");
        let datagram = batch.get(0);
        assert_eq!(datagram.to, Some(Ipv6Addr::LOCALHOST.into()));
        assert_eq!(datagram.data, b"hello");
        let from = datagram.from.expect("a source address");
        let sent = send_batch(server.as_fd(), datagram.to, &[(from, b"back")]).expect("sendmmsg");
        assert_eq!(sent, 1);
        let mut buf = [0u8; 16];
        let (len, source) = client.recv_from(&mut buf).expect("the reply");
        assert_eq!((&buf[..len], source), (&b"back"[..], SocketAddr::from((Ipv6Addr::LOCALHOST, port))));
    }
}
