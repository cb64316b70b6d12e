//! The master's control loop: it hears signals, commands from code in the master, and reports
//! from worker processes; records them as facts in the decision core
//! ([`Core`](super::decide::Core)); asks the core what to do; and does it (spawn, signal, send,
//! bind, close). It decides nothing itself: "what happens when a worker dies" is in
//! `decide.rs`.

mod upgrading;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::time::sleep_until;

use super::decide::{Action, Answer, Command, Core, Fact, StopKind, World};
use super::dispatch::{AcceptThreads, Dispatch};
use super::events::Events;
use super::handle::{AppMetrics, Ask, Registry, Reply};
use super::listeners::Listeners;
use super::observe::{Snapshot, Stats};
use super::process::{Child, Launcher, Links, Report};
use super::systemd::{Notifier, Seen};
use super::types::{ControlError, Event, MasterStatus, Reloaded, Scale, Serial};
use super::upgrade::{self, Successor, Upgrading};
use crate::config::Config;
use crate::ipc::Channel;
use crate::ipc::encode;
use crate::ipc::message::{ListenKey, ToMaster};
use crate::log::{log, note, warning};
use crate::messaging::{Calls, Peer, Request};
use crate::sys;

/// What the master says about itself in status and metrics.
pub(super) struct Info {
    pub(super) name: String,
    pub(super) control_socket: Option<PathBuf>,
    /// Copies of the control socket (with the path its file has) and of the admin endpoint's
    /// socket, to hand to a successor.
    pub(super) control_fd: Option<(PathBuf, OwnedFd)>,
    pub(super) admin_fd: Option<OwnedFd>,
}

/// Those waiting for a reload or a restart to end.
#[derive(Default)]
struct Waiting {
    /// By reload number (see `Core::reload_ticket`).
    reloads: Vec<(u64, Reply<Reloaded>)>,
    restarts: Vec<(u32, Reply<(u32, u32)>)>,
}

pub(super) struct Supervisor {
    cfg: Arc<Config>,
    notifier: Notifier,
    /// Inherited sockets no worker asked for have been reported.
    unused_reported: bool,
    info: Info,
    started: Instant,
    stats: Arc<Stats>,
    waiting: Waiting,
    core: Core,
    /// The upgrade of the master (`upgrade/`).
    upgrade: Upgrading,
    /// Whether the control socket and the admin endpoint accept (see `upgrade/`).
    serving: watch::Sender<bool>,
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
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        cfg: Arc<Config>,
        info: Info,
        registry: Registry,
        calls: Arc<Calls>,
        events: Events,
        asks: mpsc::UnboundedReceiver<Ask>,
        serving: watch::Sender<bool>,
        successor: Option<(Successor, Vec<upgrade::Listener>)>,
        app_metrics: AppMetrics,
    ) -> io::Result<Self> {
        let dispatch = Arc::new(Dispatch::new(cfg.window, cfg.balancer, cfg.max_worker_connections));
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let mut notifier = Notifier::new(Instant::now());
        let threads = Arc::new(AcceptThreads::new(cfg.accept_threads, cfg.accept_gather));
        let data_path = threads.data_path();
        let mut listeners = Listeners::new(cfg.clone(), dispatch.clone(), threads);
        let successor = successor.map(|(successor, handed)| {
            notifier.pause();
            listeners.adopt_handed(handed);
            successor
        });
        let upgrade =
            Upgrading::new(sys::getpid(), cfg.ready_timeout, cfg.kill_timeout, successor, app_metrics.clone());
        Ok(Supervisor {
            notifier,
            upgrade,
            serving,
            unused_reported: false,
            info,
            started: Instant::now(),
            waiting: Waiting::default(),
            core: Core::new(cfg.clone(), RandomState::new().hash_one(sys::getpid())),
            launcher: Launcher::new(cfg.log_capture, cfg.credentials.clone())?,
            links: Links {
                dispatch: dispatch.clone(),
                reports: reports_tx,
                registry,
                calls,
                events: events.sender(),
                stats: stats.clone(),
                data_path,
                app_metrics,
            },
            stats,
            children: HashMap::new(),
            listeners,
            cfg,
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
            self.tell_service_manager(now);
            let wake = [self.listeners.wake_at(), self.notifier.wake_at(), self.upgrade.next_wake()]
                .into_iter()
                .flatten()
                .fold(self.core.next_wake(now), Instant::min);
            // Signals first: a stop that arrived with a worker's exit (one signal to the whole
            // process group) is known before that exit is acted on, so no replacement starts.
            tokio::select! {
                biased;
                _ = signals.term.recv() => self.core.command(Command::Stop(StopKind::Graceful)),
                _ = signals.usr2.recv() => self.start_upgrade(None),
                _ = signals.int.recv() => {
                    // A terminal's Ctrl-C: no stop delay; a second one aborts.
                    let kind = if self.core.draining() {
                        StopKind::Abort
                    } else {
                        StopKind::Now
                    };
                    self.core.command(Command::Stop(kind));
                }
                _ = signals.quit.recv() => self.core.command(Command::Stop(StopKind::Fast)),
                _ = signals.hup.recv() => self.command(Command::Reload),
                _ = signals.ttin.recv() => self.command(Command::SetWorkers(self.core.target() + 1)),
                _ = signals.ttou.recv() => self.command(Command::SetWorkers(self.core.target().saturating_sub(1))),
                Some(report) = self.reports.recv() => self.on_report(report),
                Some(ask) = self.asks.recv() => self.on_ask(ask),
                (side, input) = self.upgrade.news() => {
                    let now = Instant::now();
                    let effects = self.upgrade.record(side, input, now);
                    self.carry_upgrade(effects, now);
                }
                _ = sleep_until(wake.into()) => {}
            }
        }
    }

    /// Readiness, reloads, stopping and the watchdog, for systemd; and, once the first workers
    /// are ready, the sockets it passed that no worker asked for.
    fn tell_service_manager(&mut self, now: Instant) {
        let seen = Seen {
            ready: self.core.ready_count(),
            target: self.core.target(),
            reloading: self.core.reloading(),
            stopping: self.core.stopping(),
            ready_timeout: self.cfg.ready_timeout,
        };
        if !self.unused_reported && seen.ready >= seen.target {
            self.unused_reported = true;
            self.listeners.report_unused();
        }
        self.notifier.update(now, &seen);
    }

    /// A command from a signal or from code in the master; reloads and scaling wait for no
    /// upgrade (they are refused while one is under way).
    fn command(&mut self, command: Command) {
        if !matches!(command, Command::Stop(_))
            && let Some(why) = self.upgrade.busy()
        {
            warning!(event = "refused", command = ?command, reason = %why, "{command:?} refused: {why}");
            return;
        }
        if matches!(command, Command::Reload) {
            self.notifier.reload_asked();
        }
        self.core.command(command);
    }

    fn on_ask(&mut self, ask: Ask) {
        if let Some(why) = self.upgrade.busy() {
            fn refuse<T>(reply: Reply<T>, why: &str) {
                let _ = reply.send(Err(ControlError::Refused(why.to_string())));
            }
            match ask {
                Ask::Reload(reply) => return refuse(reply, &why),
                Ask::Restart(_, reply) => return refuse(reply, &why),
                Ask::Scale(_, reply) => return refuse(reply, &why),
                other => return self.on_ask_now(other),
            }
        }
        self.on_ask_now(ask)
    }

    fn on_ask_now(&mut self, ask: Ask) {
        match ask {
            Ask::Command(command) => self.command(command),
            Ask::Upgrade(reply) => self.start_upgrade(Some(reply)),
            Ask::Status(reply) => {
                let world = Observed { dispatch: &self.links.dispatch, listeners: &self.listeners };
                let _ = reply.send(self.core.status(Instant::now(), &world));
            }
            Ask::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Ask::Reload(reply) => match self.core.reload_ticket() {
                Some(ticket) => {
                    self.notifier.reload_asked();
                    self.core.command(Command::Reload);
                    self.waiting.reloads.push((ticket, reply));
                }
                None => drop(reply.send(Err(ControlError::Stopping))),
            },
            Ask::Restart(id, reply) => match self.core.can_restart(id) {
                Ok(()) => {
                    self.core.command(Command::Restart(id));
                    self.waiting.restarts.push((id, reply));
                }
                Err(why) => drop(reply.send(Err(ControlError::Refused(why)))),
            },
            Ask::Scale(to, reply) => {
                if self.core.stopping() {
                    let _ = reply.send(Err(ControlError::Stopping));
                    return;
                }
                let from = self.core.target();
                let n = match to {
                    Scale::To(n) => n,
                    Scale::Add(n) => from.saturating_add(n),
                    Scale::Remove(n) => from.saturating_sub(n),
                }
                .clamp(1, super::decide::MAX_WORKERS);
                self.core.command(Command::SetWorkers(n));
                let _ = reply.send(Ok((from, n)));
            }
        }
    }

    /// What status and metrics show, at this instant.
    fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let world = Observed { dispatch: &self.links.dispatch, listeners: &self.listeners };
        let master = MasterStatus {
            pid: sys::getpid(),
            name: self.info.name.clone(),
            uptime: now.saturating_duration_since(self.started),
            version: env!("CARGO_PKG_VERSION"),
            policy: self.cfg.policy,
            balancer: self.cfg.balancer,
            workers_target: self.core.target(),
            listeners: self.listeners.addresses(),
            reloading: self.core.reloading(),
            upgrading: self.upgrade.busy().is_some(),
            stopping: self.core.stopping(),
            stop_in: self.core.stop_delay_left(now),
            control_socket: self.info.control_socket.clone(),
            rss: None,
            cpu_time: None,
        };
        Snapshot {
            master,
            listening: self.listeners.tcp_locals(),
            workers: self.core.status(now, &world),
            totals: self.links.dispatch.counts(),
            stats: self.stats.clone(),
        }
    }

    /// Tells those waiting for a reload or restart how it went.
    fn answer(&mut self, answer: Answer) {
        match answer {
            Answer::Reload { upto, result } => {
                let result = result
                    .map(|(replaced, ms)| Reloaded { replaced, took: std::time::Duration::from_millis(ms) })
                    .map_err(|(id, reason)| ControlError::Abandoned { id, reason });
                for (_, reply) in extract(&mut self.waiting.reloads, |ticket| *ticket <= upto) {
                    let _ = reply.send(result.clone());
                }
            }
            Answer::Restart { id, result } => {
                for (_, reply) in extract(&mut self.waiting.restarts, |waiting| *waiting == id) {
                    let _ = reply.send(result.clone().map_err(ControlError::Refused));
                }
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
        let effects = self.upgrade.tick(now, self.upgrade_seen());
        self.carry_upgrade(effects, now);
        // Nothing waited for happens once the cluster stops.
        if self.core.stopping() {
            for (_, reply) in self.waiting.reloads.drain(..) {
                let _ = reply.send(Err(ControlError::Stopping));
            }
            for (_, reply) in self.waiting.restarts.drain(..) {
                let _ = reply.send(Err(ControlError::Stopping));
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
            Action::Emit(event) => {
                self.count(&event);
                self.worker_failed(&event, now);
                self.events.emit(event);
            }
            Action::Answer(answer) => self.answer(answer),
            Action::Exit(code) => return Some(code),
        }
        None
    }

    fn count(&self, event: &Event) {
        let stats = &self.stats;
        match event {
            Event::ReloadDone { .. } => Stats::bump(&stats.reloads_done),
            Event::ReloadAbandoned { .. } => Stats::bump(&stats.reloads_abandoned),
            Event::CrashLoop { .. } => Stats::bump(&stats.crash_loops),
            Event::Exit(info) if info.after_disconnect => Stats::bump(&stats.retired),
            Event::Exit(_) => Stats::bump(&stats.crashes),
            _ => {}
        }
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
                // Its channel is read to the end and it has exited: its counts are final.
                self.links.app_metrics.lock().unwrap_or_else(|e| e.into_inner()).retire(serial);
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
                let result = self.listeners.listen(endpoint, index, id, self.core.draining());
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
            ToMaster::StopAsked => Fact::StopAsked,
            ToMaster::Exiting { reason } => Fact::Panicked(reason),
            // Acknowledgements go to the dispatch table, user messages to the relay: only
            // heartbeats get here.
            _ => Fact::Heard,
        };
        self.core.record(serial, fact, now);
    }
}

/// Removes and returns the items of `list` whose key matches.
fn extract<K, V>(list: &mut Vec<(K, V)>, matches: impl Fn(&K) -> bool) -> Vec<(K, V)> {
    let (out, keep) = std::mem::take(list).into_iter().partition(|(k, _)| matches(k));
    *list = keep;
    out
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
    usr2: Signal,
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
            usr2: signal(SignalKind::user_defined2())?,
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
