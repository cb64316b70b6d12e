//! A process's life in the decision core: starting, readiness, liveness, retiring, killing,
//! and what a slot needs when its process is gone (restart, with backoff when it dies young).

use std::time::{Duration, Instant};

use super::*;
use crate::log::{note, warning};

impl Core {
    pub(super) fn notice_suspension(&mut self, now: Instant) {
        if let Some(last) = self.last_step
            && now.saturating_duration_since(last) > SUSPENDED
        {
            let late = now.saturating_duration_since(last).as_secs_f64();
            warning!(
                event = "suspended",
                secs = late,
                "master was suspended for {late:.1}s; heartbeat clocks restarted"
            );
            for p in self.procs.values_mut() {
                p.last_seen = now;
            }
        }
        self.last_step = Some(now);
    }

    /// Forgets the processes that are gone and decides what their slots need.
    pub(super) fn reap(&mut self, now: Instant, out: &mut Vec<Action>) {
        let gone: Vec<Serial> =
            self.procs.iter().filter(|(_, p)| matches!(p.life, Life::Exited { .. })).map(|(s, _)| *s).collect();
        for serial in gone {
            let p = self.procs.remove(&serial).expect("the process");
            let Life::Exited { status, retired } = p.life else { unreachable!() };
            let uptime = now.saturating_duration_since(p.started);
            if p.pid != 0 {
                let how = describe(status);
                let name = Peer::from_wire(p.id);
                let (id, pid, secs) = (p.id, p.pid, uptime.as_secs_f64());
                let (code, signal) = (status.code, status.signal);
                match p.reason.as_ref().map(ToString::to_string) {
                    Some(reason) => note!(
                        event = "exit", id, pid, code, signal, retired, reason = %reason,
                        "{name} (pid {pid}) {how} after {secs:.1}s ({reason})"
                    ),
                    None => note!(
                        event = "exit",
                        id,
                        pid,
                        code,
                        signal,
                        retired,
                        "{name} (pid {pid}) {how} after {secs:.1}s"
                    ),
                }
                out.push(Action::Emit(Event::Exit(ExitInfo {
                    id: p.id,
                    pid: p.pid,
                    code: status.code,
                    signal: status.signal,
                    after_disconnect: retired,
                    reason: p.reason.clone(),
                })));
            }
            let Some(slot) = self.slots.get_mut(&p.id) else { continue };
            // During the first start no process has been ready yet (the first ready ends it).
            if self.first_start.is_some() {
                slot.failed_starts += 1;
                let name = Peer::from_wire(p.id);
                let how = if p.pid == 0 { "could not be started".into() } else { describe(status) };
                let why = p.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default();
                self.start_failure.get_or_insert_with(|| format!("{name} {how} before it was ready{why}"));
            }
            if slot.incoming.as_ref().is_some_and(|i| i.serial == serial) {
                let how = if p.pid == 0 { "could not be started".into() } else { describe(status) };
                self.incoming_failed(p.id, &format!("its new process {how} before it was ready"), now, out);
                continue;
            }
            if slot.current != Some(serial) {
                continue;
            }
            slot.current = None;
            // Still restarted during the stop delay (`draining()` is this test; `slot` borrows
            // `self`): it serves until the drain.
            if self.stop != Stop::Running {
                continue;
            }
            if slot.incoming.is_some() {
                // Its replacement is on the way and takes over when ready.
                slot.restarts += 1;
            } else {
                // A process asked to stop (the agent, on a reload) did not crash.
                let unstable = !retired && (p.ready_at.is_none() || uptime < self.cfg.min_uptime);
                self.schedule_restart(p.id, unstable, now, out);
            }
        }
    }

    /// The first start fails fast: when, before any worker was ever ready, every worker died
    /// [`FIRST_START_TRIES`] times before it was ready, or none was ready within the ready
    /// timeout, the master stops and exits 1 with the reason (a bind error, an exit) instead
    /// of restarting forever. Once a worker has been ready, crash loops back off and never
    /// give up. `fail_fast(false)` keeps trying from the start too.
    pub(super) fn check_first_start(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(since) = self.first_start else { return };
        if !self.cfg.fail_fast || self.stopping() {
            return;
        }
        let mut workers = self.slots.range(..AGENT_ID).map(|(_, s)| s).peekable();
        let all_failed = workers.peek().is_some() && workers.all(|s| s.failed_starts >= FIRST_START_TRIES);
        let late = now.saturating_duration_since(since) >= self.cfg.ready_timeout;
        if !(all_failed || late) {
            return;
        }
        let last = self.start_failure.clone();
        let reason = match (all_failed, last) {
            (true, Some(last)) => last,
            (true, None) => "every worker exited before it was ready".into(),
            (false, last) => {
                let timeout = self.cfg.ready_timeout;
                let last = last.map(|l| format!("; last: {l}")).unwrap_or_default();
                format!("no worker was ready within {timeout:?}{last}")
            }
        };
        warning!(
            event = "start_failed", reason = %reason,
            "the first start failed: {reason}; stopping (fail_fast(false) or CLUSTER_FAIL_FAST=0 keeps trying)"
        );
        self.stop = Stop::Failed;
        self.reload = None;
        out.push(Action::StopListening { drain: false });
        self.kill_all(out);
    }

    /// Protocol errors, heartbeats, readiness, and replacements late to be ready.
    pub(super) fn check(&mut self, now: Instant, out: &mut Vec<Action>) {
        let serials: Vec<Serial> = self.procs.keys().copied().collect();
        for serial in serials {
            let p = &self.procs[&serial];
            if !p.life.alive() || p.pid == 0 {
                continue;
            }
            if let Some(reason @ ExitReason::ProtocolError(_)) = &p.reason {
                self.kill(serial, Some(reason.clone()), out);
                continue;
            }
            let silent = now.saturating_duration_since(p.last_seen);
            if self.cfg.heartbeat_timeout.is_some_and(|timeout| silent > timeout) {
                self.kill(serial, Some(ExitReason::MissedHeartbeats), out);
                continue;
            }
            if p.life == Life::Online && self.is_ready(p) {
                self.became_ready(serial, now, out);
            }
        }
        self.stop_asked(now, out);
        let late: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| s.incoming.as_ref().is_some_and(|i| i.deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let why = format!("its new process was not ready within {:?}", self.cfg.ready_timeout);
            if let Some(incoming) = &self.slots[&id].incoming {
                self.kill(incoming.serial, Some(ExitReason::NotReady), out);
            }
            self.incoming_failed(id, &why, now, out);
        }
    }

    /// Workers that got SIGTERM or SIGINT from outside. Under systemd's default
    /// `KillMode=control-group` every process gets it at once: the master's own stop then
    /// retires each worker in order, so nothing is done for a worker until [`STOP_ASK_WAIT`]
    /// has passed without the master stopping. After that (only the worker was signalled), it
    /// is replaced like a restart: the new process first, then it retires.
    fn stop_asked(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.stopping() {
            return;
        }
        let due: Vec<(Serial, u32)> = self
            .procs
            .iter()
            .filter(|(_, p)| p.life.alive() && p.stop_asked.is_some_and(|at| now >= at + STOP_ASK_WAIT))
            .map(|(s, p)| (*s, p.id))
            .collect();
        for (serial, id) in due {
            self.procs.get_mut(&serial).expect("the process").stop_asked = None;
            let Some(slot) = self.slots.get(&id) else { continue };
            if slot.current != Some(serial) || slot.incoming.is_some() {
                continue; // already being replaced, or itself a replacement that will be retired
            }
            note!(
                event = "stop_asked",
                id,
                pid = self.procs[&serial].pid,
                "{} was signalled to stop; replacing it",
                Peer::from_wire(id)
            );
            if id == AGENT_ID {
                // A singleton: it goes first, and its slot starts a new one.
                self.retire(serial, true, now, out);
            } else {
                self.start_incoming(id, Cause::Limit, now, out);
            }
        }
    }

    pub(super) fn is_ready(&self, p: &Proc) -> bool {
        // The agent takes no connections: it is ready once it runs.
        let listening = if p.id == AGENT_ID {
            true
        } else if p.expected.is_empty() {
            !p.keys.is_empty()
        } else {
            p.expected.iter().all(|k| p.keys.contains(k))
        };
        p.said_ready || (!self.cfg.wait_ready && listening)
    }

    pub(super) fn became_ready(&mut self, serial: Serial, now: Instant, out: &mut Vec<Action>) {
        let p = self.procs.get_mut(&serial).expect("the process");
        p.life = Life::Ready;
        p.ready_at = Some(now);
        let (id, pid) = (p.id, p.pid);
        let took = now.saturating_duration_since(p.started).as_micros();
        // The first start is over: from now on, crash loops back off and never give up.
        self.first_start = None;
        self.start_failure = None;
        note!(
            event = "ready",
            id,
            pid,
            us = took as u64,
            "{} ready (pid {pid}) {took} us after start",
            Peer::from_wire(id)
        );
        out.push(Action::Emit(Event::Ready { id, pid }));
        let keys = p.keys.clone();
        let Some(slot) = self.slots.get_mut(&id) else { return };
        if !keys.is_empty() {
            slot.expected = keys;
        }
        if slot.incoming.as_ref().is_some_and(|i| i.serial == serial) {
            self.promote(id, now, out);
        }
    }

    /// Restarts slot `id`: at once after a stable run, with growing delays while it keeps
    /// dying young (never giving up).
    pub(super) fn schedule_restart(&mut self, id: u32, unstable: bool, now: Instant, out: &mut Vec<Action>) {
        let (first, max) = (self.cfg.restart_delay, self.cfg.restart_delay_max);
        let Some(slot) = self.slots.get_mut(&id) else { return };
        slot.restarts += 1;
        if !unstable {
            slot.backoff = Duration::ZERO;
            slot.restart_at = None;
            return;
        }
        slot.backoff = bump(slot.backoff, first, max);
        slot.restart_at = Some(now + slot.backoff);
        let (restarts, delay) = (slot.restarts, slot.backoff);
        warning!(
            event = "crash_loop",
            id,
            restarts,
            delay_ms = delay.as_millis() as u64,
            "{} is crash-looping (restart {restarts}); next start in {delay:?}",
            Peer::from_wire(id)
        );
        out.push(Action::Emit(Event::CrashLoop { id, restarts, delay }));
    }

    /// Starts a process for every slot that has none and whose (re)start is due.
    pub(super) fn fill_slots(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.draining() {
            return;
        }
        let due: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| s.current.is_none() && s.incoming.is_none() && s.restart_at.is_none_or(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let slot = self.slots.get_mut(&id).expect("the slot");
            slot.restart_at = None;
            let expected = slot.expected.clone();
            let serial = self.spawn(id, expected, now, out);
            self.slots.get_mut(&id).expect("the slot").current = Some(serial);
        }
    }

    /// Moves retiring processes along: closed once no connection waits in the master for a
    /// worker, disconnected once every connection sent to them is acknowledged, killed at the
    /// kill timeout.
    pub(super) fn retire_steps(&mut self, now: Instant, world: &dyn World, out: &mut Vec<Action>) {
        let master_draining = world.master_draining();
        let mut backlog_empty = None;
        let mut late = Vec::new();
        for (serial, p) in self.procs.iter_mut() {
            let Life::Retiring { step, kill_at } = &mut p.life else { continue };
            if now >= *kill_at {
                late.push(*serial);
                continue;
            }
            if *step == Step::Open {
                // No worker is closed while the master still has connections to hand out: any
                // of them may get the last ones.
                if master_draining || !*backlog_empty.get_or_insert_with(|| world.backlog_empty()) {
                    continue;
                }
                *step = Step::Closed;
                out.push(Action::Close(*serial));
            }
            if *step == Step::Closed && world.inflight(*serial) == 0 && !world.draining(&p.keys) {
                *step = Step::Disconnected;
                out.push(Action::Disconnect(*serial));
                out.push(Action::Emit(Event::Disconnect { id: p.id, pid: p.pid }));
            }
        }
        for serial in late {
            self.kill(serial, Some(ExitReason::KillTimeout), out);
        }
    }

    /// Messages for a worker id go to the process serving it, once that one has connected.
    pub(super) fn route(&mut self, out: &mut Vec<Action>) {
        for (id, slot) in self.slots.iter_mut() {
            let to =
                slot.current.filter(|s| self.procs.get(s).is_some_and(|p| p.life.alive() && p.life != Life::Starting));
            if to != slot.routed {
                slot.routed = to;
                out.push(Action::Route { id: *id, to });
            }
        }
    }

    // ----- helpers -----

    pub(super) fn spawn(&mut self, id: u32, expected: Vec<ListenKey>, now: Instant, out: &mut Vec<Action>) -> Serial {
        let serial = self.next_serial;
        self.next_serial += 1;
        let max_connections = self.cfg.max_connections.map(|n| {
            let jitter = self.cfg.max_connections_jitter;
            let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one((self.seed, serial));
            n + if jitter == 0 { 0 } else { hash % (jitter + 1) }
        });
        let p = Proc {
            id,
            pid: 0,
            started: now,
            life: Life::Starting,
            ready_at: None,
            said_ready: false,
            keys: Vec::new(),
            expected,
            last_seen: now,
            max_connections,
            reason: None,
            stop_asked: None,
        };
        self.procs.insert(serial, p);
        out.push(Action::Spawn { serial, id });
        serial
    }

    /// Retires a process: with `close_now`, it gets no new connections from this moment. A
    /// process already retiring keeps its step: only a graceful stop retires one open, and
    /// then nothing else retires any (no reload, scaling or replacement runs while stopping).
    pub(super) fn retire(&mut self, serial: Serial, close_now: bool, now: Instant, out: &mut Vec<Action>) {
        let kill_at = now + self.cfg.kill_timeout;
        let Some(p) = self.procs.get_mut(&serial) else { return };
        if !matches!(p.life, Life::Starting | Life::Online | Life::Ready) {
            return;
        }
        let step = if close_now { Step::Closed } else { Step::Open };
        p.life = Life::Retiring { step, kill_at };
        if close_now {
            out.push(Action::Close(serial));
        }
    }

    /// SIGKILLs a live process.
    pub(super) fn kill(&mut self, serial: Serial, reason: Option<ExitReason>, out: &mut Vec<Action>) {
        let Some(p) = self.procs.get_mut(&serial) else { return };
        if !p.life.alive() {
            return;
        }
        if let Some(reason) = reason {
            warning!(
                event = "kill", id = p.id, pid = p.pid, reason = %reason,
                "killing {} (pid {}): {reason}", Peer::from_wire(p.id), p.pid
            );
            p.reason.get_or_insert(reason);
        }
        p.life = Life::Killed { retired: matches!(p.life, Life::Retiring { .. }) };
        out.push(Action::Kill(serial));
    }

    pub(super) fn kill_all(&mut self, out: &mut Vec<Action>) {
        let serials: Vec<Serial> = self.procs.keys().copied().collect();
        for serial in serials {
            self.kill(serial, None, out);
        }
    }
}

/// The next crash-loop delay: `first`, then doubling up to `max`.
pub(super) fn bump(backoff: Duration, first: Duration, max: Duration) -> Duration {
    if backoff.is_zero() { first } else { (backoff * 2).min(max) }
}

pub(super) fn describe(status: Status) -> String {
    match (status.code, status.signal) {
        (Some(code), _) => format!("exited with code {code}"),
        (_, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "exited".into(),
    }
}
