//! The master's decision core: what should run now.
//!
//! The supervisor records facts ([`Core::record`]: a process started, said hello, listens,
//! exited; [`Core::command`]: a reload, a new worker count, a stop) and then asks
//! [`Core::reconcile`], which compares what runs with what should run at this instant and
//! returns [`Action`]s (spawn, close, disconnect, kill, route messages, emit an event, exit)
//! for the supervisor to carry out. Nothing here does I/O or reads a clock: the same facts
//! and instants always give the same actions, which is what the table tests in
//! `decide/tests.rs` check on a fake clock. What it needs to know of the data path (queues,
//! acknowledgements, memory) it asks through [`World`].
//!
//! Each worker id (1..=N, and the agent's) is a [`Slot`]: the process serving it (`current`),
//! perhaps one starting to replace it (`incoming`), and its restart history. Each process has
//! one [`Life`]. Every replacement (reload, limit) follows one path: start the new process,
//! wait until it is ready, then retire the old one (no new connections; `disconnect` once the
//! master holds nothing for it; SIGKILL at the kill timeout).

use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::types::{AGENT_ID, Event, ExitInfo, ExitReason, Serial, WorkerState, WorkerStatus};
use crate::config::Config;
use crate::ipc::message::ListenKey;
use crate::log::{note, warning};
use crate::messaging::Peer;

mod life;
mod replace;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

/// Housekeeping period: heartbeats, limits, deadlines.
pub(super) const TICK: Duration = Duration::from_millis(100);
/// Period while a retiring worker waits for its last connections to be acknowledged.
pub(super) const FAST_TICK: Duration = Duration::from_millis(20);
/// Two steps this far apart mean the master itself was stopped or starved: heartbeats that
/// could not be read meanwhile must not get workers killed.
const SUSPENDED: Duration = Duration::from_secs(1);
/// How long a worker's report of a stop signal from outside waits for the master's own stop
/// (the same signal to the whole group reaches the master at the same time).
pub(super) const STOP_ASK_WAIT: Duration = Duration::from_millis(250);
/// How often resident memory is checked, with a memory limit.
const RSS_CHECK: Duration = Duration::from_secs(1);
/// Most workers: ids stay below the wire addresses of the agent and of "all workers".
pub(super) const MAX_WORKERS: usize = 65_536;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Status {
    pub(super) code: Option<i32>,
    pub(super) signal: Option<i32>,
}

/// Something that happened to one process.
#[derive(Debug)]
pub(super) enum Fact {
    /// The process runs, with this pid.
    Spawned(u32),
    /// It could not be started.
    SpawnFailed(String),
    /// It connected and runs user code.
    Hello,
    /// It accepts on socket `key`.
    Listening(ListenKey),
    /// It stopped accepting on socket `key`.
    Unlisten(ListenKey),
    /// It called `worker::ready()`.
    SaidReady,
    /// It got SIGTERM or SIGINT from outside and waits to be retired.
    StopAsked,
    /// Any other message: proof of life.
    Heard,
    /// It reported a panic and is exiting.
    Panicked(String),
    /// It broke the protocol.
    ProtocolError(String),
    /// The master could not bind what it asked for (the error, as said to it).
    ListenFailed(String),
    /// It is gone and every message it sent has been read; `Err` if waiting for it failed.
    Exited(Result<Status, String>),
}

/// What user code, a signal or an operator asks of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    Reload,
    SetWorkers(usize),
    Stop(StopKind),
    /// Replace one worker, new process first (check it with [`Core::can_restart`]).
    Restart(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum StopKind {
    /// After the stop delay (serving on, not ready), stop accepting and let every worker
    /// finish (SIGTERM, `clusterctl stop`). A second one during the delay ends it.
    Graceful,
    /// The same without the delay (a first SIGINT, an upgraded-away master).
    Now,
    /// SIGKILL every worker (SIGQUIT).
    Fast,
    /// SIGKILL every worker and exit at once with 130 (second SIGINT).
    Abort,
}

/// What the supervisor must do.
#[derive(Debug, Clone)]
pub(super) enum Action {
    /// Start a process for worker `id` (the agent: [`AGENT_ID`]); record `Spawned` or
    /// `SpawnFailed` for `serial`.
    Spawn { serial: Serial, id: u32 },
    /// Send the process no new connections.
    Close(Serial),
    /// Tell the process to stop (it finishes its connections, then exits).
    Disconnect(Serial),
    /// SIGKILL the process.
    Kill(Serial),
    /// Messages for worker `id` go to this process (`None`: to nobody).
    Route { id: u32, to: Option<Serial> },
    /// Worker id `id` is gone for good: close the sockets that were its own (`reuseport`).
    CloseSockets(u32),
    /// Close every listening socket; `drain`: serve what the kernel queued first.
    StopListening { drain: bool },
    /// Report an event to code in the master.
    Emit(Event),
    /// Tell whoever waits for a reload or a restart how it went.
    Answer(Answer),
    /// The master is done: exit with this code.
    Exit(i32),
}

/// The outcome of a reload or a restart, for those waiting on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    /// The reloads up to number `upto` (see [`Core::reload_ticket`]) are over: `Ok(replaced
    /// processes, milliseconds)`, or `Err((worker id, why))` when abandoned.
    Reload { upto: u64, result: Result<(usize, u64), (u32, String)> },
    /// The restart of worker `id`: `Ok((old pid, new pid))` or why it failed.
    Restart { id: u32, result: Result<(u32, u32), String> },
}

/// What the decision core reads of the data path and of the processes.
pub(super) trait World {
    /// Whether no accepted connection waits for a worker in the master.
    fn backlog_empty(&self) -> bool;
    /// Connections handed to the process and not yet acknowledged.
    fn inflight(&self, serial: Serial) -> usize;
    /// Connections the process acknowledged so far.
    fn handled(&self, serial: Serial) -> u64;
    /// Whether the master still takes the last connections off a socket it is closing (no
    /// worker may be closed to new connections meanwhile).
    fn master_draining(&self) -> bool;
    /// Whether one of these sockets is being drained by the workers accepting on it.
    fn draining(&self, keys: &[ListenKey]) -> bool;
    /// Resident memory of process `pid`, in bytes.
    fn rss(&self, pid: u32) -> Option<u64>;
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Life {
    /// Running; it has not said hello yet.
    Starting,
    /// Connected, running user code, not ready yet.
    Online,
    /// Serving: listening on what its predecessor listened on (or it said `ready()`).
    Ready,
    /// Asked to go: gets no new connections once past [`Step::Open`], is told to disconnect
    /// once the master holds nothing for it, and is killed at `kill_at`.
    Retiring { step: Step, kill_at: Instant },
    /// SIGKILL sent; `retired`: it had been asked to stop first.
    Killed { retired: bool },
    /// Gone, its messages all read: reaped at the next step.
    Exited { status: Status, retired: bool },
}

/// How far a retiring process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Still gets connections: the master hands out the last ones it holds (a graceful stop).
    Open,
    /// Gets no new connections; waits until it has acknowledged those sent.
    Closed,
    /// Told to stop.
    Disconnected,
}

impl Life {
    fn alive(self) -> bool {
        matches!(self, Life::Starting | Life::Online | Life::Ready | Life::Retiring { .. })
    }
}

/// One process.
#[derive(Debug)]
struct Proc {
    id: u32,
    /// 0 until it runs.
    pid: u32,
    started: Instant,
    life: Life,
    ready_at: Option<Instant>,
    said_ready: bool,
    /// Sockets it accepts on.
    keys: Vec<ListenKey>,
    /// Sockets it must accept on to be ready: those of the process it replaces.
    expected: Vec<ListenKey>,
    last_seen: Instant,
    /// Connections after which it is replaced (`max_connections` plus its jitter).
    max_connections: Option<u64>,
    reason: Option<ExitReason>,
    /// When it said it got a stop signal from outside (see `decide/life.rs`, `stop_asked`).
    stop_asked: Option<Instant>,
}

/// One worker id and the restart history of the processes that held it.
#[derive(Debug, Default)]
struct Slot {
    current: Option<Serial>,
    /// Its processes that exited before they were ready, during the first start.
    failed_starts: u32,
    incoming: Option<Incoming>,
    /// With no process: when the next one starts (`None`: now).
    restart_at: Option<Instant>,
    restarts: u32,
    backoff: Duration,
    /// Sockets of the last process that served this id.
    expected: Vec<ListenKey>,
    /// A failed limit replacement is retried no sooner than this.
    retry_at: Option<Instant>,
    /// The process messages for this id go to, as last told to the supervisor.
    routed: Option<Serial>,
}

/// A process started to take over a slot, not yet ready.
#[derive(Debug)]
struct Incoming {
    serial: Serial,
    deadline: Instant,
    cause: Cause,
    /// Someone waits for this replacement (a restart command): answer them.
    answer: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Reload,
    Limit,
}

/// A rolling reload in progress.
#[derive(Debug)]
struct Reload {
    /// Slots still to replace, in order.
    queue: VecDeque<u32>,
    /// Slots whose replacement is starting.
    active: Vec<u32>,
    replaced: usize,
    /// Another reload was asked for meanwhile: run one more when this one ends.
    again: bool,
    started: Instant,
    /// Its number: reloads are counted from 1.
    seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// Every process was retired at the stop, so each is killed at the stop's instant plus
    /// the kill timeout.
    Graceful,
    Fast,
    Abort,
    /// The first start failed (see `decide/life.rs`, `check_first_start`): exit 1.
    Failed,
}

/// Exits before ready of every worker id, before any worker was ever ready, after which the
/// first start has failed.
pub(super) const FIRST_START_TRIES: u32 = 3;

/// The decision core. See the module documentation.
pub(super) struct Core {
    cfg: Arc<Config>,
    procs: BTreeMap<Serial, Proc>,
    slots: BTreeMap<u32, Slot>,
    /// Worker slots wanted (the agent's is not one).
    target: usize,
    next_serial: Serial,
    stop: Stop,
    /// A graceful stop waits for this instant (the stop delay), serving on, not ready.
    stop_at: Option<Instant>,
    reload: Option<Reload>,
    /// Reloads begun so far.
    reloads: u64,
    /// Commands recorded since the last step.
    asked: Vec<Command>,
    last_step: Option<Instant>,
    next_rss_check: Option<Instant>,
    /// Seed of the per-process `max_connections` jitter.
    seed: u64,
    /// When the cluster started; `None` once a worker has been ready (the first start is over).
    first_start: Option<Instant>,
    /// Why the first start is failing, as last seen (a bind error, an exit).
    start_failure: Option<String>,
}

impl Core {
    pub(super) fn new(cfg: Arc<Config>, seed: u64) -> Core {
        let mut slots = BTreeMap::new();
        if cfg.agent {
            slots.insert(AGENT_ID, Slot::default());
        }
        Core {
            target: cfg.workers.clamp(1, MAX_WORKERS),
            cfg,
            procs: BTreeMap::new(),
            slots,
            next_serial: 1,
            stop: Stop::Running,
            stop_at: None,
            reload: None,
            reloads: 0,
            asked: Vec::new(),
            last_step: None,
            next_rss_check: None,
            seed,
            first_start: None,
            start_failure: None,
        }
    }

    /// Records what happened to process `serial`.
    pub(super) fn record(&mut self, serial: Serial, fact: Fact, now: Instant) {
        let Some(p) = self.procs.get_mut(&serial) else { return };
        p.last_seen = now;
        let keys_changed = matches!(fact, Fact::Listening(_) | Fact::Unlisten(_));
        match fact {
            Fact::Spawned(pid) => {
                p.pid = pid;
                p.started = now;
            }
            Fact::SpawnFailed(e) => {
                warning!(event = "spawn_failed", id = p.id, error = %e, "cannot start {}: {e}", Peer::from_wire(p.id));
                p.life = Life::Exited { status: Status::default(), retired: false };
            }
            Fact::Hello if p.life == Life::Starting => p.life = Life::Online,
            Fact::Listening(key) if !p.keys.contains(&key) => p.keys.push(key),
            Fact::Unlisten(key) => p.keys.retain(|k| *k != key),
            Fact::SaidReady => p.said_ready = true,
            Fact::StopAsked => {
                p.stop_asked.get_or_insert(now);
            }
            Fact::Panicked(reason) => {
                warning!(event = "panic", id = p.id, pid = p.pid, reason = %reason, "{} (pid {}) is exiting: {reason}", Peer::from_wire(p.id), p.pid);
                p.reason = Some(ExitReason::Panic(reason));
            }
            Fact::ProtocolError(e) => {
                if p.life.alive() {
                    warning!(event = "protocol_error", id = p.id, pid = p.pid, reason = %e, "{} (pid {}): {e}; killing it", Peer::from_wire(p.id), p.pid);
                }
                p.reason.get_or_insert(ExitReason::ProtocolError(e));
            }
            Fact::Exited(status) => {
                let retired = matches!(p.life, Life::Retiring { .. } | Life::Killed { retired: true });
                let status = status.unwrap_or_else(|e| {
                    p.reason = Some(ExitReason::WaitFailed(e));
                    Status::default()
                });
                p.life = Life::Exited { status, retired };
            }
            Fact::ListenFailed(e) => {
                if self.first_start.is_some() {
                    self.start_failure = Some(format!("{} cannot listen: {e}", Peer::from_wire(p.id)));
                }
            }
            Fact::Hello | Fact::Listening(_) | Fact::Heard => {}
        }
        // The sockets of the process serving a slot are what its next process must listen on.
        let p = &self.procs[&serial];
        if keys_changed
            && let Some(slot) = self.slots.get_mut(&p.id)
            && slot.current == Some(serial)
            && p.ready_at.is_some()
        {
            slot.expected.clone_from(&p.keys);
        }
    }

    /// Records a command; it takes effect at the next [`reconcile`](Self::reconcile).
    pub(super) fn command(&mut self, command: Command) {
        self.asked.push(command);
    }

    /// The number of the reload that a reload command recorded now will be answered by
    /// ([`Answer::Reload`] with `upto` at least this): the next one to begin, whether it begins
    /// at once or after the one under way. `None` while stopping (it will not run).
    pub(super) fn reload_ticket(&self) -> Option<u64> {
        (!self.stopping() && !self.asked.iter().any(|c| matches!(c, Command::Stop(_)))).then_some(self.reloads + 1)
    }

    /// Whether worker `id` can be restarted now (it has a process); why not otherwise.
    pub(super) fn can_restart(&self, id: u32) -> Result<(), String> {
        if self.stopping() {
            return Err("the cluster is stopping".into());
        }
        if id == AGENT_ID {
            return Err("the agent is restarted by a reload, not on its own".into());
        }
        let Some(slot) = self.slots.get(&id) else {
            return Err(format!("there is no worker {id} (workers: 1..={})", self.worker_count()));
        };
        match slot.current.and_then(|s| self.procs.get(&s)) {
            Some(p) if p.life.alive() => Ok(()),
            _ => Err(format!("worker {id} has no process now (it is waiting to restart)")),
        }
    }

    /// Whether the cluster is stopping: not ready, and no reload, scaling or limit starts a
    /// worker any more (during the stop delay a crashed one is still restarted).
    pub(super) fn stopping(&self) -> bool {
        self.stop != Stop::Running || self.stop_at.is_some()
    }

    /// Whether the cluster is past its stop delay, if any: draining, or killing (no worker
    /// starts, no socket is bound).
    pub(super) fn draining(&self) -> bool {
        self.stop != Stop::Running
    }

    /// While a graceful stop waits out its delay: how long until it drains.
    pub(super) fn stop_delay_left(&self, now: Instant) -> Option<Duration> {
        self.stop_at.map(|at| at.saturating_duration_since(now))
    }

    /// Decides what to do at `now`. See the module documentation.
    pub(super) fn reconcile(&mut self, now: Instant, world: &dyn World) -> Vec<Action> {
        let mut out = Vec::new();
        if self.last_step.is_none() {
            self.first_start = Some(now);
        }
        self.notice_suspension(now);
        if self.stop_at.is_some_and(|at| now >= at) {
            self.apply(Command::Stop(StopKind::Now), now, &mut out);
        }
        for command in std::mem::take(&mut self.asked) {
            self.apply(command, now, &mut out);
        }
        self.scale(&mut out, now);
        self.reap(now, &mut out);
        self.check_first_start(now, &mut out);
        self.check(now, &mut out);
        self.advance_reload(now, &mut out);
        self.check_limits(now, world, &mut out);
        self.fill_slots(now, &mut out);
        // Sockets about to close are not draining in `world` yet: retiring processes move on
        // in the next round, once the supervisor has started draining them.
        if !out.iter().any(|a| matches!(a, Action::StopListening { .. } | Action::CloseSockets(_))) {
            self.retire_steps(now, world, &mut out);
        }
        self.route(&mut out);
        match self.stop {
            Stop::Abort => out.push(Action::Exit(130)),
            Stop::Graceful | Stop::Fast if self.procs.is_empty() => {
                note!(event = "stopped", "all workers stopped; master exiting");
                out.push(Action::Exit(0));
            }
            Stop::Failed if self.procs.is_empty() => out.push(Action::Exit(1)),
            _ => {}
        }
        out
    }

    /// The latest instant the supervisor may wait before the next step.
    pub(super) fn next_wake(&self, now: Instant) -> Instant {
        let waiting =
            self.procs.values().any(|p| matches!(p.life, Life::Retiring { step, .. } if step != Step::Disconnected));
        let mut wake = now + if waiting { FAST_TICK } else { TICK };
        if let Some(at) = self.stop_at {
            wake = wake.min(at);
        }
        // Only a slot with no process has a restart time (`schedule_restart`; every start
        // clears it), as the seeded simulation checks.
        for at in self.slots.values().filter_map(|s| s.restart_at) {
            wake = wake.min(at);
        }
        wake
    }

    /// A snapshot of every process (and of worker ids waiting to restart), by id.
    pub(super) fn status(&self, now: Instant, world: &dyn World) -> Vec<WorkerStatus> {
        let mut out: Vec<WorkerStatus> = self
            .procs
            .iter()
            .filter(|(_, p)| p.pid != 0 && !matches!(p.life, Life::Exited { .. }))
            .map(|(serial, p)| WorkerStatus {
                id: p.id,
                pid: Some(p.pid),
                state: match p.life {
                    Life::Starting => WorkerState::Starting,
                    Life::Online => WorkerState::Online,
                    Life::Ready => WorkerState::Ready,
                    _ => WorkerState::Stopping,
                },
                uptime: now.saturating_duration_since(p.started),
                restarts: self.slots.get(&p.id).map_or(0, |s| s.restarts),
                connections: world.handled(*serial),
                restart_in: None,
                kill_in: match p.life {
                    Life::Retiring { kill_at, .. } => Some(kill_at.saturating_duration_since(now)),
                    _ => None,
                },
                rss: None,
                cpu_time: None,
                cpu_percent: None,
                open_connections: None,
            })
            .collect();
        for (id, slot) in &self.slots {
            if let (None, None, Some(at)) = (slot.current, &slot.incoming, slot.restart_at) {
                out.push(WorkerStatus {
                    id: *id,
                    pid: None,
                    state: WorkerState::Backoff,
                    uptime: Duration::ZERO,
                    restarts: slot.restarts,
                    connections: 0,
                    restart_in: Some(at.saturating_duration_since(now)),
                    kill_in: None,
                    rss: None,
                    cpu_time: None,
                    cpu_percent: None,
                    open_connections: None,
                });
            }
        }
        out.sort_by_key(|s| (s.id, s.pid));
        out
    }

    /// Whether a live process accepts on socket `key` (a draining socket waits only for them).
    pub(super) fn accepted_on(&self, key: ListenKey) -> bool {
        self.procs.values().any(|p| p.life.alive() && p.keys.contains(&key))
    }

    /// Worker ids (not the agent) whose current process is ready.
    pub(super) fn ready_count(&self) -> usize {
        let ready = |s: &Slot| s.current.and_then(|c| self.procs.get(&c)).is_some_and(|p| p.life == Life::Ready);
        self.slots.range(..AGENT_ID).filter(|(_, s)| ready(s)).count()
    }

    /// Whether a rolling reload is under way.
    pub(super) fn reloading(&self) -> bool {
        self.reload.is_some()
    }

    /// Worker slots wanted.
    pub(super) fn target(&self) -> usize {
        self.target
    }

    /// Worker slots (the agent's is not one).
    pub(super) fn worker_count(&self) -> usize {
        self.slots.range(..AGENT_ID).count()
    }
}
