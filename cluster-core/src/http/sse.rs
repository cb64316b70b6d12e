//! Server-sent event streams that end cleanly when the worker stops: [`until_shutdown`] wraps
//! any stream of events so that, once the worker is asked to stop, it yields one last item and
//! ends; the response then ends properly (its last chunk), and a browser's `EventSource`
//! reconnects, to a worker that serves on. With axum (feature `axum`), `events` does it for
//! `Sse` streams, the last event carrying a `retry:` hint:
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # mod doc {
//! use std::convert::Infallible;
//!
//! use axum::response::sse::{Event, Sse};
//! use futures::{Stream, StreamExt};
//!
//! async fn ticks() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
//!     let ticks = futures::stream::iter(0u64..).then(|n| async move {
//!         tokio::time::sleep(std::time::Duration::from_millis(100)).await;
//!         Ok(Event::default().data(n.to_string()))
//!     });
//!     Sse::new(cluster::http::sse::events(Box::pin(ticks)))
//! }
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;

/// The reconnection delay `events`' last event asks of an `EventSource` (its `retry:`).
pub const RETRY: Duration = Duration::from_millis(250);

/// Wraps `stream`: once the worker is asked to stop, it yields `last` (if any) and ends.
pub fn until_shutdown<S: Stream + Unpin>(stream: S, last: Option<S::Item>) -> UntilShutdown<S> {
    UntilShutdown { stream, last, stop: Some(Box::pin(crate::worker::shutdown())) }
}

/// See [`until_shutdown`].
pub struct UntilShutdown<S: Stream> {
    stream: S,
    last: Option<S::Item>,
    /// `None` once the worker stops.
    stop: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<S: Stream + std::fmt::Debug> std::fmt::Debug for UntilShutdown<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UntilShutdown").field("stream", &self.stream).field("stopped", &self.stop.is_none()).finish()
    }
}

impl<S: Stream + Unpin> Stream for UntilShutdown<S>
where
    S::Item: Unpin,
{
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.get_mut();
        if let Some(stop) = &mut this.stop {
            if stop.as_mut().poll(cx).is_pending() {
                return Pin::new(&mut this.stream).poll_next(cx);
            }
            this.stop = None;
        }
        Poll::Ready(this.last.take())
    }
}

/// An axum `Sse` stream that ends on the worker's stop with an event `restart` whose `retry:`
/// asks the `EventSource` to reconnect after [`RETRY`].
#[cfg(feature = "axum")]
pub fn events<S, E>(stream: S) -> UntilShutdown<S>
where
    S: Stream<Item = Result<axum::response::sse::Event, E>> + Unpin,
    E: Unpin,
{
    let last = axum::response::sse::Event::default().event("restart").retry(RETRY).data("this server restarts");
    until_shutdown(stream, Some(Ok(last)))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    #[tokio::test]
    async fn outside_a_cluster_the_stream_runs_on() {
        // No worker: `shutdown()` waits for SIGINT/SIGTERM, so the stream is the stream.
        let got: Vec<u32> = super::until_shutdown(futures::stream::iter([1, 2, 3]), Some(9)).take(3).collect().await;
        assert_eq!(got, [1, 2, 3]);
    }
}
