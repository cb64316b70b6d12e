//! Every environment variable the cluster reads. The settings ones override the code's
//! settings, in the master and in workers alike (README, "Environment variables").
//!
//! A leaf of the crate: it names the variables and what each takes, and imports nothing, so
//! the modules that read them (`role.rs`, `config.rs`, `log.rs`, `master/`) depend on it and
//! never on each other for a name.

/// Set by the master in each worker: the worker id (1..=N), or `agent` in the agent process.
pub const ENV_UNIQUE_ID: &str = "CLUSTER_UNIQUE_ID";
/// Set by the master in each worker: the fd number of the IPC channel.
pub const ENV_CHANNEL_FD: &str = "CLUSTER_CHANNEL_FD";
/// Number of workers; overrides the code's setting. `0` runs one process with no master.
pub const ENV_WORKERS: &str = "CLUSTER_WORKERS";
/// Kill timeout of a stopping worker, in ms.
pub const ENV_KILL_TIMEOUT_MS: &str = "CLUSTER_KILL_TIMEOUT_MS";
/// On a graceful stop, how long the master stays up and serving, not ready, before it drains,
/// in ms (so a load balancer stops sending first).
pub const ENV_STOP_DELAY_MS: &str = "CLUSTER_STOP_DELAY_MS";
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

/// Histogram buckets by metric name (feature `metrics`): `name=0.01,0.1,1;other=…`.
pub const ENV_METRICS_BUCKETS: &str = "CLUSTER_METRICS_BUCKETS";

/// Set by a master in the new master it starts for an upgrade: the handover channel's fd
/// number (`master/upgrade`).
pub(crate) const ENV_UPGRADE_FD: &str = "CLUSTER_UPGRADE_FD";

/// What a `CLUSTER_*` setting takes, for the error that names a bad value.
pub(crate) fn expected(name: &str) -> &'static str {
    match name {
        ENV_SCHED_POLICY => "`rr`, `shared` or `reuseport`",
        ENV_BALANCER => "`round-robin`, `least-connections` or `sticky`",
        ENV_LOG_FORMAT => "`text` or `json`",
        ENV_LOG => "a level such as `info`, or `target=level` directives such as `cluster=debug`",
        ENV_WAIT_READY | ENV_FAIL_FAST | ENV_LOG_CAPTURE => "`0` or `1`",
        ENV_NAME => "letters, digits, `.`, `_` or `-` (at most 64, not starting with `.` or `-`)",
        ENV_CONTROL_SOCKET => "`off` or an absolute path",
        ENV_PID_FILE => "an absolute path",
        ENV_ADMIN_ADDR => "an address and port such as `127.0.0.1:9100`",
        ENV_ACCEPT_THREADS => "a whole number from 1 to 64",
        ENV_ACCEPT_GATHER_US => "a number of microseconds from 0 to 10000",
        ENV_METRICS_BUCKETS => "`name=bound,bound,…` items separated by `;`, bounds increasing",
        _ if name.ends_with("_MS") => "a number of milliseconds",
        _ => "a whole number",
    }
}
