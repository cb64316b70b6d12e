//! Every libc call and `unsafe` block of the crate lives here, split by subject; the rest of
//! the crate deals in `OwnedFd`, `io::Result` and plain Rust types, and cannot write `unsafe`
//! (`#![deny(unsafe_code)]` in `lib.rs`, allowed on this module only). Each `unsafe` block
//! says why it is sound (`clippy::undocumented_unsafe_blocks`).

mod creds;
mod diag;
mod fd;
mod init;
mod process;
mod procfs;
mod shm;

pub(crate) use creds::{Credentials, geteuid, getuid, lookup_credentials, may_write_dir, set_socket_file};
pub(crate) use diag::{accept_queue_len, pending_handshakes, stop_queueing, tcp_connection_inodes};
pub use fd::ChannelFdError;
pub(crate) use fd::{
    accept, adopt_channel_fd, adopt_inherited_socket, inode, is_connection_error, recv_with_fds, register, send_now,
    send_with_fds, watch,
};
pub(crate) use init::{become_init_if_pid_1, set_under_own_init, tell_init_successor, under_own_init};
pub(crate) use process::{
    alive, die_when_orphaned, exit_now, getpid, new_session, prepare_successor_command, prepare_worker_command,
    raise_fd_limit, remove_env, signal,
};
pub(crate) use procfs::{cpu_time, rss, socket_inodes};
pub(crate) use shm::{Mapping, create_segment, map_segment};

use std::io;

/// Turns a libc return value into an `io::Result`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}
