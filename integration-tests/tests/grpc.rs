//! The tonic recipe: a gRPC client on one channel, calling without pause through 5 rolling
//! reloads and a stop of `tonic-hello`: every call made before the stop is answered.
//!
//! One allowance, on the client side: when a connection receives the server's GOAWAY, tonic's
//! client cancels a call it had queued on it but not yet sent (`hyper::Error::is_canceled`).
//! Such a call never reached a server, so it is safe to send again, and gRPC clients of other
//! languages do so without being asked ("transparent retry"); tonic does not, so this client
//! does, and counts it. Any other error fails the test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use integration_tests::Server;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[test]
fn a_grpc_channel_sees_no_failed_call_across_reloads_and_stop() {
    let mut server = Server::start("tonic-hello", &[("CLUSTER_WORKERS", "2")], 2);
    let addr = server.addr;
    let stopping = Arc::new(AtomicBool::new(false));
    let stop = stopping.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let client = runtime.spawn(async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await;
        let mut health = HealthClient::new(channel.expect("connect"));
        let (mut ok, mut retried, mut failed) = (0u64, 0u64, Vec::new());
        // Calls started before the SIGTERM must all be answered, those in flight at the stop
        // included; after it, the cluster refuses new connections.
        while !stop.load(Ordering::SeqCst) {
            match health.check(HealthCheckRequest { service: String::new() }).await {
                Ok(_) => ok += 1,
                Err(status) if never_sent(&status) => retried += 1,
                Err(status) => failed.push(status.to_string()),
            }
        }
        (ok, retried, failed)
    });
    for round in 1..=5 {
        std::thread::sleep(Duration::from_millis(500)); // calls between reloads, not a wait
        server.signal(libc::SIGHUP);
        server.wait_events("reload_done", round, Duration::from_secs(10));
    }
    stopping.store(true, Ordering::SeqCst);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("master exits");
    assert_eq!(status.code(), Some(0), "{}", server.stderr());
    let (ok, retried, failed) = runtime.block_on(client).expect("client");
    eprintln!("{ok} calls answered, {retried} sent again (cancelled by the client before they were sent)");
    assert!(ok > 500, "the client ran: {ok}");
    assert!(failed.is_empty(), "{} failed calls: {:?}", failed.len(), &failed[..failed.len().min(5)]);
}

/// Whether the call failed because the client cancelled it before sending it (its connection
/// was going away).
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled) {
            return true;
        }
        source = e.source();
    }
    false
}
