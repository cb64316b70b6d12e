//! Socket diagnostics: the kernel's `sock_diag` dumps (handshakes under way, connections),
//! a listener's accept queue, and the filter that stops it queueing new clients.

use std::io;
use std::os::fd::AsRawFd;

use super::check;

/// Inodes of every TCP connection of this network namespace that is established or closing
/// (not listening, not a handshake), read with one `sock_diag` dump per address family.
pub(crate) fn tcp_connection_inodes() -> io::Result<std::collections::HashSet<u64>> {
    // ESTABLISHED .. CLOSING (1..=11) except LISTEN (10).
    const STATES: u32 = 0b1111_1111_1110 & !(1 << 10);
    let mut out = std::collections::HashSet::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        diag_dump(family as u8, STATES, |msg| {
            // inet_diag_msg: 4 bytes, inet_diag_sockid (48), expires, rqueue, wqueue, uid,
            // then the inode.
            if let Some(inode) = msg.get(68..72) {
                out.insert(u64::from(u32::from_ne_bytes(inode.try_into().expect("4 bytes"))));
            }
        })?;
    }
    Ok(out)
}

/// One classic BPF instruction.
const fn bpf(code: u32, jt: u8, jf: u8, k: u32) -> socket2::SockFilter {
    socket2::SockFilter::new(code as u16, jt, jf, k)
}

/// Makes a TCP listening socket drop every SYN that would start a new handshake, while the
/// connections already in its accept queue stay there to be accepted and the handshakes
/// already under way complete (their ACK gets through) and join that queue. Clients that
/// arrive after this retry their SYN; by then the socket is closed and they are refused (or,
/// in a `SO_REUSEPORT` group, go to another member). Used to drain a queue without the race
/// between "it is empty" and closing it; see [`pending_handshakes`] for the ones under way.
///
/// A TCP socket filter sees the segment from its TCP header on: byte 13 holds the flags. The
/// connections accepted from here on inherit the filter, which costs them nothing: they
/// drop the SYNs an established connection never needs.
pub(crate) fn stop_queueing(listener: &socket2::Socket) -> io::Result<()> {
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    let drop_syn = [
        bpf(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 13),
        bpf(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0, 0, SYN | ACK),
        bpf(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, SYN),
        bpf(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
        bpf(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
    ];
    listener.attach_filter(&drop_syn)
}

/// How many completed connections wait in a TCP listening socket's accept queue (for a
/// listener, `TCP_INFO`'s `tcpi_unacked` is the queue length).
pub(crate) fn accept_queue_len(listener: &socket2::Socket) -> io::Result<u32> {
    // SAFETY: an all-zero `tcp_info` is valid; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes; the kernel writes at most `len` bytes.
    check(unsafe {
        libc::getsockopt(listener.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len)
    })?;
    Ok(info.tcpi_unacked)
}

/// The handshakes under way (SYN received, SYN-ACK sent, the client's ACK not yet in)
/// towards the ports of the TCP listeners bound to `locals`, one list per listener, each
/// handshake named by its kernel cookie, read with one `sock_diag` netlink dump per address
/// family. A listening socket does not count them anywhere; once its SYNs are dropped
/// ([`stop_queueing`]) no new one starts, and each one that is gone has become a connection in
/// an accept queue (or timed out). The members of a `SO_REUSEPORT` group share the port, so
/// their handshakes are all listed. A handshake has the family of its listener (IPv4 clients
/// of a dual-stack IPv6 socket included).
pub(crate) fn pending_handshakes(locals: &[std::net::SocketAddr]) -> io::Result<Vec<Vec<u64>>> {
    let mut found = vec![Vec::new(); locals.len()];
    for (family, v4) in [(libc::AF_INET, true), (libc::AF_INET6, false)] {
        if !locals.iter().any(|l| l.is_ipv4() == v4) {
            continue;
        }
        // Request socks are TCP_NEW_SYN_RECV (12) inside the kernel, TCP_SYN_RECV (3) in dumps.
        diag_dump(family as u8, 1 << 3 | 1 << 12, |msg| {
            // inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid: sport (big
            // endian), dport, src[16], dst[16], if, cookie[2] (host order).
            if msg.len() < 52 {
                return;
            }
            let port = u16::from_be_bytes([msg[4], msg[5]]);
            let half = |at: usize| u64::from(u32::from_ne_bytes(msg[at..at + 4].try_into().expect("4 bytes")));
            for (i, local) in locals.iter().enumerate() {
                if local.is_ipv4() == v4 && local.port() == port {
                    found[i].push(half(44) | half(48) << 32);
                }
            }
        })?;
    }
    Ok(found)
}

/// Dumps the TCP sockets of `family` in `states` (a bit per TCP state) over
/// `NETLINK_SOCK_DIAG`, calling `each` with every `inet_diag_msg`.
fn diag_dump(family: u8, states: u32, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const HEADER: usize = 16; // struct nlmsghdr
    let socket = socket2::Socket::new(
        socket2::Domain::from(libc::AF_NETLINK),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )?;
    // nlmsghdr, then inet_diag_req_v2: family, protocol, ext, pad, states, and an all-zero
    // inet_diag_sockid (a dump matches every socket in `states`).
    let mut request = [0u8; HEADER + 56];
    request[0..4].copy_from_slice(&((HEADER + 56) as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    request[HEADER] = family;
    request[HEADER + 1] = libc::IPPROTO_TCP as u8;
    request[HEADER + 4..HEADER + 8].copy_from_slice(&states.to_ne_bytes());
    socket.send(&request)?;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = io::Read::read(&mut &socket, &mut buf)?;
        let mut at = 0;
        while at + HEADER <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < HEADER || at + len > n {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "sock_diag: truncated message"));
            }
            let body = &buf[at + HEADER..at + len];
            match i32::from(kind) {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    let code = body.get(..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                    return Err(if code < 0 {
                        io::Error::from_raw_os_error(-code)
                    } else {
                        io::Error::new(io::ErrorKind::InvalidData, "sock_diag: bad error message")
                    });
                }
                _ if kind == SOCK_DIAG_BY_FAMILY => each(body),
                _ => {}
            }
            at += (len + 3) & !3;
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sock_diag: dump ended early"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{SocketAddr, TcpStream};
    use std::time::{Duration, Instant};

    use socket2::{Domain, Socket, Type};

    use super::{accept_queue_len, bpf, pending_handshakes, stop_queueing};

    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_listener_that_stopped_queueing_keeps_its_queue_completes_handshakes_and_lets_no_one_new_in() {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        listener.listen(16).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let queued: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(accept_queue_len(&listener).unwrap(), 3);

        // Hold one handshake open: the listener drops the client's final ACK (any segment
        // with the ACK flag), so the client is connected and the server side is not.
        let drop_acks = [
            bpf(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 13),
            bpf(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, 0, 1, 0x10),
            bpf(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
            bpf(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
        ];
        listener.attach_filter(&drop_acks).unwrap();
        let mut halfway = TcpStream::connect(addr).unwrap();
        assert_eq!(pending_handshakes(&[addr]).unwrap()[0].len(), 1);
        // One dump serves several listeners, each getting its own.
        let other = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        other.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        other.listen(16).unwrap();
        let other_addr = other.local_addr().unwrap().as_socket().unwrap();
        let lists = pending_handshakes(&[other_addr, addr]).unwrap();
        assert_eq!((lists[0].len(), lists[1].len()), (0, 1));
        assert_eq!(accept_queue_len(&listener).unwrap(), 3);

        stop_queueing(&listener).unwrap();
        // The handshake under way completes with the client's next segment and joins the queue.
        halfway.write_all(b"x").unwrap();
        eventually("the held handshake to complete", || accept_queue_len(&listener).unwrap() == 4);
        assert_eq!(pending_handshakes(&[addr]).unwrap(), [Vec::<u64>::new()]);
        // A new SYN is dropped: no handshake starts, the client waits for a retry.
        let late = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(late.is_err(), "a client got in after stop_queueing");
        assert_eq!(pending_handshakes(&[addr]).unwrap(), [Vec::<u64>::new()]);
        assert_eq!(accept_queue_len(&listener).unwrap(), 4);

        for _ in 0..queued.len() + 1 {
            crate::sys::accept(&listener).unwrap();
        }
        assert_eq!(accept_queue_len(&listener).unwrap(), 0);
    }
}
