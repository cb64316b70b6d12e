//! The supervisor's part in an upgrade of the master: it asks `upgrade/decide.rs` and carries
//! out what concerns the rest of the master (spawning the new one with copies of the sockets,
//! handing over, taking over, stopping); `upgrade/` carries out the rest.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Instant;

use super::Supervisor;
use crate::log::warning;
use crate::master::decide::{Command, StopKind};
use crate::master::handle::Reply;
use crate::master::pid_file;
use crate::master::types::{Event, Upgraded};
use crate::master::upgrade::{self, Effect, Handover, Side};
use crate::messaging::Peer;
use crate::sys;

impl Supervisor {
    /// Starts an upgrade of the master (SIGUSR2, `clusterctl upgrade`), unless something is in
    /// the way (`upgrade/decide.rs` says what).
    pub(super) fn start_upgrade(&mut self, reply: Option<Reply<Upgraded>>) {
        let now = Instant::now();
        let effects = self.upgrade.start(now, self.upgrade_seen(), reply);
        self.carry_upgrade(effects, now);
    }

    /// What the upgrade needs to know of the rest of the master.
    pub(super) fn upgrade_seen(&self) -> upgrade::Seen {
        upgrade::Seen {
            stopping: self.core.stopping(),
            reloading: self.core.reloading(),
            all_ready: self.core.ready_count() >= self.core.target(),
        }
    }

    /// Carries out what the upgrade decided: the channels and the waiter in `upgrade/`, the
    /// rest here.
    pub(super) fn carry_upgrade(&mut self, effects: Vec<Effect>, now: Instant) {
        let mut effects = effects;
        while !effects.is_empty() {
            let mut next = Vec::new();
            for effect in self.upgrade.carry(effects) {
                match effect {
                    Effect::Spawn => {
                        let command = self.launcher.successor_command();
                        next.extend(self.upgrade.spawn(command, self.handover(), now));
                    }
                    Effect::HandOver(pid) => {
                        self.notifier.hand_over(pid);
                        if let Err(e) = sys::tell_init_successor(pid) {
                            warning!(event = "init_failed", error = %e, "cannot name the new master to the container's init: {e}");
                        }
                        self.listeners.handed_over();
                        self.serving.send_replace(false);
                    }
                    Effect::StopCluster => self.core.command(Command::Stop(StopKind::Now)),
                    Effect::TakeOver => {
                        self.listeners.take_over();
                        self.notifier.resume(now);
                        self.serving.send_replace(true);
                        if let Some(path) = &self.cfg.pid_file
                            && let Err(e) = pid_file::write(path)
                        {
                            warning!(event = "pid_file_failed", error = %e, "cannot write the pid file {}: {e}", path.display());
                        }
                    }
                    Effect::OwnHanded => {
                        self.listeners.own_handed();
                        self.links.app_metrics.lock().unwrap_or_else(|e| e.into_inner()).own_handed();
                    }
                    other => debug_assert!(false, "{other:?} is carried out in upgrade/"),
                }
            }
            effects = next;
        }
    }

    /// Copies of everything a successor gets.
    fn handover(&self) -> io::Result<Handover> {
        let control = match &self.info.control_fd {
            Some((path, fd)) => Some((path.clone(), fd.try_clone()?)),
            None => None,
        };
        Ok(Handover {
            listeners: self.listeners.hand_out()?,
            control,
            admin: self.info.admin_fd.as_ref().map(OwnedFd::try_clone).transpose()?,
            workers: self.core.target(),
        })
    }

    /// A successor whose worker dies before they are all ready gives up (`upgrade/decide.rs`):
    /// a crash loop would only end at the ready timeout.
    pub(super) fn worker_failed(&mut self, event: &Event, now: Instant) {
        let why = match event {
            Event::Exit(info) if !info.after_disconnect => {
                let how = match (info.code, info.signal, &info.reason) {
                    (_, _, Some(reason)) => reason.to_string(),
                    (Some(code), _, _) => format!("exit code {code}"),
                    (_, Some(signal), _) => format!("signal {signal}"),
                    _ => "unknown status".into(),
                };
                format!("{} (pid {}) exited before every worker was ready: {how}", Peer::from_wire(info.id), info.pid)
            }
            _ => return,
        };
        let effects = self.upgrade.record(Side::From, upgrade::Input::WorkerFailed(why), now);
        self.carry_upgrade(effects, now);
    }
}
