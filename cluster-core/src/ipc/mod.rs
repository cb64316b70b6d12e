//! The master/worker channel: one `SOCK_SEQPACKET` socket pair per worker.
//!
//! [`message`] defines the bytes; this module moves them, with the file descriptors that ride
//! along as SCM_RIGHTS ancillary data. Every receive passes an ancillary buffer (a plain `recv`
//! would make the kernel close passed descriptors), and a datagram or ancillary block the
//! kernel had to cut (MSG_TRUNC / MSG_CTRUNC) is a protocol error, never a partial message.

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
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::OwnedAncillaryMessage;

pub use message::ProtocolError;
use message::{MAX_FDS, MAX_MESSAGE, USER_HEADER, UserTags};

/// Bytes of ancillary buffer: room for one SCM_RIGHTS block of [`MAX_FDS`] descriptors.
const ANCILLARY_SPACE: usize = 64 + MAX_FDS * std::mem::size_of::<libc::c_int>();

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
    sock: UnixSeqpacket,
    /// Held while a user message is sent, so the fragments of two messages never interleave.
    user: tokio::sync::Mutex<()>,
}

impl Channel {
    /// Creates a connected pair: the master's end, and the worker's end as a plain fd to be
    /// inherited by the child (close-on-exec is cleared only in the child).
    pub(crate) fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (master, worker) = UnixSeqpacket::pair()?;
        Ok((Channel { sock: master, user: Default::default() }, OwnedFd::from(worker)))
    }

    /// Wraps an inherited channel fd (worker side). Needs a tokio runtime.
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Channel> {
        Ok(Channel { sock: UnixSeqpacket::try_from(fd)?, user: Default::default() })
    }

    /// The socket, for sends that cannot await (the panic hook).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Sends one datagram, waiting for buffer space if needed.
    pub(crate) async fn send(&self, data: &[u8]) -> io::Result<()> {
        self.sock.send(data).await.map(drop)
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
    pub(crate) async fn send_with_fds(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut space = [0u8; ANCILLARY_SPACE];
        let mut ancillary = tokio_seqpacket::ancillary::AncillaryMessageWriter::new(&mut space);
        if !fds.is_empty() {
            ancillary.add_fds(fds.iter().copied()).map_err(io::Error::other)?;
        }
        self.sock.send_with_ancillary(data, &mut ancillary).await.map(drop)
    }

    /// Polls sending one datagram (for `poll`-style callers such as `Stream` impls).
    pub(crate) fn poll_send(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<()>> {
        self.sock.poll_send(cx, data).map_ok(drop)
    }

    /// Sends one datagram with file descriptors attached, without waiting: fails with
    /// `WouldBlock` when the socket buffer is full. Used by the dispatcher, which must not
    /// await while it holds its table.
    pub(crate) fn try_send_with_fds(&self, data: &[u8], fds: &[impl AsFd]) -> io::Result<()> {
        crate::sys::send_with_fds(self.sock.as_fd(), data, fds)
    }
}

/// Receive buffers for one channel, reused for every message.
pub(crate) struct Receiver {
    data: Box<[u8]>,
    ancillary: Box<[u8]>,
}

impl Receiver {
    pub(crate) fn new() -> Self {
        Receiver {
            data: vec![0; MAX_MESSAGE].into_boxed_slice(),
            ancillary: vec![0; ANCILLARY_SPACE].into_boxed_slice(),
        }
    }

    /// Receives the next datagram and the file descriptors that came with it.
    ///
    /// `Ok(None)` is end of stream: the peer closed its end (this protocol never sends an empty
    /// datagram). Descriptors of a rejected message are closed before the error is returned.
    /// Ancillary data cut by the kernel is not an error here but [`Datagram::fds_cut`]: a
    /// receiver whose descriptor table is full must be able to say so instead of dying.
    pub(crate) async fn recv(&mut self, channel: &Channel) -> Result<Option<Datagram>, RecvError> {
        let (info, ancillary) = channel.sock.recv_with_ancillary(&mut self.data, &mut self.ancillary).await?;
        let mut fds = Vec::new();
        let fds_cut = info.ancillary_truncated() || ancillary.is_truncated();
        let mut unexpected = None;
        for message in ancillary.into_messages() {
            match message {
                OwnedAncillaryMessage::FileDescriptors(received) => fds.extend(received),
                OwnedAncillaryMessage::Other(other) => {
                    unexpected =
                        Some(ProtocolError::UnexpectedAncillary { level: other.cmsg_level(), ty: other.cmsg_type() })
                }
            }
        }
        if info.truncated() {
            return Err(ProtocolError::Truncated.into());
        }
        if let Some(err) = unexpected {
            return Err(err.into());
        }
        if info.bytes_read() == 0 && fds.is_empty() && !fds_cut {
            return Ok(None);
        }
        Ok(Some(Datagram { data: Bytes::copy_from_slice(&self.data[..info.bytes_read()]), fds, fds_cut }))
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
    use std::io::IoSlice;
    use std::os::fd::AsFd;
    use tokio_seqpacket::ancillary::AncillaryMessageWriter;

    #[tokio::test]
    async fn passes_fds_and_reports_truncation() {
        let (a, b) = UnixSeqpacket::pair().unwrap();
        let (a, b) = (Channel { sock: a, user: Default::default() }, Channel { sock: b, user: Default::default() });
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
        let mut space = vec![0u8; 4096];
        let mut anc = AncillaryMessageWriter::new(&mut space);
        anc.add_fds(many.iter().copied()).unwrap();
        a.sock.send_vectored_with_ancillary(&[IoSlice::new(b"\x01")], &mut anc).await.unwrap();
        let cut = rx.recv(&b).await.unwrap().unwrap();
        assert!(cut.fds_cut);
        assert!((MAX_FDS..MAX_FDS + 40).contains(&cut.fds.len()), "the descriptors that fit are installed");
        assert!(matches!(cut.whole(), Err(ProtocolError::AncillaryTruncated)));

        drop(a);
        assert!(rx.recv(&b).await.unwrap().is_none());
    }
}
