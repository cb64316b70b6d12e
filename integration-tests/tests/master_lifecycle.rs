//! The master's own life: graceful stop on SIGTERM, no orphans when it is killed.

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
fn workers_die_with_a_sigkilled_master() {
    let mut server = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
    let workers = server.workers();
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(5)).expect("master dead");
    wait_for(Duration::from_secs(2), "every worker to die with the master", || {
        workers.iter().all(|pid| !alive(*pid)).then_some(())
    });
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
