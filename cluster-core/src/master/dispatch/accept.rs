//! The accept side of the data path: the threads that accept (`accept_threads`), one accept
//! loop per listening socket on each, the gathering of new connections between passes, and the
//! sweep of a socket's last connections when it closes. What is accepted goes to the dispatch
//! table (`dispatch/mod.rs`).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

use super::gate::Gate;
use super::{Conn, Dispatch};
use crate::ipc::message::{ListenKey, MAX_FDS};
use crate::log::{note, warning};
use crate::sys::{self, is_connection_error};

/// The master's data-path threads: `accept_threads` of them (at least one), each running a
/// single-threaded runtime with its own reactor, started with the master. Each runs one accept
/// loop per listening socket (on its own duplicate of the socket), all sharing the one dispatch
/// table; the first also reads the workers' channels (`master/process.rs`), so the
/// acknowledgements that come in while connections gather are read in the same wake-up. The
/// master's own thread (the supervisor, signals, the control socket) never accepts: none of
/// them waits behind a pass over a busy listener or a gathering.
pub(crate) struct AcceptThreads {
    /// See [`gathering`].
    gather: Duration,
    handles: Vec<tokio::runtime::Handle>,
}

/// The accept loops of one listening socket, one per accept thread.
pub(crate) struct Accepting {
    loops: Vec<JoinHandle<()>>,
    /// Held open by the loops while they accept and dispatch; [`stop`] closes it, so that
    /// once it returns no loop accepts any more: a loop is aborted only at its next yield, on
    /// a thread of its own (`gate.rs`, model-checked).
    ///
    /// [`stop`]: Accepting::stop
    open: Arc<Gate>,
}

impl AcceptThreads {
    /// Starts the threads. One that cannot start is reported; with none at all, the loops run
    /// on the caller's runtime (as they did before this split).
    pub(crate) fn new(accept_threads: usize, gather: Duration) -> Self {
        // Their log goes where the master's does (a subscriber of its own is thread-local).
        let log = tracing::dispatcher::get_default(Clone::clone);
        let handles: Vec<_> = (1..=accept_threads.max(1)).filter_map(|i| start_thread(i, log.clone())).collect();
        let count = handles.len();
        note!(event = "accept_threads", count, "accepting on {count} thread(s) of their own");
        AcceptThreads { gather, handles }
    }

    /// The runtime of the first data-path thread, where the workers' channels are read.
    pub(crate) fn data_path(&self) -> tokio::runtime::Handle {
        self.handles.first().cloned().unwrap_or_else(tokio::runtime::Handle::current)
    }

    /// Starts accepting on `socket` on every accept thread.
    pub(crate) fn start(&self, socket: &Socket, key: ListenKey, dispatch: &Arc<Dispatch>) -> Accepting {
        let open = Arc::new(Gate::new());
        let gather = self.gather;
        let mut loops = Vec::new();
        let current = [tokio::runtime::Handle::current()];
        let handles = if self.handles.is_empty() { &current[..] } else { &self.handles[..] };
        for handle in handles {
            let (dispatch, open) = (dispatch.clone(), open.clone());
            // Registered with that thread's reactor, so the duplicate is made here and
            // registered there.
            match socket.try_clone() {
                Ok(dup) => loops.push(handle.spawn(async move {
                    match sys::watch(dup) {
                        Ok(dup) => accept_loop(dup, key, dispatch, gather, open).await,
                        Err(e) => warning!(event = "accept_thread_failed", key, error = %e, "an accept thread cannot watch listener {key}: {e}"),
                    }
                })),
                Err(e) => {
                    warning!(event = "accept_thread_failed", key, error = %e, "an accept thread cannot share listener {key}: {e}")
                }
            }
        }
        Accepting { loops, open }
    }
}

/// Starts accept thread `i` (1-based): a single-threaded runtime that runs until the process
/// exits, logging through `log`.
fn start_thread(i: usize, log: tracing::Dispatch) -> Option<tokio::runtime::Handle> {
    let started = tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|rt| {
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name(format!("accept-{i}"))
            .spawn(move || {
                let _log = tracing::dispatcher::set_default(&log);
                rt.block_on(std::future::pending::<()>())
            })
            .map(|_| handle)
    });
    started
        .inspect_err(|e| warning!(event = "accept_thread_failed", error = %e, "cannot start accept thread {i}: {e}"))
        .ok()
}

impl Accepting {
    /// Stops every loop: none accepts once this returns.
    pub(crate) fn stop(self) {
        self.open.close();
        for task in self.loops {
            task.abort();
        }
    }
}

/// How one pass over a listener's queue ended.
enum Pass {
    /// The queue is empty, or workers have no more room: this many were taken.
    Done(usize),
    /// `accept` failed (file descriptors exhausted and the like).
    Failed(io::Error),
    /// The listener was shut down or its loop stopped: nothing more to accept.
    Closed,
}

/// While passes come this many gathering times apart or closer, connections are arriving
/// fast enough for gathering to pay (see [`gathering`]).
const GATHER_WHEN_CLOSER: u32 = 10;

/// How long to let connections gather before the next pass over a listener's queue, after a
/// pass at `now` that took `took` connections; `previous` is when the pass before ended.
///
/// Every pass costs the master a wake-up (the kernel's scheduler, its reactor, the tasks it
/// runs), and on a busy machine that is most of what a connection costs it: passes that find
/// one or two connections each make `rr` spend more CPU per connection than anything else.
/// Waiting a little after a pass lets the next one take several, sent in fewer messages, and
/// the acknowledgements that came meanwhile are read in one go too. It only starts once
/// connections keep coming: the pass took some, and the one before ended less than
/// [`GATHER_WHEN_CLOSER`] gathering times ago, so a connection that arrives alone is never
/// held, and one that arrives during a gathering waits at most `gather`.
fn gathering(gather: Duration, took: usize, previous: Option<Instant>, now: Instant) -> Option<Duration> {
    let recent = previous.is_some_and(|then| now.saturating_duration_since(then) < gather * GATHER_WHEN_CLOSER);
    (!gather.is_zero() && took > 0 && recent).then_some(gather)
}

thread_local! {
    /// When a gathering on this thread last ended.
    static GATHERED: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Lets connections gather for `wait`, on this thread, not on a timer: the runtime's timers
/// tick in milliseconds, and the point is that nothing wakes the thread meanwhile. The other
/// tasks of the thread wait at most this long. The accept loops of several busy listeners on
/// one thread share one gathering: a loop whose thread gathered less than `wait` ago goes on.
fn gather_on_this_thread(wait: Duration, now: Instant) {
    if GATHERED.get().is_some_and(|ended| now.saturating_duration_since(ended) < wait) {
        return;
    }
    std::thread::sleep(wait);
    GATHERED.set(Some(Instant::now()));
}

/// Accepts connections on one listening socket and dispatches them, while workers have room:
/// as many as they can take (up to one message's worth) per lock of the table. `gather`: see
/// [`gathering`]; `open`: see [`Accepting`].
async fn accept_loop(
    listener: AsyncFd<Socket>,
    key: ListenKey,
    dispatch: Arc<Dispatch>,
    gather: Duration,
    open: Arc<Gate>,
) {
    let mut batch: Vec<Conn> = Vec::with_capacity(MAX_FDS);
    let mut failing: Option<(Instant, u64)> = None;
    let mut previous: Option<Instant> = None;
    loop {
        dispatch.wait_room(key).await;
        let Ok(mut ready) = listener.readable().await else { return };
        let pass = open.pass(|| take(&mut ready, key, &dispatch, &mut batch)).unwrap_or(Pass::Closed);
        match pass {
            Pass::Closed => return,
            Pass::Failed(e) => {
                dispatch.accept_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // EMFILE / ENFILE and the like: the client stays in the kernel's queue. Back
                // off instead of spinning, and say so once per episode, not per attempt.
                match &mut failing {
                    Some((_, n)) => *n += 1,
                    None => {
                        warning!(event = "accept_error", key, error = %e, "accept error on listener {key}: {e}; retrying every 100 ms until it clears");
                        failing = Some((Instant::now(), 1));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Pass::Done(took) => {
                let now = Instant::now();
                if let Some(wait) = gathering(gather, took, previous, now) {
                    gather_on_this_thread(wait, now);
                }
                previous = Some(now);
                if let Some((since, n)) = failing.take() {
                    let secs = since.elapsed().as_secs_f64();
                    note!(
                        event = "accept_recovered",
                        key,
                        failed = n,
                        "accepts on listener {key} work again after {secs:.1}s ({n} failed attempts)"
                    );
                }
            }
        }
    }
}

/// Drains the kernel's queue while workers have room: accepts as many as they can take (up to
/// one message's worth) and dispatches them, until the queue is empty or the room is gone.
fn take(
    ready: &mut tokio::io::unix::AsyncFdReadyGuard<'_, Socket>,
    key: ListenKey,
    dispatch: &Dispatch,
    batch: &mut Vec<Conn>,
) -> Pass {
    let mut took = 0;
    loop {
        let room = dispatch.room(key).min(MAX_FDS);
        if room == 0 {
            return Pass::Done(took);
        }
        let mut error = None;
        while batch.len() < room {
            match ready.try_io(|l| sys::accept(l.get_ref())) {
                Ok(Ok((socket, peer))) => batch.push(Conn { key, socket, peer: peer.as_socket() }),
                Ok(Err(e)) if is_connection_error(&e) => {}
                Ok(Err(e)) => {
                    error = Some(e);
                    break;
                }
                Err(_would_block) => break,
            }
        }
        let full = batch.len() == room;
        took += batch.len();
        if !batch.is_empty() {
            dispatch.dispatch(key, batch);
        }
        match error {
            // Shut down: the master is closing this socket, and its loops are being stopped.
            Some(e) if e.kind() == io::ErrorKind::InvalidInput => return Pass::Closed,
            Some(e) => return Pass::Failed(e),
            None if !full => return Pass::Done(took),
            None => {}
        }
    }
}

/// Takes every connection the kernel has already completed on `listener` (clients that are
/// connected but not yet accepted) and queues them for workers, so that closing the socket
/// right after resets nobody who was already let in.
pub(crate) fn sweep(listener: &Socket, key: ListenKey, dispatch: &Dispatch) -> usize {
    let mut n = 0;
    let mut batch = Vec::new();
    loop {
        match sys::accept(listener) {
            Ok((socket, peer)) => {
                batch.push(Conn { key, socket, peer: peer.as_socket() });
                n += 1;
            }
            Err(e) if is_connection_error(&e) => {}
            Err(_) => break,
        }
    }
    dispatch.dispatch(key, &mut batch);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Duration = Duration::from_micros(100);

    #[test]
    fn connections_gather_only_while_they_keep_coming() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        // The first pass after a quiet spell, and a lone connection long after the last
        // pass, go out at once and hold nothing after them.
        assert_eq!(gathering(G, 1, None, at(0)), None);
        assert_eq!(gathering(G, 1, Some(at(0)), at(5_000)), None);
        assert_eq!(gathering(G, 3, Some(at(0)), at(1_000)), None, "ten gathering times apart is not close");
        // Passes close together: wait one gathering time before the next.
        assert_eq!(gathering(G, 1, Some(at(0)), at(999)), Some(G));
        assert_eq!(gathering(G, 64, Some(at(0)), at(150)), Some(G));
        // A pass that took nothing (a spurious wake, or no room) waits for nothing.
        assert_eq!(gathering(G, 0, Some(at(0)), at(50)), None);
        // Off.
        assert_eq!(gathering(Duration::ZERO, 5, Some(at(0)), at(1)), None);
        // The threshold scales with the setting.
        let g = Duration::from_micros(500);
        assert_eq!(gathering(g, 1, Some(at(0)), at(4_999)), Some(g));
        assert_eq!(gathering(g, 1, Some(at(0)), at(5_000)), None);
    }
}
