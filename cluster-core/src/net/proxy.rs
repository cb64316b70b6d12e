//! The worker's end of a listener the master owns: connections arrive on a queue from the
//! channel reader, and each is acknowledged to the master before user code gets it.
//!
//! Acknowledgements are batched: `accept` takes everything already queued (up to one
//! message's worth), acknowledges it in one message, and hands the connections out one by
//! one from a local buffer. What is acknowledged but not yet handed out goes back to the
//! master, descriptors and all, if the listener is dropped or the worker panics.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;

use crate::ipc::WriteWait;
use crate::ipc::encode::accepted;
use crate::ipc::message::{ListenKey, MAX_FDS, NewConn};
use crate::worker::client::{Client, ConnQueue, Unserved};

pub(crate) struct Proxy {
    client: Arc<Client>,
    key: ListenKey,
    queue: Option<ConnQueue>,
    closing: Closing,
    /// Taken off the queue; their acknowledgement (in `ack`) is not sent yet. Keeps `accept`
    /// cancel-safe.
    pending: Vec<NewConn>,
    ack: BytesMut,
    /// While the acknowledgement waits for room on the channel.
    ack_wait: Option<WriteWait>,
    unserved: Unserved,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("key", &self.key).finish_non_exhaustive()
    }
}

impl Proxy {
    pub(crate) fn new(client: Arc<Client>, key: ListenKey, queue: ConnQueue) -> Self {
        let unserved = client.register_unserved(key);
        Proxy {
            client,
            key,
            queue: Some(queue),
            closing: Closing::default(),
            pending: Vec::new(),
            ack: BytesMut::new(),
            ack_wait: None,
            unserved,
        }
    }

    /// The next connection, acknowledged to the master.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<NewConn>> {
        if let Some(conn) = self.unserved.lock().unwrap().pop_front() {
            return Poll::Ready(Ok(conn));
        }
        if self.pending.is_empty() {
            let Some(queue) = self.queue.as_mut() else { return self.closing.poll(cx).map(Err) };
            match ready!(queue.poll_recv(cx)) {
                Some(conn) => self.pending.push(conn),
                None => return self.closing.poll(cx).map(Err),
            }
            // Everything already queued rides on the same acknowledgement; nothing waits for more.
            while self.pending.len() < MAX_FDS {
                match queue.try_recv() {
                    Ok(conn) => self.pending.push(conn),
                    Err(_) => break,
                }
            }
            // Counted as open from now (numbers reused here also report earlier closes, which
            // ride on this acknowledgement).
            let closed = self.client.track(&self.pending);
            accepted(&mut self.ack, closed, self.pending.iter().map(|c| c.id));
        }
        // Acknowledge before user code can read from a socket: once the master has this, it
        // never gives these connections to another worker. If the master is gone, the send
        // fails and we serve them anyway: we hold the only copies left.
        let _ = ready!(self.client.channel.poll_send(cx, &self.ack, &mut self.ack_wait));
        let mut unserved = self.unserved.lock().unwrap();
        unserved.extend(self.pending.drain(..));
        let conn = unserved.pop_front().expect("acknowledged connection");
        Poll::Ready(Ok(conn))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            let unserved = std::mem::take(&mut *self.unserved.lock().unwrap());
            self.client.unlisten(self.key, queue, std::mem::take(&mut self.pending), unserved);
        }
    }
}

/// How a listener ends once the worker stops and what was handed to it is taken. The first
/// time it finds itself closed, `accept` stays pending for one poll (and wakes itself), so that
/// in a `select!` beside [`worker::shutdown`](crate::worker::shutdown), which is already
/// resolved by then, the shutdown branch wins whatever the order: `let (stream, _) = conn?;`
/// never turns a normal stop into an error. From the next poll on, `accept` returns the
/// closed error ([`is_closed`]), so a loop on `accept` alone ends too.
#[derive(Debug, Default)]
pub(crate) struct Closing {
    seen: bool,
}

impl Closing {
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if std::mem::replace(&mut self.seen, true) {
            return Poll::Ready(io::Error::other(ListenerClosed));
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cluster listener closed: this worker is shutting down")]
struct ListenerClosed;

/// Whether an error from [`TcpListener::accept`](crate::net::TcpListener::accept) means the listener was closed because the
/// worker is shutting down (as opposed to a failed accept).
pub fn is_closed(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<ListenerClosed>())
}
