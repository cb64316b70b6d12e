//! WebSockets that end cleanly when the worker stops (feature `ws`): [`closing`] wraps a socket
//! (axum's `WebSocket`, tokio-tungstenite's `WebSocketStream`, or any stream and sink of
//! [`Closable`] messages) so that, once the worker is asked to stop (a reload, an upgrade, a
//! stop), the socket sends a close frame (1012 "service restart" unless told otherwise) the
//! next time the handler asks for a message, waits a moment for the client's answer, and then
//! ends. The ordinary handler loop is the whole program:
//!
//! ```no_run
//! use axum::extract::ws::{Message, WebSocket};
//! use futures::{SinkExt, StreamExt};
//!
//! async fn echo(socket: WebSocket) {
//!     let mut socket = cluster::http::ws::closing(socket);
//!     while let Some(Ok(message)) = socket.next().await {
//!         if matches!(message, Message::Text(_) | Message::Binary(_)) && socket.send(message).await.is_err() {
//!             break;
//!         }
//!     }
//!     // The worker stops: the client got 1012 and reconnects, to a worker that serves on.
//! }
//! ```
//!
//! A message the handler is working on when the stop comes is finished (its answer sent)
//! before the close frame: the frame goes out when the handler next asks for one.
//! [`Closing::notice`] keeps the socket open that much longer after the stop, delivering
//! messages meanwhile. Once the close frame is sent, no message is delivered any more; the
//! stream ends when the client answers it, or after [`CLOSE_WAIT`].

use std::borrow::Cow;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::{Sink, Stream};

/// The close code sent on a stop: 1012, "service restart" (the client may reconnect).
pub const SERVICE_RESTART: u16 = 1012;
/// How long a closing socket waits for the client's close frame before it ends anyway.
pub const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// A WebSocket message type [`Closing`] can close with.
pub trait Closable: Sized {
    /// A close frame with `code` and `reason`.
    fn close_frame(code: u16, reason: &str) -> Self;
    /// Whether this message is a close frame.
    fn is_close(&self) -> bool;
}

impl Closable for axum::extract::ws::Message {
    fn close_frame(code: u16, reason: &str) -> Self {
        let reason = reason.to_string().into();
        axum::extract::ws::Message::Close(Some(axum::extract::ws::CloseFrame { code, reason }))
    }
    fn is_close(&self) -> bool {
        matches!(self, axum::extract::ws::Message::Close(_))
    }
}

impl Closable for tokio_tungstenite::tungstenite::Message {
    fn close_frame(code: u16, reason: &str) -> Self {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let frame = CloseFrame { code: code.into(), reason: reason.to_string().into() };
        tokio_tungstenite::tungstenite::Message::Close(Some(frame))
    }
    fn is_close(&self) -> bool {
        self.is_close()
    }
}

/// Wraps `socket` so that it closes with 1012 "service restart" when the worker stops; see the
/// module documentation.
pub fn closing<S, M, E>(socket: S) -> Closing<S, M>
where
    S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Unpin,
    M: Closable,
{
    Closing {
        socket,
        code: SERVICE_RESTART,
        reason: Cow::Borrowed("service restart"),
        notice: Duration::ZERO,
        phase: Phase::Open(Box::pin(crate::worker::shutdown())),
        _message: PhantomData,
    }
}

/// A WebSocket that closes when the worker stops (see [`closing`]). A stream of the socket's
/// messages, and a sink to send on it.
pub struct Closing<S, M> {
    socket: S,
    code: u16,
    reason: Cow<'static, str>,
    notice: Duration,
    phase: Phase,
    _message: PhantomData<fn(M)>,
}

impl<S, M> std::fmt::Debug for Closing<S, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Closing").field("code", &self.code).field("reason", &self.reason).finish_non_exhaustive()
    }
}

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

enum Phase {
    /// Waiting for the worker's stop.
    Open(Wait),
    /// Stopping: messages are still delivered until the notice ends.
    Notice(Pin<Box<tokio::time::Sleep>>),
    /// The close frame is to be sent.
    Close,
    /// Sent: waiting for the client's close frame, at most until the deadline.
    Sent(Pin<Box<tokio::time::Sleep>>),
    /// Over.
    Done,
}

impl<S, M> Closing<S, M> {
    /// Closes with this code and reason instead of 1012 "service restart".
    pub fn code(mut self, code: u16, reason: impl Into<Cow<'static, str>>) -> Self {
        self.code = code;
        self.reason = reason.into();
        self
    }

    /// Keeps the socket open this long after the worker is asked to stop, before the close
    /// frame (default: none).
    pub fn notice(mut self, notice: Duration) -> Self {
        self.notice = notice;
        self
    }

    /// The socket inside.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.socket
    }
}

impl<S, M, E> Stream for Closing<S, M>
where
    S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Unpin,
    M: Closable,
{
    type Item = Result<M, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Open(stop) => {
                    if stop.as_mut().poll(cx).is_ready() {
                        this.phase = if this.notice.is_zero() {
                            Phase::Close
                        } else {
                            Phase::Notice(Box::pin(tokio::time::sleep(this.notice)))
                        };
                        continue;
                    }
                    return this.deliver(cx);
                }
                Phase::Notice(notice) => {
                    if notice.as_mut().poll(cx).is_ready() {
                        this.phase = Phase::Close;
                        continue;
                    }
                    return this.deliver(cx);
                }
                Phase::Close => {
                    let socket = Pin::new(&mut this.socket);
                    let sent = ready!(Self::send_close(socket, cx, this.code, &this.reason));
                    this.phase = match sent {
                        Ok(()) => Phase::Sent(Box::pin(tokio::time::sleep(CLOSE_WAIT))),
                        Err(_) => Phase::Done,
                    };
                }
                Phase::Sent(deadline) => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        this.phase = Phase::Done;
                        continue;
                    }
                    // Messages after the close frame are not for the handler: it may not answer.
                    match ready!(Pin::new(&mut this.socket).poll_next(cx)) {
                        Some(Ok(message)) if !message.is_close() => continue,
                        _ => this.phase = Phase::Done,
                    }
                }
                Phase::Done => return Poll::Ready(None),
            }
        }
    }
}

impl<S, M, E> Closing<S, M>
where
    S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Unpin,
    M: Closable,
{
    /// The socket's next message; its end ends this stream.
    fn deliver(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<M, E>>> {
        let next = ready!(Pin::new(&mut self.socket).poll_next(cx));
        if next.is_none() {
            self.phase = Phase::Done;
        }
        Poll::Ready(next)
    }

    fn send_close(mut socket: Pin<&mut S>, cx: &mut Context<'_>, code: u16, reason: &str) -> Poll<Result<(), E>> {
        ready!(socket.as_mut().poll_ready(cx))?;
        socket.as_mut().start_send(M::close_frame(code, reason))?;
        socket.poll_flush(cx)
    }
}

impl<S, M> Sink<M> for Closing<S, M>
where
    S: Sink<M> + Unpin,
{
    type Error = S::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().socket).poll_ready(cx)
    }
    fn start_send(self: Pin<&mut Self>, item: M) -> Result<(), Self::Error> {
        Pin::new(&mut self.get_mut().socket).start_send(item)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().socket).poll_close(cx)
    }
}
