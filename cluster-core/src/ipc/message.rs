//! The bytes on the wire between master and workers.
//!
//! Each message is one `SOCK_SEQPACKET` datagram: a one-byte tag, then the fields of that message
//! in a fixed order, big-endian. Decoding checks every length: a short message, trailing bytes,
//! an unknown tag or a file descriptor count that does not match the message is a
//! [`ProtocolError`], never a panic or a guess.
//!
//! The two directions have their own types ([`ToMaster`], [`ToWorker`]), so a message sent the
//! wrong way is an unknown tag for the receiver. Those types are what decoding gives; every
//! message is written by its function in [`encode`](super::encode), from borrowed parts. `Hello` keeps tag 1 and its layout forever, so
//! that any two builds can at least agree that they disagree on [`PROTOCOL_VERSION`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::OwnedFd;

use bytes::{Buf, Bytes};

/// Version of this protocol; sent by a worker in its first message.
pub(crate) const PROTOCOL_VERSION: u16 = 6;

/// Largest datagram either side sends or accepts.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;

/// Largest user message. Larger than one datagram, a message is sent in fragments and
/// reassembled; over this, sending fails with `SendError::TooLarge`.
pub const MAX_USER_MESSAGE: usize = 16 * 1024 * 1024;

/// Most connections (and so file descriptors) carried by one `NewConn` message.
pub(crate) const MAX_FDS: usize = 64;

/// Identifies a listening socket owned by the master.
pub(crate) type ListenKey = u32;

/// Identifies one connection handed from the master to a worker.
pub(crate) type ConnId = u64;

/// A malformed or unexpected message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// A datagram with no bytes at all.
    #[error("empty message")]
    Empty,
    /// The first byte names no message of this protocol.
    #[error("unknown message tag {0:#04x}")]
    UnknownTag(u8),
    /// The message ended before all of its fields.
    #[error("{message} message is truncated: needs {needed} more bytes")]
    Short {
        /// The message being decoded.
        message: &'static str,
        /// How many more bytes the next field needed.
        needed: usize,
    },
    /// Bytes left over after the last field.
    #[error("{message} message has {extra} trailing bytes")]
    Trailing {
        /// The message being decoded.
        message: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// The kernel cut the datagram (MSG_TRUNC): it was larger than the largest message (64 KiB).
    #[error("message larger than {MAX_MESSAGE} bytes (MSG_TRUNC)")]
    Truncated,
    /// The kernel cut the ancillary data (MSG_CTRUNC): too many file descriptors.
    #[error("ancillary data truncated (MSG_CTRUNC): more than {MAX_FDS} file descriptors")]
    AncillaryTruncated,
    /// Ancillary data other than SCM_RIGHTS.
    #[error("unexpected ancillary data (level {level}, type {ty})")]
    UnexpectedAncillary {
        /// `cmsg_level`.
        level: i32,
        /// `cmsg_type`.
        ty: i32,
    },
    /// The number of passed file descriptors does not match the message.
    #[error("{message} message carries {got} file descriptors, expected {expected}")]
    FdCount {
        /// The message being decoded.
        message: &'static str,
        /// File descriptors received.
        got: usize,
        /// File descriptors the message calls for.
        expected: usize,
    },
    /// An address family byte other than 4 or 6.
    #[error("bad address family {0}")]
    AddressFamily(u8),
    /// A count field larger than the protocol allows.
    #[error("{message} message lists {count} items, at most {max} allowed")]
    TooMany {
        /// The message being decoded.
        message: &'static str,
        /// The count on the wire.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Fragments of a user message that do not add up.
    #[error("bad user message fragment: {0}")]
    Fragment(&'static str),
    /// A listen request for an unknown kind of socket.
    #[error("bad endpoint kind {0}")]
    EndpointKind(u8),
    /// The peer speaks another version of the protocol.
    #[error("protocol version mismatch: peer speaks v{peer}, this build speaks v{PROTOCOL_VERSION}")]
    Version {
        /// The peer's version.
        peer: u16,
    },
    /// A worker's first message was not `Hello`.
    #[error("first message must be hello, got {0}")]
    NotHello(&'static str),
}

/// What a worker asks the master to listen on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Endpoint {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    /// A Unix stream socket at `path`, with file permissions `mode` if given.
    Unix {
        path: std::path::PathBuf,
        mode: Option<u32>,
    },
}

impl Endpoint {
    /// Port-0 binds of a worker are told apart by their order (see `Listen::index`).
    pub(crate) fn is_port_zero(&self) -> bool {
        matches!(self, Endpoint::Tcp(a) | Endpoint::Udp(a) if a.port() == 0)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp {a}"),
            Endpoint::Udp(a) => write!(f, "udp {a}"),
            Endpoint::Unix { path, .. } => write!(f, "unix {}", path.display()),
        }
    }
}

/// Messages from a worker to the master.
#[derive(Debug)]
pub(crate) enum ToMaster {
    /// First message of every worker ("online"). Its layout never changes, so that any two
    /// builds can tell they disagree; `pid` is the sender's view of itself (for debugging).
    Hello {
        version: u16,
        #[allow(dead_code)]
        pid: u32,
    },
    /// Asks the master for a listening socket (Node's `queryServer`). `index` tells apart
    /// several port-0 binds of one worker.
    Listen { req: u32, endpoint: Endpoint, index: u32 },
    /// The worker now accepts connections for `key`.
    Listening { key: ListenKey },
    /// The worker closed its listener for `key`.
    Unlisten { key: ListenKey },
    /// The worker owns these connections now; the master may close its copies. `closed`:
    /// how many of its earlier connections it has noticed closed since it last said (only
    /// when closes are counted; a prompt report under churn, at no extra message).
    Accepted { ids: Vec<ConnId>, closed: u32 },
    /// The worker will not serve these connections; the master hands them to another worker.
    Refused { ids: Vec<ConnId> },
    /// Connections the worker had acknowledged but not handed to user code when it closed the
    /// listener for `key`: it gives them back, one file descriptor each (the master closed its
    /// copies on acknowledgement).
    Returned { key: ListenKey, conns: Vec<NewConn> },
    /// The worker could not take these connections (its file descriptor table is full: the
    /// kernel cut the `NewConn`); the master hands them to others and gives it a rest.
    Busy { ids: Vec<ConnId> },
    /// The worker is about to exit (sent from the panic hook).
    Exiting { reason: String },
    /// Application payload for the master (`to` = 0), or for another process (relayed):
    /// worker `to`, the agent ([`AGENT`]) or every worker ([`ALL_WORKERS`]). `call` is 0, a
    /// request id, or a request id with [`REPLY`] set (see [`Call`]).
    User { to: u32, call: u32, data: Bytes },
    /// First fragment of a user message of `total` bytes.
    UserStart { to: u32, call: u32, total: u32, data: Bytes },
    /// Next fragment of the user message being sent.
    UserMore(Bytes),
    /// Proof of life, sent periodically from inside the worker's runtime.
    Heartbeat,
    /// The application says it is ready to serve (with `wait_ready`, the only readiness signal).
    Ready,
    /// `count` more of the connections this worker accepted are closed (sent, batched, only
    /// when the balancer or a connection cap needs it).
    Closed { count: u32 },
    /// The worker got SIGTERM or SIGINT from outside (a service manager signalling the whole
    /// group, an operator): it keeps serving until the master retires it.
    StopAsked,
}

/// Result of a listen request: the key and bound address (none for Unix sockets) and, for a
/// UDP socket, the socket itself; or an errno.
pub(crate) type ListenResult = Result<Bound, i32>;

/// A socket the master bound for a worker.
#[derive(Debug)]
pub(crate) struct Bound {
    pub(crate) key: ListenKey,
    pub(crate) addr: Option<SocketAddr>,
    /// The shared socket itself, for sockets the workers use directly (UDP).
    pub(crate) fd: Option<OwnedFd>,
}

/// Messages from the master to a worker.
#[derive(Debug)]
pub(crate) enum ToWorker {
    /// Answer to [`ToMaster::Listen`].
    ListenReply { req: u32, result: ListenResult },
    /// New client connections for listener `key`, one file descriptor each, already
    /// non-blocking (accepted with SOCK_NONBLOCK).
    NewConn { key: ListenKey, conns: Vec<NewConn> },
    /// Stop accepting, finish open connections, exit.
    Disconnect,
    /// Application payload from the master (`from` = 0) or relayed from another process
    /// (worker `from`, or the agent). `call` as in [`ToMaster::User`].
    User { from: u32, call: u32, data: Bytes },
    /// First fragment of a user message of `total` bytes.
    UserStart { from: u32, call: u32, total: u32, data: Bytes },
    /// Next fragment of the user message being received.
    UserMore(Bytes),
    /// The fate of the oldest message this process sent to another process and that the
    /// master has not reported on yet: handed to the recipient, or not (it is not running).
    Relayed { delivered: bool },
    /// The worker's metrics segment (`metrics/segment.rs`), `words` long, its descriptor
    /// attached: the first message a worker gets, with the feature `metrics`.
    Metrics { words: u32, fd: OwnedFd },
}

/// Wire address of the agent process in user messages.
pub(crate) const AGENT: u32 = u32::MAX;
/// Wire address meaning "every worker but the sender".
pub(crate) const ALL_WORKERS: u32 = u32::MAX - 1;
/// Bit of `call` that marks a reply (the rest is the request id).
pub(crate) const REPLY: u32 = 1 << 31;

/// One connection of a [`ToWorker::NewConn`] message.
#[derive(Debug)]
pub(crate) struct NewConn {
    pub(crate) id: ConnId,
    /// `None` for a Unix socket peer.
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) fd: OwnedFd,
}

pub(crate) mod tag {
    pub(crate) const HELLO: u8 = 0x01;
    pub(crate) const LISTEN: u8 = 0x02;
    pub(crate) const LISTENING: u8 = 0x03;
    pub(crate) const UNLISTEN: u8 = 0x04;
    pub(crate) const ACCEPTED: u8 = 0x05;
    pub(crate) const REFUSED: u8 = 0x06;
    pub(crate) const EXITING: u8 = 0x07;
    pub(crate) const USER_TO_MASTER: u8 = 0x08;
    pub(crate) const HEARTBEAT: u8 = 0x09;
    pub(crate) const READY: u8 = 0x0a;
    pub(crate) const USER_START_TO_MASTER: u8 = 0x0b;
    pub(crate) const USER_MORE_TO_MASTER: u8 = 0x0c;
    pub(crate) const CLOSED: u8 = 0x0d;
    pub(crate) const RETURNED: u8 = 0x0e;
    pub(crate) const BUSY: u8 = 0x0f;
    pub(crate) const STOP_ASKED: u8 = 0x10;

    pub(crate) const LISTEN_REPLY: u8 = 0x81;
    pub(crate) const NEWCONN: u8 = 0x82;
    pub(crate) const DISCONNECT: u8 = 0x83;
    pub(crate) const USER_TO_WORKER: u8 = 0x84;
    pub(crate) const USER_START_TO_WORKER: u8 = 0x85;
    pub(crate) const USER_MORE_TO_WORKER: u8 = 0x86;
    pub(crate) const RELAYED: u8 = 0x87;
    pub(crate) const METRICS: u8 = 0x88;
}

impl ToMaster {
    /// Short name for logs and errors.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Listen { .. } => "listen",
            Self::Listening { .. } => "listening",
            Self::Unlisten { .. } => "unlisten",
            Self::Accepted { .. } => "accepted",
            Self::Refused { .. } => "refused",
            Self::Returned { .. } => "returned",
            Self::Busy { .. } => "busy",
            Self::Exiting { .. } => "exiting",
            Self::User { .. } => "user",
            Self::UserStart { .. } => "user start",
            Self::UserMore(_) => "user more",
            Self::Heartbeat => "heartbeat",
            Self::Ready => "ready",
            Self::Closed { .. } => "closed",
            Self::StopAsked => "stop asked",
        }
    }

    /// Decodes one datagram. Only `Returned` carries file descriptors.
    pub(crate) fn decode(mut buf: Bytes, fds: Vec<OwnedFd>) -> Result<Self, ProtocolError> {
        if buf.is_empty() {
            return Err(ProtocolError::Empty);
        }
        let t = buf.get_u8();
        let mut r = Reader { buf, message: "" };
        let msg = match t {
            tag::HELLO => {
                r.message = "hello";
                Self::Hello { version: r.u16()?, pid: r.u32()? }
            }
            tag::LISTEN => {
                r.message = "listen";
                Self::Listen { req: r.u32()?, endpoint: r.endpoint()?, index: r.u32()? }
            }
            tag::LISTENING => {
                r.message = "listening";
                Self::Listening { key: r.u32()? }
            }
            tag::UNLISTEN => {
                r.message = "unlisten";
                Self::Unlisten { key: r.u32()? }
            }
            tag::ACCEPTED => {
                r.message = "accepted";
                Self::Accepted { closed: r.u32()?, ids: r.ids()? }
            }
            tag::REFUSED => {
                r.message = "refused";
                Self::Refused { ids: r.ids()? }
            }
            tag::RETURNED => {
                r.message = "returned";
                let (key, conns) = r.conns(fds)?;
                return Ok(Self::Returned { key, conns });
            }
            tag::BUSY => {
                r.message = "busy";
                Self::Busy { ids: r.ids()? }
            }
            tag::EXITING => {
                r.message = "exiting";
                let rest = r.rest();
                Self::Exiting { reason: String::from_utf8_lossy(&rest).into_owned() }
            }
            tag::USER_TO_MASTER => {
                r.message = "user";
                Self::User { to: r.u32()?, call: r.u32()?, data: r.rest() }
            }
            tag::USER_START_TO_MASTER => {
                r.message = "user start";
                Self::UserStart { to: r.u32()?, call: r.u32()?, total: r.u32()?, data: r.rest() }
            }
            tag::USER_MORE_TO_MASTER => {
                r.message = "user more";
                Self::UserMore(r.rest())
            }
            tag::HEARTBEAT => {
                r.message = "heartbeat";
                Self::Heartbeat
            }
            tag::READY => {
                r.message = "ready";
                Self::Ready
            }
            tag::STOP_ASKED => {
                r.message = "stop asked";
                Self::StopAsked
            }
            tag::CLOSED => {
                r.message = "closed";
                Self::Closed { count: r.u32()? }
            }
            other => return Err(ProtocolError::UnknownTag(other)),
        };
        r.finish()?;
        expect_fds(msg.name(), fds.len(), 0)?;
        Ok(msg)
    }
}

impl ToWorker {
    /// Short name for logs and errors.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::ListenReply { .. } => "listen reply",
            Self::NewConn { .. } => "newconn",
            Self::Disconnect => "disconnect",
            Self::User { .. } => "user",
            Self::UserStart { .. } => "user start",
            Self::UserMore(_) => "user more",
            Self::Relayed { .. } => "relayed",
            Self::Metrics { .. } => "metrics",
        }
    }

    /// Decodes one datagram, taking ownership of the file descriptors that came with it.
    pub(crate) fn decode(mut buf: Bytes, fds: Vec<OwnedFd>) -> Result<Self, ProtocolError> {
        if buf.is_empty() {
            return Err(ProtocolError::Empty);
        }
        let t = buf.get_u8();
        let mut r = Reader { buf, message: "" };
        let msg = match t {
            tag::LISTEN_REPLY => {
                r.message = "listen reply";
                let req = r.u32()?;
                let result = match r.u8()? {
                    0 => {
                        let key = r.u32()?;
                        let addr = r.opt_addr()?;
                        let with_fd = r.u8()? != 0;
                        r.finish()?;
                        expect_fds("listen reply", fds.len(), usize::from(with_fd))?;
                        Ok(Bound { key, addr, fd: fds.into_iter().next() })
                    }
                    _ => {
                        let errno = r.i32()?;
                        r.finish()?;
                        expect_fds("listen reply", fds.len(), 0)?;
                        Err(errno)
                    }
                };
                return Ok(Self::ListenReply { req, result });
            }
            tag::NEWCONN => {
                r.message = "newconn";
                let (key, conns) = r.conns(fds)?;
                return Ok(Self::NewConn { key, conns });
            }
            tag::DISCONNECT => {
                r.message = "disconnect";
                Self::Disconnect
            }
            tag::USER_TO_WORKER => {
                r.message = "user";
                Self::User { from: r.u32()?, call: r.u32()?, data: r.rest() }
            }
            tag::USER_START_TO_WORKER => {
                r.message = "user start";
                Self::UserStart { from: r.u32()?, call: r.u32()?, total: r.u32()?, data: r.rest() }
            }
            tag::USER_MORE_TO_WORKER => {
                r.message = "user more";
                Self::UserMore(r.rest())
            }
            tag::RELAYED => {
                r.message = "relayed";
                Self::Relayed { delivered: r.u8()? != 0 }
            }
            tag::METRICS => {
                r.message = "metrics";
                let words = r.u32()?;
                r.finish()?;
                expect_fds("metrics", fds.len(), 1)?;
                return Ok(Self::Metrics { words, fd: fds.into_iter().next().expect("one fd") });
            }
            other => return Err(ProtocolError::UnknownTag(other)),
        };
        r.finish()?;
        expect_fds(msg.name(), fds.len(), 0)?;
        Ok(msg)
    }
}

/// The connection ids of a `NewConn` whose file descriptors the kernel could not all install
/// (MSG_CTRUNC: the receiver's descriptor table is full), so the worker can hand them back.
pub(crate) fn newconn_ids(buf: &Bytes) -> Result<Vec<ConnId>, ProtocolError> {
    let mut r = Reader { buf: buf.clone(), message: "newconn" };
    if r.u8()? != tag::NEWCONN {
        return Err(ProtocolError::AncillaryTruncated);
    }
    r.u32()?;
    let count = r.count()?;
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        ids.push(r.u64()?);
        r.opt_addr()?;
    }
    r.finish()?;
    Ok(ids)
}

/// The tags of user messages in one direction.
#[derive(Clone, Copy)]
pub(crate) struct UserTags {
    pub(super) single: u8,
    pub(super) start: u8,
    pub(super) more: u8,
}

pub(crate) const USER_TO_MASTER: UserTags =
    UserTags { single: tag::USER_TO_MASTER, start: tag::USER_START_TO_MASTER, more: tag::USER_MORE_TO_MASTER };
pub(crate) const USER_TO_WORKER: UserTags =
    UserTags { single: tag::USER_TO_WORKER, start: tag::USER_START_TO_WORKER, more: tag::USER_MORE_TO_WORKER };

/// Bytes a user message's header takes in the first datagram (tag, peer, call, total).
pub(crate) const USER_HEADER: usize = 13;

fn expect_fds(message: &'static str, got: usize, expected: usize) -> Result<(), ProtocolError> {
    if got == expected { Ok(()) } else { Err(ProtocolError::FdCount { message, got, expected }) }
}

/// A bounds-checked cursor over one message.
struct Reader {
    buf: Bytes,
    message: &'static str,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), ProtocolError> {
        if self.buf.remaining() < n {
            Err(ProtocolError::Short { message: self.message, needed: n - self.buf.remaining() })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn i32(&mut self) -> Result<i32, ProtocolError> {
        self.need(4)?;
        Ok(self.buf.get_i32())
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn count(&mut self) -> Result<usize, ProtocolError> {
        let count = usize::from(self.u16()?);
        if count > MAX_FDS {
            return Err(ProtocolError::TooMany { message: self.message, count, max: MAX_FDS });
        }
        Ok(count)
    }
    fn ids(&mut self) -> Result<Vec<ConnId>, ProtocolError> {
        let count = self.count()?;
        (0..count).map(|_| self.u64()).collect()
    }
    /// The rest of a `newconn` or `returned`: the listener key, a count, then that many
    /// (id, peer) entries, one per file descriptor in `fds`.
    fn conns(mut self, fds: Vec<OwnedFd>) -> Result<(ListenKey, Vec<NewConn>), ProtocolError> {
        let key = self.u32()?;
        let count = self.count()?;
        expect_fds(self.message, fds.len(), count)?;
        let mut conns = Vec::with_capacity(count);
        for fd in fds {
            conns.push(NewConn { id: self.u64()?, peer: self.opt_addr()?, fd });
        }
        self.finish()?;
        Ok((key, conns))
    }
    fn addr(&mut self) -> Result<SocketAddr, ProtocolError> {
        match self.u8()? {
            4 => {
                self.need(6)?;
                let mut ip = [0; 4];
                self.buf.copy_to_slice(&mut ip);
                Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), self.buf.get_u16()))
            }
            6 => {
                self.need(26)?;
                let mut ip = [0; 16];
                self.buf.copy_to_slice(&mut ip);
                let port = self.buf.get_u16();
                let flowinfo = self.buf.get_u32();
                let scope = self.buf.get_u32();
                Ok(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flowinfo, scope)))
            }
            other => Err(ProtocolError::AddressFamily(other)),
        }
    }
    fn opt_addr(&mut self) -> Result<Option<SocketAddr>, ProtocolError> {
        if self.buf.first() == Some(&0) {
            self.buf.advance(1);
            return Ok(None);
        }
        self.addr().map(Some)
    }
    fn endpoint(&mut self) -> Result<Endpoint, ProtocolError> {
        use std::os::unix::ffi::OsStrExt;
        match self.u8()? {
            1 => Ok(Endpoint::Tcp(self.addr()?)),
            2 => Ok(Endpoint::Udp(self.addr()?)),
            3 => {
                let mode = Some(self.u32()?).filter(|m| *m != u32::MAX);
                let len = usize::from(self.u16()?);
                self.need(len)?;
                let path = self.buf.split_to(len);
                Ok(Endpoint::Unix { path: std::ffi::OsStr::from_bytes(&path).into(), mode })
            }
            other => Err(ProtocolError::EndpointKind(other)),
        }
    }
    fn rest(&mut self) -> Bytes {
        self.buf.split_off(0)
    }
    fn finish(self) -> Result<(), ProtocolError> {
        match self.buf.remaining() {
            0 => Ok(()),
            extra => Err(ProtocolError::Trailing { message: self.message, extra }),
        }
    }
}
