//! Processes and signals: what a worker or a new master gets between fork and exec, who this
//! process is, signals to a child, the environment, the open-files limit.

use std::io;
use std::os::fd::RawFd;

use super::check;
use super::creds::Credentials;

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
/// to send the worker [`orphan_signal`] if the master dies: the worker then finishes its
/// connections, and dies at the latest at its deadline ([`die_when_orphaned`]).
///
/// # Safety
/// Must only be called in the child of a `fork`, as a `pre_exec` hook: it only makes
/// async-signal-safe calls.
pub(crate) unsafe fn child_setup(
    channel: RawFd,
    target: RawFd,
    master_pid: libc::pid_t,
    orphan: libc::c_int,
    creds: Option<&Credentials>,
) -> io::Result<()> {
    // SAFETY: async-signal-safe syscalls only, on this process and its descriptors (all the
    // calls below).
    unsafe {
        // Groups, then the group, then the user (after which nothing else could be changed);
        // before PR_SET_PDEATHSIG, which a change of credentials clears.
        if let Some(c) = creds {
            check(libc::setgroups(c.groups.len(), c.groups.as_ptr()))?;
            check(libc::setgid(c.gid))?;
            check(libc::setuid(c.uid))?;
        }
        inherit_at(channel, target)?;
        check(libc::prctl(libc::PR_SET_PDEATHSIG, orphan, 0, 0, 0))?;
        // The master may have died between fork and prctl: then nobody would send the signal.
        if libc::getppid() != master_pid {
            libc::_exit(1);
        }
    }
    Ok(())
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
    let orphan = orphan_signal();
    // SAFETY: the hook runs in the forked child and makes only async-signal-safe calls (the
    // group list was read in the parent).
    unsafe {
        cmd.pre_exec(move || child_setup(channel, target, master, orphan, creds.as_deref()));
    }
}

/// The signal the kernel sends a worker when its master dies (`PR_SET_PDEATHSIG`): the last
/// real-time signal, which neither the C library nor tokio uses. Until the worker has set its
/// handler up, its default action ends the worker (it had not served yet).
pub(crate) fn orphan_signal() -> libc::c_int {
    libc::SIGRTMAX()
}

/// Whole seconds [`on_orphaned`] arms the alarm for.
static ORPHAN_DEADLINE_SECS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

extern "C" fn on_orphaned(_: libc::c_int) {
    let secs = ORPHAN_DEADLINE_SECS.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: `alarm` is async-signal-safe, and the atomic load above is lock-free.
    unsafe { libc::alarm(secs) };
}

/// The backstop of a worker whose master died: from the moment [`orphan_signal`] arrives, the
/// process is ended by SIGALRM (its default action) `after` that (rounded up to a second),
/// whatever its runtime is doing. The graceful path (`worker/client.rs`: the channel's end
/// seen, the listeners closed, the connections finished, the exit) is expected first; this is
/// for a worker whose runtime is stuck.
pub(crate) fn die_when_orphaned(after: std::time::Duration) -> io::Result<()> {
    let secs = u32::try_from(after.as_millis().div_ceil(1000)).unwrap_or(u32::MAX).max(1);
    ORPHAN_DEADLINE_SECS.store(secs, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is a valid value to fill in; the handler only makes an
    // async-signal-safe call; SIGALRM is set back to its default action, which ends the process.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_orphaned as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        check(libc::sigemptyset(&mut action.sa_mask))?;
        check(libc::sigaction(orphan_signal(), &action, std::ptr::null_mut()))?;
        if libc::signal(libc::SIGALRM, libc::SIG_DFL) == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Arranges for a new master (an upgrade's successor) to get `channel` at `target`, with
/// close-on-exec cleared only in it. Unlike a worker it gets no parent-death signal: it must
/// outlive the master that starts it.
pub(crate) fn prepare_successor_command(cmd: &mut std::process::Command, channel: RawFd, target: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child and makes only async-signal-safe calls
    // (fcntl, dup2) on a descriptor the child inherited.
    unsafe {
        cmd.pre_exec(move || inherit_at(channel, target));
    }
}

/// Makes the command's process the leader of a new session (`setsid`) before it runs: no
/// controlling terminal, and out of the starting shell's session and process groups, so a
/// closed terminal or a Ctrl-C there does not reach it.
pub(crate) fn new_session(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child and makes one async-signal-safe call.
    unsafe {
        cmd.pre_exec(|| check(libc::setsid()).map(drop));
    }
}

/// In a forked child: makes `channel` available at `target` across `exec`, clearing
/// close-on-exec in the child only (the parent's descriptor keeps it).
///
/// # Safety
/// Only between `fork` and `exec` (it makes only async-signal-safe calls), on descriptors of
/// this process.
unsafe fn inherit_at(channel: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: fcntl and dup2 on this process's descriptors; async-signal-safe.
    unsafe {
        if channel == target {
            let flags = check(libc::fcntl(target, libc::F_GETFD))?;
            check(libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC))?;
        } else {
            // dup2 leaves the new descriptor without FD_CLOEXEC.
            check(libc::dup2(channel, target))?;
        }
    }
    Ok(())
}

/// This process's id.
pub(crate) fn getpid() -> u32 {
    std::process::id()
}

/// Whether process `pid` exists (it may belong to another user).
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 checks for existence and permission only; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Sends `sig` to process `pid`. Only for a child not yet reaped (its pid cannot have been
/// reused).
pub(crate) fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill has no memory-safety preconditions.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// Immediately terminates the process, without running destructors or atexit handlers.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(code) }
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

#[cfg(test)]
mod tests {
    use super::single_threaded;

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
}
