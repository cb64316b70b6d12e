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
