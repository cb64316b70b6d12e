//! One worker process: starting it from the binary on disk, reading its channel and relaying
//! its messages, killing it, and reporting it gone once it has exited and every message it
//! sent has been read.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};

use super::decide::Status;
use super::dispatch::Dispatch;
use super::handle::Registry;
use super::types::Event;
use super::types::Serial;
use crate::env::{ENV_CHANNEL_FD, ENV_UNIQUE_ID, ENV_UPGRADE_FD};
use crate::ipc::encode;
use crate::ipc::message::{AGENT, ALL_WORKERS, PROTOCOL_VERSION, ProtocolError, ToMaster, USER_TO_WORKER};
use crate::ipc::{Channel, Reassembly, Receiver, RecvError, Whole};
use crate::log::log;
use crate::messaging::{self, Calls, Peer};
use crate::role::{AGENT_UNIQUE_ID, CHANNEL_FD};
use crate::sys;

/// How long the reader of an exited worker's channel may take to reach its end: it reads what
/// is queued in microseconds, unless a descendant of the worker still holds the channel.
const CHANNEL_GRACE: Duration = Duration::from_secs(1);

/// What a worker's tasks report to the supervisor.
pub(super) enum Report {
    /// A message for the supervisor (acknowledgements go straight to the dispatch table).
    Message { serial: Serial, msg: ToMaster },
    /// The worker broke the protocol (its channel is still read until it closes).
    Bad { serial: Serial, error: RecvError },
    /// A user message for code in the master; `taken` says whether it was queued (false: no
    /// code reads events), or gives it back when the queue is full.
    User { serial: Serial, call: u32, data: bytes::Bytes, taken: oneshot::Sender<Result<bool, Event>> },
    /// The worker exited and its channel is read to the end.
    Gone { serial: Serial, status: Result<Status, String> },
}

/// What a new worker's tasks are connected to.
pub(super) struct Links {
    pub(super) dispatch: Arc<Dispatch>,
    pub(super) reports: mpsc::UnboundedSender<Report>,
    pub(super) registry: Registry,
    pub(super) calls: Arc<Calls>,
    /// The queue of events for code in the master, if any.
    pub(super) events: Option<mpsc::Sender<Event>>,
    /// Counters for metrics.
    pub(super) stats: Arc<super::observe::Stats>,
    /// The runtime of the data path's first thread (`dispatch/accept.rs`): the channels are
    /// read there, beside the accept loops.
    pub(super) data_path: tokio::runtime::Handle,
    /// The totals of the application's metrics, which read each process's segment.
    pub(super) app_metrics: super::handle::AppMetrics,
}

/// Starts workers: the binary this master was started from, with its arguments.
pub(super) struct Launcher {
    exe: PathBuf,
    argv0: OsString,
    args: Vec<OsString>,
    /// Workers' stdout and stderr go through the master (`CLUSTER_LOG_CAPTURE`).
    capture: bool,
    /// Who workers run as (`CLUSTER_USER`).
    credentials: Option<Arc<sys::Credentials>>,
}

/// A running worker process.
pub(super) struct Child {
    pub(super) id: u32,
    pub(super) pid: u32,
    pub(super) channel: Arc<Channel>,
    kill: Option<oneshot::Sender<()>>,
}

impl Child {
    /// SIGKILLs the process, unless it has already been reaped (a pid is never signalled once
    /// it may belong to another process).
    pub(super) fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

impl Launcher {
    pub(super) fn new(capture: bool, credentials: Option<Arc<sys::Credentials>>) -> io::Result<Launcher> {
        let exe = std::env::current_exe()?;
        let mut argv = std::env::args_os();
        let argv0 = argv.next().unwrap_or_else(|| exe.clone().into_os_string());
        Ok(Launcher { exe, argv0, args: argv.collect(), capture, credentials })
    }

    /// Starts worker `id` (or the agent) as process `serial`, with its channel reader on the
    /// data path's thread (`links.data_path`).
    pub(super) fn spawn(&self, id: u32, serial: Serial, links: &Links) -> io::Result<Child> {
        // Registered with that thread's reactor, where it is read.
        let (channel, child_end) = {
            let _data_path = links.data_path.enter();
            Channel::pair()?
        };
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
        if let Some(out) = child.stdout.take() {
            tokio::spawn(capture(id, pid, "stdout", out, tokio::io::stdout()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(capture(id, pid, "stderr", err, tokio::io::stderr()));
        }
        let channel = Arc::new(channel);
        if cfg!(feature = "metrics") {
            give_segment(id, serial, &channel, links);
        }
        links.dispatch.add_worker(serial, id, channel.clone());
        let relay = relay(id, serial, channel.clone(), links);
        let reads = read_loop(serial, channel.clone(), links.dispatch.clone(), links.reports.clone(), relay);
        let reader = links.data_path.spawn(reads);
        let (kill, killed) = oneshot::channel();
        let (dispatch, reports) = (links.dispatch.clone(), links.reports.clone());
        tokio::spawn(async move {
            let status = wait(&mut child, killed).await;
            // Every message it sent is read before it is reported gone (acknowledgements among
            // them), but an end of stream that never comes is not waited for.
            let mut reader = reader;
            if tokio::time::timeout(CHANNEL_GRACE, &mut reader).await.is_err() {
                reader.abort();
            }
            // Whatever it had not acknowledged goes to other workers.
            dispatch.remove_worker(serial);
            let _ = reports.send(Report::Gone { serial, status });
        });
        Ok(Child { id, pid, channel, kill: Some(kill) })
    }

    /// A new master (an upgrade): the binary on disk, with this one's arguments; its
    /// environment is this process's.
    pub(super) fn successor_command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg0(&self.argv0).args(&self.args);
        cmd
    }

    fn command(&self, exe: &Path, id: u32, channel: std::os::fd::RawFd) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(exe);
        let unique = if id == AGENT { AGENT_UNIQUE_ID.to_string() } else { id.to_string() };
        cmd.arg0(&self.argv0).args(&self.args).env(ENV_UNIQUE_ID, unique).env(ENV_CHANNEL_FD, CHANNEL_FD.to_string());
        // The service manager speaks to the master only: workers must not notify it, nor take
        // the sockets it passed.
        for var in MASTER_ONLY_ENV {
            cmd.env_remove(var);
        }
        sys::prepare_worker_command(cmd.as_std_mut(), channel, CHANNEL_FD, self.credentials.clone());
        if self.capture {
            cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        }
        cmd
    }
}

/// Creates process `serial`'s metrics segment, registers it with the totals and sends it, the
/// first message on its channel (its buffer is empty: the send cannot block). A segment that
/// cannot be made is logged, and the process records nothing.
fn give_segment(id: u32, serial: Serial, channel: &Channel, links: &Links) {
    use crate::metrics::segment;
    let made = sys::create_segment(&format!("cluster-metrics-{id}"), segment::WORDS).and_then(|fd| {
        let map = sys::map_segment(&fd, segment::WORDS)?;
        segment::init(map.words());
        let mut out = BytesMut::new();
        encode::metrics(&mut out, segment::WORDS as u32);
        channel.try_send_with_fds(&out, &[fd.as_fd()])?;
        Ok((fd, map))
    });
    match made {
        Ok((fd, map)) => {
            let reader = segment::Reader::new(map);
            links.app_metrics.lock().unwrap_or_else(|e| e.into_inner()).add(serial, id, fd, segment::WORDS, reader);
        }
        Err(e) => log!("{}: no metrics segment: {e}", Peer::from_wire(id)),
    }
}

/// What systemd (or another service manager) tells the master alone, and the channel of a
/// master started by an upgrade.
const MASTER_ONLY_ENV: [&str; 7] =
    ["NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID", ENV_UPGRADE_FD];

/// Longest line of a worker's output kept whole; longer ones are cut into pieces this long.
const MAX_OUTPUT_LINE: usize = 16 * 1024;

/// Copies one output stream of a worker to the master's, each line prefixed with the worker
/// (`worker 2 | …`, as foreman and compose do) and kept in the ring of recent records for
/// `clusterctl logs`.
async fn capture(
    id: u32,
    pid: u32,
    stream: &'static str,
    from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let mut from = tokio::io::BufReader::new(from);
    let ring = crate::log::ring::ring();
    let prefix = format!("{} | ", Peer::from_wire(id));
    let mut line = Vec::new();
    loop {
        line.clear();
        // At most one piece of a long line at a time: memory stays bounded.
        let mut limited = (&mut from).take(MAX_OUTPUT_LINE as u64);
        match limited.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        let text = String::from_utf8_lossy(&line);
        let mut out = String::with_capacity(prefix.len() + text.len() + 1);
        out.push_str(&prefix);
        out.push_str(&text);
        out.push('\n');
        let _ = to.write_all(out.as_bytes()).await;
        let mut record = serde_json::Map::new();
        record.insert("level".into(), "INFO".into());
        record.insert("event".into(), "output".into());
        record.insert("id".into(), if id == AGENT { "agent".into() } else { id.into() });
        record.insert("pid".into(), pid.into());
        record.insert("stream".into(), stream.into());
        record.insert("message".into(), text.into_owned().into());
        ring.push(record);
    }
}

/// Waits for the child to exit, SIGKILLing it when asked. The child is reaped here and only
/// here, so the kill can never reach a recycled pid.
async fn wait(child: &mut tokio::process::Child, mut kill: oneshot::Receiver<()>) -> Result<Status, String> {
    let mut asked = false;
    loop {
        tokio::select! {
            status = child.wait() => {
                return status
                    .map(|s| Status { code: s.code(), signal: s.signal() })
                    .map_err(|e| e.to_string());
            }
            sent = &mut kill, if !asked => {
                asked = true;
                if sent.is_ok() {
                    let _ = child.start_kill();
                }
            }
        }
    }
}

/// Carries the user messages process `from` (`serial`) sends, in order, without holding up the
/// reading of its channel (acknowledgements): to other processes, to code in the master, or
/// as replies to the master's requests. After each one, tells the sender whether it was handed
/// over, which also paces a sender to the pace of its recipient.
pub(super) fn relay(from: u32, serial: Serial, sender: Arc<Channel>, links: &Links) -> mpsc::UnboundedSender<Whole> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Whole>();
    let (registry, reports, calls) = (links.registry.clone(), links.reports.clone(), links.calls.clone());
    let (events, stats) = (links.events.clone(), links.stats.clone());
    tokio::spawn(async move {
        let mut receipt = BytesMut::new();
        while let Some((to, call, data)) = rx.recv().await {
            super::observe::Stats::bump(&stats.relayed);
            let delivered = match to {
                0 if messaging::is_reply(call) => calls.complete(call, data),
                0 => {
                    // Through the supervisor, so that events stay in order (a worker's `Online`
                    // before its first message); when the queue is full, the message comes
                    // back and this sender waits for room.
                    let (taken, verdict) = oneshot::channel();
                    let _ = reports.send(Report::User { serial, call, data, taken });
                    match (verdict.await, &events) {
                        (Ok(Ok(taken)), _) => taken,
                        (Ok(Err(event)), Some(events)) => events.send(event).await.is_ok(),
                        _ => false,
                    }
                }
                _ => deliver(from, to, call, &data, &registry).await,
            };
            receipt.clear();
            encode::relayed(&mut receipt, delivered);
            if sender.send(&receipt).await.is_err() {
                return;
            }
        }
    });
    tx
}

/// Hands a message to worker `to`, the agent, or every worker but the sender; true if any got it.
async fn deliver(from: u32, to: u32, call: u32, data: &[u8], registry: &Registry) -> bool {
    let targets: Vec<(u32, Arc<Channel>)> = {
        let registry = registry.lock().unwrap();
        if to == ALL_WORKERS {
            registry.iter().filter(|(id, _)| **id != AGENT && **id != from).map(|(id, c)| (*id, c.clone())).collect()
        } else {
            registry.get(&to).map(|c| (to, c.clone())).into_iter().collect()
        }
    };
    let mut delivered = false;
    for (id, channel) in targets {
        match channel.send_user(USER_TO_WORKER, from, call, data, || {}).await {
            Ok(()) => delivered = true,
            Err(e) => log!("message from {} to {} dropped: {e}", Peer::from_wire(from), Peer::from_wire(id)),
        }
    }
    delivered
}

/// Reads one worker's channel. Acknowledgements and listener changes go straight to the
/// dispatch table (data path), user messages are reassembled and go to the worker's relay
/// (whoever they are for); everything else goes to the supervisor. After a malformed message it
/// keeps reading (datagram boundaries survive garbage) so that acknowledgements already sent
/// are not lost, while the supervisor kills the worker.
async fn read_loop(
    serial: Serial,
    channel: Arc<Channel>,
    dispatch: Arc<Dispatch>,
    reports: mpsc::UnboundedSender<Report>,
    relay: mpsc::UnboundedSender<Whole>,
) {
    let mut rx = Receiver::new();
    let mut fragments = Reassembly::default();
    let mut hello = false;
    let mut poisoned = false;
    let bad = |poisoned: &mut bool, error: RecvError| {
        if !std::mem::replace(poisoned, true) {
            let _ = reports.send(Report::Bad { serial, error });
        }
    };
    loop {
        // A datagram whose descriptors were cut (this process had no room for what a worker
        // handed back) is a protocol error like any other.
        let received = rx.recv(&channel).await.and_then(|d| d.map(|d| d.whole().map_err(RecvError::from)).transpose());
        let (data, fds) = match received {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(RecvError::Protocol(e)) => {
                bad(&mut poisoned, e.into());
                continue;
            }
            // A worker that dies with messages unread in its queue makes the kernel report
            // ECONNRESET once, *before* the datagrams still queued for us (acknowledgements
            // among them): keep reading until the real end of stream.
            Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => continue,
            Err(error) => {
                bad(&mut poisoned, error);
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
            Ok(Some(ToMaster::User { to, call, data })) => drop(relay.send((to, call, data))),
            Ok(Some(msg)) => {
                hello = true;
                match &msg {
                    ToMaster::Listening { key } => dispatch.listening(serial, *key),
                    ToMaster::Unlisten { key } => dispatch.unlisten(serial, *key),
                    _ => {}
                }
                let _ = reports.send(Report::Message { serial, msg });
            }
            Err(e) => bad(&mut poisoned, e.into()),
        }
    }
}

/// A reassembled user message, as if it had come in one datagram.
fn whole(message: Option<Whole>) -> Option<ToMaster> {
    message.map(|(to, call, data)| ToMaster::User { to, call, data })
}
