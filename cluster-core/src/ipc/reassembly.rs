//! User messages larger than one datagram travel in fragments: a start (with the total size)
//! and continuations, never interleaved on one channel. This puts them back together, and
//! refuses sequences that do not add up.

use bytes::{Bytes, BytesMut};

use super::message::{MAX_USER_MESSAGE, ProtocolError};

/// Rebuilds fragmented user messages on the receiving side of one channel.
#[derive(Default)]
pub(crate) struct Reassembly {
    partial: Option<(Whole, usize, BytesMut)>,
}

/// A reassembled user message: (peer, call, payload).
pub(crate) type Whole = (u32, u32, Bytes);

impl Reassembly {
    /// A first fragment; returns the message when it is already whole.
    pub(crate) fn start(
        &mut self,
        peer: u32,
        call: u32,
        total: u32,
        data: Bytes,
    ) -> Result<Option<Whole>, ProtocolError> {
        // A start while a message is incomplete means its sender was cancelled between two
        // fragments (sends of one channel never interleave): that message was never sent.
        let total = total as usize;
        if total > MAX_USER_MESSAGE {
            return Err(ProtocolError::Fragment("announced message larger than the limit"));
        }
        let mut buf = BytesMut::with_capacity(total);
        buf.extend_from_slice(&data);
        self.partial = Some(((peer, call, Bytes::new()), total, buf));
        self.check()
    }

    /// A continuation fragment; returns the message once it is whole.
    pub(crate) fn more(&mut self, data: Bytes) -> Result<Option<Whole>, ProtocolError> {
        let Some((_, _, buf)) = &mut self.partial else {
            return Err(ProtocolError::Fragment("continuation without a start"));
        };
        buf.extend_from_slice(&data);
        self.check()
    }

    fn check(&mut self) -> Result<Option<Whole>, ProtocolError> {
        let Some((_, total, buf)) = &self.partial else { return Ok(None) };
        if buf.len() > *total {
            self.partial = None;
            return Err(ProtocolError::Fragment("fragments longer than the announced size"));
        }
        if buf.len() < *total {
            return Ok(None);
        }
        let ((peer, call, _), _, buf) = self.partial.take().expect("partial");
        Ok(Some((peer, call, buf.freeze())))
    }
}
