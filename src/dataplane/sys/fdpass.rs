//! Passing open sockets between processes: one `sendmsg` / `recvmsg` on a
//! unix socket carrying bytes and `SCM_RIGHTS`, for the listener handover
//! (`crate::handover`). Safe signatures: fds go out borrowed and come back
//! owned; a received fd is owned the moment `recvmsg` returns, so a message
//! cut short (`MSG_CTRUNC`) or refused still closes every fd it brought.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The kernel's `SCM_MAX_FD`: the most fds one message may carry.
pub const MAX_FDS: usize = 253;

/// Room for the control message of [`MAX_FDS`] fds, in u64 words so it is
/// aligned for `cmsghdr`.
const CONTROL_WORDS: usize = (MAX_FDS * 4 + 64) / 8;

/// Send `data` with `fds` attached (`SCM_RIGHTS`), whole, as one message.
/// `data` must not be empty: a message of zero bytes carries no fds on a
/// stream socket, and is indistinguishable from end of file.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if data.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty message or too many fds"));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `control` is aligned, zeroed and at least `space` bytes
        // (MAX_FDS fds fit), so the first header and its data lie inside
        // it; the fds copied are borrowed, hence open, for this call.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), raw.len());
        }
    }
    loop {
        // SAFETY: every pointer in `msg` points to live memory of the sizes
        // given (iov into `data`, control into `control`) for this call.
        let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // A seqpacket message goes whole or not at all.
        if sent as usize != data.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "message sent in part"));
        }
        return Ok(());
    }
}

/// Receive one message into `buf`, with the fds it carries. `Ok((0, []))`
/// is end of file. A message whose fds did not all fit (`MSG_CTRUNC`) or
/// whose bytes did not (`MSG_TRUNC`) is an error; the fds that did arrive
/// are closed.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let got = loop {
        // SAFETY: the iov and control buffers are live and writable for the
        // sizes given; MSG_CMSG_CLOEXEC makes every received fd close-on-exec.
        let got = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break got as usize;
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen with well
    // formed headers; CMSG_FIRSTHDR/NXTHDR stay within it. Each SCM_RIGHTS
    // entry is a new fd installed in this process that nothing else owns,
    // so it is wrapped in an OwnedFd at once (read unaligned: CMSG_DATA
    // need not be aligned for c_int).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = data.offset_from(cmsg.cast::<u8>()) as usize;
                let n = ((*cmsg).cmsg_len as usize - header) / std::mem::size_of::<RawFd>();
                for i in 0..n {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "message or its fds truncated"));
    }
    Ok((got, fds))
}

/// The user id of the process at the other end of a connected unix socket
/// (`SO_PEERCRED`: as it was when it connected or listened).
pub fn peer_uid(sock: BorrowedFd<'_>) -> io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the live ucred it
    // is given, and the new length into `len`; the fd is borrowed, so open.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn pair() -> (socket2::Socket, socket2::Socket) {
        socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).unwrap()
    }

    #[test]
    fn a_socket_sent_arrives_as_the_same_socket() {
        let (a, b) = pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send_with_fds(a.as_fd(), b"one", &[listener.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"one");
        assert_eq!(fds.len(), 1);
        let got = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), listener.local_addr().unwrap());
    }

    #[test]
    fn a_message_without_fds_and_end_of_file() {
        let (a, b) = pair();
        send_with_fds(a.as_fd(), b"x", &[]).unwrap();
        drop(a);
        let mut buf = [0u8; 4];
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf).unwrap().0, 1);
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (0, 0));
    }

    #[test]
    fn a_message_too_long_for_the_buffer_is_refused_and_its_fds_closed() {
        let (a, b) = pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send_with_fds(a.as_fd(), b"too long", &[listener.as_fd()]).unwrap();
        let mut buf = [0u8; 2];
        assert!(recv_with_fds(b.as_fd(), &mut buf).is_err());
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_user() {
        let (a, _b) = pair();
        assert_eq!(peer_uid(a.as_fd()).unwrap(), effective_uid());
    }
}
