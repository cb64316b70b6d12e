//! Micro-benchmark of the master→worker handoff alone: file descriptors per second through
//! one `SOCK_SEQPACKET` channel, one connection per `newconn` message versus batches, with
//! acknowledgements per connection or per message. Every iteration hands over 64 TCP
//! sockets; criterion's throughput is in connections (fds) per second.
//!
//! `cargo bench -p cluster-core --bench ipc`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use socket2::{Domain, Socket, Type};

use cluster::__private::ipc_bench::Pair;

fn handoff(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let conns: Vec<Socket> = (0..64).map(|_| Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket")).collect();
    let mut pair = rt.block_on(async { Pair::new() }).expect("channel");
    let mut group = c.benchmark_group("handoff");
    group.throughput(Throughput::Elements(conns.len() as u64));
    let cases = [
        (1, false, "1 per message, ack each"),
        (8, true, "8 per message, ack per message"),
        (64, false, "64 per message, ack each"),
        (64, true, "64 per message, ack per message"),
    ];
    for (per_message, batched_acks, name) in cases {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let acked = rt.block_on(pair.hand_over(&conns, per_message, batched_acks));
                assert_eq!(acked, conns.len());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, handoff);
criterion_main!(benches);
