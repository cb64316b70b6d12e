//! Table tests of the decision core on a fake clock: each case records facts, moves the clock,
//! and checks the actions. No process, socket or real time is involved.

use std::collections::HashMap;

use super::*;

const MS: Duration = Duration::from_millis(1);

#[derive(Default)]
struct FakeWorld {
    backlog: usize,
    inflight: HashMap<Serial, usize>,
    handled: HashMap<Serial, u64>,
    master_draining: bool,
    draining: Vec<ListenKey>,
    rss: HashMap<u32, u64>,
}

impl World for FakeWorld {
    fn backlog_empty(&self) -> bool {
        self.backlog == 0
    }
    fn inflight(&self, serial: Serial) -> usize {
        self.inflight.get(&serial).copied().unwrap_or(0)
    }
    fn handled(&self, serial: Serial) -> u64 {
        self.handled.get(&serial).copied().unwrap_or(0)
    }
    fn master_draining(&self) -> bool {
        self.master_draining
    }
    fn draining(&self, keys: &[ListenKey]) -> bool {
        keys.iter().any(|k| self.draining.contains(k))
    }
    fn rss(&self, pid: u32) -> Option<u64> {
        self.rss.get(&pid).copied()
    }
}

/// The decision core driven the way the supervisor drives it: every `Spawn` succeeds (pid =
/// 1000 + serial) unless `fail_spawns`, and rounds repeat until no action is left.
struct Sim {
    core: Core,
    t0: Instant,
    now: Instant,
    world: FakeWorld,
    fail_spawns: bool,
}

fn cfg(workers: usize) -> Config {
    Config {
        workers,
        heartbeat_timeout: Some(Duration::from_secs(1)),
        kill_timeout: Duration::from_secs(5),
        ready_timeout: Duration::from_secs(2),
        // The first-start rule has its own tests below; the others start with it off.
        fail_fast: false,
        ..Config::default()
    }
}

impl Sim {
    fn new(cfg: Config) -> Sim {
        let now = Instant::now();
        Sim { core: Core::new(Arc::new(cfg), 0), t0: now, now, world: FakeWorld::default(), fail_spawns: false }
    }

    /// Starts a cluster and makes every first worker ready.
    fn started(cfg: Config) -> Sim {
        let mut sim = Sim::new(cfg);
        for (serial, _) in spawns(&sim.step()) {
            sim.ready(serial);
        }
        sim
    }

    fn step(&mut self) -> Vec<Action> {
        let mut all = Vec::new();
        for _ in 0..8 {
            let actions = self.core.reconcile(self.now, &self.world);
            if actions.is_empty() {
                break;
            }
            for action in &actions {
                if let Action::Spawn { serial, .. } = action {
                    let fact = if self.fail_spawns {
                        Fact::SpawnFailed("no such file".into())
                    } else {
                        Fact::Spawned(1000 + *serial as u32)
                    };
                    self.core.record(*serial, fact, self.now);
                }
            }
            all.extend(actions);
        }
        all
    }

    fn fact(&mut self, serial: Serial, fact: Fact) -> Vec<Action> {
        self.core.record(serial, fact, self.now);
        self.step()
    }

    fn cmd(&mut self, command: Command) -> Vec<Action> {
        self.core.command(command);
        self.step()
    }

    /// Moves the clock in ticks, as the supervisor's timer does; every process stays heard
    /// from unless `silent`.
    fn advance(&mut self, by: Duration, silent: &[Serial]) -> Vec<Action> {
        let end = self.now + by;
        let mut all = Vec::new();
        while self.now < end {
            self.now = (self.now + TICK).min(end);
            let alive: Vec<Serial> = self.core.procs.keys().copied().filter(|s| !silent.contains(s)).collect();
            for serial in alive {
                self.core.record(serial, Fact::Heard, self.now);
            }
            all.extend(self.step());
        }
        all
    }

    fn ready(&mut self, serial: Serial) -> Vec<Action> {
        let mut out = self.fact(serial, Fact::Hello);
        out.extend(self.fact(serial, Fact::Listening(1)));
        out
    }

    fn exit(&mut self, serial: Serial, code: i32) -> Vec<Action> {
        self.fact(serial, Fact::Exited(Ok(Status { code: Some(code), signal: None })))
    }

    fn current(&self, id: u32) -> Serial {
        self.core.slots[&id].current.expect("a current process")
    }

    fn life(&self, serial: Serial) -> Option<Life> {
        self.core.procs.get(&serial).map(|p| p.life)
    }
}

fn spawns(actions: &[Action]) -> Vec<(Serial, u32)> {
    actions
        .iter()
        .filter_map(|a| if let Action::Spawn { serial, id } = a { Some((*serial, *id)) } else { None })
        .collect()
}

fn kills(actions: &[Action]) -> Vec<Serial> {
    actions.iter().filter_map(|a| if let Action::Kill(s) = a { Some(*s) } else { None }).collect()
}

fn closes(actions: &[Action]) -> Vec<Serial> {
    actions.iter().filter_map(|a| if let Action::Close(s) = a { Some(*s) } else { None }).collect()
}

fn disconnects(actions: &[Action]) -> Vec<Serial> {
    actions.iter().filter_map(|a| if let Action::Disconnect(s) = a { Some(*s) } else { None }).collect()
}

fn events(actions: &[Action]) -> Vec<&Event> {
    actions.iter().filter_map(|a| if let Action::Emit(e) = a { Some(e) } else { None }).collect()
}

fn crash_delays(actions: &[Action]) -> Vec<Duration> {
    events(actions)
        .into_iter()
        .filter_map(|e| if let Event::CrashLoop { delay, .. } = e { Some(*delay) } else { None })
        .collect()
}

fn exit_code(actions: &[Action]) -> Option<i32> {
    actions.iter().find_map(|a| if let Action::Exit(code) = a { Some(*code) } else { None })
}

fn has(actions: &[Action], f: impl Fn(&Event) -> bool) -> bool {
    events(actions).into_iter().any(f)
}

// ----- start, readiness, routing -----

#[test]
fn first_start_spawns_every_worker_and_routes_each_once_it_says_hello() {
    let mut sim = Sim::new(cfg(3));
    let out = sim.step();
    assert_eq!(spawns(&out), [(1, 1), (2, 2), (3, 3)]);
    assert!(!out.iter().any(|a| matches!(a, Action::Route { .. })), "no route before hello");
    let out = sim.fact(1, Fact::Hello);
    assert!(matches!(out[..], [Action::Route { id: 1, to: Some(1) }]), "{out:?}");
    let out = sim.fact(1, Fact::Listening(1));
    assert!(has(&out, |e| matches!(e, Event::Ready { id: 1, pid: 1001 })), "{out:?}");
}

#[test]
fn with_wait_ready_listening_is_not_enough() {
    let mut sim = Sim::new(Config { wait_ready: true, ..cfg(1) });
    sim.step();
    assert!(events(&sim.ready(1)).is_empty());
    assert!(has(&sim.fact(1, Fact::SaidReady), |e| matches!(e, Event::Ready { .. })));
}

#[test]
fn the_agent_is_ready_once_it_says_hello() {
    let mut sim = Sim::new(Config { agent: true, ..cfg(1) });
    let out = sim.step();
    assert_eq!(spawns(&out), [(1, 1), (2, AGENT_ID)]);
    assert!(has(&sim.fact(2, Fact::Hello), |e| matches!(e, Event::Ready { id: AGENT_ID, .. })));
}

// ----- crashes and backoff -----

#[test]
fn a_stable_worker_that_dies_is_replaced_at_once() {
    let mut sim = Sim::started(cfg(2));
    sim.advance(Duration::from_secs(2), &[]);
    let out = sim.exit(1, 1);
    assert_eq!(spawns(&out), [(3, 1)]);
    assert!(crash_delays(&out).is_empty());
    assert_eq!(sim.core.slots[&1].restarts, 1);
}

#[test]
fn a_worker_dying_young_backs_off_doubling_to_the_cap() {
    let mut sim = Sim::new(Config { restart_delay_max: Duration::from_millis(400), ..cfg(1) });
    sim.step();
    let mut delays = Vec::new();
    let mut serial = 1;
    for _ in 0..5 {
        let out = sim.exit(serial, 3);
        delays.extend(crash_delays(&out));
        assert!(spawns(&out).is_empty(), "not restarted at once");
        let out = sim.advance(delays.last().copied().unwrap(), &[]);
        serial = spawns(&out)[0].0;
    }
    assert_eq!(delays, [100 * MS, 200 * MS, 400 * MS, 400 * MS, 400 * MS]);
}

#[test]
fn a_restart_is_not_early() {
    let mut sim = Sim::new(cfg(1));
    sim.step();
    sim.exit(1, 3);
    assert!(spawns(&sim.advance(90 * MS, &[])).is_empty());
    assert_eq!(spawns(&sim.advance(10 * MS, &[])), [(2, 1)]);
    assert!(sim.core.next_wake(sim.t0) <= sim.t0 + TICK);
}

#[test]
fn a_stable_run_resets_the_backoff() {
    let mut sim = Sim::new(cfg(1));
    sim.step();
    sim.exit(1, 3);
    sim.advance(100 * MS, &[]);
    sim.exit(2, 3);
    let serial = spawns(&sim.advance(200 * MS, &[]))[0].0;
    sim.ready(serial);
    sim.advance(Duration::from_secs(2), &[]);
    let out = sim.exit(serial, 1);
    assert_eq!(spawns(&out).len(), 1, "stable: at once");
    let young = spawns(&out)[0].0;
    assert_eq!(crash_delays(&sim.exit(young, 3)), [100 * MS], "the next crash starts from the first delay");
}

#[test]
fn a_worker_that_cannot_be_spawned_backs_off() {
    let mut sim = Sim::new(cfg(1));
    sim.fail_spawns = true;
    let out = sim.step();
    assert_eq!(spawns(&out).len(), 1);
    assert_eq!(crash_delays(&out), [100 * MS]);
    assert!(!has(&out, |e| matches!(e, Event::Exit(_))), "never ran: no exit event");
    sim.fail_spawns = false;
    assert_eq!(spawns(&sim.advance(100 * MS, &[])).len(), 1);
}

#[test]
fn a_wait_error_is_not_reported_as_a_clean_exit() {
    let mut sim = Sim::started(cfg(1));
    let out = sim.fact(1, Fact::Exited(Err("ECHILD".into())));
    let Some(Event::Exit(info)) = events(&out).into_iter().find(|e| matches!(e, Event::Exit(_))) else { panic!() };
    assert_eq!((info.code, info.signal), (None, None));
    assert_eq!(info.reason, Some(ExitReason::WaitFailed("ECHILD".into())));
}

#[test]
fn a_panic_is_the_exit_reason() {
    let mut sim = Sim::started(cfg(1));
    sim.fact(1, Fact::Panicked("boom".into()));
    let out = sim.exit(1, 101);
    assert!(has(&out, |e| matches!(e, Event::Exit(i) if i.reason == Some(ExitReason::Panic("boom".into())))));
}

// ----- liveness and protocol errors -----

#[test]
fn a_silent_worker_is_killed_then_replaced() {
    let mut sim = Sim::started(cfg(2));
    let out = sim.advance(Duration::from_millis(1200), &[1]);
    assert_eq!(kills(&out), [1]);
    assert_eq!(sim.life(1), Some(Life::Killed { retired: false }));
    let out = sim.fact(1, Fact::Exited(Ok(Status { code: None, signal: Some(9) })));
    assert!(has(&out, |e| matches!(e, Event::Exit(i) if i.reason == Some(ExitReason::MissedHeartbeats))));
    assert_eq!(spawns(&out), [(3, 1)]);
}

#[test]
fn a_suspended_master_restarts_the_heartbeat_clocks() {
    let mut sim = Sim::started(cfg(1));
    sim.now += Duration::from_secs(3);
    assert!(kills(&sim.step()).is_empty());
    assert!(kills(&sim.advance(Duration::from_millis(500), &[])).is_empty());
}

#[test]
fn a_protocol_error_kills_the_worker_once() {
    let mut sim = Sim::started(cfg(2));
    assert_eq!(kills(&sim.fact(2, Fact::ProtocolError("unknown message tag 0x7f".into()))), [2]);
    assert!(kills(&sim.fact(2, Fact::ProtocolError("again".into()))).is_empty());
    let out = sim.exit(2, 0);
    assert!(has(
        &out,
        |e| matches!(e, Event::Exit(i) if matches!(&i.reason, Some(ExitReason::ProtocolError(m)) if m.contains("0x7f")))
    ));
}

// ----- reloads -----

#[test]
fn a_reload_replaces_one_worker_at_a_time_new_one_first() {
    let mut sim = Sim::started(cfg(2));
    let out = sim.cmd(Command::Reload);
    assert_eq!(spawns(&out), [(3, 1)]);
    assert!(closes(&out).is_empty(), "nothing retires before its replacement is ready");
    sim.fact(3, Fact::Hello);
    let out = sim.fact(3, Fact::Listening(1));
    assert_eq!(closes(&out), [1]);
    assert_eq!(spawns(&out), [(4, 2)]);
    assert_eq!(disconnects(&out), [1]);
    let out = sim.ready(4);
    assert_eq!(closes(&out), [2]);
    assert!(has(&out, |e| matches!(e, Event::ReloadDone { replaced: 2, .. })));
}

#[test]
fn a_reload_with_concurrency_two_starts_two_at_once() {
    let mut sim = Sim::started(Config { reload_concurrency: 2, ..cfg(3) });
    assert_eq!(spawns(&sim.cmd(Command::Reload)), [(4, 1), (5, 2)]);
    assert_eq!(spawns(&sim.ready(4)), [(6, 3)]);
}

#[test]
fn a_new_worker_dying_before_ready_abandons_the_reload() {
    let mut sim = Sim::started(cfg(2));
    sim.cmd(Command::Reload);
    let out = sim.exit(3, 3);
    assert!(has(&out, |e| matches!(e, Event::ReloadAbandoned { id: 1, .. })));
    assert!(closes(&out).is_empty() && spawns(&out).is_empty(), "the old workers keep serving: {out:?}");
    assert_eq!((sim.current(1), sim.current(2)), (1, 2));
}

#[test]
fn a_new_worker_late_to_be_ready_is_killed_and_abandons_the_reload() {
    let mut sim = Sim::started(cfg(2));
    sim.cmd(Command::Reload);
    sim.fact(3, Fact::Hello);
    let out = sim.advance(Duration::from_secs(2), &[]);
    assert_eq!(kills(&out), [3]);
    assert!(has(&out, |e| matches!(e, Event::ReloadAbandoned { id: 1, .. })));
    let out = sim.exit(3, 0);
    assert!(has(&out, |e| matches!(e, Event::Exit(i) if i.reason == Some(ExitReason::NotReady))));
    assert!(spawns(&out).is_empty());
}

#[test]
fn messages_go_to_the_old_worker_until_its_replacement_is_ready() {
    let mut sim = Sim::started(cfg(1));
    sim.cmd(Command::Reload);
    let out = sim.fact(2, Fact::Hello);
    assert!(!out.iter().any(|a| matches!(a, Action::Route { .. })), "the new one said hello: {out:?}");
    // It misses the ready timeout: the old one keeps its route through the incoming's death.
    sim.advance(Duration::from_secs(2), &[]);
    let out = sim.exit(2, 0);
    assert!(!out.iter().any(|a| matches!(a, Action::Route { .. })), "{out:?}");
    assert_eq!(sim.core.slots[&1].routed, Some(1));
}

#[test]
fn a_sighup_during_a_reload_queues_one_more() {
    let mut sim = Sim::started(cfg(1));
    sim.cmd(Command::Reload);
    assert!(spawns(&sim.cmd(Command::Reload)).is_empty());
    assert!(spawns(&sim.cmd(Command::Reload)).is_empty(), "one more, not two");
    let out = sim.ready(2);
    assert!(has(&out, |e| matches!(e, Event::ReloadDone { .. })));
    assert_eq!(spawns(&out), [(3, 1)], "the queued reload starts");
    let out = sim.ready(3);
    assert!(has(&out, |e| matches!(e, Event::ReloadDone { .. })));
    assert!(spawns(&out).is_empty());
}

#[test]
fn a_reload_restarts_the_agent_never_running_two() {
    let mut sim = Sim::started(Config { agent: true, ..cfg(1) });
    let agent = sim.current(AGENT_ID);
    let out = sim.cmd(Command::Reload);
    assert_eq!(closes(&out), [agent]);
    assert!(!spawns(&out).iter().any(|(_, id)| *id == AGENT_ID), "not while the old one runs");
    let out = sim.exit(agent, 0);
    assert_eq!(spawns(&out).iter().filter(|(_, id)| *id == AGENT_ID).count(), 1);
}

#[test]
fn scaling_up_during_a_reload_starts_the_new_worker_at_once() {
    let mut sim = Sim::started(cfg(1));
    sim.cmd(Command::Reload);
    assert_eq!(spawns(&sim.cmd(Command::SetWorkers(2))), [(3, 2)]);
    sim.ready(3);
    assert!(has(&sim.ready(2), |e| matches!(e, Event::ReloadDone { replaced: 1, .. })));
}

#[test]
fn scaling_down_during_a_reload_retires_the_removed_worker_and_finishes() {
    let mut sim = Sim::started(cfg(2));
    sim.cmd(Command::Reload);
    let out = sim.cmd(Command::SetWorkers(1));
    assert!(out.iter().any(|a| matches!(a, Action::CloseSockets(2))));
    assert_eq!(closes(&out), [2]);
    assert!(has(&sim.ready(3), |e| matches!(e, Event::ReloadDone { replaced: 1, .. })));
    assert!(!sim.core.slots.contains_key(&2));
}

#[test]
fn scaling_never_goes_below_one_and_the_same_count_does_nothing() {
    let mut sim = Sim::started(cfg(1));
    assert!(sim.cmd(Command::SetWorkers(0)).is_empty());
    assert!(sim.cmd(Command::SetWorkers(1)).is_empty());
    assert_eq!(sim.core.worker_count(), 1);
}

// ----- limits -----

#[test]
fn a_worker_over_its_connection_limit_is_replaced_new_one_first() {
    let mut sim = Sim::started(Config { max_connections: Some(10), ..cfg(1) });
    sim.world.handled.insert(1, 10);
    let out = sim.advance(TICK, &[]);
    assert_eq!(spawns(&out), [(2, 1)]);
    assert!(closes(&out).is_empty());
    assert_eq!(closes(&sim.ready(2)), [1]);
}

#[test]
fn a_worker_over_its_memory_limit_is_replaced() {
    let mut sim = Sim::started(Config { max_rss: Some(1 << 20), ..cfg(1) });
    sim.world.rss.insert(1001, 2 << 20);
    assert_eq!(spawns(&sim.advance(RSS_CHECK, &[])), [(2, 1)], "checked once a second");
}

#[test]
fn a_failed_limit_replacement_backs_off_instead_of_retrying_every_tick() {
    let mut sim = Sim::started(Config { max_connections: Some(10), ..cfg(1) });
    sim.world.handled.insert(1, 10);
    sim.fail_spawns = true;
    let out = sim.advance(Duration::from_millis(550), &[]);
    // Tries at 0.1 s, then after 100 ms, then after 200 ms: 3 in 550 ms, not 5.
    assert_eq!(spawns(&out).len(), 3, "{out:?}");
    assert_eq!(sim.current(1), 1, "the old worker keeps serving");
}

// ----- retiring -----

#[test]
fn a_retiring_worker_is_disconnected_once_it_acknowledged_everything() {
    let mut sim = Sim::started(cfg(1));
    sim.world.inflight.insert(1, 3);
    let out = sim.cmd(Command::Reload);
    let out = [out, sim.ready(2)].concat();
    assert_eq!(closes(&out), [1]);
    assert!(disconnects(&out).is_empty());
    sim.world.inflight.clear();
    let out = sim.advance(FAST_TICK, &[]);
    assert_eq!(disconnects(&out), [1]);
    assert!(has(&out, |e| matches!(e, Event::Disconnect { id: 1, .. })));
}

#[test]
fn a_worker_accepting_on_a_draining_socket_is_not_disconnected_yet() {
    let mut sim = Sim::started(cfg(2));
    sim.world.draining = vec![1];
    let out = sim.cmd(Command::SetWorkers(1));
    assert_eq!(closes(&out), [2]);
    assert!(disconnects(&out).is_empty());
    sim.world.draining.clear();
    assert_eq!(disconnects(&sim.advance(FAST_TICK, &[])), [2]);
}

#[test]
fn a_retiring_worker_still_running_at_the_kill_timeout_is_killed() {
    let mut sim = Sim::started(cfg(1));
    sim.cmd(Command::Reload);
    sim.ready(2);
    let out = sim.advance(Duration::from_secs(5), &[]);
    assert_eq!(kills(&out), [1]);
    let out = sim.exit(1, 0);
    assert!(has(
        &out,
        |e| matches!(e, Event::Exit(i) if i.after_disconnect && i.reason == Some(ExitReason::KillTimeout))
    ));
}

// ----- stopping -----

#[test]
fn a_graceful_stop_serves_the_master_s_last_connections_before_closing_workers() {
    let mut sim = Sim::started(cfg(2));
    sim.world.master_draining = true;
    let out = sim.cmd(Command::Stop(StopKind::Graceful));
    assert!(out.iter().any(|a| matches!(a, Action::StopListening { drain: true })));
    assert!(closes(&out).is_empty(), "the master still hands out its last connections");
    sim.world.master_draining = false;
    sim.world.backlog = 2;
    assert!(closes(&sim.advance(FAST_TICK, &[])).is_empty(), "connections wait in the master");
    sim.world.backlog = 0;
    let out = sim.advance(FAST_TICK, &[]);
    assert_eq!((closes(&out), disconnects(&out)), (vec![1, 2], vec![1, 2]));
    assert_eq!(exit_code(&out), None, "not while its workers finish");
    assert_eq!(exit_code(&sim.exit(1, 0)), None, "not while one finishes");
    assert_eq!(exit_code(&sim.exit(2, 0)), Some(0));
}

fn delayed(workers: usize) -> Config {
    Config { stop_delay: Some(Duration::from_secs(1)), ..cfg(workers) }
}

fn stops_listening(actions: &[Action]) -> bool {
    actions.iter().any(|a| matches!(a, Action::StopListening { .. }))
}

#[test]
fn a_stop_delay_serves_on_not_ready_then_drains() {
    let mut sim = Sim::started(delayed(2));
    let out = sim.cmd(Command::Stop(StopKind::Graceful));
    assert!(has(&out, |e| matches!(e, Event::Stopping { delay } if *delay == Duration::from_secs(1))));
    assert!(!stops_listening(&out) && closes(&out).is_empty(), "still accepting and serving: {out:?}");
    assert!(sim.core.stopping(), "not ready from the first instant");
    assert_eq!(sim.core.stop_delay_left(sim.now), Some(Duration::from_secs(1)));
    assert!(sim.core.next_wake(sim.now) <= sim.now + Duration::from_secs(1));
    let out = sim.advance(999 * MS, &[]);
    assert!(!stops_listening(&out) && closes(&out).is_empty() && disconnects(&out).is_empty(), "{out:?}");
    let mut out = sim.advance(MS, &[]);
    assert!(out.iter().any(|a| matches!(a, Action::StopListening { drain: true })), "{out:?}");
    assert_eq!(sim.core.stop_delay_left(sim.now), None);
    out.extend(sim.advance(FAST_TICK, &[]));
    assert_eq!(disconnects(&out), vec![1, 2]);
    sim.exit(1, 0);
    assert_eq!(exit_code(&sim.exit(2, 0)), Some(0));
}

#[test]
fn a_second_stop_or_a_stop_without_delay_ends_the_delay_at_once() {
    for second in [StopKind::Graceful, StopKind::Now] {
        let mut sim = Sim::started(delayed(1));
        sim.cmd(Command::Stop(StopKind::Graceful));
        sim.advance(100 * MS, &[]);
        let out = sim.cmd(Command::Stop(second));
        assert!(out.iter().any(|a| matches!(a, Action::StopListening { drain: true })), "{second:?}: {out:?}");
        assert_eq!(sim.core.stop_delay_left(sim.now), None);
    }
    // SIGINT's kind never waits; a fast stop kills at once, during the delay too.
    let mut sim = Sim::started(delayed(1));
    assert!(stops_listening(&sim.cmd(Command::Stop(StopKind::Now))));
    let mut sim = Sim::started(delayed(1));
    sim.cmd(Command::Stop(StopKind::Graceful));
    let out = sim.cmd(Command::Stop(StopKind::Fast));
    assert!(out.iter().any(|a| matches!(a, Action::StopListening { drain: false })) && kills(&out) == vec![1]);
    assert_eq!(exit_code(&sim.exit(1, 137)), Some(0));
    // An abort during the delay ends it too: nothing waits for a drain that never comes.
    let mut sim = Sim::started(delayed(1));
    sim.cmd(Command::Stop(StopKind::Graceful));
    assert_eq!(kills(&sim.cmd(Command::Stop(StopKind::Abort))), vec![1]);
    assert!(sim.core.draining() && sim.core.stop_delay_left(sim.now).is_none());
}

#[test]
fn during_the_stop_delay_commands_wait_for_nothing_and_a_crash_is_still_replaced() {
    let mut sim = Sim::started(delayed(2));
    sim.cmd(Command::Stop(StopKind::Graceful));
    assert!(spawns(&sim.cmd(Command::Reload)).is_empty(), "no reload");
    assert!(spawns(&sim.cmd(Command::SetWorkers(4))).is_empty(), "no scaling");
    assert_eq!(sim.core.target(), 2, "not later either");
    assert!(spawns(&sim.cmd(Command::Restart(1))).is_empty(), "no restart");
    assert!(sim.core.can_restart(1).is_err());
    // Its clients are still sent to it: a worker that dies now is replaced.
    sim.advance(Duration::from_millis(500), &[]);
    sim.exit(1, 1);
    let out = sim.advance(Duration::from_millis(200), &[]);
    assert_eq!(spawns(&out).len(), 1, "{out:?}");
    // Once it drains, nothing starts.
    sim.advance(Duration::from_millis(400), &[]);
    assert!(sim.core.draining());
    let serials: Vec<Serial> = sim.core.procs.keys().copied().collect();
    for serial in serials {
        assert!(spawns(&sim.exit(serial, 0)).is_empty());
    }
    assert!(sim.core.procs.is_empty());
}

#[test]
fn the_stop_delay_defaults_to_one_second_with_an_admin_endpoint_and_none_without() {
    let plain = cfg(1);
    assert_eq!(plain.stop_delay(), Duration::ZERO);
    let admin = Config { admin_addr: Some("127.0.0.1:9100".parse().unwrap()), ..cfg(1) };
    assert_eq!(admin.stop_delay(), Duration::from_secs(1));
    let set = Config { stop_delay: Some(Duration::ZERO), ..admin };
    assert_eq!(set.stop_delay(), Duration::ZERO);
    // No delay: a graceful stop drains at once, as before.
    let mut sim = Sim::started(cfg(1));
    assert!(stops_listening(&sim.cmd(Command::Stop(StopKind::Graceful))));
}

#[test]
fn a_stop_during_a_reload_cancels_it_and_starts_nothing() {
    let mut sim = Sim::started(cfg(2));
    sim.cmd(Command::Reload);
    let out = sim.cmd(Command::Stop(StopKind::Graceful));
    assert!(sim.core.reload.is_none());
    assert!(spawns(&out).is_empty());
    let out = sim.ready(3);
    assert!(closes(&out).is_empty() || !has(&out, |e| matches!(e, Event::ReloadDone { .. })));
    assert!(spawns(&sim.advance(Duration::from_secs(1), &[])).is_empty());
    for serial in [1, 2, 3] {
        sim.exit(serial, 0);
    }
    assert_eq!(sim.core.procs.len(), 0);
}

#[test]
fn a_stop_while_a_worker_is_in_backoff_does_not_restart_it() {
    let mut sim = Sim::started(cfg(2));
    sim.exit(2, 3);
    sim.cmd(Command::Stop(StopKind::Graceful));
    assert!(spawns(&sim.advance(Duration::from_secs(1), &[])).is_empty());
    assert_eq!(exit_code(&sim.exit(1, 0)), Some(0));
}

#[test]
fn a_worker_exit_that_arrives_with_the_stop_starts_no_replacement() {
    // Every process of the group got SIGTERM at once: the worker's exit and the stop are
    // recorded before the next step.
    let mut sim = Sim::started(cfg(2));
    sim.core.command(Command::Stop(StopKind::Graceful));
    let out = sim.exit(1, 0);
    assert!(spawns(&out).is_empty(), "{out:?}");
}

#[test]
fn a_fast_stop_kills_everything_and_exits_zero_once_they_are_gone() {
    let mut sim = Sim::started(cfg(2));
    let out = sim.cmd(Command::Stop(StopKind::Fast));
    assert_eq!(kills(&out), [1, 2]);
    assert!(out.iter().any(|a| matches!(a, Action::StopListening { drain: false })));
    assert_eq!(exit_code(&out), None, "not while its workers run");
    assert_eq!(exit_code(&sim.exit(1, 0)), None, "not while one runs");
    assert_eq!(exit_code(&sim.exit(2, 0)), Some(0));
}

#[test]
fn a_second_sigint_aborts_with_130() {
    let mut sim = Sim::started(cfg(1));
    sim.cmd(Command::Stop(StopKind::Graceful));
    let out = sim.cmd(Command::Stop(StopKind::Abort));
    assert_eq!((kills(&out), exit_code(&out)), (vec![1], Some(130)));
}

#[test]
fn status_shows_backoff_and_states() {
    let mut sim = Sim::started(cfg(2));
    sim.exit(2, 3);
    let status = sim.core.status(sim.now, &sim.world);
    let states: Vec<_> = status.iter().map(|s| (s.id, s.state, s.restart_in)).collect();
    assert_eq!(states, [(1, WorkerState::Ready, None), (2, WorkerState::Backoff, Some(100 * MS))]);
}

#[test]
fn status_shows_when_a_retiring_worker_will_be_killed() {
    let mut sim = Sim::started(cfg(1));
    assert_eq!(sim.core.status(sim.now, &sim.world)[0].kill_in, None, "not retiring");
    sim.cmd(Command::Stop(StopKind::Graceful));
    sim.advance(2 * TICK, &[]);
    let status = sim.core.status(sim.now, &sim.world);
    assert_eq!((status[0].state, status[0].kill_in), (WorkerState::Stopping, Some(Duration::from_secs(5) - 2 * TICK)));
}

// ----- the first start -----

#[test]
fn a_first_start_where_every_worker_dies_before_ready_stops_the_master_with_1() {
    let mut sim = Sim::new(Config { fail_fast: true, ..cfg(2) });
    let mut serials: Vec<Serial> = spawns(&sim.step()).into_iter().map(|(s, _)| s).collect();
    let mut last = Vec::new();
    for _ in 0..FIRST_START_TRIES {
        for serial in std::mem::take(&mut serials) {
            last = sim.exit(serial, 3);
        }
        serials = spawns(&sim.advance(Duration::from_millis(400), &[])).into_iter().map(|(s, _)| s).collect();
    }
    assert!(serials.is_empty(), "no more starts: {serials:?}");
    assert!(last.iter().any(|a| matches!(a, Action::StopListening { drain: false })), "{last:?}");
    assert_eq!(exit_code(&last), Some(1));
    assert_eq!(sim.core.start_failure.as_deref(), Some("worker 1 exited with code 3 before it was ready"));
}

#[test]
fn a_bind_error_at_the_first_start_is_the_reason_given() {
    let mut sim = Sim::new(Config { fail_fast: true, ..cfg(1) });
    sim.step();
    let mut serial = 1;
    for _ in 0..FIRST_START_TRIES {
        sim.fact(serial, Fact::Hello);
        sim.fact(serial, Fact::ListenFailed("tcp 127.0.0.1:80: Address already in use".into()));
        let out = [sim.exit(serial, 1), sim.advance(Duration::from_millis(400), &[])].concat();
        serial = spawns(&out).first().map_or(0, |s| s.0);
    }
    assert_eq!(serial, 0, "stopped");
    assert_eq!(
        sim.core.start_failure.as_deref(),
        Some("worker 1 cannot listen: tcp 127.0.0.1:80: Address already in use")
    );
}

#[test]
fn a_first_start_with_no_worker_ready_in_time_stops_the_master() {
    let mut sim = Sim::new(Config { fail_fast: true, ..cfg(2) });
    sim.step();
    sim.fact(1, Fact::Hello);
    let out = sim.advance(Duration::from_secs(2), &[]);
    assert_eq!(kills(&out), [1, 2]);
    assert_eq!(exit_code(&out), None, "not while its workers run");
    assert_eq!(exit_code(&sim.exit(1, 0)), None, "not while one runs");
    assert_eq!(exit_code(&sim.exit(2, 0)), Some(1));
}

#[test]
fn once_a_worker_was_ready_crash_loops_never_stop_the_master() {
    let mut sim = Sim::new(Config { fail_fast: true, ..cfg(2) });
    sim.step();
    sim.ready(1);
    let mut serial = 2;
    for _ in 0..6 {
        let out = [sim.exit(serial, 3), sim.advance(Duration::from_secs(4), &[])].concat();
        assert!(exit_code(&out).is_none());
        serial = spawns(&out)[0].0;
    }
}

#[test]
fn without_fail_fast_a_failing_first_start_keeps_trying() {
    let mut sim = Sim::new(cfg(1));
    sim.step();
    let mut serial = 1;
    for _ in 0..6 {
        let out = [sim.exit(serial, 3), sim.advance(Duration::from_secs(4), &[])].concat();
        assert!(exit_code(&out).is_none());
        serial = spawns(&out)[0].0;
    }
}

fn answers(actions: &[Action]) -> Vec<&Answer> {
    actions.iter().filter_map(|a| if let Action::Answer(answer) = a { Some(answer) } else { None }).collect()
}

#[test]
fn a_reload_waiter_is_answered_by_the_reload_that_covers_its_request() {
    let mut sim = Sim::started(cfg(1));
    assert_eq!(sim.core.reload_ticket(), Some(1));
    sim.cmd(Command::Reload);
    // Asked during reload 1: answered by reload 2, which starts after it.
    assert_eq!(sim.core.reload_ticket(), Some(2));
    sim.cmd(Command::Reload);
    let out = sim.ready(2);
    assert_eq!(answers(&out), [&Answer::Reload { upto: 1, result: Ok((1, 0)) }]);
    let out = sim.ready(3);
    assert_eq!(answers(&out), [&Answer::Reload { upto: 2, result: Ok((1, 0)) }]);
}

#[test]
fn an_abandoned_reload_answers_the_one_queued_behind_it_too() {
    let mut sim = Sim::started(cfg(2));
    sim.cmd(Command::Reload);
    sim.cmd(Command::Reload);
    let out = sim.exit(3, 3);
    let why = "its new process exited with code 3 before it was ready".to_string();
    assert!(matches!(answers(&out)[..], [Answer::Reload { upto: 2, result: Err((1, w)) }] if *w == why), "{out:?}");
    // Stopping: no reload will run.
    sim.core.command(Command::Stop(StopKind::Graceful));
    assert_eq!(sim.core.reload_ticket(), None);
}

#[test]
fn a_restart_replaces_one_worker_new_one_first_and_answers_with_both_pids() {
    let mut sim = Sim::started(cfg(2));
    assert!(sim.core.can_restart(3).is_err() && sim.core.can_restart(AGENT_ID).is_err());
    let out = sim.cmd(Command::Restart(2));
    assert_eq!(spawns(&out), [(3, 2)]);
    assert!(closes(&out).is_empty(), "the old one serves until the new one is ready");
    let out = sim.ready(3);
    assert_eq!(answers(&out), [&Answer::Restart { id: 2, result: Ok((1002, 1003)) }]);
    assert_eq!(closes(&out), [2]);
    // A restart whose new process dies is answered with why; the old one keeps serving.
    sim.cmd(Command::Restart(1));
    let out = sim.exit(4, 3);
    assert!(matches!(answers(&out)[..], [Answer::Restart { id: 1, result: Err(_) }]), "{out:?}");
    assert_eq!(sim.current(1), 1);
}

/// Found by the simulation (seed 641 before the fix): a reload took over a restart's new
/// process, was abandoned, and killed that process without telling the restart's waiter.
#[test]
fn a_restart_taken_over_by_a_reload_that_is_abandoned_is_answered() {
    let mut sim = Sim::started(Config { reload_concurrency: 2, ..cfg(2) });
    assert_eq!(spawns(&sim.cmd(Command::Restart(1))), [(3, 1)]);
    let out = sim.cmd(Command::Reload);
    assert_eq!(spawns(&out), [(4, 2)], "the reload takes over worker 1's replacement");
    let out = sim.exit(4, 3);
    assert_eq!(kills(&out), [3]);
    assert!(
        answers(&out).iter().any(|a| matches!(a, Answer::Restart { id: 1, result: Err(_) })),
        "the restart's waiter hears: {out:?}"
    );
}

#[test]
fn a_worker_signalled_alone_is_replaced_new_one_first_after_a_wait() {
    let mut sim = Sim::started(cfg(2));
    let out = sim.fact(1, Fact::StopAsked);
    assert!(spawns(&out).is_empty(), "the master's own stop may be on its way: {out:?}");
    let out = sim.advance(STOP_ASK_WAIT, &[]);
    assert_eq!(spawns(&out), [(3, 1)]);
    assert!(closes(&out).is_empty(), "it serves until its replacement is ready");
    let out = sim.ready(3);
    assert_eq!(closes(&out), [1]);
}

#[test]
fn workers_signalled_with_the_master_are_retired_by_its_stop_and_nothing_starts() {
    // systemd's KillMode=control-group: SIGTERM to every process at once.
    let mut sim = Sim::started(cfg(2));
    sim.fact(1, Fact::StopAsked);
    sim.fact(2, Fact::StopAsked);
    let mut out = sim.cmd(Command::Stop(StopKind::Graceful));
    out.extend(sim.advance(Duration::from_secs(1), &[]));
    assert!(spawns(&out).is_empty(), "{out:?}");
    assert_eq!(sorted(disconnects(&out)), [1, 2]);
}

fn sorted(mut v: Vec<Serial>) -> Vec<Serial> {
    v.sort_unstable();
    v
}

/// Found by the simulation (seed 27): a signalled agent was "replaced new one first", which
/// ran two agents at once.
#[test]
fn a_signalled_agent_is_restarted_never_doubled() {
    let mut sim = Sim::started(Config { agent: true, ..cfg(1) });
    let agent = sim.current(AGENT_ID);
    sim.fact(agent, Fact::StopAsked);
    let out = sim.advance(STOP_ASK_WAIT, &[]);
    assert_eq!(closes(&out), [agent]);
    assert!(!spawns(&out).iter().any(|(_, id)| *id == AGENT_ID), "not while the old one runs");
    let out = sim.exit(agent, 0);
    assert_eq!(spawns(&out).iter().filter(|(_, id)| *id == AGENT_ID).count(), 1);
}

// ----- the sockets a process accepts on, status, wakes -----

#[test]
fn a_worker_s_sockets_are_a_set_and_each_report_changes_only_its_own() {
    let mut sim = Sim::started(cfg(1));
    for _ in 0..3 {
        sim.fact(1, Fact::Listening(1));
    }
    sim.fact(1, Fact::Listening(2));
    assert_eq!(sim.core.procs[&1].keys, [1, 2], "a report repeated by a worker grows nothing in the master");
    sim.fact(1, Fact::Unlisten(2));
    assert!(sim.core.accepted_on(1) && !sim.core.accepted_on(2));
}

#[test]
fn a_socket_a_ready_worker_adds_is_one_its_restarted_process_must_listen_on() {
    let mut sim = Sim::started(cfg(1));
    sim.fact(1, Fact::Listening(2));
    sim.advance(Duration::from_secs(2), &[]);
    let out = sim.exit(1, 1);
    assert_eq!(spawns(&out), [(2, 1)]);
    sim.fact(2, Fact::Hello);
    let out = sim.fact(2, Fact::Listening(1));
    assert!(!has(&out, |e| matches!(e, Event::Ready { .. })), "ready on one of its two sockets: {out:?}");
    let out = sim.fact(2, Fact::Listening(2));
    assert!(has(&out, |e| matches!(e, Event::Ready { id: 1, pid: 1002 })), "{out:?}");
}

#[test]
fn a_killed_worker_waiting_for_its_exit_cannot_be_restarted() {
    let mut sim = Sim::started(cfg(2));
    assert_eq!(kills(&sim.advance(Duration::from_millis(1200), &[1])), [1]);
    let refused = sim.core.can_restart(1).expect_err("its process is killed");
    assert!(refused.contains("no process"), "{refused}");
    assert_eq!(sim.core.can_restart(2), Ok(()));
}

#[test]
fn status_lists_only_processes_that_run_each_in_its_state() {
    let mut sim = Sim::new(Config { wait_ready: true, ..cfg(2) });
    let out = sim.core.reconcile(sim.now, &sim.world);
    assert_eq!(spawns(&out), [(1, 1), (2, 2)]);
    assert!(sim.core.status(sim.now, &sim.world).is_empty(), "no pid yet");
    for serial in [1, 2] {
        sim.core.record(serial, Fact::Spawned(1000 + serial as u32), sim.now);
    }
    sim.core.record(1, Fact::Hello, sim.now);
    let states =
        |sim: &Sim| -> Vec<_> { sim.core.status(sim.now, &sim.world).iter().map(|s| (s.id, s.pid, s.state)).collect() };
    assert_eq!(states(&sim), [(1, Some(1001), WorkerState::Online), (2, Some(1002), WorkerState::Starting)]);
    sim.core.record(2, Fact::Exited(Ok(Status { code: Some(1), signal: None })), sim.now);
    assert_eq!(states(&sim), [(1, Some(1001), WorkerState::Online)], "gone, before it is reaped");
}

#[test]
fn the_next_wake_is_a_tick_away_or_a_fast_tick_while_a_worker_retires() {
    let mut sim = Sim::started(cfg(1));
    assert_eq!(sim.core.next_wake(sim.now), sim.now + TICK);
    sim.world.backlog = 1;
    sim.cmd(Command::Stop(StopKind::Now));
    assert!(matches!(sim.life(1), Some(Life::Retiring { step: Step::Open, .. })), "{:?}", sim.life(1));
    assert_eq!(sim.core.next_wake(sim.now), sim.now + FAST_TICK);
}

#[test]
fn the_queries_of_the_supervisor_follow_the_cluster() {
    let mut sim = Sim::started(cfg(3));
    assert_eq!((sim.core.ready_count(), sim.core.target(), sim.core.worker_count()), (3, 3, 3));
    assert!(!sim.core.reloading());
    sim.exit(2, 1);
    assert_eq!(sim.core.ready_count(), 2, "worker 2 waits to restart");
    sim.cmd(Command::SetWorkers(5));
    assert_eq!((sim.core.target(), sim.core.worker_count()), (5, 5));
    sim.cmd(Command::Reload);
    assert!(sim.core.reloading());
}

#[test]
fn a_step_exactly_the_suspension_threshold_after_the_last_is_no_suspension() {
    let mut sim = Sim::started(cfg(1));
    sim.now += 500 * MS;
    sim.step();
    sim.now += SUSPENDED;
    let out = sim.step();
    assert_eq!(kills(&out), [1], "silent for 1.5 s: its heartbeat clock was not restarted");
}

#[test]
fn heartbeats_are_missed_only_past_the_timeout() {
    let mut sim = Sim::started(cfg(1));
    assert!(kills(&sim.advance(Duration::from_secs(1), &[1])).is_empty(), "silent for exactly the timeout");
    assert_eq!(kills(&sim.advance(MS, &[1])), [1]);
}

#[test]
fn a_process_whose_start_is_not_reported_yet_is_never_killed() {
    let mut sim = Sim::new(cfg(1));
    assert_eq!(spawns(&sim.core.reconcile(sim.now, &sim.world)), [(1, 1)]);
    for _ in 0..30 {
        sim.now += TICK;
        let out = sim.core.reconcile(sim.now, &sim.world);
        assert!(kills(&out).is_empty(), "silent, but pid 0 is nobody's: {out:?}");
    }
}

#[test]
fn a_worker_dying_at_exactly_its_minimum_uptime_was_stable() {
    let mut sim = Sim::started(cfg(2));
    sim.now += Duration::from_secs(1);
    sim.core.record(1, Fact::Heard, sim.now);
    sim.core.record(2, Fact::Heard, sim.now);
    let out = sim.exit(1, 1);
    assert_eq!((spawns(&out), crash_delays(&out)), (vec![(3, 1)], vec![]));
}

#[test]
fn a_worker_dying_while_its_replacement_starts_counts_as_a_restart() {
    let mut sim = Sim::started(cfg(1));
    sim.cmd(Command::Reload);
    let out = sim.exit(1, 1);
    assert!(spawns(&out).is_empty(), "its replacement is on the way: {out:?}");
    assert_eq!(sim.core.slots[&1].restarts, 1);
    sim.ready(2);
    assert_eq!(sim.core.status(sim.now, &sim.world)[0].restarts, 1);
}

#[test]
fn a_retiring_worker_signalled_to_stop_is_not_replaced_again() {
    let mut sim = Sim::started(cfg(1));
    sim.cmd(Command::Reload);
    sim.ready(2);
    assert!(matches!(sim.life(1), Some(Life::Retiring { .. })), "{:?}", sim.life(1));
    sim.fact(1, Fact::StopAsked);
    let out = sim.advance(STOP_ASK_WAIT + TICK, &[]);
    assert!(spawns(&out).is_empty(), "{out:?}");
    assert_eq!(sim.current(1), 2);
}

#[test]
fn a_restarted_worker_must_listen_on_what_its_predecessor_was_ready_on() {
    let mut sim = Sim::started(cfg(1));
    sim.advance(Duration::from_secs(2), &[]);
    assert_eq!(spawns(&sim.exit(1, 1)), [(2, 1)]);
    sim.fact(2, Fact::Hello);
    let out = sim.fact(2, Fact::Listening(2));
    assert!(!has(&out, |e| matches!(e, Event::Ready { .. })), "socket 1 was its predecessor's: {out:?}");
    let out = sim.fact(2, Fact::Listening(1));
    assert!(has(&out, |e| matches!(e, Event::Ready { id: 1, pid: 1002 })), "{out:?}");
}

#[test]
fn connection_limits_are_spread_over_the_jitter_and_no_further() {
    let limits = |jitter: u64| -> Vec<u64> {
        let cfg = Config { max_connections: Some(100), max_connections_jitter: jitter, ..cfg(1) };
        let mut core = Core::new(Arc::new(cfg), 7);
        let now = Instant::now();
        (0..200)
            .map(|_| {
                let serial = core.spawn(1, Vec::new(), now, &mut Vec::new());
                core.procs[&serial].max_connections.expect("a limit")
            })
            .collect()
    };
    assert!(limits(0).iter().all(|l| *l == 100));
    let spread = limits(20);
    let (min, max) = (spread.iter().min().copied(), spread.iter().max().copied());
    assert_eq!((min, max), (Some(100), Some(120)), "from the limit to the limit plus the jitter");
    let distinct: std::collections::BTreeSet<_> = spread.iter().collect();
    assert!(distinct.len() > 15, "spread, not one value: {distinct:?}");
}

#[test]
fn a_restart_asked_in_the_step_of_a_stop_is_answered() {
    for stop in [StopKind::Graceful, StopKind::Now] {
        let mut sim = Sim::started(delayed(2));
        sim.core.command(Command::Stop(stop));
        sim.core.command(Command::Restart(1));
        let out = sim.step();
        let refused = answers(&out)
            .into_iter()
            .any(|a| matches!(a, Answer::Restart { id: 1, result: Err(why) } if why.contains("stopping")));
        assert!(refused && spawns(&out).is_empty(), "{stop:?}: {out:?}");
    }
}

#[test]
fn scaling_down_during_a_reload_still_replaces_the_workers_that_stay() {
    let mut sim = Sim::started(cfg(3));
    assert_eq!(spawns(&sim.cmd(Command::Reload)), [(4, 1)]);
    sim.cmd(Command::SetWorkers(2));
    assert_eq!(spawns(&sim.ready(4)), [(5, 2)], "worker 2 is still to be replaced");
    assert!(has(&sim.ready(5), |e| matches!(e, Event::ReloadDone { replaced: 2, .. })));
}

#[test]
fn a_slot_whose_process_and_replacement_both_die_starts_again() {
    let mut sim = Sim::started(cfg(1));
    sim.cmd(Command::Reload);
    sim.exit(1, 1);
    let out = sim.fact(2, Fact::Exited(Ok(Status { code: None, signal: Some(9) })));
    let reason = events(&out).into_iter().find_map(|e| match e {
        Event::ReloadAbandoned { id: 1, reason } => Some(reason.clone()),
        _ => None,
    });
    assert!(reason.as_deref().is_some_and(|r| r.contains("killed by signal 9")), "{out:?}");
    let out = sim.advance(Duration::from_secs(1), &[]);
    assert_eq!(spawns(&out), [(3, 1)], "worker 1 has no process: it is restarted");
}
