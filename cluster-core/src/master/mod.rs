//! The master process: supervision (control path) and dispatch (data path), plus the handle
//! that user code running in the master gets.

mod dispatch;
mod supervisor;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use self::supervisor::Command;

use crate::config::Config;
use crate::ipc::Channel;
use crate::ipc::message::{MAX_USER_MESSAGE, USER_TO_WORKER};
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
    /// The worker is ready: it listens on every address its predecessor did (or called
    /// [`worker::ready`](crate::worker::ready)).
    Ready {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
    },
    /// Worker `id` died young again: it is restarted after `delay` (crash-loop backoff).
    CrashLoop {
        /// Worker id.
        id: u32,
        /// Restarts of this worker id so far.
        restarts: u32,
        /// Delay before the next start.
        delay: Duration,
    },
    /// The worker process is gone.
    Exit(ExitInfo),
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum WorkerState {
    /// The process runs; it has not said hello yet.
    Starting,
    /// Connected to the master, running user code, not ready yet.
    Online,
    /// Serving: listening on its addresses (or it called `ready()`).
    Ready,
    /// Retiring: gets no new connections, finishes its own, then exits.
    Stopping,
    /// No process: waiting to restart after crashing young (see `restart_in`).
    Backoff,
}

/// One line of [`Master::status`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// Worker id.
    pub id: u32,
    /// Process id (`None` while in backoff).
    pub pid: Option<u32>,
    /// Its state.
    pub state: WorkerState,
    /// Time since the process started.
    pub uptime: Duration,
    /// Restarts of this worker id so far.
    pub restarts: u32,
    /// Connections this process accepted.
    pub connections: u64,
    /// Time until the next start, in backoff.
    pub restart_in: Option<Duration>,
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

/// Handle for user code running in the master: worker events, messages to workers, and
/// control (reload, scaling, status).
pub struct Master {
    registry: Registry,
    events: mpsc::UnboundedReceiver<Event>,
    commands: mpsc::UnboundedSender<Command>,
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
        Ok(channel.send_user(USER_TO_WORKER, 0, &data).await?)
    }

    /// Starts a rolling reload, as SIGHUP does: each worker is replaced by a new process of
    /// the binary on disk, once that one is ready. A reload asked for during another runs
    /// after it.
    pub fn reload(&self) {
        let _ = self.commands.send(Command::Reload);
    }

    /// Sets the number of workers (at least 1), as SIGTTIN / SIGTTOU do one at a time.
    pub fn set_workers(&self, n: usize) {
        let _ = self.commands.send(Command::SetWorkers(n));
    }

    /// A snapshot of every worker process (and of worker ids waiting to restart), by id.
    pub async fn status(&self) -> Vec<WorkerStatus> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Status(tx));
        rx.await.unwrap_or_default()
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
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let events = hook.map(|hook| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(hook(Master { registry: registry.clone(), events: rx, commands: commands_tx }));
            tx
        });
        match supervisor::Supervisor::new(Arc::new(cfg), registry, events, commands) {
            Ok(supervisor) => supervisor.run().await,
            Err(e) => {
                log!("cannot start: {e}");
                1
            }
        }
    })
}
