//! What an operator sees of a running cluster: per-process figures read from `/proc` (memory,
//! CPU, open TCP connections) and the metrics in Prometheus' text format.
//!
//! The supervisor hands out a snapshot of its counters ([`Snapshot`]); the `/proc` reads and
//! the formatting happen in the caller's task, off the supervisor loop. Metrics are formatted
//! by hand: there are a score of series, and the text format is a few lines of code, where a
//! metrics crate would bring a registry and its types into the master for nothing more.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dispatch::Totals;
use super::types::{AGENT_ID, MasterStatus, WorkerState, WorkerStatus};
use crate::sys;

/// Counters of what the supervisor and the relays did, since the master started.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) reloads_done: AtomicU64,
    pub(super) reloads_abandoned: AtomicU64,
    pub(super) crash_loops: AtomicU64,
    /// Worker exits the master had not asked for.
    pub(super) crashes: AtomicU64,
    /// Worker exits after being asked to stop.
    pub(super) retired: AtomicU64,
    /// User messages relayed (worker to worker, agent, or code in the master).
    pub(super) relayed: AtomicU64,
}

impl Stats {
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything the metrics show, as the supervisor saw it at one instant.
pub(super) struct Snapshot {
    pub(super) master: MasterStatus,
    /// The cluster's TCP listening sockets: its connections are the ones accepted on them.
    pub(super) listening: Vec<std::net::SocketAddr>,
    pub(super) workers: Vec<WorkerStatus>,
    pub(super) totals: Totals,
    pub(super) stats: Arc<Stats>,
}

/// What is read of the processes from `/proc` and `sock_diag`: memory, CPU and open
/// connections. One reading serves every request of the same tick ([`SHARED`]: a live view, a
/// scraper and `clusterctl status` at once cost the master one), the open connections, whose
/// dump makes the kernel walk its whole table of connections, every request of the same
/// second ([`SHARED_CONNECTIONS`]); CPU time samples by pid make `cpu %` cover the time since
/// the last reading.
#[derive(Default)]
pub(super) struct Readings(Mutex<Read>);

#[derive(Default)]
struct Read {
    cpu: HashMap<u32, (Instant, Duration)>,
    /// The last reading, by pid.
    last: Option<(Instant, HashMap<u32, Figures>)>,
    /// The last count of open connections, by pid.
    open: Option<(Instant, HashMap<u32, Option<u64>>)>,
}

/// One process's figures in a reading.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    rss: Option<u64>,
    cpu_time: Option<Duration>,
    cpu_percent: Option<f64>,
    open_connections: Option<u64>,
}

/// Below this, the last sample is too recent to compute a rate from: the rate since the
/// process started is shown.
const MIN_SAMPLE: Duration = Duration::from_millis(200);
/// How long a reading serves the requests that come after it (one tick of the supervisor).
const SHARED: Duration = Duration::from_millis(100);
/// How long a count of open connections serves.
const SHARED_CONNECTIONS: Duration = Duration::from_secs(1);

impl Readings {
    /// Fills in memory, CPU and open connections of each process (blocking: `/proc` reads
    /// and, if the cluster has TCP sockets, one `sock_diag` dump filtered to the connections
    /// accepted on them, `listening`).
    pub(super) fn enrich(&self, workers: &mut [WorkerStatus], listening: &[std::net::SocketAddr]) {
        let now = Instant::now();
        let mut read = self.0.lock().unwrap();
        let fresh = read.last.as_ref().filter(|(at, by_pid)| {
            now.saturating_duration_since(*at) < SHARED
                && workers.iter().filter_map(|w| w.pid).all(|p| by_pid.contains_key(&p))
        });
        let by_pid = match fresh {
            Some((_, by_pid)) => by_pid.clone(),
            None => {
                let by_pid = read.measure(workers, listening, now);
                read.last = Some((now, by_pid.clone()));
                by_pid
            }
        };
        for w in workers.iter_mut() {
            let Some(f) = w.pid.and_then(|pid| by_pid.get(&pid)) else { continue };
            (w.rss, w.cpu_time, w.cpu_percent, w.open_connections) =
                (f.rss, f.cpu_time, f.cpu_percent, f.open_connections);
        }
    }
}

impl Read {
    fn measure(
        &mut self,
        workers: &[WorkerStatus],
        listening: &[std::net::SocketAddr],
        now: Instant,
    ) -> HashMap<u32, Figures> {
        let live: Vec<u32> = workers.iter().filter_map(|w| w.pid).collect();
        let open = match self.open.take() {
            Some((at, open))
                if now.saturating_duration_since(at) < SHARED_CONNECTIONS
                    && live.iter().all(|p| open.contains_key(p)) =>
            {
                (at, open)
            }
            _ => (now, open_connections(workers, listening)),
        };
        self.cpu.retain(|pid, _| live.contains(pid));
        let mut out = HashMap::new();
        for w in workers {
            let Some(pid) = w.pid else { continue };
            let mut f = Figures { rss: sys::rss(pid).ok(), cpu_time: sys::cpu_time(pid).ok(), ..Figures::default() };
            if let Some(cpu) = f.cpu_time {
                let since = match self.cpu.get(&pid) {
                    Some((at, then)) if now.duration_since(*at) >= MIN_SAMPLE => Some((now.duration_since(*at), *then)),
                    Some(_) => None,
                    None => Some((w.uptime, Duration::ZERO)),
                };
                if let Some((wall, then)) = since.filter(|(wall, _)| !wall.is_zero()) {
                    f.cpu_percent = Some(100.0 * cpu.saturating_sub(then).as_secs_f64() / wall.as_secs_f64());
                    self.cpu.insert(pid, (now, cpu));
                } else if let Some((at, then)) = self.cpu.get(&pid) {
                    // Too soon: the rate of the last interval long enough.
                    let wall = now.duration_since(*at) + MIN_SAMPLE;
                    f.cpu_percent = Some(100.0 * cpu.saturating_sub(*then).as_secs_f64() / wall.as_secs_f64());
                }
            }
            f.open_connections = open.1.get(&pid).copied().flatten();
            out.insert(pid, f);
        }
        self.open = Some(open);
        out
    }
}

/// Each process's open TCP connections: its socket inodes (`/proc/<pid>/fd`) that are
/// connections accepted on the cluster's sockets (one dump per address family).
fn open_connections(workers: &[WorkerStatus], listening: &[std::net::SocketAddr]) -> HashMap<u32, Option<u64>> {
    let connections = sys::tcp_connection_inodes(listening).ok();
    let count = |w: &WorkerStatus, pid: u32| match &connections {
        _ if w.id == AGENT_ID => None,
        // No connection anywhere: nothing to look for in its descriptors.
        Some(established) if established.is_empty() => Some(0),
        Some(established) => {
            sys::socket_inodes(pid).ok().map(|inodes| inodes.iter().filter(|i| established.contains(i)).count() as u64)
        }
        None => None,
    };
    workers.iter().filter_map(|w| Some((w.pid?, count(w, w.pid?)))).collect()
}

/// The name of a state in status and metrics.
pub(super) fn state_name(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Starting => "starting",
        WorkerState::Online => "online",
        WorkerState::Ready => "ready",
        WorkerState::Stopping => "stopping",
        WorkerState::Backoff => "backoff",
    }
}

/// The metrics in Prometheus' text exposition format (version 0.0.4).
pub(super) fn prometheus(s: &Snapshot) -> String {
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    let by_state: Vec<(String, f64)> = ["starting", "online", "ready", "stopping", "backoff"]
        .iter()
        .map(|state| {
            let n = s.workers.iter().filter(|w| w.id != AGENT_ID && state_name(w.state) == *state).count();
            (format!("{{state=\"{state}\"}}"), n as f64)
        })
        .collect();
    family("cluster_workers", "gauge", "Worker processes by state.", &by_state);
    family("cluster_workers_target", "gauge", "Workers wanted.", &one(s.master.workers_target as f64));
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
    let restarts: Vec<(String, f64)> = {
        let mut by_id: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
        for w in &s.workers {
            by_id.insert(w.id, w.restarts);
        }
        by_id.into_iter().map(|(id, n)| (format!("{{id=\"{}\"}}", label_id(id)), f64::from(n))).collect()
    };
    family("cluster_worker_restarts_total", "counter", "Restarts of each worker id after an exit.", &restarts);
    family(
        "cluster_worker_exits_total",
        "counter",
        "Worker exits: `crash` when the master had not asked it to stop.",
        &[("{kind=\"crash\"}".into(), load(&s.stats.crashes)), ("{kind=\"retired\"}".into(), load(&s.stats.retired))],
    );
    family(
        "cluster_crash_loop_backoffs_total",
        "counter",
        "Restarts delayed because a worker died young.",
        &one(load(&s.stats.crash_loops)),
    );
    family(
        "cluster_reloads_total",
        "counter",
        "Rolling reloads, by outcome.",
        &[
            ("{outcome=\"done\"}".into(), load(&s.stats.reloads_done)),
            ("{outcome=\"abandoned\"}".into(), load(&s.stats.reloads_abandoned)),
        ],
    );
    let per_id = |f: fn(&super::dispatch::Counts) -> u64| -> Vec<(String, f64)> {
        s.totals.workers.iter().map(|(id, c)| (format!("{{id=\"{}\"}}", label_id(*id)), f(c) as f64)).collect()
    };
    family(
        "cluster_connections_dispatched_total",
        "counter",
        "Connections the master handed to each worker id.",
        &per_id(|c| c.dispatched),
    );
    family(
        "cluster_connections_acknowledged_total",
        "counter",
        "Connections each worker id acknowledged (took over).",
        &per_id(|c| c.acknowledged),
    );
    family(
        "cluster_connections_returned_total",
        "counter",
        "Connections given back by a worker id (refused, busy, or not acknowledged when it died) and handed to another.",
        &per_id(|c| c.returned),
    );
    family(
        "cluster_window_in_flight",
        "gauge",
        "Connections handed to a worker id and not yet acknowledged.",
        &per_id(|c| c.in_flight),
    );
    family(
        "cluster_window_size",
        "gauge",
        "Unacknowledged connections a worker may have.",
        &one(s.totals.window as f64),
    );
    family(
        "cluster_backlog_connections",
        "gauge",
        "Accepted connections waiting in the master for a worker with room.",
        &one(s.totals.backlog as f64),
    );
    family("cluster_accept_errors_total", "counter", "Failed accept calls.", &one(s.totals.accept_errors as f64));
    family(
        "cluster_messages_relayed_total",
        "counter",
        "User messages relayed by the master.",
        &one(load(&s.stats.relayed)),
    );
    let per_process = |f: fn(&WorkerStatus) -> Option<f64>| -> Vec<(String, f64)> {
        s.workers
            .iter()
            .filter_map(|w| Some((format!("{{id=\"{}\",pid=\"{}\"}}", label_id(w.id), w.pid?), f(w)?)))
            .collect()
    };
    family(
        "cluster_worker_rss_bytes",
        "gauge",
        "Resident memory of each process.",
        &per_process(|w| Some(w.rss? as f64)),
    );
    family(
        "cluster_worker_cpu_seconds_total",
        "counter",
        "CPU time (user + system) of each process.",
        &per_process(|w| Some(w.cpu_time?.as_secs_f64())),
    );
    let me = s.master.pid;
    family(
        "cluster_master_rss_bytes",
        "gauge",
        "Resident memory of the master.",
        &one(sys::rss(me).unwrap_or(0) as f64),
    );
    family(
        "cluster_master_cpu_seconds_total",
        "counter",
        "CPU time of the master.",
        &one(sys::cpu_time(me).map_or(0.0, |d| d.as_secs_f64())),
    );
    family(
        "cluster_master_uptime_seconds",
        "gauge",
        "Time since the master started.",
        &one(s.master.uptime.as_secs_f64()),
    );
    out
}

/// A worker id as a label value (the agent's is `agent`).
fn label_id(id: u32) -> String {
    if id == AGENT_ID { "agent".into() } else { id.to_string() }
}
