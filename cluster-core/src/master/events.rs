//! The queue of events for code running in the master.

use tokio::sync::mpsc;

use super::types::Event;
use crate::log::{log, warning};

/// Events queued for code in the master, at most (see [`Events`]).
pub(super) const EVENT_QUEUE: usize = 1024;

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
                    warning!(
                        event = "events_dropped",
                        "code in the master is not reading its events (Master::recv); dropping them until it does"
                    );
                }
                self.dropped += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_events_and_gives_messages_back() {
        let (mut events, rx) = Events::new(true);
        let rx = rx.expect("a receiver");
        for pid in 0..EVENT_QUEUE as u32 {
            assert!(matches!(events.offer(Event::Fork { id: 1, pid }), Ok(true)));
        }
        events.emit(Event::Fork { id: 1, pid: 0 });
        events.emit(Event::Fork { id: 1, pid: 0 });
        assert_eq!(events.dropped, 2);
        let message = Event::Message { id: 1, pid: 1, data: bytes::Bytes::from_static(b"x"), request: None };
        assert!(matches!(events.offer(message), Err(Event::Message { .. })), "a message comes back to wait");
        assert_eq!(rx.len(), EVENT_QUEUE);
        drop(rx);
        assert!(matches!(events.offer(Event::Fork { id: 1, pid: 0 }), Ok(false)), "nobody reads any more");
        assert!(matches!(Events::new(false).0.offer(Event::Fork { id: 1, pid: 0 }), Ok(false)));
    }
}
