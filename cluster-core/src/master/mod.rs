//! The master process: supervision (control path) and dispatch (data path), plus the handle
//! that user code running in the master gets.

mod admin;
mod control;
mod decide;
mod dispatch;
mod events;
mod listeners;
mod observe;
mod process;
mod supervisor;
mod systemd;
mod upgrade;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use self::decide::{Command, StopKind};
use self::supervisor::Ask;

use crate::config::Config;
use crate::ipc::Channel;
use crate::ipc::message::{AGENT, USER_TO_WORKER};
use crate::log::log;
use crate::messaging::{self, Calls};
pub use crate::messaging::{Peer, Request, RequestError, SendError};

/// The id that [`Event`]s and [`WorkerStatus`] give the agent process (workers are 1..=N).
pub const AGENT_ID: u32 = AGENT;

/// Channels of the workers (and the agent, under [`AGENT_ID`]) that are online, by id.
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
    /// The worker (or the agent: `id` is [`AGENT_ID`]) sent a message.
    Message {
        /// Worker id.
        id: u32,
        /// Process id.
        pid: u32,
        /// The payload.
        data: Bytes,
        /// Set when the sender waits for an answer: reply with [`Request::reply`].
        request: Option<Request>,
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
    /// A rolling reload replaced every worker (`replaced` processes) in `took`.
    ReloadDone {
        /// Worker processes replaced.
        replaced: usize,
        /// How long the reload took.
        took: std::time::Duration,
    },
    /// A rolling reload was abandoned: the new process of worker `id` died, could not start or
    /// was not ready in time. The workers not yet replaced keep serving.
    ReloadAbandoned {
        /// The worker id whose replacement failed.
        id: u32,
        /// What happened to it.
        reason: String,
    },
}

/// Why the master saw a worker end, beyond its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// It panicked (the message, as its panic hook reported it).
    Panic(String),
    /// It sent something that is not the protocol; the master killed it.
    ProtocolError(String),
    /// Its runtime sent no heartbeat within the heartbeat timeout; the master killed it.
    MissedHeartbeats,
    /// It was started to replace another and was not ready within the ready timeout.
    NotReady,
    /// It was still running at the kill timeout after being asked to stop.
    KillTimeout,
    /// It was started by a reload that was abandoned (another replacement failed).
    Abandoned,
    /// Waiting for it failed (its status is unknown).
    WaitFailed(String),
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Panic(message) => write!(f, "{message}"),
            ExitReason::ProtocolError(e) => write!(f, "{e}"),
            ExitReason::MissedHeartbeats => f.write_str("missed heartbeats"),
            ExitReason::NotReady => f.write_str("not ready in time"),
            ExitReason::KillTimeout => f.write_str("still running at the kill timeout"),
            ExitReason::Abandoned => f.write_str("its reload was abandoned"),
            ExitReason::WaitFailed(e) => write!(f, "cannot wait for it: {e}"),
        }
    }
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

/// One line of [`Handle::status`] (`Master::status`).
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
    /// Resident memory, in bytes (read from `/proc` by [`Handle::overview`]).
    pub rss: Option<u64>,
    /// CPU time used so far (by [`Handle::overview`]).
    pub cpu_time: Option<Duration>,
    /// CPU use since the previous overview (or since the process started), in % of one core
    /// (by [`Handle::overview`]).
    pub cpu_percent: Option<f64>,
    /// TCP connections the process has open (by [`Handle::overview`]).
    pub open_connections: Option<u64>,
}

/// The master itself, in an [`Overview`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MasterStatus {
    /// Its process id.
    pub pid: u32,
    /// The cluster's name (`CLUSTER_NAME`, or the binary's file name).
    pub name: String,
    /// Time since it started.
    pub uptime: Duration,
    /// This library's version.
    pub version: &'static str,
    /// The scheduling policy.
    pub policy: crate::Policy,
    /// The balancer (under `rr`).
    pub balancer: crate::Balancer,
    /// Workers wanted.
    pub workers_target: usize,
    /// The addresses the master listens on for its workers.
    pub listeners: Vec<String>,
    /// Whether a rolling reload is under way.
    pub reloading: bool,
    /// Whether the cluster is stopping.
    pub stopping: bool,
    /// Its control socket, if it serves one.
    pub control_socket: Option<std::path::PathBuf>,
}

/// The whole cluster at one instant ([`Handle::overview`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Overview {
    /// The master.
    pub master: MasterStatus,
    /// Every worker process (and the agent's, and ids waiting to restart), by id.
    pub workers: Vec<WorkerStatus>,
}

/// A rolling reload that replaced every worker ([`Handle::reload_and_wait`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reloaded {
    /// Processes replaced.
    pub replaced: usize,
    /// How long it took.
    pub took: Duration,
}

/// A master upgrade that handed over to a new master ([`Handle::upgrade`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Upgraded {
    /// The master that handed over (it retires its workers and exits).
    pub old_pid: u32,
    /// The new master, which serves now.
    pub pid: u32,
    /// How long it took, from the start of the new master to its taking over.
    pub took: Duration,
}

/// Why an operation on the cluster did not happen or did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The reload stopped when the replacement of worker `id` failed; the workers not yet
    /// replaced keep serving.
    #[error("reload abandoned: the replacement of worker {id} failed: {reason}")]
    Abandoned {
        /// The worker whose replacement failed.
        id: u32,
        /// What happened to it.
        reason: String,
    },
    /// It cannot be done (no such worker, …), or it failed; the message says which.
    #[error("{0}")]
    Refused(String),
    /// The cluster is stopping.
    #[error("the cluster is stopping")]
    Stopping,
    /// The master's supervisor is gone.
    #[error("the master has stopped")]
    Gone,
}

/// A new number of workers ([`Handle::scale`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Exactly this many (at least 1).
    To(usize),
    /// This many more.
    Add(usize),
    /// This many fewer (never below 1).
    Remove(usize),
}

impl std::str::FromStr for Scale {
    type Err = String;
    /// `4`, `+2` or `-1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a number of workers (N, +N or -N)");
        let n = |digits: &str| digits.parse::<usize>().map_err(|_| bad());
        match s.as_bytes().first() {
            Some(b'+') => n(&s[1..]).map(Scale::Add),
            Some(b'-') => n(&s[1..]).map(Scale::Remove),
            _ => n(s).and_then(|n| if n == 0 { Err(bad()) } else { Ok(Scale::To(n)) }),
        }
    }
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
    /// Why it ended, when the master knows more than its status says.
    pub reason: Option<ExitReason>,
}

/// Handle for user code running in the master: worker events, messages to workers, and
/// control (reload, scaling, status), the last two through [`Handle`] (`Master` derefs to it).
///
/// Events wait in a bounded queue of 1024: code that does not call [`recv`](Self::recv) loses
/// the events that do not fit (the master says so in its log) and never holds up the
/// supervisor; a worker's message that does not fit waits for room, and so does its sender.
/// Keep calling `recv` while awaiting something else (spawn it with a [`Handle`]).
pub struct Master {
    handle: Handle,
    events: mpsc::Receiver<Event>,
}

/// What code in the master uses to send messages and control the cluster; cheap to clone, so
/// a task can await a request while the event loop goes on.
#[derive(Clone)]
pub struct Handle {
    registry: Registry,
    calls: Arc<Calls>,
    asks: mpsc::UnboundedSender<Ask>,
    samples: Arc<observe::CpuSamples>,
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
        let (master, mut workers) = (snapshot.master, snapshot.workers);
        let samples = self.samples.clone();
        let workers = tokio::task::spawn_blocking(move || {
            samples.enrich(&mut workers);
            workers
        })
        .await
        .ok()?;
        Some(Overview { master, workers })
    }

    /// The cluster's metrics in Prometheus' text format (README, "Operating a cluster").
    pub async fn metrics(&self) -> Option<String> {
        let mut snapshot = self.snapshot().await?;
        let samples = self.samples.clone();
        tokio::task::spawn_blocking(move || {
            samples.enrich(&mut snapshot.workers);
            observe::prometheus(&snapshot)
        })
        .await
        .ok()
    }

    async fn snapshot(&self) -> Option<observe::Snapshot> {
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

/// Runs the master until the cluster stops; returns the exit code.
pub(crate) fn run(cfg: Config, hook: Option<MasterHook>) -> i32 {
    let _log = crate::log::init(cfg.log_format, cfg.log_filter.as_deref());
    // The ring of recent records exists from the first one on (`clusterctl logs`).
    crate::log::ring::ring();
    // One thread: the master's work is accept + sendmsg, and PR_SET_PDEATHSIG is tied to the
    // thread that forks, which must live as long as the master.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot build the master's runtime: {e}");
            return 1;
        }
    };
    // Connections are descriptors: the master and its workers may use all the hard limit allows.
    match crate::sys::raise_fd_limit() {
        Ok((before, after)) if after > before => {
            crate::log::note!(event = "fd_limit", before, after, "open files limit raised from {before} to {after}");
        }
        Ok(_) => {}
        Err(e) => crate::log::warning!(event = "fd_limit", error = %e, "cannot raise the open files limit: {e}"),
    }
    let mut cfg = cfg;
    if cfg.user.is_some() || cfg.group.is_some() {
        match credentials(&cfg) {
            Ok(creds) => cfg.credentials = Some(Arc::new(creds)),
            Err(e) => {
                crate::log::say!("{e}");
                return 2;
            }
        }
    }
    // A master started by an upgrade takes what its predecessor hands over first.
    let taken = match runtime.block_on(upgrade::Successor::connect()) {
        None => None,
        Some(Ok(taken)) => Some(taken),
        Some(Err(e)) => {
            log!("cannot take over from the old master: {e}");
            return 1;
        }
    };
    let (successor, mut handover) = match taken {
        Some((successor, handover)) => (Some(successor), handover),
        None => (None, upgrade::Handover::default()),
    };
    if successor.is_some() && handover.workers > 0 {
        cfg.workers = handover.workers;
    }
    let cfg = Arc::new(cfg);
    let name = cfg.name.clone().unwrap_or_else(crate::control::default_name);
    // A successor writes it when it takes over.
    if successor.is_none()
        && let Some(pid_file) = &cfg.pid_file
        && let Err(e) = pid_file::write(pid_file)
    {
        log!("cannot write the pid file {}: {e}", pid_file.display());
        return 1;
    }
    let pid_file = cfg.pid_file.clone();
    let code = runtime.block_on(async move {
        let registry = Registry::default();
        let calls = Arc::new(Calls::default());
        let (asks_tx, asks) = mpsc::unbounded_channel();
        let (events, receiver) = events::Events::new(hook.is_some());
        let handle = Handle {
            registry: registry.clone(),
            calls: calls.clone(),
            asks: asks_tx,
            samples: Arc::new(observe::CpuSamples::default()),
        };
        // Operators' ways in: the control socket and the admin endpoint, both thin layers over
        // the handle. A successor serves them (on the sockets handed over) once it takes over;
        // a master that handed over stops serving them.
        let (serving_tx, serving) = tokio::sync::watch::channel(successor.is_none());
        let control = control::serve(&cfg, &name, handle.clone(), handover.control.take(), serving.clone());
        let admin = match cfg.admin_addr {
            Some(addr) => match admin::serve(addr, handover.admin.take(), handle.clone(), serving).await {
                Ok(admin) => Some(admin),
                Err(e) => {
                    log!("cannot serve the admin endpoint on {addr}: {e}");
                    return 1;
                }
            },
            None => None,
        };
        if let (Some(hook), Some(events)) = (hook, receiver) {
            tokio::spawn(hook(Master { handle, events }));
        } else {
            drop(handle);
        }
        let info = supervisor::Info {
            name,
            control_socket: control.as_ref().map(|c| c.path().to_path_buf()),
            control_fd: control.as_ref().and_then(|c| Some((c.path().to_path_buf(), c.dup().ok()?))),
            admin_fd: admin.as_ref().and_then(|a| a.dup().ok()),
        };
        let successor = successor.map(|s| (s, handover.listeners));
        let supervisor =
            supervisor::Supervisor::new(cfg.clone(), info, registry, calls, events, asks, serving_tx, successor);
        let code = match supervisor {
            Ok(supervisor) => supervisor.run().await,
            Err(e) => {
                log!("cannot start: {e}");
                1
            }
        };
        // Let control clients (`logs -f`, `stop`) take the last records before their
        // connections close with the runtime: their tasks were woken by them, and each runs
        // when this one yields.
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        drop((control, admin));
        code
    });
    drop(runtime);
    if let Some(pid_file) = &pid_file {
        pid_file::remove(pid_file);
    }
    code
}

/// Who workers run as, checked before anything starts.
fn credentials(cfg: &Config) -> Result<crate::sys::Credentials, String> {
    let creds = crate::sys::lookup_credentials(cfg.user.as_deref(), cfg.group.as_deref())
        .map_err(|e| format!("{}/{}: {e}", crate::env::ENV_USER, crate::env::ENV_GROUP))?;
    let me = crate::sys::geteuid();
    if me != 0 && creds.uid != me {
        return Err(format!(
            "{}: workers can run as uid {} only if the master runs as root (it runs as uid {me})",
            crate::env::ENV_USER,
            creds.uid
        ));
    }
    Ok(creds)
}

/// `CLUSTER_PID_FILE`: the master's pid, written atomically, removed on exit if it still
/// names this master.
pub(super) mod pid_file {
    use std::io;
    use std::path::Path;

    pub(super) fn write(path: &Path) -> io::Result<()> {
        let pid = crate::sys::getpid();
        let tmp = path.with_file_name(format!(
            ".{}.{pid}.tmp",
            path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
        ));
        std::fs::write(&tmp, format!("{pid}\n"))?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    pub(super) fn remove(path: &Path) {
        let ours = std::fs::read_to_string(path).is_ok_and(|s| s.trim() == crate::sys::getpid().to_string());
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }
}
