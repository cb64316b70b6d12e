//! The cluster's settings and the builder that makes them.

use std::future::Future;
use std::time::Duration;

use crate::log::log;
use crate::master::{self, Master, MasterHook};
use crate::role::{self, Role, Start};
use crate::worker;

/// Settings shared by the master and its workers.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) workers: usize,
    pub(crate) kill_timeout: Duration,
    pub(crate) backlog: i32,
    pub(crate) window: usize,
    pub(crate) worker_threads: Option<usize>,
    pub(crate) exit_on_panic: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            kill_timeout: Duration::from_secs(30),
            backlog: 1024,
            window: 64,
            worker_threads: None,
            exit_on_panic: true,
        }
    }
}

/// Entry point of the builder API: `Cluster::builder().workers(4).run(async { … })`.
#[derive(Debug)]
pub struct Cluster;

impl Cluster {
    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder { cfg: Config::default(), master: None }
    }
}

/// Configures and starts a cluster. See [`Builder::run`].
pub struct Builder {
    cfg: Config,
    master: Option<MasterHook>,
}

impl Default for Builder {
    fn default() -> Self {
        Cluster::builder()
    }
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder").field("cfg", &self.cfg).field("master", &self.master.is_some()).finish()
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

    /// Listen backlog of the master's sockets (default 1024).
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.cfg.backlog = backlog;
        self
    }

    /// Most connections handed to one worker and not yet accepted by it (default 64).
    pub fn window(mut self, window: usize) -> Self {
        self.cfg.window = window.max(1);
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

    /// Runs the cluster. `body` is the application: it runs in every worker (and, with
    /// `CLUSTER_WORKERS=0`, in this process). In the master it is never polled: the master
    /// supervises until it is stopped, then exits the process.
    ///
    /// Call it from a plain `fn main`, before any other thread starts.
    pub fn run<F: Future>(self, body: F) -> F::Output {
        let start = match role::detect(self.cfg.workers) {
            Ok(start) => start,
            Err(e) => {
                eprintln!("cluster: {e}");
                std::process::exit(2);
            }
        };
        match start {
            Start::Master { workers } => {
                let _ = ROLE.set(Role::Master);
                let cfg = Config { workers, ..self.cfg };
                std::process::exit(master::run(cfg, self.master));
            }
            Start::Standalone => {
                let _ = ROLE.set(Role::Standalone);
                runtime(Some(self.cfg.worker_threads.unwrap_or(0))).block_on(body)
            }
            Start::Worker { id, channel } => {
                let _ = ROLE.set(Role::Worker { id });
                let rt = runtime(self.cfg.worker_threads);
                rt.block_on(async move {
                    if let Err(e) = worker::start(id, channel, self.cfg.exit_on_panic).await {
                        eprintln!("cluster: worker {id}: cannot reach the master: {e}");
                        std::process::exit(2);
                    }
                    let output = body.await;
                    if worker::is_shutting_down() {
                        drain_tasks(self.cfg.kill_timeout).await;
                    }
                    output
                })
            }
        }
    }
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
        log!("cannot build a tokio runtime: {e}");
        std::process::exit(1)
    })
}

/// After the application returned because the worker is stopping, lets tasks it spawned
/// (connections still being served) finish, as a Node worker's event loop drains. The
/// master kills the worker at its kill timeout anyway.
async fn drain_tasks(limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let metrics = tokio::runtime::Handle::current().metrics();
    // The channel reader is ours; anything beyond it belongs to the application.
    while metrics.num_alive_tasks() > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
