//! When a TCP listening socket being closed may be shut down without resetting a client: the
//! decision, on given instants and facts, with no socket or clock (`listeners/mod.rs` reads
//! the kernel and carries it out).
//!
//! Once the kernel starts no new handshake on the socket (`sys::stop_queueing`), two things
//! can still put a client in its queue: a SYN that raced with the filter, and the handshakes
//! already under way, which complete and join the queue. So a socket waits [`SETTLE`] for the
//! first, then for the handshakes it lists (by their kernel cookies) to be gone, then
//! [`SETTLE`] again (a completed handshake leaves the table a moment before its connection is
//! counted in the queue), and for whoever accepts on it to empty its queue. It is given up,
//! with what it holds, when no live worker accepts on it any more, or after [`DRAIN_LIMIT`] (a
//! client that never answers the SYN-ACK holds the close that long).

use std::time::{Duration, Instant};

use crate::log::log;

/// Longest wait for workers to empty a socket's accept queue (they take a full one in
/// milliseconds; a hung worker must not hold the others' stop).
pub(super) const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How long a closing socket waits for the handshakes under way on it when the kernel cannot
/// list them (no `sock_diag`): a round trip on a local network, with room to spare.
pub(super) const HANDSHAKE_GRACE: Duration = Duration::from_millis(200);
/// A moment for the kernel to finish what it was doing when a socket's state was read: a SYN
/// racing with the filter entering the table of handshakes, a completed handshake leaving it
/// and being counted in the accept queue.
pub(super) const SETTLE: Duration = Duration::from_millis(5);

/// One socket's drain: since when, and the handshakes it waits for.
#[derive(Debug)]
pub(super) struct Drain {
    since: Instant,
    handshakes: Handshakes,
}

/// The handshakes towards a draining socket's port that were under way when it stopped
/// queueing, named by their kernel cookies.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum Handshakes {
    /// Listed once a SYN that raced with the filter has had time to enter the kernel's table.
    #[default]
    Unlisted,
    /// Those still in the table.
    Pending(Vec<u64>),
    /// The last one was seen gone at this instant.
    Done(Instant),
    /// They cannot be listed (no `sock_diag`): they are given [`HANDSHAKE_GRACE`].
    Unknown,
}

/// What to do with a draining socket now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// A client may still join its queue, or its queue is not empty yet.
    Wait,
    /// Nothing is left that a close would reset: shut it down.
    Close,
    /// Shut it down with what it holds, for this reason.
    GiveUp(&'static str),
}

impl Drain {
    /// A socket that stopped queueing new clients at `now`.
    pub(super) fn new(now: Instant) -> Drain {
        Drain { since: now, handshakes: Handshakes::Unlisted }
    }

    /// Whether the handshakes under way need listing now.
    pub(super) fn wants_listing(&self, now: Instant) -> bool {
        now >= self.since + SETTLE && matches!(self.handshakes, Handshakes::Unlisted | Handshakes::Pending(_))
    }

    /// Takes in a listing of the handshakes under way towards the socket's port (`key` names
    /// the socket in the log).
    pub(super) fn listed(&mut self, now: Instant, listed: Result<&[u64], String>, key: u32) {
        self.handshakes = match (listed, std::mem::take(&mut self.handshakes)) {
            (Err(e), _) => {
                log!("listener {key}: cannot list the handshakes under way ({e}); giving them {HANDSHAKE_GRACE:?}");
                Handshakes::Unknown
            }
            (Ok(pending), Handshakes::Pending(mut list)) => {
                list.retain(|cookie| pending.contains(cookie));
                if list.is_empty() { Handshakes::Done(now) } else { Handshakes::Pending(list) }
            }
            (Ok([]), _) => Handshakes::Done(now),
            (Ok(pending), _) => Handshakes::Pending(pending.to_vec()),
        };
    }

    /// Whether a handshake under way when the socket stopped queueing may still complete and
    /// join its queue.
    fn handshaking(&self, now: Instant) -> bool {
        if now < self.since + SETTLE {
            return true;
        }
        match self.handshakes {
            Handshakes::Unlisted | Handshakes::Pending(_) => true,
            Handshakes::Done(at) => now < at + SETTLE,
            Handshakes::Unknown => now < self.since + HANDSHAKE_GRACE,
        }
    }

    /// When the verdict can next change without anything else happening (`None`: any time,
    /// the handshakes are polled).
    pub(super) fn wake_at(&self) -> Option<Instant> {
        match self.handshakes {
            Handshakes::Unlisted => Some(self.since + SETTLE),
            Handshakes::Pending(_) => None,
            Handshakes::Done(at) => Some(at + SETTLE),
            Handshakes::Unknown => Some(self.since + HANDSHAKE_GRACE),
        }
    }

    /// The verdict at `now`, with `queued` clients in the socket's accept queue and `accepted`
    /// saying whether a live worker (or the master) accepts on it.
    pub(super) fn verdict(&self, now: Instant, queued: u32, accepted: bool) -> Verdict {
        if !self.handshaking(now) && queued == 0 {
            Verdict::Close
        } else if !accepted {
            Verdict::GiveUp("no worker accepts on it")
        } else if now.saturating_duration_since(self.since) >= DRAIN_LIMIT {
            Verdict::GiveUp("it was not emptied in time")
        } else {
            Verdict::Wait
        }
    }

    /// Whether the handshakes it waits for are still under way (for the log of a give-up).
    pub(super) fn handshakes_under_way(&self, now: Instant) -> bool {
        self.handshaking(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nothing_under_way_closes_once_a_racing_syn_had_time_to_show() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0);
        // Before SETTLE, a SYN that raced with the filter may not be in the table yet.
        assert!(!d.wants_listing(t0));
        assert_eq!(d.verdict(t0, 0, true), Verdict::Wait);
        assert_eq!(d.wake_at(), Some(t0 + SETTLE));
        assert!(d.wants_listing(t0 + SETTLE));
        d.listed(t0 + SETTLE, Ok(&[]), 1);
        // Seen empty: it waits SETTLE more for a completed one to be counted in the queue.
        assert!(!d.wants_listing(t0 + SETTLE));
        assert_eq!(d.verdict(t0 + SETTLE, 0, true), Verdict::Wait);
        assert_eq!(d.wake_at(), Some(t0 + 2 * SETTLE));
        assert_eq!(d.verdict(t0 + 2 * SETTLE, 0, true), Verdict::Close);
    }

    #[test]
    fn listed_handshakes_are_waited_for_until_each_is_gone() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0);
        d.listed(t0 + SETTLE, Ok(&[7, 8]), 1);
        assert_eq!(d.wake_at(), None, "polled while handshakes are pending");
        assert_eq!(d.verdict(t0 + 50 * MS, 0, true), Verdict::Wait);
        // A new cookie that was not under way at first is not waited for; 8 completes.
        assert!(d.wants_listing(t0 + 60 * MS));
        d.listed(t0 + 60 * MS, Ok(&[7, 99]), 1);
        assert_eq!(d.verdict(t0 + 70 * MS, 0, true), Verdict::Wait);
        d.listed(t0 + 80 * MS, Ok(&[99]), 1);
        assert_eq!(d.verdict(t0 + 80 * MS, 0, true), Verdict::Wait, "gone, not yet counted in the queue");
        assert_eq!(d.verdict(t0 + 80 * MS + SETTLE, 0, true), Verdict::Close);
        // ... unless the queue still holds clients: those wait for whoever accepts.
        assert_eq!(d.verdict(t0 + 80 * MS + SETTLE, 3, true), Verdict::Wait);
    }

    #[test]
    fn handshakes_that_cannot_be_listed_get_a_grace_period() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0);
        d.listed(t0 + SETTLE, Err("no sock_diag".into()), 1);
        assert!(!d.wants_listing(t0 + SETTLE), "not asked again");
        assert_eq!(d.wake_at(), Some(t0 + HANDSHAKE_GRACE));
        assert_eq!(d.verdict(t0 + HANDSHAKE_GRACE - MS, 0, true), Verdict::Wait);
        assert_eq!(d.verdict(t0 + HANDSHAKE_GRACE, 0, true), Verdict::Close);
    }

    #[test]
    fn a_socket_nobody_empties_is_given_up_at_the_limit_or_when_no_worker_accepts_on_it() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0);
        d.listed(t0 + SETTLE, Ok(&[]), 1);
        let later = t0 + 100 * MS;
        assert_eq!(d.verdict(later, 5, true), Verdict::Wait);
        assert_eq!(d.verdict(later, 5, false), Verdict::GiveUp("no worker accepts on it"));
        assert_eq!(d.verdict(t0 + DRAIN_LIMIT - MS, 5, true), Verdict::Wait);
        assert_eq!(d.verdict(t0 + DRAIN_LIMIT, 5, true), Verdict::GiveUp("it was not emptied in time"));
        // A handshake that never completes (a client that never answers) holds it as long.
        let mut stuck = Drain::new(t0);
        stuck.listed(t0 + SETTLE, Ok(&[1]), 1);
        assert_eq!(stuck.verdict(t0 + DRAIN_LIMIT - MS, 0, true), Verdict::Wait);
        assert_eq!(stuck.verdict(t0 + DRAIN_LIMIT, 0, true), Verdict::GiveUp("it was not emptied in time"));
        assert!(stuck.handshakes_under_way(t0 + DRAIN_LIMIT));
        // With nothing left, no accepting worker is needed to close it.
        assert_eq!(d.verdict(later, 0, false), Verdict::Close);
    }
}
