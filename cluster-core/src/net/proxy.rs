//! The worker's end of a listener the master owns: connections arrive on a queue from the
//! channel reader, and each is acknowledged to the master before user code gets it.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use crate::ipc::message::{ListenKey, NewConn, accepted_one};
use crate::worker::{Client, ConnQueue};

pub(crate) struct Proxy {
    client: Arc<Client>,
    key: ListenKey,
    queue: Option<ConnQueue>,
    /// A connection taken off the queue whose acknowledgement is not yet sent (keeps `accept`
    /// cancel-safe).
    pending: Option<NewConn>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("key", &self.key).finish_non_exhaustive()
    }
}

impl Proxy {
    pub(crate) fn new(client: Arc<Client>, key: ListenKey, queue: ConnQueue) -> Self {
        Proxy { client, key, queue: Some(queue), pending: None }
    }

    /// The next connection, acknowledged to the master.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<NewConn>> {
        if self.pending.is_none() {
            let Some(queue) = self.queue.as_mut() else { return Poll::Ready(Err(closed())) };
            match ready!(queue.poll_recv(cx)) {
                Some(conn) => self.pending = Some(conn),
                None => return Poll::Ready(Err(closed())),
            }
        }
        let id = self.pending.as_ref().map_or(0, |c| c.id);
        // Acknowledge before user code can read from the socket: once the master has this,
        // it will never give the connection to another worker. If the master is gone, the
        // send fails and we serve the connection anyway: we hold the only copy left.
        let _ = ready!(self.client.channel.poll_send(cx, &accepted_one(id)));
        let conn = self.pending.take().expect("pending connection");
        self.client.track(&conn.fd);
        Poll::Ready(Ok(conn))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            self.client.unlisten(self.key, queue, self.pending.take());
        }
    }
}

/// The error `accept` returns once the worker is shutting down.
pub(crate) fn closed() -> io::Error {
    io::Error::other(ListenerClosed)
}

#[derive(Debug, thiserror::Error)]
#[error("cluster listener closed: this worker is shutting down")]
struct ListenerClosed;

/// Whether an error from [`TcpListener::accept`] means the listener was closed because the
/// worker is shutting down (as opposed to a failed accept).
pub fn is_closed(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<ListenerClosed>())
}
