//! Counting the connections a worker's user code closed, without a hook on the streams (the
//! least-connections balancer and the open-connections cap need them; `client.rs` reports them).

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::sys;

/// How often a worker looks for connections user code closed.
pub(super) const CLOSE_CHECK: Duration = Duration::from_millis(20);

/// Connections this worker owns, for counting closes without a hook on the streams.
#[derive(Default)]
pub(super) struct OpenConns {
    /// By descriptor number: the socket's inode once a sweep has seen it (a number can be
    /// reused after a close; an inode is not).
    pub(super) fds: HashMap<RawFd, Option<u64>>,
    /// Closes noticed and not yet reported.
    pub(super) closed: u32,
}

impl OpenConns {
    /// A connection is acknowledged on `fd`. If that number was still tracked, its previous
    /// connection is closed (the kernel reuses a number only once it is free): no syscall.
    pub(super) fn track(&mut self, fd: RawFd) {
        if self.fds.insert(fd, None).is_some() {
            self.closed += 1;
        }
    }

    /// Finds the tracked connections closed since the last sweep: one `fstat` each.
    pub(super) fn sweep(&mut self) -> u32 {
        let before = self.fds.len();
        self.fds.retain(|fd, seen| match (sys::inode(*fd), *seen) {
            (None, _) => false,
            (Some(now), Some(then)) if now != then => false,
            (now, _) => {
                *seen = now;
                true
            }
        });
        std::mem::take(&mut self.closed) + (before - self.fds.len()) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::OpenConns;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn open_connections_count_each_close_once() {
        let mut open = OpenConns::default();
        let (a, _a) = UnixStream::pair().unwrap();
        let (b, _b) = UnixStream::pair().unwrap();
        open.track(a.as_raw_fd());
        open.track(b.as_raw_fd());
        assert_eq!(open.sweep(), 0, "both open");
        drop(a);
        assert_eq!(open.sweep(), 1, "a closed");
        assert_eq!(open.sweep(), 0, "counted once");
        // A number handed out again means its previous connection closed, sweep or not.
        open.track(b.as_raw_fd());
        assert_eq!(open.sweep(), 1);
        // A number now used by another socket than the one a sweep saw: closed.
        let (c, _c) = UnixStream::pair().unwrap();
        let c_fd = c.as_raw_fd();
        drop(b);
        assert_eq!(open.sweep(), 1);
        open.fds.insert(c_fd, Some(u64::MAX));
        assert_eq!(open.sweep(), 1, "same number, other inode");
        assert!(open.fds.is_empty());
    }
}
