//! The builder behind `#[cluster::main]`: settings, then [`Builder::run`], which decides this
//! process's role and runs the master, a worker, the agent, or the application alone.

use std::future::Future;
use std::time::Duration;

use std::os::fd::OwnedFd;

use crate::config::{Balancer, Config, Policy};
use crate::ipc::message::AGENT;
use crate::master::{self, Master, MasterHook};
use crate::messaging::Peer;
use crate::role::{self, Role, Start};
use crate::worker;

/// Entry point of the builder API: `Cluster::builder().workers(4).run(async { … })`.
#[derive(Debug)]
pub struct Cluster;

impl Cluster {
    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder { cfg: Config::default(), master: None, agent: None }
    }
}

/// Configures and starts a cluster. See [`Builder::run`].
pub struct Builder {
    cfg: Config,
    master: Option<MasterHook>,
    agent: Option<AgentMain>,
}

/// The agent's code.
type AgentMain = Box<dyn FnOnce() -> std::pin::Pin<Box<dyn Future<Output = ()>>>>;

impl Default for Builder {
    fn default() -> Self {
        Cluster::builder()
    }
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("cfg", &self.cfg)
            .field("master", &self.master.is_some())
            .field("agent", &self.agent.is_some())
            .finish()
    }
}

impl Builder {
    /// Number of workers (default: available parallelism). `CLUSTER_WORKERS` overrides it;
    /// `0` runs the application in this one process, with no master.
    pub fn workers(mut self, n: usize) -> Self {
        self.cfg.workers = n;
        self
    }

    /// How long a stopping worker may take to finish its connections before it is killed
    /// (default 30 s).
    pub fn kill_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.kill_timeout = timeout;
        self
    }

    /// On a graceful stop (SIGTERM, `clusterctl stop`, a service manager's stop), how long the
    /// master keeps accepting and its workers keep serving while the admin endpoint's
    /// `/readyz` answers 503, before the drain begins, so that a load balancer checking it
    /// stops sending first (env `CLUSTER_STOP_DELAY_MS`). Default: 1 s with an admin endpoint,
    /// none without one (nothing could see the readiness). A first SIGINT (Ctrl-C) and a
    /// second stop do not wait.
    pub fn stop_delay(mut self, delay: Duration) -> Self {
        self.cfg.stop_delay = Some(delay);
        self
    }

    /// Listen backlog of the master's sockets (default 1024).
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.cfg.backlog = backlog;
        self
    }

    /// Most connections handed to one worker and not yet accepted by it (default 64; env
    /// `CLUSTER_WINDOW`).
    pub fn window(mut self, window: usize) -> Self {
        self.cfg.window = window.max(1);
        self
    }

    /// Threads of the master that accept and hand out connections under [`Policy::Rr`]
    /// (default 1; at most 64; env `CLUSTER_ACCEPT_THREADS`), apart from the thread that
    /// supervises and answers the control socket. One thread spends some 13 µs of
    /// CPU per new connection on a small machine, so it hands out on the order of 70k a
    /// second; where more arrive, more threads accept on the same sockets and share the
    /// dispatch table. Each new connection wakes every idle accept thread, so extra threads
    /// cost CPU where cores are already busy. Keep-alive traffic never touches them.
    pub fn accept_threads(mut self, n: usize) -> Self {
        self.cfg.accept_threads = n.clamp(1, crate::config::MAX_ACCEPT_THREADS);
        self
    }

    /// While new connections keep coming, how long the master lets them gather between two
    /// accept passes under [`Policy::Rr`] (default 100 µs; at most 10 ms; `Duration::ZERO`
    /// turns it off; env `CLUSTER_ACCEPT_GATHER_US`). Each pass costs the master a wake-up,
    /// and on a busy machine that is most of its cost per connection: gathering hands out
    /// several connections per wake-up and per message, for at most this much latency on a new
    /// connection. It starts only when passes come less than ten gathering times apart, so
    /// connections that arrive one by one are not held.
    pub fn accept_gather(mut self, gather: Duration) -> Self {
        self.cfg.accept_gather = gather.min(crate::config::MAX_ACCEPT_GATHER);
        self
    }

    /// How connections reach workers (default [`Policy::Rr`]; env `CLUSTER_SCHED_POLICY` =
    /// `rr` | `shared` | `reuseport`).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.cfg.policy = policy;
        self
    }

    /// Which worker gets each connection under `rr` (default [`Balancer::RoundRobin`]; env
    /// `CLUSTER_BALANCER` = `round-robin` | `least-connections` | `sticky`).
    pub fn balancer(mut self, balancer: Balancer) -> Self {
        self.cfg.balancer = balancer;
        self
    }

    /// Most open connections per worker under `rr` (like actix's `max_concurrent_connections`;
    /// default: no limit). A worker at the limit gets no more until some close; when all are,
    /// the master stops accepting and the kernel's backlog holds new clients.
    pub fn max_worker_connections(mut self, n: Option<u64>) -> Self {
        self.cfg.max_worker_connections = n.filter(|n| *n > 0);
        self
    }

    /// Runs each worker on a multi-threaded runtime with `n` threads. By default a worker runs
    /// a single-threaded runtime: the cluster gives parallelism with processes.
    pub fn worker_threads(mut self, n: usize) -> Self {
        self.cfg.worker_threads = Some(n.max(1));
        self
    }

    /// Whether a panic anywhere in a worker ends that worker (reported to the master, which
    /// replaces it), as an uncaught exception ends a Node worker. Default `true`. With `false`,
    /// tokio's behaviour applies: a panicking task ends alone.
    pub fn exit_on_panic(mut self, exit: bool) -> Self {
        self.cfg.exit_on_panic = exit;
        self
    }

    /// How long a new worker may take to become ready (listening on every address its
    /// predecessor listened on, or [`ready`](crate::worker::ready) with
    /// [`wait_ready`](Self::wait_ready)) during a reload before the reload is abandoned
    /// (default 30 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.ready_timeout = timeout;
        self
    }

    /// Whether a worker is ready only once it calls [`worker::ready`](crate::worker::ready)
    /// (PM2's `wait_ready`), rather than once it listens (default `false`).
    pub fn wait_ready(mut self, wait: bool) -> Self {
        self.cfg.wait_ready = wait;
        self
    }

    /// A worker whose runtime sends no heartbeat for this long is killed and replaced
    /// (default 30 s; `None` turns liveness checks off).
    pub fn heartbeat_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.cfg.heartbeat_timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// A worker that dies before it is ready, or sooner than this after it started, is
    /// unstable: it is restarted with backoff (default 1 s).
    pub fn min_uptime(mut self, uptime: Duration) -> Self {
        self.cfg.min_uptime = uptime;
        self
    }

    /// Backoff of unstable restarts: the first delay, doubled at each further unstable exit
    /// up to `max` (defaults 100 ms and 30 s). A stable run resets it.
    pub fn restart_delay(mut self, first: Duration, max: Duration) -> Self {
        self.cfg.restart_delay = first;
        self.cfg.restart_delay_max = max.max(first);
        self
    }

    /// Replaces a worker gracefully once its resident memory exceeds `bytes` (checked every
    /// second; default: no limit).
    pub fn max_rss(mut self, bytes: Option<u64>) -> Self {
        self.cfg.max_rss = bytes;
        self
    }

    /// Replaces a worker gracefully after it accepted about `n` connections, plus a random
    /// `0..=jitter` per worker so that workers do not all restart at once (gunicorn's
    /// `max_requests`; default: no limit).
    pub fn max_connections(mut self, n: Option<u64>, jitter: u64) -> Self {
        self.cfg.max_connections = n.filter(|n| *n > 0);
        self.cfg.max_connections_jitter = jitter;
        self
    }

    /// How many workers a rolling reload replaces at a time (default 1).
    pub fn reload_concurrency(mut self, n: usize) -> Self {
        self.cfg.reload_concurrency = n.max(1);
        self
    }

    /// Whether the very first start gives up (default `true`): when, before any worker was
    /// ready, every worker exits before it is ready three times (a port already taken, a
    /// permission denied, a crash at start), or none is ready within the ready timeout, the
    /// master stops and exits 1 with the reason, so a service manager or an orchestrator
    /// reports the failure. Once a worker has been ready, crash loops back off and never give
    /// up. Env `CLUSTER_FAIL_FAST=0` turns it off.
    pub fn fail_fast(mut self, fail_fast: bool) -> Self {
        self.cfg.fail_fast = fail_fast;
        self
    }

    /// Runs workers (and the agent) as this user (a name or a uid) with its groups; the master
    /// stays as it was started, so it can bind privileged ports. Env `CLUSTER_USER`. An
    /// unknown user stops the master before anything starts (exit 2).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.cfg.user = Some(user.into());
        self
    }

    /// Runs workers as this group (a name or a gid; default: the user's primary group). Env
    /// `CLUSTER_GROUP`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.cfg.group = Some(group.into());
        self
    }

    /// The buckets of histogram `name` (feature `metrics`; default
    /// [`DEFAULT_BUCKETS`](crate::metrics::DEFAULT_BUCKETS); env `CLUSTER_METRICS_BUCKETS`,
    /// `name=0.01,0.1,1;other=…`, wins). Bounds in increasing order; others are ignored.
    pub fn histogram_buckets(mut self, name: impl Into<String>, bounds: &[f64]) -> Self {
        let increasing = bounds.windows(2).all(|w| w[0] < w[1]) && bounds.iter().all(|b| b.is_finite());
        if increasing && !bounds.is_empty() {
            self.cfg.histogram_buckets.push((name.into(), bounds.to_vec()));
        }
        self
    }

    /// Whether workers and the agent install the cluster's recorder as the `metrics` facade's
    /// global recorder (feature `metrics`; default true). A program with a recorder of its own
    /// says false, and may combine the two with [`metrics::recorder`](crate::metrics).
    pub fn metrics_recorder(mut self, install: bool) -> Self {
        self.cfg.metrics_recorder = install;
        self
    }

    /// Runs `hook` in the master beside the supervisor, with a [`Master`] handle for worker
    /// events and messages.
    pub fn master<F, Fut>(mut self, hook: F) -> Self
    where
        F: FnOnce(Master) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.master = Some(Box::new(move |m| Box::pin(hook(m))));
        self
    }

    /// Runs an **agent** beside the workers (Egg.js's agent): one extra process of this binary
    /// that runs `agent` instead of the application. It gets no connections; it is for
    /// singleton work (schedules, one long-lived connection to an outside service) and talks
    /// to the workers with messages ([`worker::send_to`](crate::worker::send_to),
    /// [`worker::broadcast`](crate::worker::broadcast), [`worker::recv`](crate::worker::recv),
    /// which work in the agent too; workers reach it with
    /// [`worker::send_to_agent`](crate::worker::send_to_agent)). The master supervises it
    /// like a worker: heartbeats, restart with backoff when it crashes, and a graceful stop
    /// ([`worker::shutdown`](crate::worker::shutdown) resolves). A reload stops it, then
    /// starts the new build: there is never more than one agent at a time.
    ///
    /// The agent runs on a single-threaded runtime; when `agent` returns, its process exits
    /// (and is restarted unless the cluster is stopping). With `CLUSTER_WORKERS=0` (no master)
    /// there is no agent.
    pub fn agent<F, Fut>(mut self, agent: F) -> Self
    where
        F: FnOnce() -> Fut + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.agent = Some(Box::new(move || Box::pin(agent())));
        self.cfg.agent = true;
        self
    }

    /// Runs the cluster. `body` is the application: it runs in every worker (and, with
    /// `CLUSTER_WORKERS=0`, in this process). In the master it is never polled: the master
    /// supervises until it is stopped, then exits the process.
    ///
    /// Call it from a plain `fn main`, before any other thread starts.
    pub fn run<F: Future>(mut self, body: F) -> F::Output {
        let start = match self.cfg.apply_env().and_then(|()| role::detect(self.cfg.workers, self.agent.is_some())) {
            Ok(start) => start,
            Err(e) => {
                crate::log::say!("{e}");
                std::process::exit(2);
            }
        };
        match start {
            Start::Master { workers } => {
                // In a container, as PID 1: an init process of our own reaps orphans and
                // forwards signals; the master runs as its child.
                crate::sys::become_init_if_pid_1();
                let _ = ROLE.set(Role::Master);
                let cfg = Config { workers, ..self.cfg };
                std::process::exit(master::run(cfg, self.master));
            }
            Start::Agent { channel } => {
                let _ = ROLE.set(Role::Agent);
                let agent = self.agent.expect("role::detect checks that there is an agent");
                connected(AGENT, channel, None, &self.cfg, agent());
                std::process::exit(0);
            }
            Start::Standalone => {
                let _ = ROLE.set(Role::Standalone);
                runtime(Some(self.cfg.worker_threads.unwrap_or(0))).block_on(body)
            }
            Start::Worker { id, channel } => {
                let _ = ROLE.set(Role::Worker { id });
                connected(id, channel, self.cfg.worker_threads, &self.cfg, body)
            }
        }
    }
}

/// Runs `body` in a worker (or the agent, `id` [`AGENT`]) on its runtime: connects to the
/// master first, and when `body` returns because the process is stopping, lets the tasks it
/// spawned finish.
fn connected<F: Future>(id: u32, channel: OwnedFd, threads: Option<usize>, cfg: &Config, body: F) -> F::Output {
    #[cfg(feature = "metrics")]
    crate::metrics::prepare(&cfg.histogram_buckets, cfg.metrics_recorder);
    runtime(threads).block_on(async move {
        if let Err(e) = worker::client::start(id, channel, cfg).await {
            crate::log::say!("{}: cannot reach the master: {e}", Peer::from_wire(id));
            std::process::exit(2);
        }
        let output = body.await;
        if worker::is_shutting_down() {
            drain_tasks(cfg.kill_timeout).await;
        }
        output
    })
}

static ROLE: std::sync::OnceLock<Role> = std::sync::OnceLock::new();

/// The role of this process (`Standalone` if no cluster was started).
pub fn role() -> Role {
    ROLE.get().copied().unwrap_or(Role::Standalone)
}

/// `threads`: `None` for a current-thread runtime, `Some(0)` for one thread per core.
fn runtime(threads: Option<usize>) -> tokio::runtime::Runtime {
    let built = match threads {
        None => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 0 {
                b.worker_threads(n);
            }
            b.enable_all().build()
        }
    };
    built.unwrap_or_else(|e| {
        crate::log::say!("cannot build a tokio runtime: {e}");
        std::process::exit(1)
    })
}

/// After the application returned because the worker is stopping, lets tasks it spawned
/// (connections still being served) finish, as a Node worker's event loop drains. The
/// master kills the worker at its kill timeout anyway.
async fn drain_tasks(limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let metrics = tokio::runtime::Handle::current().metrics();
    while metrics.num_alive_tasks() > worker::client::own_tasks() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
