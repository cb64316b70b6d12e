//! User messages between the processes of a cluster: the master, the workers and the agent
//! (Node's `worker.send` / `process.on('message')`, plus request/response).
//!
//! Payloads are bytes; with the `serde` feature, `to_json` and `Message::json` carry typed
//! values. Every message between two processes arrives whole and in order. Messages between
//! two workers, or a worker and the agent, are relayed by the master, which tells the sender
//! whether the recipient got it: sending to a process that is not running is an error.
//!
//! The addressing and the request ids travel in the message header, never in the payload, so
//! no payload can pass for a framework message or a reply.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::oneshot;

use crate::ipc::Channel;
use crate::ipc::message::{AGENT, ALL_WORKERS, MAX_USER_MESSAGE, REPLY, USER_TO_WORKER};

/// A process of the cluster, as the sender or the recipient of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// The master.
    Master,
    /// Worker `id` (1..=N): its current process.
    Worker(u32),
    /// The agent process (see [`Builder::agent`](crate::Builder::agent)).
    Agent,
}

impl Peer {
    /// The wire address: 0 for the master, the id for a worker, [`AGENT`] for the agent.
    pub(crate) fn wire(self) -> u32 {
        match self {
            Peer::Master => 0,
            Peer::Worker(id) => id,
            Peer::Agent => AGENT,
        }
    }

    pub(crate) fn from_wire(address: u32) -> Peer {
        match address {
            0 => Peer::Master,
            AGENT => Peer::Agent,
            id => Peer::Worker(id),
        }
    }

    /// Whether `id` can name a worker on the wire.
    pub(crate) fn check(self) -> Result<Peer, SendError> {
        match self {
            Peer::Worker(0) => Err(SendError::NoPeer("worker ids start at 1".into())),
            Peer::Worker(id) if id >= ALL_WORKERS => Err(SendError::NoPeer(format!("{id} is not a worker id"))),
            peer => Ok(peer),
        }
    }
}

impl From<u32> for Peer {
    /// A worker id.
    fn from(id: u32) -> Peer {
        Peer::Worker(id)
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Master => f.write_str("master"),
            Peer::Worker(id) => write!(f, "worker {id}"),
            Peer::Agent => f.write_str("agent"),
        }
    }
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The recipient is not running (or this process is not part of a cluster).
    #[error("no such peer: {0}")]
    NoPeer(String),
    /// The payload exceeds [`crate::MAX_USER_MESSAGE`] bytes.
    #[error("message of {0} bytes exceeds the limit of {max} bytes", max = MAX_USER_MESSAGE)]
    TooLarge(usize),
    /// The channel failed (the peer exited).
    #[error("channel error: {0}")]
    Io(#[from] io::Error),
}

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The request could not be sent.
    #[error(transparent)]
    Send(#[from] SendError),
    /// No reply came within the timeout (a late reply is dropped).
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// This process lost its channel before the reply came.
    #[error("the channel closed before the reply came")]
    Closed,
}

/// A message received from another process of the cluster.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Message {
    /// Who sent it.
    pub from: Peer,
    /// The payload, whole (large messages travel in fragments and are reassembled).
    pub data: Bytes,
    /// Set when the sender waits for an answer: reply with [`Request::reply`].
    pub request: Option<Request>,
}

impl Message {
    /// Decodes a payload sent with [`to_json`].
    #[cfg(feature = "serde")]
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.data)
    }
}

/// Encodes a value for sending (feature `serde`); decode it with [`Message::json`] or
/// [`from_json`]. JSON, so every serde type works, including untagged enums and maps.
#[cfg(feature = "serde")]
pub fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<Bytes, serde_json::Error> {
    serde_json::to_vec(value).map(Bytes::from)
}

/// Decodes a payload encoded with [`to_json`] (for [`Event::Message`](crate::master::Event)
/// payloads in the master).
#[cfg(feature = "serde")]
pub fn from_json<T: serde::de::DeserializeOwned>(data: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(data)
}

/// The handle to answer a request. Cheap to clone; the first reply wins, later ones are
/// dropped by the requester.
#[derive(Clone)]
pub struct Request {
    call: u32,
    route: Route,
}

#[derive(Clone)]
enum Route {
    /// Answer from a worker or the agent: through this process's channel to `to`.
    FromClient { to: Peer, via: Arc<dyn Replier> },
    /// Answer from the master: straight down this worker's channel.
    FromMaster(Arc<Channel>),
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request").field("id", &self.call).finish()
    }
}

impl Request {
    pub(crate) fn from_client(call: u32, to: Peer, via: Arc<dyn Replier>) -> Self {
        Request { call, route: Route::FromClient { to, via } }
    }

    pub(crate) fn from_master(call: u32, channel: Arc<Channel>) -> Self {
        Request { call, route: Route::FromMaster(channel) }
    }

    /// Sends the answer to the process that asked.
    pub async fn reply(&self, data: impl Into<Bytes>) -> Result<(), SendError> {
        let data = data.into();
        check_size(&data)?;
        let call = self.call | REPLY;
        match &self.route {
            Route::FromClient { to, via } => via.clone().reply(*to, call, data).await,
            Route::FromMaster(channel) => Ok(channel.send_user(USER_TO_WORKER, 0, call, &data, || {}).await?),
        }
    }
}

/// What a worker's or the agent's reply goes through (its channel client), so that this
/// module needs nothing of the worker's.
pub(crate) trait Replier: Send + Sync {
    /// Sends `data` as the reply `call` to `to`.
    fn reply(self: Arc<Self>, to: Peer, call: u32, data: Bytes) -> BoxFuture<'static, Result<(), SendError>>;
}

pub(crate) fn check_size(data: &[u8]) -> Result<(), SendError> {
    if data.len() > MAX_USER_MESSAGE { Err(SendError::TooLarge(data.len())) } else { Ok(()) }
}

/// The requests a process is waiting on, by id.
#[derive(Default)]
pub(crate) struct Calls {
    state: Mutex<CallState>,
}

#[derive(Default)]
struct CallState {
    next: u32,
    waiting: HashMap<u32, oneshot::Sender<Bytes>>,
}

impl Calls {
    /// Sends a request with `send(id)` and waits for its reply at most `timeout`.
    pub(crate) async fn call<F, Fut>(&self, timeout: Duration, send: F) -> Result<Bytes, RequestError>
    where
        F: FnOnce(u32) -> Fut,
        Fut: Future<Output = Result<(), SendError>>,
    {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.state.lock().unwrap();
            // Ids are 1..2^31; 0 means "not a request" and the top bit marks replies.
            let id = state.next % (REPLY - 1) + 1;
            state.next = id;
            state.waiting.insert(id, tx);
            id
        };
        let forget = Forget { calls: self, id };
        send(id).await?;
        let reply = tokio::time::timeout(timeout, rx).await;
        drop(forget);
        match reply {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(_)) => Err(RequestError::Closed),
            Err(_) => Err(RequestError::Timeout(timeout)),
        }
    }

    /// A reply arrived; false if nobody waits for it any more (timed out).
    pub(crate) fn complete(&self, call: u32, data: Bytes) -> bool {
        let waiting = self.state.lock().unwrap().waiting.remove(&(call & !REPLY));
        waiting.is_some_and(|tx| tx.send(data).is_ok())
    }

    /// The channel is gone: every waiting request fails.
    pub(crate) fn close(&self) {
        self.state.lock().unwrap().waiting.clear();
    }
}

/// Removes a request from the table however its wait ends (reply, timeout, cancellation).
struct Forget<'a> {
    calls: &'a Calls,
    id: u32,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.calls.state.lock().unwrap().waiting.remove(&self.id);
    }
}

/// Whether `call` marks a reply (rather than a plain message or a request).
pub(crate) fn is_reply(call: u32) -> bool {
    call & REPLY != 0
}
