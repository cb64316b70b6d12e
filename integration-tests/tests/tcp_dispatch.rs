//! The data path: a clustered `hello` serves from every worker through the master's socket.

use std::collections::HashSet;
use std::time::Duration;

use integration_tests::{Server, children, listening_inode, parse_worker, socket_inodes, thread_cpu_time, wrk};

#[test]
fn two_workers_answer_every_request() {
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
    let mut seen = HashSet::new();
    for i in 0..200 {
        // One request in four checks the body of `/`; the rest ask who answered.
        if i % 4 == 0 {
            let res = server.get("/");
            assert_eq!((res.status, res.body.as_str()), (200, "hello world\n"));
        } else {
            let res = server.get("/worker");
            assert_eq!(res.status, 200);
            seen.insert(parse_worker(&res.body));
        }
    }
    let ids: HashSet<u32> = seen.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, HashSet::from([1, 2]), "both workers serve");
    let pids: HashSet<u32> = seen.iter().map(|(_, pid)| *pid).collect();
    assert_eq!(pids, children(server.pid()).into_iter().collect(), "the serving workers are the master's children");
}

#[test]
fn only_the_master_holds_the_listening_socket() {
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
    let inode = listening_inode(server.addr.port()).expect("listening socket in /proc/net/tcp");
    assert!(socket_inodes(server.pid()).contains(&inode), "master holds the listening socket");
    let workers = children(server.pid());
    assert_eq!(workers.len(), 2);
    for pid in workers {
        assert!(!socket_inodes(pid).contains(&inode), "worker {pid} must not hold the listening socket");
    }
}

#[test]
fn standalone_mode_serves_from_one_process() {
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "0")], 1);
    assert_eq!(server.get("/").body, "hello world\n");
    let (id, pid) = parse_worker(&server.get("/worker").body);
    assert_eq!((id, pid), (0, server.pid()), "served by the process itself");
    assert!(children(server.pid()).is_empty(), "no workers in standalone mode");
}

#[test]
fn axum_example_serves_through_the_cluster_listener() {
    let server = Server::start("axum-hello", &[("CLUSTER_WORKERS", "2")], 2);
    let ids: HashSet<u32> = (0..10).map(|_| server.which_worker().0).collect();
    assert_eq!(ids, HashSet::from([1, 2]));
    assert_eq!(server.get("/").body, "hello world\n");
}

#[test]
fn bench_server_answers_keep_alive_and_close() {
    use std::io::{Read, Write};
    let server = Server::start("bench-server", &[("CLUSTER_WORKERS", "2")], 2);
    let mut conn = std::net::TcpStream::connect(server.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Two pipelined requests on one connection, the second asking to close.
    conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert_eq!(out.matches("connection: close").count(), 1, "{out}");
}

/// The master's threads, by name, with the CPU time each has used.
fn master_threads(pid: u32) -> Vec<(String, Duration)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else { continue };
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        out.push((name, thread_cpu_time(pid, tid)));
    }
    out
}

#[test]
fn accept_threads_take_connections_and_lose_none() {
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2"), ("CLUSTER_ACCEPT_THREADS", "3")], 2);
    let report = wrk(server.addr, &["-c16", "-d2s", "-H", "Connection: close"]);
    assert_eq!(report.errors, [0; 4], "{}", report.output);
    assert_eq!(report.non2xx, 0, "{}", report.output);
    assert!(report.requests > 500, "the load ran: {}", report.output);
    let threads = master_threads(server.pid());
    for name in ["accept-1", "accept-2", "accept-3"] {
        let used = threads.iter().find(|(n, _)| n == name).map(|(_, t)| *t);
        assert!(used.is_some_and(|t| !t.is_zero()), "{name} took connections: {threads:?}");
    }
    assert_eq!(server.events("accept_threads")[0].1["count"], 3);

    // By default one thread of its own accepts (and reads the workers' channels), not the
    // master's thread, which answers signals and the control socket.
    let one = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
    let report = wrk(one.addr, &["-c8", "-d1s", "-H", "Connection: close"]);
    assert_eq!(report.errors, [0; 4], "{}", report.output);
    let threads = master_threads(one.pid());
    let accepting: Vec<&(String, Duration)> = threads.iter().filter(|(n, _)| n.starts_with("accept-")).collect();
    assert_eq!(accepting.len(), 1, "{threads:?}");
    assert_eq!(accepting[0].0, "accept-1");
    assert!(!accepting[0].1.is_zero(), "accept-1 took the connections: {threads:?}");
    // The main thread (the supervisor) spent a small part of what the data path did.
    let main = threads.iter().find(|(n, _)| n == "hello").map(|(_, t)| *t).expect("the main thread");
    assert!(main * 4 < accepting[0].1, "the main thread does not accept: {threads:?}");
    assert_eq!(one.events("accept_threads")[0].1["count"], 1);
}
