//! A master crash loses only what the master held: its workers close their listeners at once,
//! answer the requests they already have, exit, and none outlives the kill timeout (a worker
//! whose runtime is stuck included). The old behaviour, workers SIGKILLed with the master,
//! answered 0 of 8 such requests.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::{Server, alive, get, get_timeout, wait_for, wait_until};

const T: Duration = Duration::from_secs(20);

/// Connections the workers acknowledged, summed (the admin endpoint's metrics).
fn acknowledged(admin: SocketAddr) -> f64 {
    let text = get(admin, "/metrics").map(|r| r.body).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cluster_connections_acknowledged_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn start(kill_timeout_ms: &str, debug: bool) -> (Server, SocketAddr) {
    let mut env = vec![("CLUSTER_WORKERS", "2"), ("CLUSTER_KILL_TIMEOUT_MS", kill_timeout_ms)];
    env.push(("CLUSTER_ADMIN_ADDR", "127.0.0.1:0"));
    if debug {
        env.push(("HELLO_DEBUG", "1"));
    }
    let server = Server::start("hello", &env, 2);
    let admin = server.wait_event("admin", T, |_| true)["addr"].as_str().unwrap().parse().unwrap();
    (server, admin)
}

#[test]
fn a_sigkilled_master_s_workers_answer_what_they_hold_then_exit() {
    let (mut server, admin) = start("6000", false);
    let workers = server.workers();
    let addr = server.addr;
    let slow: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || get_timeout(addr, "/sleep?ms=1500", Duration::from_secs(15))))
        .collect();
    wait_for(T, "the 8 slow requests to be in the workers' hands", || (acknowledged(admin) >= 8.0).then_some(()));
    let killed = Instant::now();
    server.signal(libc::SIGKILL);
    server.wait_exit(T).expect("the master is dead");
    // The listening socket was the master's: a new client is refused at once (it can retry
    // elsewhere), not left waiting in a backlog nobody serves.
    let refused = get_timeout(addr, "/", Duration::from_secs(2));
    assert!(refused.is_err(), "a new connection after the master's death: {refused:?}");
    let answers: Vec<_> = slow.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = answers.iter().filter(|r| r.as_ref().is_ok_and(|r| r.status == 200)).count();
    assert_eq!(ok, 8, "every request the workers held is answered: {answers:?}");
    // Done, they go: well before the kill timeout.
    wait_for(Duration::from_secs(3), "the workers to exit once their requests are answered", || {
        workers.iter().all(|pid| !alive(*pid)).then_some(())
    });
    assert!(killed.elapsed() < Duration::from_secs(5), "exited after {:?}", killed.elapsed());
}

#[test]
fn an_orphaned_worker_that_cannot_finish_is_gone_at_the_kill_timeout() {
    let (mut server, admin) = start("1500", true);
    let workers = server.workers();
    let addr = server.addr;
    // One request that would take a minute, and one that blocks its worker's runtime for good
    // (the graceful way out cannot run there: the kernel's alarm ends that one).
    let long = std::thread::spawn(move || get_timeout(addr, "/sleep?ms=60000", Duration::from_secs(30)));
    wait_for(T, "the long request to be taken", || (acknowledged(admin) >= 1.0).then_some(()));
    let stuck = std::thread::spawn(move || get_timeout(addr, "/hang", Duration::from_secs(30)));
    wait_until(T, "a worker to hang", || {
        if server.stderr().contains("hanging as asked") { Ok(()) } else { Err(server.stderr()) }
    });
    let killed = Instant::now();
    server.signal(libc::SIGKILL);
    server.wait_exit(T).expect("the master is dead");
    wait_for(Duration::from_secs(6), "every worker to be gone", || {
        workers.iter().all(|pid| !alive(*pid)).then_some(())
    });
    let took = killed.elapsed();
    // The kill timeout (1.5 s), and for the stuck one the alarm's whole seconds (it is armed
    // for the kill timeout and one second more, rounded up: 3 s): never later.
    assert!(took >= Duration::from_millis(1400), "a worker left before its kill timeout: {took:?}");
    assert!(took < Duration::from_millis(4500), "a worker outlived its deadline: {took:?}");
    assert!(long.join().unwrap().is_err(), "the minute-long request cannot be answered");
    assert!(stuck.join().unwrap().is_err());
}
