use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::Stream;
use tokio::net::{TcpStream, ToSocketAddrs, lookup_host};

use super::proxy::{Closing, Proxy, is_closed};
use crate::ipc::message::{Endpoint, ListenKey};
#[cfg(feature = "axum")]
use crate::sys::is_connection_error;
use crate::worker::client;

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
    /// No cluster: a plain listener.
    Direct(tokio::net::TcpListener),
    /// Policy `rr`: the master accepts and hands connections over.
    Cluster { proxy: Proxy, local: SocketAddr },
    /// Policies `shared` and `reuseport`: this worker accepts on a socket the master bound.
    Own(Own),
}

/// A socket the master bound, on which this worker accepts itself until it is asked to stop.
struct Own {
    listener: tokio::net::TcpListener,
    key: ListenKey,
    /// Resolves when the worker is asked to stop; `None` once it has.
    stop: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    closing: Closing,
}

impl std::fmt::Debug for Own {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Own").field("listener", &self.listener).field("key", &self.key).finish_non_exhaustive()
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        if let Some(client) = client::client() {
            client.send_unlisten(self.key);
        }
    }
}

impl TcpListener {
    /// Binds (or, in a worker, asks the master to bind) a listener on the first address
    /// `addr` resolves to that works.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
        let Some(client) = client::client() else {
            return Ok(TcpListener { inner: Inner::Direct(tokio::net::TcpListener::bind(addr).await?) });
        };
        let mut last = None;
        for addr in lookup_host(addr).await? {
            let endpoint = Endpoint::Tcp(addr);
            let shown = endpoint.to_string();
            let bound = match client.bind(endpoint).await {
                Ok(bound) => bound,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let local = bound.addr.unwrap_or(addr);
            if let Some(fd) = bound.fd {
                let listener = std::net::TcpListener::from(fd);
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                client.send_listening(bound.key).await?;
                let stopping = client.clone();
                let stop = Some(Box::pin(async move { stopping.stopped().await }) as Pin<Box<_>>);
                let own = Own { listener, key: bound.key, stop, closing: Closing::default() };
                return Ok(TcpListener { inner: Inner::Own(own) });
            }
            let queue = client.attach(bound.key, &shown).await?;
            let proxy = Proxy::new(client.clone(), bound.key, queue);
            return Ok(TcpListener { inner: Inner::Cluster { proxy, local } });
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing")))
    }

    /// The address this listener is bound to (the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.inner {
            Inner::Direct(l) => l.local_addr(),
            Inner::Cluster { local, .. } => Ok(*local),
            Inner::Own(own) => own.listener.local_addr(),
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
            Inner::Own(own) => {
                // Once the worker stops, it leaves the shared queue to the others.
                if let Some(stop) = &mut own.stop
                    && stop.as_mut().poll(cx).is_ready()
                {
                    own.stop = None;
                }
                if own.stop.is_none() {
                    return own.closing.poll(cx).map(Err);
                }
                match ready!(own.listener.poll_accept(cx)) {
                    // EINVAL: the master shut the socket down (the cluster is stopping or
                    // this worker's `reuseport` socket is retired); the stop message follows.
                    Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                        own.stop = None;
                        own.closing.poll(cx).map(Err)
                    }
                    accepted => Poll::Ready(accepted),
                }
            }
            Inner::Cluster { proxy, local } => {
                let conn = ready!(proxy.poll_next(cx))?;
                // Non-blocking already: the master accepts with SOCK_NONBLOCK, and the flag
                // belongs to the socket, not to the descriptor number.
                let stream = std::net::TcpStream::from(conn.fd);
                let peer = conn.peer.unwrap_or(*local);
                Poll::Ready(Ok((TcpStream::from_std(stream)?, peer)))
            }
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
                // axum stops through `with_graceful_shutdown(cluster::client::shutdown())`.
                Err(e) if is_closed(&e) => std::future::pending::<()>().await,
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    crate::log::say!("accept error: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }
}
