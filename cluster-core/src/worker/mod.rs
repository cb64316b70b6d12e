//! What user code in a worker (or the agent) can call: its id, readiness, the shutdown
//! signal, and messages to the master and the other processes. The channel to the master
//! behind them is the client's (`worker/client.rs`).

pub(crate) mod client;
mod closes;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use self::client::{Client, client, send_addressed};
use crate::ipc::encode;
use crate::ipc::message::{AGENT, ALL_WORKERS};
pub use crate::messaging::{Message, Peer, RequestError, SendError};

/// This worker's id (1..=N, reused by its replacements), or `None` outside a worker (the
/// agent included).
pub fn id() -> Option<u32> {
    client().map(|c| c.id).filter(|id| *id != AGENT)
}

/// Tells the master this worker is ready to serve. Needed only with
/// [`Builder::wait_ready`](crate::Builder::wait_ready) (PM2's `wait_ready`), or by a worker
/// that listens on nothing; otherwise a worker is ready once it listens. Does nothing
/// outside a worker.
pub async fn ready() {
    if let Some(client) = client() {
        let _ = client.send(encode::ready).await;
    }
}

/// Whether this process is a worker of a cluster (the agent is not).
pub fn is_worker() -> bool {
    id().is_some()
}

/// Resolves when this worker should stop: the master asked it to (graceful stop, reload) or
/// the master is gone. Outside a cluster, resolves on SIGINT or SIGTERM.
///
/// Await it beside your accept loop, stop accepting, and let open connections finish. For HTTP
/// servers, `cluster::http` (feature `http`) tells keep-alive clients before closing their
/// connections, so a reload fails no request.
pub async fn shutdown() {
    match client() {
        Some(client) => {
            client.stopped().await;
        }
        None => {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let term = async {
                match term.as_mut() {
                    Some(term) => drop(term.recv().await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
        }
    }
}

/// Whether the master has asked this worker to stop.
pub fn is_shutting_down() -> bool {
    client().is_some_and(|c| c.is_stopping())
}

/// Sends a message to the master (Node's `process.send`). Messages up to
/// [`MAX_USER_MESSAGE`](crate::MAX_USER_MESSAGE) bytes; those from one process to another
/// arrive in order. Works in workers and in the agent.
pub async fn send(data: impl Into<Bytes>) -> Result<(), SendError> {
    send_call(Peer::Master, 0, data.into()).await
}

/// Sends a message to another process: a worker (`send_to(2, …)`), the agent or the master.
/// Relayed by the master, which reports back: the call returns once the recipient's process
/// has the message, and fails with [`SendError::NoPeer`] if it is not running.
pub async fn send_to(to: impl Into<Peer>, data: impl Into<Bytes>) -> Result<(), SendError> {
    send_call(to.into(), 0, data.into()).await
}

/// Sends a message to the agent process (Egg.js's `sendToAgent`); see [`send_to`].
pub async fn send_to_agent(data: impl Into<Bytes>) -> Result<(), SendError> {
    send_call(Peer::Agent, 0, data.into()).await
}

/// Sends a message to every running worker except this process (from the agent: to every
/// worker). Fails with [`SendError::NoPeer`] if it reached none.
pub async fn broadcast(data: impl Into<Bytes>) -> Result<(), SendError> {
    send_addressed(this_client()?, ALL_WORKERS, 0, data.into()).await
}

/// Sends a request and waits at most `timeout` for the answer, which the recipient gives
/// with [`Request::reply`](crate::messaging::Request::reply). Fails at once if the recipient
/// is not running.
pub async fn request(to: impl Into<Peer>, data: impl Into<Bytes>, timeout: Duration) -> Result<Bytes, RequestError> {
    let (to, data) = (to.into().check()?, data.into());
    let client = this_client()?;
    client.calls.call(timeout, |call| send_call(to, call, data)).await
}

fn this_client() -> Result<&'static Arc<Client>, SendError> {
    client().ok_or_else(|| SendError::NoPeer("this process is not part of a cluster".into()))
}

/// Sends a user message (`call`: 0, a request id, or a reply) to `to`.
pub(crate) async fn send_call(to: Peer, call: u32, data: Bytes) -> Result<(), SendError> {
    send_addressed(this_client()?, to.check()?.wire(), call, data).await
}

/// Receives the next message from the master, a worker or the agent (Node's
/// `process.on('message')`); `None` outside a cluster or once the master is gone.
pub async fn recv() -> Option<Message> {
    client()?.messages.lock().await.recv().await
}
