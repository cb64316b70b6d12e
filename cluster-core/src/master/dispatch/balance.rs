//! The balancer's pick (README, "Scheduling: policies and balancers"): which worker gets the
//! next connection, from plain per-worker figures. No table, lock or socket here: the dispatch
//! table describes each worker as a [`Seen`] and applies the pick.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::net::IpAddr;

use crate::config::Balancer;
use crate::master::types::Serial;

/// What the balancer sees of one worker process, for a connection on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seen {
    /// Worker id: sticky hashing maps clients to ids, so a replacement keeps its clients.
    pub(super) id: u32,
    /// The process (ties between two processes of one id go to the newer).
    pub(super) serial: Serial,
    /// It accepts on this listener and is open to new connections (not retiring, not resting).
    pub(super) takes: bool,
    /// Places free in its window (within the open-connections cap).
    pub(super) room: usize,
    /// Connections it has or is about to get.
    pub(super) load: u64,
}

impl Seen {
    fn open(&self) -> bool {
        self.takes && self.room > 0
    }
}

/// The index of the worker that gets a connection from `client` (`None` for a Unix socket's
/// peer), among `n` workers described by `seen(i)`, the last pick having been `cursor - 1`;
/// `None` when the connection must wait.
///
/// - round-robin: the next open worker after the last pick;
/// - least-connections: among the open workers whose load is within a quarter of the least
///   (closes are reported in batches, so loads are a little stale: near-equal loads take turns
///   instead of one worker getting every connection until its next report), the next after
///   the last pick;
/// - sticky: rendezvous hashing of the client's address over the ids of the workers that take
///   the listener: the highest score gets it, and if that worker has no room the connection
///   waits for it (it never goes to another worker meanwhile). A worker that stops taking moves
///   only its own clients; a process with the same id gets them back.
pub(super) fn pick(
    balancer: Balancer,
    client: Option<IpAddr>,
    cursor: usize,
    n: usize,
    seen: impl Fn(usize) -> Seen,
) -> Option<usize> {
    let after_cursor = (0..n).map(|step| (cursor + step) % n);
    match (balancer, client) {
        (Balancer::Sticky, Some(ip)) => {
            let best =
                (0..n).map(&seen).enumerate().filter(|(_, s)| s.takes).max_by_key(|(_, s)| (score(ip, s.id), s.serial));
            best.filter(|(_, s)| s.room > 0).map(|(i, _)| i)
        }
        (Balancer::LeastConnections, _) => {
            let least = (0..n).map(&seen).filter(Seen::open).map(|s| s.load).min()?;
            after_cursor.into_iter().find(|i| {
                let s = seen(*i);
                s.open() && s.load <= least + least / 4
            })
        }
        _ => after_cursor.into_iter().find(|i| seen(*i).open()),
    }
}

/// The rendezvous score of a client address for a worker id.
fn score(ip: IpAddr, id: u32) -> u64 {
    // A fixed hasher: the same client maps to the same worker id across master restarts.
    BuildHasherDefault::<DefaultHasher>::default().hash_one((ip, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: u32, room: usize, load: u64) -> Seen {
        Seen { id, serial: u64::from(id), takes: true, room, load }
    }

    /// The picks for `conns` connections in a row, each taking a place of the worker it goes
    /// to (as the table does), starting after `cursor`.
    fn picks(
        balancer: Balancer,
        workers: &mut [Seen],
        conns: usize,
        client: impl Fn(usize) -> Option<IpAddr>,
    ) -> Vec<Option<u32>> {
        let mut cursor = 0;
        (0..conns)
            .map(|c| {
                let i = pick(balancer, client(c), cursor, workers.len(), |i| workers[i])?;
                cursor = i + 1;
                workers[i].room -= 1;
                workers[i].load += 1;
                Some(workers[i].id)
            })
            .collect()
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn round_robin_takes_turns_and_skips_a_worker_with_no_room_or_not_taking() {
        let mut ws = [worker(1, 8, 0), worker(2, 8, 0), worker(3, 8, 0)];
        assert_eq!(picks(Balancer::RoundRobin, &mut ws, 6, |_| None), [1, 2, 3, 1, 2, 3].map(Some));
        let mut ws = [worker(1, 8, 0), worker(2, 0, 0), worker(3, 8, 0)];
        assert_eq!(picks(Balancer::RoundRobin, &mut ws, 4, |_| None), [1, 3, 1, 3].map(Some));
        let mut ws = [worker(1, 8, 0), Seen { takes: false, ..worker(2, 8, 0) }, worker(3, 1, 0)];
        assert_eq!(picks(Balancer::RoundRobin, &mut ws, 3, |_| None), [Some(1), Some(3), Some(1)]);
        // No room anywhere: the connection waits.
        let mut ws = [worker(1, 1, 0), worker(2, 0, 0)];
        assert_eq!(picks(Balancer::RoundRobin, &mut ws, 2, |_| None), [Some(1), None]);
        // The turn goes on from the last pick, wherever that was.
        let ws = [worker(1, 8, 0), worker(2, 8, 0), worker(3, 8, 0)];
        assert_eq!(pick(Balancer::RoundRobin, None, 2, 3, |i| ws[i]), Some(2));
        assert_eq!(pick(Balancer::RoundRobin, None, 3, 3, |i| ws[i]), Some(0));
        assert_eq!(pick(Balancer::RoundRobin, None, 0, 0, |i| ws[i]), None, "no worker at all");
    }

    #[test]
    fn least_connections_goes_to_the_least_loaded_and_near_equal_loads_take_turns() {
        // Worker 2 has far fewer: it gets every connection until it is within a quarter.
        let mut ws = [worker(1, 64, 40), worker(2, 64, 10), worker(3, 64, 40)];
        let got = picks(Balancer::LeastConnections, &mut ws, 30, |_| None);
        assert!(got[..20].iter().all(|w| *w == Some(2)), "{got:?}");
        // Once within a quarter of the least, all three take turns.
        assert!(got[25..].contains(&Some(1)) && got[25..].contains(&Some(3)), "{got:?}");
        // Within a quarter counts as equal: 100 and 124 alternate, 100 and 126 do not.
        let ws = [worker(1, 8, 124), worker(2, 8, 100)];
        assert_eq!(pick(Balancer::LeastConnections, None, 0, 2, |i| ws[i]), Some(0));
        let ws = [worker(1, 8, 126), worker(2, 8, 100)];
        assert_eq!(pick(Balancer::LeastConnections, None, 0, 2, |i| ws[i]), Some(1));
        // The least loaded with no room does not count; nor does one not taking.
        let ws = [worker(1, 8, 50), worker(2, 0, 0), Seen { takes: false, ..worker(3, 8, 0) }];
        assert_eq!(pick(Balancer::LeastConnections, None, 1, 3, |i| ws[i]), Some(0));
        let ws = [worker(1, 0, 5), worker(2, 0, 6)];
        assert_eq!(pick(Balancer::LeastConnections, None, 0, 2, |i| ws[i]), None);
    }

    #[test]
    fn sticky_keeps_a_client_on_its_worker_id_and_moves_only_the_clients_of_one_that_stops() {
        let ws = [worker(1, 64, 0), worker(2, 64, 0), worker(3, 64, 0), worker(4, 64, 0)];
        let owner = |ws: &[Seen], c: u8| pick(Balancer::Sticky, Some(ip(c)), 0, ws.len(), |i| ws[i]).map(|i| ws[i].id);
        let before: Vec<Option<u32>> = (0..200).map(|c| owner(&ws, c)).collect();
        // The same client, the same worker, whatever the cursor and the loads.
        for c in 0..200u8 {
            let loaded = [worker(1, 64, 50), worker(2, 64, 0), worker(3, 64, 9), worker(4, 64, 1)];
            assert_eq!(
                pick(Balancer::Sticky, Some(ip(c)), 3, 4, |i| loaded[i]).map(|i| loaded[i].id),
                before[c as usize]
            );
        }
        // Every worker id gets some clients.
        for id in 1..=4 {
            assert!(before.contains(&Some(id)), "worker {id} got no client of 200");
        }
        // Worker 3 stops taking: its clients move, nobody else's does.
        let three_off = [ws[0], ws[1], Seen { takes: false, ..ws[2] }, ws[3]];
        for c in 0..200u8 {
            let now = owner(&three_off, c);
            if before[c as usize] == Some(3) {
                assert_ne!(now, Some(3));
            } else {
                assert_eq!(now, before[c as usize], "client {c} moved though its worker still runs");
            }
        }
        // A new process of worker 3 (another serial) gets them back.
        let replaced = [ws[0], ws[1], Seen { serial: 99, ..ws[2] }, ws[3]];
        assert_eq!((0..200).map(|c| owner(&replaced, c)).collect::<Vec<_>>(), before);
    }

    #[test]
    fn sticky_waits_for_a_full_worker_and_unix_peers_take_turns() {
        let c = (0..=255u8).find(|c| {
            let ws = [worker(1, 8, 0), worker(2, 8, 0)];
            pick(Balancer::Sticky, Some(ip(*c)), 0, 2, |i| ws[i]) == Some(0)
        });
        let c = c.expect("some client hashes to worker 1");
        // Its worker is full: the connection waits rather than going to worker 2.
        let ws = [worker(1, 0, 64), worker(2, 8, 0)];
        assert_eq!(pick(Balancer::Sticky, Some(ip(c)), 0, 2, |i| ws[i]), None);
        // A Unix socket's peer has no address: round-robin.
        let mut ws = [worker(1, 8, 0), worker(2, 8, 0)];
        assert_eq!(picks(Balancer::Sticky, &mut ws, 4, |_| None), [1, 2, 1, 2].map(Some));
    }
}
