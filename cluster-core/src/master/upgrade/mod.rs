//! Upgrading the master itself (SIGUSR2, `clusterctl upgrade`). The running master, the
//! *predecessor*, starts a new master, the *successor*, from the binary on disk with its own
//! arguments and environment, and hands it every listening socket, the control socket and the
//! admin endpoint's socket. The successor starts its workers but accepts nothing; once they are
//! all ready, the predecessor tells it to go, stops accepting, retires its own workers
//! gracefully and exits 0. A successor that exits, breaks the protocol, or is not ready in time
//! is stopped, and the predecessor serves on as if nothing happened.
//!
//! The two talk over a `SOCK_SEQPACKET` pair; the successor inherits its end at fd 3
//! (`CLUSTER_UPGRADE_FD`). The sockets travel on it as SCM_RIGHTS once the successor's hello has
//! been checked, so a pair that cannot agree is refused before any socket changes hands. Each
//! datagram is one JSON object:
//!
//! | from        | message                                         | then                          |
//! |-------------|-------------------------------------------------|-------------------------------|
//! | successor   | `{"t":"hello","version":1,"pid":P}`             |                               |
//! | predecessor | `{"t":"refused","reason":R}`                    | it stops the successor        |
//! | predecessor | `{"t":"sockets","items":[…]}` + descriptors     | one item per descriptor       |
//! | predecessor | `{"t":"start","workers":N,"pid":P,"init":B}`    | the successor starts workers  |
//! | successor   | `{"t":"ready"}` or `{"t":"failed","reason":R}`  |                               |
//! | predecessor | `{"t":"go"}`                                    | the successor accepts         |
//! | successor   | `{"t":"serving"}`                               | the predecessor lets go       |
//!
//! `init` says the predecessor runs under the minimal init of a container (see
//! `sys::become_init_if_pid_1`), which the master that hands over tells who its successor is.
//!
//! Before `go`, the successor lives only as long as the channel: if the predecessor goes away,
//! it stops (it never accepted a connection, so it loses none). After `go`, the predecessor
//! keeps its end open until it exits; until then the successor treats the sockets as shared
//! (a stop of its own lets go of them without draining or shutting them down, which would
//! act on the predecessor's copies too).

//!
//! `decide.rs` decides every step (a pure state machine, table-tested in `tests.rs`); `wire.rs`
//! is the bytes; `link.rs` the channel's tasks; the supervisor carries the steps out.

mod decide;
mod link;
#[cfg(test)]
mod tests;
pub(in crate::master) mod wire;

pub(super) use decide::{Effect, Input, Seen, Side};
pub(super) use wire::{Handover, Listener, Successor};

use std::io;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use self::decide::Upgrade;
use self::link::{Link, News, Packed, Signal};
use super::handle::{AppMetrics, Reply};
use super::types::Upgraded;

/// The upgrade as the supervisor runs it: the decided state, the channels to the other
/// masters, and who waits for the outcome.
pub(super) struct Upgrading {
    state: Upgrade,
    /// The channel to the master that started this one.
    from: Option<Link>,
    /// The channel to a master this one started.
    to: Option<Link>,
    /// Links opened so far (their numbers).
    opened: u64,
    news_tx: mpsc::UnboundedSender<News>,
    news: mpsc::UnboundedReceiver<News>,
    /// Who asked for the upgrade under way (nobody for SIGUSR2).
    waiter: Option<Reply<Upgraded>>,
    /// What the successor gets once its hello is checked.
    packed: Option<Packed>,
    /// The application's metrics, handed over with `go` and taken over from a predecessor.
    app_metrics: AppMetrics,
}

impl Upgrading {
    /// `successor`: this master's end of the channel to the master that started it, if one did.
    pub(super) fn new(
        me: u32,
        ready_timeout: Duration,
        kill_timeout: Duration,
        successor: Option<Successor>,
        app_metrics: AppMetrics,
    ) -> Upgrading {
        let (news_tx, news) = mpsc::unbounded_channel();
        let predecessor = successor.as_ref().map(|s| s.predecessor);
        let mut upgrading = Upgrading {
            state: Upgrade::new(me, ready_timeout, kill_timeout, predecessor),
            from: None,
            to: None,
            opened: 0,
            news_tx,
            news,
            waiter: None,
            packed: None,
            app_metrics,
        };
        if let Some(successor) = successor {
            upgrading.opened += 1;
            let news = upgrading.news_tx.clone();
            upgrading.from = Some(Link::predecessor(upgrading.opened, successor, news, upgrading.app_metrics.clone()));
        }
        upgrading
    }

    /// Why reloads, restarts and scaling are refused now, if they are.
    pub(super) fn busy(&self) -> Option<String> {
        self.state.busy()
    }

    /// When the upgrade has something to do next without any news.
    pub(super) fn next_wake(&self) -> Option<Instant> {
        self.state.next_wake()
    }

    /// The next news of a link still open (news of one closed since is dropped).
    pub(super) async fn news(&mut self) -> (Side, Input) {
        loop {
            let Some((id, side, input)) = self.news.recv().await else { return std::future::pending().await };
            let open = match side {
                Side::From => self.from.as_ref(),
                Side::To => self.to.as_ref(),
            };
            if open.is_some_and(|link| link.id == id) {
                return (side, input);
            }
        }
    }

    /// Starts an upgrade; `reply` hears how it ends (at once if it is refused).
    pub(super) fn start(&mut self, now: Instant, seen: Seen, reply: Option<Reply<Upgraded>>) -> Vec<Effect> {
        match self.state.start(now, seen) {
            Ok(effects) => {
                self.waiter = reply;
                effects
            }
            Err(e) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e));
                }
                Vec::new()
            }
        }
    }

    /// News of one side, decided.
    pub(super) fn record(&mut self, side: Side, input: Input, now: Instant) -> Vec<Effect> {
        self.state.record(side, input, now)
    }

    /// The clock and the rest of the master, decided.
    pub(super) fn tick(&mut self, now: Instant, seen: Seen) -> Vec<Effect> {
        self.state.tick(now, seen)
    }

    /// Starts the successor ([`Effect::Spawn`]) with `command` and copies of what it gets.
    pub(super) fn spawn(
        &mut self,
        command: tokio::process::Command,
        handover: io::Result<Handover>,
        now: Instant,
    ) -> Vec<Effect> {
        let started = handover
            .map_err(|e| format!("cannot hand over the sockets: {e}"))
            .and_then(Packed::new)
            .and_then(|packed| {
                self.opened += 1;
                let (link, pid) = Link::successor(self.opened, command, self.news_tx.clone())?;
                Ok((packed, link, pid))
            });
        let input = match started {
            Ok((packed, link, pid)) => {
                self.packed = Some(packed);
                self.to = Some(link);
                Input::Spawned(pid)
            }
            Err(why) => Input::SpawnFailed(why),
        };
        self.state.record(Side::To, input, now)
    }

    /// Carries out the effects that concern only the channels and whoever waits; gives back
    /// those for the rest of the master (spawning, the sockets, the core, the service manager).
    pub(super) fn carry(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
        let mut rest = Vec::new();
        for effect in effects {
            match effect {
                Effect::Refuse(reason) => self.send(Side::To, wire::refused(&reason)),
                Effect::SendSockets => {
                    if let (Some(link), Some(packed)) = (&self.to, self.packed.take()) {
                        link.send_sockets(packed);
                    }
                }
                Effect::Go => {
                    if let Some(link) = &self.to {
                        link.send_go(&self.app_metrics);
                    }
                }
                Effect::Terminate => self.signal(Signal::Term),
                Effect::Kill => self.signal(Signal::Kill),
                Effect::Answer(result) => {
                    if let Some(reply) = self.waiter.take() {
                        let _ = reply.send(result);
                    }
                }
                Effect::Close(Side::From) => self.from = None,
                Effect::Close(Side::To) => {
                    self.to = None;
                    self.packed = None;
                }
                Effect::TellReady => self.send(Side::From, wire::ready()),
                Effect::TellFailed(reason) => self.send(Side::From, wire::failed(&reason)),
                Effect::TellServing => self.send(Side::From, wire::serving()),
                other => rest.push(other),
            }
        }
        rest
    }

    fn send(&self, side: Side, data: Vec<u8>) {
        let link = match side {
            Side::From => &self.from,
            Side::To => &self.to,
        };
        if let Some(link) = link {
            link.send(data);
        }
    }

    fn signal(&self, signal: Signal) {
        if let Some(link) = &self.to {
            link.signal(signal);
        }
    }
}
