//! The master's data path: listening sockets, accept loops, and handing connections to workers.
//!
//! socket → [`accept_loop`] → [`Dispatch::dispatch`] → `NewConn` + fd over the worker's channel.
//!
//! The master keeps its copy of every connection it hands over until that worker
//! acknowledges it (`Accepted`). If the worker refuses it or its channel closes first (it died),
//! the connection goes back to the front of the backlog and on to another worker: no accepted
//! connection is lost or left hanging. Each worker has a window of unacknowledged connections;
//! when every worker's window is full, accept loops stop accepting and the kernel's listen
//! backlog holds new clients.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use socket2::{Domain, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::types::Serial;
use crate::config::Balancer;
use crate::ipc::Channel;
use crate::ipc::encode;
use crate::ipc::message::{ConnId, ListenKey, MAX_FDS, NewConn};
use crate::log::{note, warning};
use crate::net::is_connection_error;
use crate::sys;

/// Under `sticky`, connections that may wait in the master per worker for their own worker to
/// have room, before the master stops accepting.
const STICKY_WAITING: usize = MAX_FDS;

/// How long a worker that had no free file descriptors gets no new connections.
const REST: Duration = Duration::from_millis(100);

/// A connection accepted by the master and not yet owned by a worker.
struct Conn {
    key: ListenKey,
    socket: Socket,
    /// `None` for a Unix socket peer.
    peer: Option<SocketAddr>,
}

/// A connection chosen for a worker, with the id it will travel under.
struct Pending {
    id: ConnId,
    conn: Conn,
}

impl AsFd for Pending {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.socket.as_fd()
    }
}

/// Where connections can go: one entry per worker process whose channel is open.
struct Target {
    serial: Serial,
    /// Worker id (sticky balancing maps clients to ids, so a replacement keeps its clients).
    id: u32,
    channel: Arc<Channel>,
    /// Listeners this worker accepts on.
    keys: Vec<ListenKey>,
    /// Handed over, not yet acknowledged. The master's copy of each fd lives here.
    inflight: HashMap<ConnId, Conn>,
    /// Chosen for this worker, to go out in the next `NewConn` message.
    batch: Vec<Pending>,
    /// False once the worker is retiring: it gets no new connections.
    open: bool,
    /// Connections this worker acknowledged so far.
    handled: u64,
    /// Of those, how many it reported closed (only when closes are tracked).
    closed: u64,
    /// Since when it gets nothing because it said it had no room for more descriptors.
    resting: Option<Instant>,
    /// Connections handed to it, acknowledged by it (never decreases), and given back by it.
    sent: u64,
    acked: u64,
    returned: u64,
}

impl Target {
    fn counts(&self) -> Counts {
        Counts {
            dispatched: self.sent,
            acknowledged: self.acked,
            returned: self.returned,
            in_flight: self.inflight.len() as u64,
        }
    }
}

impl Target {
    /// Connections this worker has or is about to get.
    fn load(&self) -> u64 {
        (self.inflight.len() + self.batch.len()) as u64 + self.handled.saturating_sub(self.closed)
    }

    /// Puts the listed connections it has not acknowledged back at the front of the backlog,
    /// in their order; returns the listeners they came from.
    fn take_back(&mut self, ids: &[ConnId], backlog: &mut Backlog) -> Vec<ListenKey> {
        let conns: Vec<Conn> = ids.iter().filter_map(|id| self.inflight.remove(id)).collect();
        self.returned += conns.len() as u64;
        let keys = conns.iter().map(|c| c.key).collect();
        requeue(backlog, conns);
        keys
    }

    fn takes(&self, key: ListenKey) -> bool {
        self.open && self.resting.is_none() && self.keys.contains(&key)
    }

    /// Free places in its window, within the live-connection cap.
    fn room(&self, limits: &Limits) -> usize {
        let window = limits.window.saturating_sub(self.inflight.len() + self.batch.len());
        match limits.cap {
            Some(cap) => window.min(cap.saturating_sub(self.load()) as usize),
            None => window,
        }
    }
}

/// Accepted connections waiting for a worker with room, per listener.
type Backlog = HashMap<ListenKey, VecDeque<Conn>>;

/// Puts connections back at the front of their listeners' queues, in their order: they were
/// accepted before anything still waiting there.
fn requeue(backlog: &mut Backlog, conns: impl IntoIterator<Item = Conn, IntoIter: DoubleEndedIterator>) {
    for conn in conns.into_iter().rev() {
        backlog.entry(conn.key).or_default().push_front(conn);
    }
}

/// Connection counts of one worker id, over all its processes (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Handed to it.
    pub(crate) dispatched: u64,
    /// Acknowledged by it.
    pub(crate) acknowledged: u64,
    /// Given back by it (refused, busy, returned, or not acknowledged when it died).
    pub(crate) returned: u64,
    /// Handed to it and not acknowledged yet (its current processes).
    pub(crate) in_flight: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.dispatched += other.dispatched;
        self.acknowledged += other.acknowledged;
        self.returned += other.returned;
        self.in_flight += other.in_flight;
    }
}

/// What the data path has done so far (see [`Dispatch::counts`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Totals {
    /// By worker id.
    pub(crate) workers: std::collections::BTreeMap<u32, Counts>,
    /// Accepted, waiting in the master for a worker with room.
    pub(crate) backlog: u64,
    /// Failed `accept` calls (file descriptors exhausted and the like).
    pub(crate) accept_errors: u64,
    /// Each worker's window.
    pub(crate) window: usize,
}

struct State {
    targets: Vec<Target>,
    /// Counts of worker processes that are gone, by worker id.
    gone: std::collections::BTreeMap<u32, Counts>,
    cursor: usize,
    next_id: ConnId,
    backlog: Backlog,
    scratch: BytesMut,
}

#[derive(Clone, Copy)]
struct Limits {
    window: usize,
    /// Accepting resumes once some worker has at most this many connections in flight.
    low_water: usize,
    cap: Option<u64>,
    balancer: Balancer,
}

/// The dispatch table, shared by accept loops (hot path), channel readers (acknowledgements)
/// and the supervisor (workers coming and going). The lock is held only for short,
/// non-blocking work: sends use `try_send`.
pub(crate) struct Dispatch {
    state: Mutex<State>,
    /// Signalled whenever room may have appeared for a listener.
    room: Notify,
    limits: Limits,
    accept_errors: std::sync::atomic::AtomicU64,
}

impl Dispatch {
    pub(crate) fn new(window: usize, balancer: Balancer, cap: Option<u64>) -> Self {
        let window = window.max(1);
        Dispatch {
            state: Mutex::new(State {
                targets: Vec::new(),
                gone: std::collections::BTreeMap::new(),
                cursor: 0,
                next_id: 1,
                backlog: HashMap::new(),
                scratch: BytesMut::with_capacity(64 + MAX_FDS * 32),
            }),
            room: Notify::new(),
            limits: Limits { window, low_water: window - window / 4, cap, balancer },
            accept_errors: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Connection counts by worker id (processes gone and running), and the master's own.
    pub(crate) fn counts(&self) -> Totals {
        let state = self.state.lock().unwrap();
        let mut workers = state.gone.clone();
        for t in &state.targets {
            *workers.entry(t.id).or_default() += t.counts();
        }
        Totals {
            workers,
            backlog: state.backlog.values().map(|q| q.len() as u64).sum(),
            accept_errors: self.accept_errors.load(std::sync::atomic::Ordering::Relaxed),
            window: self.limits.window,
        }
    }

    pub(crate) fn add_worker(&self, serial: Serial, id: u32, channel: Arc<Channel>) {
        let target = Target {
            serial,
            id,
            channel,
            keys: Vec::new(),
            inflight: HashMap::new(),
            batch: Vec::new(),
            open: true,
            handled: 0,
            closed: 0,
            resting: None,
            sent: 0,
            acked: 0,
            returned: 0,
        };
        self.state.lock().unwrap().targets.push(target);
    }

    /// The worker accepts on `key` from now on.
    pub(crate) fn listening(&self, serial: Serial, key: ListenKey) {
        self.update(serial, |t, _| {
            if !t.keys.contains(&key) {
                t.keys.push(key);
            }
        });
    }

    /// The worker closed its listener for `key`; what it had in flight there comes back refused.
    pub(crate) fn unlisten(&self, serial: Serial, key: ListenKey) {
        self.update(serial, |t, _| t.keys.retain(|k| *k != key));
    }

    /// Sends the worker no more new connections (it is being retired).
    pub(crate) fn close(&self, serial: Serial) {
        self.update(serial, |t, _| t.open = false);
    }

    /// Connections handed to the worker and not yet acknowledged.
    pub(crate) fn inflight(&self, serial: Serial) -> usize {
        let state = self.state.lock().unwrap();
        state.targets.iter().find(|t| t.serial == serial).map_or(0, |t| t.inflight.len())
    }

    /// Connections the worker acknowledged so far.
    pub(crate) fn handled(&self, serial: Serial) -> u64 {
        let state = self.state.lock().unwrap();
        state.targets.iter().find(|t| t.serial == serial).map_or(0, |t| t.handled)
    }

    /// Whether accepted connections are waiting for a worker with room.
    pub(crate) fn backlog_empty(&self) -> bool {
        self.state.lock().unwrap().backlog.values().all(VecDeque::is_empty)
    }

    /// The worker's channel closed: every connection it had not acknowledged goes to others.
    pub(crate) fn remove_worker(&self, serial: Serial) {
        let mut state = self.state.lock().unwrap();
        let Some(i) = state.targets.iter().position(|t| t.serial == serial) else { return };
        let target = state.targets.remove(i);
        let mut counts = target.counts();
        // What it had in flight comes back to the master.
        counts.returned += counts.in_flight;
        counts.in_flight = 0;
        *state.gone.entry(target.id).or_default() += counts;
        let mut orphans: Vec<_> = target.inflight.into_iter().collect();
        orphans.sort_by_key(|(id, _)| *id);
        let n = orphans.len();
        requeue(&mut state.backlog, orphans.into_iter().map(|(_, conn)| conn));
        if n > 0 {
            note!(
                event = "redispatch",
                count = n,
                "re-dispatching {n} connection(s) the exited worker had not accepted"
            );
        }
        state.drain(&self.limits);
        drop(state);
        self.room.notify_waiters();
    }

    /// The worker now owns these connections: close the master's copies. It also noticed
    /// `closed` more of its connections closed.
    pub(crate) fn accepted(&self, serial: Serial, ids: &[ConnId], closed: u32) {
        self.update(serial, |t, _| {
            for id in ids {
                if t.inflight.remove(id).is_some() {
                    t.handled += 1;
                    t.acked += 1;
                }
            }
            t.closed = (t.closed + u64::from(closed)).min(t.handled);
        });
    }

    /// The worker closed `n` more of the connections it accepted.
    pub(crate) fn closed(&self, serial: Serial, n: u32) {
        self.update(serial, |t, _| t.closed = (t.closed + u64::from(n)).min(t.handled));
    }

    /// The worker will not serve these (it has no listener for them any more): hand them to
    /// another worker, and stop offering it their listeners.
    pub(crate) fn refused(&self, serial: Serial, ids: &[ConnId]) {
        self.update(serial, |t, backlog| {
            for key in t.take_back(ids, backlog) {
                t.keys.retain(|k| *k != key);
            }
        });
    }

    /// The worker acknowledged these connections but closed its listener before user code
    /// took them: the master owns them again and hands them to another worker.
    pub(crate) fn returned(&self, serial: Serial, key: ListenKey, conns: Vec<NewConn>) {
        let n = conns.len() as u64;
        let mut state = self.state.lock().unwrap();
        let State { targets, backlog, .. } = &mut *state;
        if let Some(t) = targets.iter_mut().find(|t| t.serial == serial) {
            note!(
                event = "given_back",
                id = t.id,
                count = n,
                "worker {} gave back {n} connection(s) it had acknowledged and not served",
                t.id
            );
            t.handled = t.handled.saturating_sub(n);
            t.returned += n;
            t.closed = t.closed.min(t.handled);
            t.keys.retain(|k| *k != key);
        }
        requeue(backlog, conns.into_iter().map(|c| Conn { key, socket: Socket::from(c.fd), peer: c.peer }));
        state.drain(&self.limits);
        drop(state);
        self.room.notify_waiters();
    }

    /// The worker could not take these connections (no free file descriptors): they go to
    /// other workers, and it gets none for a [`REST`].
    pub(crate) fn busy(&self, serial: Serial, ids: &[ConnId]) {
        self.update(serial, |t, backlog| {
            if t.resting.is_none() {
                warning!(
                    event = "busy",
                    id = t.id,
                    "worker {} has no free file descriptors; its connections go to other workers for a while",
                    t.id
                );
            }
            t.resting = Some(Instant::now());
            t.take_back(ids, backlog);
        });
    }

    /// Periodic: workers that rested long enough get connections again.
    pub(crate) fn tick(&self, now: Instant) {
        let mut state = self.state.lock().unwrap();
        let mut woke = false;
        for t in &mut state.targets {
            if t.resting.is_some_and(|since| now.duration_since(since) >= REST) {
                t.resting = None;
                woke = true;
            }
        }
        if woke {
            state.drain(&self.limits);
            drop(state);
            self.room.notify_waiters();
        }
    }

    /// Changes one worker's entry (and the backlog), then lets waiting connections move.
    fn update(&self, serial: Serial, f: impl FnOnce(&mut Target, &mut Backlog)) {
        let mut state = self.state.lock().unwrap();
        let State { targets, backlog, .. } = &mut *state;
        if let Some(t) = targets.iter_mut().find(|t| t.serial == serial) {
            f(t, backlog);
        }
        state.drain(&self.limits);
        drop(state);
        self.room.notify_waiters();
    }

    /// Hands a batch of connections accepted on one listener to workers (several per
    /// message when they go to the same worker); what finds no room waits in the backlog.
    fn dispatch(&self, key: ListenKey, conns: &mut Vec<Conn>) {
        let mut state = self.state.lock().unwrap();
        // Behind any connection already waiting, in accept order.
        state.backlog.entry(key).or_default().extend(conns.drain(..));
        state.drain_key(key, &self.limits);
    }

    /// How many connections workers can take for `key` now.
    fn room(&self, key: ListenKey) -> usize {
        let state = self.state.lock().unwrap();
        if !state.accepts(key, &self.limits) {
            return 0;
        }
        state.targets.iter().filter(|t| t.takes(key)).map(|t| t.room(&self.limits)).sum()
    }

    /// Waits until a worker can take connections for `key` (below the low-water mark of its
    /// window) and none is waiting for one.
    async fn wait_room(&self, key: ListenKey) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state.lock().unwrap().resumes(key, &self.limits) {
                return;
            }
            notified.await;
        }
    }
}

impl State {
    /// Puts `conn` in the batch of the worker the balancer picks, or gives it back if none
    /// can take it now.
    fn choose(&mut self, conn: Conn, limits: &Limits) -> Result<(), Conn> {
        let n = self.targets.len();
        let key = conn.key;
        let pick = match (limits.balancer, conn.peer) {
            (Balancer::Sticky, Some(peer)) => {
                // Rendezvous hashing over the worker ids that take this key: the client goes to
                // the highest score, whether or not it has room now (then it waits).
                let best = (0..n)
                    .filter(|i| self.targets[*i].takes(key))
                    .max_by_key(|i| (score(peer.ip(), self.targets[*i].id), self.targets[*i].serial));
                best.filter(|i| self.targets[*i].room(limits) > 0)
            }
            (Balancer::LeastConnections, _) => {
                // Closes are reported in batches, so loads are a little stale: loads within a
                // quarter of the least count as equal and take turns, instead of one worker
                // getting every connection until its next report.
                let open = |i: &usize| self.targets[*i].takes(key) && self.targets[*i].room(limits) > 0;
                let least = (0..n).filter(open).map(|i| self.targets[i].load()).min();
                least.and_then(|least| {
                    (0..n)
                        .map(|step| (self.cursor + step) % n)
                        .find(|i| open(i) && self.targets[*i].load() <= least + least / 4)
                })
            }
            _ => (0..n)
                .map(|step| (self.cursor + step) % n)
                .find(|i| self.targets[*i].takes(key) && self.targets[*i].room(limits) > 0),
        };
        let Some(i) = pick else { return Err(conn) };
        self.cursor = i + 1;
        let id = self.next_id;
        self.next_id += 1;
        self.targets[i].batch.push(Pending { id, conn });
        Ok(())
    }

    /// Sends every worker's batch for `key`, one message each. A batch that cannot be sent
    /// (socket buffer full, worker gone) goes back to the front of the backlog.
    fn flush(&mut self, key: ListenKey) {
        let State { targets, backlog, scratch, .. } = self;
        for t in targets.iter_mut().filter(|t| !t.batch.is_empty()) {
            scratch.clear();
            encode::newconn_header(scratch, key, t.batch.len());
            for p in &t.batch {
                encode::newconn_entry(scratch, p.id, p.conn.peer.as_ref());
            }
            match t.channel.try_send_with_fds(scratch, &t.batch) {
                Ok(()) => {
                    t.sent += t.batch.len() as u64;
                    t.inflight.extend(t.batch.drain(..).map(|p| (p.id, p.conn)));
                }
                Err(e) => {
                    // Socket buffer full: no room for now. Any other error: the worker is gone,
                    // and its reader will report the closed channel.
                    if e.kind() != io::ErrorKind::WouldBlock {
                        t.open = false;
                    }
                    requeue(backlog, t.batch.drain(..).map(|p| p.conn));
                }
            }
        }
    }

    /// Moves waiting connections to workers while there is room.
    fn drain(&mut self, limits: &Limits) {
        let keys: Vec<ListenKey> = self.backlog.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        for key in keys {
            self.drain_key(key, limits);
        }
    }

    /// Whether the accept loop of `key` may take more clients while some wait in the master:
    /// never under the balancers where a waiting connection means no worker has room; under
    /// `sticky`, where it waits only for its own worker, while fewer than [`STICKY_WAITING`] per
    /// worker wait (a hung worker's clients must not hold up the others' nor grow without end).
    fn accepts(&self, key: ListenKey, limits: &Limits) -> bool {
        let waiting = self.backlog.get(&key).map_or(0, VecDeque::len);
        waiting == 0 || (limits.balancer == Balancer::Sticky && waiting < STICKY_WAITING * self.targets.len().max(1))
    }

    /// Moves the connections waiting for `key` to workers while there is room, at most one
    /// message's worth per worker per pass. Under `sticky` a connection whose worker is full
    /// keeps its place while those behind it for other workers move on.
    fn drain_key(&mut self, key: ListenKey, limits: &Limits) {
        let skip = limits.balancer == Balancer::Sticky;
        loop {
            let mut moved = 0;
            let mut kept = VecDeque::new();
            while moved < MAX_FDS {
                let Some(conn) = self.backlog.get_mut(&key).and_then(VecDeque::pop_front) else { break };
                match self.choose(conn, limits) {
                    Ok(()) => moved += 1,
                    Err(conn) if skip => kept.push_back(conn),
                    Err(conn) => {
                        kept.push_back(conn);
                        break;
                    }
                }
            }
            requeue(&mut self.backlog, kept);
            let waiting = self.backlog.get(&key).map_or(0, VecDeque::len);
            self.flush(key);
            // Stop when nothing moved, or when the flush gave connections back.
            if moved < MAX_FDS || self.backlog.get(&key).map_or(0, VecDeque::len) > waiting {
                break;
            }
        }
    }

    /// Whether an accept loop paused for `key` should resume.
    fn resumes(&self, key: ListenKey, limits: &Limits) -> bool {
        self.accepts(key, limits)
            && self
                .targets
                .iter()
                .any(|t| t.takes(key) && t.room(limits) > 0 && t.inflight.len() + t.batch.len() <= limits.low_water)
    }
}

/// The rendezvous score of a client address for a worker id.
fn score(ip: IpAddr, id: u32) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    // A fixed hasher: the same client maps to the same worker id across master restarts.
    BuildHasherDefault::<DefaultHasher>::default().hash_one((ip, id))
}

/// Binds a UDP socket the workers share (or, with `reuseport`, one of a worker's own):
/// SO_REUSEADDR, non-blocking, close-on-exec.
pub(crate) fn bind_udp(addr: SocketAddr, reuseport: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuseport)?;
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Binds a listening socket the way the master shares it: SO_REUSEADDR, non-blocking,
/// close-on-exec.
pub(crate) fn bind_tcp(addr: SocketAddr, backlog: i32, reuseport: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuseport)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// The master's accept threads: the runtime's own thread, plus `accept_threads − 1` threads
/// started when the first socket needs them, each running a single-threaded runtime with its
/// own reactor. Each thread runs one accept loop per listening socket (on its own duplicate of
/// the socket), and all of them share the one dispatch table.
pub(crate) struct AcceptThreads {
    extra: usize,
    /// See [`gathering`].
    gather: Duration,
    handles: std::sync::OnceLock<Vec<tokio::runtime::Handle>>,
}

/// The accept loops of one listening socket, one per accept thread.
pub(crate) struct Accepting {
    own: JoinHandle<()>,
    others: Vec<JoinHandle<()>>,
    /// Held (read) by the other threads' loops while they accept and dispatch; [`stop`]
    /// takes it (write), so that once it returns no loop of another thread accepts any more.
    /// The runtime's own loop needs none: it is aborted on its own thread, between two polls.
    ///
    /// [`stop`]: Accepting::stop
    open: Arc<std::sync::RwLock<bool>>,
}

impl AcceptThreads {
    pub(crate) fn new(accept_threads: usize, gather: Duration) -> Self {
        AcceptThreads { extra: accept_threads.saturating_sub(1), gather, handles: std::sync::OnceLock::new() }
    }

    /// Starts accepting on `socket` on every accept thread.
    pub(crate) fn start(&self, socket: &Arc<AsyncFd<Socket>>, key: ListenKey, dispatch: &Arc<Dispatch>) -> Accepting {
        let open = Arc::new(std::sync::RwLock::new(true));
        let gather = self.gather;
        let own = tokio::spawn(accept_loop(socket.clone(), key, dispatch.clone(), gather, None));
        let mut others = Vec::new();
        for handle in self.handles() {
            let (dispatch, open) = (dispatch.clone(), open.clone());
            // Registered with that thread's reactor, so the duplicate is made here and
            // registered there.
            match socket.get_ref().try_clone() {
                Ok(dup) => others.push(handle.spawn(async move {
                    match sys::watch(dup) {
                        Ok(dup) => accept_loop(Arc::new(dup), key, dispatch, gather, Some(open)).await,
                        Err(e) => warning!(event = "accept_thread_failed", key, error = %e, "an accept thread cannot watch listener {key}: {e}"),
                    }
                })),
                Err(e) => {
                    warning!(event = "accept_thread_failed", key, error = %e, "an accept thread cannot share listener {key}: {e}")
                }
            }
        }
        Accepting { own, others, open }
    }

    fn handles(&self) -> &[tokio::runtime::Handle] {
        self.handles.get_or_init(|| {
            let handles: Vec<_> = (1..=self.extra).filter_map(start_thread).collect();
            if !handles.is_empty() {
                note!(
                    event = "accept_threads",
                    count = handles.len() + 1,
                    "accepting on {} threads",
                    handles.len() + 1
                );
            }
            handles
        })
    }
}

/// Starts accept thread `i` (1-based; the runtime's own thread is 0): a single-threaded
/// runtime that runs until the process exits.
fn start_thread(i: usize) -> Option<tokio::runtime::Handle> {
    let started = tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|rt| {
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name(format!("accept-{i}"))
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .map(|_| handle)
    });
    started
        .inspect_err(|e| warning!(event = "accept_thread_failed", error = %e, "cannot start accept thread {i}: {e}"))
        .ok()
}

impl Accepting {
    /// Stops every loop: none accepts once this returns.
    pub(crate) fn stop(self) {
        self.own.abort();
        *self.open.write().unwrap_or_else(|e| e.into_inner()) = false;
        for task in self.others {
            task.abort();
        }
    }
}

/// How one pass over a listener's queue ended.
enum Pass {
    /// The queue is empty, or workers have no more room: this many were taken.
    Done(usize),
    /// `accept` failed (file descriptors exhausted and the like).
    Failed(io::Error),
    /// The listener was shut down or its loop stopped: nothing more to accept.
    Closed,
}

/// While passes come this many gathering times apart or closer, connections are arriving
/// fast enough for gathering to pay (see [`gathering`]).
const GATHER_WHEN_CLOSER: u32 = 10;

/// How long to let connections gather before the next pass over a listener's queue, after a
/// pass at `now` that took `took` connections; `previous` is when the pass before ended.
///
/// Every pass costs the master a wake-up (the kernel's scheduler, its reactor, the tasks it
/// runs), and on a busy machine that is most of what a connection costs it: passes that find
/// one or two connections each make `rr` spend more CPU per connection than anything else.
/// Waiting a little after a pass lets the next one take several, sent in fewer messages, and
/// the acknowledgements that came meanwhile are read in one go too. It only starts once
/// connections keep coming: the pass took some, and the one before ended less than
/// [`GATHER_WHEN_CLOSER`] gathering times ago, so a connection that arrives alone is never
/// held, and one that arrives during a gathering waits at most `gather`.
fn gathering(gather: Duration, took: usize, previous: Option<Instant>, now: Instant) -> Option<Duration> {
    let recent = previous.is_some_and(|then| now.saturating_duration_since(then) < gather * GATHER_WHEN_CLOSER);
    (!gather.is_zero() && took > 0 && recent).then_some(gather)
}

thread_local! {
    /// When a gathering on this thread last ended.
    static GATHERED: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Lets connections gather for `wait`, on this thread, not on a timer: the runtime's timers
/// tick in milliseconds, and the point is that nothing wakes the thread meanwhile. The other
/// tasks of the thread wait at most this long. The accept loops of several busy listeners on
/// one thread share one gathering: a loop whose thread gathered less than `wait` ago goes on.
fn gather_on_this_thread(wait: Duration, now: Instant) {
    if GATHERED.get().is_some_and(|ended| now.saturating_duration_since(ended) < wait) {
        return;
    }
    std::thread::sleep(wait);
    GATHERED.set(Some(Instant::now()));
}

/// Accepts connections on one listening socket and dispatches them, while workers have room:
/// as many as they can take (up to one message's worth) per lock of the table. `gather`: see
/// [`gathering`]; `open`: see [`Accepting`].
async fn accept_loop(
    listener: Arc<AsyncFd<Socket>>,
    key: ListenKey,
    dispatch: Arc<Dispatch>,
    gather: Duration,
    open: Option<Arc<std::sync::RwLock<bool>>>,
) {
    let mut batch: Vec<Conn> = Vec::with_capacity(MAX_FDS);
    let mut failing: Option<(Instant, u64)> = None;
    let mut previous: Option<Instant> = None;
    loop {
        dispatch.wait_room(key).await;
        let Ok(mut ready) = listener.readable().await else { return };
        let pass = match &open {
            None => take(&mut ready, key, &dispatch, &mut batch),
            Some(open) => {
                let open = open.read().unwrap_or_else(|e| e.into_inner());
                if *open { take(&mut ready, key, &dispatch, &mut batch) } else { Pass::Closed }
            }
        };
        match pass {
            Pass::Closed => return,
            Pass::Failed(e) => {
                dispatch.accept_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // EMFILE / ENFILE and the like: the client stays in the kernel's queue. Back
                // off instead of spinning, and say so once per episode, not per attempt.
                match &mut failing {
                    Some((_, n)) => *n += 1,
                    None => {
                        warning!(event = "accept_error", key, error = %e, "accept error on listener {key}: {e}; retrying every 100 ms until it clears");
                        failing = Some((Instant::now(), 1));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Pass::Done(took) => {
                let now = Instant::now();
                if let Some(wait) = gathering(gather, took, previous, now) {
                    gather_on_this_thread(wait, now);
                }
                previous = Some(now);
                if let Some((since, n)) = failing.take() {
                    let secs = since.elapsed().as_secs_f64();
                    note!(
                        event = "accept_recovered",
                        key,
                        failed = n,
                        "accepts on listener {key} work again after {secs:.1}s ({n} failed attempts)"
                    );
                }
            }
        }
    }
}

/// Drains the kernel's queue while workers have room: accepts as many as they can take (up to
/// one message's worth) and dispatches them, until the queue is empty or the room is gone.
fn take(
    ready: &mut tokio::io::unix::AsyncFdReadyGuard<'_, Socket>,
    key: ListenKey,
    dispatch: &Dispatch,
    batch: &mut Vec<Conn>,
) -> Pass {
    let mut took = 0;
    loop {
        let room = dispatch.room(key).min(MAX_FDS);
        if room == 0 {
            return Pass::Done(took);
        }
        let mut error = None;
        while batch.len() < room {
            match ready.try_io(|l| sys::accept(l.get_ref())) {
                Ok(Ok((socket, peer))) => batch.push(Conn { key, socket, peer: peer.as_socket() }),
                Ok(Err(e)) if is_connection_error(&e) => {}
                Ok(Err(e)) => {
                    error = Some(e);
                    break;
                }
                Err(_would_block) => break,
            }
        }
        let full = batch.len() == room;
        took += batch.len();
        if !batch.is_empty() {
            dispatch.dispatch(key, batch);
        }
        match error {
            // Shut down: the master is closing this socket, and its loops are being stopped.
            Some(e) if e.kind() == io::ErrorKind::InvalidInput => return Pass::Closed,
            Some(e) => return Pass::Failed(e),
            None if !full => return Pass::Done(took),
            None => {}
        }
    }
}

/// Takes every connection the kernel has already completed on `listener` (clients that are
/// connected but not yet accepted) and queues them for workers, so that closing the socket
/// right after resets nobody who was already let in.
pub(crate) fn sweep(listener: &AsyncFd<Socket>, key: ListenKey, dispatch: &Dispatch) -> usize {
    let mut n = 0;
    let mut batch = Vec::new();
    loop {
        match sys::accept(listener.get_ref()) {
            Ok((socket, peer)) => {
                batch.push(Conn { key, socket, peer: peer.as_socket() });
                n += 1;
            }
            Err(e) if is_connection_error(&e) => {}
            Err(_) => break,
        }
    }
    dispatch.dispatch(key, &mut batch);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Duration = Duration::from_micros(100);

    #[test]
    fn connections_gather_only_while_they_keep_coming() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        // The first pass after a quiet spell, and a lone connection long after the last
        // pass, go out at once and hold nothing after them.
        assert_eq!(gathering(G, 1, None, at(0)), None);
        assert_eq!(gathering(G, 1, Some(at(0)), at(5_000)), None);
        assert_eq!(gathering(G, 3, Some(at(0)), at(1_000)), None, "ten gathering times apart is not close");
        // Passes close together: wait one gathering time before the next.
        assert_eq!(gathering(G, 1, Some(at(0)), at(999)), Some(G));
        assert_eq!(gathering(G, 64, Some(at(0)), at(150)), Some(G));
        // A pass that took nothing (a spurious wake, or no room) waits for nothing.
        assert_eq!(gathering(G, 0, Some(at(0)), at(50)), None);
        // Off.
        assert_eq!(gathering(Duration::ZERO, 5, Some(at(0)), at(1)), None);
        // The threshold scales with the setting.
        let g = Duration::from_micros(500);
        assert_eq!(gathering(g, 1, Some(at(0)), at(4_999)), Some(g));
        assert_eq!(gathering(g, 1, Some(at(0)), at(5_000)), None);
    }
}
