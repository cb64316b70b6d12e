//! Socket diagnostics: the kernel's `sock_diag` dumps (handshakes under way, connections),
//! a listener's accept queue, and the filter that stops it queueing new clients.

use std::io;
use std::os::fd::AsRawFd;

use super::check;

/// Inodes of the TCP connections of this network namespace accepted on the listeners bound
/// to `locals` (their local port is one of theirs) and open (established, or closing with the
/// socket still held: not listening, not a handshake, not in time-wait), read with one
/// `sock_diag` dump per address family the listeners have (a dual-stack IPv6 listener's IPv4
/// clients are IPv6 sockets), which the kernel filters by state and port: only the cluster's
/// own connections are copied out, whatever else the host holds. The kernel still walks its
/// whole table of connections for each dump (some milliseconds on a large host): callers
/// read it sparingly (`master/observe.rs`).
pub(crate) fn tcp_connection_inodes(locals: &[std::net::SocketAddr]) -> io::Result<std::collections::HashSet<u64>> {
    // ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING: the states of a
    // connection a process still holds.
    const STATES: u32 = 1 << 1 | 1 << 4 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 11;
    let mut out = std::collections::HashSet::new();
    for (family, v4) in [(libc::AF_INET, true), (libc::AF_INET6, false)] {
        let ports: Vec<u16> = locals.iter().filter(|l| l.is_ipv4() == v4).map(|l| l.port()).collect();
        if !ports.is_empty() {
            diag_dump(family as u8, STATES, &ports, |msg| out.extend(DiagMsg::parse(msg).map(|m| m.inode)))?;
        }
    }
    Ok(out)
}

/// What the dumps use of one `inet_diag_msg`: family, state, timer, retrans (a byte each),
/// then `inet_diag_sockid` (sport and dport big-endian, src[16], dst[16], if, cookie[2] in
/// host order), expires, rqueue, wqueue, uid, inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DiagMsg {
    state: u8,
    sport: u16,
    cookie: u64,
    inode: u64,
}

impl DiagMsg {
    fn parse(msg: &[u8]) -> Option<DiagMsg> {
        let word = |at: usize| Some(u32::from_ne_bytes(msg.get(at..at + 4)?.try_into().ok()?));
        Some(DiagMsg {
            state: *msg.get(1)?,
            sport: u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]),
            cookie: u64::from(word(44)?) | u64::from(word(48)?) << 32,
            inode: u64::from(word(68)?),
        })
    }
}

/// The `sock_diag` filter (`INET_DIAG_REQ_BYTECODE`) that keeps the sockets whose local port
/// is one of `ports`: `sport == p` is `sport >= p && sport <= p`, and the alternatives are
/// chained as `ss` chains them (`a || b` is `a`, a jump over `b` when `a` holds, then `b`), so
/// that the kernel's check of the program (every jump lands on an instruction of the "yes"
/// chain, or just past the end to reject) accepts it.
fn local_port_filter(ports: &[u16]) -> Vec<u8> {
    const S_GE: u8 = 2;
    const S_LE: u8 = 3;
    const JMP: u8 = 1;
    // struct inet_diag_bc_op: code u8, yes u8, no u16; a port comparison is followed by one
    // whose `no` holds the port.
    let op = |code: u8, yes: u8, no: u16| -> [u8; 4] {
        let no = no.to_ne_bytes();
        [code, yes, no[0], no[1]]
    };
    let Some((&port, rest)) = ports.split_first() else { return Vec::new() };
    // 16 bytes: a failed comparison jumps past this expression and 4 more (the end, or the
    // jump below, for the next alternative).
    let mut out = Vec::with_capacity(20 * ports.len());
    out.extend(op(S_GE, 8, 20));
    out.extend(op(0, 0, port));
    out.extend(op(S_LE, 8, 12));
    out.extend(op(0, 0, port));
    if !rest.is_empty() {
        let others = local_port_filter(rest);
        out.extend(op(JMP, 4, others.len() as u16 + 4));
        out.extend(others);
    }
    out
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
        let ports: Vec<u16> = locals.iter().filter(|l| l.is_ipv4() == v4).map(|l| l.port()).collect();
        if ports.is_empty() {
            continue;
        }
        // Request socks are TCP_NEW_SYN_RECV (12) inside the kernel, TCP_SYN_RECV (3) in dumps.
        diag_dump(family as u8, 1 << 3 | 1 << 12, &ports, |msg| {
            let Some(msg) = DiagMsg::parse(msg) else { return };
            for (i, local) in locals.iter().enumerate() {
                if local.is_ipv4() == v4 && local.port() == msg.sport {
                    found[i].push(msg.cookie);
                }
            }
        })?;
    }
    Ok(found)
}

/// Dumps the TCP sockets of `family` in `states` (a bit per TCP state) whose local port is one
/// of `ports` over `NETLINK_SOCK_DIAG`, calling `each` with every `inet_diag_msg`.
fn diag_dump(family: u8, states: u32, ports: &[u16], mut each: impl FnMut(&[u8])) -> io::Result<()> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const HEADER: usize = 16; // struct nlmsghdr
    let socket = socket2::Socket::new(
        socket2::Domain::from(libc::AF_NETLINK),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )?;
    const BYTECODE: u16 = 1; // INET_DIAG_REQ_BYTECODE
    // nlmsghdr, then inet_diag_req_v2: family, protocol, ext, pad, states, and an all-zero
    // inet_diag_sockid (a dump matches every socket in `states`), then the filter as an
    // attribute (length, type, program).
    let filter = local_port_filter(ports);
    let len = HEADER + 56 + 4 + filter.len();
    let mut request = vec![0u8; HEADER + 56];
    request[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    request[HEADER] = family;
    request[HEADER + 1] = libc::IPPROTO_TCP as u8;
    request[HEADER + 4..HEADER + 8].copy_from_slice(&states.to_ne_bytes());
    request.extend(((4 + filter.len()) as u16).to_ne_bytes());
    request.extend(BYTECODE.to_ne_bytes());
    request.extend(&filter);
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

    use super::tcp_connection_inodes;
    use super::{DiagMsg, accept_queue_len, bpf, local_port_filter, pending_handshakes, stop_queueing};

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

    fn inode_of(fd: &impl std::os::fd::AsRawFd) -> u64 {
        crate::sys::inode(fd.as_raw_fd()).unwrap()
    }

    fn v4(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn listener() -> (std::net::TcpListener, u16) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    #[test]
    fn connections_are_dumped_for_the_ports_asked_for_only() {
        let ((a, pa), (b, pb)) = (listener(), listener());
        let clients: Vec<TcpStream> =
            [pa, pa, pb].iter().map(|p| TcpStream::connect(("127.0.0.1", *p)).unwrap()).collect();
        let accepted: Vec<TcpStream> = [&a, &a, &b].iter().map(|l| l.accept().unwrap().0).collect();
        let on_a: Vec<u64> = accepted[..2].iter().map(inode_of).collect();
        let on_b = inode_of(&accepted[2]);
        let clients: Vec<u64> = clients.iter().map(inode_of).collect();

        let got = tcp_connection_inodes(&[v4(pa)]).unwrap();
        assert!(on_a.iter().all(|i| got.contains(i)), "{on_a:?} in {got:?}");
        assert!(!got.contains(&on_b), "another port's connection");
        assert!(!clients.iter().any(|i| got.contains(i)), "the client ends have other local ports");
        assert!(!got.contains(&inode_of(&a)), "a listening socket is no connection");
        let both = tcp_connection_inodes(&[v4(pb), v4(pa)]).unwrap();
        assert!(on_a.iter().chain([&on_b]).all(|i| both.contains(i)), "{both:?}");
        assert!(tcp_connection_inodes(&[]).unwrap().is_empty());
        assert!(tcp_connection_inodes(&[SocketAddr::from(([0u16; 8], pa))]).unwrap().is_empty(), "IPv6 only");
        // Three ports, one of them unused: the chained program is accepted and still exact.
        let (_c, pc) = listener();
        let three = tcp_connection_inodes(&[v4(pc), v4(pa), v4(pb)]).unwrap();
        assert!(on_a.iter().chain([&on_b]).all(|i| three.contains(i)), "{three:?}");
    }

    #[test]
    fn the_port_filter_jumps_where_the_kernel_expects() {
        let one = local_port_filter(&[80]);
        assert_eq!(one.len(), 16);
        // sport >= 80, yes: next, no: 20 (past the end + 4: reject); the port; sport <= 80,
        // yes: the end, no: 12 (reject); the port.
        let port = 80u16.to_ne_bytes();
        let twenty = 20u16.to_ne_bytes();
        let twelve = 12u16.to_ne_bytes();
        assert_eq!(one[..8], [2, 8, twenty[0], twenty[1], 0, 0, port[0], port[1]]);
        assert_eq!(one[8..], [3, 8, twelve[0], twelve[1], 0, 0, port[0], port[1]]);
        let two = local_port_filter(&[80, 443]);
        assert_eq!(two.len(), 16 + 4 + 16);
        // After the first alternative holds, a jump over the second one.
        let over = 20u16.to_ne_bytes();
        assert_eq!(two[16..20], [1, 4, over[0], over[1]]);
    }

    #[test]
    fn a_diag_message_is_read_at_its_fields() {
        let mut msg = vec![0u8; 72];
        msg[1] = 1; // ESTABLISHED
        msg[4..6].copy_from_slice(&8080u16.to_be_bytes());
        msg[44..48].copy_from_slice(&7u32.to_ne_bytes());
        msg[48..52].copy_from_slice(&1u32.to_ne_bytes());
        msg[68..72].copy_from_slice(&123_456u32.to_ne_bytes());
        let parsed = DiagMsg::parse(&msg).unwrap();
        assert_eq!(parsed, DiagMsg { state: 1, sport: 8080, cookie: 7 | 1 << 32, inode: 123_456 });
        assert_eq!(DiagMsg::parse(&msg[..71]), None, "cut short");
    }
}
