//! The master's control path: starting workers, hearing from them, replacing them when they
//! die, and stopping them all on SIGTERM / SIGINT. "What happens when a worker dies" is
//! [`Supervisor::on_closed`] + [`Supervisor::on_exited`] + [`Supervisor::reap`].

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::sleep_until;

use super::dispatch::{self, Dispatch, Serial};
use super::{Event, ExitInfo, Registry};
use crate::config::Config;
use crate::ipc::message::{ListenKey, PROTOCOL_VERSION, ProtocolError, ToMaster, encode};
use crate::ipc::{Channel, Receiver, RecvError};
use crate::log::log;
use crate::role::{CHANNEL_FD, ENV_CHANNEL_FD, ENV_UNIQUE_ID};
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

/// One worker process.
struct Worker {
    id: u32,
    pid: u32,
    started: Instant,
    channel: Arc<Channel>,
    online: bool,
    /// The master asked it to stop (its exit is expected).
    disconnecting: bool,
    /// Why it said it is exiting (panic message).
    reason: Option<String>,
    channel_closed: bool,
    status: Option<ExitStatus>,
}

/// One worker id (1..=N) and the restart history of the processes that held it.
#[derive(Default)]
struct Slot {
    serial: Option<Serial>,
    restarts: u32,
    backoff: Duration,
    start_at: Option<Instant>,
}

/// A listening socket the master owns.
struct Listener {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

enum Stop {
    Running,
    /// Graceful stop: no more accepts; each worker is told to disconnect once the master holds
    /// no connection for it; SIGKILL at the deadline.
    Graceful {
        deadline: Instant,
    },
}

pub(super) struct Supervisor {
    cfg: Arc<Config>,
    exe: PathBuf,
    argv0: OsString,
    args: Vec<OsString>,
    dispatch: Arc<Dispatch>,
    registry: Registry,
    events: Option<mpsc::UnboundedSender<Event>>,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports: mpsc::UnboundedReceiver<Report>,
    workers: BTreeMap<Serial, Worker>,
    slots: BTreeMap<u32, Slot>,
    next_serial: Serial,
    listeners: HashMap<ListenKey, Listener>,
    by_addr: HashMap<(SocketAddr, u32), ListenKey>,
    stop: Stop,
}

/// Restart backoff for workers that die young.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that lived at least this long died "stable": it is replaced at once.
const MIN_UPTIME: Duration = Duration::from_secs(1);
/// How often a stopping master checks whether workers can be told to disconnect.
const STOP_TICK: Duration = Duration::from_millis(20);

impl Supervisor {
    pub(super) fn new(
        cfg: Arc<Config>,
        registry: Registry,
        events: Option<mpsc::UnboundedSender<Event>>,
    ) -> io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut argv = std::env::args_os();
        let argv0 = argv.next().unwrap_or_else(|| exe.clone().into_os_string());
        let (reports_tx, reports) = mpsc::unbounded_channel();
        Ok(Supervisor {
            dispatch: Arc::new(Dispatch::new(cfg.window)),
            cfg,
            exe,
            argv0,
            args: argv.collect(),
            registry,
            events,
            reports_tx,
            reports,
            workers: BTreeMap::new(),
            slots: BTreeMap::new(),
            next_serial: 1,
            listeners: HashMap::new(),
            by_addr: HashMap::new(),
            stop: Stop::Running,
        })
    }

    /// Runs the cluster until it is stopped; returns the master's exit code.
    pub(super) async fn run(mut self) -> i32 {
        let (Ok(mut sigterm), Ok(mut sigint)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            log!("cannot install signal handlers");
            return 1;
        };
        for id in 1..=self.cfg.workers as u32 {
            self.slots.insert(id, Slot::default());
            self.start(id);
        }
        log!("master (pid {}) started {} worker(s)", sys::getpid(), self.cfg.workers);
        loop {
            if matches!(self.stop, Stop::Graceful { .. }) && self.workers.is_empty() {
                log!("all workers stopped; master exiting");
                return 0;
            }
            let wake = self.next_wake();
            tokio::select! {
                Some(report) = self.reports.recv() => self.on_report(report),
                _ = sigterm.recv() => self.begin_stop("SIGTERM"),
                _ = sigint.recv() => {
                    if matches!(self.stop, Stop::Graceful { .. }) {
                        log!("second SIGINT: killing all workers");
                        self.kill_all();
                        return 130;
                    }
                    self.begin_stop("SIGINT");
                }
                _ = sleep_until(wake.into()) => self.on_tick(),
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        match self.stop {
            Stop::Graceful { deadline } => deadline.min(Instant::now() + STOP_TICK),
            Stop::Running => self.slots.values().filter_map(|s| s.start_at).min().unwrap_or(far),
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        match self.stop {
            Stop::Running => {
                let due: Vec<u32> = self
                    .slots
                    .iter()
                    .filter(|(_, s)| s.start_at.is_some_and(|t| t <= now))
                    .map(|(id, _)| *id)
                    .collect();
                for id in due {
                    self.start(id);
                }
            }
            Stop::Graceful { deadline } if now >= deadline => {
                log!("kill timeout reached: killing {} remaining worker(s)", self.workers.len());
                self.kill_all();
            }
            Stop::Graceful { .. } => self.disconnect_idle(),
        }
    }

    /// Starts a worker process for slot `id`. On failure, retries later with backoff.
    fn start(&mut self, id: u32) {
        let serial = self.next_serial;
        self.next_serial += 1;
        match self.spawn(id, serial) {
            Ok(worker) => {
                log!("worker {id} started (pid {})", worker.pid);
                self.emit(Event::Fork { id, pid: worker.pid });
                let slot = self.slots.entry(id).or_default();
                slot.serial = Some(serial);
                slot.start_at = None;
                self.workers.insert(serial, worker);
            }
            Err(e) => {
                log!("cannot start worker {id}: {e}");
                self.schedule_restart(id, true);
            }
        }
    }

    fn spawn(&mut self, id: u32, serial: Serial) -> io::Result<Worker> {
        let (channel, child_end) = Channel::pair()?;
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
        self.dispatch.add_worker(serial, channel.clone());
        let tx = self.reports_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(Report::Exited { serial, status });
        });
        tokio::spawn(read_loop(serial, channel.clone(), self.dispatch.clone(), self.reports_tx.clone()));
        Ok(Worker {
            id,
            pid,
            started: Instant::now(),
            channel,
            online: false,
            disconnecting: false,
            reason: None,
            channel_closed: false,
            status: None,
        })
    }

    fn command(&self, exe: &std::path::Path, id: u32, channel: std::os::fd::RawFd) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg0(&self.argv0)
            .args(&self.args)
            .env(ENV_UNIQUE_ID, id.to_string())
            .env(ENV_CHANNEL_FD, CHANNEL_FD.to_string());
        sys::prepare_worker_command(cmd.as_std_mut(), channel, CHANNEL_FD);
        cmd
    }

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
        let (id, pid) = (w.id, w.pid);
        if let ToMaster::Listen { req, addr, index } = msg {
            let result = self.listen(addr, index).map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL));
            if let Err(errno) = result {
                log!("worker {id} cannot listen on {addr}: {}", io::Error::from_raw_os_error(errno));
            }
            let mut out = BytesMut::new();
            encode::listen_reply(&mut out, req, &result);
            send_soon(&self.workers[&serial].channel, out);
            return;
        }
        match msg {
            ToMaster::Hello { .. } => {
                w.online = true;
                self.registry.lock().unwrap().insert(id, w.channel.clone());
                self.emit(Event::Online { id, pid });
            }
            ToMaster::Listening { key } => {
                if let Some(l) = self.listeners.get(&key) {
                    self.emit(Event::Listening { id, pid, addr: l.addr });
                }
            }
            ToMaster::Exiting { reason } => {
                log!("worker {id} (pid {pid}) is exiting: {reason}");
                w.reason = Some(reason);
            }
            ToMaster::User(data) => self.emit(Event::Message { id, pid, data }),
            // Handled above, or by the reader (data path) before they get here.
            ToMaster::Listen { .. }
            | ToMaster::Unlisten { .. }
            | ToMaster::Accepted { .. }
            | ToMaster::Refused { .. } => {}
        }
    }

    /// Returns the key of the master's socket for `addr`, binding it on first use.
    fn listen(&mut self, addr: SocketAddr, index: u32) -> io::Result<(ListenKey, SocketAddr)> {
        let lookup = (addr, if addr.port() == 0 { index } else { 0 });
        if let Some(key) = self.by_addr.get(&lookup) {
            return Ok((*key, self.listeners[key].addr));
        }
        if matches!(self.stop, Stop::Graceful { .. }) {
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        }
        let socket = dispatch::bind_tcp(addr, self.cfg.backlog)?;
        let bound = socket.local_addr()?.as_socket().unwrap_or(addr);
        let key = self.listeners.len() as ListenKey + 1;
        let task = tokio::spawn(dispatch::accept_loop(socket, key, self.dispatch.clone()));
        log!("listening on {bound}");
        self.listeners.insert(key, Listener { addr: bound, task });
        self.by_addr.insert(lookup, key);
        Ok((key, bound))
    }

    /// The worker sent something malformed: it gets no more connections and is killed; the
    /// rest of the cluster keeps serving.
    fn on_bad(&mut self, serial: Serial, error: RecvError) {
        self.dispatch.close(serial);
        let Some(w) = self.workers.get_mut(&serial) else { return };
        log!("worker {} (pid {}): {error}; killing it", w.id, w.pid);
        let _ = sys::kill(w.pid, libc::SIGKILL);
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
                log!("worker {} (pid {}): cannot wait for it: {e}", w.id, w.pid);
                w.status = Some(ExitStatus::from_raw(0));
            }
        }
        self.reap(serial);
    }

    /// Once a worker has both exited and closed its channel (every acknowledgement it sent
    /// has been read), forget it and replace it.
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
        let expected = w.disconnecting || matches!(self.stop, Stop::Graceful { .. });
        if expected {
            log!("worker {} (pid {}) {how}", w.id, w.pid);
        } else {
            let reason = w.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
            log!("worker {} (pid {}) {how} after {:.1}s{reason}", w.id, w.pid, uptime.as_secs_f64());
        }
        self.emit(Event::Exit(ExitInfo {
            id: w.id,
            pid: w.pid,
            code: status.code(),
            signal: status.signal(),
            after_disconnect: w.disconnecting,
        }));
        if let Some(slot) = self.slots.get_mut(&w.id)
            && slot.serial == Some(serial)
        {
            slot.serial = None;
            if matches!(self.stop, Stop::Running) {
                self.schedule_restart(w.id, !w.online || uptime < MIN_UPTIME);
            }
        }
    }

    /// Replaces worker `id`: at once after a stable run, with growing delays while it keeps
    /// dying young.
    fn schedule_restart(&mut self, id: u32, unstable: bool) {
        let slot = self.slots.entry(id).or_default();
        slot.restarts += 1;
        if unstable {
            slot.backoff = if slot.backoff.is_zero() { BACKOFF_START } else { (slot.backoff * 2).min(BACKOFF_MAX) };
            log!("worker {id} is crashing on start; restart {} in {:?}", slot.restarts, slot.backoff);
            slot.start_at = Some(Instant::now() + slot.backoff);
        } else {
            slot.backoff = Duration::ZERO;
            slot.start_at = Some(Instant::now());
        }
    }

    fn begin_stop(&mut self, why: &str) {
        if matches!(self.stop, Stop::Graceful { .. }) {
            return;
        }
        log!("{why}: stopping gracefully (kill timeout {:?})", self.cfg.kill_timeout);
        self.stop = Stop::Graceful { deadline: Instant::now() + self.cfg.kill_timeout };
        for slot in self.slots.values_mut() {
            slot.start_at = None;
        }
        // Stop accepting: new clients are refused by the kernel from here on.
        for (_, l) in self.listeners.drain() {
            l.task.abort();
        }
        self.disconnect_idle();
    }

    /// Tells every worker the master holds no connection for to disconnect. A worker with
    /// connections in flight first accepts them, then is told.
    fn disconnect_idle(&mut self) {
        for (serial, w) in self.workers.iter_mut() {
            if w.disconnecting || w.channel_closed || self.dispatch.inflight(*serial) > 0 {
                continue;
            }
            w.disconnecting = true;
            self.dispatch.close(*serial);
            let mut out = BytesMut::new();
            encode::disconnect(&mut out);
            send_soon(&w.channel, out);
            let (id, pid) = (w.id, w.pid);
            if let Some(tx) = &self.events {
                let _ = tx.send(Event::Disconnect { id, pid });
            }
        }
    }

    fn kill_all(&mut self) {
        for w in self.workers.values() {
            if w.status.is_none() {
                let _ = sys::kill(w.pid, libc::SIGKILL);
            }
        }
    }

    fn emit(&self, event: Event) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }
}

/// Sends a control message now, or from a task if the socket is momentarily full, so the
/// supervisor never waits on one worker.
fn send_soon(channel: &Arc<Channel>, out: BytesMut) {
    if let Err(e) = channel.try_send_with_fds(&out, &[])
        && e.kind() == io::ErrorKind::WouldBlock
    {
        let channel = channel.clone();
        tokio::spawn(async move { channel.send(&out).await });
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (_, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "exited".into(),
    }
}

/// Reads one worker's channel. Acknowledgements and listener changes go straight to the
/// dispatch table (data path); everything else goes to the supervisor. After a malformed
/// message it keeps reading (datagram boundaries survive garbage) so that acknowledgements
/// already sent are not lost, while the supervisor kills the worker.
async fn read_loop(
    serial: Serial,
    channel: Arc<Channel>,
    dispatch: Arc<Dispatch>,
    reports: mpsc::UnboundedSender<Report>,
) {
    let mut rx = Receiver::new();
    let mut hello = false;
    let mut poisoned = false;
    loop {
        let (data, fds) = match rx.recv(&channel).await {
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
            other => other,
        };
        match msg {
            Ok(ToMaster::Accepted { ids }) => dispatch.accepted(serial, &ids),
            Ok(ToMaster::Refused { ids }) => dispatch.refused(serial, &ids),
            Ok(_) if poisoned => {}
            Ok(msg) => {
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
