//! What code in the master holds: [`Master`] (its events) and [`Handle`] (messages and
//! control). Every control call is an [`Ask`] to the supervisor's loop, answered on a oneshot;
//! the control socket and the admin endpoint use the same calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::decide::{Command, StopKind};
use super::observe::{self, Snapshot};
use super::types::{ControlError, Event, Overview, Reloaded, Scale, Upgraded, WorkerStatus};
use crate::ipc::Channel;
use crate::ipc::message::{AGENT, USER_TO_WORKER};
use crate::messaging::{self, Calls, Peer, RequestError, SendError};
use crate::sys;

/// What code in the master, the control socket and the admin endpoint ask of the supervisor
/// (see [`Handle`]).
pub(super) enum Ask {
    Command(Command),
    Status(oneshot::Sender<Vec<WorkerStatus>>),
    Snapshot(oneshot::Sender<Snapshot>),
    Reload(Reply<Reloaded>),
    Restart(u32, Reply<(u32, u32)>),
    Scale(Scale, Reply<(usize, usize)>),
    Upgrade(Reply<Upgraded>),
}

/// Where the outcome of an operation goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// Channels of the workers (and the agent, under `AGENT_ID`) that are online, by id.
/// The totals of the application's metrics (`metrics/totals.rs`).
pub(super) type AppMetrics = Arc<Mutex<crate::metrics::totals::Totals>>;

pub(super) type Registry = Arc<Mutex<HashMap<u32, Arc<Channel>>>>;

/// User code to run in the master beside the supervisor.
pub(crate) type MasterHook = Box<dyn FnOnce(Master) -> BoxFuture<'static, ()> + Send>;

/// Handle for user code running in the master: worker events, messages to workers, and
/// control (reload, scaling, status), the last two through [`Handle`] (`Master` derefs to it).
///
/// Events wait in a bounded queue of 1024: code that does not call [`recv`](Self::recv) loses
/// the events that do not fit (the master says so in its log) and never holds up the
/// supervisor; a worker's message that does not fit waits for room, and so does its sender.
/// Keep calling `recv` while awaiting something else (spawn it with a [`Handle`]).
pub struct Master {
    pub(super) handle: Handle,
    pub(super) events: mpsc::Receiver<Event>,
}

/// What code in the master uses to send messages and control the cluster; cheap to clone, so
/// a task can await a request while the event loop goes on.
#[derive(Clone)]
pub struct Handle {
    pub(super) registry: Registry,
    pub(super) calls: Arc<Calls>,
    pub(super) asks: mpsc::UnboundedSender<Ask>,
    pub(super) readings: Arc<observe::Readings>,
    pub(super) app_metrics: AppMetrics,
    pub(super) history: Arc<super::history::History>,
}

impl Master {
    /// The next worker event; `None` once the master is shutting down.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// A handle for messages and control, for other tasks.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

impl std::ops::Deref for Master {
    type Target = Handle;
    fn deref(&self) -> &Handle {
        &self.handle
    }
}

impl Handle {
    /// Ids of the workers that are online now.
    pub fn workers(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.registry.lock().unwrap().keys().copied().filter(|id| *id != AGENT).collect();
        ids.sort_unstable();
        ids
    }

    /// Sends a message to the current process of worker `to` (`send(2, …)`) or to the agent
    /// (`send(Peer::Agent, …)`). Fails with [`SendError::NoPeer`] if it is not running.
    pub async fn send(&self, to: impl Into<Peer>, data: impl Into<Bytes>) -> Result<(), SendError> {
        self.send_call(to.into(), 0, data.into()).await
    }

    /// Sends a request to a worker or the agent and waits at most `timeout` for its answer.
    pub async fn request(
        &self,
        to: impl Into<Peer>,
        data: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        let (to, data) = (to.into(), data.into());
        self.calls.call(timeout, |call| self.send_call(to, call, data)).await
    }

    async fn send_call(&self, to: Peer, call: u32, data: Bytes) -> Result<(), SendError> {
        messaging::check_size(&data)?;
        if to == Peer::Master {
            return Err(SendError::NoPeer("the master does not send to itself".into()));
        }
        let channel = self.registry.lock().unwrap().get(&to.check()?.wire()).cloned();
        let channel = channel.ok_or_else(|| SendError::NoPeer(format!("{to} is not running")))?;
        Ok(channel.send_user(USER_TO_WORKER, 0, call, &data, || {}).await?)
    }

    /// Starts a rolling reload, as SIGHUP does: each worker is replaced by a new process of
    /// the binary on disk, once that one is ready. A reload asked for during another runs
    /// after it.
    pub fn reload(&self) {
        let _ = self.asks.send(Ask::Command(Command::Reload));
    }

    /// Sets the number of workers (at least 1), as SIGTTIN / SIGTTOU do one at a time.
    pub fn set_workers(&self, n: usize) {
        let _ = self.asks.send(Ask::Command(Command::SetWorkers(n)));
    }

    /// A snapshot of every worker process (and of worker ids waiting to restart), by id. It
    /// reads nothing from `/proc` (`rss`, `cpu_*` and `open_connections` are `None`): see
    /// [`overview`](Self::overview).
    pub async fn status(&self) -> Vec<WorkerStatus> {
        let (tx, rx) = oneshot::channel();
        let _ = self.asks.send(Ask::Status(tx));
        rx.await.unwrap_or_default()
    }

    /// The master and every worker process with its memory, CPU and open connections (read
    /// from `/proc` on a blocking thread, off the master's loop); `None` once the master has
    /// stopped.
    pub async fn overview(&self) -> Option<Overview> {
        let snapshot = self.snapshot().await?;
        let (mut master, mut workers, listening) = (snapshot.master, snapshot.workers, snapshot.listening);
        let readings = self.readings.clone();
        tokio::task::spawn_blocking(move || {
            readings.enrich(&mut workers, &listening);
            (master.rss, master.cpu_time) = (sys::rss(master.pid).ok(), sys::cpu_time(master.pid).ok());
            Overview { master, workers }
        })
        .await
        .ok()
    }

    /// The cluster's metrics in Prometheus' text format (README, "Operating a cluster"): the
    /// master's own `cluster_*` series, then the application's, its counters and histograms
    /// summed over every process (feature `metrics`).
    pub async fn metrics(&self) -> Option<String> {
        self.metrics_of(false).await
    }

    /// [`metrics`](Self::metrics), with the application's counters and histograms per worker id
    /// (label `worker`) rather than summed.
    pub async fn metrics_per_worker(&self) -> Option<String> {
        self.metrics_of(true).await
    }

    pub(super) async fn metrics_of(&self, per_worker: bool) -> Option<String> {
        let mut snapshot = self.snapshot().await?;
        let (readings, app) = (self.readings.clone(), self.app_metrics.clone());
        tokio::task::spawn_blocking(move || {
            readings.enrich(&mut snapshot.workers, &snapshot.listening);
            let mut text = observe::prometheus(&snapshot);
            app.lock().unwrap_or_else(|e| e.into_inner()).exposition(per_worker, &mut text);
            text
        })
        .await
        .ok()
    }

    pub(super) async fn snapshot(&self) -> Option<observe::Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.asks.send(Ask::Snapshot(tx)).ok()?;
        rx.await.ok()
    }

    /// Starts a rolling reload (as [`reload`](Self::reload) does) and waits until it is over:
    /// every worker replaced, or the reload abandoned (a new process died, could not start or
    /// was not ready in time; the old ones keep serving). A reload asked for during another
    /// runs after it, and this waits for that one.
    pub async fn reload_and_wait(&self) -> Result<Reloaded, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.asks.send(Ask::Reload(tx)).map_err(|_| ControlError::Gone)?;
        rx.await.unwrap_or(Err(ControlError::Gone))
    }

    /// Replaces worker `id` by a new process of the binary on disk, the new one first (the
    /// old one retires once the new one is ready); returns `(old pid, new pid)`.
    pub async fn restart(&self, id: u32) -> Result<(u32, u32), ControlError> {
        let (tx, rx) = oneshot::channel();
        self.asks.send(Ask::Restart(id, tx)).map_err(|_| ControlError::Gone)?;
        rx.await.unwrap_or(Err(ControlError::Gone))
    }

    /// Changes the number of workers; returns `(before, after)`. New workers start at once;
    /// removed ones (highest ids first) retire gracefully.
    pub async fn scale(&self, to: Scale) -> Result<(usize, usize), ControlError> {
        let (tx, rx) = oneshot::channel();
        self.asks.send(Ask::Scale(to, tx)).map_err(|_| ControlError::Gone)?;
        rx.await.map_err(|_| ControlError::Gone)?
    }

    /// Upgrades the master, as SIGUSR2 does: starts a new master from the binary on disk with
    /// this one's arguments and environment, hands it every listening socket (and the control
    /// socket and the admin endpoint), and once its workers are all ready lets it serve; this
    /// master then retires its workers gracefully and exits 0. Fails, with this master serving
    /// on, if the new one exits, is not ready within the ready timeout or cannot agree on the
    /// handover; refused during a rolling reload or another upgrade (README, "Upgrading the
    /// master").
    pub async fn upgrade(&self) -> Result<Upgraded, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.asks.send(Ask::Upgrade(tx)).map_err(|_| ControlError::Gone)?;
        rx.await.unwrap_or(Err(ControlError::Gone))
    }

    /// Stops the cluster, as SIGTERM (`fast: false`: workers finish their connections) or
    /// SIGQUIT (`fast: true`: workers are killed) do.
    pub fn stop(&self, fast: bool) {
        let kind = if fast { StopKind::Fast } else { StopKind::Graceful };
        let _ = self.asks.send(Ask::Command(Command::Stop(kind)));
    }

    /// Sends a message to every online worker (not the agent); returns how many it reached.
    pub async fn broadcast(&self, data: impl Into<Bytes>) -> Result<usize, SendError> {
        let data = data.into();
        messaging::check_size(&data)?;
        let mut reached = 0;
        for id in self.workers() {
            if self.send(id, data.clone()).await.is_ok() {
                reached += 1;
            }
        }
        Ok(reached)
    }
}
