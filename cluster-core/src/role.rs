//! Which process am I: the master, a worker, or a single process with no cluster.
//!
//! The master marks each worker it starts with `CLUSTER_UNIQUE_ID` (the worker id) and
//! `CLUSTER_CHANNEL_FD` (the inherited IPC socket). A worker reads both, checks the fd, and
//! removes them from its environment so programs it starts are not mistaken for workers.

use std::os::fd::{OwnedFd, RawFd};

use crate::sys::{self, ChannelFdError};

/// Set by the master in each worker: the worker id (1..=N), or `agent` in the agent process.
pub const ENV_UNIQUE_ID: &str = "CLUSTER_UNIQUE_ID";
/// The value of [`ENV_UNIQUE_ID`] in the agent process.
pub(crate) const AGENT_UNIQUE_ID: &str = "agent";
/// Set by the master in each worker: the fd number of the IPC channel.
pub const ENV_CHANNEL_FD: &str = "CLUSTER_CHANNEL_FD";
/// Number of workers; overrides the code's setting. `0` runs one process with no master.
pub const ENV_WORKERS: &str = "CLUSTER_WORKERS";
/// Kill timeout of a stopping worker, in ms.
pub const ENV_KILL_TIMEOUT_MS: &str = "CLUSTER_KILL_TIMEOUT_MS";
/// How long a reload waits for a new worker to be ready, in ms.
pub const ENV_READY_TIMEOUT_MS: &str = "CLUSTER_READY_TIMEOUT_MS";
/// `1`: a worker is ready only once it calls `cluster::worker::ready()`.
pub const ENV_WAIT_READY: &str = "CLUSTER_WAIT_READY";
/// Heartbeat timeout in ms; `0` turns liveness checks off.
pub const ENV_HEARTBEAT_TIMEOUT_MS: &str = "CLUSTER_HEARTBEAT_TIMEOUT_MS";
/// Minimum uptime (ms) below which an exit counts as a crash loop.
pub const ENV_MIN_UPTIME_MS: &str = "CLUSTER_MIN_UPTIME_MS";
/// First restart delay of a crash loop, in ms.
pub const ENV_RESTART_DELAY_MS: &str = "CLUSTER_RESTART_DELAY_MS";
/// Largest restart delay of a crash loop, in ms.
pub const ENV_RESTART_DELAY_MAX_MS: &str = "CLUSTER_RESTART_DELAY_MAX_MS";
/// Resident memory limit per worker, in MiB; `0` means none.
pub const ENV_MAX_RSS_MB: &str = "CLUSTER_MAX_RSS_MB";
/// Connections a worker accepts before it is replaced; `0` means no limit.
pub const ENV_MAX_CONNECTIONS: &str = "CLUSTER_MAX_CONNECTIONS";
/// Random extra connections per worker on top of `CLUSTER_MAX_CONNECTIONS`.
pub const ENV_MAX_CONNECTIONS_JITTER: &str = "CLUSTER_MAX_CONNECTIONS_JITTER";
/// Scheduling policy: `rr`, `shared` or `reuseport`.
pub const ENV_SCHED_POLICY: &str = "CLUSTER_SCHED_POLICY";
/// Balancer under `rr`: `round-robin`, `least-connections` or `sticky`.
pub const ENV_BALANCER: &str = "CLUSTER_BALANCER";
/// Connections handed to one worker and not yet acknowledged, at most.
pub const ENV_WINDOW: &str = "CLUSTER_WINDOW";
/// Threads of the master that accept connections under `rr` (default 1).
pub const ENV_ACCEPT_THREADS: &str = "CLUSTER_ACCEPT_THREADS";
/// Microseconds the master lets new connections gather between accept passes while they keep
/// coming (`rr`; default 100, `0` turns it off).
pub const ENV_ACCEPT_GATHER_US: &str = "CLUSTER_ACCEPT_GATHER_US";
/// Open connections per worker, at most (`rr`); `0` means no limit.
pub const ENV_MAX_WORKER_CONNECTIONS: &str = "CLUSTER_MAX_WORKER_CONNECTIONS";
/// `0`: a first start where no worker gets ready keeps retrying instead of stopping the master.
pub const ENV_FAIL_FAST: &str = "CLUSTER_FAIL_FAST";
/// The master's log format: `text` (default) or `json` (one object per line).
pub const ENV_LOG_FORMAT: &str = "CLUSTER_LOG_FORMAT";
/// Filter of the master's log: a level, or `target=level` directives (default `info`).
pub const ENV_LOG: &str = "CLUSTER_LOG";
/// Workers replaced at a time by a rolling reload.
pub const ENV_RELOAD_CONCURRENCY: &str = "CLUSTER_RELOAD_CONCURRENCY";
/// The user workers (and the agent) run as: a name or a uid. The master stays as it was
/// started (e.g. root, to bind port 80).
pub const ENV_USER: &str = "CLUSTER_USER";
/// The group workers run as (default: the user's primary group).
pub const ENV_GROUP: &str = "CLUSTER_GROUP";
/// The cluster's name (control socket file name, `clusterctl ls`); default: the binary's name.
pub const ENV_NAME: &str = "CLUSTER_NAME";
/// Path of the control socket, or `off`; default `<dir>/<name>-<pid>.sock` (README,
/// "Operating a cluster").
pub const ENV_CONTROL_SOCKET: &str = "CLUSTER_CONTROL_SOCKET";
/// A file the master writes its pid to, and removes when it exits.
pub const ENV_PID_FILE: &str = "CLUSTER_PID_FILE";
/// `host:port` of the master's admin HTTP endpoint (`/healthz`, `/readyz`, `/metrics`).
pub const ENV_ADMIN_ADDR: &str = "CLUSTER_ADMIN_ADDR";
/// `1`: workers' stdout and stderr go through the master, each line prefixed with the worker.
pub const ENV_LOG_CAPTURE: &str = "CLUSTER_LOG_CAPTURE";

/// Where the master puts the channel in each worker.
pub(crate) const CHANNEL_FD: RawFd = 3;

/// The role of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Supervises workers and owns the listening sockets.
    Master,
    /// Runs the application; `id` is 1..=N.
    Worker {
        /// The worker id.
        id: u32,
    },
    /// Runs the agent: singleton work, no connections (see
    /// [`Builder::agent`](crate::Builder::agent)).
    Agent,
    /// No cluster: the application runs in this one process (`CLUSTER_WORKERS=0`).
    Standalone,
}

/// How this process was started, with what a worker needs to connect.
pub(crate) enum Start {
    Master { workers: usize },
    Worker { id: u32, channel: OwnedFd },
    Agent { channel: OwnedFd },
    Standalone,
}

/// The environment does not describe a valid process of a cluster.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `CLUSTER_UNIQUE_ID` is neither a positive integer nor `agent`.
    #[error("{ENV_UNIQUE_ID}={0:?} is not a worker id (a positive integer) or `agent`")]
    BadId(String),
    /// Started as the agent, but this program has no agent.
    #[error("{ENV_UNIQUE_ID}=agent, but this program defines no agent (Builder::agent / `agent = path`)")]
    NoAgent,
    /// A worker without `CLUSTER_CHANNEL_FD`.
    #[error(
        "{ENV_UNIQUE_ID} is set but {ENV_CHANNEL_FD} is missing: workers are started by the cluster master, not by hand"
    )]
    MissingChannel,
    /// `CLUSTER_CHANNEL_FD` is not a descriptor number.
    #[error("{ENV_CHANNEL_FD}={0:?} is not a file descriptor number")]
    BadChannelNumber(String),
    /// The descriptor is not a usable channel.
    #[error("{ENV_CHANNEL_FD}: {0}")]
    BadChannel(#[from] ChannelFdError),
    /// `CLUSTER_WORKERS` is not a count.
    #[error("{ENV_WORKERS}={0:?} is not a number of workers (0 runs without a master)")]
    BadWorkers(String),
    /// A `CLUSTER_*` setting that does not parse.
    #[error("{name}={value:?} is not a valid value: expected {expected}")]
    BadSetting {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What it takes.
        expected: &'static str,
    },
}

/// Reads the environment once, at start-up, while the process is single-threaded.
pub(crate) fn detect(default_workers: usize, has_agent: bool) -> Result<Start, StartError> {
    if let Some(id) = std::env::var_os(ENV_UNIQUE_ID) {
        let id = id.to_string_lossy().into_owned();
        let parsed = match id.as_str() {
            AGENT_UNIQUE_ID if !has_agent => return Err(StartError::NoAgent),
            AGENT_UNIQUE_ID => None,
            _ => Some(id.parse::<u32>().ok().filter(|id| (1..u32::MAX - 1).contains(id)).ok_or(StartError::BadId(id))?),
        };
        let fd = std::env::var_os(ENV_CHANNEL_FD).ok_or(StartError::MissingChannel)?;
        let fd = fd.to_string_lossy().into_owned();
        let raw = fd.parse::<RawFd>().ok().filter(|fd| *fd >= 0).ok_or(StartError::BadChannelNumber(fd))?;
        let channel = sys::adopt_channel_fd(raw)?;
        if !(sys::remove_env(ENV_UNIQUE_ID) && sys::remove_env(ENV_CHANNEL_FD)) {
            crate::log::say!(
                "other threads were running when the cluster started, so {ENV_UNIQUE_ID} and \
                 {ENV_CHANNEL_FD} stay in this worker's environment (start the cluster first in main)"
            );
        }
        return Ok(match parsed {
            Some(id) => Start::Worker { id, channel },
            None => Start::Agent { channel },
        });
    }
    let workers = match std::env::var_os(ENV_WORKERS) {
        Some(n) => {
            let n = n.to_string_lossy().into_owned();
            n.trim().parse::<usize>().map_err(|_| StartError::BadWorkers(n))?
        }
        None => default_workers,
    };
    Ok(if workers == 0 { Start::Standalone } else { Start::Master { workers } })
}
