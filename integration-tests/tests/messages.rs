//! User messages between master and workers.

use std::time::Duration;

use integration_tests::{Server, wait_for};

#[test]
fn messages_round_trip_between_master_and_workers() {
    let server = Server::spawn(env!("CARGO_BIN_EXE_messages").into(), &[]);
    wait_for(Duration::from_secs(20), "both workers to get both messages", || {
        let out = server.stdout();
        let ok = [1, 2].iter().all(|id| {
            out.contains(&format!("worker {id} got: welcome {id}"))
                && out.contains(&format!("worker {id} got: echo hello from {id}"))
                && out.contains(&format!("worker {id} oversized send refused"))
        });
        ok.then_some(())
    });
}

#[test]
fn master_code_scales_reloads_and_reads_status() {
    let mut server = Server::spawn(env!("CARGO_BIN_EXE_control").into(), &[]);
    wait_for(Duration::from_secs(20), "the control script to finish", || {
        server.stdout().contains("reloaded: 3 workers, all new: true").then_some(())
    });
    let out = server.stdout();
    assert!(out.contains("start: 2 workers, 2 ready"), "{out}");
    assert!(out.contains("grown: 3 workers, 3 ready"), "{out}");
    assert!(out.contains("reloaded: 3 workers, 3 ready"), "{out}");
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(5)).expect("exit").code(), Some(0));
}
