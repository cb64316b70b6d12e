//! The master process: supervision (control path) and dispatch (data path), plus the handle
//! that user code running in the master gets.

mod dispatch;
mod supervisor;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::ipc::Channel;
use crate::ipc::message::{MAX_USER_MESSAGE, encode};
use crate::log::log;
pub use crate::worker::SendError;

/// Channels of the workers that are online, by worker id.
type Registry = Arc<Mutex<HashMap<u32, Arc<Channel>>>>;

/// User code to run in the master beside the supervisor.
pub(crate) type MasterHook = Box<dyn FnOnce(Master) -> BoxFuture<'static, ()> + Send>;

/// Something that happened to a worker, as seen by the master (Node's `cluster.on(...)`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A worker process was started.
    Fork {
        /// Worker id (1..=N).
        id: u32,
        /// Its process id.
        pid: u32,
    },
    /// The worker connected to the master and is running user code.
    Online {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
    },
    /// The worker listens on `addr`.
    Listening {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
        /// The bound address.
        addr: SocketAddr,
    },
    /// The worker sent a message.
    Message {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
        /// The payload.
        data: Bytes,
    },
    /// The master asked the worker to stop.
    Disconnect {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
    },
    /// The worker process is gone.
    Exit(ExitInfo),
}

/// How a worker ended.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExitInfo {
    /// Worker id.
    pub id: u32,
    /// Process id.
    pub pid: u32,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// Whether the master had asked it to stop (Node's `exitedAfterDisconnect`).
    pub after_disconnect: bool,
}

/// Handle for user code running in the master: worker events and messages to workers.
pub struct Master {
    registry: Registry,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Master {
    /// The next worker event; `None` once the master is shutting down.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Ids of the workers that are online now.
    pub fn workers(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.registry.lock().unwrap().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Sends a message to the current process of worker `id`.
    pub async fn send(&self, id: u32, data: impl Into<Bytes>) -> Result<(), SendError> {
        let data = data.into();
        if data.len() > MAX_USER_MESSAGE {
            return Err(SendError::TooLarge(data.len()));
        }
        let channel = self.registry.lock().unwrap().get(&id).cloned();
        let channel = channel.ok_or_else(|| SendError::NoPeer(format!("worker {id} is not running")))?;
        let mut out = BytesMut::with_capacity(data.len() + 1);
        encode::user(&mut out, &data);
        Ok(channel.send(&out).await?)
    }

    /// Sends a message to every online worker; returns how many it reached.
    pub async fn broadcast(&self, data: impl Into<Bytes>) -> Result<usize, SendError> {
        let data = data.into();
        let mut reached = 0;
        for id in self.workers() {
            if self.send(id, data.clone()).await.is_ok() {
                reached += 1;
            }
        }
        Ok(reached)
    }
}

/// Runs the master until the cluster stops; returns the exit code.
pub(crate) fn run(cfg: Config, hook: Option<MasterHook>) -> i32 {
    // One thread: the master's work is accept + sendmsg, and PR_SET_PDEATHSIG is tied to the
    // thread that forks, which must live as long as the master.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot build the master's runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async move {
        let registry = Registry::default();
        let events = hook.map(|hook| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(hook(Master { registry: registry.clone(), events: rx }));
            tx
        });
        match supervisor::Supervisor::new(Arc::new(cfg), registry, events) {
            Ok(supervisor) => supervisor.run().await,
            Err(e) => {
                log!("cannot start: {e}");
                1
            }
        }
    })
}
