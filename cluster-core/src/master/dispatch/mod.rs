//! The dispatch table: which worker gets each connection the master accepted, and the
//! master's copy of it until that worker acknowledges it.
//!
//! socket → `accept.rs` (the accept loops, on threads of their own) → [`Dispatch::dispatch`] →
//! `balance.rs` picks a worker → `NewConn` + fd over the worker's channel.
//!
//! The master keeps its copy of every connection it hands over until that worker
//! acknowledges it (`Accepted`). If the worker refuses it or its channel closes first (it died),
//! the connection goes back to the front of the backlog and on to another worker: no accepted
//! connection is lost or left hanging. Each worker has a window of unacknowledged connections;
//! when every worker's window is full, accept loops stop accepting and the kernel's listen
//! backlog holds new clients.

mod accept;
mod balance;
mod gate;

use balance::Seen;

pub(super) use accept::{AcceptThreads, Accepting, sweep};

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use socket2::Socket;
use tokio::sync::Notify;

use super::types::Serial;
use crate::config::Balancer;
use crate::ipc::Channel;
use crate::ipc::encode;
use crate::ipc::message::{ConnId, ListenKey, MAX_FDS, NewConn};
use crate::log::{note, warning};

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
        let key = conn.key;
        let seen = |i: usize| {
            let t = &self.targets[i];
            Seen { id: t.id, serial: t.serial, takes: t.takes(key), room: t.room(limits), load: t.load() }
        };
        let client = conn.peer.map(|peer| peer.ip());
        let pick = balance::pick(limits.balancer, client, self.cursor, self.targets.len(), seen);
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
