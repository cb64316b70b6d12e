//! The worker's channel client: one task reads the master's messages and routes each one:
//! listen replies to the waiting `bind`, new connections to the queue of their listener,
//! user messages to `worker::recv`, and `disconnect` to the shutdown signal. It also sends
//! heartbeats and close counts, and gives back connections it cannot serve.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};

use super::closes::{CLOSE_CHECK, OpenConns};
use crate::config::Config;
use crate::ipc::message::{
    self, AGENT, ALL_WORKERS, Bound, ConnId, Endpoint, ListenKey, ListenResult, NewConn, PROTOCOL_VERSION, ToWorker,
};
use crate::ipc::{Channel, Reassembly, Receiver, RecvError, Whole, encode};
use crate::messaging::{self, Calls, Message, Peer, Replier, Request, SendError};
use crate::sys;

/// Acknowledged connections not yet handed to user code, per listener. Shared with the
/// client, so the panic hook can give them back.
pub(crate) type Unserved = Arc<Mutex<VecDeque<NewConn>>>;

/// The queue of connections the master handed to one listener.
pub(crate) type ConnQueue = mpsc::UnboundedReceiver<NewConn>;

/// How long a starting worker waits for the master's metrics segment.
const SEGMENT_WAIT: Duration = Duration::from_secs(5);

/// This worker's connection to its master.
pub(crate) struct Client {
    pub(super) id: u32,
    pub(crate) channel: Channel,
    state: Mutex<State>,
    shutdown: watch::Sender<bool>,
    /// Whether the master's metrics segment has come (feature `metrics`).
    segment: watch::Sender<bool>,
    pub(super) messages: tokio::sync::Mutex<mpsc::UnboundedReceiver<Message>>,
    /// Requests this process waits on.
    pub(super) calls: Calls,
    /// One per message sent through the master to another process, in sending order: told
    /// whether the master could hand it over.
    receipts: Mutex<VecDeque<oneshot::Sender<bool>>>,
    /// Connections acknowledged to the master and not yet seen closed, when it counts closes.
    open_conns: Option<Mutex<OpenConns>>,
    /// Per listener, connections acknowledged but not yet handed to user code.
    unserved: Mutex<Vec<(ListenKey, Unserved)>>,
    /// How long this process may finish its connections once stopping: after that, a worker
    /// whose master is gone exits.
    kill_timeout: Duration,
}

struct State {
    next_req: u32,
    replies: HashMap<u32, oneshot::Sender<ListenResult>>,
    listeners: HashMap<ListenKey, mpsc::UnboundedSender<NewConn>>,
    /// Port-0 binds per address so far: the n-th port-0 bind of every worker shares a port.
    port0: HashMap<Endpoint, u32>,
    messages: mpsc::UnboundedSender<Message>,
}

static CLIENT: OnceLock<Arc<Client>> = OnceLock::new();

/// The client of this process, if it is a worker.
pub(crate) fn client() -> Option<&'static Arc<Client>> {
    CLIENT.get()
}

/// Connects to the master over the inherited channel and says hello. Needs a runtime.
pub(crate) async fn start(id: u32, channel: OwnedFd, cfg: &Config) -> io::Result<&'static Arc<Client>> {
    let channel = Channel::from_fd(channel)?;
    let (messages_tx, messages_rx) = mpsc::unbounded_channel();
    let client = Arc::new(Client {
        id,
        channel,
        state: Mutex::new(State {
            next_req: 0,
            replies: HashMap::new(),
            listeners: HashMap::new(),
            port0: HashMap::new(),
            messages: messages_tx,
        }),
        shutdown: watch::Sender::new(false),
        segment: watch::Sender::new(false),
        messages: tokio::sync::Mutex::new(messages_rx),
        calls: Calls::default(),
        receipts: Mutex::default(),
        open_conns: cfg.counts_closes().then(Mutex::default),
        unserved: Mutex::default(),
        kill_timeout: cfg.kill_timeout,
    });
    let client = CLIENT.get_or_init(|| client);
    install_panic_hook(cfg.exit_on_panic);
    // If the master dies, whatever this process is doing, it is gone a second after the kill
    // timeout at the latest (the graceful way out below comes first).
    if let Err(e) = sys::die_when_orphaned(cfg.kill_timeout + Duration::from_secs(1)) {
        crate::log::say!("{}: no deadline if the master dies: {e}", Peer::from_wire(id));
    }
    client.send(|out| encode::hello(out, PROTOCOL_VERSION, sys::getpid())).await?;
    spawn_own(read_loop(client.clone()));
    // The master sends the segment before anything else: the program's first records go in it.
    if cfg!(feature = "metrics") {
        let mut segment = client.segment.subscribe();
        if tokio::time::timeout(SEGMENT_WAIT, segment.wait_for(|came| *came)).await.is_err() {
            crate::log::say!("{}: no metrics segment from the master; metrics are not recorded", Peer::from_wire(id));
        }
    }
    if let Some(every) = cfg.heartbeat_interval() {
        spawn_own(heartbeat(client.clone(), every));
    }
    if client.open_conns.is_some() {
        spawn_own(report_closes(client.clone()));
    }
    Ok(client)
}

/// Tasks of the framework alive in this worker's runtime (the rest belong to the application).
static OWN_TASKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many tasks of the runtime are the framework's own.
pub(crate) fn own_tasks() -> usize {
    OWN_TASKS.load(std::sync::atomic::Ordering::Relaxed)
}

fn spawn_own(task: impl std::future::Future<Output = ()> + Send + 'static) {
    struct Alive;
    impl Drop for Alive {
        fn drop(&mut self) {
            OWN_TASKS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    OWN_TASKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let alive = Alive;
    tokio::spawn(async move {
        let _alive = alive;
        task.await
    });
}

/// Tells the master this worker's runtime still runs: a task of that runtime sends it, so a
/// blocked runtime (a busy loop, a blocking call) goes silent and gets replaced.
async fn heartbeat(client: Arc<Client>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Best effort: a full channel means the master is busy, not that we are dead.
        let mut out = BytesMut::new();
        encode::heartbeat(&mut out);
        if let Err(e) = client.channel.try_send_with_fds(&out, crate::ipc::NO_FDS)
            && e.kind() != io::ErrorKind::WouldBlock
        {
            return;
        }
    }
}

/// Tells the master, in batches, how many of the connections it handed over are closed.
async fn report_closes(client: Arc<Client>) {
    let Some(open) = &client.open_conns else { return };
    let mut tick = tokio::time::interval(CLOSE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let closed = open.lock().unwrap().sweep();
        if closed > 0 && client.send(|out| encode::closed(out, closed)).await.is_err() {
            return;
        }
    }
}

impl Client {
    /// Notes connections about to be acknowledged, if the master counts closes; returns the
    /// closes noticed since the last report, for the master (with the acknowledgement).
    pub(crate) fn track(&self, conns: &[NewConn]) -> u32 {
        let Some(open) = &self.open_conns else { return 0 };
        let mut open = open.lock().unwrap();
        for conn in conns {
            open.track(conn.fd.as_raw_fd());
        }
        std::mem::take(&mut open.closed)
    }

    /// Acknowledged connections go back to the master: they were not closed by user code.
    fn untrack(&self, conns: &[NewConn]) {
        if let Some(open) = &self.open_conns {
            let mut open = open.lock().unwrap();
            for conn in conns {
                open.fds.remove(&conn.fd.as_raw_fd());
            }
        }
    }

    /// Sends the message `write` encodes.
    pub(super) async fn send(&self, write: impl FnOnce(&mut BytesMut)) -> io::Result<()> {
        let mut out = BytesMut::new();
        write(&mut out);
        self.channel.send(&out).await
    }

    /// Sends from code that cannot await (drop glue): now if the socket has room, else from a
    /// task. Errors mean the master is gone, and then nobody is left to tell.
    fn send_soon(self: &Arc<Self>, write: impl FnOnce(&mut BytesMut)) {
        let mut out = BytesMut::new();
        write(&mut out);
        if let Err(e) = self.channel.try_send_with_fds(&out, crate::ipc::NO_FDS)
            && e.kind() == io::ErrorKind::WouldBlock
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let client = self.clone();
            rt.spawn(async move { client.channel.send(&out).await });
        }
    }

    /// Asks the master to bind `endpoint` (or find its socket already bound).
    pub(crate) async fn bind(self: &Arc<Self>, endpoint: Endpoint) -> io::Result<Bound> {
        if self.id == AGENT {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the cluster agent gets no connections and binds no shared socket ({endpoint}); listen in the workers"
                ),
            ));
        }
        let (tx, rx) = oneshot::channel();
        let (req, index) = {
            let mut state = self.state.lock().unwrap();
            let req = state.next_req;
            state.next_req = state.next_req.wrapping_add(1);
            state.replies.insert(req, tx);
            let index = if endpoint.is_port_zero() {
                let n = state.port0.entry(endpoint.clone()).or_default();
                *n += 1;
                *n - 1
            } else {
                0
            };
            (req, index)
        };
        self.send(|out| encode::listen(out, req, &endpoint, index)).await?;
        rx.await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "cluster master went away during bind"))?
            .map_err(io::Error::from_raw_os_error)
    }

    /// Binds a stream endpoint and starts taking its connections: returns the key, the bound
    /// address (none for Unix sockets) and the queue the master's connections arrive on.
    pub(crate) async fn listen(
        self: &Arc<Self>,
        endpoint: Endpoint,
    ) -> io::Result<(ListenKey, Option<SocketAddr>, ConnQueue)> {
        let shown = endpoint.to_string();
        let Bound { key, addr, .. } = self.bind(endpoint).await?;
        Ok((key, addr, self.attach(key, &shown).await?))
    }

    /// Starts taking the master's connections for socket `key`.
    pub(crate) async fn attach(self: &Arc<Self>, key: ListenKey, shown: &str) -> io::Result<ConnQueue> {
        let (tx, queue) = mpsc::unbounded_channel();
        {
            let mut state = self.state.lock().unwrap();
            if state.listeners.contains_key(&key) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("this worker already listens on {shown}"),
                ));
            }
            state.listeners.insert(key, tx);
        }
        self.send_listening(key).await?;
        Ok(queue)
    }

    /// Tells the master this worker now uses socket `key` (it is part of being ready).
    pub(crate) async fn send_listening(&self, key: ListenKey) -> io::Result<()> {
        self.send(|out| encode::listening(out, key)).await
    }

    /// This worker stopped using a socket it accepts on itself.
    pub(crate) fn send_unlisten(self: &Arc<Self>, key: ListenKey) {
        self.send_soon(|out| encode::unlisten(out, key));
    }

    /// A listener for `key` starts: the buffer for what it acknowledged and has not handed out.
    pub(crate) fn register_unserved(&self, key: ListenKey) -> Unserved {
        let unserved = Unserved::default();
        self.unserved.lock().unwrap().push((key, unserved.clone()));
        unserved
    }

    /// A listener was dropped: tell the master, refuse what it had not acknowledged, and give
    /// back what it had acknowledged but not handed out.
    pub(crate) fn unlisten(
        self: &Arc<Self>,
        key: ListenKey,
        mut queue: ConnQueue,
        pending: Vec<NewConn>,
        mut unserved: VecDeque<NewConn>,
    ) {
        self.state.lock().unwrap().listeners.remove(&key);
        self.unserved.lock().unwrap().retain(|(k, _)| *k != key);
        self.send_soon(|out| encode::unlisten(out, key));
        queue.close();
        // Tracked when their acknowledgement was written, never sent.
        self.untrack(&pending);
        let mut ids: Vec<ConnId> = pending.into_iter().map(|c| c.id).collect();
        while let Ok(conn) = queue.try_recv() {
            ids.push(conn.id);
        }
        for chunk in ids.chunks(message::MAX_FDS) {
            self.send_soon(|out| encode::refused(out, chunk));
        }
        while !unserved.is_empty() {
            let n = unserved.len().min(message::MAX_FDS);
            self.give_back(key, unserved.drain(..n).collect());
        }
    }

    /// Hands acknowledged connections back to the master with their descriptors: now if the
    /// socket has room, else from a task.
    fn give_back(self: &Arc<Self>, key: ListenKey, conns: Vec<NewConn>) {
        self.untrack(&conns);
        let out = encode_returned(key, &conns);
        let fds: Vec<_> = conns.iter().map(|c| c.fd.as_fd()).collect();
        if let Err(e) = self.channel.try_send_with_fds(&out, &fds)
            && e.kind() == io::ErrorKind::WouldBlock
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            drop(fds);
            let client = self.clone();
            rt.spawn(async move {
                let fds: Vec<_> = conns.iter().map(|c| c.fd.as_fd()).collect();
                client.channel.send_with_fds(&out, &fds).await
            });
        }
    }

    /// From the panic hook of a worker about to exit: gives back every acknowledged connection
    /// user code has not taken, without blocking or waiting for locks.
    fn give_back_now(&self) {
        let Ok(registry) = self.unserved.try_lock() else { return };
        for (key, unserved) in registry.iter() {
            let Ok(mut unserved) = unserved.try_lock() else { continue };
            while !unserved.is_empty() {
                let n = unserved.len().min(message::MAX_FDS);
                let conns: Vec<NewConn> = unserved.drain(..n).collect();
                let fds: Vec<_> = conns.iter().map(|c| c.fd.as_fd()).collect();
                let _ = self.channel.try_send_with_fds(&encode_returned(*key, &conns), &fds);
            }
        }
    }

    fn handle(self: &Arc<Self>, msg: ToWorker) {
        match msg {
            ToWorker::NewConn { key, conns } => {
                let state = self.state.lock().unwrap();
                let mut refused = Vec::new();
                for conn in conns {
                    match state.listeners.get(&key) {
                        Some(queue) => {
                            if let Err(mpsc::error::SendError(conn)) = queue.send(conn) {
                                refused.push(conn.id);
                            }
                        }
                        None => refused.push(conn.id),
                    }
                }
                drop(state);
                if !refused.is_empty() {
                    self.send_soon(|out| encode::refused(out, &refused));
                }
            }
            ToWorker::ListenReply { req, result } => {
                if let Some(reply) = self.state.lock().unwrap().replies.remove(&req) {
                    let _ = reply.send(result);
                }
            }
            ToWorker::Disconnect => self.begin_shutdown(),
            ToWorker::User { from, call, data } => {
                if messaging::is_reply(call) {
                    self.calls.complete(call, data);
                    return;
                }
                let from = Peer::from_wire(from);
                let request = (call != 0).then(|| Request::from_client(call, from, self.clone()));
                let _ = self.state.lock().unwrap().messages.send(Message { from, data, request });
            }
            ToWorker::Metrics { words, fd } => {
                #[cfg(feature = "metrics")]
                if let Err(e) = crate::metrics::attach(fd, words as usize) {
                    crate::log::say!("{}: cannot map the metrics segment: {e}", Peer::from_wire(self.id));
                }
                #[cfg(not(feature = "metrics"))]
                let _ = (fd, words);
                self.segment.send_replace(true);
            }
            ToWorker::Relayed { delivered } => {
                if let Some(receipt) = self.receipts.lock().unwrap().pop_front() {
                    let _ = receipt.send(delivered);
                }
            }
            // Reassembled by the reader before they get here.
            ToWorker::UserStart { .. } | ToWorker::UserMore(_) => {}
        }
    }

    /// Resolves once this process is asked to stop (or the master is gone).
    pub(crate) async fn stopped(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Whether this process was asked to stop.
    pub(crate) fn is_stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Stops accepting: listeners return what is already queued, then report closed, and the
    /// shutdown signal fires.
    fn begin_shutdown(&self) {
        // The signal first: a listener that finds its queue closed may rely on `shutdown()`
        // being resolved already (see `net::proxy::Closing`).
        self.shutdown.send_replace(true);
        self.state.lock().unwrap().listeners.clear();
    }
}

/// A `returned` message for `conns`; their descriptors go with it, in this order.
fn encode_returned(key: ListenKey, conns: &[NewConn]) -> BytesMut {
    let mut out = BytesMut::new();
    encode::returned(&mut out, key, conns);
    out
}

/// How long a worker signalled from outside waits for the master to retire it before it
/// stops on its own (the master is then not stopping, and did not replace it).
const UNANSWERED_STOP: Duration = Duration::from_secs(5);

/// Reads the master's messages. Also handles SIGINT / SIGTERM sent to the worker itself: a
/// terminal's Ctrl-C, or systemd's `KillMode=control-group`, reaches every process of the
/// group at once, master included. Stopping at once would race the master, which may still
/// hand this worker connections while it drains its sockets: the worker tells the master
/// (`StopAsked`) and keeps serving until the master retires it (`disconnect`), as it does
/// when it is stopping or replacing it. A second signal, a master that does not answer within
/// [`UNANSWERED_STOP`], or a closed channel start a graceful stop at once.
async fn read_loop(client: Arc<Client>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut rx = Receiver::new();
    let mut fragments = Reassembly::default();
    let (mut term, mut int) = (signal(SignalKind::terminate()).ok(), signal(SignalKind::interrupt()).ok());
    // The master's own signals, when they reach the whole group (`systemctl kill` without
    // `--kill-whom=main`, a terminal's hangup): the master acts on them; a worker must not die
    // of their default action.
    let (mut hup, mut usr2) = (signal(SignalKind::hangup()).ok(), signal(SignalKind::user_defined2()).ok());
    let mut out_of_fds = false;
    let mut asked: Option<tokio::time::Instant> = None;
    loop {
        let signalled = |asked: &mut Option<tokio::time::Instant>| {
            if asked.is_some() {
                client.begin_shutdown();
                return;
            }
            *asked = Some(tokio::time::Instant::now() + UNANSWERED_STOP);
            let mut out = BytesMut::new();
            encode::stop_asked(&mut out);
            let no_fds: &[std::os::fd::BorrowedFd<'_>] = &[];
            if client.channel.try_send_with_fds(&out, no_fds).is_err() {
                client.begin_shutdown();
            }
        };
        let received = tokio::select! {
            received = rx.recv(&client.channel) => received,
            Some(()) = recv_signal(&mut term) => { signalled(&mut asked); continue }
            Some(()) = recv_signal(&mut int) => { signalled(&mut asked); continue }
            Some(()) = recv_signal(&mut hup) => continue,
            Some(()) = recv_signal(&mut usr2) => continue,
            () = sleep_until_opt(asked) => {
                // Stopping on its own; a later signal only repeats that.
                asked = Some(tokio::time::Instant::now() + Duration::from_secs(365 * 86_400));
                client.begin_shutdown();
                continue
            }
        };
        let received = match received {
            // New connections whose descriptors did not fit in this process's table: hand them
            // back (the master still holds them) instead of dying.
            Ok(Some(d))
                if d.fds_cut
                    && let Ok(ids) = message::newconn_ids(&d.data) =>
            {
                if !std::mem::replace(&mut out_of_fds, true) {
                    crate::log::say!(
                        "worker {}: no free file descriptors for {} new connection(s); handing them back",
                        client.id,
                        ids.len()
                    );
                }
                client.send_soon(|out| encode::busy(out, &ids));
                continue;
            }
            Ok(Some(d)) => d.whole().map_err(RecvError::from).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        if matches!(received, Ok(Some(_))) {
            out_of_fds = false;
        }
        match received {
            Ok(Some((data, fds))) => match ToWorker::decode(data, fds).and_then(|msg| match msg {
                ToWorker::UserStart { from, call, total, data } => fragments.start(from, call, total, data).map(whole),
                ToWorker::UserMore(data) => fragments.more(data).map(whole),
                msg => Ok(Some(msg)),
            }) {
                Ok(Some(msg)) => client.handle(msg),
                Ok(None) => {}
                Err(e) => {
                    // The master is trusted; garbage from it means a broken build. Do not guess.
                    crate::log::say!("worker {}: bad message from master: {e}; exiting", client.id);
                    sys::exit_now(70);
                }
            },
            Ok(None) | Err(_) => {
                // The master is gone. What it had handed over was read before this end: the
                // listeners give those connections out, then end, and the program finishes
                // them as in any stop; `main` returns once they are done and the process exits.
                // Whatever is still running at the kill timeout is ended here (a thread: the
                // runtime may be stuck), and the kernel's alarm backs that up.
                crate::log::say!(
                    "{}: the master is gone; finishing this process's connections (at most {:?})",
                    Peer::from_wire(client.id),
                    client.kill_timeout
                );
                client.begin_shutdown();
                // Dropping the sender ends `recv()` once queued messages are read; sends and
                // requests waiting on the master fail.
                client.state.lock().unwrap().messages = mpsc::unbounded_channel().0;
                client.receipts.lock().unwrap().clear();
                client.calls.close();
                let deadline = client.kill_timeout;
                std::thread::spawn(move || {
                    std::thread::sleep(deadline);
                    sys::exit_now(1);
                });
                return;
            }
        }
    }
}

/// A reassembled user message, as if it had come in one datagram.
fn whole(message: Option<Whole>) -> Option<ToWorker> {
    message.map(|(from, call, data)| ToWorker::User { from, call, data })
}

/// Sleeps until `at`, or forever.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Reports a panic to the master before the worker goes (Node's `suicide` message), then, with
/// `exit_on_panic`, ends the process so the master replaces it.
fn install_panic_hook(exit_on_panic: bool) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        // Without `exit_on_panic`, the panicking task ends alone and the worker goes on.
        if !exit_on_panic {
            return;
        }
        if let Some(client) = CLIENT.get() {
            let mut out = BytesMut::new();
            encode::exiting(&mut out, &info.to_string());
            let _ = sys::send_now(client.channel.fd(), &out);
            client.give_back_now();
        }
        sys::exit_now(101);
    }));
}

/// Sends a user message (`call`: 0, a request id, or a reply) to wire address `to`, and waits
/// for the master to say whether it was handed over.
pub(crate) async fn send_addressed(client: &Arc<Client>, to: u32, call: u32, data: Bytes) -> Result<(), SendError> {
    messaging::check_size(&data)?;
    let (tx, rx) = oneshot::channel();
    // Sent from its own task: a caller cancelled mid-message must not leave half a message
    // (or a receipt nobody will get) behind.
    let sender = client.clone();
    let sent = tokio::spawn(async move {
        let queued = || sender.receipts.lock().unwrap().push_back(tx);
        sender.channel.send_user(message::USER_TO_MASTER, to, call, &data, queued).await
    });
    sent.await.map_err(|e| io::Error::other(format!("send task failed: {e}")))??;
    // The master says, for every message, whether it was handed over.
    match rx.await {
        Ok(true) => Ok(()),
        // A late reply is dropped by the requester, as documented: not the replier's error.
        Ok(false) if messaging::is_reply(call) => Ok(()),
        Ok(false) if to == ALL_WORKERS => Err(SendError::NoPeer("no other worker is running".into())),
        Ok(false) if to == 0 => Err(SendError::NoPeer(
            "no code in the master takes messages (no `master` hook, or it is not reading its events)".into(),
        )),
        Ok(false) => Err(SendError::NoPeer(format!("{} is not running", Peer::from_wire(to)))),
        Err(_) => Err(SendError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "the cluster master went away"))),
    }
}

/// Replies to requests go back through this process's channel.
impl Replier for Client {
    fn reply(self: Arc<Self>, to: Peer, call: u32, data: Bytes) -> BoxFuture<'static, Result<(), SendError>> {
        Box::pin(async move { send_addressed(&self, to.check()?.wire(), call, data).await })
    }
}
