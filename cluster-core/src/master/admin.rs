//! The admin HTTP endpoint (`CLUSTER_ADMIN_ADDR`), for probes and scrapers that cannot use a
//! Unix socket: `GET /healthz` (200 while the master runs), `GET /readyz` (200 once a worker
//! is ready, 503 before that and while stopping), `GET /metrics` (Prometheus text). HTTP/1.1
//! by hand, one request per connection: three fixed paths do not need an HTTP stack in the
//! master. A connection whose first line is `agent` gets HAProxy's agent-check answer instead
//! (`agent_reply`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::handle::Handle;
use super::types::{AGENT_ID, WorkerState};
use crate::log::note;

/// Longest request head read.
const MAX_HEAD: usize = 8192;
/// A client gets this long to send its request and take the answer.
const TIMEOUT: Duration = Duration::from_secs(5);

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
            let handle = handle.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(TIMEOUT, answer(stream, handle)).await;
            });
        }
    });
    Ok(Admin { task, fd })
}

async fn answer(mut stream: TcpStream, handle: Handle) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
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
            return stream.shutdown().await;
        }
        if head.len() > MAX_HEAD {
            return respond(&mut stream, 431, "text/plain", "request head too large\n", true).await;
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let body_wanted = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET and HEAD\n", body_wanted).await;
    }
    match path.split('?').next().unwrap_or("") {
        "/healthz" => respond(&mut stream, 200, "text/plain", "ok\n", body_wanted).await,
        "/readyz" => {
            let (code, text) = match handle.snapshot().await {
                Some(s) if s.master.stopping => (503, "stopping\n".to_string()),
                Some(s) => {
                    let workers = s.workers.iter().filter(|w| w.id != AGENT_ID);
                    let ready = workers.filter(|w| w.state == WorkerState::Ready).count();
                    let text = format!("{ready}/{} workers ready\n", s.master.workers_target);
                    (if ready > 0 { 200 } else { 503 }, text)
                }
                None => (503, "stopping\n".to_string()),
            };
            respond(&mut stream, code, "text/plain", &text, body_wanted).await
        }
        "/metrics" => match handle.metrics_of(query_flag(path, "per_worker")).await {
            Some(text) => respond(&mut stream, 200, "text/plain; version=0.0.4", &text, body_wanted).await,
            None => respond(&mut stream, 503, "text/plain", "stopping\n", body_wanted).await,
        },
        _ => respond(&mut stream, 404, "text/plain", "not found: /healthz, /readyz, /metrics\n", body_wanted).await,
    }
}

/// What HAProxy's agent check (`agent-check agent-send "agent\n"` on the admin port) is told:
/// `drain` while stopping (the stop delay included), `down` while no worker is ready, and
/// otherwise `ready up` with a weight that follows the ready workers out of those wanted
/// (`ready` ends a drain an earlier master of this address asked for).
fn agent_reply(stopping: bool, ready: usize, target: usize) -> String {
    if stopping {
        "drain #stopping\n".into()
    } else if ready == 0 {
        "down #no worker ready\n".into()
    } else {
        let weight = (ready * 100 / target.max(ready)).max(1);
        format!("ready up {weight}%\n")
    }
}

/// Whether `path`'s query sets `name` (`?name=1` or `?name=true`).
fn query_flag(path: &str, name: &str) -> bool {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    query.split('&').any(|kv| {
        kv == name || kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')).is_some_and(|v| v == "1" || v == "true")
    })
}

async fn respond(stream: &mut TcpStream, code: u16, kind: &str, body: &str, with_body: bool) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
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
