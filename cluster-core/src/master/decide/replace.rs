//! Replacing and re-counting workers in the decision core: commands, scaling, rolling reloads
//! and limits. Every replacement starts the new process first and retires the old one only
//! once the new one is ready.

use std::time::Instant;

use super::life::bump;
use super::*;
use crate::log::{note, warning};

impl Core {
    pub(super) fn apply(&mut self, command: Command, now: Instant, out: &mut Vec<Action>) {
        match (command, self.stop) {
            (Command::Stop(StopKind::Abort), _) => {
                warning!(event = "stop", kind = "abort", "second SIGINT: killing all workers");
                self.stop_at = None;
                self.stop = Stop::Abort;
                self.kill_all(out);
            }
            (Command::Stop(StopKind::Graceful), Stop::Running)
                if self.stop_at.is_none() && !self.cfg.stop_delay().is_zero() =>
            {
                // Not ready from now on (`stopping()`), serving on until the delay is over.
                let delay = self.cfg.stop_delay();
                note!(
                    event = "stop",
                    kind = "delayed",
                    "stopping in {delay:?}: not ready from now on, serving until then"
                );
                self.stop_at = Some(now + delay);
                out.push(Action::Emit(Event::Stopping { delay }));
            }
            (Command::Stop(StopKind::Graceful | StopKind::Now), Stop::Running) => {
                self.stop_at = None;
                let timeout = self.cfg.kill_timeout;
                note!(event = "stop", kind = "graceful", "stopping gracefully (kill timeout {timeout:?})");
                self.stop = Stop::Graceful;
                if self.reload.take().is_some() {
                    note!(event = "reload_cancelled", "reload cancelled");
                }
                out.push(Action::StopListening { drain: true });
                let serials: Vec<Serial> = self.procs.keys().copied().collect();
                for serial in serials {
                    self.retire(serial, false, now, out);
                }
            }
            (Command::Stop(StopKind::Fast), Stop::Running | Stop::Graceful) => {
                note!(event = "stop", kind = "fast", "fast stop");
                self.stop_at = None;
                self.stop = Stop::Fast;
                self.reload = None;
                out.push(Action::StopListening { drain: false });
                self.kill_all(out);
            }
            (Command::SetWorkers(n), Stop::Running) if self.stop_at.is_none() => {
                let n = n.clamp(1, MAX_WORKERS);
                if n == self.target {
                    note!(event = "scale", from = n, to = n, "already {n} worker(s)");
                } else {
                    note!(event = "scale", from = self.target, to = n, "scaling: {} -> {n} worker(s)", self.target);
                }
                self.target = n;
            }
            // Also while stopping, to answer it (`can_restart` refuses then): a restart asked
            // in the step of a stop is told so, not left waiting for the master's exit.
            (Command::Restart(id), _) => {
                if let Err(why) = self.can_restart(id) {
                    out.push(Action::Answer(Answer::Restart { id, result: Err(why) }));
                    return;
                }
                note!(event = "restart", id, "restarting {}", Peer::from_wire(id));
                self.start_incoming(id, Cause::Limit, now, out);
                if let Some(incoming) = self.slots.get_mut(&id).and_then(|s| s.incoming.as_mut()) {
                    incoming.answer = true;
                }
            }
            (Command::Reload, Stop::Running) if self.stop_at.is_none() => match &mut self.reload {
                Some(reload) => {
                    reload.again = true;
                    note!(event = "reload_queued", "a reload is in progress; another one follows it");
                }
                None => self.begin_reload(now, out),
            },
            _ => {}
        }
    }

    /// Adds or removes worker slots to match the target (removed ones: highest ids first, their
    /// processes retire gracefully).
    pub(super) fn scale(&mut self, out: &mut Vec<Action>, now: Instant) {
        if self.stopping() {
            return;
        }
        while self.worker_count() < self.target {
            let id = self.slots.range(..AGENT_ID).next_back().map_or(1, |(id, _)| id + 1);
            self.slots.insert(id, Slot::default());
        }
        while self.worker_count() > self.target {
            let id = *self.slots.range(..AGENT_ID).next_back().expect("a slot").0;
            let slot = self.slots.remove(&id).expect("the slot");
            out.push(Action::CloseSockets(id));
            if slot.routed.is_some() {
                out.push(Action::Route { id, to: None });
            }
            if let Some(reload) = &mut self.reload {
                reload.queue.retain(|s| *s != id);
                reload.active.retain(|s| *s != id);
            }
            if slot.incoming.as_ref().is_some_and(|i| i.answer) {
                let result = Err(format!("worker {id} was removed by scaling down"));
                out.push(Action::Answer(Answer::Restart { id, result }));
            }
            for serial in slot.current.into_iter().chain(slot.incoming.map(|i| i.serial)) {
                self.retire(serial, true, now, out);
            }
        }
    }

    /// The incoming process of slot `id` is ready: it serves the slot and the old one retires.
    pub(super) fn promote(&mut self, id: u32, now: Instant, out: &mut Vec<Action>) {
        let slot = self.slots.get_mut(&id).expect("the slot");
        let incoming = slot.incoming.take().expect("an incoming process");
        slot.retry_at = None;
        let old = slot.current.replace(incoming.serial);
        let new_pid = self.procs[&incoming.serial].pid;
        if incoming.answer {
            let old_pid = old.and_then(|s| self.procs.get(&s)).map_or(0, |p| p.pid);
            out.push(Action::Answer(Answer::Restart { id, result: Ok((old_pid, new_pid)) }));
        }
        match old.and_then(|s| self.procs.get(&s)) {
            Some(p) => note!(
                event = "replaced",
                id,
                old_pid = p.pid,
                pid = new_pid,
                "{} replaced: pid {} -> pid {new_pid}",
                Peer::from_wire(id),
                p.pid
            ),
            None => note!(event = "replaced", id, pid = new_pid, "{} is back (pid {new_pid})", Peer::from_wire(id)),
        }
        if let Some(old) = old {
            self.retire(old, true, now, out);
        }
        if incoming.cause == Cause::Reload
            && let Some(reload) = &mut self.reload
        {
            reload.active.retain(|a| *a != id);
            reload.replaced += 1;
        }
    }

    /// The process started to take over slot `id` died, could not start, or was late.
    pub(super) fn incoming_failed(&mut self, id: u32, why: &str, now: Instant, out: &mut Vec<Action>) {
        let (first, max) = (self.cfg.restart_delay, self.cfg.restart_delay_max);
        let Some(slot) = self.slots.get_mut(&id) else { return };
        let Some(incoming) = slot.incoming.take() else { return };
        if incoming.answer {
            out.push(Action::Answer(Answer::Restart { id, result: Err(why.to_string()) }));
        }
        match incoming.cause {
            Cause::Reload => self.abandon_reload(id, why, out),
            Cause::Limit => {
                slot.backoff = bump(slot.backoff, first, max);
                slot.retry_at = Some(now + slot.backoff);
                warning!(event = "replace_failed", id, reason = %why, "replacement of {} failed: {why}; the old process keeps serving", Peer::from_wire(id));
            }
        }
        if !self.draining() && self.slots.get(&id).is_some_and(|s| s.current.is_none()) {
            self.schedule_restart(id, true, now, out);
        }
    }

    pub(super) fn begin_reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        let (n, at_a_time) = (self.worker_count(), self.cfg.reload_concurrency);
        note!(event = "reload_start", workers = n, "reloading {n} worker(s), {at_a_time} at a time");
        // The agent is a singleton: it is stopped, then restarted, never doubled.
        if let Some(agent) = self.slots.get(&AGENT_ID).and_then(|s| s.current) {
            note!(event = "agent_restart", "restarting the agent");
            self.retire(agent, true, now, out);
        }
        self.reloads += 1;
        self.reload = Some(Reload {
            seq: self.reloads,
            queue: self.slots.range(..AGENT_ID).map(|(id, _)| *id).collect(),
            active: Vec::new(),
            replaced: 0,
            again: false,
            started: now,
        });
    }

    /// Starts the next replacements of the reload, or ends it.
    pub(super) fn advance_reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        loop {
            let Some(reload) = &mut self.reload else { return };
            if reload.active.len() >= self.cfg.reload_concurrency.max(1) {
                return;
            }
            let Some(id) = reload.queue.pop_front() else {
                if !reload.active.is_empty() {
                    return;
                }
                let reload = self.reload.take().expect("a reload");
                let took = now.saturating_duration_since(reload.started);
                note!(
                    event = "reload_done",
                    replaced = reload.replaced,
                    ms = took.as_millis() as u64,
                    "reload complete in {} ms",
                    took.as_millis()
                );
                out.push(Action::Emit(Event::ReloadDone { replaced: reload.replaced, took }));
                let result = Ok((reload.replaced, took.as_millis() as u64));
                out.push(Action::Answer(Answer::Reload { upto: reload.seq, result }));
                if reload.again {
                    self.begin_reload(now, out);
                    continue;
                }
                return;
            };
            if !self.slots.contains_key(&id) {
                continue;
            }
            reload.active.push(id);
            self.start_incoming(id, Cause::Reload, now, out);
        }
    }

    /// Stops the reload; the old processes of slots not yet replaced keep serving.
    pub(super) fn abandon_reload(&mut self, id: u32, why: &str, out: &mut Vec<Action>) {
        let Some(reload) = self.reload.take() else { return };
        let kept = reload.queue.len() + reload.active.len();
        warning!(event = "reload_abandoned", id, reason = %why, kept, "reload abandoned: {}: {why}; {kept} worker(s) not replaced keep serving", Peer::from_wire(id));
        out.push(Action::Emit(Event::ReloadAbandoned { id, reason: why.to_string() }));
        // A reload queued behind this one is dropped with it: its waiters learn why.
        let upto = reload.seq + u64::from(reload.again);
        out.push(Action::Answer(Answer::Reload { upto, result: Err((id, why.to_string())) }));
        for other in reload.active.into_iter().filter(|a| *a != id) {
            let Some(incoming) = self.slots.get_mut(&other).and_then(|s| s.incoming.take()) else { continue };
            if incoming.answer {
                let result = Err(format!("the reload that took over its restart was abandoned ({why})"));
                out.push(Action::Answer(Answer::Restart { id: other, result }));
            }
            self.kill(incoming.serial, Some(ExitReason::Abandoned), out);
        }
    }

    /// Starts a process to take over slot `id` once it is ready.
    pub(super) fn start_incoming(&mut self, id: u32, cause: Cause, now: Instant, out: &mut Vec<Action>) {
        let Some(slot) = self.slots.get_mut(&id) else { return };
        if let Some(incoming) = &mut slot.incoming {
            // A reload takes over a replacement under way (its waiter, if any, still hears).
            if cause == Cause::Reload {
                incoming.cause = cause;
            }
            return;
        }
        slot.restart_at = None;
        let expected = match slot.current.and_then(|s| self.procs.get(&s)) {
            Some(p) if !p.keys.is_empty() => p.keys.clone(),
            _ => slot.expected.clone(),
        };
        let serial = self.spawn(id, expected, now, out);
        let deadline = now + self.cfg.ready_timeout;
        self.slots.get_mut(&id).expect("the slot").incoming = Some(Incoming { serial, deadline, cause, answer: false });
    }

    /// Memory and connection limits: a worker over one is replaced gracefully.
    pub(super) fn check_limits(&mut self, now: Instant, world: &dyn World, out: &mut Vec<Action>) {
        if self.reload.is_some() || self.stopping() {
            return;
        }
        let check_rss = self.cfg.max_rss.is_some() && self.next_rss_check.is_none_or(|t| now >= t);
        if check_rss {
            self.next_rss_check = Some(now + RSS_CHECK);
        }
        let mut over = Vec::new();
        for (id, slot) in self.slots.range(..AGENT_ID) {
            let Some((serial, p)) = slot.current.and_then(|s| Some((s, self.procs.get(&s)?))) else { continue };
            if slot.incoming.is_some() || slot.retry_at.is_some_and(|t| t > now) || p.life != Life::Ready {
                continue;
            }
            if let Some(max) = p.max_connections {
                let served = world.handled(serial);
                if served >= max {
                    over.push((*id, format!("served {served} connections (limit {max})")));
                    continue;
                }
            }
            if let (true, Some(max)) = (check_rss, self.cfg.max_rss)
                && let Some(rss) = world.rss(p.pid)
                && rss > max
            {
                over.push((*id, format!("uses {} MiB of memory (limit {} MiB)", rss >> 20, max >> 20)));
            }
        }
        for (id, why) in over {
            note!(event = "limit", id, reason = %why, "{} {why}; replacing it", Peer::from_wire(id));
            self.start_incoming(id, Cause::Limit, now, out);
        }
    }
}
