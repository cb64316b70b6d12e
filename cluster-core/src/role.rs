//! Which process am I: the master, a worker, or a single process with no cluster.
//!
//! The master marks each worker it starts with `CLUSTER_UNIQUE_ID` (the worker id) and
//! `CLUSTER_CHANNEL_FD` (the inherited IPC socket). A worker reads both, checks the fd, and
//! removes them from its environment so programs it starts are not mistaken for workers.

use std::os::fd::{OwnedFd, RawFd};

use crate::env::{ENV_CHANNEL_FD, ENV_UNIQUE_ID, ENV_WORKERS};
use crate::sys::{self, ChannelFdError};

/// The value of [`ENV_UNIQUE_ID`] in the agent process.
pub(crate) const AGENT_UNIQUE_ID: &str = "agent";

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
