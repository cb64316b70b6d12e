//! Every libc call and `unsafe` block of the crate lives here.
//!
//! The rest of the crate deals in `OwnedFd`, `io::Result` and plain Rust types.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Turns a libc return value into an `io::Result`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// Reads an integer socket option.
fn sockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes passed.
    check(unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) })?;
    Ok(value)
}

/// Why an inherited fd cannot be used as the worker's IPC channel.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum ChannelFdError {
    #[error("fd {fd} is not open ({source})")]
    NotOpen { fd: RawFd, source: io::Error },
    #[error("fd {fd} is not a socket ({source})")]
    NotSocket { fd: RawFd, source: io::Error },
    #[error("fd {fd} is not an AF_UNIX socket (domain {domain})")]
    WrongDomain { fd: RawFd, domain: libc::c_int },
    #[error("fd {fd} is not a SOCK_SEQPACKET socket (type {ty})")]
    WrongType { fd: RawFd, ty: libc::c_int },
}

/// Checks that `fd` is an open AF_UNIX SOCK_SEQPACKET socket, takes ownership of it and marks
/// it close-on-exec so that programs the worker starts do not inherit it.
///
/// Must be called at most once per fd, before anything else claims it.
pub(crate) fn adopt_channel_fd(fd: RawFd) -> Result<OwnedFd, ChannelFdError> {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    let flags =
        check(unsafe { libc::fcntl(fd, libc::F_GETFD) }).map_err(|source| ChannelFdError::NotOpen { fd, source })?;
    let domain = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)
        .map_err(|source| ChannelFdError::NotSocket { fd, source })?;
    if domain != libc::AF_UNIX {
        return Err(ChannelFdError::WrongDomain { fd, domain });
    }
    let ty =
        sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|source| ChannelFdError::NotSocket { fd, source })?;
    if ty != libc::SOCK_SEQPACKET {
        return Err(ChannelFdError::WrongType { fd, ty });
    }
    // SAFETY: the fd is open; FD_CLOEXEC and O_NONBLOCK change nothing but how exec and I/O
    // treat it (tokio needs it non-blocking).
    unsafe {
        check(libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC))
            .and_then(|_| check(libc::fcntl(fd, libc::F_GETFL)))
            .and_then(|fl| check(libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK)))
            .map_err(|source| ChannelFdError::NotOpen { fd, source })?;
    }
    // SAFETY: the fd is open and, per this function's contract, owned by no one else: it was
    // inherited from the master for this purpose.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes a variable from the process environment, if no other thread of this process runs
/// (only then is `remove_var` sound: no thread can be reading the environment, and none can
/// start meanwhile, since only this one could start it). False if it left the variable.
pub(crate) fn remove_env(name: &str) -> bool {
    if !single_threaded() {
        return false;
    }
    // SAFETY: this is the process's only thread (see above).
    unsafe { std::env::remove_var(name) };
    true
}

/// Whether this process has exactly one thread.
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}

/// Prepares a freshly forked worker, between `fork` and `exec`.
///
/// Puts the channel at `target` (clearing close-on-exec only in the child), and asks the kernel
/// to SIGKILL the worker if the master dies, so no worker is ever orphaned.
///
/// # Safety
/// Must only be called in the child of a `fork`, as a `pre_exec` hook: it only makes
/// async-signal-safe calls.
pub(crate) unsafe fn child_setup(
    channel: RawFd,
    target: RawFd,
    master_pid: libc::pid_t,
    creds: Option<&Credentials>,
) -> io::Result<()> {
    // SAFETY (all calls below): async-signal-safe syscalls on descriptors of this process.
    unsafe {
        // Groups, then the group, then the user (after which nothing else could be changed);
        // before PR_SET_PDEATHSIG, which a change of credentials clears.
        if let Some(c) = creds {
            check(libc::setgroups(c.groups.len(), c.groups.as_ptr()))?;
            check(libc::setgid(c.gid))?;
            check(libc::setuid(c.uid))?;
        }
        if channel == target {
            let flags = check(libc::fcntl(target, libc::F_GETFD))?;
            check(libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC))?;
        } else {
            // dup2 leaves the new descriptor without FD_CLOEXEC.
            check(libc::dup2(channel, target))?;
        }
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        // The master may have died between fork and prctl: then nobody would send the signal.
        if libc::getppid() != master_pid {
            libc::_exit(1);
        }
    }
    Ok(())
}

/// Accepts a connection as non-blocking and close-on-exec in one call. Workers rely on it:
/// the descriptors they get are ready for tokio without another syscall.
pub(crate) fn accept(listener: &socket2::Socket) -> io::Result<(socket2::Socket, socket2::SockAddr)> {
    listener.accept4(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
}

/// This process's id.
pub(crate) fn getpid() -> u32 {
    std::process::id()
}

/// This process's effective user id.
pub(crate) fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// This process's real user id.
pub(crate) fn getuid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Whether process `pid` exists (it may belong to another user).
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 checks for existence and permission only; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// CPU time (user + system) process `pid` has used, from `/proc/<pid>/stat`.
pub(crate) fn cpu_time(pid: u32) -> io::Result<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces and parentheses): state is the
    // 3rd field of the line, utime the 14th, stime the 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let field = |n: usize| rest.split_whitespace().nth(n - 3).and_then(|f| f.parse::<u64>().ok());
    let ticks = field(14)
        .zip(field(15))
        .map(|(u, s)| u + s)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/<pid>/stat format"))?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    Ok(std::time::Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Inodes of the sockets process `pid` has open (from `/proc/<pid>/fd`).
pub(crate) fn socket_inodes(pid: u32) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else { continue };
        let target = target.to_string_lossy();
        if let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) {
            out.extend(inode.parse::<u64>().ok());
        }
    }
    Ok(out)
}

/// Inodes of every TCP connection of this network namespace that is established or closing
/// (not listening, not a handshake), read with one `sock_diag` dump per address family.
pub(crate) fn tcp_connection_inodes() -> io::Result<std::collections::HashSet<u64>> {
    // ESTABLISHED .. CLOSING (1..=11) except LISTEN (10).
    const STATES: u32 = 0b1111_1111_1110 & !(1 << 10);
    let mut out = std::collections::HashSet::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        diag_dump(family as u8, STATES, |msg| {
            // inet_diag_msg: 4 bytes, inet_diag_sockid (48), expires, rqueue, wqueue, uid,
            // then the inode.
            if let Some(inode) = msg.get(68..72) {
                out.insert(u64::from(u32::from_ne_bytes(inode.try_into().expect("4 bytes"))));
            }
        })?;
    }
    Ok(out)
}

/// The inode of whatever `fd` refers to now, or `None` if it is not open. Used to notice that
/// a connection handed to user code was closed (its number may be reused, its inode is not).
pub(crate) fn inode(fd: RawFd) -> Option<u64> {
    // SAFETY: fstat writes into `stat` only; a closed fd number is just EBADF.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstat(fd, &mut stat) };
    (rc == 0).then_some(stat.st_ino)
}

/// Resident memory of process `pid`, in bytes (from `/proc/<pid>/statm`).
pub(crate) fn rss(pid: u32) -> io::Result<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/<pid>/statm format"))?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * u64::try_from(page).unwrap_or(4096))
}

/// Sends one datagram without waiting, from code that cannot await (the panic hook).
///
/// Fails with `WouldBlock` when the socket buffer is full.
pub(crate) fn send_now(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of `data.len()` bytes.
    let n = unsafe {
        libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Immediately terminates the process, without running destructors or atexit handlers.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Arranges for [`child_setup`] to run in the worker between fork and exec.
pub(crate) fn prepare_worker_command(
    cmd: &mut std::process::Command,
    channel: RawFd,
    target: RawFd,
    creds: Option<std::sync::Arc<Credentials>>,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: `getpid` has no preconditions.
    let master = unsafe { libc::getpid() };
    // SAFETY: the hook runs in the forked child and makes only async-signal-safe calls (the
    // group list was read in the parent).
    unsafe {
        cmd.pre_exec(move || child_setup(channel, target, master, creds.as_deref()));
    }
}

/// Arranges for a new master (an upgrade's successor) to get `channel` at `target`, with
/// close-on-exec cleared only in it. Unlike a worker it gets no parent-death signal: it must
/// outlive the master that starts it.
pub(crate) fn prepare_successor_command(cmd: &mut std::process::Command, channel: RawFd, target: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child and makes only async-signal-safe calls
    // (fcntl, dup2) on a descriptor the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            if channel == target {
                let flags = check(libc::fcntl(target, libc::F_GETFD))?;
                check(libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC))?;
            } else {
                check(libc::dup2(channel, target))?;
            }
            Ok(())
        });
    }
}

/// Sends `sig` to process `pid`. Only for a child not yet reaped (its pid cannot have been
/// reused).
pub(crate) fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill has no memory-safety preconditions.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// Who workers run as (`CLUSTER_USER` / `CLUSTER_GROUP`), resolved in the master before
/// anything starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub(crate) uid: libc::uid_t,
    pub(crate) gid: libc::gid_t,
    /// Supplementary groups: the user's (as `initgroups` would set them), or just `gid`.
    pub(crate) groups: Vec<libc::gid_t>,
}

/// Resolves a user (name or number) and optionally a group (name or number; default: the
/// user's primary group) into credentials, with the user's supplementary groups.
pub(crate) fn lookup_credentials(user: Option<&str>, group: Option<&str>) -> Result<Credentials, String> {
    let (uid, mut gid, name) = match user {
        Some(user) => {
            let (uid, gid, name) = lookup_user(user)?;
            (uid, gid, Some(name))
        }
        // Only a group: keep this user.
        // SAFETY: getgid has no preconditions and cannot fail.
        None => (getuid(), unsafe { libc::getgid() }, None),
    };
    if let Some(group) = group {
        gid = lookup_group(group)?;
    }
    let groups = match &name {
        Some(name) => supplementary_groups(name, gid)?,
        None => vec![gid],
    };
    Ok(Credentials { uid, gid, groups })
}

fn lookup_user(user: &str) -> Result<(libc::uid_t, libc::gid_t, std::ffi::CString), String> {
    let cname = std::ffi::CString::new(user).map_err(|_| format!("user {user:?} contains a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwnam_r/getpwuid_r write only into `pwd`, `buf` (of the length given) and
    // `found`; the pointers in `pwd` point into `buf`, which outlives their use here.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = match user.parse::<libc::uid_t>() {
            Ok(uid) => libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found),
            Err(_) => libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found),
        };
        if rc != 0 {
            return Err(format!("cannot look up user {user:?}: {}", io::Error::from_raw_os_error(rc)));
        }
        if found.is_null() {
            return Err(format!("no such user: {user:?}"));
        }
        let name = std::ffi::CStr::from_ptr(pwd.pw_name).to_owned();
        Ok((pwd.pw_uid, pwd.pw_gid, name))
    }
}

fn lookup_group(group: &str) -> Result<libc::gid_t, String> {
    let cname = std::ffi::CString::new(group).map_err(|_| format!("group {group:?} contains a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: as in `lookup_user`, for the group database.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut found: *mut libc::group = std::ptr::null_mut();
        let rc = match group.parse::<libc::gid_t>() {
            Ok(gid) => libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut found),
            Err(_) => libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut found),
        };
        if rc != 0 {
            return Err(format!("cannot look up group {group:?}: {}", io::Error::from_raw_os_error(rc)));
        }
        if found.is_null() {
            return Err(format!("no such group: {group:?}"));
        }
        Ok(grp.gr_gid)
    }
}

/// The groups `initgroups(name, gid)` would set, read here so the child only calls `setgroups`.
fn supplementary_groups(name: &std::ffi::CStr, gid: libc::gid_t) -> Result<Vec<libc::gid_t>, String> {
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let before = n;
        // SAFETY: getgrouplist writes at most `n` entries into `groups` and sets `n`.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n as usize);
            return Ok(groups);
        }
        if n <= before {
            n = before * 2;
        }
        if n > 65_536 {
            return Err(format!("user {name:?} is in too many groups"));
        }
    }
}

/// Whether `creds` may create files in `dir` (write and search permission, by the mode bits).
pub(crate) fn may_write_dir(dir: &std::path::Path, creds: &Credentials) -> io::Result<bool> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dir)?;
    let mode = meta.permissions().mode();
    let bits = if creds.uid == 0 {
        return Ok(true);
    } else if meta.uid() == creds.uid {
        mode >> 6
    } else if creds.groups.contains(&meta.gid()) || meta.gid() == creds.gid {
        mode >> 3
    } else {
        mode
    };
    Ok(bits & 0o3 == 0o3)
}

/// Sets the mode and owner of the socket file at `path` through a descriptor of the file
/// itself (`O_PATH | O_NOFOLLOW`): if `path` is not a socket any more (a symlink or another
/// file was put there), nothing is changed and it is an error.
pub(crate) fn set_socket_file(
    path: &std::path::Path,
    mode: Option<u32>,
    owner: Option<(libc::uid_t, libc::gid_t)>,
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: `cpath` is a valid C string; the returned descriptor is owned below.
    let fd = check(unsafe { libc::open(cpath.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: fstat writes into `stat` only.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) })?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} is not the socket just bound (replaced meanwhile?)", path.display()),
        ));
    }
    if let Some((uid, gid)) = owner {
        // SAFETY: AT_EMPTY_PATH with "" acts on `fd` itself.
        check(unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) })?;
    }
    if let Some(mode) = mode {
        // chmod has no "empty path" form for an O_PATH descriptor; its /proc link names the
        // file it was opened on, not whatever `path` holds now.
        let perms = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode);
        std::fs::set_permissions(format!("/proc/self/fd/{}", fd.as_raw_fd()), perms)?;
    }
    Ok(())
}

/// Takes ownership of `fd`, inherited from a service manager, if it is a socket; `None` (and
/// the descriptor left alone) otherwise.
pub(crate) fn adopt_inherited_socket(fd: RawFd) -> Option<socket2::Socket> {
    // SAFETY: fstat writes into `stat` only.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    // SAFETY: the service manager passed this descriptor to this process for it to own, and
    // nothing else in the process has taken it (it is read once, at start).
    Some(unsafe { <socket2::Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Raises this process's soft limit of open files to its hard limit (at most 2^20), as Go's
/// runtime does: a server that holds many connections should not stop at the historical 1024
/// soft limit, and the hard limit is the administrator's word. Workers inherit it. Returns the
/// soft limit before and after.
pub(crate) fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the struct passed.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    let before = lim.rlim_cur;
    let target = lim.rlim_max.min(1 << 20);
    if before < target {
        lim.rlim_cur = target;
        // SAFETY: setrlimit reads only the struct passed.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok((before, lim.rlim_cur))
}

/// Whether this master runs under the minimal init of [`become_init_if_pid_1`] (its own, or,
/// after an upgrade, its predecessor's).
static UNDER_OWN_INIT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// See [`UNDER_OWN_INIT`].
pub(crate) fn under_own_init() -> bool {
    UNDER_OWN_INIT.load(std::sync::atomic::Ordering::Relaxed)
}

/// A new master started by an upgrade of a master that runs under the minimal init.
pub(crate) fn set_under_own_init() {
    UNDER_OWN_INIT.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The signal by which a master that hands over names its successor to the minimal init,
/// with the successor's pid as the signal's value.
fn successor_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

/// Tells the minimal init (PID 1, see [`become_init_if_pid_1`]) that `pid` is the master from
/// now on: it forwards signals to that one and exits with its status, not this one's. Only
/// under that init (another PID 1, such as systemd, gives real-time signals other meanings).
pub(crate) fn tell_init_successor(pid: u32) -> io::Result<()> {
    if !under_own_init() {
        return Ok(());
    }
    let value = libc::sigval { sival_ptr: pid as usize as *mut libc::c_void };
    // SAFETY: sigqueue has no memory-safety preconditions; the value is a plain integer.
    check(unsafe { libc::sigqueue(1, successor_signal(), value) }).map(drop)
}

/// As PID 1 (a container's init), forks: the child returns and runs the master; this process
/// stays as a minimal init that forwards signals to it, reaps every orphan that the kernel
/// hands to PID 1, and exits with the master's status. A master that upgrades names its
/// successor ([`tell_init_successor`]), which is the master from then on. Anything else:
/// returns at once. Call it before any thread starts.
pub(crate) fn become_init_if_pid_1() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        return;
    }
    // SAFETY: sigset operations on a local set; fork before any other thread exists (the
    // caller's contract), so the child is a full copy of a single-threaded process. Signals
    // stay blocked in this process: blocked signals are queued even for a namespace's init,
    // whose default dispositions would otherwise drop them.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_BLOCK, &all, &mut old);
        let master = libc::fork();
        if master < 0 {
            // No init: run as PID 1 directly (orphans then stay zombies).
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            return;
        }
        if master == 0 {
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            set_under_own_init();
            return;
        }
        let mut master = master;
        // The successor named by the master, read with its signal.
        let successor = |info: &libc::siginfo_t, master: libc::pid_t| {
            (info.si_pid() == master).then(|| info.si_value().sival_ptr as usize as libc::pid_t)
        };
        let mut named: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut named);
        libc::sigaddset(&mut named, successor_signal());
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(&all, &mut info);
            if sig == libc::SIGCHLD {
                loop {
                    let mut status = 0;
                    let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                    if pid <= 0 {
                        break;
                    }
                    if pid == master {
                        // A master that handed over named its successor before it exited; the
                        // signal may still wait behind this SIGCHLD (lower signals come first).
                        let mut info: libc::siginfo_t = std::mem::zeroed();
                        let now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                        if libc::sigtimedwait(&named, &mut info, &now) > 0
                            && let Some(next) = successor(&info, master)
                        {
                            master = next;
                            continue;
                        }
                        let code = if libc::WIFEXITED(status) {
                            libc::WEXITSTATUS(status)
                        } else {
                            128 + libc::WTERMSIG(status)
                        };
                        libc::_exit(code);
                    }
                }
            } else if sig == successor_signal() {
                if let Some(next) = successor(&info, master) {
                    master = next;
                }
            } else if sig > 0 {
                // Everything else is for the master (SIGTERM from `docker stop`, SIGHUP, …).
                libc::kill(master, sig);
            }
        }
    }
}

/// Registers a socket the caller owns with tokio's reactor.
pub(crate) fn watch(socket: socket2::Socket) -> io::Result<tokio::io::unix::AsyncFd<socket2::Socket>> {
    register(socket, tokio::io::Interest::READABLE)
}

/// A descriptor the caller owns, registered with the reactor for `interest` only.
pub(crate) fn register<T: Owns>(io: T, interest: tokio::io::Interest) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `T` owns its descriptor (see `Owns`): it stays open, and `as_raw_fd` keeps
    // returning it, until the `AsyncFd` (which owns the `T`) is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(io, interest) }.map_err(|e| e.into_parts().1)
}

/// Types that own the one descriptor they return from `as_raw_fd`, for their whole life.
pub(crate) trait Owns: AsRawFd {}
impl Owns for OwnedFd {}
impl Owns for socket2::Socket {}

/// Sends one datagram with `fds` attached as SCM_RIGHTS, without blocking (`MSG_DONTWAIT`):
/// fails with `WouldBlock` when the socket buffer is full.
pub(crate) fn send_with_fds(socket: BorrowedFd<'_>, data: &[u8], fds: &[impl AsFd]) -> io::Result<()> {
    if fds.len() > SCM_MAX_FD {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many file descriptors for one message"));
    }
    // Aligned room for one SCM_RIGHTS header and the most descriptors the kernel takes.
    let mut control = [0u64; (SCM_MAX_FD * 4 + 64) / 8];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: zeroed msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = (fds.len() * std::mem::size_of::<RawFd>()) as u32;
        // SAFETY: CMSG_* compute sizes and pointers inside `control`, which is large enough and
        // 8-byte aligned; we write exactly CMSG_LEN(payload) bytes into it.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(payload) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            let dst = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                dst.add(i).write_unaligned(fd.as_fd().as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `iov`, `data` and `control`, all alive for the call.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// One datagram taken off a socket by [`recv_with_fds`].
pub(crate) struct Received {
    /// Bytes written to the data buffer.
    pub(crate) len: usize,
    /// The datagram was longer than the buffer (`MSG_TRUNC`): the rest is lost.
    pub(crate) truncated: bool,
    /// The kernel cut the ancillary data (`MSG_CTRUNC`): more descriptors came than fit, or this
    /// process's descriptor table is full. `fds` holds the ones that were installed.
    pub(crate) fds_cut: bool,
    /// Descriptors passed as SCM_RIGHTS, close-on-exec, in the order they were sent.
    pub(crate) fds: Vec<OwnedFd>,
    /// The level and type of an ancillary message other than SCM_RIGHTS, if one came.
    pub(crate) unexpected: Option<(libc::c_int, libc::c_int)>,
}

/// Receives one datagram without blocking (`MSG_DONTWAIT`), with room for up to `max_fds`
/// passed descriptors: fails with `WouldBlock` when nothing is queued. A plain `recv` would
/// make the kernel close passed descriptors, so every receive on a channel goes through here.
pub(crate) fn recv_with_fds(socket: BorrowedFd<'_>, data: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let max_fds = max_fds.min(SCM_MAX_FD);
    let mut control = [0u64; (SCM_MAX_FD * 4 + 64) / 8];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: zeroed msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size; it is at most the size of `control`.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<RawFd>()) as u32) } as _;
    let flags = libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    // SAFETY: `msg` points at `iov`, `data` and `control`, all alive for the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut received = Received {
        len: n as usize,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_cut: msg.msg_flags & libc::MSG_CTRUNC != 0,
        fds: Vec::new(),
        unexpected: None,
    };
    // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed cmsg headers into
    // `control`; CMSG_FIRSTHDR/NXTHDR walk only within them. Each SCM_RIGHTS payload holds
    // descriptors just installed in this process, owned by nobody else: we take them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let (level, ty) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let src = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    received.fds.push(OwnedFd::from_raw_fd(src.add(i).read_unaligned()));
                }
            } else {
                received.unexpected = Some((level, ty));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(received)
}

/// The most descriptors the kernel passes in one message (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// One classic BPF instruction.
const fn bpf(code: u32, jt: u8, jf: u8, k: u32) -> socket2::SockFilter {
    socket2::SockFilter::new(code as u16, jt, jf, k)
}

/// Makes a TCP listening socket drop every SYN that would start a new handshake, while the
/// connections already in its accept queue stay there to be accepted and the handshakes
/// already under way complete (their ACK gets through) and join that queue. Clients that
/// arrive after this retry their SYN; by then the socket is closed and they are refused (or,
/// in a `SO_REUSEPORT` group, go to another member). Used to drain a queue without the race
/// between "it is empty" and closing it; see [`pending_handshakes`] for the ones under way.
///
/// A TCP socket filter sees the segment from its TCP header on: byte 13 holds the flags. The
/// connections accepted from here on inherit the filter, which costs them nothing: they
/// drop the SYNs an established connection never needs.
pub(crate) fn stop_queueing(listener: &socket2::Socket) -> io::Result<()> {
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    let drop_syn = [
        bpf(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 13),
        bpf(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0, 0, SYN | ACK),
        bpf(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, SYN),
        bpf(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
        bpf(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
    ];
    listener.attach_filter(&drop_syn)
}

/// How many completed connections wait in a TCP listening socket's accept queue (for a
/// listener, `TCP_INFO`'s `tcpi_unacked` is the queue length).
pub(crate) fn accept_queue_len(listener: &socket2::Socket) -> io::Result<u32> {
    // SAFETY: an all-zero `tcp_info` is valid; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    check(unsafe {
        libc::getsockopt(listener.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len)
    })?;
    Ok(info.tcpi_unacked)
}

/// The handshakes under way (SYN received, SYN-ACK sent, the client's ACK not yet in)
/// towards the ports of the TCP listeners bound to `locals`, one list per listener, each
/// handshake named by its kernel cookie, read with one `sock_diag` netlink dump per address
/// family. A listening socket does not count them anywhere; once its SYNs are dropped
/// ([`stop_queueing`]) no new one starts, and each one that is gone has become a connection in
/// an accept queue (or timed out). The members of a `SO_REUSEPORT` group share the port, so
/// their handshakes are all listed. A handshake has the family of its listener (IPv4 clients
/// of a dual-stack IPv6 socket included).
pub(crate) fn pending_handshakes(locals: &[std::net::SocketAddr]) -> io::Result<Vec<Vec<u64>>> {
    let mut found = vec![Vec::new(); locals.len()];
    for (family, v4) in [(libc::AF_INET, true), (libc::AF_INET6, false)] {
        if !locals.iter().any(|l| l.is_ipv4() == v4) {
            continue;
        }
        // Request socks are TCP_NEW_SYN_RECV (12) inside the kernel, TCP_SYN_RECV (3) in dumps.
        diag_dump(family as u8, 1 << 3 | 1 << 12, |msg| {
            // inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid: sport (big
            // endian), dport, src[16], dst[16], if, cookie[2] (host order).
            if msg.len() < 52 {
                return;
            }
            let port = u16::from_be_bytes([msg[4], msg[5]]);
            let half = |at: usize| u64::from(u32::from_ne_bytes(msg[at..at + 4].try_into().expect("4 bytes")));
            for (i, local) in locals.iter().enumerate() {
                if local.is_ipv4() == v4 && local.port() == port {
                    found[i].push(half(44) | half(48) << 32);
                }
            }
        })?;
    }
    Ok(found)
}

/// Dumps the TCP sockets of `family` in `states` (a bit per TCP state) over
/// `NETLINK_SOCK_DIAG`, calling `each` with every `inet_diag_msg`.
fn diag_dump(family: u8, states: u32, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const HEADER: usize = 16; // struct nlmsghdr
    let socket = socket2::Socket::new(
        socket2::Domain::from(libc::AF_NETLINK),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )?;
    // nlmsghdr, then inet_diag_req_v2: family, protocol, ext, pad, states, and an all-zero
    // inet_diag_sockid (a dump matches every socket in `states`).
    let mut request = [0u8; HEADER + 56];
    request[0..4].copy_from_slice(&((HEADER + 56) as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    request[HEADER] = family;
    request[HEADER + 1] = libc::IPPROTO_TCP as u8;
    request[HEADER + 4..HEADER + 8].copy_from_slice(&states.to_ne_bytes());
    socket.send(&request)?;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = io::Read::read(&mut &socket, &mut buf)?;
        let mut at = 0;
        while at + HEADER <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < HEADER || at + len > n {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "sock_diag: truncated message"));
            }
            let body = &buf[at + HEADER..at + len];
            match i32::from(kind) {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    let code = body.get(..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                    return Err(if code < 0 {
                        io::Error::from_raw_os_error(-code)
                    } else {
                        io::Error::new(io::ErrorKind::InvalidData, "sock_diag: bad error message")
                    });
                }
                _ if kind == SOCK_DIAG_BY_FAMILY => each(body),
                _ => {}
            }
            at += (len + 3) & !3;
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sock_diag: dump ended early"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{SocketAddr, TcpStream};
    use std::time::{Duration, Instant};

    use socket2::{Domain, Socket, Type};

    use super::{accept_queue_len, bpf, pending_handshakes, single_threaded, stop_queueing};

    #[test]
    fn the_environment_is_left_alone_while_other_threads_run() {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || stopped.recv());
        assert!(!single_threaded());
        // Cargo sets it for every test run.
        let before = std::env::var_os("CARGO_MANIFEST_DIR");
        assert!(before.is_some());
        assert!(!super::remove_env("CARGO_MANIFEST_DIR"));
        assert_eq!(std::env::var_os("CARGO_MANIFEST_DIR"), before);
        stop.send(()).unwrap();
        other.join().unwrap().unwrap();
    }

    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_listener_that_stopped_queueing_keeps_its_queue_completes_handshakes_and_lets_no_one_new_in() {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        listener.listen(16).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let queued: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(accept_queue_len(&listener).unwrap(), 3);

        // Hold one handshake open: the listener drops the client's final ACK (any segment
        // with the ACK flag), so the client is connected and the server side is not.
        let drop_acks = [
            bpf(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 13),
            bpf(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, 0, 1, 0x10),
            bpf(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
            bpf(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
        ];
        listener.attach_filter(&drop_acks).unwrap();
        let mut halfway = TcpStream::connect(addr).unwrap();
        assert_eq!(pending_handshakes(&[addr]).unwrap()[0].len(), 1);
        // One dump serves several listeners, each getting its own.
        let other = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        other.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        other.listen(16).unwrap();
        let other_addr = other.local_addr().unwrap().as_socket().unwrap();
        let lists = pending_handshakes(&[other_addr, addr]).unwrap();
        assert_eq!((lists[0].len(), lists[1].len()), (0, 1));
        assert_eq!(accept_queue_len(&listener).unwrap(), 3);

        stop_queueing(&listener).unwrap();
        // The handshake under way completes with the client's next segment and joins the queue.
        halfway.write_all(b"x").unwrap();
        eventually("the held handshake to complete", || accept_queue_len(&listener).unwrap() == 4);
        assert_eq!(pending_handshakes(&[addr]).unwrap(), [Vec::<u64>::new()]);
        // A new SYN is dropped: no handshake starts, the client waits for a retry.
        let late = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(late.is_err(), "a client got in after stop_queueing");
        assert_eq!(pending_handshakes(&[addr]).unwrap(), [Vec::<u64>::new()]);
        assert_eq!(accept_queue_len(&listener).unwrap(), 4);

        for _ in 0..queued.len() + 1 {
            super::accept(&listener).unwrap();
        }
        assert_eq!(accept_queue_len(&listener).unwrap(), 0);
    }
}
