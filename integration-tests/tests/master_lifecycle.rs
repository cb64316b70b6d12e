//! The master's own life: graceful stop on SIGTERM (a SIGKILLed master: `master_death.rs`).

use std::time::{Duration, Instant};

use integration_tests::{Server, alive, wait_for};

#[test]
fn sigterm_stops_everything_with_exit_code_zero() {
    let mut server = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
    let workers = server.workers();
    assert_eq!(workers.len(), 2);
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(5)).expect("master exits within 5 s");
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
    assert!(start.elapsed() < Duration::from_secs(5));
    for pid in workers {
        assert!(!alive(pid), "worker {pid} left behind");
    }
}

#[test]
fn request_in_flight_at_sigterm_completes() {
    let mut server = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
    let addr = server.addr;
    let slow =
        std::thread::spawn(move || integration_tests::get_timeout(addr, "/sleep?ms=1000", Duration::from_secs(10)));
    // Wait until a worker has the request (the master acknowledged handing it over).
    wait_for(Duration::from_secs(5), "the slow request to be accepted", || {
        std::fs::read_to_string(format!("/proc/{}/net/tcp", server.pid()))
            .ok()
            .filter(|t| t.lines().filter(|l| l.split_whitespace().nth(3) == Some("01")).count() >= 2)
    });
    server.signal(libc::SIGTERM);
    let res = slow.join().unwrap().expect("in-flight request answered");
    assert_eq!(res.status, 200);
    assert_eq!(server.wait_exit(Duration::from_secs(5)).and_then(|s| s.code()), Some(0));
}

/// SIGTERM to every process of the group at once: a worker may exit before the master has
/// handled its own SIGTERM; no replacement is started for it, and everything exits cleanly.
#[test]
fn sigterm_to_the_whole_process_group_starts_no_worker_and_exits_zero() {
    for round in 0..5 {
        let mut server = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
        server.signal_group(libc::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(5)).expect("master exits");
        assert_eq!(status.code(), Some(0), "round {round}:\n{}", server.stderr());
        assert_eq!(server.events("fork").len(), 2, "round {round}: a worker was started after the stop");
        let exits = server.events("exit");
        assert!(exits.iter().all(|(_, e)| e["code"] == 0), "round {round}: {exits:?}");
        assert!(!server.stderr().contains("Error:"), "round {round}: an error reached the user:\n{}", server.stderr());
    }
}
