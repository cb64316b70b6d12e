//! The master↔worker IPC path alone, for the criterion micro-benchmark (`benches/ipc.rs`).
//! Not a public API: it exists so the benchmark drives the very code the cluster runs.

use std::io;
use std::os::fd::AsFd;

use bytes::BytesMut;

use super::encode;
use super::message::{self, ToMaster, ToWorker};
use super::{Channel, Receiver};

/// Both ends of one channel, with their receive buffers.
pub struct Pair {
    master: Channel,
    worker: Channel,
    master_rx: Receiver,
    worker_rx: Receiver,
    out: BytesMut,
    ack: BytesMut,
    next_id: u64,
}

impl Pair {
    /// A connected channel. Needs a tokio runtime.
    pub fn new() -> io::Result<Pair> {
        let (master, worker) = Channel::pair()?;
        Ok(Pair {
            master,
            worker: Channel::from_fd(worker)?,
            master_rx: Receiver::new(),
            worker_rx: Receiver::new(),
            out: BytesMut::new(),
            ack: BytesMut::new(),
            next_id: 1,
        })
    }

    /// Hands every fd in `conns` over the way the master does, `per_message` to a `newconn`
    /// (at most 64); the worker end receives and decodes each message (installing the fds) and
    /// acknowledges its connections, in one message per `newconn` with `batched_acks`, else
    /// one per connection; the master end reads the acknowledgements. Returns how many
    /// connections were acknowledged.
    pub async fn hand_over(&mut self, conns: &[impl AsFd], per_message: usize, batched_acks: bool) -> usize {
        let peer = Some("127.0.0.1:40000".parse().expect("address"));
        let mut acked = 0;
        for chunk in conns.chunks(per_message.clamp(1, message::MAX_FDS)) {
            self.out.clear();
            encode::newconn_header(&mut self.out, 1, chunk.len());
            for _ in chunk {
                encode::newconn_entry(&mut self.out, self.next_id, peer.as_ref());
                self.next_id += 1;
            }
            self.master.try_send_with_fds(&self.out, chunk).expect("send newconn");
            let datagram = self.worker_rx.recv(&self.worker).await.expect("recv").expect("open");
            let (data, fds) = datagram.whole().expect("whole");
            let Ok(ToWorker::NewConn { conns, .. }) = ToWorker::decode(data, fds) else { panic!("not a newconn") };
            let sends = if batched_acks {
                encode::accepted(&mut self.ack, 0, conns.iter().map(|c| c.id));
                self.worker.send(&self.ack).await.expect("send ack");
                1
            } else {
                for c in &conns {
                    encode::accepted(&mut self.ack, 0, std::iter::once(c.id));
                    self.worker.send(&self.ack).await.expect("send ack");
                }
                conns.len()
            };
            for _ in 0..sends {
                let datagram = self.master_rx.recv(&self.master).await.expect("recv").expect("open");
                let (data, fds) = datagram.whole().expect("whole");
                let Ok(ToMaster::Accepted { ids, .. }) = ToMaster::decode(data, fds) else { panic!("not an ack") };
                acked += ids.len();
            }
            // The worker's copies close here, as they would once served.
            drop(conns);
        }
        acked
    }
}

#[cfg(test)]
mod tests {
    /// The benchmark's figures mean something only if every connection was handed over and
    /// acknowledged, in batches or one by one.
    #[tokio::test]
    async fn hands_over_and_counts_every_connection() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let conns: Vec<_> = (0..100).map(|_| file.try_clone().unwrap()).collect();
        let mut pair = super::Pair::new().unwrap();
        assert_eq!(pair.hand_over(&conns, 16, true).await, 100);
        assert_eq!(pair.hand_over(&conns, 16, false).await, 100);
        assert_eq!(pair.hand_over(&conns[..1], 64, true).await, 1);
    }
}
