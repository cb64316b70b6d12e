//! Graceful HTTP for workers (feature `http`, included in `axum`): a stop or a rolling reload
//! that fails no request, with the code axum, hyper-util and tonic users write anyway.
//!
//! A worker asked to stop must not simply close its keep-alive connections: a client may be
//! sending its next request on one at that moment, and it sees the connection reset (PM2's
//! reload defect). Two things together avoid it:
//!
//! - [`CloseOnShutdown`], a tower layer: once the worker is stopping, every HTTP/1 response
//!   carries `connection: close` (and nothing else in that header: an HTTP/1.0 keep-alive
//!   client is answered in HTTP/1.0, which hyper then closes), so a busy keep-alive client
//!   finishes its request and opens its next connection to another worker. A `101 Switching
//!   Protocols` passes untouched (a WebSocket handshake still succeeds). HTTP/2 clients get
//!   GOAWAY from the server's own graceful shutdown instead, after the same grace;
//! - [`shutdown`], the signal to give the server's graceful shutdown: it resolves a grace
//!   period ([`GRACE`]) after the worker was asked to stop, when busy clients have left, and
//!   then the server closes what is idle and finishes what is in flight.
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # async fn serve(listener: cluster::net::TcpListener, app: axum::Router) -> std::io::Result<()> {
//! let app = app.layer(cluster::http::CloseOnShutdown);
//! axum::serve(listener, app).with_graceful_shutdown(cluster::http::shutdown()).await
//! # }
//! ```
//!
//! With tonic, use `serve_with_incoming_shutdown(cluster::http::incoming(listener),
//! cluster::http::shutdown())` ([`incoming`]); plain `serve_with_incoming` returns without
//! waiting for open connections.

pub mod sse;
#[cfg(feature = "ws")]
pub mod ws;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, Version, header};

/// How long after the stop began [`shutdown`] resolves: time for busy keep-alive clients to
/// get a `connection: close` response and move to another worker.
pub const GRACE: Duration = Duration::from_secs(1);

/// Resolves [`GRACE`] after this worker was asked to stop (outside a cluster: after SIGINT or
/// SIGTERM): the signal for a server's graceful shutdown.
pub async fn shutdown() {
    shutdown_after(GRACE).await
}

/// [`shutdown`] with another grace period.
pub async fn shutdown_after(grace: Duration) {
    crate::worker::shutdown().await;
    tokio::time::sleep(grace).await;
}

/// A listener's connections as a stream (a cluster [`TcpListener`](crate::net::TcpListener) is
/// one) that, once the listener has ended because the worker stops, stays open until
/// [`shutdown`] resolves (the grace). For servers that begin their graceful shutdown as soon as
/// their incoming stream ends, as tonic's does: their HTTP/2 GOAWAY then comes after the same
/// grace as the other servers' `connection: close`, not at once.
///
/// With tonic (`examples/src/bin/tonic-hello.rs`):
///
/// ```ignore
/// tonic::transport::Server::builder()
///     .add_service(svc)
///     .serve_with_incoming_shutdown(cluster::http::incoming(listener), cluster::http::shutdown())
///     .await
/// ```
pub fn incoming<S: futures::Stream + Unpin>(listener: S) -> Incoming<S> {
    Incoming { listener, grace: None }
}

/// See [`incoming`].
pub struct Incoming<S> {
    listener: S,
    /// Once the listener has ended: the grace, until it passes.
    grace: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Incoming<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").field("listener", &self.listener).field("ended", &self.grace.is_some()).finish()
    }
}

impl<S: futures::Stream + Unpin> futures::Stream for Incoming<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.grace.is_none() {
            match ready!(Pin::new(&mut self.listener).poll_next(cx)) {
                Some(conn) => return Poll::Ready(Some(conn)),
                None => self.grace = Some(Box::pin(shutdown())),
            }
        }
        let grace = self.grace.as_mut().expect("set above");
        ready!(grace.as_mut().poll(cx));
        Poll::Ready(None)
    }
}

/// Marks the response to an HTTP/1 request of `version` `connection: close` if the worker is
/// stopping (for a hand-written hyper service; [`CloseOnShutdown`] does it for a tower stack).
///
/// The header says `close` alone, and the answer to an HTTP/1.0 request is an HTTP/1.0
/// response: hyper would otherwise add `keep-alive` beside `close` for an HTTP/1.0 keep-alive
/// client and keep the connection open. A `101 Switching Protocols` (a WebSocket handshake)
/// and HTTP/2 responses are left alone.
pub fn close_on_shutdown<B>(version: Version, response: &mut Response<B>) {
    if crate::worker::is_shutting_down() {
        mark_close(version, response);
    }
}

fn mark_close<B>(version: Version, response: &mut Response<B>) {
    if version >= Version::HTTP_2 || response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    if version == Version::HTTP_10 {
        *response.version_mut() = Version::HTTP_10;
    }
}

/// A tower layer: while the worker stops, its HTTP/1 responses carry `connection: close`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloseOnShutdown;

impl<S> tower_layer::Layer<S> for CloseOnShutdown {
    type Service = CloseOnShutdownService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CloseOnShutdownService { inner }
    }
}

/// The service of [`CloseOnShutdown`].
#[derive(Debug, Clone)]
pub struct CloseOnShutdownService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for CloseOnShutdownService<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = CloseOnShutdownFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let version = request.version();
        CloseOnShutdownFuture { inner: self.inner.call(request), version }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`CloseOnShutdownService`].
    pub struct CloseOnShutdownFuture<F> {
        #[pin]
        inner: F,
        // The request's.
        version: Version,
    }
}

impl<F, B, E> Future for CloseOnShutdownFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        close_on_shutdown(*this.version, &mut response);
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: StatusCode) -> Response<()> {
        Response::builder().status(status).body(()).unwrap()
    }

    #[test]
    fn a_closing_response_says_close_alone_and_answers_http_1_0_in_http_1_0() {
        let mut r = response(StatusCode::OK);
        mark_close(Version::HTTP_11, &mut r);
        assert_eq!(r.headers().get_all(header::CONNECTION).iter().collect::<Vec<_>>(), ["close"]);
        assert_eq!(r.version(), Version::HTTP_11);
        let mut r = response(StatusCode::OK);
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        mark_close(Version::HTTP_10, &mut r);
        assert_eq!(r.headers().get_all(header::CONNECTION).iter().collect::<Vec<_>>(), ["close"]);
        assert_eq!(r.version(), Version::HTTP_10, "hyper then closes instead of adding keep-alive");
    }

    #[test]
    fn switching_protocols_and_http_2_pass_untouched() {
        for (version, status) in
            [(Version::HTTP_11, StatusCode::SWITCHING_PROTOCOLS), (Version::HTTP_2, StatusCode::OK)]
        {
            let mut r = response(status);
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            mark_close(version, &mut r);
            assert_eq!(r.headers()[header::CONNECTION], "upgrade", "{version:?} {status}");
        }
    }
}
