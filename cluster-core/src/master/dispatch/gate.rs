//! The accept gate: what makes [`Accepting::stop`](super::accept::Accepting::stop) final.
//!
//! A listening socket's accept loops run on threads of their own, and aborting a task only
//! takes effect at its next yield: a loop in the middle of a pass (accepting and dispatching)
//! would go on taking connections from a socket the master has already handed over or closed.
//! So a pass runs inside the gate, holding it open (a read lock), and closing the gate takes
//! the write lock: once [`Gate::close`] returns, every pass under way has ended and none
//! starts. The model check below runs with `--cfg cluster_loom`: the lock is then loom's, and
//! loom runs the protocol under every interleaving.

#[cfg(cluster_loom)]
use loom::sync::RwLock;
#[cfg(not(cluster_loom))]
use std::sync::RwLock;

/// Open until closed.
pub(crate) struct Gate(RwLock<bool>);

impl Gate {
    pub(crate) fn new() -> Gate {
        Gate(RwLock::new(true))
    }

    /// Runs `pass` if the gate is open, holding it open until `pass` returns; `None` once it
    /// is closed.
    pub(crate) fn pass<T>(&self, pass: impl FnOnce() -> T) -> Option<T> {
        let open = self.0.read().unwrap_or_else(|e| e.into_inner());
        if *open { Some(pass()) } else { None }
    }

    /// Closes the gate: when this returns, no pass is under way and none will run.
    pub(crate) fn close(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = false;
    }
}

#[cfg(all(test, not(cluster_loom)))]
mod tests {
    use super::Gate;

    #[test]
    fn a_pass_runs_while_open_and_never_after_close() {
        let gate = Gate::new();
        assert_eq!(gate.pass(|| 7), Some(7));
        gate.close();
        assert_eq!(gate.pass(|| panic!("a pass after close")), None::<()>);
    }
}

/// The model check: `RUSTFLAGS="--cfg cluster_loom" cargo test -p cluster-core --lib --release
/// --target-dir target/loom gate` (`.ci/run` runs it).
#[cfg(all(test, cluster_loom))]
mod model {
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

    use super::Gate;

    /// Two accept loops on threads of their own, a pass each, over a queue of two
    /// connections, while the master stops the socket: in no interleaving does a loop take a
    /// connection after `close` returned. (Without the gate, a pass that saw the gate open
    /// before `close` and takes after it: this fails, checked by dropping the read guard
    /// before `pass` runs.)
    #[test]
    fn once_close_returns_no_loop_takes_a_connection() {
        loom::model(|| {
            let gate = Arc::new(Gate::new());
            let queue = Arc::new(AtomicUsize::new(2));
            let stopped = Arc::new(AtomicBool::new(false));
            let late = Arc::new(AtomicUsize::new(0));
            let loops: Vec<_> = (0..2)
                .map(|_| {
                    let (gate, queue, stopped, late) = (gate.clone(), queue.clone(), stopped.clone(), late.clone());
                    loom::thread::spawn(move || {
                        gate.pass(|| {
                            // accept(2): one connection off the queue, if there is one.
                            if queue.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() && stopped.load(SeqCst)
                            {
                                late.fetch_add(1, SeqCst);
                            }
                        });
                    })
                })
                .collect();
            gate.close();
            stopped.store(true, SeqCst);
            for l in loops {
                l.join().unwrap();
            }
            assert_eq!(late.load(SeqCst), 0, "a connection was taken after stop returned");
        });
    }
}
