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

use super::dispatch::Serial;
use super::{AGENT_ID, Event, ExitInfo, ExitReason, WorkerState, WorkerStatus};
use crate::config::Config;
use crate::ipc::message::ListenKey;
use crate::log::log;
use crate::messaging::Peer;

#[cfg(test)]
mod tests;

/// Housekeeping period: heartbeats, limits, deadlines.
pub(super) const TICK: Duration = Duration::from_millis(100);
/// Period while a retiring worker waits for its last connections to be acknowledged.
pub(super) const FAST_TICK: Duration = Duration::from_millis(20);
/// Two steps this far apart mean the master itself was stopped or starved: heartbeats that
/// could not be read meanwhile must not get workers killed.
const SUSPENDED: Duration = Duration::from_secs(1);
/// How often resident memory is checked, with a memory limit.
const RSS_CHECK: Duration = Duration::from_secs(1);
/// Most workers: ids stay below the wire addresses of the agent and of "all workers".
const MAX_WORKERS: usize = 65_536;

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
    /// Any other message: proof of life.
    Heard,
    /// It reported a panic and is exiting.
    Panicked(String),
    /// It broke the protocol.
    ProtocolError(String),
    /// It is gone and every message it sent has been read; `Err` if waiting for it failed.
    Exited(Result<Status, String>),
}

/// What user code, a signal or an operator asks of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    Reload,
    SetWorkers(usize),
    Stop(StopKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum StopKind {
    /// Stop accepting, let every worker finish (SIGTERM, first SIGINT).
    Graceful,
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
    /// The master is done: exit with this code.
    Exit(i32),
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
}

/// One worker id and the restart history of the processes that held it.
#[derive(Debug, Default)]
struct Slot {
    current: Option<Serial>,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    Graceful { deadline: Instant },
    Fast,
    Abort,
}

/// The decision core. See the module documentation.
pub(super) struct Core {
    cfg: Arc<Config>,
    procs: BTreeMap<Serial, Proc>,
    slots: BTreeMap<u32, Slot>,
    /// Worker slots wanted (the agent's is not one).
    target: usize,
    next_serial: Serial,
    stop: Stop,
    reload: Option<Reload>,
    /// Commands recorded since the last step.
    asked: Vec<Command>,
    last_step: Option<Instant>,
    next_rss_check: Option<Instant>,
    /// Seed of the per-process `max_connections` jitter.
    seed: u64,
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
            reload: None,
            asked: Vec::new(),
            last_step: None,
            next_rss_check: None,
            seed,
        }
    }

    /// Records what happened to process `serial`.
    pub(super) fn record(&mut self, serial: Serial, fact: Fact, now: Instant) {
        let Some(p) = self.procs.get_mut(&serial) else { return };
        p.last_seen = now;
        match fact {
            Fact::Spawned(pid) => {
                p.pid = pid;
                p.started = now;
            }
            Fact::SpawnFailed(e) => {
                log!("cannot start {}: {e}", Peer::from_wire(p.id));
                p.life = Life::Exited { status: Status::default(), retired: false };
            }
            Fact::Hello if p.life == Life::Starting => p.life = Life::Online,
            Fact::Listening(key) if !p.keys.contains(&key) => p.keys.push(key),
            Fact::Unlisten(key) => p.keys.retain(|k| *k != key),
            Fact::SaidReady => p.said_ready = true,
            Fact::Panicked(reason) => {
                log!("{} (pid {}) is exiting: {reason}", Peer::from_wire(p.id), p.pid);
                p.reason = Some(ExitReason::Panic(reason));
            }
            Fact::ProtocolError(e) => {
                if p.life.alive() {
                    log!("{} (pid {}): {e}; killing it", Peer::from_wire(p.id), p.pid);
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
            Fact::Hello | Fact::Listening(_) | Fact::Heard => {}
        }
        // The sockets of the process serving a slot are what its next process must listen on.
        let p = &self.procs[&serial];
        if let Some(slot) = self.slots.get_mut(&p.id)
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

    /// Whether the cluster is stopping (no worker starts any more, no socket is bound).
    pub(super) fn stopping(&self) -> bool {
        self.stop != Stop::Running
    }

    /// Decides what to do at `now`. See the module documentation.
    pub(super) fn reconcile(&mut self, now: Instant, world: &dyn World) -> Vec<Action> {
        let mut out = Vec::new();
        self.notice_suspension(now);
        for command in std::mem::take(&mut self.asked) {
            self.apply(command, now, &mut out);
        }
        self.scale(&mut out, now);
        self.reap(now, &mut out);
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
            Stop::Graceful { .. } | Stop::Fast if self.procs.is_empty() => {
                log!("all workers stopped; master exiting");
                out.push(Action::Exit(0));
            }
            _ => {}
        }
        out
    }

    /// The latest instant the supervisor may wait before the next step.
    pub(super) fn next_wake(&self, now: Instant) -> Instant {
        let waiting =
            self.procs.values().any(|p| matches!(p.life, Life::Retiring { step, .. } if step != Step::Disconnected));
        let mut wake = now + if waiting { FAST_TICK } else { TICK };
        let starts = self.slots.values().filter(|s| s.current.is_none() && s.incoming.is_none());
        for at in starts.filter_map(|s| s.restart_at) {
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

    /// Worker slots wanted.
    pub(super) fn target(&self) -> usize {
        self.target
    }

    /// Worker slots (the agent's is not one).
    pub(super) fn worker_count(&self) -> usize {
        self.slots.range(..AGENT_ID).count()
    }

    // ----- the steps of `reconcile` -----

    fn notice_suspension(&mut self, now: Instant) {
        if let Some(last) = self.last_step
            && now.saturating_duration_since(last) > SUSPENDED
        {
            let late = now.saturating_duration_since(last).as_secs_f64();
            log!("master was suspended for {late:.1}s; heartbeat clocks restarted");
            for p in self.procs.values_mut() {
                p.last_seen = now;
            }
        }
        self.last_step = Some(now);
    }

    fn apply(&mut self, command: Command, now: Instant, out: &mut Vec<Action>) {
        match (command, self.stop) {
            (Command::Stop(StopKind::Abort), _) => {
                log!("second SIGINT: killing all workers");
                self.stop = Stop::Abort;
                self.kill_all(out);
            }
            (Command::Stop(StopKind::Graceful), Stop::Running) => {
                let timeout = self.cfg.kill_timeout;
                log!("stopping gracefully (kill timeout {timeout:?})");
                self.stop = Stop::Graceful { deadline: now + timeout };
                if self.reload.take().is_some() {
                    log!("reload cancelled");
                }
                out.push(Action::StopListening { drain: true });
                let serials: Vec<Serial> = self.procs.keys().copied().collect();
                for serial in serials {
                    self.retire(serial, false, now, out);
                }
            }
            (Command::Stop(StopKind::Fast), Stop::Running | Stop::Graceful { .. }) => {
                log!("fast stop");
                self.stop = Stop::Fast;
                self.reload = None;
                out.push(Action::StopListening { drain: false });
                self.kill_all(out);
            }
            (Command::SetWorkers(n), Stop::Running) => {
                let n = n.clamp(1, MAX_WORKERS);
                if n == self.target {
                    log!("already {n} worker(s)");
                } else {
                    log!("scaling: {} -> {n} worker(s)", self.target);
                }
                self.target = n;
            }
            (Command::Reload, Stop::Running) => match &mut self.reload {
                Some(reload) => {
                    reload.again = true;
                    log!("a reload is in progress; another one follows it");
                }
                None => self.begin_reload(now, out),
            },
            _ => {}
        }
    }

    /// Adds or removes worker slots to match the target (removed ones: highest ids first, their
    /// processes retire gracefully).
    fn scale(&mut self, out: &mut Vec<Action>, now: Instant) {
        if self.stop != Stop::Running {
            return;
        }
        while self.worker_count() < self.target {
            let id = self.slots.range(..AGENT_ID).next_back().map_or(1, |(id, _)| id + 1);
            self.slots.insert(id, Slot::default());
        }
        while self.worker_count() > self.target {
            let id = *self.slots.range(..AGENT_ID).next_back().expect("a slot").0;
            let slot = self.slots.remove(&id).expect("the slot");
            out.push(Action::CloseSockets(id));
            if slot.routed.is_some() {
                out.push(Action::Route { id, to: None });
            }
            if let Some(reload) = &mut self.reload {
                reload.queue.retain(|s| *s != id);
                reload.active.retain(|s| *s != id);
            }
            for serial in slot.current.into_iter().chain(slot.incoming.map(|i| i.serial)) {
                self.retire(serial, true, now, out);
            }
        }
    }

    /// Forgets the processes that are gone and decides what their slots need.
    fn reap(&mut self, now: Instant, out: &mut Vec<Action>) {
        let gone: Vec<Serial> =
            self.procs.iter().filter(|(_, p)| matches!(p.life, Life::Exited { .. })).map(|(s, _)| *s).collect();
        for serial in gone {
            let p = self.procs.remove(&serial).expect("the process");
            let Life::Exited { status, retired } = p.life else { unreachable!() };
            let uptime = now.saturating_duration_since(p.started);
            if p.pid != 0 {
                let how = describe(status);
                let name = Peer::from_wire(p.id);
                match &p.reason {
                    _ if retired => log!("{name} (pid {}) {how}", p.pid),
                    Some(reason) => log!("{name} (pid {}) {how} after {:.1}s ({reason})", p.pid, uptime.as_secs_f64()),
                    None => log!("{name} (pid {}) {how} after {:.1}s", p.pid, uptime.as_secs_f64()),
                }
                out.push(Action::Emit(Event::Exit(ExitInfo {
                    id: p.id,
                    pid: p.pid,
                    code: status.code,
                    signal: status.signal,
                    after_disconnect: retired,
                    reason: p.reason.clone(),
                })));
            }
            let Some(slot) = self.slots.get_mut(&p.id) else { continue };
            if slot.incoming.as_ref().is_some_and(|i| i.serial == serial) {
                let how = if p.pid == 0 { "could not be started".into() } else { describe(status) };
                self.incoming_failed(p.id, &format!("its new process {how} before it was ready"), now, out);
                continue;
            }
            if slot.current != Some(serial) {
                continue;
            }
            slot.current = None;
            if self.stop != Stop::Running {
                continue;
            }
            if slot.incoming.is_some() {
                // Its replacement is on the way and takes over when ready.
                slot.restarts += 1;
            } else {
                // A process asked to stop (the agent, on a reload) did not crash.
                let unstable = !retired && (p.ready_at.is_none() || uptime < self.cfg.min_uptime);
                self.schedule_restart(p.id, unstable, now, out);
            }
        }
    }

    /// Protocol errors, heartbeats, readiness, and replacements late to be ready.
    fn check(&mut self, now: Instant, out: &mut Vec<Action>) {
        let serials: Vec<Serial> = self.procs.keys().copied().collect();
        for serial in serials {
            let p = &self.procs[&serial];
            if !p.life.alive() || p.pid == 0 {
                continue;
            }
            if matches!(p.reason, Some(ExitReason::ProtocolError(_))) {
                self.kill(serial, None, out);
                continue;
            }
            let silent = now.saturating_duration_since(p.last_seen);
            if self.cfg.heartbeat_timeout.is_some_and(|timeout| silent > timeout) {
                let name = Peer::from_wire(p.id);
                log!("{name} (pid {}) sent no heartbeat for {:.1}s; killing it", p.pid, silent.as_secs_f64());
                self.kill(serial, Some(ExitReason::MissedHeartbeats), out);
                continue;
            }
            if p.life == Life::Online && self.is_ready(p) {
                self.became_ready(serial, now, out);
            }
        }
        let late: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| s.incoming.as_ref().is_some_and(|i| i.deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let why = format!("its new process was not ready within {:?}", self.cfg.ready_timeout);
            if let Some(incoming) = &self.slots[&id].incoming {
                self.kill(incoming.serial, Some(ExitReason::NotReady), out);
            }
            self.incoming_failed(id, &why, now, out);
        }
    }

    fn is_ready(&self, p: &Proc) -> bool {
        // The agent takes no connections: it is ready once it runs.
        let listening = if p.id == AGENT_ID {
            true
        } else if p.expected.is_empty() {
            !p.keys.is_empty()
        } else {
            p.expected.iter().all(|k| p.keys.contains(k))
        };
        p.said_ready || (!self.cfg.wait_ready && listening)
    }

    fn became_ready(&mut self, serial: Serial, now: Instant, out: &mut Vec<Action>) {
        let p = self.procs.get_mut(&serial).expect("the process");
        p.life = Life::Ready;
        p.ready_at = Some(now);
        let (id, pid) = (p.id, p.pid);
        let took = now.saturating_duration_since(p.started).as_micros();
        log!("{} ready (pid {pid}) {took} us after start", Peer::from_wire(id));
        out.push(Action::Emit(Event::Ready { id, pid }));
        let keys = p.keys.clone();
        let Some(slot) = self.slots.get_mut(&id) else { return };
        if !keys.is_empty() {
            slot.expected = keys;
        }
        if slot.incoming.as_ref().is_some_and(|i| i.serial == serial) {
            self.promote(id, now, out);
        }
    }

    /// The incoming process of slot `id` is ready: it serves the slot and the old one retires.
    fn promote(&mut self, id: u32, now: Instant, out: &mut Vec<Action>) {
        let slot = self.slots.get_mut(&id).expect("the slot");
        let incoming = slot.incoming.take().expect("an incoming process");
        slot.retry_at = None;
        let old = slot.current.replace(incoming.serial);
        let new_pid = self.procs[&incoming.serial].pid;
        match old.and_then(|s| self.procs.get(&s)) {
            Some(p) => log!("{} replaced: pid {} -> pid {new_pid}", Peer::from_wire(id), p.pid),
            None => log!("{} is back (pid {new_pid})", Peer::from_wire(id)),
        }
        if let Some(old) = old {
            self.retire(old, true, now, out);
        }
        if incoming.cause == Cause::Reload
            && let Some(reload) = &mut self.reload
        {
            reload.active.retain(|a| *a != id);
            reload.replaced += 1;
        }
    }

    /// The process started to take over slot `id` died, could not start, or was late.
    fn incoming_failed(&mut self, id: u32, why: &str, now: Instant, out: &mut Vec<Action>) {
        let (first, max) = (self.cfg.restart_delay, self.cfg.restart_delay_max);
        let Some(slot) = self.slots.get_mut(&id) else { return };
        let Some(incoming) = slot.incoming.take() else { return };
        match incoming.cause {
            Cause::Reload => self.abandon_reload(id, why, out),
            Cause::Limit => {
                slot.backoff = bump(slot.backoff, first, max);
                slot.retry_at = Some(now + slot.backoff);
                log!("replacement of {} failed: {why}; the old process keeps serving", Peer::from_wire(id));
            }
        }
        if self.stop == Stop::Running && self.slots.get(&id).is_some_and(|s| s.current.is_none()) {
            self.schedule_restart(id, true, now, out);
        }
    }

    /// Restarts slot `id`: at once after a stable run, with growing delays while it keeps
    /// dying young (never giving up).
    fn schedule_restart(&mut self, id: u32, unstable: bool, now: Instant, out: &mut Vec<Action>) {
        let (first, max) = (self.cfg.restart_delay, self.cfg.restart_delay_max);
        let Some(slot) = self.slots.get_mut(&id) else { return };
        slot.restarts += 1;
        if !unstable {
            slot.backoff = Duration::ZERO;
            slot.restart_at = None;
            return;
        }
        slot.backoff = bump(slot.backoff, first, max);
        slot.restart_at = Some(now + slot.backoff);
        let (restarts, delay) = (slot.restarts, slot.backoff);
        log!("{} is crash-looping (restart {restarts}); next start in {delay:?}", Peer::from_wire(id));
        out.push(Action::Emit(Event::CrashLoop { id, restarts, delay }));
    }

    fn begin_reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        let (n, at_a_time) = (self.worker_count(), self.cfg.reload_concurrency);
        log!("reloading {n} worker(s), {at_a_time} at a time");
        // The agent is a singleton: it is stopped, then restarted, never doubled.
        if let Some(agent) = self.slots.get(&AGENT_ID).and_then(|s| s.current) {
            log!("restarting the agent");
            self.retire(agent, true, now, out);
        }
        self.reload = Some(Reload {
            queue: self.slots.range(..AGENT_ID).map(|(id, _)| *id).collect(),
            active: Vec::new(),
            replaced: 0,
            again: false,
            started: now,
        });
    }

    /// Starts the next replacements of the reload, or ends it.
    fn advance_reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        loop {
            let Some(reload) = &mut self.reload else { return };
            if reload.active.len() >= self.cfg.reload_concurrency.max(1) {
                return;
            }
            let Some(id) = reload.queue.pop_front() else {
                if !reload.active.is_empty() {
                    return;
                }
                let reload = self.reload.take().expect("a reload");
                let took = now.saturating_duration_since(reload.started);
                log!("reload complete in {} ms", took.as_millis());
                out.push(Action::Emit(Event::ReloadDone { replaced: reload.replaced, took }));
                if reload.again {
                    self.begin_reload(now, out);
                    continue;
                }
                return;
            };
            if !self.slots.contains_key(&id) {
                continue;
            }
            reload.active.push(id);
            self.start_incoming(id, Cause::Reload, now, out);
        }
    }

    /// Stops the reload; the old processes of slots not yet replaced keep serving.
    fn abandon_reload(&mut self, id: u32, why: &str, out: &mut Vec<Action>) {
        let Some(reload) = self.reload.take() else { return };
        let kept = reload.queue.len() + reload.active.len();
        log!("reload abandoned: {}: {why}; {kept} worker(s) not replaced keep serving", Peer::from_wire(id));
        out.push(Action::Emit(Event::ReloadAbandoned { id, reason: why.to_string() }));
        for other in reload.active.into_iter().filter(|a| *a != id) {
            let Some(incoming) = self.slots.get_mut(&other).and_then(|s| s.incoming.take()) else { continue };
            self.kill(incoming.serial, Some(ExitReason::Abandoned), out);
        }
    }

    /// Starts a process to take over slot `id` once it is ready.
    fn start_incoming(&mut self, id: u32, cause: Cause, now: Instant, out: &mut Vec<Action>) {
        let Some(slot) = self.slots.get_mut(&id) else { return };
        if let Some(incoming) = &mut slot.incoming {
            incoming.cause = cause;
            return;
        }
        slot.restart_at = None;
        let expected = match slot.current.and_then(|s| self.procs.get(&s)) {
            Some(p) if !p.keys.is_empty() => p.keys.clone(),
            _ => slot.expected.clone(),
        };
        let serial = self.spawn(id, expected, now, out);
        let deadline = now + self.cfg.ready_timeout;
        self.slots.get_mut(&id).expect("the slot").incoming = Some(Incoming { serial, deadline, cause });
    }

    /// Memory and connection limits: a worker over one is replaced gracefully.
    fn check_limits(&mut self, now: Instant, world: &dyn World, out: &mut Vec<Action>) {
        if self.reload.is_some() || self.stop != Stop::Running {
            return;
        }
        let check_rss = self.cfg.max_rss.is_some() && self.next_rss_check.is_none_or(|t| now >= t);
        if check_rss {
            self.next_rss_check = Some(now + RSS_CHECK);
        }
        let mut over = Vec::new();
        for (id, slot) in self.slots.range(..AGENT_ID) {
            let Some((serial, p)) = slot.current.and_then(|s| Some((s, self.procs.get(&s)?))) else { continue };
            if slot.incoming.is_some() || slot.retry_at.is_some_and(|t| t > now) || p.life != Life::Ready {
                continue;
            }
            if let Some(max) = p.max_connections {
                let served = world.handled(serial);
                if served >= max {
                    over.push((*id, format!("served {served} connections (limit {max})")));
                    continue;
                }
            }
            if let (true, Some(max)) = (check_rss, self.cfg.max_rss)
                && let Some(rss) = world.rss(p.pid)
                && rss > max
            {
                over.push((*id, format!("uses {} MiB of memory (limit {} MiB)", rss >> 20, max >> 20)));
            }
        }
        for (id, why) in over {
            log!("{} {why}; replacing it", Peer::from_wire(id));
            self.start_incoming(id, Cause::Limit, now, out);
        }
    }

    /// Starts a process for every slot that has none and whose (re)start is due.
    fn fill_slots(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.stop != Stop::Running {
            return;
        }
        let due: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| s.current.is_none() && s.incoming.is_none() && s.restart_at.is_none_or(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let slot = self.slots.get_mut(&id).expect("the slot");
            slot.restart_at = None;
            let expected = slot.expected.clone();
            let serial = self.spawn(id, expected, now, out);
            self.slots.get_mut(&id).expect("the slot").current = Some(serial);
        }
    }

    /// Moves retiring processes along: closed once no connection waits in the master for a
    /// worker, disconnected once every connection sent to them is acknowledged, killed at the
    /// kill timeout.
    fn retire_steps(&mut self, now: Instant, world: &dyn World, out: &mut Vec<Action>) {
        let master_draining = world.master_draining();
        let mut backlog_empty = None;
        for (serial, p) in self.procs.iter_mut() {
            let Life::Retiring { step, kill_at } = &mut p.life else { continue };
            if now >= *kill_at {
                log!("{} (pid {}) still running at the kill timeout; killing it", Peer::from_wire(p.id), p.pid);
                p.reason.get_or_insert(ExitReason::KillTimeout);
                p.life = Life::Killed { retired: true };
                out.push(Action::Kill(*serial));
                continue;
            }
            if *step == Step::Open {
                // No worker is closed while the master still has connections to hand out: any
                // of them may get the last ones.
                if master_draining || !*backlog_empty.get_or_insert_with(|| world.backlog_empty()) {
                    continue;
                }
                *step = Step::Closed;
                out.push(Action::Close(*serial));
            }
            if *step == Step::Closed && world.inflight(*serial) == 0 && !world.draining(&p.keys) {
                *step = Step::Disconnected;
                out.push(Action::Disconnect(*serial));
                out.push(Action::Emit(Event::Disconnect { id: p.id, pid: p.pid }));
            }
        }
    }

    /// Messages for a worker id go to the process serving it, once that one has connected.
    fn route(&mut self, out: &mut Vec<Action>) {
        for (id, slot) in self.slots.iter_mut() {
            let to =
                slot.current.filter(|s| self.procs.get(s).is_some_and(|p| p.life.alive() && p.life != Life::Starting));
            if to != slot.routed {
                slot.routed = to;
                out.push(Action::Route { id: *id, to });
            }
        }
    }

    // ----- helpers -----

    fn spawn(&mut self, id: u32, expected: Vec<ListenKey>, now: Instant, out: &mut Vec<Action>) -> Serial {
        let serial = self.next_serial;
        self.next_serial += 1;
        let max_connections = self.cfg.max_connections.map(|n| {
            let jitter = self.cfg.max_connections_jitter;
            let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one((self.seed, serial));
            n + if jitter == 0 { 0 } else { hash % (jitter + 1) }
        });
        let p = Proc {
            id,
            pid: 0,
            started: now,
            life: Life::Starting,
            ready_at: None,
            said_ready: false,
            keys: Vec::new(),
            expected,
            last_seen: now,
            max_connections,
            reason: None,
        };
        self.procs.insert(serial, p);
        out.push(Action::Spawn { serial, id });
        serial
    }

    /// Retires a process: with `close_now`, it gets no new connections from this moment.
    fn retire(&mut self, serial: Serial, close_now: bool, now: Instant, out: &mut Vec<Action>) {
        let kill_at = match self.stop {
            Stop::Graceful { deadline } => deadline,
            _ => now + self.cfg.kill_timeout,
        };
        let Some(p) = self.procs.get_mut(&serial) else { return };
        match &mut p.life {
            Life::Starting | Life::Online | Life::Ready => {
                let step = if close_now { Step::Closed } else { Step::Open };
                p.life = Life::Retiring { step, kill_at };
            }
            Life::Retiring { step: step @ Step::Open, .. } if close_now => *step = Step::Closed,
            _ => return,
        }
        if close_now {
            out.push(Action::Close(serial));
        }
    }

    /// SIGKILLs a live process.
    fn kill(&mut self, serial: Serial, reason: Option<ExitReason>, out: &mut Vec<Action>) {
        let Some(p) = self.procs.get_mut(&serial) else { return };
        if !p.life.alive() {
            return;
        }
        if let Some(reason) = reason {
            p.reason.get_or_insert(reason);
        }
        p.life = Life::Killed { retired: matches!(p.life, Life::Retiring { .. }) };
        out.push(Action::Kill(serial));
    }

    fn kill_all(&mut self, out: &mut Vec<Action>) {
        let serials: Vec<Serial> = self.procs.keys().copied().collect();
        for serial in serials {
            self.kill(serial, None, out);
        }
    }
}

/// The next crash-loop delay: `first`, then doubling up to `max`.
fn bump(backoff: Duration, first: Duration, max: Duration) -> Duration {
    if backoff.is_zero() { first } else { (backoff * 2).min(max) }
}

fn describe(status: Status) -> String {
    match (status.code, status.signal) {
        (Some(code), _) => format!("exited with code {code}"),
        (_, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "exited".into(),
    }
}
