//! One end of the upgrade channel to the other master, as tasks of the master's runtime: a
//! writer that sends in order, a reader that turns each datagram into an [`Input`] for the
//! supervisor, and, towards a successor this master started, the reaper of its process (which
//! alone signals it, so a signal never reaches a recycled pid).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::decide::{Input, Side};
use super::wire::{self, Handover, PER_DATAGRAM, Successor, UPGRADE_FD};
use crate::env::ENV_UPGRADE_FD;
use crate::ipc::{Channel, Receiver};
use crate::log::warning;
use crate::master::handle::AppMetrics;
use crate::sys;

/// What a link tells the supervisor: which link (its number), which side, what happened.
pub(in crate::master) type News = (u64, Side, Input);

/// A datagram to send, with the descriptors that go with it.
type Outgoing = (Vec<u8>, Vec<OwnedFd>);

/// The channel to the other master, open while this exists (dropping it closes this master's
/// end, which the other master hears).
pub(in crate::master) struct Link {
    /// Told apart from earlier links to the same side: news of a closed link is old news.
    pub(in crate::master) id: u64,
    out: mpsc::UnboundedSender<Outgoing>,
    /// Signals for the successor, through its reaper.
    signals: Option<mpsc::UnboundedSender<Signal>>,
    tasks: Vec<JoinHandle<()>>,
}

/// A signal to the successor.
#[derive(Debug, Clone, Copy)]
pub(in crate::master) enum Signal {
    Term,
    Kill,
}

/// The socket descriptions and descriptors for a successor, ready to send.
pub(in crate::master) struct Packed {
    items: Vec<serde_json::Value>,
    fds: Vec<OwnedFd>,
    workers: usize,
}

impl Packed {
    /// Describes what is handed over (fails for a Unix socket path that is not UTF-8).
    pub(in crate::master) fn new(handover: Handover) -> Result<Packed, String> {
        let workers = handover.workers;
        let (items, fds) = wire::encode(handover)?;
        Ok(Packed { items, fds, workers })
    }
}

impl Link {
    /// Starts a new master with `command` (the binary on disk, with this one's arguments and
    /// environment) and its end of a new channel at fd 3; returns the link and its pid.
    pub(in crate::master) fn successor(
        id: u64,
        mut command: tokio::process::Command,
        news: mpsc::UnboundedSender<News>,
    ) -> Result<(Link, u32), String> {
        let (channel, theirs) = Channel::pair().map_err(|e| format!("cannot create the upgrade channel: {e}"))?;
        command.env(ENV_UPGRADE_FD, UPGRADE_FD.to_string());
        // The service manager's sockets travel on the channel, and its watchdog variable names
        // this process.
        for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID"] {
            command.env_remove(var);
        }
        sys::prepare_successor_command(command.as_std_mut(), theirs.as_raw_fd(), UPGRADE_FD);
        let mut child = command.spawn().map_err(|e| format!("cannot start the new master: {e}"))?;
        drop(theirs);
        let pid = child.id().unwrap_or(0);
        let channel = Arc::new(channel);
        let (signals, mut signalled) = mpsc::unbounded_channel();
        let reports = news.clone();
        let reaper = tokio::spawn(async move {
            loop {
                tokio::select! {
                    status = child.wait() => {
                        let status = status.map_or_else(|e| format!("cannot wait for it: {e}"), |s| s.to_string());
                        let _ = reports.send((id, Side::To, Input::Exited(status)));
                        return;
                    }
                    Some(signal) = signalled.recv() => match signal {
                        // Not yet reaped (this task alone waits for it): the pid is still its.
                        Signal::Term => drop(child.id().map(|pid| sys::signal(pid, libc::SIGTERM))),
                        Signal::Kill => drop(child.start_kill()),
                    },
                }
            }
        });
        let mut link = Link::open(id, Side::To, channel, Receiver::new(), news, None);
        link.signals = Some(signals);
        link.tasks.push(reaper);
        Ok((link, pid))
    }

    /// The channel to the predecessor, once the handshake at boot is done; the metrics it hands
    /// over go to `app_metrics`.
    pub(in crate::master) fn predecessor(
        id: u64,
        successor: Successor,
        news: mpsc::UnboundedSender<News>,
        app_metrics: AppMetrics,
    ) -> Link {
        Link::open(id, Side::From, Arc::new(successor.channel), successor.rx, news, Some(app_metrics))
    }

    fn open(
        id: u64,
        side: Side,
        channel: Arc<Channel>,
        mut rx: Receiver,
        news: mpsc::UnboundedSender<News>,
        app_metrics: Option<AppMetrics>,
    ) -> Link {
        let (out, mut outgoing) = mpsc::unbounded_channel::<Outgoing>();
        let writing = channel.clone();
        let writer = tokio::spawn(async move {
            while let Some((data, fds)) = outgoing.recv().await {
                let fds: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
                if writing.send_with_fds(&data, &fds).await.is_err() {
                    // The reader hears the channel close.
                    return;
                }
            }
        });
        let reader = tokio::spawn(async move {
            loop {
                let input = match (rx.recv(&channel).await, side) {
                    // Metrics handed over are data, not a step of the upgrade.
                    (Ok(Some(datagram)), Side::From) if wire::is_metrics(&datagram.data) => {
                        if let Some(app_metrics) = &app_metrics {
                            wire::adopt_metrics(datagram, app_metrics);
                        }
                        continue;
                    }
                    (Ok(Some(datagram)), Side::To) => wire::from_successor(&datagram.data),
                    (Ok(Some(datagram)), Side::From) => wire::from_predecessor(&datagram.data),
                    (Err(e), Side::From) => Input::Off(format!("upgrade channel: {e}")),
                    (Ok(None), Side::From) => Input::PredecessorGone,
                    (Ok(None) | Err(_), Side::To) => Input::Closed,
                };
                let last = matches!(input, Input::Closed | Input::PredecessorGone | Input::Off(_));
                if news.send((id, side, input)).is_err() || last {
                    return;
                }
            }
        });
        Link { id, out, signals: None, tasks: vec![writer, reader] }
    }

    /// Sends a message (after those sent before it).
    pub(in crate::master) fn send(&self, data: Vec<u8>) {
        let _ = self.out.send((data, Vec::new()));
    }

    /// Sends the application's metrics totals and copies of its processes' segments
    /// (`metrics/totals.rs`), then `go`.
    pub(in crate::master) fn send_go(&self, app_metrics: &AppMetrics) {
        let exported = app_metrics.lock().unwrap_or_else(|e| e.into_inner()).export(wire::METRICS_PIECE);
        match exported {
            Ok((pieces, segments)) => {
                for piece in pieces {
                    self.send(wire::metrics(&piece, &[]));
                }
                let mut segments = segments.into_iter().peekable();
                while segments.peek().is_some() {
                    let (items, fds): (Vec<_>, Vec<_>) = segments.by_ref().take(PER_DATAGRAM).unzip();
                    let _ = self.out.send((wire::metrics(&serde_json::Value::Null, &items), fds));
                }
            }
            Err(e) => {
                warning!(event = "metrics_handover_failed", error = %e, "cannot hand the metrics' segments over: {e}")
            }
        }
        self.send(wire::go());
    }

    /// Sends every socket (one datagram per [`PER_DATAGRAM`] descriptors), then `start`.
    pub(in crate::master) fn send_sockets(&self, packed: Packed) {
        let Packed { items, mut fds, workers } = packed;
        for items in items.chunks(PER_DATAGRAM) {
            let rest = fds.split_off(items.len().min(fds.len()));
            let _ = self.out.send((wire::sockets(items), std::mem::replace(&mut fds, rest)));
        }
        self.send(wire::start(workers));
    }

    /// Signals the successor (nothing once it has been reaped).
    pub(in crate::master) fn signal(&self, signal: Signal) {
        if let Some(signals) = &self.signals {
            let _ = signals.send(signal);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // The tasks hold the channel: it closes once they are gone.
        for task in &self.tasks {
            task.abort();
        }
    }
}
