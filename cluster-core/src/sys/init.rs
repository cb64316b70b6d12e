//! The PID-1 init: as a container's first process the master forks, and the parent stays a
//! minimal init that reaps orphans and forwards signals (ARCHITECTURE.md, "Service managers
//! and containers").

use std::io;

use super::check;

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
