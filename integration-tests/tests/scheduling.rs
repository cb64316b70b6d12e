//! Scheduling policies and balancers: how connections are spread, backpressure, and the master
//! under a full fd table.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use integration_tests::{Server, cpu_time, get, get_from, get_timeout, kill, parse_worker, wait_for};

/// These tests count where connections go: run them one at a time.
fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// (worker id, pid) of the worker answering `GET /worker` on a new connection.
fn worker_of(server: &Server) -> (u32, u32) {
    server.which_worker()
}

#[test]
fn every_policy_and_balancer_serves_reloads_and_stops() {
    let _guard = exclusive();
    let cases: [&[(&str, &str)]; 5] = [
        &[("CLUSTER_SCHED_POLICY", "rr"), ("CLUSTER_BALANCER", "round-robin")],
        &[("CLUSTER_SCHED_POLICY", "rr"), ("CLUSTER_BALANCER", "least-connections")],
        &[("CLUSTER_SCHED_POLICY", "rr"), ("CLUSTER_BALANCER", "sticky")],
        &[("CLUSTER_SCHED_POLICY", "shared")],
        &[("CLUSTER_SCHED_POLICY", "reuseport")],
    ];
    for case in cases {
        let mut env = vec![("CLUSTER_WORKERS", "2")];
        env.extend_from_slice(case);
        let mut server = Server::start("hello", &env, 2);
        for _ in 0..20 {
            let r = server.get("/");
            assert_eq!((r.status, r.body.as_str()), (200, "hello world\n"), "{case:?}");
        }
        // A rolling reload: every request on the way is answered.
        server.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.events("reload_done").is_empty() {
            assert!(Instant::now() < deadline, "{case:?}: reload did not complete:\n{}", server.stderr());
            let r = get(server.addr, "/").unwrap_or_else(|e| panic!("{case:?}: request during reload: {e}"));
            assert_eq!(r.status, 200);
        }
        assert_eq!(server.get("/").status, 200, "{case:?} after reload");
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(10)).expect("master exits");
        assert_eq!(status.code(), Some(0), "{case:?}:\n{}", server.stderr());
    }
}

#[test]
fn shared_and_reuseport_workers_accept_on_sockets_the_master_bound() {
    let _guard = exclusive();
    for policy in ["shared", "reuseport"] {
        let server = Server::start("hello", &[("CLUSTER_WORKERS", "2"), ("CLUSTER_SCHED_POLICY", policy)], 2);
        let mut seen = HashMap::new();
        for _ in 0..200 {
            *seen.entry(worker_of(&server).0).or_insert(0) += 1;
            if seen.len() == 2 {
                break;
            }
        }
        // The sockets the master bound: one per worker under `reuseport`, else one shared.
        let binds = server.events("bind");
        let owned = binds.iter().filter(|(_, e)| e["owner"].is_u64()).count();
        let expected = if policy == "reuseport" { (2, 2) } else { (1, 0) };
        assert_eq!((binds.len(), owned), expected, "{policy}: {binds:?}");
        // The kernel picks the worker: with 200 tries, both should have been picked.
        assert_eq!(seen.len(), 2, "{policy}: both workers accept: {seen:?}");
    }
}

#[test]
fn round_robin_gives_each_of_4_workers_a_quarter_of_400_connections() {
    let _guard = exclusive();
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "4")], 4);
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for _ in 0..400 {
        *counts.entry(worker_of(&server).0).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 4, "{counts:?}");
    for (id, n) in &counts {
        assert!((98..=102).contains(n), "worker {id} got {n} of 400: {counts:?}");
    }
}

#[test]
fn sticky_sends_one_client_to_one_worker_and_remaps_it_when_that_worker_dies() {
    let _guard = exclusive();
    // The killed worker counts as crash-looping and is restarted a minute later, after the
    // test: its clients go elsewhere meanwhile (its replacement would get them back).
    let env = [
        ("CLUSTER_WORKERS", "3"),
        ("CLUSTER_BALANCER", "sticky"),
        ("CLUSTER_MIN_UPTIME_MS", "60000"),
        ("CLUSTER_RESTART_DELAY_MS", "60000"),
    ];
    let server = Server::start("hello", &env, 3);
    let first: Vec<(u32, u32)> = (0..50).map(|_| worker_of(&server)).collect();
    assert!(first.iter().all(|w| *w == first[0]), "one client, one worker: {first:?}");
    let (id, pid) = first[0];
    kill(pid, libc::SIGKILL);
    server.wait_event("crash_loop", Duration::from_secs(5), |e| e["id"] == id);
    let then: Vec<(u32, u32)> = (0..50).map(|_| worker_of(&server)).collect();
    assert!(then.iter().all(|w| *w == then[0]), "still one worker after the kill: {then:?}");
    assert_ne!(then[0].1, pid, "not the dead process");
    eprintln!("client went to worker {id} (pid {pid}), then to worker {} (pid {})", then[0].0, then[0].1);
}

#[test]
fn least_connections_sends_new_requests_away_from_a_busy_worker() {
    let _guard = exclusive();
    let mut server = Server::start("hello", &[("CLUSTER_WORKERS", "1"), ("CLUSTER_BALANCER", "least-connections")], 1);
    // 20 slow requests, all on worker 1 (the only one).
    let addr = server.addr;
    let slow: Vec<_> = (0..20)
        .map(|_| std::thread::spawn(move || get_timeout(addr, "/sleep?ms=4000", Duration::from_secs(10))))
        .collect();
    wait_for(Duration::from_secs(5), "20 slow requests in worker 1", || {
        // Each slow request holds one connection; the worker's /worker answer comes quickly.
        (integration_tests::socket_inodes(server.workers()[0]).len() >= 20).then_some(())
    });
    server.signal(libc::SIGTTIN);
    wait_for(Duration::from_secs(10), "worker 2 to listen", || {
        (server.stdout().matches("listening on http://").count() >= 2).then_some(())
    });
    let mut by = HashMap::new();
    for _ in 0..20 {
        *by.entry(worker_of(&server).0).or_insert(0) += 1;
    }
    assert_eq!(by.get(&2), Some(&20), "every new request goes to the idle worker: {by:?}");
    for s in slow {
        assert_eq!(s.join().expect("slow client").expect("slow request").status, 200);
    }
    server.signal(libc::SIGTERM);
    server.wait_exit(Duration::from_secs(10)).expect("exit");
}

#[test]
fn window_of_one_keeps_a_hung_worker_to_one_connection_and_loses_none() {
    let _guard = exclusive();
    let env = [
        ("CLUSTER_WORKERS", "2"),
        ("CLUSTER_WINDOW", "1"),
        ("CLUSTER_HEARTBEAT_TIMEOUT_MS", "1500"),
        ("HELLO_DEBUG", "1"),
    ];
    let server = Server::start("hello", &env, 2);
    let addr = server.addr;
    let hang = std::thread::spawn(move || get_timeout(addr, "/hang", Duration::from_secs(10)));
    let hung_pid = integration_tests::hung_worker(&server, Duration::from_secs(5));
    let hung_at = Instant::now();
    let fork = server.wait_event("fork", Duration::from_secs(1), |e| e["pid"] == hung_pid);
    let hung = fork["id"].as_u64().expect("id") as u32;
    // 30 requests from 3 clients while worker `hung` is stuck: at most one connection (its
    // window) waits for it to be killed and is then served by another; none fails.
    let clients: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| {
                        let started = Instant::now();
                        let r = get_timeout(addr, "/worker", Duration::from_secs(10)).expect("no request fails");
                        (parse_worker(&r.body).0, started.elapsed(), hung_at.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<(u32, Duration, Duration)> = clients.into_iter().flat_map(|c| c.join().expect("client")).collect();
    assert_eq!(results.len(), 30);
    let slow = results.iter().filter(|(_, took, _)| *took > Duration::from_millis(700)).count();
    assert!(slow <= 1, "only the connection in the hung worker's window waits: {results:?}");
    // The hung worker is killed 1.5 s after it went silent: until then, the other one serves.
    assert!(
        results.iter().filter(|(_, _, done)| *done < Duration::from_millis(1400)).all(|(id, _, _)| *id != hung),
        "{results:?}"
    );
    assert!(hang.join().expect("hang client").is_err(), "the hung request dies with its worker");
}

#[test]
fn master_out_of_fds_backs_off_and_recovers() {
    let _guard = exclusive();
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
    // Lower the master's own fd limit (its workers keep theirs): ~20 descriptors are in use.
    let limit = libc::rlimit { rlim_cur: 40, rlim_max: 40 };
    // SAFETY: prlimit on our own child process; the pointers are valid for the call.
    let rc = unsafe { libc::prlimit(server.pid() as libc::pid_t, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let cpu_before = cpu_time(server.pid());
    // A burst: 300 clients connect at once and hold their connections open for a while.
    let addr = server.addr;
    let burst: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(addr).expect("connect")).collect();
    let requests: Vec<_> = (0..100)
        .map(|_| std::thread::spawn(move || get_timeout(addr, "/sleep?ms=300", Duration::from_secs(20))))
        .collect();
    server.wait_events("accept_error", 1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1500)); // the burst lasts; it is what we measure under
    drop(burst);
    for r in requests {
        assert_eq!(r.join().expect("client").expect("request in the burst").status, 200);
    }
    wait_for(Duration::from_secs(10), "accepts to recover", || {
        get_timeout(addr, "/", Duration::from_secs(2)).ok().filter(|r| r.status == 200)
    });
    let cpu = cpu_time(server.pid()) - cpu_before;
    assert!(cpu < Duration::from_millis(1500), "master spun: {cpu:?} of CPU during the burst");
    server.wait_events("accept_recovered", 1, Duration::from_secs(5));
    eprintln!("master CPU during the fd-starved burst: {cpu:?}");
}

/// Under `sticky`, the clients of a hung worker wait for it; the clients of the other worker
/// are served meanwhile (they were held up behind the first waiting one).
#[test]
fn sticky_clients_of_a_hung_worker_never_hold_up_the_others() {
    let _guard = exclusive();
    let env = [
        ("CLUSTER_WORKERS", "2"),
        ("CLUSTER_BALANCER", "sticky"),
        ("CLUSTER_WINDOW", "1"),
        ("HELLO_DEBUG", "1"),
        ("CLUSTER_HEARTBEAT_TIMEOUT_MS", "60000"),
    ];
    let server = Server::start("hello", &env, 2);
    let addr = server.addr;
    let second = Duration::from_secs(5);
    // Client addresses by the worker sticky maps them to.
    let mut by_worker: HashMap<u32, Vec<std::net::IpAddr>> = HashMap::new();
    for last in 2..40u8 {
        let ip = std::net::IpAddr::from([127, 0, 0, last]);
        let r = get_from(Some(ip), addr, "/worker", second).expect("GET /worker");
        by_worker.entry(parse_worker(&r.body).0).or_default().push(ip);
    }
    let (stuck, free) = (by_worker[&1][0], by_worker[&2].clone());
    assert!(free.len() >= 2, "{by_worker:?}");
    std::thread::spawn(move || get_from(Some(stuck), addr, "/hang", Duration::from_secs(30)));
    integration_tests::hung_worker(&server, second);
    // Three more clients of worker 1: one fills its window, two wait in the master.
    let waiting: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || get_from(Some(stuck), addr, "/worker", Duration::from_secs(30))))
        .collect();
    for ip in free.iter().take(2) {
        let r = get_from(Some(*ip), addr, "/worker", second).unwrap_or_else(|e| panic!("client {ip} held up: {e}"));
        assert_eq!(parse_worker(&r.body).0, 2);
    }
    assert!(waiting.iter().all(|w| !w.is_finished()), "worker 1's clients wait for it");
}
