//! The sockets the master owns: binding them for workers (once per address, or once per worker
//! id under `reuseport`), and closing them without resetting a client the kernel let in.
//!
//! Closing a TCP listening socket resets every client in its accept queue and every handshake
//! still under way on it, so a socket is never just closed: it is drained ([`Draining`], and
//! `drain.rs`, which decides when it may be shut down).

mod drain;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use socket2::{Domain, Socket, Type};

use self::drain::{Drain, Verdict};
use super::dispatch::{self, AcceptThreads, Accepting, Dispatch};
use super::systemd;
use super::upgrade;
use crate::config::{Config, Policy};
use crate::ipc::message::{Endpoint, ListenKey};
use crate::log::{log, note, warning};
use crate::messaging::Peer;
use crate::sys;

/// The master's sockets.
pub(super) struct Listeners {
    cfg: Arc<Config>,
    dispatch: Arc<Dispatch>,
    open: HashMap<ListenKey, Listener>,
    /// Sockets by (endpoint, port-0 index, worker id under `reuseport` else 0).
    by_addr: HashMap<(Endpoint, u32, u32), ListenKey>,
    /// Under `reuseport`, the address the first socket of (endpoint, index) got, so that
    /// every worker's socket binds the same port.
    reuseport_addr: HashMap<(Endpoint, u32), SocketAddr>,
    /// TCP sockets being closed. See [`Draining`].
    draining: Vec<Draining>,
    next_key: ListenKey,
    /// Sockets passed by the service manager and not asked for yet.
    inherited: Vec<systemd::Inherited>,
    /// Endpoints served by an inherited socket: every worker gets that one socket.
    adopted: Vec<Endpoint>,
    /// Sockets handed over by the master this one replaces (`upgrade.rs`), by the same
    /// (endpoint, index, owner) as `by_addr`, not asked for yet.
    handed: HashMap<(Endpoint, u32, u32), Socket>,
    /// Whether this master accepts on its sockets; false in a new master until its predecessor
    /// hands over (a connection it took before could be lost with it if the upgrade failed).
    live: bool,
    /// The threads that run accept loops (`accept_threads`).
    threads: Arc<AcceptThreads>,
}

/// Who else holds a socket, and so what letting go of it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// This master alone: drained, then shut down, when it stops listening.
    Own,
    /// The service manager keeps its own copy: never shut down or drained (that would act on
    /// the manager's socket too); the master only lets go of it.
    Systemd,
    /// The other master of an upgrade serves it too: only let go of, like `Systemd`.
    Upgrade,
}

/// A socket the master owns.
struct Listener {
    /// Bound address (none for Unix sockets).
    addr: Option<SocketAddr>,
    kind: Kind,
    /// A Unix socket's file, removed when the master stops listening.
    unix_path: Option<PathBuf>,
    keep: Keep,
}

enum Kind {
    /// The master accepts and dispatches connections (once it is live: see `Listeners::live`).
    Stream { socket: Socket, accepting: Option<Accepting> },
    /// Workers get the socket itself and use it directly: UDP, and TCP under the `shared` and
    /// `reuseport` policies.
    Handed(Socket),
}

impl Listeners {
    pub(super) fn new(cfg: Arc<Config>, dispatch: Arc<Dispatch>, threads: Arc<AcceptThreads>) -> Self {
        Listeners {
            threads,
            cfg,
            dispatch,
            open: HashMap::new(),
            by_addr: HashMap::new(),
            reuseport_addr: HashMap::new(),
            draining: Vec::new(),
            next_key: 1,
            inherited: systemd::inherited(),
            adopted: Vec::new(),
            handed: HashMap::new(),
            live: true,
        }
    }

    /// The sockets a new master gets from its predecessor (`upgrade.rs`): it accepts on none
    /// of them until [`take_over`](Self::take_over).
    pub(super) fn adopt_handed(&mut self, sockets: Vec<upgrade::Listener>) {
        self.live = false;
        for socket in sockets {
            match socket {
                upgrade::Listener::Own { endpoint, index, owner, socket } => {
                    self.handed.insert((endpoint, index, owner), socket);
                }
                upgrade::Listener::Systemd(inherited) => self.inherited.push(inherited),
            }
        }
    }

    /// The predecessor has exited: the sockets it handed over are this master's alone.
    pub(super) fn own_handed(&mut self) {
        for listener in self.open.values_mut() {
            if listener.keep == Keep::Upgrade {
                listener.keep = Keep::Own;
            }
        }
    }

    /// Duplicates of every socket this master listens on, described for a successor
    /// (`upgrade.rs`). Sockets being closed are not handed over.
    pub(super) fn hand_out(&self) -> io::Result<Vec<upgrade::Listener>> {
        let mut out = Vec::new();
        for ((endpoint, index, owner), key) in &self.by_addr {
            let listener = &self.open[key];
            let socket = listener.kind.socket().try_clone()?;
            out.push(match listener.keep {
                Keep::Systemd => upgrade::Listener::Systemd(systemd::Inherited::describe(socket, "upgrade")?),
                Keep::Own | Keep::Upgrade => {
                    upgrade::Listener::Own { endpoint: endpoint.clone(), index: *index, owner: *owner, socket }
                }
            });
        }
        for i in &self.inherited {
            out.push(upgrade::Listener::Systemd(systemd::Inherited::describe(i.socket.try_clone()?, &i.name)?));
        }
        Ok(out)
    }

    /// The successor took over: from now on this master only lets go of its sockets (their
    /// queues are the successor's), and removes no socket file.
    pub(super) fn handed_over(&mut self) {
        for listener in self.open.values_mut() {
            if listener.keep == Keep::Own {
                listener.keep = Keep::Upgrade;
            }
        }
    }

    /// The predecessor handed over: accept on the sockets it handed; say which ones no worker
    /// asked for (they close when it exits).
    pub(super) fn take_over(&mut self) {
        self.live = true;
        for (key, listener) in &mut self.open {
            if let Kind::Stream { socket, accepting: accepting @ None } = &mut listener.kind {
                *accepting = Some(self.threads.start(socket, *key, &self.dispatch));
            }
        }
        for ((endpoint, _, _), _) in self.handed.drain() {
            warning!(event = "handed_unused", addr = %endpoint, "socket {endpoint} handed over by the old master: no worker listens on it any more");
        }
    }

    /// Says which inherited sockets no worker asked for (once the first workers are ready).
    pub(super) fn report_unused(&mut self) {
        for i in &self.inherited {
            warning!(event = "inherited_unused", addr = %i.kind, name = %i.name, "socket {} ({}) passed by the service manager: no worker listens on it", i.kind, i.name);
        }
    }

    /// The inherited socket for `endpoint`, if the service manager passed one.
    fn take_inherited(&mut self, endpoint: &Endpoint) -> Option<systemd::Inherited> {
        let at = self.inherited.iter().position(|i| i.kind.serves(endpoint))?;
        Some(self.inherited.remove(at))
    }

    /// The key and address of the socket for `endpoint` that worker `id` asked for, bound on
    /// first use. With `stopping`, nothing new is bound.
    pub(super) fn listen(
        &mut self,
        endpoint: Endpoint,
        index: u32,
        id: u32,
        stopping: bool,
    ) -> io::Result<(ListenKey, Option<SocketAddr>)> {
        let index = if endpoint.is_port_zero() { index } else { 0 };
        // An address the service manager passed a socket for is served by that one socket,
        // under every policy: under `reuseport` too, since the kernel lets a socket join a
        // port's group only if it was set up for it before binding, and the clients queued on
        // the inherited socket must be served (README, "Deploying").
        let inherited = self.adopted.contains(&endpoint) || self.inherited.iter().any(|i| i.kind.serves(&endpoint));
        let reuseport =
            !inherited && self.cfg.policy == Policy::ReusePort && !matches!(endpoint, Endpoint::Unix { .. });
        let lookup = (endpoint, index, if reuseport { id } else { 0 });
        if let Some(key) = self.by_addr.get(&lookup) {
            return Ok((*key, self.open[key].addr));
        }
        if stopping {
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        }
        let key = self.next_key;
        if let Some(socket) = self.handed.remove(&lookup) {
            // The old master's file, removed when this master stops listening on it.
            let unix_path = match &lookup.0 {
                Endpoint::Unix { path, .. } => Some(path.clone()),
                _ => None,
            };
            let listener = self.adopt(&lookup.0, socket, key, Keep::Upgrade, unix_path)?;
            let shown = shown(&lookup.0, listener.addr);
            note!(event = "bind", key, addr = %shown, handed = true, "listening on {shown} (handed over by the old master)");
            if reuseport && let Some(addr) = listener.addr {
                self.reuseport_addr.entry((lookup.0.clone(), index)).or_insert(addr);
            }
            return Ok(self.insert(key, lookup, listener));
        }
        if let Some(passed) = self.take_inherited(&lookup.0) {
            let shown = passed.kind.to_string();
            let listener = self.adopt(&lookup.0, passed.socket, key, Keep::Systemd, None)?;
            if self.cfg.policy == Policy::ReusePort {
                note!(event = "bind", key, addr = %shown, inherited = true, "listening on {shown} (the service manager's socket, shared by every worker: reuseport cannot apply to it)");
            } else {
                note!(event = "bind", key, addr = %shown, inherited = true, "listening on {shown} (the service manager's socket)");
            }
            self.adopted.push(lookup.0.clone());
            return Ok(self.insert(key, lookup, listener));
        }
        let group = (lookup.0.clone(), index);
        let at = |addr: &SocketAddr| self.reuseport_addr.get(&group).copied().unwrap_or(*addr);
        let listener = match &lookup.0 {
            Endpoint::Tcp(addr) => {
                let socket = bind_tcp(at(addr), self.cfg.backlog, reuseport)?;
                let bound = socket.local_addr()?.as_socket();
                if reuseport || self.cfg.policy == Policy::Shared {
                    Listener { addr: bound, kind: Kind::Handed(socket), unix_path: None, keep: Keep::Own }
                } else {
                    self.stream_listener(socket, key, bound, None)?
                }
            }
            Endpoint::Unix { path, mode } => {
                // With CLUSTER_USER, the workers' user owns the file, so that its mode means what
                // it says for them, and a worker gets no more than it could do itself.
                let socket = crate::net::bind_unix(path, *mode, self.cfg.backlog, self.cfg.credentials.as_deref())?;
                self.stream_listener(socket, key, None, Some(path.clone()))?
            }
            Endpoint::Udp(addr) => {
                let socket = bind_udp(at(addr), reuseport)?;
                let bound = socket.local_addr()?.as_socket();
                Listener { addr: bound, kind: Kind::Handed(socket), unix_path: None, keep: Keep::Own }
            }
        };
        let shown = shown(&lookup.0, listener.addr);
        if reuseport {
            note!(event = "bind", key, addr = %shown, owner = id, "listening on {shown} (SO_REUSEPORT socket of {})", Peer::from_wire(id));
            if let Some(addr) = listener.addr {
                self.reuseport_addr.entry(group).or_insert(addr);
            }
        } else {
            note!(event = "bind", key, addr = %shown, "listening on {shown}");
        }
        Ok(self.insert(key, lookup, listener))
    }

    /// A socket this master did not bind (handed over by the old master, or passed by the
    /// service manager) as the listener for `endpoint`: the master accepts on it under `rr` and
    /// for Unix sockets, workers get it otherwise.
    fn adopt(
        &self,
        endpoint: &Endpoint,
        socket: Socket,
        key: ListenKey,
        keep: Keep,
        unix_path: Option<PathBuf>,
    ) -> io::Result<Listener> {
        let addr = socket.local_addr()?.as_socket();
        let stream = match endpoint {
            Endpoint::Unix { .. } => true,
            Endpoint::Tcp(_) => self.cfg.policy == Policy::Rr,
            Endpoint::Udp(_) => false,
        };
        let mut listener = if stream {
            self.stream_listener(socket, key, addr, unix_path)?
        } else {
            Listener { addr, kind: Kind::Handed(socket), unix_path: None, keep }
        };
        listener.keep = keep;
        Ok(listener)
    }

    /// Records listener `key` (the next key) for `lookup`.
    fn insert(
        &mut self,
        key: ListenKey,
        lookup: (Endpoint, u32, u32),
        listener: Listener,
    ) -> (ListenKey, Option<SocketAddr>) {
        debug_assert_eq!(key, self.next_key);
        self.next_key += 1;
        let addr = listener.addr;
        self.open.insert(key, listener);
        self.by_addr.insert(lookup, key);
        (key, addr)
    }

    /// A duplicate of the socket `key`, for sockets workers use directly.
    pub(super) fn shared_fd(&self, key: ListenKey) -> Option<OwnedFd> {
        match &self.open.get(&key)?.kind {
            Kind::Handed(socket) => socket.try_clone().ok().map(OwnedFd::from),
            Kind::Stream { .. } => None,
        }
    }

    /// What the master listens on, as `tcp 127.0.0.1:8080`, `udp …`, `unix /path` (one line per
    /// address, however many sockets `reuseport` has for it).
    pub(super) fn addresses(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .by_addr
            .iter()
            .filter_map(|((endpoint, _, _), key)| {
                let listener = self.open.get(key)?;
                Some(match (endpoint, listener.addr) {
                    (Endpoint::Tcp(_), Some(addr)) => format!("tcp {addr}"),
                    (Endpoint::Udp(_), Some(addr)) => format!("udp {addr}"),
                    (other, _) => other.to_string(),
                })
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The local addresses of the TCP sockets the master listens on for its workers.
    pub(super) fn tcp_locals(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self
            .by_addr
            .iter()
            .filter(|((endpoint, _, _), _)| matches!(endpoint, Endpoint::Tcp(_)))
            .filter_map(|(_, key)| self.open.get(key)?.addr)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The address socket `key` is bound to (none for Unix sockets).
    pub(super) fn addr(&self, key: ListenKey) -> Option<SocketAddr> {
        self.open.get(&key).and_then(|l| l.addr)
    }

    /// A worker id is gone for good (scaled down): close its own `reuseport` sockets, so the
    /// kernel stops queueing clients on them. Its last process keeps its copy while it drains.
    pub(super) fn close_own(&mut self, id: u32) {
        let keys: Vec<_> =
            self.by_addr.iter().filter(|((_, _, owner), _)| *owner == id).map(|(k, v)| (k.clone(), *v)).collect();
        for (lookup, key) in keys {
            self.by_addr.remove(&lookup);
            if let Some(Listener { kind: kind @ Kind::Handed(_), .. }) = self.open.remove(&key) {
                self.drain(key, kind);
            }
        }
    }

    /// Stops listening everywhere. With `drain`, the connections the kernel already completed
    /// or is completing (closing a listening socket resets those) are served first (see
    /// [`Draining`]); without, the sockets are closed with what they hold.
    pub(super) fn close_all(&mut self, drain: bool) {
        self.by_addr.clear();
        self.reuseport_addr.clear();
        if !drain {
            for d in std::mem::take(&mut self.draining) {
                d.kind.close(d.key, None);
            }
        }
        let open: Vec<_> = self.open.drain().collect();
        for (key, listener) in open {
            if listener.keep != Keep::Own {
                listener.kind.release();
                continue;
            }
            if let Some(path) = &listener.unix_path {
                let _ = std::fs::remove_file(path);
            }
            if drain {
                self.drain(key, listener.kind);
            } else {
                listener.kind.close(key, None);
            }
        }
    }

    /// Whether the master still takes the last connections off a socket it is closing.
    pub(super) fn master_draining(&self) -> bool {
        self.draining.iter().any(|d| matches!(d.kind, Kind::Stream { .. }))
    }

    /// Whether one of these sockets is being drained.
    pub(super) fn draining(&self, keys: &[ListenKey]) -> bool {
        self.draining.iter().any(|d| keys.contains(&d.key))
    }

    /// When the draining sockets next need a look without anything else happening (`None`:
    /// not before the next tick).
    pub(super) fn wake_at(&self) -> Option<Instant> {
        self.draining.iter().filter_map(|d| d.drain.wake_at()).min()
    }

    /// Shuts down the draining sockets that no handshake can join any more and whose queue is
    /// empty, or that no live worker accepts on any more (`accepted_on`), or that waited
    /// too long (`drain.rs`). One `sock_diag` dump per address family serves every socket that needs
    /// its handshakes listed.
    pub(super) fn step(&mut self, now: Instant, accepted_on: impl Fn(ListenKey) -> bool) {
        let want: Vec<usize> =
            (0..self.draining.len()).filter(|i| self.draining[*i].drain.wants_listing(now)).collect();
        if !want.is_empty() {
            let locals: Vec<SocketAddr> = want.iter().map(|i| self.draining[*i].local).collect();
            let lists = sys::pending_handshakes(&locals);
            for (n, i) in want.into_iter().enumerate() {
                let listed = lists.as_ref().map(|l| l[n].as_slice()).map_err(|e| e.to_string());
                let key = self.draining[i].key;
                self.draining[i].drain.listed(now, listed, key);
            }
        }
        for d in std::mem::take(&mut self.draining) {
            let (queued, accepted) = match &d.kind {
                // The master's accept loop empties it; the last ones are swept on close.
                Kind::Stream { .. } => (0, true),
                Kind::Handed(socket) => {
                    let queued = sys::accept_queue_len(socket).unwrap_or_else(|e| {
                        log!("listener {}: cannot read its accept queue ({e})", d.key);
                        0
                    });
                    (queued, accepted_on(d.key))
                }
            };
            match d.drain.verdict(now, queued, accepted) {
                Verdict::Wait => {
                    self.draining.push(d);
                    continue;
                }
                Verdict::Close => {}
                Verdict::GiveUp(why) => {
                    let handshaking = d.drain.handshakes_under_way(now);
                    let under_way = if handshaking { " and handshakes under way" } else { "" };
                    warning!(
                        event = "drain_given_up",
                        key = d.key,
                        queued,
                        handshaking,
                        reason = why,
                        "listener {}: closing it with {queued} client(s) queued{under_way}: {why}",
                        d.key
                    );
                }
            }
            d.kind.close(d.key, Some(&self.dispatch));
        }
    }

    /// Starts draining a socket being closed, or closes it at once when it cannot be drained.
    fn drain(&mut self, key: ListenKey, kind: Kind) {
        match Draining::start(key, kind) {
            Ok(d) => self.draining.push(d),
            Err(kind) => kind.close(key, Some(&self.dispatch)),
        }
    }

    fn stream_listener(
        &self,
        socket: Socket,
        key: ListenKey,
        addr: Option<SocketAddr>,
        unix_path: Option<PathBuf>,
    ) -> io::Result<Listener> {
        let accepting = self.live.then(|| self.threads.start(&socket, key, &self.dispatch));
        Ok(Listener { addr, kind: Kind::Stream { socket, accepting }, unix_path, keep: Keep::Own })
    }
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

/// How an address a worker listens on is shown in the log: the bound address (a port-0 bind's
/// real port), `udp …`, `unix:…`.
fn shown(endpoint: &Endpoint, bound: Option<SocketAddr>) -> String {
    match (endpoint, bound) {
        (Endpoint::Tcp(_), Some(addr)) => addr.to_string(),
        (Endpoint::Udp(_), Some(addr)) => format!("udp {addr}"),
        (Endpoint::Unix { path, .. }, _) => format!("unix:{}", path.display()),
        (other, None) => other.to_string(),
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.close_all(false);
    }
}

/// A TCP listening socket being closed without resetting anyone (`drain.rs` decides when it
/// may be shut down). The kernel starts no new handshake on it ([`sys::stop_queueing`]); the
/// handshakes already under way complete ([`sys::pending_handshakes`]); whoever accepts on it
/// (the workers, or the master under `rr`) empties its queue; then it is shut down. A worker
/// is not closed (`rr`) or told to disconnect (a socket it accepts on) before that.
struct Draining {
    key: ListenKey,
    kind: Kind,
    /// The socket's local address.
    local: SocketAddr,
    drain: Drain,
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
        Ok(Draining { key, kind, local, drain: Drain::new(Instant::now()) })
    }
}

impl Kind {
    fn socket(&self) -> &Socket {
        match self {
            Kind::Stream { socket, .. } => socket,
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
    /// Lets go of a socket someone else keeps (the service manager's): stops accepting and
    /// drops this copy, leaving the socket and its queue as they are.
    fn release(self) {
        if let Kind::Stream { accepting: Some(accepting), .. } = self {
            accepting.stop();
        }
    }

    fn close(self, key: ListenKey, sweep: Option<&Dispatch>) {
        let tcp = self.tcp_addr().is_some();
        match self {
            Kind::Stream { socket, accepting } => {
                if let Some(accepting) = accepting {
                    accepting.stop();
                }
                if let Some(dispatch) = sweep {
                    if !tcp {
                        let _ = socket.shutdown(std::net::Shutdown::Both);
                    }
                    let n = dispatch::sweep(&socket, key, dispatch);
                    if n > 0 {
                        log!("took {n} last connection(s) from listener {key}");
                    }
                }
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
            Kind::Handed(socket) if tcp => {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
            Kind::Handed(_) => {}
        }
    }
}
