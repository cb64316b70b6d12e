//! What an upgrade of the master does next, decided like the decision core (`decide.rs`):
//! inputs in (a signal or a command, the other master's messages, its exit, readiness, the
//! clock), [`Effect`]s out, no I/O and no clock of its own. The supervisor carries the effects
//! out (`upgrade/link.rs` talks to the other master); `upgrade/tests.rs` drives every path on a
//! fake clock.
//!
//! A master has two relations, each a state of its own:
//!
//! - to a **successor** it started ([`To`]): `Spawning` → `Hello` (its hello is checked) →
//!   `Ready` (it has the sockets and starts its workers) → `Serving` (told to go) →
//!   `HandedOver`; a failure anywhere (it exits, breaks the protocol, speaks another version,
//!   is late, this master stops) goes to `Stopping` (it is stopped: its own exit, SIGTERM, then
//!   SIGKILL after the kill timeout), then back to `Idle`, and this master serves on.
//! - to the **predecessor** that started it ([`From`]): `Taking` (its workers start; it
//!   accepts nothing) → `Overlap` (told to go, it accepts; the predecessor retires and its
//!   sockets are still the predecessor's too) → none (the predecessor's end closed: it exited).
//!
//! A master in `Overlap` may start an upgrade of its own: the two relations go on side by side.

use std::time::{Duration, Instant};

use crate::log::{note, warning};
use crate::master::types::{ControlError, Upgraded};

/// How long each step of the handshake may take, beyond the workers' start.
pub(super) const HANDSHAKE: Duration = Duration::from_secs(10);
/// How long a successor that gives up (or was told why) may take to exit on its own.
pub(super) const OWN_EXIT: Duration = Duration::from_millis(500);

/// The version of the handshake. Two masters that differ refuse to upgrade.
pub(super) const VERSION: u64 = 1;

/// Which of the two relations an input or an effect is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The master that started this one.
    From,
    /// A master this one started.
    To,
}

/// This master's relation to a successor it started.
#[derive(Debug, Clone, PartialEq, Eq)]
enum To {
    Idle,
    /// Asked to start it (the supervisor records `Spawned` or `SpawnFailed`).
    Spawning {
        since: Instant,
    },
    /// Waiting for its hello.
    Hello {
        since: Instant,
        pid: u32,
        deadline: Instant,
    },
    /// It has the sockets: waiting for `ready` (or `failed`).
    Ready {
        since: Instant,
        pid: u32,
        deadline: Instant,
    },
    /// Told to go: waiting for `serving`.
    Serving {
        since: Instant,
        pid: u32,
        deadline: Instant,
    },
    /// Being stopped after a failure; `why` answers whoever asked once it has exited.
    Stopping {
        pid: u32,
        why: String,
        stop: Stop,
    },
    /// It serves; this master retires.
    HandedOver {
        pid: u32,
    },
}

/// How far the stop of a failed successor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Given until then to exit on its own.
    Own { until: Instant },
    /// SIGTERM sent; SIGKILL at `kill_at`.
    Term { kill_at: Instant },
    /// SIGKILL sent.
    Killed,
}

/// This master's relation to the predecessor that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    None,
    /// Its workers start; `told_ready` once it said they all are.
    Taking {
        pid: u32,
        told_ready: bool,
    },
    /// It took over; the predecessor retires.
    Overlap {
        pid: u32,
    },
}

/// What the successor said (its message's `t`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Heard {
    /// Its hello, with the version it speaks (`None`: none given).
    Hello { version: Option<u64> },
    /// Every worker of it is ready.
    Ready,
    /// Its start failed, for this reason.
    Failed(String),
    /// It accepts now.
    Serving,
    /// A message of another kind.
    Other,
}

/// What happened, for the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    /// The successor runs, with this pid.
    Spawned(u32),
    /// It could not be started (or the sockets could not be copied for it).
    SpawnFailed(String),
    /// It said something (`raw`: the message, for the log).
    Heard { what: Heard, raw: String },
    /// It sent something that is not the protocol.
    Garbage(String),
    /// The channel to it closed.
    Closed,
    /// It exited (its status, as shown).
    Exited(String),
    /// The predecessor says take over.
    Go,
    /// The predecessor called it off, or said something else (why).
    Off(String),
    /// The channel to the predecessor closed: it has exited.
    PredecessorGone,
    /// A worker of this (successor) master exited before all were ready.
    WorkerFailed(String),
}

/// What the supervisor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Start a new master from the binary on disk, with copies of what it will be handed;
    /// record [`Input::Spawned`] or [`Input::SpawnFailed`].
    Spawn,
    /// Tell the successor it is refused (the sockets never move).
    Refuse(String),
    /// Hand the successor every socket, then tell it to start its workers.
    SendSockets,
    /// Tell the successor to take over.
    Go,
    /// SIGTERM the successor.
    Terminate,
    /// SIGKILL the successor.
    Kill,
    /// The successor (`pid`) serves: let go of the sockets (only released from now on), stop
    /// serving the control socket and the admin endpoint, name it to systemd and the init.
    HandOver(u32),
    /// Stop this master gracefully.
    StopCluster,
    /// The outcome, for whoever asked for the upgrade.
    Answer(Result<Upgraded, ControlError>),
    /// Close the channel to that side (and stop listening to it).
    Close(Side),
    /// Tell the predecessor every worker is ready.
    TellReady,
    /// Tell the predecessor the start failed.
    TellFailed(String),
    /// Tell the predecessor this master accepts now.
    TellServing,
    /// Accept on the sockets handed over, serve the control socket and the admin endpoint,
    /// write the pid file, tell systemd.
    TakeOver,
    /// The predecessor has exited: the sockets it handed over are this master's alone.
    OwnHanded,
}

/// What the upgrade needs to know of the rest of the master at an instant.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Seen {
    /// The cluster is stopping.
    pub(crate) stopping: bool,
    /// A rolling reload is under way.
    pub(crate) reloading: bool,
    /// Every worker wanted is ready.
    pub(crate) all_ready: bool,
}

/// The upgrade's state. See the module documentation.
#[derive(Debug)]
pub(crate) struct Upgrade {
    /// This master's pid.
    me: u32,
    ready_timeout: Duration,
    kill_timeout: Duration,
    to: To,
    from: From,
}

impl Upgrade {
    /// `predecessor`: the pid of the master that started this one, if one did (it then takes
    /// over once its workers are ready).
    pub(crate) fn new(me: u32, ready_timeout: Duration, kill_timeout: Duration, predecessor: Option<u32>) -> Upgrade {
        let from = predecessor.map_or(From::None, |pid| From::Taking { pid, told_ready: false });
        Upgrade { me, ready_timeout, kill_timeout, to: To::Idle, from }
    }

    /// Starts an upgrade (SIGUSR2, `clusterctl upgrade`), unless something is in the way: a
    /// stop, another upgrade, a take-over under way, a rolling reload.
    pub(crate) fn start(&mut self, now: Instant, seen: Seen) -> Result<Vec<Effect>, ControlError> {
        let refused = if let To::HandedOver { pid } = self.to {
            Err(ControlError::Refused(format!("this master handed over to the new master (pid {pid}) and retires")))
        } else if seen.stopping {
            Err(ControlError::Stopping)
        } else if let Some(why) = self.busy() {
            Err(ControlError::Refused(format!("{why}: one upgrade at a time")))
        } else if seen.reloading {
            Err(ControlError::Refused("a rolling reload is under way: upgrade once it is over".into()))
        } else {
            Ok(())
        };
        if let Err(e) = refused {
            warning!(event = "upgrade_refused", reason = %e, "upgrade refused: {e}");
            return Err(e);
        }
        note!(event = "upgrade", pid = self.me, "upgrading the master: starting a new one from the binary on disk");
        self.to = To::Spawning { since: now };
        Ok(vec![Effect::Spawn])
    }

    /// Why reloads, restarts, scaling and another upgrade are refused now, if they are: an
    /// upgrade this master started is under way, or it is taking over from its predecessor.
    pub(crate) fn busy(&self) -> Option<String> {
        match (&self.to, self.from) {
            (To::Idle | To::HandedOver { .. }, From::Taking { pid, .. }) => {
                Some(format!("this master is taking over from the old one (pid {pid})"))
            }
            (To::Idle | To::HandedOver { .. }, _) => None,
            _ => Some("a master upgrade is under way".into()),
        }
    }

    /// The successor being started or stopped, if any (the pid signals go to).
    pub(crate) fn successor(&self) -> Option<u32> {
        match self.to {
            To::Hello { pid, .. } | To::Ready { pid, .. } | To::Serving { pid, .. } | To::Stopping { pid, .. } => {
                Some(pid)
            }
            To::HandedOver { pid } => Some(pid),
            To::Idle | To::Spawning { .. } => None,
        }
    }

    /// When [`tick`](Self::tick) has something to do next without any input.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        match self.to {
            To::Hello { deadline, .. } | To::Ready { deadline, .. } | To::Serving { deadline, .. } => Some(deadline),
            To::Stopping { stop: Stop::Own { until }, .. } => Some(until),
            To::Stopping { stop: Stop::Term { kill_at }, .. } => Some(kill_at),
            _ => None,
        }
    }

    /// Records what happened on `side`; returns what to do.
    pub(crate) fn record(&mut self, side: Side, input: Input, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        match side {
            Side::To => self.successor_said(input, now, &mut out),
            Side::From => self.predecessor_said(input, &mut out),
        }
        out
    }

    /// The clock and the rest of the master: deadlines, a stop that cancels the upgrade, the
    /// workers all ready.
    pub(crate) fn tick(&mut self, now: Instant, seen: Seen) -> Vec<Effect> {
        let mut out = Vec::new();
        if let From::Taking { told_ready: told @ false, .. } = &mut self.from
            && seen.all_ready
            && !seen.stopping
        {
            *told = true;
            out.push(Effect::TellReady);
        }
        let waiting = match self.to {
            To::Hello { deadline, .. } | To::Serving { deadline, .. } => Some((deadline, HANDSHAKE)),
            To::Ready { deadline, .. } => Some((deadline, self.ready_timeout + HANDSHAKE)),
            _ => None,
        };
        if let Some((deadline, waited)) = waiting {
            if seen.stopping {
                self.fail("cancelled: this master is stopping".into(), now);
            } else if now >= deadline {
                self.fail(format!("the new master did not answer within {waited:?}"), now);
            }
        }
        let kill_timeout = self.kill_timeout;
        if let To::Stopping { stop, .. } = &mut self.to {
            match *stop {
                Stop::Own { until } if now >= until => {
                    out.push(Effect::Terminate);
                    *stop = Stop::Term { kill_at: now + kill_timeout };
                }
                Stop::Term { kill_at } if now >= kill_at => {
                    out.push(Effect::Kill);
                    *stop = Stop::Killed;
                }
                _ => {}
            }
        }
        out
    }

    fn successor_said(&mut self, input: Input, now: Instant, out: &mut Vec<Effect>) {
        match (self.to.clone(), input) {
            (To::Spawning { since }, Input::Spawned(pid)) => {
                note!(event = "upgrade_started", pid, "new master started (pid {pid})");
                self.to = To::Hello { since, pid, deadline: now + HANDSHAKE };
            }
            (To::Spawning { .. }, Input::SpawnFailed(why)) => {
                self.to = To::Idle;
                self.failed(&why, out);
            }
            // It is gone: nothing to stop.
            (To::Hello { .. } | To::Ready { .. } | To::Serving { .. }, Input::Exited(status)) => {
                self.to = To::Idle;
                out.push(Effect::Close(Side::To));
                self.failed(&format!("the new master exited ({status})"), out);
            }
            (To::Stopping { why, .. }, Input::Exited(status)) => {
                self.to = To::Idle;
                out.push(Effect::Close(Side::To));
                // A successor whose channel closed says why by how it exited.
                let why = if why == CLOSED { format!("the new master exited ({status})") } else { why };
                self.failed(&why, out);
            }
            (To::Hello { since, pid, .. }, Input::Heard { what: Heard::Hello { version: Some(VERSION) }, .. }) => {
                out.push(Effect::SendSockets);
                self.to = To::Ready { since, pid, deadline: now + self.ready_timeout + HANDSHAKE };
            }
            (To::Hello { .. }, Input::Heard { what, raw }) => {
                let reason = match what {
                    Heard::Hello { version: Some(v) } => {
                        format!("the new master speaks upgrade protocol {v}, this one {VERSION}")
                    }
                    _ => format!("the new master did not say hello: {raw}"),
                };
                out.push(Effect::Refuse(reason.clone()));
                self.fail(reason, now);
            }
            (To::Ready { since, pid, .. }, Input::Heard { what: Heard::Ready, .. }) => {
                out.push(Effect::Go);
                self.to = To::Serving { since, pid, deadline: now + HANDSHAKE };
            }
            (To::Ready { .. }, Input::Heard { what: Heard::Failed(reason), .. }) => {
                self.fail(format!("the new master failed: {reason}"), now);
            }
            (To::Serving { since, pid, .. }, Input::Heard { what: Heard::Serving, .. }) => {
                let me = self.me;
                note!(
                    event = "upgraded",
                    pid,
                    old_pid = me,
                    "the new master (pid {pid}) serves; this one (pid {me}) retires"
                );
                out.push(Effect::HandOver(pid));
                // Sockets shared with the successor from now on: the predecessor's exit, if it
                // still retires, must not make them this master's alone.
                if self.from != From::None {
                    self.from = From::None;
                    out.push(Effect::Close(Side::From));
                }
                out.push(Effect::Answer(Ok(Upgraded { old_pid: me, pid, took: now.saturating_duration_since(since) })));
                out.push(Effect::StopCluster);
                self.to = To::HandedOver { pid };
            }
            (To::Ready { .. } | To::Serving { .. }, Input::Heard { raw, .. }) => {
                self.fail(format!("unexpected message from the new master: {raw}"), now);
            }
            (To::Hello { .. } | To::Ready { .. } | To::Serving { .. }, Input::Garbage(e)) => {
                self.fail(format!("the new master sent something that is not the upgrade protocol: {e}"), now);
            }
            (To::Hello { .. } | To::Ready { .. } | To::Serving { .. }, Input::Closed) => self.fail(CLOSED.into(), now),
            // Late news of a successor already given up on, or of one that serves.
            _ => {}
        }
    }

    fn predecessor_said(&mut self, input: Input, out: &mut Vec<Effect>) {
        match (self.from, input) {
            (From::Taking { pid, .. }, Input::Go) => {
                note!(event = "took_over", pid = self.me, old_pid = pid, "took over from the old master (pid {pid})");
                out.push(Effect::TakeOver);
                out.push(Effect::TellServing);
                self.from = From::Overlap { pid };
            }
            (From::Taking { .. }, Input::Off(why)) => self.give_up_taking(why, false, out),
            (From::Taking { .. }, Input::PredecessorGone) => {
                self.give_up_taking("the old master closed the upgrade channel".into(), false, out)
            }
            (From::Taking { .. }, Input::WorkerFailed(why)) => self.give_up_taking(why, true, out),
            // After `go`, anything on the channel (its end closing) means it has exited.
            (From::Overlap { pid }, Input::Go | Input::Off(_) | Input::PredecessorGone) => {
                note!(event = "predecessor_gone", old_pid = pid, "the old master (pid {pid}) has exited");
                out.push(Effect::OwnHanded);
                out.push(Effect::Close(Side::From));
                self.from = From::None;
            }
            _ => {}
        }
    }

    /// A successor that will not take over: it stops (its workers finish; it accepted
    /// nothing). `tell`: say why to the predecessor first.
    fn give_up_taking(&mut self, why: String, tell: bool, out: &mut Vec<Effect>) {
        warning!(event = "upgrade_failed", reason = %why, "not taking over: {why}; stopping");
        if tell {
            out.push(Effect::TellFailed(why));
        }
        out.push(Effect::Close(Side::From));
        out.push(Effect::StopCluster);
        self.from = From::None;
    }

    /// The successor will not take over: stop it; whoever asked hears `why` once it is gone.
    fn fail(&mut self, why: String, now: Instant) {
        let Some(pid) = self.successor() else { return };
        self.to = To::Stopping { pid, why, stop: Stop::Own { until: now + OWN_EXIT } };
    }

    /// The upgrade is over and failed: this master serves on.
    fn failed(&self, why: &str, out: &mut Vec<Effect>) {
        let me = self.me;
        warning!(event = "upgrade_failed", reason = %why, "upgrade abandoned: {why}; this master (pid {me}) serves on");
        out.push(Effect::Answer(Err(ControlError::Refused(format!("upgrade abandoned: {why}")))));
    }
}

/// Why a successor is stopped when its channel closed (refined by how it exits).
const CLOSED: &str = "the new master closed the upgrade channel";
