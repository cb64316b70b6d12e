//! Connections a worker acknowledged in a batch but never handed to user code go back to the
//! master, descriptors and all, and reach another worker; a worker with a full descriptor
//! table hands new connections back instead of dying.

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::{Server, get, get_timeout, parse_worker, wait_for};

/// What one client got: (worker id, pid) of the answer, or why it got none.
type Outcome = Result<(u32, u32), String>;

/// Sends `n` concurrent `GET /` and returns each outcome.
fn burst(server: &Server, n: usize) -> Vec<Outcome> {
    let addr = server.addr;
    let clients: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                let r = get_timeout(addr, "/", Duration::from_secs(20))?;
                if r.status != 200 {
                    return Err(format!("status {}", r.status));
                }
                Ok(parse_worker(&r.body))
            })
        })
        .collect();
    clients.into_iter().map(|c| c.join().expect("client thread")).collect()
}

fn give_back(by: &str) -> (Server, Vec<Outcome>) {
    let dir = std::env::temp_dir().join(format!("cluster-give-back-{}-{by}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let marker = dir.to_string_lossy().into_owned();
    let path = PathBuf::from(env!("CARGO_BIN_EXE_give-back"));
    let server =
        Server::start_path(path, &[("GIVE_BACK_MARKER", &marker), ("GIVE_BACK_BY", by), ("GIVE_BACK_WAIT", "5")], 2);
    let results = burst(&server, 12);
    let _ = std::fs::remove_file(&dir);
    (server, results)
}

fn pid_of_worker(server: &Server, id: u32) -> u32 {
    let line = format!("worker {id} (pid ");
    let out = server.stdout();
    let rest = out.split(&line).nth(1).expect("worker line");
    rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().expect("pid")
}

#[test]
fn acknowledged_connections_come_back_when_a_listener_is_dropped() {
    let (server, results) = give_back("drop");
    let first = pid_of_worker(&server, 1);
    let mut by: HashMap<u32, usize> = HashMap::new();
    for r in &results {
        let (_, pid) = r.as_ref().unwrap_or_else(|e| panic!("a request failed: {e}\n{}", server.stderr()));
        *by.entry(*pid).or_default() += 1;
    }
    // Worker 1 served the one it took; everything it had acknowledged besides went elsewhere.
    assert_eq!(by.get(&first), Some(&1), "{by:?}\n{}", server.stderr());
    assert_eq!(by.values().sum::<usize>(), 12);
    server.wait_event("given_back", Duration::from_secs(5), |e| e["id"] == 1);
}

#[test]
fn acknowledged_connections_come_back_when_a_worker_panics() {
    let (server, results) = give_back("panic");
    let first = pid_of_worker(&server, 1);
    let served: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    // The connection user code took dies with the process; every other one is answered.
    assert_eq!(served.len(), 11, "{results:?}\n{}", server.stderr());
    assert!(served.iter().all(|(_, pid)| *pid != first), "{served:?}");
    server.wait_event("given_back", Duration::from_secs(5), |e| e["id"] == 1);
    server.wait_event("exit", Duration::from_secs(5), |e| e["id"] == 1 && e["code"] == 101);
}

fn set_fd_limit(pid: u32, n: u64) {
    let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
    // SAFETY: prlimit on a process of our own; the pointers are valid for the call.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn worker_out_of_descriptors_hands_connections_back_and_keeps_running() {
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
    let (_, full) = wait_for(Duration::from_secs(10), "worker 1 to answer", || {
        let w = server.which_worker();
        (w.0 == 1).then_some(w)
    });
    // Worker 1 may open 8 more descriptors than it has now; then the kernel cuts its newconns.
    let open = std::fs::read_dir(format!("/proc/{full}/fd")).expect("fd dir").count() as u64;
    set_fd_limit(full, open + 8);
    // 40 clients hold a keep-alive connection each, and each gets an answer on it.
    let mut held: Vec<TcpStream> = Vec::new();
    let mut by: HashMap<u32, usize> = HashMap::new();
    for _ in 0..40 {
        let mut stream = TcpStream::connect(server.addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (_, pid) = keep_alive_get(&mut stream).unwrap_or_else(|e| panic!("{e}\n{}", server.stderr()));
        *by.entry(pid).or_default() += 1;
        held.push(stream);
    }
    let log = server.stderr();
    assert!(server.events("busy").iter().any(|(_, e)| e["id"] == 1), "{log}");
    assert!(integration_tests::alive(full), "worker 1 kept running");
    // About 8 (the count above may include descriptors closed since); round-robin alone would
    // have given it 20.
    assert!(by.get(&full).is_some_and(|n| (1..=12).contains(n)), "{by:?}");
    assert!(server.events("exit").is_empty(), "no worker died:\n{log}");
    // Once its clients leave, worker 1 takes connections again.
    drop(held);
    wait_for(Duration::from_secs(10), "worker 1 to serve again", || {
        get(server.addr, "/worker").ok().map(|r| parse_worker(&r.body)).filter(|w| w.1 == full)
    });
}

/// `GET /worker` on an open connection, keeping it open; (id, pid) of the answer.
fn keep_alive_get(stream: &mut TcpStream) -> Result<(u32, u32), String> {
    use std::io::{Read, Write};
    stream.write_all(b"GET /worker HTTP/1.1\r\nhost: x\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!("closed after {:?}", String::from_utf8_lossy(&buf)));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((_, body)) = text.split_once("\r\n\r\n")
            && body.ends_with('}')
        {
            return Ok(parse_worker(body));
        }
    }
}
