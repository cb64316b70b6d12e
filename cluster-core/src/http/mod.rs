//! Graceful HTTP for workers (feature `http`, included in `axum`): a stop or a rolling reload
//! that fails no request, with the code axum, hyper-util and tonic users write anyway.
//!
//! A worker asked to stop must not simply close its keep-alive connections: a client may be
//! sending its next request on one at that moment, and it sees the connection reset (PM2's
//! reload defect). Two things together avoid it:
//!
//! - [`CloseOnShutdown`], a tower layer: once the worker is stopping, every HTTP/1 response
//!   carries `connection: close`, so a busy keep-alive client finishes its request and opens
//!   its next connection to another worker (HTTP/2 clients get GOAWAY from the server's own
//!   graceful shutdown instead);
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
//! With tonic, use `serve_with_incoming_shutdown(listener, cluster::http::shutdown())`; plain
//! `serve_with_incoming` returns without waiting for open connections.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderValue, Request, Response, Version, header};

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

/// Marks an HTTP/1 response `connection: close` if the worker is stopping (for a hand-written
/// hyper service; [`CloseOnShutdown`] does it for a tower stack).
pub fn close_on_shutdown<B>(response: &mut Response<B>) {
    if crate::worker::is_shutting_down() {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
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
        // `connection` is an HTTP/1 header; HTTP/2 and later stop with GOAWAY.
        let http1 = request.version() < Version::HTTP_2;
        CloseOnShutdownFuture { inner: self.inner.call(request), http1 }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`CloseOnShutdownService`].
    pub struct CloseOnShutdownFuture<F> {
        #[pin]
        inner: F,
        http1: bool,
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
        if *this.http1 {
            close_on_shutdown(&mut response);
        }
        Poll::Ready(Ok(response))
    }
}
