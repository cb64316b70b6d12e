//! Worker failures: killed, panicking, hung, speaking garbage. The master survives, replaces the
//! worker, and loses no connection it accepted.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use integration_tests::{Server, alive, get_timeout, kill, parse_worker, wait_for};

#[test]
fn sigkilled_worker_is_replaced_within_a_second() {
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
    let before = server.workers();
    let victim = before[0];
    let killed_at = Instant::now();
    kill(victim, libc::SIGKILL);
    let replacement = wait_for(Duration::from_secs(5), "a replacement to serve", || {
        let (_, pid) = server.which_worker();
        (!before.contains(&pid)).then_some(pid)
    });
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(1), "replacement {replacement} served after {took:?}");
    assert!(alive(server.pid()), "master survives");
    assert!(!alive(victim));
}

#[test]
fn panicking_worker_reports_its_reason_and_is_replaced() {
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2"), ("HELLO_DEBUG", "1")], 2);
    let before = server.workers();
    // The worker dies while handling this request: no response.
    assert!(get_timeout(server.addr, "/panic", Duration::from_secs(10)).is_err());
    server.wait_stderr("is exiting: panicked at", Duration::from_secs(5));
    server.wait_stderr("/panic requested", Duration::from_secs(5));
    server.wait_stderr("exited with code 101", Duration::from_secs(5));
    wait_for(Duration::from_secs(5), "a replacement worker", || {
        let now = server.workers();
        (now.len() == 2 && now != before).then_some(())
    });
    for _ in 0..10 {
        assert_eq!(server.get("/").status, 200);
    }
}

#[test]
fn connections_sent_to_a_hung_worker_go_to_another_when_it_is_killed() {
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2"), ("HELLO_DEBUG", "1")], 2);
    let addr = server.addr;
    std::thread::spawn(move || get_timeout(addr, "/hang", Duration::from_secs(30)));
    // The hung worker sleeps inside its handler, blocking its runtime.
    let hung = wait_for(Duration::from_secs(10), "a worker to hang", || {
        server
            .workers()
            .into_iter()
            .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("nanosleep")))
    });
    let healthy: HashSet<u32> = server.workers().into_iter().filter(|p| *p != hung).collect();
    // Round-robin sends about half of these to the hung worker, which never accepts them.
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                let res = get_timeout(addr, "/worker", Duration::from_secs(30));
                done.fetch_add(1, Ordering::SeqCst);
                res
            })
        })
        .collect();
    // The healthy worker answers its share; the rest wait in the hung worker's queue.
    wait_for(Duration::from_secs(10), "the healthy worker's share", || {
        (done.load(Ordering::SeqCst) >= 4).then_some(())
    });
    assert!(done.load(Ordering::SeqCst) < 10, "some connections must be stuck at the hung worker");
    kill(hung, libc::SIGKILL);
    for client in clients {
        let res = client.join().unwrap().expect("every client is answered");
        assert_eq!(res.status, 200);
        let (_, pid) = parse_worker(&res.body);
        assert_ne!(pid, hung, "the hung worker answered nothing");
        assert!(healthy.contains(&pid) || !server.workers().is_empty());
    }
    server.wait_stderr("re-dispatching", Duration::from_secs(5));
}

fn garbage(kind: &str) {
    let dir = std::env::temp_dir().join(format!("cluster-garbage-{}-{kind}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let marker = dir.to_str().unwrap().to_string();
    let path = env!("CARGO_BIN_EXE_garbage-worker").into();
    let server = Server::start_path(path, &[("GARBAGE_MARKER", &marker), ("GARBAGE_KIND", kind)], 1);
    server.wait_stderr("protocol error", Duration::from_secs(10));
    server.wait_stderr("killing it", Duration::from_secs(10));
    server.wait_stderr("worker 2 (pid", Duration::from_secs(10));
    // Worker 2 is replaced and, with the marker present, behaves: both workers serve.
    let ids = wait_for(Duration::from_secs(10), "both workers serving", || {
        let ids: HashSet<u32> = (0..10).map(|_| server.which_worker().0).collect();
        (ids.len() == 2).then_some(ids)
    });
    assert_eq!(ids, HashSet::from([1, 2]));
    assert!(alive(server.pid()));
    let _ = std::fs::remove_file(&dir);
}

#[test]
fn worker_sending_an_unknown_tag_is_killed_and_replaced() {
    garbage("tag");
}

#[test]
fn worker_passing_an_unexpected_fd_is_killed_and_replaced() {
    garbage("fd");
}

#[test]
fn worker_whose_first_message_is_garbage_is_killed_and_replaced() {
    garbage("first");
}
