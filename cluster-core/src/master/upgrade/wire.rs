//! The wire of the upgrade handshake (the protocol is in `upgrade/mod.rs`): the messages, the
//! socket descriptions, and the successor's side of the handshake up to `start`, which runs
//! before its supervisor does (`boot.rs`). What happens after that is decided in
//! `upgrade/decide.rs` and carried out over `upgrade/link.rs`.

use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use serde_json::{Value, json};
use socket2::Socket;

use super::decide::{HANDSHAKE, Heard, Input, VERSION};
use crate::env::ENV_UPGRADE_FD;
use crate::ipc::message::{Endpoint, MAX_FDS};
use crate::ipc::{Channel, Receiver};
use crate::log::warning;
use crate::master::systemd;
use crate::sys;

/// The descriptor number the successor gets its end at.
pub(super) const UPGRADE_FD: RawFd = 3;
/// Descriptors per datagram.
pub(super) const PER_DATAGRAM: usize = MAX_FDS / 2;

/// A listening socket handed over.
pub(in crate::master) enum Listener {
    /// Bound by the predecessor for (endpoint, index, owner): see `Listeners::by_addr`.
    Own { endpoint: Endpoint, index: u32, owner: u32, socket: Socket },
    /// Passed to the predecessor by the service manager (matched by address, never drained).
    Systemd(systemd::Inherited),
}

/// Everything a predecessor hands over.
#[derive(Default)]
pub(in crate::master) struct Handover {
    pub(in crate::master) listeners: Vec<Listener>,
    /// The control socket and the path its file has.
    pub(in crate::master) control: Option<(PathBuf, OwnedFd)>,
    /// The admin endpoint's socket.
    pub(in crate::master) admin: Option<OwnedFd>,
    /// Workers wanted (a scaled cluster stays scaled).
    pub(in crate::master) workers: usize,
}

/// The messages a predecessor sends, in order: the sockets (one datagram per
/// [`PER_DATAGRAM`] descriptors), then `start`; or `refused`; later `go`.
pub(in crate::master) fn refused(reason: &str) -> Vec<u8> {
    json!({"t": "refused", "reason": reason}).to_string().into_bytes()
}

/// See [`refused`].
pub(in crate::master) fn sockets(items: &[Value]) -> Vec<u8> {
    json!({"t": "sockets", "items": items}).to_string().into_bytes()
}

/// See [`refused`].
pub(in crate::master) fn start(workers: usize) -> Vec<u8> {
    json!({"t": "start", "workers": workers, "pid": sys::getpid(), "init": sys::under_own_init()})
        .to_string()
        .into_bytes()
}

/// See [`refused`].
pub(super) fn go() -> Vec<u8> {
    json!({"t": "go"}).to_string().into_bytes()
}

/// The messages a successor sends after its hello: `ready`, `failed`, `serving`.
pub(super) fn ready() -> Vec<u8> {
    json!({"t": "ready"}).to_string().into_bytes()
}

/// See [`ready`].
pub(super) fn failed(reason: &str) -> Vec<u8> {
    json!({"t": "failed", "reason": reason}).to_string().into_bytes()
}

/// See [`ready`].
pub(super) fn serving() -> Vec<u8> {
    json!({"t": "serving"}).to_string().into_bytes()
}

/// About how much JSON one `metrics` datagram carries (the channel takes 64 KiB).
pub(super) const METRICS_PIECE: usize = 32 * 1024;

/// `{"t":"metrics"}`: a piece of the application's metrics totals, or descriptions of segments
/// whose descriptors come with it.
pub(super) fn metrics(piece: &Value, segments: &[Value]) -> Vec<u8> {
    json!({"t": "metrics", "piece": piece, "segments": segments}).to_string().into_bytes()
}

/// Whether a datagram from the predecessor is a `metrics` one.
pub(super) fn is_metrics(data: &[u8]) -> bool {
    serde_json::from_slice::<Value>(data).is_ok_and(|m| m["t"] == "metrics")
}

/// Takes a `metrics` datagram into the totals; what cannot be read is logged and left out.
pub(super) fn adopt_metrics(datagram: crate::ipc::Datagram, totals: &crate::master::handle::AppMetrics) {
    let fds = datagram.fds;
    let Ok(msg) = serde_json::from_slice::<Value>(&datagram.data) else { return };
    let mut totals = totals.lock().unwrap_or_else(|e| e.into_inner());
    if !msg["piece"].is_null()
        && let Err(e) = totals.adopt(&msg["piece"])
    {
        warning!(event = "metrics_handover_failed", error = %e, "{e}");
    }
    let segments = msg["segments"].as_array().map(Vec::as_slice).unwrap_or_default();
    for (item, fd) in segments.iter().zip(fds) {
        let id = item["id"].as_u64().and_then(|i| u32::try_from(i).ok());
        let words = item["words"].as_u64().and_then(|w| usize::try_from(w).ok());
        let adopted = match (id, words) {
            (Some(id), Some(words)) => totals.adopt_segment(id, fd, words).map_err(|e| e.to_string()),
            _ => Err(format!("a segment description the new master cannot read: {item}")),
        };
        if let Err(e) = adopted {
            warning!(event = "metrics_handover_failed", error = %e, "a metrics segment handed over: {e}");
        }
    }
}

/// What a datagram from the successor says.
pub(in crate::master) fn from_successor(data: &[u8]) -> Input {
    let msg: Value = match serde_json::from_slice(data) {
        Ok(msg) => msg,
        Err(e) => return Input::Garbage(e.to_string()),
    };
    let what = match msg["t"].as_str() {
        Some("hello") => Heard::Hello { version: msg.get("version").and_then(Value::as_u64) },
        Some("ready") => Heard::Ready,
        Some("failed") => Heard::Failed(msg["reason"].as_str().unwrap_or("(no reason)").to_string()),
        Some("serving") => Heard::Serving,
        _ => Heard::Other,
    };
    Input::Heard { what, raw: msg.to_string() }
}

/// What a datagram from the predecessor says, after `start`: `go`, or the upgrade is off.
pub(in crate::master) fn from_predecessor(data: &[u8]) -> Input {
    match serde_json::from_slice::<Value>(data) {
        Ok(msg) if msg["t"] == "go" => Input::Go,
        Ok(msg) => Input::Off(format!("the old master says: {msg}")),
        Err(e) => Input::Off(format!("upgrade channel: {e}")),
    }
}

/// Describes what is handed over, one item per descriptor.
pub(in crate::master) fn encode(handover: Handover) -> Result<(Vec<Value>, Vec<OwnedFd>), String> {
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
pub(in crate::master) struct Successor {
    pub(super) channel: Channel,
    pub(super) rx: Receiver,
    /// The predecessor's pid.
    pub(in crate::master) predecessor: u32,
}

impl Successor {
    /// Takes what the predecessor hands over, if this master was started by an upgrade.
    pub(in crate::master) async fn connect() -> Option<Result<(Successor, Handover), String>> {
        let value = std::env::var(ENV_UPGRADE_FD).ok()?;
        // Its children must not see it (workers are spawned without it too).
        sys::remove_env(ENV_UPGRADE_FD);
        Some(Self::handshake(&value).await)
    }

    async fn handshake(value: &str) -> Result<(Successor, Handover), String> {
        let fd: RawFd = value.parse().map_err(|_| format!("{ENV_UPGRADE_FD}={value:?} is not a descriptor number"))?;
        let fd = sys::adopt_channel_fd(fd).map_err(|e| format!("{ENV_UPGRADE_FD}: {e}"))?;
        let channel = Channel::from_fd(fd).map_err(|e| format!("{ENV_UPGRADE_FD}: {e}"))?;
        let mut me = Successor { channel, rx: Receiver::new(), predecessor: 0 };
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
            if let Some(start) = handshake_step(&data, fds, &mut handover)? {
                handover.workers = start.workers;
                me.predecessor = start.predecessor;
                if start.init {
                    sys::set_under_own_init();
                }
                return Ok((me, handover));
            }
        }
    }
}

/// The old master's `start`: the handshake is over.
pub(in crate::master) struct Start {
    pub(in crate::master) workers: usize,
    pub(in crate::master) predecessor: u32,
    /// Whether the old master ran as PID 1's child under its own init.
    pub(in crate::master) init: bool,
}

/// One datagram of the handshake from the old master, with its descriptors: socket
/// descriptions go `into` the handover, `start` ends the handshake, anything else is an error.
pub(in crate::master) fn handshake_step(
    data: &[u8],
    fds: Vec<OwnedFd>,
    into: &mut Handover,
) -> Result<Option<Start>, String> {
    let msg: Value = serde_json::from_slice(data).map_err(|e| format!("upgrade channel: {e}"))?;
    match msg["t"].as_str() {
        Some("refused") => Err(format!("refused: {}", msg["reason"].as_str().unwrap_or("?"))),
        Some("sockets") => {
            let items = msg["items"].as_array().map(Vec::as_slice).unwrap_or_default();
            if items.len() != fds.len() {
                return Err(format!("{} socket descriptions came with {} descriptors", items.len(), fds.len()));
            }
            for (item, fd) in items.iter().zip(fds) {
                decode(item, fd, into)?;
            }
            Ok(None)
        }
        Some("start") => {
            let number = |key: &str| msg[key].as_u64().ok_or_else(|| format!("a bad start message: {msg}"));
            let workers = usize::try_from(number("workers")?).map_err(|e| e.to_string())?;
            let predecessor = u32::try_from(number("pid")?).map_err(|e| e.to_string())?;
            Ok(Some(Start { workers, predecessor, init: msg["init"] == true }))
        }
        _ => Err(format!("unexpected message from the old master: {msg}")),
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
