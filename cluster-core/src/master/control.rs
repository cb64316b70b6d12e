//! The control socket: a Unix stream socket where `clusterctl` (or anything that speaks
//! newline-delimited JSON) asks the master for status, reloads, scaling, restarts, stops, logs
//! and metrics. It is a thin layer over [`Handle`]: every command is a call of the same API
//! code in the master uses.
//!
//! Safety: the socket lives in a directory only this user can write (see
//! [`crate::control::prepare_dir`]), has mode 0600, and each connection's peer credentials are
//! checked (this user or root). Each client is its own task with a bounded line length, a
//! write timeout and an idle timeout, and at most [`MAX_CLIENTS`] are served at once, so a
//! client that sends garbage, a huge line or never reads disturbs no one else.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::task::JoinHandle;

use self::request::{Refused, Request};
use super::handle::Handle;
use super::types::ControlError;
use super::watch::{interval, status_json};
use crate::config::{Config, ControlSocket};
use crate::control::{MAX_LINE, PROTOCOL_VERSION, parse_socket_file_name, prepare_dir, socket_dir, socket_file_name};
use crate::log::{note, ring, warning};
use crate::sys;

pub(super) mod request;

/// Clients served at once; more are told so and closed.
const MAX_CLIENTS: usize = 64;
/// A client that does not take a reply line within this is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that sends no request within this is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The control socket, served until dropped (then its file is removed, unless a new master
/// took it over).
pub(super) struct Server {
    path: PathBuf,
    inode: u64,
    /// A copy of the listening socket, for a successor.
    fd: OwnedFd,
    /// Whether this master serves it (see `upgrade.rs`).
    serving: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Server {
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Another copy of the listening socket.
    pub(super) fn dup(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        // Only our own file: a new master may have taken the path meanwhile, or been handed it.
        if *self.serving.borrow() && std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Starts serving the control socket, unless it is off. A socket that cannot be set up is
/// reported and the cluster runs without it. A new master started by an upgrade gets the old
/// one's socket (`handed`, with the path its file has) and serves it once `serving` says so,
/// renaming its file after itself if it has the default name; a master that handed over stops
/// accepting when `serving` turns false.
pub(super) fn serve(
    cfg: &Config,
    name: &str,
    handle: Handle,
    handed: Option<(PathBuf, OwnedFd)>,
    serving: watch::Receiver<bool>,
) -> Option<Server> {
    let path = match &cfg.control_socket {
        ControlSocket::Off => return None,
        ControlSocket::Path(path) => path.clone(),
        ControlSocket::Default => {
            let dir = socket_dir();
            if let Err(e) = prepare_dir(&dir) {
                warning!(event = "control_failed", error = %e, "no control socket: {e}");
                return None;
            }
            remove_stale(&dir);
            dir.join(socket_file_name(name, sys::getpid()))
        }
    };
    let (bound, rename) = match handed {
        Some((from, fd)) => {
            let adopted = adopt(fd, &from);
            (adopted, (from != path).then_some(from))
        }
        None => (bind(&path), None),
    };
    match bound.and_then(|(listener, inode)| Ok((listener.as_fd().try_clone_to_owned()?, listener, inode))) {
        Ok((fd, listener, inode)) => {
            if rename.is_none() {
                note!(event = "control", path = %path.display(), "control socket: {}", path.display());
            }
            let info = Arc::new(Greeting { name: name.to_string() });
            let task =
                tokio::spawn(accept_loop(listener, handle, info, serving.clone(), rename.map(|r| (r, path.clone()))));
            Some(Server { path, inode, fd, serving, task })
        }
        Err(e) => {
            warning!(event = "control_failed", path = %path.display(), error = %e, "no control socket at {}: {e}", path.display());
            None
        }
    }
}

/// Binds the socket at `path` with mode 0600. A socket file left there by a master that is
/// gone is replaced; a live one, or anything that is not a socket, is not touched.
fn bind(path: &Path) -> io::Result<(UnixListener, u64)> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "a file that is not a socket is in the way"));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(io::Error::new(io::ErrorKind::AddrInUse, "another master serves it")),
            Err(_) => std::fs::remove_file(path)?,
        }
    }
    let listener = UnixListener::bind(path)?;
    sys::set_socket_file(path, Some(0o600), None)?;
    let inode = std::fs::symlink_metadata(path)?.ino();
    Ok((listener, inode))
}

/// Takes the control socket an old master handed over, its file at `path`.
fn adopt(fd: OwnedFd, path: &Path) -> io::Result<(UnixListener, u64)> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    let inode = std::fs::symlink_metadata(path)?.ino();
    Ok((UnixListener::from_std(listener)?, inode))
}

/// Removes the socket files of masters that are gone from `dir`.
fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some((_, pid)) = file.to_str().and_then(parse_socket_file_name) else { continue };
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        if is_socket && !sys::alive(pid) && std::fs::remove_file(entry.path()).is_ok() {
            note!(event = "control_stale", pid, "removed the control socket of master {pid}, which is gone");
        }
    }
}

struct Greeting {
    name: String,
}

async fn accept_loop(
    listener: UnixListener,
    handle: Handle,
    info: Arc<Greeting>,
    mut serving: watch::Receiver<bool>,
    rename: Option<(PathBuf, PathBuf)>,
) {
    if serving.wait_for(|serving| *serving).await.is_err() {
        return;
    }
    if let Some((from, to)) = rename {
        // The old master's file, named after it, is named after this one from now on: the
        // same socket, found by `clusterctl` under this master's pid.
        match std::fs::rename(&from, &to) {
            Ok(()) => note!(event = "control", path = %to.display(), "control socket: {} (taken over)", to.display()),
            Err(e) => {
                warning!(event = "control_failed", path = %from.display(), error = %e, "cannot rename the control socket {} to {}: {e}", from.display(), to.display())
            }
        }
    }
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let accepted = tokio::select! {
            biased;
            // Handed over: the new master accepts on this socket now.
            _ = serving.wait_for(|serving| !*serving) => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: nothing queued is lost, try again shortly.
                warning!(event = "control_accept_error", error = %e, "control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (handle, info, slots) = (handle.clone(), info.clone(), slots.clone());
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            if let Err(why) = allowed(&wr) {
                let _ = reply(&mut wr, &json!({"ok": false, "error": why})).await;
                return;
            }
            let Ok(_slot) = slots.try_acquire() else {
                let why = format!("too many control connections (at most {MAX_CLIENTS})");
                let _ = reply(&mut wr, &json!({"ok": false, "error": why})).await;
                return;
            };
            let greeting = json!({
                "cluster": "control",
                "version": PROTOCOL_VERSION,
                "pid": sys::getpid(),
                "name": info.name,
            });
            if reply(&mut wr, &greeting).await.is_ok() {
                let _ = serve_client(rd, wr, handle).await;
            }
        });
    }
}

/// Only this user and root may drive the master.
fn allowed(stream: &OwnedWriteHalf) -> Result<(), String> {
    let cred = stream.as_ref().peer_cred().map_err(|e| format!("cannot read peer credentials: {e}"))?;
    let me = sys::getuid();
    if cred.uid() == me || cred.uid() == 0 {
        return Ok(());
    }
    let pid = cred.pid().unwrap_or(0);
    warning!(
        event = "control_refused",
        uid = cred.uid(),
        peer_pid = pid,
        "control socket: refused uid {} (pid {pid})",
        cred.uid()
    );
    Err(format!("permission denied: uid {} is neither the master's (uid {me}) nor root", cred.uid()))
}

/// Writes one line, or gives up on a client that does not read.
async fn reply(wr: &mut OwnedWriteHalf, value: &Value) -> io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(line.as_bytes())).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "the client does not read")),
    }
}

/// Reads requests and answers them until the client leaves or misbehaves.
async fn serve_client(rd: OwnedReadHalf, mut wr: OwnedWriteHalf, handle: Handle) -> io::Result<()> {
    let mut rd = BufReader::with_capacity(8192, rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        match tokio::time::timeout(IDLE_TIMEOUT, request::read_line(&mut rd, &mut line, MAX_LINE)).await {
            Err(_) => return Ok(()),
            Ok(Ok(false)) => return Ok(()),
            Ok(Ok(true)) => {}
            Ok(Err(e)) => {
                return reply(&mut wr, &json!({"ok": false, "error": e.to_string()})).await;
            }
        }
        let request = match request::parse(&line) {
            Ok(request) => request,
            Err(Refused::Malformed(why)) => return reply(&mut wr, &json!({"ok": false, "error": why})).await,
            Err(Refused::Invalid(why)) => {
                reply(&mut wr, &json!({"ok": false, "error": why})).await?;
                continue;
            }
        };
        if !run(request, &mut wr, &handle).await? {
            return Ok(());
        }
    }
}

/// Runs one request; `false` when the connection should end.
async fn run(request: Request, wr: &mut OwnedWriteHalf, handle: &Handle) -> io::Result<bool> {
    let fail = |e: &str| json!({"ok": false, "error": e});
    let out = match request {
        Request::Ping => json!({"ok": true, "pid": sys::getpid()}),
        Request::Status => match handle.overview().await {
            Some(overview) => status_json(&overview),
            None => fail("the master is stopping"),
        },
        Request::Metrics { per_worker } => match handle.metrics_of(per_worker).await {
            Some(text) => json!({"ok": true, "metrics": text}),
            None => fail("the master is stopping"),
        },
        Request::Scale(to) => match handle.scale(to).await {
            Ok((from, to)) => json!({"ok": true, "from": from, "to": to}),
            Err(e) => fail(&e.to_string()),
        },
        Request::Reload => {
            let progress = ring::ring().subscribe();
            match with_progress(wr, progress, handle.reload_and_wait()).await? {
                Ok(r) => json!({"ok": true, "replaced": r.replaced, "took_ms": r.took.as_millis() as u64}),
                Err(ControlError::Abandoned { id, reason }) => json!({
                    "ok": false,
                    "error": ControlError::Abandoned { id, reason: reason.clone() }.to_string(),
                    "id": id,
                    "reason": reason,
                }),
                Err(e) => fail(&e.to_string()),
            }
        }
        Request::Restart(id) => {
            let progress = ring::ring().subscribe();
            match with_progress(wr, progress, handle.restart(id)).await? {
                Ok((old_pid, pid)) => json!({"ok": true, "id": id, "old_pid": old_pid, "pid": pid}),
                Err(e) => fail(&e.to_string()),
            }
        }
        Request::Stop { fast } => {
            handle.stop(fast);
            reply(wr, &json!({"ok": true, "stopping": true, "pid": sys::getpid()})).await?;
            // The connection closes when the master exits: that is how the client knows.
            std::future::pending::<()>().await;
            return Ok(false);
        }
        Request::Upgrade => {
            let progress = ring::ring().subscribe();
            match with_progress(wr, progress, handle.upgrade()).await? {
                Ok(u) => json!({"ok": true, "old_pid": u.old_pid, "pid": u.pid, "took_ms": u.took.as_millis() as u64}),
                Err(e) => fail(&e.to_string()),
            }
        }
        Request::Watch { interval_ms, logs } => return watch(wr, handle, interval_ms, logs).await,
        Request::Logs { lines, follow } => {
            let (last, mut rx) = ring::ring().tail(lines.min(ring::CAPACITY));
            for record in last {
                reply(wr, &json!({"log": raw(&record)})).await?;
            }
            if !follow {
                json!({"ok": true})
            } else {
                loop {
                    match rx.recv().await {
                        Ok(record) => reply(wr, &json!({"log": raw(&record)})).await?,
                        Err(broadcast::error::RecvError::Lagged(n)) => reply(wr, &json!({"dropped": n})).await?,
                        Err(broadcast::error::RecvError::Closed) => return Ok(false),
                    }
                }
            }
        }
    };
    reply(wr, &out).await?;
    Ok(true)
}

/// Streams the history, then the status every interval and each new log record (after the
/// last `logs` ones), until the master stops or the client leaves: the one request a live view
/// makes (`clusterctl top`).
async fn watch(wr: &mut OwnedWriteHalf, handle: &Handle, interval_ms: Option<u64>, logs: usize) -> io::Result<bool> {
    reply(wr, &json!({"history": handle.history.to_json()})).await?;
    let (last, mut records) = ring::ring().tail(logs.min(ring::CAPACITY));
    for record in last {
        reply(wr, &json!({"log": raw(&record)})).await?;
    }
    let mut tick = tokio::time::interval(interval(interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => match handle.overview().await {
                Some(overview) => reply(wr, &json!({"status": status_json(&overview)})).await?,
                None => {
                    reply(wr, &json!({"ok": false, "error": "the master is stopping"})).await?;
                    return Ok(false);
                }
            },
            record = records.recv() => match record {
                Ok(record) => reply(wr, &json!({"log": raw(&record)})).await?,
                Err(broadcast::error::RecvError::Lagged(n)) => reply(wr, &json!({"dropped": n})).await?,
                Err(broadcast::error::RecvError::Closed) => return Ok(false),
            },
        }
    }
}

/// Waits for `done`, sending the master's log records meanwhile as progress lines.
async fn with_progress<T>(
    wr: &mut OwnedWriteHalf,
    mut progress: broadcast::Receiver<Arc<str>>,
    done: impl Future<Output = T>,
) -> io::Result<T> {
    tokio::pin!(done);
    loop {
        tokio::select! {
            biased;
            out = &mut done => {
                // What was logged up to the end comes before the answer.
                while let Ok(record) = progress.try_recv() {
                    reply(wr, &json!({"progress": raw(&record)})).await?;
                }
                return Ok(out);
            }
            record = progress.recv() => match record {
                Ok(record) => reply(wr, &json!({"progress": raw(&record)})).await?,
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {}
            },
        }
    }
}

/// A ring record (a JSON object in text) as a value.
fn raw(record: &str) -> Value {
    serde_json::from_str(record).unwrap_or(Value::Null)
}
