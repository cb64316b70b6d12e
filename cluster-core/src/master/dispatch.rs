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
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use socket2::{Domain, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::ipc::Channel;
use crate::ipc::message::{ConnId, ListenKey, encode};
use crate::log::log;
use crate::net::is_connection_error;

/// Internal id of one worker process: a serial number, unique and never reused (worker ids are reused by replacements).
pub(crate) type Serial = u64;

/// A connection accepted by the master and not yet owned by a worker.
struct Conn {
    key: ListenKey,
    socket: Socket,
    /// `None` for a Unix socket peer.
    peer: Option<SocketAddr>,
}

/// Where connections can go: one entry per worker process whose channel is open.
struct Target {
    serial: Serial,
    channel: Arc<Channel>,
    /// Listeners this worker accepts on.
    keys: Vec<ListenKey>,
    /// Handed over, not yet acknowledged. The master's copy of each fd lives here.
    inflight: HashMap<ConnId, Conn>,
    /// False once the worker is retiring: it gets no new connections.
    open: bool,
    /// Connections this worker acknowledged so far.
    handled: u64,
}

struct State {
    targets: Vec<Target>,
    cursor: usize,
    next_id: ConnId,
    /// Accepted connections waiting for a worker with room, per listener.
    backlog: HashMap<ListenKey, VecDeque<Conn>>,
    scratch: BytesMut,
}

/// The dispatch table, shared by accept loops (hot path), channel readers (acknowledgements)
/// and the supervisor (workers coming and going). The lock is held only for short,
/// non-blocking work: sends use `try_send`.
pub(crate) struct Dispatch {
    state: Mutex<State>,
    /// Signalled whenever room may have appeared for a listener.
    room: Notify,
    window: usize,
}

impl Dispatch {
    pub(crate) fn new(window: usize) -> Self {
        Dispatch {
            state: Mutex::new(State {
                targets: Vec::new(),
                cursor: 0,
                next_id: 1,
                backlog: HashMap::new(),
                scratch: BytesMut::with_capacity(64),
            }),
            room: Notify::new(),
            window: window.max(1),
        }
    }

    pub(crate) fn add_worker(&self, serial: Serial, channel: Arc<Channel>) {
        let target = Target { serial, channel, keys: Vec::new(), inflight: HashMap::new(), open: true, handled: 0 };
        self.state.lock().unwrap().targets.push(target);
    }

    /// The worker accepts on `key` from now on.
    pub(crate) fn listening(&self, serial: Serial, key: ListenKey) {
        self.update(serial, |t| {
            if !t.keys.contains(&key) {
                t.keys.push(key);
            }
        });
    }

    /// The worker closed its listener for `key`; what it had in flight there comes back refused.
    pub(crate) fn unlisten(&self, serial: Serial, key: ListenKey) {
        self.update(serial, |t| t.keys.retain(|k| *k != key));
    }

    /// Sends the worker no more new connections (it is being retired).
    pub(crate) fn close(&self, serial: Serial) {
        self.update(serial, |t| t.open = false);
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
        let mut orphans: Vec<_> = target.inflight.into_iter().collect();
        orphans.sort_by_key(|(id, _)| *id);
        let n = orphans.len();
        for (_, conn) in orphans.into_iter().rev() {
            state.backlog.entry(conn.key).or_default().push_front(conn);
        }
        if n > 0 {
            log!("re-dispatching {n} connection(s) the exited worker had not accepted");
        }
        state.drain(self.window);
        drop(state);
        self.room.notify_waiters();
    }

    /// The worker now owns these connections: close the master's copies.
    pub(crate) fn accepted(&self, serial: Serial, ids: &[ConnId]) {
        self.update(serial, |t| {
            for id in ids {
                if t.inflight.remove(id).is_some() {
                    t.handled += 1;
                }
            }
        });
    }

    /// The worker will not serve these: hand them to another worker.
    pub(crate) fn refused(&self, serial: Serial, ids: &[ConnId]) {
        let mut state = self.state.lock().unwrap();
        let State { targets, backlog, .. } = &mut *state;
        if let Some(t) = targets.iter_mut().find(|t| t.serial == serial) {
            for id in ids.iter().rev() {
                if let Some(conn) = t.inflight.remove(id) {
                    // It has no listener for this key any more; stop offering it.
                    t.keys.retain(|k| *k != conn.key);
                    backlog.entry(conn.key).or_default().push_front(conn);
                }
            }
        }
        state.drain(self.window);
        drop(state);
        self.room.notify_waiters();
    }

    fn update(&self, serial: Serial, f: impl FnOnce(&mut Target)) {
        let mut state = self.state.lock().unwrap();
        if let Some(t) = state.targets.iter_mut().find(|t| t.serial == serial) {
            f(t);
        }
        state.drain(self.window);
        drop(state);
        self.room.notify_waiters();
    }

    fn dispatch(&self, conn: Conn) {
        let mut state = self.state.lock().unwrap();
        let key = conn.key;
        let queued = state.backlog.get(&key).is_some_and(|q| !q.is_empty());
        if queued {
            state.backlog.entry(key).or_default().push_back(conn);
        } else if let Err(conn) = state.place(conn, self.window) {
            state.backlog.entry(key).or_default().push_back(conn);
        }
    }

    /// Waits until a worker can take a connection for `key` and none is waiting for one.
    async fn wait_room(&self, key: ListenKey) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state.lock().unwrap().has_room(key, self.window) {
                return;
            }
            notified.await;
        }
    }
}

impl State {
    /// Hands `conn` to the next worker (round-robin) that listens on its key and has room.
    fn place(&mut self, conn: Conn, window: usize) -> Result<(), Conn> {
        let n = self.targets.len();
        for step in 0..n {
            let i = (self.cursor + step) % n;
            let t = &mut self.targets[i];
            if !t.open || t.inflight.len() >= window || !t.keys.contains(&conn.key) {
                continue;
            }
            let id = self.next_id;
            self.scratch.clear();
            encode::newconn_header(&mut self.scratch, conn.key, 1);
            encode::newconn_entry(&mut self.scratch, id, conn.peer.as_ref());
            match t.channel.try_send_with_fds(&self.scratch, &[conn.socket.as_fd()]) {
                Ok(()) => {
                    self.next_id += 1;
                    t.inflight.insert(id, conn);
                    self.cursor = i + 1;
                    return Ok(());
                }
                // Socket buffer full: treat as no room. Any other error: the worker is gone,
                // and its reader will report the closed channel.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => t.open = false,
            }
        }
        Err(conn)
    }

    /// Moves waiting connections to workers while there is room.
    fn drain(&mut self, window: usize) {
        let keys: Vec<ListenKey> = self.backlog.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        for key in keys {
            while let Some(conn) = self.backlog.get_mut(&key).and_then(VecDeque::pop_front) {
                if let Err(conn) = self.place(conn, window) {
                    self.backlog.entry(key).or_default().push_front(conn);
                    break;
                }
            }
        }
    }

    fn has_room(&self, key: ListenKey, window: usize) -> bool {
        self.backlog.get(&key).is_none_or(VecDeque::is_empty)
            && self.targets.iter().any(|t| t.open && t.inflight.len() < window && t.keys.contains(&key))
    }
}

/// Binds a UDP socket the workers share: SO_REUSEADDR, non-blocking, close-on-exec.
pub(crate) fn bind_udp(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Binds a listening socket the way the master shares it: SO_REUSEADDR, non-blocking,
/// close-on-exec.
pub(crate) fn bind_tcp(addr: SocketAddr, backlog: i32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Accepts connections on one listening socket and dispatches them, while workers have room.
pub(crate) async fn accept_loop(listener: Arc<AsyncFd<Socket>>, key: ListenKey, dispatch: Arc<Dispatch>) {
    loop {
        dispatch.wait_room(key).await;
        let Ok(mut ready) = listener.readable().await else { return };
        // Drain the kernel's queue while workers have room, then wait for readiness again.
        loop {
            match ready.try_io(|l| l.get_ref().accept()) {
                Ok(Ok((socket, peer))) => {
                    dispatch.dispatch(Conn { key, socket, peer: peer.as_socket() });
                    if !dispatch.state.lock().unwrap().has_room(key, dispatch.window) {
                        break;
                    }
                }
                Ok(Err(e)) if is_connection_error(&e) => {}
                Ok(Err(e)) => {
                    // EMFILE / ENFILE and the like: back off instead of spinning.
                    log!("accept error on listener {key}: {e}; pausing accepts for 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
                Err(_would_block) => break,
            }
        }
    }
}

/// Takes every connection the kernel has already completed on `listener` (clients that are
/// connected but not yet accepted) and queues them for workers, so that closing the socket
/// right after resets nobody who was already let in.
pub(crate) fn sweep(listener: &AsyncFd<Socket>, key: ListenKey, dispatch: &Dispatch) -> usize {
    let mut n = 0;
    loop {
        match listener.get_ref().accept() {
            Ok((socket, peer)) => {
                dispatch.dispatch(Conn { key, socket, peer: peer.as_socket() });
                n += 1;
            }
            Err(e) if is_connection_error(&e) => {}
            Err(_) => return n,
        }
    }
}
