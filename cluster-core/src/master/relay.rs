//! Messages through the master: user messages from one process to another, and the events for
//! code running in the master.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};

use super::dispatch::Serial;
use super::process::{Links, Report};
use super::{Event, Registry};
use crate::ipc::Channel;
use crate::ipc::message::{AGENT, ALL_WORKERS, USER_TO_WORKER, Whole, encode};
use crate::log::log;
use crate::messaging::{self, Peer};

/// Events queued for code in the master, at most (see [`Events`]).
pub(super) const EVENT_QUEUE: usize = 1024;

/// Carries the user messages process `from` (`serial`) sends, in order, without holding up the
/// reading of its channel (acknowledgements): to other processes, to code in the master, or
/// as replies to the master's requests. After each one, tells the sender whether it was handed
/// over, which also paces a sender to the pace of its recipient.
pub(super) fn relay(from: u32, serial: Serial, sender: Arc<Channel>, links: &Links) -> mpsc::UnboundedSender<Whole> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Whole>();
    let (registry, reports, calls) = (links.registry.clone(), links.reports.clone(), links.calls.clone());
    let events = links.events.clone();
    tokio::spawn(async move {
        let mut receipt = BytesMut::new();
        while let Some((to, call, data)) = rx.recv().await {
            let delivered = match to {
                0 if messaging::is_reply(call) => calls.complete(call, data),
                0 => {
                    // Through the supervisor, so that events stay in order (a worker's `Online`
                    // before its first message); when the queue is full, the message comes
                    // back and this sender waits for room.
                    let (taken, verdict) = oneshot::channel();
                    let _ = reports.send(Report::User { serial, call, data, taken });
                    match (verdict.await, &events) {
                        (Ok(Ok(taken)), _) => taken,
                        (Ok(Err(event)), Some(events)) => events.send(event).await.is_ok(),
                        _ => false,
                    }
                }
                _ => deliver(from, to, call, &data, &registry).await,
            };
            receipt.clear();
            encode::relayed(&mut receipt, delivered);
            if sender.send(&receipt).await.is_err() {
                return;
            }
        }
    });
    tx
}

/// Hands a message to worker `to`, the agent, or every worker but the sender; true if any got it.
async fn deliver(from: u32, to: u32, call: u32, data: &[u8], registry: &Registry) -> bool {
    let targets: Vec<(u32, Arc<Channel>)> = {
        let registry = registry.lock().unwrap();
        if to == ALL_WORKERS {
            registry.iter().filter(|(id, _)| **id != AGENT && **id != from).map(|(id, c)| (*id, c.clone())).collect()
        } else {
            registry.get(&to).map(|c| (to, c.clone())).into_iter().collect()
        }
    };
    let mut delivered = false;
    for (id, channel) in targets {
        match channel.send_user(USER_TO_WORKER, from, call, data, || {}).await {
            Ok(()) => delivered = true,
            Err(e) => log!("message from {} to {} dropped: {e}", Peer::from_wire(from), Peer::from_wire(id)),
        }
    }
    delivered
}

/// The queue of events for code in the master, bounded ([`EVENT_QUEUE`]): the supervisor never
/// waits for user code. When it is full, a worker's message waits for room in its relay (the
/// sender waits for its receipt, so each sending task has at most one message waiting); any
/// other event is dropped, counted, and said so once per episode.
pub(super) struct Events {
    tx: Option<mpsc::Sender<Event>>,
    dropped: u64,
}

impl Events {
    /// A queue and its receiving end; `None`: no code in the master reads events.
    pub(super) fn new(hook: bool) -> (Events, Option<mpsc::Receiver<Event>>) {
        if !hook {
            return (Events { tx: None, dropped: 0 }, None);
        }
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        (Events { tx: Some(tx), dropped: 0 }, Some(rx))
    }

    /// The sending end, for relays that wait for room.
    pub(super) fn sender(&self) -> Option<mpsc::Sender<Event>> {
        self.tx.clone()
    }

    /// Queues a worker's message: `Ok(true)` queued, `Ok(false)` no code in the master reads
    /// events, `Err(event)`: the queue is full.
    pub(super) fn offer(&mut self, event: Event) -> Result<bool, Event> {
        let Some(tx) = &self.tx else { return Ok(false) };
        match tx.try_send(event) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.tx = None;
                Ok(false)
            }
            Err(mpsc::error::TrySendError::Full(event)) => Err(event),
        }
    }

    /// Queues `event` for code in the master, or drops it if the queue is full.
    pub(super) fn emit(&mut self, event: Event) {
        match self.offer(event) {
            Ok(_) if self.dropped > 0 => {
                log!("code in the master reads events again; {} were dropped", self.dropped);
                self.dropped = 0;
            }
            Ok(_) => {}
            Err(_) => {
                if self.dropped == 0 {
                    log!("code in the master is not reading its events (Master::recv); dropping them until it does");
                }
                self.dropped += 1;
            }
        }
    }
}
