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
    server.wait_event("exit", Duration::from_secs(5), |e| {
        e["code"] == 101 && e["reason"].as_str().is_some_and(|r| r.contains("/panic requested"))
    });
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
    let hung = integration_tests::hung_worker(&server, Duration::from_secs(10));
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
    server.wait_event("redispatch", Duration::from_secs(5), |e| e["count"].as_u64() > Some(0));
}

/// Worker 2 speaks garbage of `kind`; the master must see `error`, kill it, and replace it.
fn garbage(kind: &str, error: &str) {
    let dir = std::env::temp_dir().join(format!("cluster-garbage-{}-{kind}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let marker = dir.to_str().unwrap().to_string();
    let path = env!("CARGO_BIN_EXE_garbage-worker").into();
    let server = Server::start_path(path, &[("GARBAGE_MARKER", &marker), ("GARBAGE_KIND", kind)], 1);
    let seen = server.wait_event("protocol_error", Duration::from_secs(10), |e| e["id"] == 2);
    assert!(seen["reason"].as_str().is_some_and(|r| r.contains(error)), "{kind}: expected {error:?}, saw {seen}");
    wait_for(Duration::from_secs(10), "the master's hook to see the exit", || {
        server.stdout().lines().any(|l| l.starts_with("exit of worker 2:") && l.contains(error)).then_some(())
    });
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
    garbage("tag", "unknown message tag 0x7f");
}

#[test]
fn worker_passing_an_unexpected_fd_is_killed_and_replaced() {
    garbage("fd", "listening message carries 1 file descriptors, expected 0");
}

#[test]
fn worker_whose_first_message_is_garbage_is_killed_and_replaced() {
    garbage("first", "first message must be hello, got heartbeat");
}

#[test]
fn worker_of_another_protocol_version_is_refused_and_replaced() {
    garbage("version", "peer speaks v1");
}

/// With `exit_on_panic(false)` a panicking task ends alone: the worker goes on, and the master
/// does not take its later exit for a panic.
#[test]
fn a_panic_that_does_not_end_the_worker_is_not_reported_as_its_exit() {
    let server = Server::spawn(env!("CARGO_BIN_EXE_panic-task").into(), &[("CLUSTER_MIN_UPTIME_MS", "60000")]);
    let line = wait_for(Duration::from_secs(20), "the worker's exit", || {
        server.stdout().lines().find(|l| l.starts_with("worker exited:")).map(String::from)
    });
    assert!(server.stdout().contains("worker still running after the panic"), "{}", server.stdout());
    assert_eq!(line, "worker exited: code Some(0), reason None");
    assert!(server.events("panic").is_empty(), "{}", server.stderr());
}
