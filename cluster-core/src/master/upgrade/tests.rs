//! Table tests of the upgrade's decisions on a fake clock: every path of a master that starts a
//! successor (success, the successor dying or closing in each state, late, of another version,
//! breaking the protocol; SIGHUP, SIGTERM and a second upgrade in each state) and of a master
//! that takes over (ready, go, called off, a worker failing, the predecessor's exit). No
//! process, socket or real time is involved.

use std::time::{Duration, Instant};

use super::decide::{Effect, HANDSHAKE, Heard, Input, OWN_EXIT, Seen, Side, Upgrade, VERSION};
use crate::master::types::{ControlError, Upgraded};

const ME: u32 = 100;
const NEW: u32 = 200;
const OLD: u32 = 50;
const READY: Duration = Duration::from_secs(2);
const KILL: Duration = Duration::from_secs(5);
const MS: Duration = Duration::from_millis(1);

/// The states of a master that starts a successor, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Spawning,
    Hello,
    Ready,
    Serving,
    Stopping,
}

const HANDSHAKING: [At; 3] = [At::Hello, At::Ready, At::Serving];
const UNDER_WAY: [At; 5] = [At::Spawning, At::Hello, At::Ready, At::Serving, At::Stopping];

struct T {
    up: Upgrade,
    t0: Instant,
    now: Instant,
}

impl T {
    fn new() -> T {
        Self::with(None)
    }

    /// A master started by an upgrade of `OLD`.
    fn successor() -> T {
        Self::with(Some(OLD))
    }

    fn with(predecessor: Option<u32>) -> T {
        let now = Instant::now();
        T { up: Upgrade::new(ME, READY, KILL, predecessor), t0: now, now }
    }

    fn start(&mut self) -> Result<Vec<Effect>, ControlError> {
        self.up.start(self.now, Seen::default())
    }

    fn to(&mut self, input: Input) -> Vec<Effect> {
        self.up.record(Side::To, input, self.now)
    }

    fn from(&mut self, input: Input) -> Vec<Effect> {
        self.up.record(Side::From, input, self.now)
    }

    fn heard(&mut self, t: &str) -> Vec<Effect> {
        self.to(heard(t))
    }

    /// Moves the clock by `by`, in 1 ms steps as the supervisor's wake-ups would, collecting
    /// what each tick decides.
    fn wait(&mut self, by: Duration, seen: Seen) -> Vec<Effect> {
        let end = self.now + by;
        let mut out = Vec::new();
        while self.now < end {
            self.now = (self.now + Duration::from_millis(50)).min(end);
            out.extend(self.up.tick(self.now, seen));
        }
        out
    }

    /// Drives a fresh upgrade to `at`.
    fn at(at: At) -> T {
        let mut t = T::new();
        assert_eq!(t.start().unwrap(), [Effect::Spawn]);
        if at == At::Spawning {
            return t;
        }
        assert_eq!(t.to(Input::Spawned(NEW)), []);
        if at == At::Hello {
            return t;
        }
        if at == At::Stopping {
            assert_eq!(t.to(Input::Closed), []);
            return t;
        }
        assert_eq!(t.heard(&format!(r#"{{"t":"hello","version":{VERSION}}}"#)), [Effect::SendSockets]);
        if at == At::Ready {
            return t;
        }
        assert_eq!(t.heard(r#"{"t":"ready"}"#), [Effect::Go]);
        t
    }
}

/// A message from the other master, as the wire reads it.
fn heard(t: &str) -> Input {
    super::wire::from_successor(t.as_bytes())
}

fn abandoned(why: &str) -> Effect {
    Effect::Answer(Err(ControlError::Refused(format!("upgrade abandoned: {why}"))))
}

/// The effects that stop a successor once it stopped answering: its own exit first, then
/// SIGTERM, then SIGKILL after the kill timeout; `why` answers once it has exited.
fn stops_it(t: &mut T, why: &str) {
    assert_eq!(t.wait(OWN_EXIT - MS, Seen::default()), [], "it gets a moment to exit on its own");
    assert_eq!(t.wait(MS, Seen::default()), [Effect::Terminate]);
    assert_eq!(t.wait(KILL - MS, Seen::default()), []);
    assert_eq!(t.wait(MS, Seen::default()), [Effect::Kill]);
    assert_eq!(t.to(Input::Exited("signal: 9 (SIGKILL)".into())), [Effect::Close(Side::To), abandoned(why)]);
    assert_eq!(t.up.busy(), None, "back to serving as if nothing happened");
    assert_eq!(t.start().unwrap(), [Effect::Spawn], "a new upgrade may start");
}

#[test]
fn a_successor_that_says_hello_gets_ready_and_serves_takes_over() {
    let mut t = T::at(At::Serving);
    t.now += 25 * MS;
    let took = t.now - t.t0;
    assert_eq!(
        t.heard(r#"{"t":"serving"}"#),
        [Effect::HandOver(NEW), Effect::Answer(Ok(Upgraded { old_pid: ME, pid: NEW, took })), Effect::StopCluster,]
    );
    assert_eq!(t.up.busy(), None, "the stop refuses the rest");
    assert!(
        matches!(t.start(), Err(ControlError::Refused(why)) if why.contains("handed over to the new master (pid 200)"))
    );
    // Its exit or its channel closing later is no news for this master.
    assert_eq!(t.to(Input::Closed), []);
    assert_eq!(t.to(Input::Exited("exit status: 0".into())), []);
    assert_eq!(t.wait(Duration::from_secs(60), Seen { stopping: true, ..Seen::default() }), []);
}

#[test]
fn a_successor_that_exits_in_any_state_fails_the_upgrade_at_once() {
    for at in HANDSHAKING {
        let mut t = T::at(at);
        assert_eq!(
            t.to(Input::Exited("exit status: 3".into())),
            [Effect::Close(Side::To), abandoned("the new master exited (exit status: 3)")],
            "{at:?}"
        );
        assert_eq!(t.up.busy(), None);
        assert_eq!(t.wait(Duration::from_secs(60), Seen::default()), [], "nothing left to stop");
    }
    // One that cannot be started at all.
    let mut t = T::at(At::Spawning);
    assert_eq!(
        t.to(Input::SpawnFailed("cannot start the new master: ENOENT".into())),
        [abandoned("cannot start the new master: ENOENT")]
    );
    assert_eq!(t.up.busy(), None);
}

#[test]
fn a_successor_whose_channel_closes_is_stopped_and_said_to_have_exited() {
    for at in HANDSHAKING {
        let mut t = T::at(at);
        assert_eq!(t.to(Input::Closed), [], "{at:?}");
        assert!(t.up.busy().is_some(), "still under way until it is gone");
        // It exits on its own within the moment it is given: how it exited is the reason.
        t.now += 100 * MS;
        assert_eq!(
            t.to(Input::Exited("exit status: 1".into())),
            [Effect::Close(Side::To), abandoned("the new master exited (exit status: 1)")]
        );
    }
    let mut t = T::at(At::Ready);
    t.to(Input::Closed);
    stops_it(&mut t, "the new master exited (signal: 9 (SIGKILL))");
}

#[test]
fn a_successor_late_in_any_step_is_stopped() {
    for (at, limit) in [(At::Hello, HANDSHAKE), (At::Ready, READY + HANDSHAKE), (At::Serving, HANDSHAKE)] {
        let mut t = T::at(at);
        assert_eq!(t.wait(limit - MS, Seen::default()), [], "{at:?}: not late yet");
        assert_eq!(t.wait(MS, Seen::default()), [], "{at:?}: late: it is given its own exit first");
        stops_it(&mut t, &format!("the new master did not answer within {limit:?}"));
    }
}

#[test]
fn a_successor_of_another_version_is_refused_before_any_socket_moves() {
    let mut t = T::at(At::Hello);
    let why = format!("the new master speaks upgrade protocol 99, this one {VERSION}");
    assert_eq!(t.heard(r#"{"t":"hello","version":99,"pid":200}"#), [Effect::Refuse(why.clone())]);
    // Whatever it says next, it gets no socket.
    assert_eq!(t.heard(r#"{"t":"ready"}"#), []);
    // Told why, it exits on its own.
    assert_eq!(t.to(Input::Exited("exit status: 1".into())), [Effect::Close(Side::To), abandoned(&why)]);
    // A first message that is no hello is refused too.
    let mut t = T::at(At::Hello);
    let got = t.heard(r#"{"t":"ready"}"#);
    assert!(matches!(&got[..], [Effect::Refuse(why)] if why.contains("did not say hello")), "{got:?}");
    let mut t = T::at(At::Hello);
    let got = t.heard(r#"{"t":"hello"}"#);
    assert!(matches!(&got[..], [Effect::Refuse(why)] if why.contains("did not say hello")), "{got:?}");
}

#[test]
fn a_successor_that_fails_or_breaks_the_protocol_is_stopped() {
    let mut t = T::at(At::Ready);
    assert_eq!(t.heard(r#"{"t":"failed","reason":"worker 1 exited"}"#), []);
    stops_it(&mut t, "the new master failed: worker 1 exited");
    for at in HANDSHAKING {
        let mut t = T::at(at);
        assert_eq!(t.to(super::wire::from_successor(b"not json")), [], "{at:?}");
        assert!(t.up.busy().is_some());
        let got = t.to(Input::Exited("exit status: 1".into()));
        assert!(
            matches!(&got[1], Effect::Answer(Err(ControlError::Refused(why))) if why.contains("not the upgrade protocol")),
            "{got:?}"
        );
    }
    // A message out of turn: `serving` before `go`, `ready` after it.
    for (at, msg) in [(At::Ready, r#"{"t":"serving"}"#), (At::Serving, r#"{"t":"ready"}"#)] {
        let mut t = T::at(at);
        assert_eq!(t.heard(msg), []);
        let got = t.to(Input::Exited("exit status: 0".into()));
        assert!(
            matches!(&got[1], Effect::Answer(Err(ControlError::Refused(why))) if why.contains("unexpected message")),
            "{at:?}: {got:?}"
        );
    }
}

#[test]
fn sighup_restarts_and_scaling_are_refused_while_an_upgrade_is_under_way_only() {
    assert_eq!(T::new().up.busy(), None);
    for at in UNDER_WAY {
        let t = T::at(at);
        assert_eq!(t.up.busy().as_deref(), Some("a master upgrade is under way"), "{at:?}");
    }
    let mut t = T::at(At::Serving);
    t.heard(r#"{"t":"serving"}"#);
    assert_eq!(t.up.busy(), None, "handed over: the stop refuses them");
    // A successor refuses them until it took over, not after.
    let mut t = T::successor();
    assert!(t.up.busy().unwrap().contains("taking over from the old one (pid 50)"));
    t.from(Input::Go);
    assert_eq!(t.up.busy(), None);
}

#[test]
fn sigterm_calls_off_an_upgrade_in_any_state_and_the_successor_is_stopped() {
    let stopping = Seen { stopping: true, ..Seen::default() };
    for at in HANDSHAKING {
        let mut t = T::at(at);
        assert_eq!(t.wait(MS, stopping), [], "{at:?}");
        stops_it(&mut t, "cancelled: this master is stopping");
    }
    // Already stopping it: the stop goes on as it was.
    let mut t = T::at(At::Stopping);
    assert_eq!(t.up.tick(t.now, stopping), []);
    stops_it(&mut t, "the new master exited (signal: 9 (SIGKILL))");
    // A stop refuses a new upgrade.
    let mut t = T::new();
    assert_eq!(t.up.start(t.now, stopping), Err(ControlError::Stopping));
    // A successor taking over that is stopped says nothing more: no `ready`.
    let mut t = T::successor();
    assert_eq!(t.wait(MS, Seen { stopping: true, all_ready: true, ..Seen::default() }), []);
}

#[test]
fn a_second_upgrade_is_refused_in_any_state_but_after_taking_over() {
    for at in UNDER_WAY {
        let mut t = T::at(at);
        let refused = t.start();
        assert!(
            matches!(&refused, Err(ControlError::Refused(why)) if why.ends_with("one upgrade at a time")),
            "{at:?}: {refused:?}"
        );
    }
    let mut t = T::new();
    assert!(
        matches!(t.up.start(t.now, Seen { reloading: true, ..Seen::default() }), Err(ControlError::Refused(why)) if why.contains("rolling reload"))
    );
    let mut t = T::successor();
    assert!(matches!(t.start(), Err(ControlError::Refused(why)) if why.contains("taking over")));
    // Once it took over, while its predecessor still retires, it may upgrade again.
    t.from(Input::Go);
    assert_eq!(t.start().unwrap(), [Effect::Spawn]);
}

#[test]
fn a_successor_says_ready_once_takes_over_on_go_and_owns_the_sockets_when_the_predecessor_exits() {
    let mut t = T::successor();
    assert_eq!(t.wait(MS, Seen::default()), [], "its workers are not ready yet");
    let ready = Seen { all_ready: true, ..Seen::default() };
    assert_eq!(t.wait(MS, ready), [Effect::TellReady]);
    assert_eq!(t.wait(Duration::from_secs(1), ready), [], "said once");
    assert_eq!(t.from(Input::Go), [Effect::TakeOver, Effect::TellServing]);
    assert_eq!(t.from(Input::PredecessorGone), [Effect::OwnHanded, Effect::Close(Side::From)]);
    assert_eq!(t.from(Input::PredecessorGone), [], "once");
}

#[test]
fn a_successor_called_off_or_whose_worker_fails_or_whose_predecessor_vanishes_stops() {
    let mut t = T::successor();
    assert_eq!(t.from(Input::Off("the old master says: {}".into())), [Effect::Close(Side::From), Effect::StopCluster]);
    let mut t = T::successor();
    assert_eq!(t.from(Input::PredecessorGone), [Effect::Close(Side::From), Effect::StopCluster]);
    let mut t = T::successor();
    let why = "worker 2 (pid 7) exited before every worker was ready: exit code 3".to_string();
    assert_eq!(
        t.from(Input::WorkerFailed(why.clone())),
        [Effect::TellFailed(why.clone()), Effect::Close(Side::From), Effect::StopCluster]
    );
    // After taking over, a worker's exit is a crash like any other, for the core.
    let mut t = T::successor();
    t.from(Input::Go);
    assert_eq!(t.from(Input::WorkerFailed(why)), []);
}

#[test]
fn the_predecessor_exiting_during_an_upgrade_of_its_own_makes_the_sockets_this_masters() {
    let mut t = T::successor();
    t.from(Input::Go);
    assert_eq!(t.start().unwrap(), [Effect::Spawn]);
    t.to(Input::Spawned(NEW));
    assert_eq!(t.from(Input::PredecessorGone), [Effect::OwnHanded, Effect::Close(Side::From)]);
    // ... and if it is still retiring when this master hands over, the sockets are shared with
    // the new successor: the channel to the old one is closed, its exit is no news.
    let mut t = T::successor();
    t.from(Input::Go);
    t.start().unwrap();
    t.to(Input::Spawned(NEW));
    t.heard(&format!(r#"{{"t":"hello","version":{VERSION}}}"#));
    t.heard(r#"{"t":"ready"}"#);
    let got = t.heard(r#"{"t":"serving"}"#);
    assert_eq!(&got[..2], [Effect::HandOver(NEW), Effect::Close(Side::From)]);
    assert_eq!(t.from(Input::PredecessorGone), []);
    // A failed upgrade leaves the old one's channel as it was.
    let mut t = T::successor();
    t.from(Input::Go);
    t.start().unwrap();
    t.to(Input::Spawned(NEW));
    t.to(Input::Exited("exit status: 2".into()));
    assert_eq!(t.from(Input::PredecessorGone), [Effect::OwnHanded, Effect::Close(Side::From)]);
}

#[test]
fn news_of_a_successor_given_up_on_changes_nothing() {
    let mut t = T::at(At::Stopping);
    assert_eq!(t.heard(r#"{"t":"serving"}"#), []);
    assert_eq!(t.heard(r#"{"t":"ready"}"#), []);
    assert_eq!(t.to(Input::Closed), []);
    assert!(t.up.busy().is_some());
    let mut t = T::new();
    assert_eq!(t.to(Input::Exited("exit status: 0".into())), [], "no upgrade");
    assert_eq!(t.heard(r#"{"t":"hello","version":1}"#), []);
    let _ = Heard::Other;
}
