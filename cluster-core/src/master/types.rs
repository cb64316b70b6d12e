//! The master's public vocabulary: what happens to workers ([`Event`], [`ExitInfo`]), what
//! they are doing ([`WorkerStatus`], [`Overview`]), and how an operation turned out
//! ([`Reloaded`], [`Upgraded`], [`ControlError`]). Plain data, shared by the decision core, the
//! supervisor and the operators' ways in; it depends on nothing of the master.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use crate::ipc::message::AGENT;
use crate::messaging::Request;

/// Internal id of one worker process: a serial number, unique and never reused (worker ids are
/// reused by replacements).
pub(crate) type Serial = u64;

/// The id that [`Event`]s and [`WorkerStatus`] give the agent process (workers are 1..=N).
pub const AGENT_ID: u32 = AGENT;

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
    /// A graceful stop began with a stop delay: the master is not ready from now on, and
    /// serves on for `delay` before it drains (so load balancers stop sending first).
    Stopping {
        /// How long it serves on.
        delay: Duration,
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

/// One line of [`Handle::status`](crate::master::Handle::status) (`Master::status`).
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
    /// Time until it is killed, while it retires (the kill timeout's deadline: what its
    /// connections have left to finish).
    pub kill_in: Option<Duration>,
    /// Resident memory, in bytes (read from `/proc` by [`Handle::overview`](crate::master::Handle::overview)).
    pub rss: Option<u64>,
    /// CPU time used so far (by [`Handle::overview`](crate::master::Handle::overview)).
    pub cpu_time: Option<Duration>,
    /// CPU use since the previous overview (or since the process started), in % of one core
    /// (by [`Handle::overview`](crate::master::Handle::overview)).
    pub cpu_percent: Option<f64>,
    /// TCP connections the process has open (by [`Handle::overview`](crate::master::Handle::overview)).
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
    /// Whether an upgrade of the master is under way (this one starting its successor, or
    /// taking over from its predecessor).
    pub upgrading: bool,
    /// Whether the cluster is stopping.
    pub stopping: bool,
    /// While a graceful stop waits out its stop delay (serving, not ready): how long until it
    /// drains.
    pub stop_in: Option<Duration>,
    /// Its control socket, if it serves one.
    pub control_socket: Option<std::path::PathBuf>,
    /// Its resident memory (by [`Handle::overview`](crate::master::Handle::overview)).
    pub rss: Option<u64>,
    /// CPU time (user + system) it has used (by [`Handle::overview`](crate::master::Handle::overview)).
    pub cpu_time: Option<Duration>,
}

/// The whole cluster at one instant ([`Handle::overview`](crate::master::Handle::overview)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Overview {
    /// The master.
    pub master: MasterStatus,
    /// Every worker process (and the agent's, and ids waiting to restart), by id.
    pub workers: Vec<WorkerStatus>,
}

/// A rolling reload that replaced every worker ([`Handle::reload_and_wait`](crate::master::Handle::reload_and_wait)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reloaded {
    /// Processes replaced.
    pub replaced: usize,
    /// How long it took.
    pub took: Duration,
}

/// A master upgrade that handed over to a new master ([`Handle::upgrade`](crate::master::Handle::upgrade)).
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

/// A new number of workers ([`Handle::scale`](crate::master::Handle::scale)).
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
