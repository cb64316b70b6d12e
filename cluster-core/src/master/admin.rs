//! The admin HTTP endpoint (`CLUSTER_ADMIN_ADDR`), for probes, scrapers and people that cannot
//! use a Unix socket: `GET /healthz` (200 while the master runs), `GET /readyz` (200 once a
//! worker is ready, 503 before that and while stopping), `GET /metrics` (Prometheus text),
//! `GET /` (the status page, `admin/page.html`), `GET /status.json` (the status, `?history=1`
//! with the history) and `GET /events` (the page's server-sent events: the history, then the
//! status each second). HTTP/1.1 by hand, one request per connection: a few fixed paths and
//! one event stream do not need an HTTP stack in the master. A connection whose first line is
//! `agent` gets HAProxy's agent-check answer instead (`agent_reply`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::handle::Handle;
use super::types::{AGENT_ID, WorkerState};
use super::watch::{interval, status_json};
use crate::log::note;

/// Longest request head read.
const MAX_HEAD: usize = 8192;
/// A client gets this long to send its request and take the answer (an event stream: to take
/// each event).
const TIMEOUT: Duration = Duration::from_secs(5);
/// Event streams served at once; more are answered 503.
const MAX_STREAMS: usize = 32;
/// The status page: one file, its style and script inline, nothing fetched from elsewhere.
const PAGE: &str = include_str!("admin/page.html");
/// What the page may load and connect to: itself only.
const PAGE_POLICY: &str =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:";

/// The endpoint, served until dropped.
pub(super) struct Admin {
    task: JoinHandle<()>,
    /// A copy of the listening socket, for a successor.
    fd: OwnedFd,
}

impl Admin {
    /// Another copy of the listening socket.
    pub(super) fn dup(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the endpoint on `addr`, or on the socket an old master handed over (`handed`), while
/// `serving` says so (see `upgrade.rs`).
pub(super) async fn serve(
    addr: SocketAddr,
    handed: Option<OwnedFd>,
    handle: Handle,
    mut serving: watch::Receiver<bool>,
) -> io::Result<Admin> {
    let listener = match handed {
        Some(fd) => {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)?
        }
        None => TcpListener::bind(addr).await?,
    };
    let local = listener.local_addr()?;
    let fd = listener.as_fd().try_clone_to_owned()?;
    let task = tokio::spawn(async move {
        if serving.wait_for(|serving| *serving).await.is_err() {
            return;
        }
        note!(event = "admin", addr = %local, "admin endpoint on http://{local}");
        let streams = Arc::new(Semaphore::new(MAX_STREAMS));
        loop {
            let accepted = tokio::select! {
                biased;
                _ = serving.wait_for(|serving| !*serving) => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (handle, streams) = (handle.clone(), streams.clone());
            tokio::spawn(async move {
                let _ = answer(stream, handle, streams).await;
            });
        }
    });
    Ok(Admin { task, fd })
}

async fn answer(mut stream: TcpStream, handle: Handle, streams: Arc<Semaphore>) -> io::Result<()> {
    let path = match tokio::time::timeout(TIMEOUT, route(&mut stream, &handle)).await {
        Ok(Ok(Some(path))) => path,
        Ok(result) => return result.map(drop),
        Err(_) => return Ok(()),
    };
    // The page's event stream, no deadline as a whole.
    let Ok(_slot) = streams.try_acquire() else {
        return respond(&mut stream, 503, "text/plain", "too many event streams\n", true).await;
    };
    events(&mut stream, &handle, &path).await
}

/// Reads a request and answers it, except for the event stream: its path is returned.
async fn route(stream: &mut TcpStream, handle: &Handle) -> io::Result<Option<String>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
        if head == b"agent\n" || head == b"agent\r\n" {
            let reply = match handle.snapshot().await {
                Some(s) => {
                    let workers = s.workers.iter().filter(|w| w.id != AGENT_ID);
                    let ready = workers.filter(|w| w.state == WorkerState::Ready).count();
                    agent_reply(s.master.stopping, ready, s.master.workers_target)
                }
                None => agent_reply(true, 0, 0),
            };
            stream.write_all(reply.as_bytes()).await?;
            stream.shutdown().await?;
            return Ok(None);
        }
        if head.len() > MAX_HEAD {
            respond(stream, 431, "text/plain", "request head too large\n", true).await?;
            return Ok(None);
        }
    }
    let (method, path) = request_line(&head);
    let (method, path) = (method.as_str(), path.as_str());
    let body_wanted = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        respond(stream, 405, "text/plain", "only GET and HEAD\n", body_wanted).await?;
        return Ok(None);
    }
    let stopping = "stopping\n";
    match path.split('?').next().unwrap_or("") {
        "/healthz" => respond(stream, 200, "text/plain", "ok\n", body_wanted).await?,
        "/readyz" => {
            let (code, text) = match handle.snapshot().await {
                Some(s) if s.master.stopping => (503, stopping.to_string()),
                Some(s) => {
                    let workers = s.workers.iter().filter(|w| w.id != AGENT_ID);
                    let ready = workers.filter(|w| w.state == WorkerState::Ready).count();
                    let text = format!("{ready}/{} workers ready\n", s.master.workers_target);
                    (if ready > 0 { 200 } else { 503 }, text)
                }
                None => (503, stopping.to_string()),
            };
            respond(stream, code, "text/plain", &text, body_wanted).await?
        }
        "/metrics" => match handle.metrics_of(query_flag(path, "per_worker")).await {
            Some(text) => respond(stream, 200, "text/plain; version=0.0.4", &text, body_wanted).await?,
            None => respond(stream, 503, "text/plain", stopping, body_wanted).await?,
        },
        "/" => {
            let headers = format!("content-security-policy: {PAGE_POLICY}\r\ncache-control: no-store\r\n");
            write_response(stream, 200, "text/html; charset=utf-8", &headers, PAGE, body_wanted).await?
        }
        "/status.json" => match handle.overview().await {
            Some(overview) => {
                let mut status = status_json(&overview);
                if query_flag(path, "history") {
                    status["history"] = handle.history.to_json();
                }
                let headers = "cache-control: no-store\r\n";
                write_response(stream, 200, "application/json", headers, &status.to_string(), body_wanted).await?
            }
            None => respond(stream, 503, "text/plain", stopping, body_wanted).await?,
        },
        "/events" if body_wanted => return Ok(Some(path.to_string())),
        "/events" => respond(stream, 200, "text/event-stream", "", false).await?,
        _ => {
            let paths = "not found: /, /status.json, /events, /healthz, /readyz, /metrics\n";
            respond(stream, 404, "text/plain", paths, body_wanted).await?
        }
    }
    Ok(None)
}

/// The method and path of a request head's first line (empty when missing).
pub(super) fn request_line(head: &[u8]) -> (String, String) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string())
}

/// The page's event stream (`text/event-stream`): a `history` event, then a `status` event
/// each interval (`?interval_ms=`, 1 s by default) until the master stops or the page leaves.
/// A browser's `EventSource` reconnects by itself, to whichever master serves the port then.
async fn events(stream: &mut TcpStream, handle: &Handle, path: &str) -> io::Result<()> {
    let interval_ms = query_value(path, "interval_ms").and_then(|v| v.parse().ok());
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\nconnection: close\r\n\r\nretry: 1000\n\n";
    let history = format!("event: history\ndata: {}\n\n", handle.history.to_json());
    send(stream, &format!("{head}{history}")).await?;
    let mut tick = tokio::time::interval(interval(interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gone = [0u8; 64];
    loop {
        tokio::select! {
            _ = tick.tick() => match handle.overview().await {
                Some(overview) => send(stream, &format!("event: status\ndata: {}\n\n", status_json(&overview))).await?,
                None => return stream.shutdown().await,
            },
            // The page left (or sent something it should not have).
            _ = stream.read(&mut gone) => return Ok(()),
        }
    }
}

/// Writes `text`, or gives up on a client that does not take it within [`TIMEOUT`].
async fn send(stream: &mut TcpStream, text: &str) -> io::Result<()> {
    match tokio::time::timeout(TIMEOUT, stream.write_all(text.as_bytes())).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "the client does not read")),
    }
}

/// What HAProxy's agent check (`agent-check agent-send "agent\n"` on the admin port) is told:
/// `drain` while stopping (the stop delay included), `down` while no worker is ready, and
/// otherwise `ready up` with a weight that follows the ready workers out of those wanted
/// (`ready` ends a drain an earlier master of this address asked for).
pub(super) fn agent_reply(stopping: bool, ready: usize, target: usize) -> String {
    if stopping {
        "drain #stopping\n".into()
    } else if ready == 0 {
        "down #no worker ready\n".into()
    } else {
        let weight = (ready * 100 / target.max(ready)).max(1);
        format!("ready up {weight}%\n")
    }
}

/// Whether `path`'s query sets `name` (`?name`, `?name=1` or `?name=true`).
pub(super) fn query_flag(path: &str, name: &str) -> bool {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    query.split('&').any(|kv| kv == name) || query_value(path, name).is_some_and(|v| v == "1" || v == "true")
}

/// The value `path`'s query gives `name` (`?name=value`), if it does.
pub(super) fn query_value<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

async fn respond(stream: &mut TcpStream, code: u16, kind: &str, body: &str, with_body: bool) -> io::Result<()> {
    write_response(stream, code, kind, "", body, with_body).await
}

/// Writes a whole response, `headers` (each line ending in CRLF) after the usual ones, and
/// closes the connection.
async fn write_response(
    stream: &mut TcpStream,
    code: u16,
    kind: &str,
    headers: &str,
    body: &str,
    with_body: bool,
) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n{headers}connection: close\r\n\r\n",
        body.len()
    );
    if with_body {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::agent_reply;

    #[test]
    fn the_agent_check_drains_while_stopping_and_weighs_by_ready_workers() {
        assert_eq!(agent_reply(true, 4, 4), "drain #stopping\n");
        assert_eq!(agent_reply(false, 0, 4), "down #no worker ready\n");
        assert_eq!(agent_reply(false, 4, 4), "ready up 100%\n");
        assert_eq!(agent_reply(false, 3, 4), "ready up 75%\n");
        assert_eq!(agent_reply(false, 1, 200), "ready up 1%\n");
        assert_eq!(agent_reply(false, 5, 4), "ready up 100%\n", "a scale-down under way");
    }
}
