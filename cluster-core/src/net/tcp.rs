use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures::Stream;
use tokio::net::{TcpStream, ToSocketAddrs, lookup_host};

use crate::ipc::message::{ListenKey, NewConn, accepted_one};
use crate::worker::{self, Client, ConnQueue};

/// A TCP listener that works the same in a worker, in a single process and in the master.
///
/// In a worker, [`bind`](Self::bind) asks the master for the socket: every worker that binds
/// the same address shares one listening socket owned by the master, and port 0 gives one
/// port shared by all. Bind errors (`AddrInUse`, `PermissionDenied`, …) come back as the real
/// `io::Error`.
///
/// [`accept`](Self::accept) yields plain [`tokio::net::TcpStream`]s, so hyper, tonic (through
/// the [`Stream`] impl) and axum (feature `axum`) take it as they take tokio's listener.
///
/// After the master asks the worker to stop, `accept` returns the connections already handed
/// over, then an error (and the stream ends); see [`is_closed`].
#[derive(Debug)]
pub struct TcpListener {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Direct(tokio::net::TcpListener),
    Cluster(Proxy),
}

struct Proxy {
    client: Arc<Client>,
    key: ListenKey,
    local: SocketAddr,
    queue: Option<ConnQueue>,
    /// A connection taken off the queue whose acknowledgement is not yet sent (keeps `accept`
    /// cancel-safe).
    pending: Option<NewConn>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("key", &self.key).field("local", &self.local).finish_non_exhaustive()
    }
}

/// The error `accept` returns once the worker is shutting down.
fn closed() -> io::Error {
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

impl TcpListener {
    /// Binds (or, in a worker, asks the master to bind) a listener on the first address
    /// `addr` resolves to that works.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
        let Some(client) = worker::client() else {
            return Ok(TcpListener { inner: Inner::Direct(tokio::net::TcpListener::bind(addr).await?) });
        };
        let mut last = None;
        for addr in lookup_host(addr).await? {
            match client.listen(addr).await {
                Ok((key, local, queue)) => {
                    let proxy = Proxy { client: client.clone(), key, local, queue: Some(queue), pending: None };
                    return Ok(TcpListener { inner: Inner::Cluster(proxy) });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing")))
    }

    /// The address this listener is bound to (the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.inner {
            Inner::Direct(l) => l.local_addr(),
            Inner::Cluster(p) => Ok(p.local),
        }
    }

    /// Accepts the next connection. Cancel-safe.
    pub async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for the next connection.
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        match &mut self.inner {
            Inner::Direct(l) => l.poll_accept(cx),
            Inner::Cluster(p) => p.poll_accept(cx),
        }
    }
}

impl Proxy {
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
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
        let stream = std::net::TcpStream::from(conn.fd);
        stream.set_nonblocking(true)?;
        Poll::Ready(Ok((TcpStream::from_std(stream)?, conn.peer)))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            self.client.unlisten(self.key, queue, self.pending.take());
        }
    }
}

impl Stream for TcpListener {
    type Item = io::Result<TcpStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match ready!(self.get_mut().poll_accept(cx)) {
            Ok((stream, _)) => Poll::Ready(Some(Ok(stream))),
            Err(e) if is_closed(&e) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

#[cfg(feature = "axum")]
impl axum::serve::Listener for TcpListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match TcpListener::accept(self).await {
                Ok(conn) => return conn,
                // axum stops through `with_graceful_shutdown(cluster::worker::shutdown())`.
                Err(e) if is_closed(&e) => std::future::pending::<()>().await,
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    eprintln!("cluster: accept error: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }
}

/// Errors that concern one connection, not the listener.
pub(crate) fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}
