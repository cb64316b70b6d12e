//! The master/worker channel: one `SOCK_SEQPACKET` socket pair per worker.
//!
//! [`message`] defines the bytes; this module moves them, with the file descriptors that ride
//! along as SCM_RIGHTS ancillary data. Every receive passes an ancillary buffer (a plain `recv`
//! would make the kernel close passed descriptors), and a datagram or ancillary block the
//! kernel had to cut (MSG_TRUNC / MSG_CTRUNC) is a protocol error, never a partial message.
//!
//! A channel is registered with the reactor for readability only. Each datagram one side
//! reads frees buffer space on the other side's socket, and the kernel reports that as
//! writability: registered for it, the master would be woken each time a worker reads a
//! `newconn`, and a worker each time the master reads an acknowledgement, for nothing.
//! Sends do not wait for room in the normal case; the rare send that finds the buffer full
//! registers a duplicate of the socket for writability for as long as it waits
//! ([`Channel::send_with_fds`], [`Channel::poll_send`]).

#[doc(hidden)]
pub mod bench;
#[cfg(test)]
mod codec_tests;
pub(crate) mod encode;
pub(crate) mod message;
#[cfg(test)]
mod prop_tests;
mod reassembly;

pub(crate) use reassembly::{Reassembly, Whole};

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub use message::ProtocolError;
use message::{MAX_FDS, MAX_MESSAGE, USER_HEADER, UserTags};

/// For sends that carry no file descriptors.
pub(crate) const NO_FDS: &[BorrowedFd<'static>] = &[];

/// Why a channel stopped delivering messages.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The socket failed.
    #[error("channel i/o error: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something that is not a valid message.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
}

/// One end of a master/worker channel.
#[derive(Debug)]
pub(crate) struct Channel {
    /// Registered for readability only (see the module docs).
    sock: AsyncFd<OwnedFd>,
    /// Held while a user message is sent, so the fragments of two messages never interleave.
    user: tokio::sync::Mutex<()>,
}

/// A send waiting for buffer space: a duplicate of the channel's socket, registered for
/// writability while it exists.
pub(crate) type WriteWait = AsyncFd<OwnedFd>;

impl Channel {
    /// Creates a connected pair: the master's end, and the worker's end as a plain fd to be
    /// inherited by the child (close-on-exec is cleared only in the child).
    pub(crate) fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (master, worker) = socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
        master.set_nonblocking(true)?;
        worker.set_nonblocking(true)?;
        Ok((Channel::from_fd(master.into())?, worker.into()))
    }

    /// Wraps a channel fd (non-blocking, close-on-exec). Needs a tokio runtime.
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Channel> {
        Ok(Channel { sock: crate::sys::register(fd, Interest::READABLE)?, user: Default::default() })
    }

    /// The socket, for sends that cannot await (the panic hook).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.sock.get_ref().as_fd()
    }

    /// Sends one datagram, waiting for buffer space if needed.
    pub(crate) async fn send(&self, data: &[u8]) -> io::Result<()> {
        self.send_with_fds(data, NO_FDS).await
    }

    /// Sends a user message (at most [`MAX_USER_MESSAGE`](message::MAX_USER_MESSAGE) bytes;
    /// the caller checks) for/from `peer`: one datagram if it fits, else fragments. `queued`
    /// runs once this message's turn has come, before its first datagram, so callers can
    /// record their messages in sending order.
    pub(crate) async fn send_user(
        &self,
        dir: UserTags,
        peer: u32,
        call: u32,
        data: &[u8],
        queued: impl FnOnce(),
    ) -> io::Result<()> {
        let _turn = self.user.lock().await;
        queued();
        let mut out = BytesMut::with_capacity(data.len().min(MAX_MESSAGE));
        if data.len() + USER_HEADER <= MAX_MESSAGE {
            encode::user(&mut out, dir, peer, call, None, data);
            return self.send(&out).await;
        }
        let (first, rest) = data.split_at(MAX_MESSAGE - USER_HEADER);
        encode::user(&mut out, dir, peer, call, Some(data.len() as u32), first);
        self.send(&out).await?;
        for chunk in rest.chunks(MAX_MESSAGE - 1) {
            out.clear();
            encode::user_more(&mut out, dir, chunk);
            self.send(&out).await?;
        }
        Ok(())
    }

    /// Sends one datagram with up to [`MAX_FDS`] file descriptors attached, waiting for
    /// buffer space.
    pub(crate) async fn send_with_fds(&self, data: &[u8], fds: &[impl AsFd]) -> io::Result<()> {
        let mut wait = None;
        std::future::poll_fn(|cx| self.poll_send_with_fds(cx, data, fds, &mut wait)).await
    }

    /// Polls sending one datagram (for `poll`-style callers such as `Stream` impls). `wait` is
    /// the caller's: it holds the registration for writability while the buffer is full.
    pub(crate) fn poll_send(
        &self,
        cx: &mut Context<'_>,
        data: &[u8],
        wait: &mut Option<WriteWait>,
    ) -> Poll<io::Result<()>> {
        self.poll_send_with_fds(cx, data, NO_FDS, wait)
    }

    fn poll_send_with_fds(
        &self,
        cx: &mut Context<'_>,
        data: &[u8],
        fds: &[impl AsFd],
        wait: &mut Option<WriteWait>,
    ) -> Poll<io::Result<()>> {
        loop {
            let room = match wait {
                Some(writer) => Some(ready!(writer.poll_write_ready(cx))?),
                None => None,
            };
            match self.try_send_with_fds(data, fds) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match room {
                    Some(mut room) => room.clear_ready(),
                    // The buffer is full: wait for room on a registration of our own, so that
                    // any number of senders can wait at once, each woken.
                    None => {
                        let dup = self.sock.get_ref().try_clone()?;
                        *wait = Some(crate::sys::register(dup, Interest::WRITABLE)?);
                    }
                },
                done => {
                    *wait = None;
                    return Poll::Ready(done);
                }
            }
        }
    }

    /// Sends one datagram with file descriptors attached, without waiting: fails with
    /// `WouldBlock` when the socket buffer is full. Used by the dispatcher, which must not
    /// await while it holds its table.
    pub(crate) fn try_send_with_fds(&self, data: &[u8], fds: &[impl AsFd]) -> io::Result<()> {
        crate::sys::send_with_fds(self.fd(), data, fds)
    }
}

/// Receive buffers for one channel, reused for every message.
pub(crate) struct Receiver {
    data: Box<[u8]>,
}

impl Receiver {
    pub(crate) fn new() -> Self {
        Receiver { data: vec![0; MAX_MESSAGE].into_boxed_slice() }
    }

    /// Receives the next datagram and the file descriptors that came with it.
    ///
    /// `Ok(None)` is end of stream: the peer closed its end (this protocol never sends an empty
    /// datagram). Descriptors of a rejected message are closed before the error is returned.
    /// Ancillary data cut by the kernel is not an error here but [`Datagram::fds_cut`]: a
    /// receiver whose descriptor table is full must be able to say so instead of dying.
    pub(crate) async fn recv(&mut self, channel: &Channel) -> Result<Option<Datagram>, RecvError> {
        let got = loop {
            let mut guard = channel.sock.readable().await?;
            match guard.try_io(|sock| crate::sys::recv_with_fds(sock.get_ref().as_fd(), &mut self.data, MAX_FDS)) {
                Ok(got) => break got?,
                Err(_would_block) => continue,
            }
        };
        if got.truncated {
            return Err(ProtocolError::Truncated.into());
        }
        if let Some((level, ty)) = got.unexpected {
            return Err(ProtocolError::UnexpectedAncillary { level, ty }.into());
        }
        if got.len == 0 && got.fds.is_empty() && !got.fds_cut {
            return Ok(None);
        }
        Ok(Some(Datagram { data: Bytes::copy_from_slice(&self.data[..got.len]), fds: got.fds, fds_cut: got.fds_cut }))
    }
}

/// One received datagram.
pub(crate) struct Datagram {
    pub(crate) data: Bytes,
    /// The descriptors the kernel installed, in the order they were sent.
    pub(crate) fds: Vec<OwnedFd>,
    /// The kernel cut the ancillary data (MSG_CTRUNC): this process's descriptor table is full,
    /// or more than [`MAX_FDS`] were sent. `fds` holds only some of what was sent.
    pub(crate) fds_cut: bool,
}

impl Datagram {
    /// The datagram as the sender meant it, or an error if its descriptors were cut.
    pub(crate) fn whole(self) -> Result<(Bytes, Vec<OwnedFd>), ProtocolError> {
        if self.fds_cut { Err(ProtocolError::AncillaryTruncated) } else { Ok((self.data, self.fds)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn passes_fds_and_reports_truncation() {
        let (a, b) = Channel::pair().unwrap();
        let b = Channel::from_fd(b).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        a.try_send_with_fds(b"\x01", &[file.as_fd(), file.as_fd()]).unwrap();
        let mut rx = Receiver::new();
        let (bytes, fds) = rx.recv(&b).await.unwrap().unwrap().whole().unwrap();
        assert_eq!(&bytes[..], b"\x01");
        assert_eq!(fds.len(), 2);

        // Larger than MAX_MESSAGE: the kernel truncates, we report it.
        a.send(&vec![7u8; MAX_MESSAGE + 10]).await.unwrap();
        assert!(matches!(rx.recv(&b).await, Err(RecvError::Protocol(ProtocolError::Truncated))));

        // More descriptors than the ancillary buffer holds.
        let many: Vec<_> = (0..MAX_FDS + 40).map(|_| file.as_fd()).collect();
        a.try_send_with_fds(b"\x01", &many).unwrap();
        let cut = rx.recv(&b).await.unwrap().unwrap();
        assert!(cut.fds_cut);
        assert!((MAX_FDS..MAX_FDS + 40).contains(&cut.fds.len()), "the descriptors that fit are installed");
        assert!(matches!(cut.whole(), Err(ProtocolError::AncillaryTruncated)));

        drop(a);
        assert!(rx.recv(&b).await.unwrap().is_none());
    }

    /// A full socket buffer: senders wait for room (each on its own registration, all woken),
    /// and every datagram arrives once, in order per sender.
    #[tokio::test]
    async fn senders_wait_for_room() {
        let (a, b) = Channel::pair().unwrap();
        let (a, b) = (std::sync::Arc::new(a), Channel::from_fd(b).unwrap());
        let payload = vec![1u8; 16 * 1024];
        let mut filled = 0;
        while a.try_send_with_fds(&payload, NO_FDS).is_ok() {
            filled += 1;
        }
        assert!(filled > 0);
        let senders: Vec<_> = (0..3u8)
            .map(|n| {
                let a = a.clone();
                tokio::spawn(async move {
                    for i in 0..20u8 {
                        a.send(&[n, i]).await.unwrap();
                    }
                })
            })
            .collect();
        let mut rx = Receiver::new();
        let mut next = [0u8; 3];
        let mut big = 0;
        while next.iter().any(|n| *n < 20) {
            let d = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv(&b))
                .await
                .expect("a waiting sender was never woken")
                .unwrap()
                .unwrap();
            if d.data.len() == payload.len() {
                big += 1;
                continue;
            }
            let (n, i) = (d.data[0] as usize, d.data[1]);
            assert_eq!(i, next[n], "sender {n} out of order");
            next[n] += 1;
        }
        assert_eq!(big, filled);
        for s in senders {
            s.await.unwrap();
        }
    }

    /// A user message goes in one datagram while it fits with its header, else in fragments,
    /// none larger than [`MAX_MESSAGE`], that put back together give the bytes sent.
    #[tokio::test]
    async fn user_messages_go_whole_or_in_fragments_that_add_up() {
        let (a, b) = Channel::pair().unwrap();
        let b = Channel::from_fd(b).unwrap();
        let mut rx = Receiver::new();
        let single = MAX_MESSAGE - USER_HEADER;
        let cases =
            [(0, 1), (10, 1), (single, 1), (single + 1, 2), (single + MAX_MESSAGE - 1, 2), (single + MAX_MESSAGE, 3)];
        for (len, datagrams) in cases {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut turn = false;
            let send = a.send_user(message::USER_TO_WORKER, 7, 9, &data, || turn = true);
            let receive = async {
                let mut whole = Reassembly::default();
                for n in 1..=datagrams {
                    let d = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv(&b))
                        .await
                        .unwrap_or_else(|_| panic!("{len} bytes: datagram {n} of {datagrams} never came"))
                        .unwrap_or_else(|e| panic!("{len} bytes: datagram {n}: {e}"))
                        .expect("open");
                    let (bytes, fds) = d.whole().unwrap();
                    let got = match message::ToWorker::decode(bytes, fds).unwrap() {
                        message::ToWorker::User { from, call, data } => Some((from, call, data)),
                        message::ToWorker::UserStart { from, call, total, data } => {
                            assert!(datagrams > 1, "{len} bytes fit in one datagram, not a start");
                            assert_eq!(total as usize, len);
                            whole.start(from, call, total, data).unwrap()
                        }
                        message::ToWorker::UserMore(data) => whole.more(data).unwrap(),
                        other => panic!("{other:?}"),
                    };
                    assert_eq!(got.is_some(), n == datagrams, "{len} bytes: whole after datagram {n} of {datagrams}");
                    if let Some((from, call, got)) = got {
                        assert_eq!((from, call, got.len()), (7, 9, len));
                        assert!(got[..] == data[..], "{len} bytes: not the bytes sent");
                    }
                }
            };
            let (sent, ()) = tokio::join!(send, receive);
            sent.unwrap();
            assert!(turn, "its turn was told");
        }
        drop(a);
        assert!(rx.recv(&b).await.unwrap().is_none(), "no datagram more than counted");
    }

    /// `poll_send` sends at once when there is room, and waits for room when there is none.
    #[tokio::test]
    async fn poll_send_sends_and_waits_for_room() {
        let (a, b) = Channel::pair().unwrap();
        let b = Channel::from_fd(b).unwrap();
        let mut rx = Receiver::new();
        let mut wait = None;
        std::future::poll_fn(|cx| a.poll_send(cx, b"\x09", &mut wait)).await.unwrap();
        assert_eq!(&rx.recv(&b).await.unwrap().unwrap().data[..], b"\x09");
        let payload = vec![1u8; 16 * 1024];
        let mut filled = 0;
        while a.try_send_with_fds(&payload, NO_FDS).is_ok() {
            filled += 1;
        }
        let waker = std::task::Waker::noop();
        let full = a.poll_send(&mut Context::from_waker(waker), b"\x0a", &mut wait);
        assert!(full.is_pending() && wait.is_some(), "a full buffer is waited on");
        let send = std::future::poll_fn(|cx| a.poll_send(cx, b"\x0a", &mut wait));
        let receive = async {
            for _ in 0..filled {
                assert_eq!(rx.recv(&b).await.unwrap().unwrap().data.len(), payload.len());
            }
            rx.recv(&b).await.unwrap().unwrap()
        };
        let limit = std::time::Duration::from_secs(10);
        let (sent, last) = tokio::time::timeout(limit, async { tokio::join!(send, receive) }).await.expect("woken");
        sent.unwrap();
        assert_eq!(&last.data[..], b"\x0a");
        assert!(wait.is_none(), "the registration for writability is dropped once sent");
    }

    /// A send to a closed peer fails at once; it does not wait for room that never comes.
    #[tokio::test]
    async fn a_send_to_a_closed_peer_fails() {
        let (a, b) = Channel::pair().unwrap();
        drop(b);
        let sent = tokio::time::timeout(std::time::Duration::from_secs(10), a.send(b"\x09")).await;
        let e = sent.expect("an error, not a wait").expect_err("the peer is gone");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }
}
