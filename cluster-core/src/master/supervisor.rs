//! The master's control loop: it hears signals, commands from code in the master, and reports
//! from worker processes; records them as facts in the decision core
//! ([`Core`](super::decide::Core)); asks the core what to do; and does it (spawn, signal, send,
//! bind, close). It decides nothing itself: "what happens when a worker dies" is in
//! `decide.rs`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio::time::sleep_until;

use super::decide::{Action, Command, Core, Fact, StopKind, World};
use super::dispatch::{Dispatch, Serial};
use super::events::Events;
use super::listeners::Listeners;
use super::process::{Child, Launcher, Links, Report};
use super::{Event, Registry, WorkerStatus};
use crate::config::Config;
use crate::ipc::Channel;
use crate::ipc::encode;
use crate::ipc::message::{ListenKey, ToMaster};
use crate::log::{log, note, warning};
use crate::messaging::{Calls, Peer, Request};
use crate::sys;

/// What code in the master asks (see [`Master`](super::Master)).
pub(super) enum Ask {
    Command(Command),
    Status(oneshot::Sender<Vec<WorkerStatus>>),
}

pub(super) struct Supervisor {
    core: Core,
    launcher: Launcher,
    links: Links,
    children: HashMap<Serial, Child>,
    listeners: Listeners,
    events: Events,
    asks: mpsc::UnboundedReceiver<Ask>,
    reports: mpsc::UnboundedReceiver<Report>,
}

/// Most rounds of decide-and-do per wake-up: each round's actions (a spawn, a kill) are facts
/// for the next; a handful settles everything.
const ROUNDS: usize = 8;

impl Supervisor {
    pub(super) fn new(
        cfg: Arc<Config>,
        registry: Registry,
        calls: Arc<Calls>,
        events: Events,
        asks: mpsc::UnboundedReceiver<Ask>,
    ) -> io::Result<Self> {
        let dispatch = Arc::new(Dispatch::new(cfg.window, cfg.balancer, cfg.max_worker_connections));
        let (reports_tx, reports) = mpsc::unbounded_channel();
        Ok(Supervisor {
            core: Core::new(cfg.clone(), RandomState::new().hash_one(sys::getpid())),
            launcher: Launcher::new()?,
            links: Links { dispatch: dispatch.clone(), reports: reports_tx, registry, calls, events: events.sender() },
            children: HashMap::new(),
            listeners: Listeners::new(cfg, dispatch),
            events,
            asks,
            reports,
        })
    }

    /// Runs the cluster until it is stopped; returns the master's exit code.
    pub(super) async fn run(mut self) -> i32 {
        let Ok(mut signals) = Signals::new() else {
            log!("cannot install signal handlers");
            return 1;
        };
        note!(
            event = "start",
            pid = sys::getpid(),
            workers = self.core.target(),
            "master (pid {}) starting {} worker(s)",
            sys::getpid(),
            self.core.target()
        );
        loop {
            let now = Instant::now();
            if let Some(code) = self.step(now) {
                return code;
            }
            let wake = self.listeners.wake_at().map_or(self.core.next_wake(now), |t| t.min(self.core.next_wake(now)));
            // Signals first: a stop that arrived with a worker's exit (one signal to the whole
            // process group) is known before that exit is acted on, so no replacement starts.
            tokio::select! {
                biased;
                _ = signals.term.recv() => self.core.command(Command::Stop(StopKind::Graceful)),
                _ = signals.int.recv() => {
                    let kind = if self.core.stopping() { StopKind::Abort } else { StopKind::Graceful };
                    self.core.command(Command::Stop(kind));
                }
                _ = signals.quit.recv() => self.core.command(Command::Stop(StopKind::Fast)),
                _ = signals.hup.recv() => self.core.command(Command::Reload),
                _ = signals.ttin.recv() => self.core.command(Command::SetWorkers(self.core.target() + 1)),
                _ = signals.ttou.recv() => {
                    self.core.command(Command::SetWorkers(self.core.target().saturating_sub(1)));
                }
                Some(report) = self.reports.recv() => self.on_report(report),
                Some(ask) = self.asks.recv() => match ask {
                    Ask::Command(command) => self.core.command(command),
                    Ask::Status(reply) => {
                        let world = Observed { dispatch: &self.links.dispatch, listeners: &self.listeners };
                        let _ = reply.send(self.core.status(Instant::now(), &world));
                    }
                },
                _ = sleep_until(wake.into()) => {}
            }
        }
    }

    /// Lets the data path move on, then decides and does until nothing is left to do.
    fn step(&mut self, now: Instant) -> Option<i32> {
        self.links.dispatch.tick(now);
        let core = &self.core;
        self.listeners.step(now, |key| core.accepted_on(key));
        for _ in 0..ROUNDS {
            let world = Observed { dispatch: &self.links.dispatch, listeners: &self.listeners };
            let actions = self.core.reconcile(now, &world);
            if actions.is_empty() {
                break;
            }
            for action in actions {
                if let Some(code) = self.execute(action, now) {
                    return Some(code);
                }
            }
        }
        None
    }

    fn execute(&mut self, action: Action, now: Instant) -> Option<i32> {
        match action {
            Action::Spawn { serial, id } => match self.launcher.spawn(id, serial, &self.links) {
                Ok(child) => {
                    let pid = child.pid;
                    note!(event = "fork", id, pid, "{} started (pid {pid})", Peer::from_wire(id));
                    self.children.insert(serial, child);
                    self.core.record(serial, Fact::Spawned(pid), now);
                    self.events.emit(Event::Fork { id, pid });
                }
                Err(e) => self.core.record(serial, Fact::SpawnFailed(e.to_string()), now),
            },
            Action::Close(serial) => self.links.dispatch.close(serial),
            Action::Disconnect(serial) => {
                if let Some(child) = self.children.get(&serial) {
                    let mut out = BytesMut::new();
                    encode::disconnect(&mut out);
                    send_soon(&child.channel, out, None);
                }
            }
            Action::Kill(serial) => {
                if let Some(child) = self.children.get_mut(&serial) {
                    child.kill();
                }
            }
            Action::Route { id, to } => {
                let channel = to.and_then(|s| self.children.get(&s)).map(|c| c.channel.clone());
                let mut registry = self.links.registry.lock().unwrap();
                match channel {
                    Some(channel) => registry.insert(id, channel),
                    None => registry.remove(&id),
                };
            }
            Action::CloseSockets(id) => self.listeners.close_own(id),
            Action::StopListening { drain } => self.listeners.close_all(drain),
            Action::Emit(event) => self.events.emit(event),
            Action::Exit(code) => return Some(code),
        }
        None
    }

    fn on_report(&mut self, report: Report) {
        let now = Instant::now();
        match report {
            Report::Message { serial, msg } => self.on_message(serial, msg, now),
            Report::Bad { serial, error } => {
                // Data path first: it gets no more connections from this moment.
                self.links.dispatch.close(serial);
                self.core.record(serial, Fact::ProtocolError(error.to_string()), now);
            }
            Report::User { serial, call, data, taken } => {
                let Some(child) = self.children.get(&serial) else { return };
                let (id, pid) = (child.id, child.pid);
                let request = (call != 0).then(|| Request::from_master(call, child.channel.clone()));
                let _ = taken.send(self.events.offer(Event::Message { id, pid, data, request }));
                self.core.record(serial, Fact::Heard, now);
            }
            Report::Gone { serial, status } => {
                self.children.remove(&serial);
                self.core.record(serial, Fact::Exited(status), now);
            }
        }
    }

    fn on_message(&mut self, serial: Serial, msg: ToMaster, now: Instant) {
        let Some(child) = self.children.get(&serial) else { return };
        let (id, pid, channel) = (child.id, child.pid, child.channel.clone());
        let fact = match msg {
            ToMaster::Hello { .. } => {
                self.events.emit(Event::Online { id, pid });
                Fact::Hello
            }
            ToMaster::Listen { req, endpoint, index } => {
                let shown = endpoint.to_string();
                let result = self.listeners.listen(endpoint, index, id, self.core.stopping());
                if let Err(e) = &result {
                    warning!(event = "listen_failed", id, pid, endpoint = %shown, error = %e, "{} cannot listen on {shown}: {e}", Peer::from_wire(id));
                }
                let fd = result.as_ref().ok().and_then(|(key, _)| self.listeners.shared_fd(*key));
                let fact = match &result {
                    Ok(_) => Fact::Heard,
                    Err(e) => Fact::ListenFailed(format!("{shown}: {e}")),
                };
                let result = result.map_err(|e| errno(&e));
                let mut out = BytesMut::new();
                encode::listen_reply(&mut out, req, &result, fd.is_some());
                send_soon(&channel, out, fd);
                fact
            }
            ToMaster::Listening { key } => {
                if let Some(addr) = self.listeners.addr(key) {
                    self.events.emit(Event::Listening { id, pid, addr });
                }
                Fact::Listening(key)
            }
            ToMaster::Unlisten { key } => Fact::Unlisten(key),
            ToMaster::Ready => Fact::SaidReady,
            ToMaster::Exiting { reason } => Fact::Panicked(reason),
            // Acknowledgements go to the dispatch table, user messages to the relay: only
            // heartbeats get here.
            _ => Fact::Heard,
        };
        self.core.record(serial, fact, now);
    }
}

/// What the decision core reads of the data path and of the processes.
struct Observed<'a> {
    dispatch: &'a Dispatch,
    listeners: &'a Listeners,
}

impl World for Observed<'_> {
    fn backlog_empty(&self) -> bool {
        self.dispatch.backlog_empty()
    }
    fn inflight(&self, serial: Serial) -> usize {
        self.dispatch.inflight(serial)
    }
    fn handled(&self, serial: Serial) -> u64 {
        self.dispatch.handled(serial)
    }
    fn master_draining(&self) -> bool {
        self.listeners.master_draining()
    }
    fn draining(&self, keys: &[ListenKey]) -> bool {
        self.listeners.draining(keys)
    }
    fn rss(&self, pid: u32) -> Option<u64> {
        sys::rss(pid).ok()
    }
}

/// The signals the master acts on (README, "Lifecycle and signals").
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
