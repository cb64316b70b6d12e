use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::task::{Context, Poll, ready};

use tokio::net::UnixStream;
use tokio::net::unix::SocketAddr;

use super::proxy::Proxy;
use crate::ipc::message::Endpoint;
use crate::worker::client;

/// Longest path that fits `sun_path` with its terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// A Unix domain stream listener that works the same in a worker and in a single process.
///
/// In a worker, [`bind`](Self::bind) asks the master, which binds the path once and hands
/// each connection to a worker, exactly as for [`TcpListener`](super::TcpListener). The master
/// replaces a stale socket file left by a dead process, refuses to take over one a live
/// process listens on (`AddrInUse`), applies the requested permissions, and removes the file
/// when it exits. Outside a cluster the listener binds directly and removes the file when
/// dropped.
#[derive(Debug)]
pub struct UnixListener {
    inner: Inner,
    path: PathBuf,
}

#[derive(Debug)]
enum Inner {
    Direct(tokio::net::UnixListener),
    Cluster(Proxy),
}

impl UnixListener {
    /// Binds `path` with the default permissions (umask).
    pub async fn bind(path: impl AsRef<Path>) -> io::Result<UnixListener> {
        Self::bind_with_mode(path, None).await
    }

    /// Binds `path` and sets its permission bits to `mode` (e.g. `0o660`).
    pub async fn bind_with_mode(path: impl AsRef<Path>, mode: Option<u32>) -> io::Result<UnixListener> {
        let path = path.as_ref().to_path_buf();
        check_len(&path)?;
        let inner = match client::client() {
            Some(client) => {
                let (key, _, queue) = client.listen(Endpoint::Unix { path: path.clone(), mode }).await?;
                Inner::Cluster(Proxy::new(client.clone(), key, queue))
            }
            None => {
                let socket = bind_unix(&path, mode, 1024, None)?;
                Inner::Direct(tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(
                    std::os::fd::OwnedFd::from(socket),
                ))?)
            }
        };
        Ok(UnixListener { inner, path })
    }

    /// The path this listener is bound to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the next connection. Cancel-safe. After the worker is asked to stop, returns
    /// what was already handed over, then an error for which [`is_closed`](super::is_closed)
    /// is true.
    pub async fn accept(&mut self) -> io::Result<(UnixStream, SocketAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for the next connection.
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(UnixStream, SocketAddr)>> {
        match &mut self.inner {
            Inner::Direct(l) => l.poll_accept(cx),
            Inner::Cluster(proxy) => {
                let conn = ready!(proxy.poll_next(cx))?;
                // Non-blocking already (the master accepts with SOCK_NONBLOCK).
                let stream = std::os::unix::net::UnixStream::from(conn.fd);
                let stream = UnixStream::from_std(stream)?;
                let peer = stream.peer_addr()?;
                Poll::Ready(Ok((stream, peer)))
            }
        }
    }
}

impl Drop for UnixListener {
    fn drop(&mut self) {
        // The master owns (and removes) the file of a clustered listener.
        if matches!(self.inner, Inner::Direct(_)) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn check_len(path: &Path) -> io::Result<()> {
    let len = path.as_os_str().len();
    if len > SUN_PATH_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unix socket path {} is {len} bytes; at most {SUN_PATH_MAX} fit in sun_path (use a shorter or relative path)",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Binds a listening Unix socket at `path`: replaces a stale socket file (nobody accepts on
/// it) of the same owner, refuses one a live process listens on, sets `mode`, non-blocking,
/// close-on-exec.
///
/// `owner`: the user the workers run as, when it is not the master's (`CLUSTER_USER`). A
/// worker's request must not get more from the master than the worker could do itself: the
/// directory must be writable by that user, only that user's stale socket is replaced, and the
/// new file is given to that user. Mode and owner are set through a descriptor of the file
/// itself (`O_PATH | O_NOFOLLOW`), so a symlink swapped in meanwhile is never followed.
pub(crate) fn bind_unix(
    path: &Path,
    mode: Option<u32>,
    backlog: i32,
    owner: Option<&crate::sys::Credentials>,
) -> io::Result<socket2::Socket> {
    check_len(path)?;
    if let Some(owner) = owner {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !crate::sys::may_write_dir(dir, owner)? {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the workers' user (uid {}) cannot create files in {}", owner.uid, dir.display()),
            ));
        }
    }
    let uid = owner.map_or_else(crate::sys::geteuid, |o| o.uid);
    let listener = match std::os::unix::net::UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let meta = std::fs::symlink_metadata(path).ok();
            let is_socket = meta.as_ref().is_some_and(|m| m.file_type().is_socket());
            match std::os::unix::net::UnixStream::connect(path) {
                _ if !is_socket => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", path.display()),
                    ));
                }
                _ if meta.as_ref().is_some_and(|m| std::os::unix::fs::MetadataExt::uid(m) != uid) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is another user's socket; it is left alone", path.display()),
                    ));
                }
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("a live process is listening on {}", path.display()),
                    ));
                }
                Err(c) if c.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                    std::os::unix::net::UnixListener::bind(path)?
                }
                Err(_) => return Err(e),
            }
        }
        other => other?,
    };
    if mode.is_some() || owner.is_some() {
        crate::sys::set_socket_file(path, mode, owner.map(|o| (o.uid, o.gid)))?;
    }
    let socket = socket2::Socket::from(std::os::fd::OwnedFd::from(listener));
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}
