//! Living under systemd (or any service manager that speaks its protocols): sockets passed by
//! socket activation (`LISTEN_FDS`), and state notifications (`NOTIFY_SOCKET`): `READY=1`,
//! `RELOADING=1`, `STOPPING=1`, `STATUS=`, `WATCHDOG=1`. The protocol is the `sd-notify`
//! crate's (libc only); workers never see these variables (`process.rs` removes them).

use std::net::SocketAddr;
use std::os::unix::net::SocketAddr as UnixAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use socket2::{Socket, Type};

use crate::log::{note, warning};
use crate::sys;

/// A socket the service manager passed to the master.
pub(super) struct Inherited {
    pub(super) socket: Socket,
    pub(super) kind: Kind,
    /// Its `FileDescriptorName=` (or `unknown`).
    pub(super) name: String,
}

impl Inherited {
    /// A socket the service manager passed to the old master, handed over in an upgrade.
    pub(super) fn describe(socket: Socket, name: &str) -> std::io::Result<Inherited> {
        let kind = describe(&socket).map_err(std::io::Error::other)?;
        Ok(Inherited { socket, kind, name: name.to_string() })
    }
}

/// What an inherited socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Kind {
    /// A listening TCP socket.
    Tcp(SocketAddr),
    /// A UDP socket.
    Udp(SocketAddr),
    /// A listening Unix stream socket with a path.
    Unix(PathBuf),
}

impl Kind {
    /// Whether a worker's bind of `endpoint` gets this socket.
    pub(super) fn serves(&self, endpoint: &crate::ipc::message::Endpoint) -> bool {
        use crate::ipc::message::Endpoint;
        match (self, endpoint) {
            (Kind::Tcp(a), Endpoint::Tcp(b)) | (Kind::Udp(a), Endpoint::Udp(b)) => a == b,
            (Kind::Unix(a), Endpoint::Unix { path, .. }) => a == path,
            _ => false,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Tcp(a) => write!(f, "tcp {a}"),
            Kind::Udp(a) => write!(f, "udp {a}"),
            Kind::Unix(p) => write!(f, "unix {}", p.display()),
        }
    }
}

/// The sockets passed with `LISTEN_FDS` for this process (`LISTEN_PID`), each checked: its type,
/// and that it listens. Anything else passed is reported and left alone.
pub(super) fn inherited() -> Vec<Inherited> {
    let fds = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds,
        Err(e) => {
            warning!(event = "inherited_bad", error = %e, "ignoring the sockets passed by the service manager: {e}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (fd, name) in fds {
        let Some(socket) = sys::adopt_inherited_socket(fd) else {
            warning!(
                event = "inherited_bad",
                fd,
                "descriptor {fd} ({name}) passed by the service manager is not a socket; ignored"
            );
            continue;
        };
        match describe(&socket) {
            Ok(kind) => {
                note!(event = "inherited", fd, name = %name, addr = %kind, "socket {kind} ({name}) passed by the service manager");
                let _ = socket.set_nonblocking(true);
                out.push(Inherited { socket, kind, name });
            }
            Err(why) => {
                warning!(event = "inherited_bad", fd, reason = %why, "socket {fd} ({name}) passed by the service manager: {why}; ignored");
                // Not ours to close: leave it open, as it was passed.
                std::mem::forget(socket);
            }
        }
    }
    out
}

fn describe(socket: &Socket) -> Result<Kind, String> {
    let ty = socket.r#type().map_err(|e| e.to_string())?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let listening = socket.is_listener().unwrap_or(false);
    match (ty, local.as_socket(), local.as_unix()) {
        (Type::STREAM, Some(addr), _) if listening => Ok(Kind::Tcp(addr)),
        (Type::DGRAM, Some(addr), _) => Ok(Kind::Udp(addr)),
        (Type::STREAM, None, Some(unix)) if listening => match UnixAddr::as_pathname(&unix) {
            Some(path) => Ok(Kind::Unix(path.to_path_buf())),
            None => Err("an abstract or unnamed Unix socket is not supported".into()),
        },
        (Type::STREAM, _, _) => Err("a stream socket that does not listen (Accept=yes is not supported)".into()),
        _ => Err(format!("an unsupported socket type {ty:?}")),
    }
}

/// Tells the service manager how the cluster is doing.
pub(super) struct Notifier {
    enabled: bool,
    /// A new master says nothing until its predecessor hands over; an old one nothing after.
    paused: bool,
    /// `READY=1` was sent since the start or the last reload.
    ready: bool,
    reloading: bool,
    stopping: bool,
    status: String,
    /// Half of `WATCHDOG_USEC`, and the next ping.
    watchdog: Option<(Duration, Instant)>,
    started: Instant,
}

/// What the notifier looks at after each step of the supervisor.
pub(super) struct Seen {
    pub(super) ready: usize,
    pub(super) target: usize,
    pub(super) reloading: bool,
    pub(super) stopping: bool,
    /// How long a first start may take before one ready worker is enough for `READY=1`.
    pub(super) ready_timeout: Duration,
}

impl Notifier {
    pub(super) fn new(now: Instant) -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let watchdog = sd_notify::watchdog_enabled().filter(|_| enabled).map(|every| (every / 2, now));
        Notifier {
            enabled,
            paused: false,
            ready: false,
            reloading: false,
            stopping: false,
            status: String::new(),
            watchdog,
            started: now,
        }
    }

    /// Sends what changed: readiness once the first workers are ready (all of them, or one
    /// after the ready timeout), reload begin and end, stopping, and the status line; and the
    /// watchdog ping when it is due. Called from the supervisor loop, so a stuck loop stops
    /// the pings.
    pub(super) fn update(&mut self, now: Instant, seen: &Seen) {
        if !self.enabled || self.paused {
            return;
        }
        let mut states = Vec::new();
        if seen.stopping && !self.stopping {
            self.stopping = true;
            states.push(NotifyState::Stopping);
        }
        if !self.stopping {
            if seen.reloading && !self.reloading {
                self.reloading = true;
                states.push(NotifyState::Reloading);
                if let Ok(usec) = NotifyState::monotonic_usec_now() {
                    states.push(usec);
                }
            } else if !seen.reloading && self.reloading {
                self.reloading = false;
                states.push(NotifyState::Ready);
            }
            let enough = seen.ready >= seen.target
                || (seen.ready > 0 && now.saturating_duration_since(self.started) >= seen.ready_timeout);
            if !self.ready && enough {
                self.ready = true;
                states.push(NotifyState::Ready);
                states.push(NotifyState::MainPid(sys::getpid()));
            }
        }
        let status = if self.stopping {
            "stopping".to_string()
        } else {
            format!("{}/{} workers ready{}", seen.ready, seen.target, if self.reloading { ", reloading" } else { "" })
        };
        let changed = status != self.status;
        self.status = status;
        if changed {
            states.push(NotifyState::Status(&self.status));
        }
        if let Some((every, next)) = &mut self.watchdog
            && now >= *next
        {
            *next = now + *every;
            states.push(NotifyState::Watchdog);
        }
        if !states.is_empty()
            && let Err(e) = sd_notify::notify(&states)
        {
            warning!(event = "notify_failed", error = %e, "cannot notify the service manager: {e}");
        }
    }

    /// A reload was asked for (SIGHUP, `clusterctl reload`): `RELOADING=1` at once, as
    /// `Type=notify-reload` expects, even if the reload then ends within one step; `READY=1`
    /// follows when it is over.
    pub(super) fn reload_asked(&mut self) {
        if !self.enabled || self.paused || self.stopping || self.reloading {
            return;
        }
        self.reloading = true;
        let mut states = vec![NotifyState::Reloading];
        states.extend(NotifyState::monotonic_usec_now());
        if let Err(e) = sd_notify::notify(&states) {
            warning!(event = "notify_failed", error = %e, "cannot notify the service manager: {e}");
        }
    }

    /// When the next watchdog ping is due, if any.
    pub(super) fn wake_at(&self) -> Option<Instant> {
        self.watchdog.filter(|_| !self.paused).map(|(_, next)| next)
    }

    /// A new master, until its predecessor hands over: the service manager hears only the
    /// predecessor.
    pub(super) fn pause(&mut self) {
        self.paused = true;
    }

    /// The predecessor handed over: `READY=1` and `MAINPID=` (this one) go out at the next
    /// update, and the watchdog pings from here.
    pub(super) fn resume(&mut self, now: Instant) {
        self.paused = false;
        self.started = now;
        if let Some((_, next)) = &mut self.watchdog {
            *next = now;
        }
    }

    /// This master handed over to `successor`: the main process is that one now (sent by this
    /// one too, which `NotifyAccess=main` accepts), and this one says nothing more, not even
    /// `STOPPING=1` as it retires.
    pub(super) fn hand_over(&mut self, successor: u32) {
        if self.enabled
            && !self.paused
            && let Err(e) = sd_notify::notify(&[NotifyState::MainPid(successor)])
        {
            warning!(event = "notify_failed", error = %e, "cannot notify the service manager: {e}");
        }
        self.paused = true;
    }
}
