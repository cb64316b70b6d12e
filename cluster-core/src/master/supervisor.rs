//! The master's control path: starting workers, hearing from them, replacing them (crashes,
//! rolling reloads, limits, missed heartbeats), scaling, and stopping them all.
//!
//! Each worker id (1..=N) is a [`Slot`]: the process serving it (`current`), perhaps the process
//! that will replace it (`incoming`), and its restart history. Every replacement follows one
//! path: start the new process, wait until it is ready, then [`retire`](Supervisor::retire) the
//! old one (no new connections at once; `disconnect` once the master holds none for it;
//! SIGKILL at the kill timeout). "What happens when a worker dies" is [`Supervisor::reap`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::sleep_until;

use super::dispatch::{self, Dispatch, Serial};
use super::{Event, ExitInfo, Registry, WorkerState, WorkerStatus};
use crate::config::{Config, Policy};
use crate::ipc::message::{
    AGENT, ALL_WORKERS, Endpoint, ListenKey, PROTOCOL_VERSION, ProtocolError, Reassembly, ToMaster, USER_TO_WORKER,
    Whole, encode,
};
use crate::ipc::{Channel, Receiver, RecvError};
use crate::log::log;
use crate::messaging::{self, Calls, Peer, Request};
use crate::role::{AGENT_UNIQUE_ID, CHANNEL_FD, ENV_CHANNEL_FD, ENV_UNIQUE_ID};
use crate::sys;

/// What the per-worker tasks report to the supervisor.
pub(super) enum Report {
    Message {
        serial: Serial,
        msg: ToMaster,
    },
    /// The worker broke the protocol: kill it (its channel is still read until it closes).
    Bad {
        serial: Serial,
        error: RecvError,
    },
    /// End of the worker's channel: every message it sent has been read.
    Closed {
        serial: Serial,
    },
    Exited {
        serial: Serial,
        status: io::Result<ExitStatus>,
    },
}

/// Requests from user code in the master (see [`Master`](super::Master)).
pub(super) enum Command {
    Reload,
    SetWorkers(usize),
    Status(oneshot::Sender<Vec<WorkerStatus>>),
}

/// One worker process.
struct Worker {
    id: u32,
    pid: u32,
    started: Instant,
    channel: Arc<Channel>,
    state: WorkerState,
    /// It has been ready at some point (an exit before that is a failed start).
    was_ready: bool,
    /// Listeners it accepts on.
    keys: Vec<ListenKey>,
    /// Listeners it must accept on to be ready: those of the process it replaces.
    expected: Vec<ListenKey>,
    said_ready: bool,
    /// Retiring: gets no new connections once `closed`, is told to disconnect once it holds
    /// none in flight, and is killed at `kill_at`.
    kill_at: Option<Instant>,
    closed: bool,
    disconnected: bool,
    killed: bool,
    last_seen: Instant,
    /// Connections after which it is replaced (`max_connections` plus this worker's jitter).
    max_connections: Option<u64>,
    /// Why it is exiting, as it or the master saw it.
    reason: Option<String>,
    channel_closed: bool,
    status: Option<ExitStatus>,
}

/// One worker id (1..=N) and the restart history of the processes that held it.
#[derive(Default)]
struct Slot {
    current: Option<Serial>,
    incoming: Option<Incoming>,
    restarts: u32,
    backoff: Duration,
    start_at: Option<Instant>,
    /// Listeners of the last process that served this slot.
    expected: Vec<ListenKey>,
    /// A failed limit replacement is retried no sooner than this.
    retry_at: Option<Instant>,
}

/// A process started to take over a slot, not yet ready.
struct Incoming {
    serial: Serial,
    deadline: Instant,
    cause: Cause,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cause {
    Reload,
    Limit,
}

/// A rolling reload in progress.
struct Reload {
    /// Slots still to replace, in order.
    queue: VecDeque<u32>,
    /// Slots whose replacement is starting.
    active: Vec<u32>,
    /// Another reload was asked for meanwhile: run one more when this one ends.
    again: bool,
    started: Instant,
}

/// A socket the master owns.
struct Listener {
    /// Bound address (none for Unix sockets).
    addr: Option<SocketAddr>,
    kind: Kind,
    /// A Unix socket's file, removed when the master stops listening.
    unix_path: Option<PathBuf>,
}

enum Kind {
    /// The master accepts and dispatches connections.
    Stream { socket: Arc<AsyncFd<Socket>>, task: JoinHandle<()> },
    /// Workers get the socket itself and use it directly: UDP, and TCP under the `shared` and
    /// `reuseport` policies.
    Handed(Socket),
}

impl Listener {
    /// A duplicate of the socket, for sockets workers use directly.
    fn shared_fd(&self) -> Option<OwnedFd> {
        match &self.kind {
            Kind::Handed(socket) => socket.try_clone().ok().map(OwnedFd::from),
            Kind::Stream { .. } => None,
        }
    }
}

/// A TCP listening socket being closed without resetting anyone (closing it resets every
/// client in its accept queue, and every handshake still under way on it). The kernel starts
/// no new handshake on it ([`sys::stop_queueing`]); the handshakes already under way complete
/// ([`sys::pending_handshakes`]); whoever accepts on it (the workers, or the master under
/// `rr`) empties its queue; then it is shut down. A worker is not closed (`rr`) or told to
/// disconnect (a socket it accepts on) before that. Given up, with what it holds, when no live
/// worker accepts on it any more, or after [`DRAIN_LIMIT`] (a client that never answers the
/// SYN-ACK holds the close that long).
struct Draining {
    key: ListenKey,
    kind: Kind,
    /// The socket's local address.
    local: SocketAddr,
    since: Instant,
    handshakes: Handshakes,
}

/// The handshakes towards a draining socket's port that were under way when it stopped
/// queueing, named by their kernel cookies.
#[derive(Default)]
enum Handshakes {
    /// Listed once a SYN that raced with the filter has had time to enter the kernel's table.
    #[default]
    Unlisted,
    /// Those still in the table.
    Pending(Vec<u64>),
    /// The last one was seen gone at this instant.
    Done(Instant),
    /// They cannot be listed (no `sock_diag`): they are given [`HANDSHAKE_GRACE`].
    Unknown,
}

impl Draining {
    /// Stops the kernel from starting handshakes on a TCP listener. Gives `kind` back when
    /// there is nothing to drain (UDP, Unix sockets) or the kernel refused.
    fn start(key: ListenKey, kind: Kind) -> Result<Draining, Kind> {
        let Some(local) = kind.tcp_addr() else { return Err(kind) };
        if let Err(e) = sys::stop_queueing(kind.socket()) {
            log!("listener {key}: cannot stop queueing new clients ({e}); closing it with what it holds");
            return Err(kind);
        }
        Ok(Draining { key, kind, local, since: Instant::now(), handshakes: Handshakes::Unlisted })
    }

    /// Whether a handshake under way when the socket stopped queueing may still complete and
    /// join its queue.
    fn handshaking(&mut self, now: Instant) -> bool {
        if now < self.since + SETTLE {
            return true;
        }
        if let Handshakes::Unlisted | Handshakes::Pending(_) = self.handshakes {
            self.handshakes = match (sys::pending_handshakes(self.local), std::mem::take(&mut self.handshakes)) {
                (Err(e), _) => {
                    let key = self.key;
                    log!("listener {key}: cannot list the handshakes under way ({e}); giving them {HANDSHAKE_GRACE:?}");
                    Handshakes::Unknown
                }
                (Ok(pending), Handshakes::Pending(mut list)) => {
                    list.retain(|cookie| pending.contains(cookie));
                    if list.is_empty() { Handshakes::Done(now) } else { Handshakes::Pending(list) }
                }
                (Ok(pending), _) if pending.is_empty() => Handshakes::Done(now),
                (Ok(pending), _) => Handshakes::Pending(pending),
            };
        }
        match self.handshakes {
            Handshakes::Unlisted | Handshakes::Pending(_) => true,
            // A completed handshake leaves the table a moment before its connection is counted
            // in the queue.
            Handshakes::Done(at) => now < at + SETTLE,
            Handshakes::Unknown => now < self.since + HANDSHAKE_GRACE,
        }
    }

    /// When [`handshaking`](Self::handshaking) can next change its answer without a
    /// handshake completing (`None`: any time, it is polled).
    fn wake_at(&self) -> Option<Instant> {
        match self.handshakes {
            Handshakes::Unlisted => Some(self.since + SETTLE),
            Handshakes::Pending(_) => None,
            Handshakes::Done(at) => Some(at + SETTLE),
            Handshakes::Unknown => Some(self.since + HANDSHAKE_GRACE),
        }
    }
}

impl Kind {
    fn socket(&self) -> &Socket {
        match self {
            Kind::Stream { socket, .. } => socket.get_ref(),
            Kind::Handed(socket) => socket,
        }
    }

    /// The local address of a TCP socket; `None` for UDP and Unix sockets.
    fn tcp_addr(&self) -> Option<SocketAddr> {
        let socket = self.socket();
        let tcp = socket.r#type().ok()? == socket2::Type::STREAM;
        tcp.then(|| socket.local_addr().ok()?.as_socket()).flatten()
    }

    /// Stops listening. With `sweep`, the master first takes the connections queued on a
    /// socket it accepts on (a Unix socket refuses new clients once shut down and still hands
    /// out its queue; a TCP socket resets its queue when shut down, so it is swept first). A
    /// socket workers accept on is just shut down. Leaves the listening state (and its
    /// `SO_REUSEPORT` group) now, not when the last copy, held by a worker or an aborted task,
    /// is closed.
    fn close(self, key: ListenKey, sweep: Option<&Dispatch>) {
        let tcp = self.tcp_addr().is_some();
        match self {
            Kind::Stream { socket, task } => {
                task.abort();
                if let Some(dispatch) = sweep {
                    if !tcp {
                        let _ = socket.get_ref().shutdown(std::net::Shutdown::Both);
                    }
                    let n = dispatch::sweep(&socket, key, dispatch);
                    if n > 0 {
                        log!("took {n} last connection(s) from listener {key}");
                    }
                }
                let _ = socket.get_ref().shutdown(std::net::Shutdown::Both);
            }
            Kind::Handed(socket) if tcp => {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
            Kind::Handed(_) => {}
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.close_listeners(false);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// No more accepts; every worker retires; SIGKILL at the deadline.
    Graceful {
        deadline: Instant,
    },
    /// Every worker was SIGKILLed.
    Fast,
}

pub(super) struct Supervisor {
    cfg: Arc<Config>,
    exe: PathBuf,
    argv0: OsString,
    args: Vec<OsString>,
    dispatch: Arc<Dispatch>,
    registry: Registry,
    /// Requests made by user code in the master, waiting for replies.
    calls: Arc<Calls>,
    events: Option<mpsc::UnboundedSender<Event>>,
    commands: mpsc::UnboundedReceiver<Command>,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports: mpsc::UnboundedReceiver<Report>,
    workers: BTreeMap<Serial, Worker>,
    slots: BTreeMap<u32, Slot>,
    next_serial: Serial,
    listeners: HashMap<ListenKey, Listener>,
    /// Sockets by (endpoint, port-0 index, worker id under `reuseport` else 0).
    by_addr: HashMap<(Endpoint, u32, u32), ListenKey>,
    /// Under `reuseport`, the address the first socket of (endpoint, index) got, so that
    /// every worker's socket binds the same port.
    reuseport_addr: HashMap<(Endpoint, u32), SocketAddr>,
    /// TCP sockets workers accept on themselves that the master is closing: closing a
    /// listening socket resets the clients queued on it. See [`Draining`].
    draining: Vec<Draining>,
    next_key: ListenKey,
    stop: Stop,
    reload: Option<Reload>,
    last_tick: Instant,
    next_rss_check: Instant,
    jitter: RandomState,
}

/// Housekeeping period: heartbeats, deadlines, limits.
const TICK: Duration = Duration::from_millis(100);
/// Period while a retiring worker waits for its last connections to be acknowledged.
const FAST_TICK: Duration = Duration::from_millis(20);
/// A tick this late means the master itself was stopped or starved: heartbeats that could
/// not be read meanwhile must not get workers killed.
const SUSPENDED: Duration = Duration::from_secs(1);
const RSS_CHECK: Duration = Duration::from_secs(1);
/// Longest wait for workers to empty a socket's accept queue (they take a full one in
/// milliseconds; a hung worker must not hold the others' stop).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How long a closing socket waits for the handshakes under way on it when the kernel cannot
/// list them (no `sock_diag`): a round trip on a local network, with room to spare.
const HANDSHAKE_GRACE: Duration = Duration::from_millis(200);
/// A moment for the kernel to finish what it was doing when a socket's state was read: a SYN
/// racing with the filter entering the table of handshakes, a completed handshake leaving it
/// and being counted in the accept queue.
const SETTLE: Duration = Duration::from_millis(5);

impl Supervisor {
    pub(super) fn new(
        cfg: Arc<Config>,
        registry: Registry,
        calls: Arc<Calls>,
        events: Option<mpsc::UnboundedSender<Event>>,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut argv = std::env::args_os();
        let argv0 = argv.next().unwrap_or_else(|| exe.clone().into_os_string());
        let (reports_tx, reports) = mpsc::unbounded_channel();
        Ok(Supervisor {
            dispatch: Arc::new(Dispatch::new(cfg.window, cfg.balancer, cfg.max_worker_connections)),
            cfg,
            exe,
            argv0,
            args: argv.collect(),
            registry,
            calls,
            events,
            commands,
            reports_tx,
            reports,
            workers: BTreeMap::new(),
            slots: BTreeMap::new(),
            next_serial: 1,
            listeners: HashMap::new(),
            by_addr: HashMap::new(),
            reuseport_addr: HashMap::new(),
            draining: Vec::new(),
            next_key: 1,
            stop: Stop::Running,
            reload: None,
            last_tick: Instant::now(),
            next_rss_check: Instant::now(),
            jitter: RandomState::new(),
        })
    }

    /// Runs the cluster until it is stopped; returns the master's exit code.
    pub(super) async fn run(mut self) -> i32 {
        let Ok(mut signals) = Signals::new() else {
            log!("cannot install signal handlers");
            return 1;
        };
        let ids = (1..=self.cfg.workers.min(MAX_WORKERS) as u32).chain(self.cfg.agent.then_some(AGENT));
        for id in ids {
            self.slots.insert(id, Slot::default());
            self.start(id);
        }
        let agent = if self.cfg.agent { " and the agent" } else { "" };
        log!("master (pid {}) started {} worker(s){agent}", sys::getpid(), self.cfg.workers);
        loop {
            if self.stop != Stop::Running && self.workers.is_empty() {
                log!("all workers stopped; master exiting");
                return 0;
            }
            let wake = self.next_wake();
            tokio::select! {
                Some(report) = self.reports.recv() => self.on_report(report),
                Some(command) = self.commands.recv() => self.on_command(command),
                _ = signals.term.recv() => self.begin_stop("SIGTERM"),
                _ = signals.int.recv() => {
                    if self.stop != Stop::Running {
                        log!("second SIGINT: killing all workers");
                        self.kill_all();
                        return 130;
                    }
                    self.begin_stop("SIGINT");
                }
                _ = signals.quit.recv() => self.fast_stop(),
                _ = signals.hup.recv() => self.begin_reload("SIGHUP"),
                _ = signals.ttin.recv() => self.set_workers(self.worker_count() + 1, "SIGTTIN"),
                _ = signals.ttou.recv() => self.set_workers(self.worker_count().saturating_sub(1), "SIGTTOU"),
                _ = sleep_until(wake.into()) => self.on_tick(),
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let draining =
            !self.draining.is_empty() || self.workers.values().any(|w| w.kill_at.is_some() && !w.disconnected);
        let tick = self.last_tick + if draining { FAST_TICK } else { TICK };
        let starts = self.slots.values().filter_map(|s| s.start_at);
        starts.chain(self.draining.iter().filter_map(Draining::wake_at)).fold(tick, Instant::min)
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let late = now.saturating_duration_since(self.last_tick);
        self.last_tick = now;
        if late > SUSPENDED {
            log!("master was suspended for {:.1}s; heartbeat clocks restarted", late.as_secs_f64());
            for w in self.workers.values_mut() {
                w.last_seen = now;
            }
        }
        if self.stop == Stop::Running {
            let due: Vec<u32> =
                self.slots.iter().filter(|(_, s)| s.start_at.is_some_and(|t| t <= now)).map(|(id, _)| *id).collect();
            for id in due {
                self.start(id);
            }
            self.check_ready_deadlines(now);
            self.check_limits(now);
        }
        self.dispatch.tick(now);
        self.check_heartbeats(now);
        self.retire_step(now);
    }

    // ----- starting workers -----

    /// Starts the process serving slot `id` (first start or restart). On failure, retries
    /// later with backoff.
    fn start(&mut self, id: u32) {
        let Some(slot) = self.slots.get_mut(&id) else { return };
        slot.start_at = None;
        let expected = slot.expected.clone();
        match self.spawn(id, expected) {
            Ok(serial) => self.slot(id).current = Some(serial),
            Err(e) => {
                log!("cannot start {}: {e}", peer(id));
                self.schedule_restart(id, true);
            }
        }
    }

    /// Starts a process to take over slot `id` once it is ready. False if it could not start.
    fn start_incoming(&mut self, id: u32, cause: Cause) -> bool {
        let Some(slot) = self.slots.get_mut(&id) else { return false };
        if let Some(incoming) = &mut slot.incoming {
            incoming.cause = cause;
            return true;
        }
        slot.start_at = None;
        let expected = match slot.current.and_then(|s| self.workers.get(&s)) {
            Some(w) if !w.keys.is_empty() => w.keys.clone(),
            _ => slot.expected.clone(),
        };
        match self.spawn(id, expected) {
            Ok(serial) => {
                let deadline = Instant::now() + self.cfg.ready_timeout;
                self.slot(id).incoming = Some(Incoming { serial, deadline, cause });
                true
            }
            Err(e) => {
                log!("cannot start a new {}: {e}", peer(id));
                false
            }
        }
    }

    fn spawn(&mut self, id: u32, expected: Vec<ListenKey>) -> io::Result<Serial> {
        let serial = self.next_serial;
        self.next_serial += 1;
        let (channel, child_end) = Channel::pair()?;
        // Each start runs the binary on disk, so a reload picks up a new build.
        let mut child = match self.command(&self.exe, id, child_end.as_raw_fd()).spawn() {
            // The binary on disk vanished (a deploy in progress): fall back to the running one.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.command("/proc/self/exe".as_ref(), id, child_end.as_raw_fd()).spawn()?
            }
            other => other?,
        };
        drop(child_end);
        let pid = child.id().unwrap_or(0);
        let channel = Arc::new(channel);
        self.dispatch.add_worker(serial, id, channel.clone());
        let tx = self.reports_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(Report::Exited { serial, status });
        });
        let relay = relay(id, channel.clone(), self.registry.clone());
        let calls = self.calls.clone();
        tokio::spawn(read_loop(serial, channel.clone(), self.dispatch.clone(), self.reports_tx.clone(), relay, calls));
        let max_connections = self.cfg.max_connections.map(|n| {
            let jitter = self.cfg.max_connections_jitter;
            n + if jitter == 0 { 0 } else { self.jitter.hash_one(serial) % (jitter + 1) }
        });
        let now = Instant::now();
        self.workers.insert(
            serial,
            Worker {
                id,
                pid,
                started: now,
                channel,
                state: WorkerState::Starting,
                was_ready: false,
                keys: Vec::new(),
                expected,
                said_ready: false,
                kill_at: None,
                closed: false,
                disconnected: false,
                killed: false,
                last_seen: now,
                max_connections,
                reason: None,
                channel_closed: false,
                status: None,
            },
        );
        log!("{} started (pid {pid})", peer(id));
        self.emit(Event::Fork { id, pid });
        Ok(serial)
    }

    fn command(&self, exe: &std::path::Path, id: u32, channel: std::os::fd::RawFd) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(exe);
        let unique = if id == AGENT { AGENT_UNIQUE_ID.to_string() } else { id.to_string() };
        cmd.arg0(&self.argv0).args(&self.args).env(ENV_UNIQUE_ID, unique).env(ENV_CHANNEL_FD, CHANNEL_FD.to_string());
        sys::prepare_worker_command(cmd.as_std_mut(), channel, CHANNEL_FD);
        cmd
    }

    // ----- hearing from workers -----

    fn on_report(&mut self, report: Report) {
        match report {
            Report::Message { serial, msg } => self.on_message(serial, msg),
            Report::Bad { serial, error } => self.on_bad(serial, error),
            Report::Closed { serial } => self.on_closed(serial),
            Report::Exited { serial, status } => self.on_exited(serial, status),
        }
    }

    fn on_message(&mut self, serial: Serial, msg: ToMaster) {
        let Some(w) = self.workers.get_mut(&serial) else { return };
        w.last_seen = Instant::now();
        let (id, pid) = (w.id, w.pid);
        match msg {
            ToMaster::Hello { .. } => {
                if w.state == WorkerState::Starting {
                    w.state = WorkerState::Online;
                }
                self.registry.lock().unwrap().insert(id, w.channel.clone());
                self.emit(Event::Online { id, pid });
                self.check_ready(serial);
            }
            ToMaster::Listen { req, endpoint, index } => {
                let shown = endpoint.to_string();
                let result = self.listen(endpoint, index, id);
                if let Err(e) = &result {
                    log!("{} cannot listen on {shown}: {e}", peer(id));
                }
                let fd = result.as_ref().ok().and_then(|(key, _)| self.listeners[key].shared_fd());
                let result = result.map_err(|e| errno(&e));
                let mut out = BytesMut::new();
                encode::listen_reply(&mut out, req, &result, fd.is_some());
                send_soon(&self.workers[&serial].channel, out, fd);
            }
            ToMaster::Listening { key } => {
                if !w.keys.contains(&key) {
                    w.keys.push(key);
                }
                self.sync_expected(serial);
                if let Some(addr) = self.listeners.get(&key).and_then(|l| l.addr) {
                    self.emit(Event::Listening { id, pid, addr });
                }
                self.check_ready(serial);
            }
            ToMaster::Unlisten { key } => {
                w.keys.retain(|k| *k != key);
                self.sync_expected(serial);
            }
            ToMaster::Ready => {
                w.said_ready = true;
                self.check_ready(serial);
            }
            ToMaster::Exiting { reason } => {
                log!("{} (pid {pid}) is exiting: {reason}", peer(id));
                w.reason = Some(reason);
            }
            ToMaster::User { call, data, .. } => {
                let request = (call != 0).then(|| Request::from_master(call, w.channel.clone()));
                self.emit(Event::Message { id, pid, data, request });
            }
            // Liveness is noted above; acknowledgements go to the dispatcher, fragments and
            // messages for other workers are handled by the reader: none gets here.
            ToMaster::Heartbeat
            | ToMaster::Accepted { .. }
            | ToMaster::Refused { .. }
            | ToMaster::Returned { .. }
            | ToMaster::Busy { .. }
            | ToMaster::Closed { .. }
            | ToMaster::UserStart { .. }
            | ToMaster::UserMore(_) => {}
        }
    }

    /// The listeners of the process serving a slot are what its next process must listen on.
    fn sync_expected(&mut self, serial: Serial) {
        let w = &self.workers[&serial];
        if let Some(slot) = self.slots.get_mut(&w.id)
            && slot.current == Some(serial)
            && w.was_ready
        {
            slot.expected = w.keys.clone();
        }
    }

    /// Marks the worker ready once it listens on everything its predecessor did (or says so),
    /// and completes the replacement it was started for.
    fn check_ready(&mut self, serial: Serial) {
        let wait_ready = self.cfg.wait_ready;
        let Some(w) = self.workers.get_mut(&serial) else { return };
        if w.state != WorkerState::Online {
            return;
        }
        // The agent takes no connections: it is ready once it runs.
        let listening = if w.id == AGENT {
            true
        } else if w.expected.is_empty() {
            !w.keys.is_empty()
        } else {
            w.expected.iter().all(|k| w.keys.contains(k))
        };
        if !(w.said_ready || (!wait_ready && listening)) {
            return;
        }
        w.state = WorkerState::Ready;
        w.was_ready = true;
        let (id, pid, keys) = (w.id, w.pid, w.keys.clone());
        log!("{} ready (pid {pid}) {} us after start", peer(id), w.started.elapsed().as_micros());
        self.emit(Event::Ready { id, pid });
        let Some(slot) = self.slots.get_mut(&id) else { return };
        if !keys.is_empty() {
            slot.expected = keys;
        }
        if slot.incoming.as_ref().is_some_and(|i| i.serial == serial) {
            self.promote(id);
        }
    }

    /// The incoming process of slot `id` is ready: it becomes the slot's process and the old
    /// one retires.
    fn promote(&mut self, id: u32) {
        let slot = self.slot(id);
        let Some(incoming) = slot.incoming.take() else { return };
        slot.retry_at = None;
        let old = slot.current.replace(incoming.serial);
        let new_pid = self.workers.get(&incoming.serial).map_or(0, |w| w.pid);
        match old.and_then(|s| self.workers.get(&s)).map(|w| w.pid) {
            Some(old_pid) => log!("{} replaced: pid {old_pid} -> pid {new_pid}", peer(id)),
            None => log!("{} is back (pid {new_pid})", peer(id)),
        }
        if let Some(old) = old {
            self.retire(old, true);
        }
        if incoming.cause == Cause::Reload {
            if let Some(reload) = &mut self.reload {
                reload.active.retain(|a| *a != id);
            }
            self.advance_reload();
        }
    }

    /// Returns the key and address of the master's socket for `endpoint`, binding it on
    /// first use.
    fn listen(&mut self, endpoint: Endpoint, index: u32, id: u32) -> io::Result<(ListenKey, Option<SocketAddr>)> {
        let index = if endpoint.is_port_zero() { index } else { 0 };
        let reuseport = self.cfg.policy == Policy::ReusePort && !matches!(endpoint, Endpoint::Unix { .. });
        let lookup = (endpoint, index, if reuseport { id } else { 0 });
        if let Some(key) = self.by_addr.get(&lookup) {
            return Ok((*key, self.listeners[key].addr));
        }
        if self.stop != Stop::Running {
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        }
        let key = self.next_key;
        let group = (lookup.0.clone(), index);
        let (listener, shown) = match &lookup.0 {
            Endpoint::Tcp(addr) => {
                let at = self.reuseport_addr.get(&group).copied().unwrap_or(*addr);
                let socket = dispatch::bind_tcp(at, self.cfg.backlog, reuseport)?;
                let bound = socket.local_addr()?.as_socket();
                let listener = if reuseport || self.cfg.policy == Policy::Shared {
                    Listener { addr: bound, kind: Kind::Handed(socket), unix_path: None }
                } else {
                    self.stream_listener(socket, key, bound, None)?
                };
                (listener, format!("{}", bound.unwrap_or(*addr)))
            }
            Endpoint::Unix { path, mode } => {
                let socket = crate::net::bind_unix(path, *mode, self.cfg.backlog)?;
                (self.stream_listener(socket, key, None, Some(path.clone()))?, format!("unix:{}", path.display()))
            }
            Endpoint::Udp(addr) => {
                let at = self.reuseport_addr.get(&group).copied().unwrap_or(*addr);
                let socket = dispatch::bind_udp(at, reuseport)?;
                let bound = socket.local_addr()?.as_socket();
                let listener = Listener { addr: bound, kind: Kind::Handed(socket), unix_path: None };
                (listener, format!("udp {}", bound.unwrap_or(*addr)))
            }
        };
        self.next_key += 1;
        if reuseport {
            log!("listening on {shown} (SO_REUSEPORT socket of {})", peer(id));
            if let Some(addr) = listener.addr {
                self.reuseport_addr.entry(group).or_insert(addr);
            }
        } else {
            log!("listening on {shown}");
        }
        let addr = listener.addr;
        self.listeners.insert(key, listener);
        self.by_addr.insert(lookup, key);
        Ok((key, addr))
    }

    /// A worker id is gone for good (scaled down): close its own `reuseport` sockets, so the
    /// kernel stops queueing clients on them. Its last process keeps its copy while it drains.
    fn close_own_sockets(&mut self, id: u32) {
        let keys: Vec<_> =
            self.by_addr.iter().filter(|((_, _, owner), _)| *owner == id).map(|(k, v)| (k.clone(), *v)).collect();
        for (lookup, key) in keys {
            self.by_addr.remove(&lookup);
            if let Some(Listener { kind: kind @ Kind::Handed(_), .. }) = self.listeners.remove(&key) {
                self.drain(key, kind);
            }
        }
    }

    /// Starts draining a socket being closed, or closes it at once when it cannot be drained.
    fn drain(&mut self, key: ListenKey, kind: Kind) {
        match Draining::start(key, kind) {
            Ok(d) => self.draining.push(d),
            Err(kind) => kind.close(key, Some(&self.dispatch)),
        }
    }

    /// Shuts down the draining sockets that no handshake can join any more and whose queue is
    /// empty, or that no live worker accepts on any more, or that waited [`DRAIN_LIMIT`].
    fn drain_sockets(&mut self, now: Instant) {
        for mut d in std::mem::take(&mut self.draining) {
            let handshaking = d.handshaking(now);
            let (queued, accepted_on) = match &d.kind {
                // The master's accept loop empties it; the last ones are swept on close.
                Kind::Stream { .. } => (0, true),
                Kind::Handed(socket) => {
                    let queued = sys::accept_queue_len(socket).unwrap_or_else(|e| {
                        log!("listener {}: cannot read its accept queue ({e})", d.key);
                        0
                    });
                    let live = |w: &Worker| w.status.is_none() && !w.killed && !w.channel_closed;
                    (queued, self.workers.values().any(|w| live(w) && w.keys.contains(&d.key)))
                }
            };
            if handshaking || queued > 0 {
                let why = if !accepted_on {
                    "no worker accepts on it"
                } else if now.duration_since(d.since) >= DRAIN_LIMIT {
                    "it was not emptied in time"
                } else {
                    self.draining.push(d);
                    continue;
                };
                let under_way = if handshaking { " and handshakes under way" } else { "" };
                log!("listener {}: closing it with {queued} client(s) queued{under_way}: {why}", d.key);
            }
            d.kind.close(d.key, Some(&self.dispatch));
        }
    }

    fn stream_listener(
        &self,
        socket: Socket,
        key: ListenKey,
        addr: Option<SocketAddr>,
        unix_path: Option<PathBuf>,
    ) -> io::Result<Listener> {
        let socket = Arc::new(sys::watch(socket)?);
        let task = tokio::spawn(dispatch::accept_loop(socket.clone(), key, self.dispatch.clone()));
        Ok(Listener { addr, kind: Kind::Stream { socket, task }, unix_path })
    }

    /// Stops listening everywhere. With `sweep`, the connections the kernel already completed
    /// or is completing (closing a listening socket resets those) are served first (see
    /// [`Draining`]); without, the sockets are closed with what they hold.
    fn close_listeners(&mut self, sweep: bool) {
        self.by_addr.clear();
        self.reuseport_addr.clear();
        if !sweep {
            for d in std::mem::take(&mut self.draining) {
                d.kind.close(d.key, None);
            }
        }
        let listeners: Vec<_> = self.listeners.drain().map(|(key, l)| (key, l.kind, l.unix_path)).collect();
        for (key, kind, unix_path) in listeners {
            if let Some(path) = &unix_path {
                let _ = std::fs::remove_file(path);
            }
            if sweep {
                self.drain(key, kind);
            } else {
                kind.close(key, None);
            }
        }
    }

    /// The worker sent something malformed: it gets no more connections and is killed; the
    /// rest of the cluster keeps serving.
    fn on_bad(&mut self, serial: Serial, error: RecvError) {
        self.dispatch.close(serial);
        let Some(w) = self.workers.get_mut(&serial) else { return };
        log!("{} (pid {}): {error}; killing it", peer(w.id), w.pid);
        w.reason = Some(format!("protocol error: {error}"));
        kill(w);
    }

    /// The worker's channel is closed: it exited (or is being killed). Whatever it had not
    /// acknowledged goes to other workers.
    fn on_closed(&mut self, serial: Serial) {
        self.dispatch.remove_worker(serial);
        let Some(w) = self.workers.get_mut(&serial) else { return };
        w.channel_closed = true;
        self.reap(serial);
    }

    fn on_exited(&mut self, serial: Serial, status: io::Result<ExitStatus>) {
        let Some(w) = self.workers.get_mut(&serial) else { return };
        match status {
            Ok(status) => w.status = Some(status),
            Err(e) => {
                log!("{} (pid {}): cannot wait for it: {e}", peer(w.id), w.pid);
                w.status = Some(ExitStatus::from_raw(0));
            }
        }
        self.reap(serial);
    }

    /// Once a worker has both exited and closed its channel (every acknowledgement it sent
    /// has been read), forget it and decide what its slot needs.
    fn reap(&mut self, serial: Serial) {
        let Some(w) = self.workers.get(&serial) else { return };
        let (true, Some(status)) = (w.channel_closed, w.status) else { return };
        let w = self.workers.remove(&serial).expect("worker present");
        {
            let mut registry = self.registry.lock().unwrap();
            if registry.get(&w.id).is_some_and(|c| Arc::ptr_eq(c, &w.channel)) {
                registry.remove(&w.id);
            }
        }
        let uptime = w.started.elapsed();
        let how = describe(status);
        let retired = w.kill_at.is_some();
        if retired {
            log!("{} (pid {}) {how}", peer(w.id), w.pid);
        } else {
            let reason = w.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
            log!("{} (pid {}) {how} after {:.1}s{reason}", peer(w.id), w.pid, uptime.as_secs_f64());
        }
        self.emit(Event::Exit(ExitInfo {
            id: w.id,
            pid: w.pid,
            code: status.code(),
            signal: status.signal(),
            after_disconnect: retired,
        }));
        let running = self.stop == Stop::Running;
        let Some(slot) = self.slots.get_mut(&w.id) else { return };
        if slot.incoming.as_ref().is_some_and(|i| i.serial == serial) {
            self.incoming_failed(w.id, &format!("pid {} {how} before it was ready", w.pid));
            return;
        }
        if slot.current != Some(serial) {
            return;
        }
        slot.current = None;
        if running && slot.incoming.is_some() {
            // Its replacement is on the way and takes over when ready.
            slot.restarts += 1;
        } else if running {
            self.schedule_restart(w.id, !w.was_ready || uptime < self.cfg.min_uptime);
        }
    }

    /// Replaces worker `id`: at once after a stable run, with growing delays while it keeps
    /// dying young (never giving up).
    fn schedule_restart(&mut self, id: u32, unstable: bool) {
        let (first, max) = (self.cfg.restart_delay, self.cfg.restart_delay_max);
        let Some(slot) = self.slots.get_mut(&id) else { return };
        slot.restarts += 1;
        if !unstable {
            slot.backoff = Duration::ZERO;
            self.start(id);
            return;
        }
        slot.backoff = if slot.backoff.is_zero() { first } else { (slot.backoff * 2).min(max) };
        slot.start_at = Some(Instant::now() + slot.backoff);
        let (restarts, delay) = (slot.restarts, slot.backoff);
        log!("{} is crash-looping (restart {restarts}); next start in {delay:?}", peer(id));
        self.emit(Event::CrashLoop { id, restarts, delay });
    }

    // ----- replacing workers -----

    /// The process started to take over slot `id` died or missed its deadline.
    fn incoming_failed(&mut self, id: u32, why: &str) {
        let (first, max) = (self.cfg.restart_delay, self.cfg.restart_delay_max);
        let slot = self.slot(id);
        let Some(incoming) = slot.incoming.take() else { return };
        if let Some(w) = self.workers.get_mut(&incoming.serial) {
            w.reason.get_or_insert_with(|| "not ready in time".into());
            kill(w);
        }
        match incoming.cause {
            Cause::Reload => self.abandon_reload(id, why),
            Cause::Limit => {
                let slot = self.slot(id);
                slot.backoff = if slot.backoff.is_zero() { first } else { (slot.backoff * 2).min(max) };
                slot.retry_at = Some(Instant::now() + slot.backoff);
                log!("replacement of {} failed: {why}; the old process keeps serving", peer(id));
            }
        }
        if self.stop == Stop::Running && self.slot(id).current.is_none() && self.slot(id).start_at.is_none() {
            self.schedule_restart(id, true);
        }
    }

    fn begin_reload(&mut self, why: &str) {
        if self.stop != Stop::Running {
            return;
        }
        if let Some(reload) = &mut self.reload {
            reload.again = true;
            log!("{why}: a reload is in progress; another one follows it");
            return;
        }
        log!("{why}: reloading {} worker(s), {} at a time", self.worker_count(), self.cfg.reload_concurrency);
        // The agent is a singleton: it is stopped, then restarted, never doubled.
        if let Some(agent) = self.slots.get(&AGENT).and_then(|s| s.current) {
            log!("{why}: restarting the agent");
            self.retire(agent, true);
        }
        self.reload = Some(Reload {
            queue: self.slots.range(..AGENT).map(|(id, _)| *id).collect(),
            active: Vec::new(),
            again: false,
            started: Instant::now(),
        });
        self.advance_reload();
    }

    /// Starts the next replacements of the reload, or ends it.
    fn advance_reload(&mut self) {
        loop {
            let Some(reload) = &mut self.reload else { return };
            if reload.active.len() >= self.cfg.reload_concurrency {
                return;
            }
            let Some(id) = reload.queue.pop_front() else {
                if reload.active.is_empty() {
                    let reload = self.reload.take().expect("reload");
                    log!("reload complete in {} ms", reload.started.elapsed().as_millis());
                    if reload.again {
                        self.begin_reload("queued reload");
                    }
                }
                return;
            };
            if !self.slots.contains_key(&id) {
                continue;
            }
            reload.active.push(id);
            if !self.start_incoming(id, Cause::Reload) {
                self.abandon_reload(id, "its new process could not be started");
                return;
            }
        }
    }

    /// Stops the reload; the old processes of slots not yet replaced keep serving.
    fn abandon_reload(&mut self, id: u32, why: &str) {
        let Some(reload) = self.reload.take() else { return };
        log!(
            "reload abandoned: new {}: {why}; {} worker(s) not replaced keep serving",
            peer(id),
            reload.queue.len() + reload.active.len()
        );
        for other in reload.active {
            if other != id {
                self.incoming_failed(other, "reload abandoned");
            }
        }
    }

    /// A new process starting too long is a failed start.
    fn check_ready_deadlines(&mut self, now: Instant) {
        let late: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| s.incoming.as_ref().is_some_and(|i| i.deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let why = format!("not ready within {:?}", self.cfg.ready_timeout);
            self.incoming_failed(id, &why);
        }
    }

    /// Memory and connection limits: a worker over one is replaced gracefully.
    fn check_limits(&mut self, now: Instant) {
        if self.reload.is_some() {
            return;
        }
        let check_rss = self.cfg.max_rss.is_some() && now >= self.next_rss_check;
        if check_rss {
            self.next_rss_check = now + RSS_CHECK;
        }
        let mut over = Vec::new();
        for (id, slot) in self.slots.range(..AGENT) {
            let Some((serial, w)) = slot.current.and_then(|s| Some((s, self.workers.get(&s)?))) else { continue };
            if slot.incoming.is_some() || slot.retry_at.is_some_and(|t| t > now) || w.state != WorkerState::Ready {
                continue;
            }
            if let Some(max) = w.max_connections {
                let served = self.dispatch.handled(serial);
                if served >= max {
                    over.push((*id, format!("served {served} connections (limit {max})")));
                    continue;
                }
            }
            if let (true, Some(max)) = (check_rss, self.cfg.max_rss)
                && let Ok(rss) = sys::rss(w.pid)
                && rss > max
            {
                over.push((*id, format!("uses {} MiB of memory (limit {} MiB)", rss >> 20, max >> 20)));
            }
        }
        for (id, why) in over {
            log!("{} {why}; replacing it", peer(id));
            self.start_incoming(id, Cause::Limit);
        }
    }

    /// A worker whose runtime went silent is killed (and then replaced like any crash).
    fn check_heartbeats(&mut self, now: Instant) {
        let Some(timeout) = self.cfg.heartbeat_timeout else { return };
        for w in self.workers.values_mut() {
            let silent = now.saturating_duration_since(w.last_seen);
            if w.status.is_none() && !w.killed && silent > timeout {
                log!("{} (pid {}) sent no heartbeat for {:.1}s; killing it", peer(w.id), w.pid, silent.as_secs_f64());
                w.reason = Some("missed heartbeats".into());
                kill(w);
            }
        }
    }

    /// Retires a worker: with `close_now`, it gets no new connections from this moment.
    fn retire(&mut self, serial: Serial, close_now: bool) {
        let kill_at = match self.stop {
            Stop::Graceful { deadline } => deadline,
            _ => Instant::now() + self.cfg.kill_timeout,
        };
        let Some(w) = self.workers.get_mut(&serial) else { return };
        if w.kill_at.is_none() {
            w.state = WorkerState::Stopping;
            w.kill_at = Some(kill_at);
        }
        if close_now && !w.closed {
            w.closed = true;
            self.dispatch.close(serial);
        }
        self.retire_step(Instant::now());
    }

    /// Moves retiring workers along: close (once no connection waits in the master's backlog
    /// for them), disconnect (once every connection sent to them is acknowledged), kill (at
    /// the deadline).
    fn retire_step(&mut self, now: Instant) {
        self.drain_sockets(now);
        // No worker is closed while the master still accepts on a socket it is draining: any
        // of them may get its last connections.
        let accepting = self.draining.iter().any(|d| matches!(d.kind, Kind::Stream { .. }));
        let mut backlog_empty = None;
        for (serial, w) in self.workers.iter_mut() {
            let Some(kill_at) = w.kill_at else { continue };
            if w.status.is_some() || w.killed {
                continue;
            }
            if now >= kill_at {
                log!("{} (pid {}) still running at the kill timeout; killing it", peer(w.id), w.pid);
                kill(w);
                continue;
            }
            if w.disconnected || w.channel_closed {
                continue;
            }
            if !w.closed {
                if accepting || !*backlog_empty.get_or_insert_with(|| self.dispatch.backlog_empty()) {
                    continue;
                }
                w.closed = true;
                self.dispatch.close(*serial);
            }
            if self.dispatch.inflight(*serial) > 0 || self.draining.iter().any(|d| w.keys.contains(&d.key)) {
                continue;
            }
            w.disconnected = true;
            let mut out = BytesMut::new();
            encode::disconnect(&mut out);
            send_soon(&w.channel, out, None);
            if let Some(tx) = &self.events {
                let _ = tx.send(Event::Disconnect { id: w.id, pid: w.pid });
            }
        }
    }

    // ----- scaling, stopping, status -----

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Reload => self.begin_reload("reload requested"),
            Command::SetWorkers(n) => self.set_workers(n, "set_workers"),
            Command::Status(reply) => drop(reply.send(self.status())),
        }
    }

    /// Grows or shrinks the cluster to `n` workers (at least one). New slots start at once;
    /// removed ones (highest ids first) retire gracefully.
    fn set_workers(&mut self, n: usize, why: &str) {
        if self.stop != Stop::Running {
            return;
        }
        let n = n.clamp(1, MAX_WORKERS);
        if n == self.worker_count() {
            log!("{why}: already {n} worker(s)");
            return;
        }
        log!("{why}: {} -> {n} worker(s)", self.worker_count());
        while self.worker_count() < n {
            let id = self.slots.range(..AGENT).next_back().map_or(1, |(id, _)| id + 1);
            self.slots.insert(id, Slot::default());
            self.start(id);
        }
        while self.worker_count() > n {
            let id = *self.slots.range(..AGENT).next_back().expect("slots").0;
            let slot = self.slots.remove(&id).expect("slot");
            self.close_own_sockets(id);
            if let Some(reload) = &mut self.reload {
                reload.queue.retain(|s| *s != id);
                reload.active.retain(|s| *s != id);
            }
            for serial in slot.current.into_iter().chain(slot.incoming.map(|i| i.serial)) {
                self.retire(serial, true);
            }
        }
        self.advance_reload();
    }

    fn begin_stop(&mut self, why: &str) {
        if self.stop != Stop::Running {
            return;
        }
        log!("{why}: stopping gracefully (kill timeout {:?})", self.cfg.kill_timeout);
        self.stop = Stop::Graceful { deadline: Instant::now() + self.cfg.kill_timeout };
        if self.reload.take().is_some() {
            log!("reload cancelled");
        }
        self.close_listeners(true);
        for slot in self.slots.values_mut() {
            slot.start_at = None;
        }
        let serials: Vec<Serial> = self.workers.keys().copied().collect();
        for serial in serials {
            self.retire(serial, false);
        }
    }

    fn fast_stop(&mut self) {
        if self.stop == Stop::Fast {
            return;
        }
        log!("SIGQUIT: fast stop");
        self.stop = Stop::Fast;
        self.reload = None;
        self.close_listeners(false);
        self.kill_all();
    }

    fn kill_all(&mut self) {
        for w in self.workers.values_mut() {
            kill(w);
        }
    }

    fn status(&self) -> Vec<WorkerStatus> {
        let now = Instant::now();
        let mut out: Vec<WorkerStatus> = self
            .workers
            .iter()
            .map(|(serial, w)| WorkerStatus {
                id: w.id,
                pid: Some(w.pid),
                state: w.state,
                uptime: w.started.elapsed(),
                restarts: self.slots.get(&w.id).map_or(0, |s| s.restarts),
                connections: self.dispatch.handled(*serial),
                restart_in: None,
            })
            .collect();
        for (id, slot) in &self.slots {
            if let (None, None, Some(at)) = (slot.current, &slot.incoming, slot.start_at) {
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

    /// Worker slots (the agent's is not one).
    fn worker_count(&self) -> usize {
        self.slots.range(..AGENT).count()
    }

    fn slot(&mut self, id: u32) -> &mut Slot {
        self.slots.entry(id).or_default()
    }

    fn emit(&self, event: Event) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }
}

/// Most workers: ids stay below the wire addresses of the agent and of "all workers".
const MAX_WORKERS: usize = 65_536;

/// How logs name a worker id.
fn peer(id: u32) -> Peer {
    Peer::from_wire(id)
}

/// SIGKILLs a worker that has not exited yet (never a pid that may have been reused).
fn kill(w: &mut Worker) {
    if w.status.is_none() && !w.killed {
        w.killed = true;
        let _ = sys::kill(w.pid, libc::SIGKILL);
    }
}

/// The signals the master acts on (SPEC §5).
struct Signals {
    term: Signal,
    int: Signal,
    quit: Signal,
    hup: Signal,
    ttin: Signal,
    ttou: Signal,
}

impl Signals {
    fn new() -> io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            hup: signal(SignalKind::hangup())?,
            ttin: signal(SignalKind::from_raw(libc::SIGTTIN))?,
            ttou: signal(SignalKind::from_raw(libc::SIGTTOU))?,
        })
    }
}

/// Sends a control message now, or from a task if the socket is momentarily full, so the
/// supervisor never waits on one worker.
fn send_soon(channel: &Arc<Channel>, out: BytesMut, fd: Option<OwnedFd>) {
    let fds: Vec<_> = fd.iter().map(AsFd::as_fd).collect();
    if let Err(e) = channel.try_send_with_fds(&out, &fds)
        && e.kind() == io::ErrorKind::WouldBlock
    {
        let channel = channel.clone();
        tokio::spawn(async move {
            let fds: Vec<_> = fd.iter().map(AsFd::as_fd).collect();
            channel.send_with_fds(&out, &fds).await
        });
    }
}

/// The errno a worker gets for a failed bind (our own errors carry a kind, not an errno).
fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::AddrInUse => libc::EADDRINUSE,
        io::ErrorKind::AlreadyExists => libc::EEXIST,
        io::ErrorKind::PermissionDenied => libc::EACCES,
        io::ErrorKind::NotFound => libc::ENOENT,
        io::ErrorKind::AddrNotAvailable => libc::EADDRNOTAVAIL,
        _ => libc::EINVAL,
    })
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (_, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "exited".into(),
    }
}

/// Relays the user messages process `from` sends to other processes, in order, without
/// holding up the reading of its channel (acknowledgements); after each one, tells the sender
/// whether it was handed over.
fn relay(from: u32, sender: Arc<Channel>, registry: Registry) -> mpsc::UnboundedSender<Whole> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Whole>();
    tokio::spawn(async move {
        let mut receipt = BytesMut::new();
        while let Some((to, call, data)) = rx.recv().await {
            let targets: Vec<(u32, Arc<Channel>)> = {
                let registry = registry.lock().unwrap();
                if to == ALL_WORKERS {
                    registry
                        .iter()
                        .filter(|(id, _)| **id != AGENT && **id != from)
                        .map(|(id, c)| (*id, c.clone()))
                        .collect()
                } else {
                    registry.get(&to).map(|c| (to, c.clone())).into_iter().collect()
                }
            };
            let mut delivered = false;
            for (id, channel) in targets {
                match channel.send_user(USER_TO_WORKER, from, call, &data, || {}).await {
                    Ok(()) => delivered = true,
                    Err(e) => log!("message from {} to {} dropped: {e}", peer(from), peer(id)),
                }
            }
            receipt.clear();
            encode::relayed(&mut receipt, delivered);
            if sender.send(&receipt).await.is_err() {
                return;
            }
        }
    });
    tx
}

/// Reads one worker's channel. Acknowledgements and listener changes go straight to the
/// dispatch table (data path), user messages are reassembled (and relayed when they are for
/// another worker); everything else goes to the supervisor. After a malformed message it
/// keeps reading (datagram boundaries survive garbage) so that acknowledgements already sent
/// are not lost, while the supervisor kills the worker.
async fn read_loop(
    serial: Serial,
    channel: Arc<Channel>,
    dispatch: Arc<Dispatch>,
    reports: mpsc::UnboundedSender<Report>,
    relay: mpsc::UnboundedSender<Whole>,
    calls: Arc<Calls>,
) {
    let mut rx = Receiver::new();
    let mut fragments = Reassembly::default();
    let mut hello = false;
    let mut poisoned = false;
    loop {
        // A datagram whose descriptors were cut (this process had no room for what a worker
        // handed back) is a protocol error like any other.
        let received = rx.recv(&channel).await.and_then(|d| d.map(|d| d.whole().map_err(RecvError::from)).transpose());
        let (data, fds) = match received {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(RecvError::Protocol(e)) => {
                if !std::mem::replace(&mut poisoned, true) {
                    let _ = reports.send(Report::Bad { serial, error: e.into() });
                }
                continue;
            }
            // A worker that dies with messages unread in its queue makes the kernel report
            // ECONNRESET once, *before* the datagrams still queued for us (acknowledgements
            // among them): keep reading until the real end of stream.
            Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => continue,
            Err(error) => {
                if !std::mem::replace(&mut poisoned, true) {
                    let _ = reports.send(Report::Bad { serial, error });
                }
                break;
            }
        };
        let msg = match ToMaster::decode(data, fds) {
            Ok(ToMaster::Hello { version, .. }) if !hello && version != PROTOCOL_VERSION => {
                Err(ProtocolError::Version { peer: version })
            }
            Ok(msg) if !hello && !matches!(msg, ToMaster::Hello { .. }) => Err(ProtocolError::NotHello(msg.name())),
            Ok(ToMaster::UserStart { to, call, total, data }) => fragments.start(to, call, total, data).map(whole),
            Ok(ToMaster::UserMore(data)) => fragments.more(data).map(whole),
            Ok(msg) => Ok(Some(msg)),
            Err(e) => Err(e),
        };
        match msg {
            Ok(None) => {}
            Ok(Some(ToMaster::Accepted { ids, closed })) => dispatch.accepted(serial, &ids, closed),
            Ok(Some(ToMaster::Refused { ids })) => dispatch.refused(serial, &ids),
            Ok(Some(ToMaster::Returned { key, conns })) => dispatch.returned(serial, key, conns),
            Ok(Some(ToMaster::Busy { ids })) => dispatch.busy(serial, &ids),
            Ok(Some(ToMaster::Closed { count })) => dispatch.closed(serial, count),
            Ok(_) if poisoned => {}
            Ok(Some(ToMaster::User { to, call, data })) if to != 0 => drop(relay.send((to, call, data))),
            Ok(Some(ToMaster::User { call, data, .. })) if messaging::is_reply(call) => {
                calls.complete(call, data);
            }
            Ok(Some(msg)) => {
                hello = true;
                match &msg {
                    ToMaster::Listening { key } => dispatch.listening(serial, *key),
                    ToMaster::Unlisten { key } => dispatch.unlisten(serial, *key),
                    _ => {}
                }
                let _ = reports.send(Report::Message { serial, msg });
            }
            Err(e) => {
                if !std::mem::replace(&mut poisoned, true) {
                    let _ = reports.send(Report::Bad { serial, error: e.into() });
                }
            }
        }
    }
    let _ = reports.send(Report::Closed { serial });
}

/// A reassembled user message, as if it had come in one datagram.
fn whole(message: Option<Whole>) -> Option<ToMaster> {
    message.map(|(to, call, data)| ToMaster::User { to, call, data })
}
