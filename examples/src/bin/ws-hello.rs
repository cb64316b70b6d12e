//! `ws-hello`: long-lived connections that end cleanly when a worker stops (a reload, a master
//! upgrade, a stop). `/ws` echoes WebSocket messages and closes with 1012 "service restart" on
//! the worker's stop (`cluster::http::ws`); `/events` sends a server-sent event every 100 ms
//! and, on the stop, a last `restart` event with a `retry:` hint, then ends the stream
//! (`cluster::http::sse`); `/` answers as `hello` does, `/worker` says which worker answered.
//! Same env as `hello`.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use futures::{SinkExt, Stream, StreamExt};

#[cluster::main]
async fn main() -> std::io::Result<()> {
    let listener = cluster::net::TcpListener::bind(examples::listen_addr()).await?;
    let id = cluster::worker::id().unwrap_or(0);
    println!("worker {id} listening on http://{}", listener.local_addr()?);
    let app = Router::new()
        .route("/", get(|| async { "hello world\n" }))
        .route("/worker", get(move || async move { format!("{{\"id\":{id},\"pid\":{}}}", std::process::id()) }))
        .route("/ws", get(ws))
        .route("/events", get(events))
        .layer(cluster::http::CloseOnShutdown);
    axum::serve(listener, app).with_graceful_shutdown(cluster::http::shutdown()).await
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(echo)
}

/// Echoes text and binary messages until the client leaves or the worker stops.
async fn echo(socket: WebSocket) {
    let mut socket = cluster::http::ws::closing(socket);
    while let Some(Ok(message)) = socket.next().await {
        if matches!(message, Message::Text(_) | Message::Binary(_)) && socket.send(message).await.is_err() {
            break;
        }
    }
}

async fn events() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let id = cluster::worker::id().unwrap_or(0);
    let ticks = futures::stream::iter(0u64..).then(move |n| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(Event::default().event("tick").data(format!("{{\"worker\":{id},\"n\":{n}}}")))
    });
    Sse::new(cluster::http::sse::events(Box::pin(ticks)))
}
