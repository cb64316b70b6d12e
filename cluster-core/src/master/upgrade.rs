//! Upgrading the master itself (SIGUSR2, `clusterctl upgrade`). The running master, the
//! *predecessor*, starts a new master, the *successor*, from the binary on disk with its own
//! arguments and environment, and hands it every listening socket, the control socket and the
//! admin endpoint's socket. The successor starts its workers but accepts nothing; once they are
//! all ready, the predecessor tells it to go, stops accepting, retires its own workers
//! gracefully and exits 0. A successor that exits, breaks the protocol, or is not ready in time
//! is stopped, and the predecessor serves on as if nothing happened.
//!
//! The two talk over a `SOCK_SEQPACKET` pair; the successor inherits its end at fd 3
//! (`CLUSTER_UPGRADE_FD`). The sockets travel on it as SCM_RIGHTS once the successor's hello has
//! been checked, so a pair that cannot agree is refused before any socket changes hands. Each
//! datagram is one JSON object:
//!
//! | from        | message                                         | then                          |
//! |-------------|-------------------------------------------------|-------------------------------|
//! | successor   | `{"t":"hello","version":1,"pid":P}`             |                               |
//! | predecessor | `{"t":"refused","reason":R}`                    | it stops the successor        |
//! | predecessor | `{"t":"sockets","items":[…]}` + descriptors     | one item per descriptor       |
//! | predecessor | `{"t":"start","workers":N,"pid":P,"init":B}`    | the successor starts workers  |
//! | successor   | `{"t":"ready"}` or `{"t":"failed","reason":R}`  |                               |
//! | predecessor | `{"t":"go"}`                                    | the successor accepts         |
//! | successor   | `{"t":"serving"}`                               | the predecessor lets go       |
//!
//! `init` says the predecessor runs under the minimal init of a container (see
//! `sys::become_init_if_pid_1`), which the master that hands over tells who its successor is.
//!
//! Before `go`, the successor lives only as long as the channel: if the predecessor goes away,
//! it stops (it never accepted a connection, so it loses none). After `go`, the predecessor
//! keeps its end open until it exits; until then the successor treats the sockets as shared
//! (a stop of its own lets go of them without draining or shutting them down, which would
//! act on the predecessor's copies too).

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use socket2::Socket;
use tokio::sync::oneshot;

use super::systemd;
use crate::env::ENV_UPGRADE_FD;
use crate::ipc::message::{Endpoint, MAX_FDS};
use crate::ipc::{Channel, NO_FDS, Receiver};
use crate::log::note;
use crate::sys;

/// The version of this handshake. Two masters that differ refuse to upgrade.
pub(super) const VERSION: u64 = 1;
/// The descriptor number the successor gets its end at.
const UPGRADE_FD: RawFd = 3;
/// How long each step of the handshake may take, beyond the workers' start.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// How long a successor that gives up may take to exit on its own.
const OWN_EXIT: Duration = Duration::from_millis(500);
/// Descriptors per datagram.
const PER_DATAGRAM: usize = MAX_FDS / 2;

/// A listening socket handed over.
pub(super) enum Listener {
    /// Bound by the predecessor for (endpoint, index, owner): see `Listeners::by_addr`.
    Own { endpoint: Endpoint, index: u32, owner: u32, socket: Socket },
    /// Passed to the predecessor by the service manager (matched by address, never drained).
    Systemd(systemd::Inherited),
}

/// Everything a predecessor hands over.
#[derive(Default)]
pub(super) struct Handover {
    pub(super) listeners: Vec<Listener>,
    /// The control socket and the path its file has.
    pub(super) control: Option<(PathBuf, OwnedFd)>,
    /// The admin endpoint's socket.
    pub(super) admin: Option<OwnedFd>,
    /// Workers wanted (a scaled cluster stays scaled).
    pub(super) workers: usize,
}

/// What the predecessor needs to start and drive a successor.
pub(super) struct Plan {
    pub(super) command: tokio::process::Command,
    pub(super) handover: Handover,
    pub(super) ready_timeout: Duration,
    pub(super) kill_timeout: Duration,
}

/// The predecessor's end of the channel once the successor serves, held until the predecessor
/// exits: its closing tells the successor that the sockets are its own alone.
pub(super) struct Link {
    _channel: Channel,
}

/// Runs an upgrade from the predecessor's side; the successor's pid once it serves. On failure
/// the successor is stopped (SIGTERM, then SIGKILL after the kill timeout) before this returns.
/// `cancel` ends it early (this master is stopping).
pub(super) async fn predecessor(plan: Plan, mut cancel: oneshot::Receiver<()>) -> Result<(u32, Link), String> {
    let Plan { mut command, handover, ready_timeout, kill_timeout } = plan;
    let (channel, theirs) = Channel::pair().map_err(|e| format!("cannot create the upgrade channel: {e}"))?;
    command.env(ENV_UPGRADE_FD, UPGRADE_FD.to_string());
    // The service manager's sockets travel on the channel, and its watchdog variable names
    // this process.
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID"] {
        command.env_remove(var);
    }
    sys::prepare_successor_command(command.as_std_mut(), theirs.as_raw_fd(), UPGRADE_FD);
    let mut child = command.spawn().map_err(|e| format!("cannot start the new master: {e}"))?;
    drop(theirs);
    let pid = child.id().unwrap_or(0);
    note!(event = "upgrade_started", pid, "new master started (pid {pid})");
    let mut talk = Talk { channel, rx: Receiver::new(), child: &mut child, cancel: &mut cancel };
    let result = talk.handshake(handover, ready_timeout).await;
    let Talk { channel, .. } = talk;
    if let Err(why) = result {
        // The channel stays open until it is gone: the successor stops on its own when it
        // closes, and should hear the reason first.
        stop(&mut child, pid, kill_timeout).await;
        drop(channel);
        return Err(why);
    }
    Ok((pid, Link { _channel: channel }))
}

/// Stops a successor that will not take over. One that was told why (refused, or failed on its
/// own) exits by itself in a moment; otherwise SIGTERM (it lets go of the sockets without
/// touching them, and its workers finish what they have), and SIGKILL after `kill_timeout`.
async fn stop(child: &mut tokio::process::Child, pid: u32, kill_timeout: Duration) {
    if let Ok(Ok(_)) = tokio::time::timeout(OWN_EXIT, child.wait()).await {
        return;
    }
    let _ = sys::signal(pid, libc::SIGTERM);
    if tokio::time::timeout(kill_timeout, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

struct Talk<'a> {
    channel: Channel,
    rx: Receiver,
    child: &'a mut tokio::process::Child,
    cancel: &'a mut oneshot::Receiver<()>,
}

impl Talk<'_> {
    async fn handshake(&mut self, handover: Handover, ready_timeout: Duration) -> Result<(), String> {
        let hello = self.next(HANDSHAKE).await?;
        let version = hello.get("version").and_then(Value::as_u64);
        if hello["t"] != "hello" || version != Some(VERSION) {
            let reason = match version {
                Some(v) => format!("the new master speaks upgrade protocol {v}, this one {VERSION}"),
                None => format!("the new master did not say hello: {hello}"),
            };
            let _ = self.send(&json!({"t": "refused", "reason": reason}), NO_FDS).await;
            return Err(reason);
        }
        let workers = handover.workers;
        let (items, fds) = encode(handover)?;
        for (items, fds) in items.chunks(PER_DATAGRAM).zip(fds.chunks(PER_DATAGRAM)) {
            let fds: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            self.send(&json!({"t": "sockets", "items": items}), &fds).await?;
        }
        let start = json!({"t": "start", "workers": workers, "pid": sys::getpid(), "init": sys::under_own_init()});
        self.send(&start, NO_FDS).await?;
        let answer = self.next(ready_timeout + HANDSHAKE).await?;
        match answer["t"].as_str() {
            Some("ready") => {}
            Some("failed") => {
                return Err(format!("the new master failed: {}", answer["reason"].as_str().unwrap_or("(no reason)")));
            }
            _ => return Err(format!("unexpected message from the new master: {answer}")),
        }
        self.send(&json!({"t": "go"}), NO_FDS).await?;
        match self.next(HANDSHAKE).await? {
            answer if answer["t"] == "serving" => Ok(()),
            answer => Err(format!("unexpected message from the new master: {answer}")),
        }
    }

    async fn send(&self, msg: &Value, fds: &[BorrowedFd<'_>]) -> Result<(), String> {
        self.channel.send_with_fds(msg.to_string().as_bytes(), fds).await.map_err(|e| format!("upgrade channel: {e}"))
    }

    /// The successor's next message, unless it exits, closes the channel, sends garbage or
    /// says nothing within `timeout`, or the upgrade is cancelled.
    async fn next(&mut self, timeout: Duration) -> Result<Value, String> {
        let received = tokio::select! {
            biased;
            _ = &mut *self.cancel => return Err("cancelled: this master is stopping".into()),
            received = self.rx.recv(&self.channel) => received,
            _ = tokio::time::sleep(timeout) => return Err(format!("the new master did not answer within {timeout:?}")),
        };
        match received {
            Ok(Some(datagram)) => serde_json::from_slice(&datagram.data)
                .map_err(|e| format!("the new master sent something that is not the upgrade protocol: {e}")),
            Ok(None) | Err(_) => {
                // It is gone or going: say how, if it says within a moment.
                match tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await {
                    Ok(Ok(status)) => Err(format!("the new master exited ({status})")),
                    _ => Err("the new master closed the upgrade channel".into()),
                }
            }
        }
    }
}

/// Describes what is handed over, one item per descriptor.
fn encode(handover: Handover) -> Result<(Vec<Value>, Vec<OwnedFd>), String> {
    let mut items = Vec::new();
    let mut fds = Vec::new();
    let text = |path: &std::path::Path| {
        path.to_str().map(str::to_owned).ok_or_else(|| format!("cannot hand over a socket at {path:?}: not UTF-8"))
    };
    for listener in handover.listeners {
        match listener {
            Listener::Own { endpoint, index, owner, socket } => {
                let endpoint = match endpoint {
                    Endpoint::Tcp(addr) => json!({"tcp": addr.to_string()}),
                    Endpoint::Udp(addr) => json!({"udp": addr.to_string()}),
                    Endpoint::Unix { path, mode } => json!({"unix": text(&path)?, "mode": mode}),
                };
                items.push(json!({"k": "listener", "endpoint": endpoint, "index": index, "owner": owner}));
                fds.push(OwnedFd::from(socket));
            }
            Listener::Systemd(inherited) => {
                items.push(json!({"k": "systemd", "name": inherited.name}));
                fds.push(OwnedFd::from(inherited.socket));
            }
        }
    }
    if let Some((path, fd)) = handover.control {
        items.push(json!({"k": "control", "path": text(&path)?}));
        fds.push(fd);
    }
    if let Some(fd) = handover.admin {
        items.push(json!({"k": "admin"}));
        fds.push(fd);
    }
    Ok((items, fds))
}

/// Reads one item of a `sockets` message with its descriptor.
fn decode(item: &Value, fd: OwnedFd, into: &mut Handover) -> Result<(), String> {
    let bad = || format!("a socket description the new master cannot read: {item}");
    let str_of = |v: &Value| v.as_str().map(str::to_owned).ok_or_else(bad);
    let addr_of = |v: &Value| str_of(v)?.parse::<SocketAddr>().map_err(|_| bad());
    match item["k"].as_str() {
        Some("listener") => {
            let e = &item["endpoint"];
            let endpoint = if let Some(addr) = e.get("tcp") {
                Endpoint::Tcp(addr_of(addr)?)
            } else if let Some(addr) = e.get("udp") {
                Endpoint::Udp(addr_of(addr)?)
            } else if let Some(path) = e.get("unix") {
                let mode = match &e["mode"] {
                    Value::Null => None,
                    m => Some(m.as_u64().and_then(|m| u32::try_from(m).ok()).ok_or_else(bad)?),
                };
                Endpoint::Unix { path: str_of(path)?.into(), mode }
            } else {
                return Err(bad());
            };
            let number = |key: &str| item[key].as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad);
            let socket = Socket::from(fd);
            socket.set_nonblocking(true).map_err(|e| e.to_string())?;
            into.listeners.push(Listener::Own { endpoint, index: number("index")?, owner: number("owner")?, socket });
        }
        Some("systemd") => {
            let socket = Socket::from(fd);
            socket.set_nonblocking(true).map_err(|e| e.to_string())?;
            let inherited = systemd::Inherited::describe(socket, item["name"].as_str().unwrap_or("unknown"))
                .map_err(|e| format!("a service manager's socket handed over: {e}"))?;
            into.listeners.push(Listener::Systemd(inherited));
        }
        Some("control") => into.control = Some((str_of(&item["path"])?.into(), fd)),
        Some("admin") => into.admin = Some(fd),
        _ => return Err(bad()),
    }
    Ok(())
}

/// The successor's end of the channel, until it takes over.
pub(super) struct Successor {
    channel: Channel,
    rx: Receiver,
    /// The predecessor's pid.
    pub(super) predecessor: u32,
    told_ready: bool,
}

/// What the predecessor says once the workers are started.
pub(super) enum Word {
    /// Take over: accept from now on.
    Go,
    /// The upgrade is off (the predecessor is gone, closed the channel, or said something
    /// else); stop.
    Off(String),
}

impl Successor {
    /// Takes what the predecessor hands over, if this master was started by an upgrade.
    pub(super) async fn connect() -> Option<Result<(Successor, Handover), String>> {
        let value = std::env::var(ENV_UPGRADE_FD).ok()?;
        // Its children must not see it (workers are spawned without it too).
        sys::remove_env(ENV_UPGRADE_FD);
        Some(Self::handshake(&value).await)
    }

    async fn handshake(value: &str) -> Result<(Successor, Handover), String> {
        let fd: RawFd = value.parse().map_err(|_| format!("{ENV_UPGRADE_FD}={value:?} is not a descriptor number"))?;
        let fd = sys::adopt_channel_fd(fd).map_err(|e| format!("{ENV_UPGRADE_FD}: {e}"))?;
        let channel = Channel::from_fd(fd).map_err(|e| format!("{ENV_UPGRADE_FD}: {e}"))?;
        let mut me = Successor { channel, rx: Receiver::new(), predecessor: 0, told_ready: false };
        let hello = json!({"t": "hello", "version": VERSION, "pid": sys::getpid()});
        me.channel.send(hello.to_string().as_bytes()).await.map_err(|e| format!("upgrade channel: {e}"))?;
        let mut handover = Handover::default();
        loop {
            let datagram = match tokio::time::timeout(HANDSHAKE, me.rx.recv(&me.channel)).await {
                Err(_) => return Err(format!("the old master sent nothing within {HANDSHAKE:?}")),
                Ok(Err(e)) => return Err(format!("upgrade channel: {e}")),
                Ok(Ok(None)) => return Err("the old master closed the upgrade channel".into()),
                Ok(Ok(Some(datagram))) => datagram,
            };
            let (data, fds) = datagram.whole().map_err(|e| format!("upgrade channel: {e}"))?;
            let msg: Value = serde_json::from_slice(&data).map_err(|e| format!("upgrade channel: {e}"))?;
            match msg["t"].as_str() {
                Some("refused") => return Err(format!("refused: {}", msg["reason"].as_str().unwrap_or("?"))),
                Some("sockets") => {
                    let items = msg["items"].as_array().map(Vec::as_slice).unwrap_or_default();
                    if items.len() != fds.len() {
                        return Err(format!("{} socket descriptions came with {} descriptors", items.len(), fds.len()));
                    }
                    for (item, fd) in items.iter().zip(fds) {
                        decode(item, fd, &mut handover)?;
                    }
                }
                Some("start") => {
                    let number = |key: &str| msg[key].as_u64().ok_or_else(|| format!("a bad start message: {msg}"));
                    handover.workers = usize::try_from(number("workers")?).map_err(|e| e.to_string())?;
                    me.predecessor = u32::try_from(number("pid")?).map_err(|e| e.to_string())?;
                    if msg["init"] == true {
                        sys::set_under_own_init();
                    }
                    return Ok((me, handover));
                }
                _ => return Err(format!("unexpected message from the old master: {msg}")),
            }
        }
    }

    /// Says the workers are all ready (once).
    pub(super) fn ready(&mut self) {
        if !self.told_ready {
            self.told_ready = true;
            self.say(&json!({"t": "ready"}));
        }
    }

    /// Says the start failed, and why.
    pub(super) fn failed(&mut self, reason: &str) {
        self.say(&json!({"t": "failed", "reason": reason}));
    }

    /// Says this master accepts now. The channel stays open until the predecessor exits.
    pub(super) fn serving(&self) {
        self.say(&json!({"t": "serving"}));
    }

    fn say(&self, msg: &Value) {
        // A few bytes on an otherwise idle socket: never full. If it fails, the predecessor
        // times out and stops this master.
        let _ = self.channel.try_send_with_fds(msg.to_string().as_bytes(), NO_FDS);
    }

    /// The predecessor's next word: `Go`, or why the upgrade is off.
    pub(super) async fn word(&mut self) -> Word {
        match self.rx.recv(&self.channel).await {
            Ok(Some(datagram)) => match serde_json::from_slice::<Value>(&datagram.data) {
                Ok(msg) if msg["t"] == "go" => Word::Go,
                Ok(msg) => Word::Off(format!("the old master says: {msg}")),
                Err(e) => Word::Off(format!("upgrade channel: {e}")),
            },
            Ok(None) => Word::Off("the old master closed the upgrade channel".into()),
            Err(e) => Word::Off(format!("upgrade channel: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(ty: socket2::Type) -> Socket {
        let s = Socket::new(socket2::Domain::IPV4, ty, None).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        s
    }

    #[test]
    fn socket_descriptions_round_trip_one_per_descriptor() {
        let tcp: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let unix = Endpoint::Unix { path: "/run/app.sock".into(), mode: Some(0o660) };
        let handover = Handover {
            listeners: vec![
                Listener::Own {
                    endpoint: Endpoint::Tcp(tcp),
                    index: 1,
                    owner: 2,
                    socket: socket(socket2::Type::STREAM),
                },
                Listener::Own {
                    endpoint: Endpoint::Udp(tcp),
                    index: 0,
                    owner: 0,
                    socket: socket(socket2::Type::DGRAM),
                },
                Listener::Own { endpoint: unix.clone(), index: 0, owner: 0, socket: socket(socket2::Type::STREAM) },
            ],
            control: Some(("/run/app/hello-1.sock".into(), OwnedFd::from(socket(socket2::Type::STREAM)))),
            admin: Some(OwnedFd::from(socket(socket2::Type::STREAM))),
            workers: 3,
        };
        let (items, fds) = encode(handover).unwrap();
        assert_eq!(items.len(), fds.len());
        let mut back = Handover::default();
        for (item, fd) in items.iter().zip(fds) {
            decode(item, fd, &mut back).unwrap();
        }
        let described: Vec<(Endpoint, u32, u32)> = back
            .listeners
            .iter()
            .map(|l| match l {
                Listener::Own { endpoint, index, owner, .. } => (endpoint.clone(), *index, *owner),
                Listener::Systemd(_) => panic!("no service manager's socket was handed"),
            })
            .collect();
        assert_eq!(described, [(Endpoint::Tcp(tcp), 1, 2), (Endpoint::Udp(tcp), 0, 0), (unix, 0, 0)]);
        assert_eq!(back.control.map(|(path, _)| path), Some(PathBuf::from("/run/app/hello-1.sock")));
        assert!(back.admin.is_some());
    }

    #[test]
    fn a_description_that_cannot_be_read_is_an_error() {
        for bad in [
            json!({"k": "listener", "endpoint": {"tcp": "not an address"}, "index": 0, "owner": 0}),
            json!({"k": "listener", "endpoint": {"sctp": "127.0.0.1:1"}, "index": 0, "owner": 0}),
            json!({"k": "listener", "endpoint": {"unix": "/x", "mode": "rw"}, "index": 0, "owner": 0}),
            json!({"k": "listener", "endpoint": {"tcp": "127.0.0.1:1"}, "index": -1, "owner": 0}),
            json!({"k": "something else"}),
        ] {
            let fd = OwnedFd::from(socket(socket2::Type::STREAM));
            assert!(decode(&bad, fd, &mut Handover::default()).is_err(), "{bad}");
        }
    }
}
