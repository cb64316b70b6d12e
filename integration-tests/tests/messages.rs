//! User messages between master and workers, and control from code in the master.

use std::time::Duration;

use integration_tests::{Server, wait_for};

#[test]
fn messages_round_trip_in_order_whole_and_unconfused() {
    let server = Server::spawn(env!("CARGO_BIN_EXE_messages").into(), &[]);
    let expected = [
        "worker 1 got from master: welcome 1",
        "worker 2 got from master: welcome 2",
        "worker 1 got from master: echo hello from 1",
        "worker 2 got from master: echo hello from 2",
        "worker 1 oversized send refused",
        "worker 2 oversized send refused",
        "broadcast reached 2",
        "worker 1 got from master: everyone is online",
        "worker 2 got from master: everyone is online",
        "master got 10000 messages in order",
        "master got 1048576 bytes intact: true",
        "worker 2 got 1048576 bytes from master intact: true",
        "worker 2 got from worker 1: hi from 1",
        "send to worker 99: error: no such peer: worker 99 is not running",
        "crafted payload from worker 1 delivered as a user message",
        "crafted payload from worker 2 delivered as a user message",
        "worker 1 got the crafted payload from master as a user message",
        "worker 2 got the crafted payload from master as a user message",
        "worker 1 send to worker 99: error: no such peer: worker 99 is not running",
        "worker 2 send to worker 99: error: no such peer: worker 99 is not running",
        "master asked worker 1, answer: 1",
        "worker 2 asked the master, answer: Ok(\"pong\")",
        "worker 1 asked worker 2, answer: Ok(\"42\")",
        "worker 2 unanswered request: no reply within 200ms",
        "master got a typed message from worker 1: Load { worker: 1, queue: [1, 2, 3], note: Some(\"ok\") }",
        "master got a typed message from worker 2: Load { worker: 2, queue: [1, 2, 3], note: Some(\"ok\") }",
    ];
    wait_for(Duration::from_secs(30), "every message", || {
        let out = server.stdout();
        expected.iter().all(|line| out.contains(line)).then_some(())
    });
    assert!(server.events("protocol_error").is_empty(), "{}", server.stderr());
    assert_eq!(server.workers().len(), 2, "nobody was killed or replaced:\n{}", server.stderr());
}

#[test]
fn master_code_scales_reloads_and_reads_status() {
    let mut server = Server::spawn(env!("CARGO_BIN_EXE_control").into(), &[]);
    // Its last line, printed after "reloaded: 3 workers, all new: …".
    wait_for(Duration::from_secs(20), "the control script to finish", || {
        server.stdout().contains("reloaded: 3 workers, 3 ready").then_some(())
    });
    let out = server.stdout();
    assert!(out.contains("start: 2 workers, 2 ready"), "{out}");
    assert!(out.contains("grown: 3 workers, 3 ready"), "{out}");
    assert!(out.contains("reloaded: 3 workers, all new: true"), "{out}");
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(5)).expect("exit").code(), Some(0));
}
