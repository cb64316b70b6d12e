//! Descriptors: the channel a worker inherits, accepting, sending and receiving datagrams with
//! descriptors attached (SCM_RIGHTS), registering with the reactor.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::check;

/// Reads an integer socket option.
fn sockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes passed.
    check(unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) })?;
    Ok(value)
}

/// Why an inherited fd cannot be used as the worker's IPC channel.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum ChannelFdError {
    #[error("fd {fd} is not open ({source})")]
    NotOpen { fd: RawFd, source: io::Error },
    #[error("fd {fd} is not a socket ({source})")]
    NotSocket { fd: RawFd, source: io::Error },
    #[error("fd {fd} is not an AF_UNIX socket (domain {domain})")]
    WrongDomain { fd: RawFd, domain: libc::c_int },
    #[error("fd {fd} is not a SOCK_SEQPACKET socket (type {ty})")]
    WrongType { fd: RawFd, ty: libc::c_int },
}

/// Checks that `fd` is an open AF_UNIX SOCK_SEQPACKET socket, takes ownership of it and marks
/// it close-on-exec so that programs the worker starts do not inherit it.
///
/// Must be called at most once per fd, before anything else claims it.
pub(crate) fn adopt_channel_fd(fd: RawFd) -> Result<OwnedFd, ChannelFdError> {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    let flags =
        check(unsafe { libc::fcntl(fd, libc::F_GETFD) }).map_err(|source| ChannelFdError::NotOpen { fd, source })?;
    let domain = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)
        .map_err(|source| ChannelFdError::NotSocket { fd, source })?;
    if domain != libc::AF_UNIX {
        return Err(ChannelFdError::WrongDomain { fd, domain });
    }
    let ty =
        sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|source| ChannelFdError::NotSocket { fd, source })?;
    if ty != libc::SOCK_SEQPACKET {
        return Err(ChannelFdError::WrongType { fd, ty });
    }
    // SAFETY: the fd is open; FD_CLOEXEC and O_NONBLOCK change nothing but how exec and I/O
    // treat it (tokio needs it non-blocking).
    unsafe {
        check(libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC))
            .and_then(|_| check(libc::fcntl(fd, libc::F_GETFL)))
            .and_then(|fl| check(libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK)))
            .map_err(|source| ChannelFdError::NotOpen { fd, source })?;
    }
    // SAFETY: the fd is open and, per this function's contract, owned by no one else: it was
    // inherited from the master for this purpose.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Errors of [`accept`] that concern one connection (it was reset or aborted before it was
/// taken), not the listener: the next one may be taken at once.
pub(crate) fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Accepts a connection as non-blocking and close-on-exec in one call. Workers rely on it:
/// the descriptors they get are ready for tokio without another syscall.
pub(crate) fn accept(listener: &socket2::Socket) -> io::Result<(socket2::Socket, socket2::SockAddr)> {
    listener.accept4(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
}

/// The inode of whatever `fd` refers to now, or `None` if it is not open. Used to notice that
/// a connection handed to user code was closed (its number may be reused, its inode is not).
pub(crate) fn inode(fd: RawFd) -> Option<u64> {
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `stat` only; a closed fd number is just EBADF.
    let rc = unsafe { libc::fstat(fd, &mut stat) };
    (rc == 0).then_some(stat.st_ino)
}

/// Sends one datagram without waiting, from code that cannot await (the panic hook).
///
/// Fails with `WouldBlock` when the socket buffer is full.
pub(crate) fn send_now(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of `data.len()` bytes.
    let n = unsafe {
        libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Takes ownership of `fd`, inherited from a service manager, if it is a socket; `None` (and
/// the descriptor left alone) otherwise.
pub(crate) fn adopt_inherited_socket(fd: RawFd) -> Option<socket2::Socket> {
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `stat` only.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    // SAFETY: the service manager passed this descriptor to this process for it to own, and
    // nothing else in the process has taken it (it is read once, at start).
    Some(unsafe { <socket2::Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Registers a socket the caller owns with tokio's reactor.
pub(crate) fn watch(socket: socket2::Socket) -> io::Result<tokio::io::unix::AsyncFd<socket2::Socket>> {
    register(socket, tokio::io::Interest::READABLE)
}

/// A descriptor the caller owns, registered with the reactor for `interest` only.
pub(crate) fn register<T: Owns>(io: T, interest: tokio::io::Interest) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `T` owns its descriptor (see `Owns`): it stays open, and `as_raw_fd` keeps
    // returning it, until the `AsyncFd` (which owns the `T`) is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(io, interest) }.map_err(|e| e.into_parts().1)
}

/// Types that own the one descriptor they return from `as_raw_fd`, for their whole life.
pub(crate) trait Owns: AsRawFd {}

impl Owns for OwnedFd {}

impl Owns for socket2::Socket {}

/// Sends one datagram with `fds` attached as SCM_RIGHTS, without blocking (`MSG_DONTWAIT`):
/// fails with `WouldBlock` when the socket buffer is full.
pub(crate) fn send_with_fds(socket: BorrowedFd<'_>, data: &[u8], fds: &[impl AsFd]) -> io::Result<()> {
    if fds.len() > SCM_MAX_FD {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many file descriptors for one message"));
    }
    // Aligned room for one SCM_RIGHTS header and the most descriptors the kernel takes.
    let mut control = [0u64; (SCM_MAX_FD * 4 + 64) / 8];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: zeroed msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = (fds.len() * std::mem::size_of::<RawFd>()) as u32;
        // SAFETY: CMSG_* compute sizes and pointers inside `control`, which is large enough and
        // 8-byte aligned; we write exactly CMSG_LEN(payload) bytes into it.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(payload) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            let dst = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                dst.add(i).write_unaligned(fd.as_fd().as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `iov`, `data` and `control`, all alive for the call.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// One datagram taken off a socket by [`recv_with_fds`].
pub(crate) struct Received {
    /// Bytes written to the data buffer.
    pub(crate) len: usize,
    /// The datagram was longer than the buffer (`MSG_TRUNC`): the rest is lost.
    pub(crate) truncated: bool,
    /// The kernel cut the ancillary data (`MSG_CTRUNC`): more descriptors came than fit, or this
    /// process's descriptor table is full. `fds` holds the ones that were installed.
    pub(crate) fds_cut: bool,
    /// Descriptors passed as SCM_RIGHTS, close-on-exec, in the order they were sent.
    pub(crate) fds: Vec<OwnedFd>,
    /// The level and type of an ancillary message other than SCM_RIGHTS, if one came.
    pub(crate) unexpected: Option<(libc::c_int, libc::c_int)>,
}

/// Receives one datagram without blocking (`MSG_DONTWAIT`), with room for up to `max_fds`
/// passed descriptors: fails with `WouldBlock` when nothing is queued. A plain `recv` would
/// make the kernel close passed descriptors, so every receive on a channel goes through here.
pub(crate) fn recv_with_fds(socket: BorrowedFd<'_>, data: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let max_fds = max_fds.min(SCM_MAX_FD);
    let mut control = [0u64; (SCM_MAX_FD * 4 + 64) / 8];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: zeroed msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size; it is at most the size of `control`.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<RawFd>()) as u32) } as _;
    let flags = libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    // SAFETY: `msg` points at `iov`, `data` and `control`, all alive for the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut received = Received {
        len: n as usize,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_cut: msg.msg_flags & libc::MSG_CTRUNC != 0,
        fds: Vec::new(),
        unexpected: None,
    };
    // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed cmsg headers into
    // `control`; CMSG_FIRSTHDR/NXTHDR walk only within them. Each SCM_RIGHTS payload holds
    // descriptors just installed in this process, owned by nobody else: we take them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let (level, ty) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let src = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    received.fds.push(OwnedFd::from_raw_fd(src.add(i).read_unaligned()));
                }
            } else {
                received.unexpected = Some((level, ty));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(received)
}

/// The most descriptors the kernel passes in one message (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;
