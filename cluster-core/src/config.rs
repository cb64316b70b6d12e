//! The cluster's settings: plain data, filled in by the builder (`builder.rs`) and the
//! `CLUSTER_*` environment variables.

use std::ffi::OsString;
use std::time::Duration;

use crate::env::*;
use crate::log::LogFormat;
use crate::role::StartError;

/// The most accept threads a master runs (`CLUSTER_ACCEPT_THREADS`).
pub(crate) const MAX_ACCEPT_THREADS: usize = 64;

/// How long new connections gather between the master's accept passes by default.
pub(crate) const DEFAULT_ACCEPT_GATHER: Duration = Duration::from_micros(100);
/// The longest gathering time a setting may ask for.
pub(crate) const MAX_ACCEPT_GATHER: Duration = Duration::from_millis(10);

/// Settings shared by the master and its workers.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) workers: usize,
    pub(crate) kill_timeout: Duration,
    /// How long a graceful stop keeps serving, not ready, before it drains; `None`: the
    /// default ([`Config::stop_delay`]).
    pub(crate) stop_delay: Option<Duration>,
    pub(crate) backlog: i32,
    pub(crate) window: usize,
    /// Threads of the master that accept connections under `rr`.
    pub(crate) accept_threads: usize,
    /// How long new connections gather between accept passes while they keep coming.
    pub(crate) accept_gather: Duration,
    pub(crate) worker_threads: Option<usize>,
    pub(crate) exit_on_panic: bool,
    pub(crate) ready_timeout: Duration,
    pub(crate) wait_ready: bool,
    pub(crate) heartbeat_timeout: Option<Duration>,
    pub(crate) min_uptime: Duration,
    pub(crate) restart_delay: Duration,
    pub(crate) restart_delay_max: Duration,
    pub(crate) max_rss: Option<u64>,
    pub(crate) max_connections: Option<u64>,
    pub(crate) max_connections_jitter: u64,
    pub(crate) reload_concurrency: usize,
    /// An agent process runs beside the workers.
    pub(crate) agent: bool,
    pub(crate) policy: Policy,
    pub(crate) balancer: Balancer,
    /// Most open connections per worker (`rr` only); more wait in the master / kernel.
    pub(crate) max_worker_connections: Option<u64>,
    /// Whether a first start where no worker gets ready stops the master (exit 1).
    pub(crate) fail_fast: bool,
    /// How the master writes its log when the program has no subscriber of its own.
    pub(crate) log_format: LogFormat,
    /// `CLUSTER_LOG`: an `EnvFilter` directive for the master's log.
    pub(crate) log_filter: Option<String>,
    /// Whether workers' output goes through the master, prefixed (`CLUSTER_LOG_CAPTURE`).
    pub(crate) log_capture: bool,
    /// The cluster's name; `None`: the binary's file name.
    pub(crate) name: Option<String>,
    /// Where the control socket goes.
    pub(crate) control_socket: ControlSocket,
    /// `CLUSTER_PID_FILE`.
    pub(crate) pid_file: Option<std::path::PathBuf>,
    /// `CLUSTER_ADMIN_ADDR`: the admin HTTP endpoint.
    pub(crate) admin_addr: Option<std::net::SocketAddr>,
    /// `CLUSTER_USER` / `CLUSTER_GROUP`: who workers run as (names or numbers).
    pub(crate) user: Option<String>,
    pub(crate) group: Option<String>,
    /// Histogram buckets by metric name (`metrics`).
    pub(crate) histogram_buckets: crate::metrics::Buckets,
    /// Whether workers install the cluster's metrics recorder as the global one.
    pub(crate) metrics_recorder: bool,
    /// The two above, resolved by the master before anything starts.
    pub(crate) credentials: Option<std::sync::Arc<crate::sys::Credentials>>,
}

/// Where the master serves its control socket (`CLUSTER_CONTROL_SOCKET`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum ControlSocket {
    /// `<dir>/<name>-<pid>.sock` (see `master/control.rs`).
    #[default]
    Default,
    /// No control socket.
    Off,
    /// This path.
    Path(std::path::PathBuf),
}

impl std::str::FromStr for ControlSocket {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "off" => Ok(ControlSocket::Off),
            "" => Err(()),
            _ if s.starts_with('/') => Ok(ControlSocket::Path(s.into())),
            _ => Err(()),
        }
    }
}

/// How connections reach workers (README, "Scheduling: policies and balancers");
/// `CLUSTER_SCHED_POLICY` overrides the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Policy {
    /// The master accepts and hands each connection to a worker (default), balanced by a
    /// [`Balancer`]. The only policy that never loses a queued connection to a worker's death.
    #[default]
    Rr,
    /// Every worker accepts on the master's listening socket itself (the kernel picks).
    Shared,
    /// The master binds one `SO_REUSEPORT` socket per worker id and each worker accepts on its
    /// own (the kernel spreads by a hash of the client address).
    ReusePort,
}

/// Which worker gets the next connection under [`Policy::Rr`]; `CLUSTER_BALANCER` overrides the
/// code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Balancer {
    /// Each worker in turn (default).
    #[default]
    RoundRobin,
    /// The worker with the fewest open connections (workers report closes, batched).
    LeastConnections,
    /// By a hash of the client's IP address: the same client goes to the same worker id while
    /// that worker runs, and is remapped when it stops (rendezvous hashing: only its clients move).
    Sticky,
}

impl std::str::FromStr for Policy {
    type Err = String;
    /// `rr`, `shared` (or `none`, Node's name) or `reuseport`; the error lists them.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rr" => Ok(Policy::Rr),
            "shared" | "none" => Ok(Policy::Shared),
            "reuseport" => Ok(Policy::ReusePort),
            _ => Err(format!("unknown policy {s:?}: expected {}", expected(ENV_SCHED_POLICY))),
        }
    }
}

impl std::str::FromStr for Balancer {
    type Err = String;
    /// `round-robin`, `least-connections` or `sticky` (and the short forms `rr`, `least-conn`,
    /// `ip-hash`); the error lists them.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" | "rr" => Ok(Balancer::RoundRobin),
            "least-connections" | "least-conn" => Ok(Balancer::LeastConnections),
            "sticky" | "ip-hash" => Ok(Balancer::Sticky),
            _ => Err(format!("unknown balancer {s:?}: expected {}", expected(ENV_BALANCER))),
        }
    }
}

/// The stop delay of a master with an admin endpoint, unless set.
pub(crate) const DEFAULT_STOP_DELAY: Duration = Duration::from_secs(1);

impl Config {
    /// How long a graceful stop (SIGTERM, `clusterctl stop`) keeps serving while `/readyz`
    /// says 503, before the drain. Unless set: [`DEFAULT_STOP_DELAY`] with an admin endpoint,
    /// whose `/readyz` a load balancer may be checking, and none without, since then nothing
    /// can see the master's readiness and waiting would buy nothing. A first SIGINT (a
    /// terminal's Ctrl-C) never waits.
    pub(crate) fn stop_delay(&self) -> Duration {
        self.stop_delay.unwrap_or(if self.admin_addr.is_some() { DEFAULT_STOP_DELAY } else { Duration::ZERO })
    }

    /// How often a worker sends a heartbeat: a few per timeout, at most one a second.
    pub(crate) fn heartbeat_interval(&self) -> Option<Duration> {
        self.heartbeat_timeout.map(|t| (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)))
    }

    /// Whether workers report closed connections (the balancer or the cap needs them).
    pub(crate) fn counts_closes(&self) -> bool {
        self.policy == Policy::Rr
            && (self.balancer == Balancer::LeastConnections || self.max_worker_connections.is_some())
    }

    /// Applies the `CLUSTER_*` environment variables, which override the code's settings.
    pub(crate) fn apply_env(&mut self) -> Result<(), StartError> {
        self.apply_env_from(&|name| std::env::var_os(name))
    }

    /// [`apply_env`](Self::apply_env) with the variables that `get` gives (the fuzz target
    /// `settings` drives this).
    pub(crate) fn apply_env_from(&mut self, get: &dyn Fn(&str) -> Option<OsString>) -> Result<(), StartError> {
        let ms = Duration::from_millis;
        if let Some(v) = var(get, ENV_KILL_TIMEOUT_MS)? {
            self.kill_timeout = ms(v);
        }
        if let Some(v) = var(get, ENV_STOP_DELAY_MS)? {
            self.stop_delay = Some(ms(v));
        }
        if let Some(v) = var(get, ENV_READY_TIMEOUT_MS)? {
            self.ready_timeout = ms(v);
        }
        if let Some(v) = var::<u8>(get, ENV_WAIT_READY)? {
            self.wait_ready = v != 0;
        }
        if let Some(v) = var(get, ENV_HEARTBEAT_TIMEOUT_MS)? {
            self.heartbeat_timeout = (v > 0).then(|| ms(v));
        }
        if let Some(v) = var(get, ENV_MIN_UPTIME_MS)? {
            self.min_uptime = ms(v);
        }
        if let Some(v) = var(get, ENV_RESTART_DELAY_MS)? {
            self.restart_delay = ms(v);
        }
        if let Some(v) = var(get, ENV_RESTART_DELAY_MAX_MS)? {
            self.restart_delay_max = ms(v);
        }
        if let Some(v) = var::<u64>(get, ENV_MAX_RSS_MB)? {
            self.max_rss = (v > 0).then_some(v << 20);
        }
        if let Some(v) = var::<u64>(get, ENV_MAX_CONNECTIONS)? {
            self.max_connections = (v > 0).then_some(v);
        }
        if let Some(v) = var(get, ENV_MAX_CONNECTIONS_JITTER)? {
            self.max_connections_jitter = v;
        }
        if let Some(v) = var::<usize>(get, ENV_RELOAD_CONCURRENCY)? {
            self.reload_concurrency = v.max(1);
        }
        if let Some(v) = var(get, ENV_SCHED_POLICY)? {
            self.policy = v;
        }
        if let Some(v) = var(get, ENV_BALANCER)? {
            self.balancer = v;
        }
        if let Some(v) = var::<usize>(get, ENV_WINDOW)? {
            self.window = v.max(1);
        }
        if let Some(v) = checked(get, ENV_ACCEPT_THREADS, |v: &usize| (1..=MAX_ACCEPT_THREADS).contains(v))? {
            self.accept_threads = v;
        }
        if let Some(v) = checked(get, ENV_ACCEPT_GATHER_US, |v: &u64| Duration::from_micros(*v) <= MAX_ACCEPT_GATHER)? {
            self.accept_gather = Duration::from_micros(v);
        }
        if let Some(v) = var::<u64>(get, ENV_MAX_WORKER_CONNECTIONS)? {
            self.max_worker_connections = (v > 0).then_some(v);
        }
        if let Some(v) = var::<u8>(get, ENV_FAIL_FAST)? {
            self.fail_fast = v != 0;
        }
        if let Some(v) = var(get, ENV_LOG_FORMAT)? {
            self.log_format = v;
        }
        if let Some(v) = checked(get, ENV_LOG, |v: &String| crate::log::parse_filter(v).is_ok())? {
            self.log_filter = Some(v);
        }
        if let Some(v) = var::<u8>(get, ENV_LOG_CAPTURE)? {
            self.log_capture = v != 0;
        }
        if let Some(v) = checked(get, ENV_NAME, |v: &String| crate::control::valid_name(v))? {
            self.name = Some(v);
        }
        if let Some(v) = var(get, ENV_CONTROL_SOCKET)? {
            self.control_socket = v;
        }
        if let Some(v) = get(ENV_PID_FILE) {
            let path = std::path::PathBuf::from(&v);
            if !path.is_absolute() {
                return Err(bad_setting(ENV_PID_FILE, v.to_string_lossy()));
            }
            self.pid_file = Some(path);
        }
        if let Some(v) = var(get, ENV_ADMIN_ADDR)? {
            self.admin_addr = Some(v);
        }
        if let Some(v) = var::<String>(get, ENV_USER)? {
            self.user = Some(v);
        }
        if let Some(v) = var::<String>(get, ENV_GROUP)? {
            self.group = Some(v);
        }
        if let Some(v) = checked(get, ENV_METRICS_BUCKETS, |v: &String| crate::metrics::parse_buckets(v).is_ok())? {
            // Before the code's own: the environment's win.
            let mut buckets = crate::metrics::parse_buckets(&v).expect("checked");
            buckets.append(&mut self.histogram_buckets);
            self.histogram_buckets = buckets;
        }
        Ok(())
    }
}

/// The value of setting `name`, if it is set: `Err` naming what it takes if it does not parse.
fn var<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<OsString>,
    name: &'static str,
) -> Result<Option<T>, StartError> {
    checked(get, name, |_: &T| true)
}

/// [`var`], with a value that parses but fails `ok` (out of range) an error too.
fn checked<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<OsString>,
    name: &'static str,
    ok: impl Fn(&T) -> bool,
) -> Result<Option<T>, StartError> {
    let Some(v) = get(name) else { return Ok(None) };
    let v = v.to_string_lossy();
    match v.trim().parse() {
        Ok(parsed) if ok(&parsed) => Ok(Some(parsed)),
        _ => Err(bad_setting(name, v)),
    }
}

/// The one error of every bad `CLUSTER_*` setting: the variable, its value, what it takes.
fn bad_setting(name: &'static str, value: impl Into<String>) -> StartError {
    StartError::BadSetting { name, value: value.into(), expected: expected(name) }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            kill_timeout: Duration::from_secs(30),
            stop_delay: None,
            backlog: 1024,
            window: 64,
            accept_threads: 1,
            accept_gather: DEFAULT_ACCEPT_GATHER,
            worker_threads: None,
            exit_on_panic: true,
            ready_timeout: Duration::from_secs(30),
            wait_ready: false,
            heartbeat_timeout: Some(Duration::from_secs(30)),
            min_uptime: Duration::from_secs(1),
            restart_delay: Duration::from_millis(100),
            restart_delay_max: Duration::from_secs(30),
            max_rss: None,
            max_connections: None,
            max_connections_jitter: 0,
            reload_concurrency: 1,
            agent: false,
            policy: Policy::Rr,
            balancer: Balancer::RoundRobin,
            max_worker_connections: None,
            fail_fast: true,
            log_format: LogFormat::Text,
            log_filter: None,
            log_capture: false,
            name: None,
            control_socket: ControlSocket::Default,
            pid_file: None,
            admin_addr: None,
            user: None,
            group: None,
            credentials: None,
            histogram_buckets: Vec::new(),
            metrics_recorder: true,
        }
    }
}
