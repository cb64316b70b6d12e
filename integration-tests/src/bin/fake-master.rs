//! Test program: a stand-in for a new master in an upgrade, put where the binary on disk is. It
//! speaks the successor's side of the handshake (README, "Upgrading the master") with the
//! protocol version `FAKE_VERSION` and appends what it receives to `FAKE_RECORD`, one JSON line
//! per message (`msg`) with the number of descriptors that came with it (`fds`); then it waits (at most 60 s)
//! for the old master to close the channel, and exits.

use std::io::Write;
use std::os::fd::RawFd;

fn main() {
    let fd: RawFd = std::env::var("CLUSTER_UPGRADE_FD").expect("CLUSTER_UPGRADE_FD").parse().expect("an fd number");
    let version: u64 = std::env::var("FAKE_VERSION").ok().and_then(|v| v.parse().ok()).unwrap_or(99);
    let record = std::env::var("FAKE_RECORD").expect("FAKE_RECORD");
    // The descriptor comes non-blocking (as the master's own end is): this program blocks.
    // SAFETY: fcntl on an inherited descriptor; no memory is passed.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) & !libc::O_NONBLOCK) };
    let hello = format!(r#"{{"t":"hello","version":{version},"pid":{}}}"#, std::process::id());
    // SAFETY: `hello` is valid for reads of its length.
    let sent = unsafe { libc::send(fd, hello.as_ptr().cast(), hello.len(), 0) };
    assert!(sent > 0, "send hello: {}", std::io::Error::last_os_error());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let (data, fds) = recv(fd);
        if data.is_empty() && fds == 0 {
            return; // the old master closed the channel
        }
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&record).expect("open FAKE_RECORD");
        // The message is JSON itself.
        writeln!(out, r#"{{"fds":{fds},"msg":{}}}"#, String::from_utf8_lossy(&data)).unwrap();
    }
}

/// One datagram: its bytes and how many descriptors came with it (closed at once).
fn recv(fd: RawFd) -> (Vec<u8>, usize) {
    let mut data = vec![0u8; 65536];
    let mut control = vec![0u8; 4096];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    // SAFETY: `msg` describes buffers valid for writes of their lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n <= 0 {
        return (Vec::new(), 0);
    }
    data.truncate(n as usize);
    let mut fds = 0;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, within its length.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let first = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                for i in 0..len / std::mem::size_of::<libc::c_int>() {
                    libc::close(*first.add(i));
                    fds += 1;
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    (data, fds)
}
