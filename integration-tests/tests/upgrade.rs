//! Upgrading the master itself (SIGUSR2, `clusterctl upgrade`) against real clusters: five
//! upgrades in a row under `wrk` (keep-alive, and new connections) fail no request and keep the
//! very listening socket; a bad build, a new master of another protocol version and one that is
//! never ready are stopped while the old master serves on; requests in flight finish; a reload
//! and an upgrade refuse each other; the new master reloads and stops like any other.
//!
//! A master started by an upgrade is not the test's child (its parent, the old master, exits):
//! each test ends the masters it caused by pid ([`Strays`]).

use std::path::Path;
use std::time::Duration;

use integration_tests::{
    Server, Strays, TempDir, alive, children, clusterctl, get, get_timeout, kernel_sockets, kill, listening_inode,
    parse_worker, ppid, wait_for, wait_until, wrk,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn start(dir: &TempDir, workers: usize, env: &[(&str, &str)]) -> Server {
    let n = workers.to_string();
    let pid_file = dir.0.join("master.pid");
    let mut all = vec![
        ("XDG_RUNTIME_DIR", dir.path()),
        ("CLUSTER_NAME", "hello"),
        ("CLUSTER_WORKERS", n.as_str()),
        ("CLUSTER_PID_FILE", pid_file.to_str().unwrap()),
    ];
    all.extend_from_slice(env);
    Server::start("hello", &all, workers)
}

fn pid_file(dir: &TempDir) -> Option<u32> {
    std::fs::read_to_string(dir.0.join("master.pid")).ok()?.trim().parse().ok()
}

fn status(dir: &TempDir) -> Value {
    let (code, out, err) = clusterctl(&dir.0, &["status", "--json"]);
    assert_eq!(code, 0, "status failed: {err}");
    serde_json::from_str(&out).expect("status JSON")
}

/// Sum of a per-worker figure in `clusterctl status --json`.
fn total(status: &Value, field: &str) -> u64 {
    status["workers"].as_array().unwrap().iter().filter_map(|w| w[field].as_u64()).sum()
}

/// `clusterctl upgrade`, which must succeed: the new master's pid (from the pid file, which
/// must name another master than `old`).
fn upgrade(dir: &TempDir, old: u32, masters: &mut Strays) -> u32 {
    let (code, out, err) = clusterctl(&dir.0, &["upgrade"]);
    assert_eq!(code, 0, "upgrade failed:\n{out}\n{err}");
    let new = pid_file(dir).expect("a pid file");
    assert_ne!(new, old, "the pid file names a new master");
    masters.0.push(new);
    assert!(alive(new), "the new master runs");
    new
}

/// `GET /worker` answers from a worker of `master` (at once under `rr`, where the old master
/// stopped accepting before the upgrade returned; under `shared` and `reuseport` once the old
/// workers, which accept on the same sockets, have retired). Every answer is a 200.
fn served_by(addr: std::net::SocketAddr, master: u32) {
    wait_until(T, &format!("a worker of master {master} to answer"), || {
        let (_, pid) = parse_worker(&get(addr, "/worker").expect("GET /worker").body);
        if ppid(pid) == Some(master) { Ok(()) } else { Err(format!(" (worker {pid} answered)")) }
    });
}

/// Waits until `wrk`'s clients are connected and served (status counts them).
/// Waits until `n` connections of a load on `port` have reached the server: its sockets for
/// them, open or closed (`TIME_WAIT`, the server closes first on `Connection: close`), are in
/// the kernel's table.
fn wait_for_load(port: u16, n: usize) {
    wait_until(T, "the load to reach the server", || {
        let seen = kernel_sockets(&["/proc/net/tcp"], port).filter(|s| s.state == 0x01 || s.state == 0x06).count();
        if seen >= n { Ok(()) } else { Err(format!(" ({seen} so far)")) }
    });
}

fn five_upgrades_under_load(name: &str, env: &[(&str, &str)], close: bool) {
    let dir = TempDir::new(name);
    let server = start(&dir, 2, env);
    let mut masters = Strays::default();
    let (addr, port) = (server.addr, server.addr.port());
    let inode = listening_inode(port).expect("the listening socket");
    let mut args = vec!["-c16", "-d5s"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    let load = std::thread::spawn(move || wrk(addr, &args.iter().map(String::as_str).collect::<Vec<_>>()));
    wait_for_load(port, 16);

    let mut master = server.pid();
    let mut retired = Vec::new();
    for _ in 0..5 {
        let workers = children(master);
        let new = upgrade(&dir, master, &mut masters);
        served_by(addr, new);
        assert_eq!(listening_inode(port), Some(inode), "the listening socket was handed over, not bound again");
        retired.push((master, workers));
        master = new;
    }
    let report = load.join().unwrap();
    assert_eq!(report.errors, [0; 4], "socket errors across 5 upgrades:\n{}", report.output);
    assert_eq!(report.non2xx, 0, "{}", report.output);
    assert!(report.requests > 500, "the load ran: {}", report.output);
    for (old, workers) in retired {
        wait_until(T, "the old master and its workers to exit", || match workers.iter().find(|p| alive(**p)) {
            _ if alive(old) => Err(format!(" (master {old} runs)")),
            Some(pid) => Err(format!(" (worker {pid} of {old} runs)")),
            None => Ok(()),
        });
    }
    let s = status(&dir);
    assert_eq!(s["master"]["pid"].as_u64(), Some(u64::from(master)));
    // One control socket, named after the master that serves it.
    let sockets: Vec<String> = std::fs::read_dir(dir.0.join("cluster"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sock"))
        .collect();
    assert_eq!(sockets, [format!("hello-{master}.sock")]);
}

#[test]
fn five_upgrades_under_keep_alive_load_fail_no_request() {
    five_upgrades_under_load("upgrade-keepalive", &[], false);
}

#[test]
fn five_upgrades_under_new_connections_fail_no_request() {
    five_upgrades_under_load("upgrade-close", &[], true);
}

/// With accept threads, the old master's threads stop accepting at the handover: a connection
/// one of them took after it would stay in a master whose workers are retiring.
#[test]
fn five_upgrades_with_accept_threads_fail_no_request() {
    five_upgrades_under_load("upgrade-threads", &[("CLUSTER_ACCEPT_THREADS", "3")], true);
}

#[test]
fn upgrades_under_the_shared_and_reuseport_policies_fail_no_request() {
    five_upgrades_under_load("upgrade-shared", &[("CLUSTER_SCHED_POLICY", "shared")], true);
    five_upgrades_under_load("upgrade-reuseport", &[("CLUSTER_SCHED_POLICY", "reuseport")], true);
}

#[test]
fn a_bad_build_is_stopped_and_the_old_master_serves_on() {
    let dir = TempDir::new("upgrade-bad-build");
    let broken = dir.0.join("broken");
    // Worker 1 of the bad build starts and listens; worker 2 does not start.
    let env = [("HELLO_FAIL_IF_EXISTS", broken.to_str().unwrap()), ("HELLO_FAIL_WORKER", "2")];
    let server = start(&dir, 2, &env);
    let mut masters = Strays::default();
    let workers = server.workers();
    let addr = server.addr;
    let load = std::thread::spawn(move || wrk(addr, &["-c8", "-d3s", "-H", "Connection: close"]));
    wait_for_load(addr.port(), 8);
    // Which workers answer meanwhile: the new master accepts nothing before it takes over, so
    // no client ever meets the bad build.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut pids = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                pids.insert(parse_worker(&get(addr, "/worker").expect("GET /worker").body).1);
            }
            pids
        })
    };

    // The new build's workers cannot start.
    std::fs::write(&broken, "").unwrap();
    let (code, out, err) = clusterctl(&dir.0, &["upgrade"]);
    assert_eq!(code, 1, "the upgrade fails:\n{out}\n{err}");
    let started = server.wait_event("upgrade_started", T, |_| true);
    let new = started["pid"].as_u64().unwrap() as u32;
    masters.0.push(new);
    wait_until(T, "the new master to be stopped", || if alive(new) { Err(String::new()) } else { Ok(()) });
    server.wait_event("upgrade_failed", T, |e| e["target"] == "cluster");
    assert_eq!(pid_file(&dir), Some(server.pid()), "the pid file still names the old master");
    assert_eq!(server.workers(), workers, "the old workers serve on, untouched");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered: Vec<u32> = answered.join().unwrap().into_iter().collect();
    assert_eq!(answered, workers, "only the old master's workers answered");
    assert_eq!(status(&dir)["master"]["pid"].as_u64(), Some(u64::from(server.pid())));
    let report = load.join().unwrap();
    assert_eq!(report.errors, [0; 4], "{}", report.output);
    assert_eq!(report.non2xx, 0, "{}", report.output);

    // Fixed: the upgrade goes through.
    std::fs::remove_file(&broken).unwrap();
    let new = upgrade(&dir, server.pid(), &mut masters);
    served_by(addr, new);
}

#[test]
fn requests_in_flight_during_an_upgrade_complete() {
    let dir = TempDir::new("upgrade-in-flight");
    let server = start(&dir, 2, &[]);
    let mut masters = Strays::default();
    let addr = server.addr;
    let slow: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || get_timeout(addr, "/sleep?ms=2000", Duration::from_secs(20))))
        .collect();
    wait_until(T, "4 requests in flight", || {
        let open = total(&status(&dir), "connections_open");
        if open >= 4 { Ok(()) } else { Err(format!(" ({open} open)")) }
    });
    let new = upgrade(&dir, server.pid(), &mut masters);
    served_by(addr, new);
    for request in slow {
        let response = request.join().unwrap().expect("the slow request completes");
        assert_eq!(response.status, 200);
    }
    wait_until(T, "the old master to exit", || if alive(server.pid()) { Err(String::new()) } else { Ok(()) });
}

#[test]
fn a_reload_and_an_upgrade_refuse_each_other() {
    let dir = TempDir::new("upgrade-reload");
    // Each worker takes a moment to start, so a reload and an upgrade each last a while.
    let server = start(&dir, 1, &[("HELLO_START_DELAY_MS", "1500")]);
    let mut masters = Strays::default();
    let runtime = dir.0.clone();
    let reload = std::thread::spawn(move || clusterctl(&runtime, &["reload"]));
    wait_for(T, "the reload to be under way", || (status(&dir)["master"]["reloading"] == true).then_some(()));
    let (code, _, err) = clusterctl(&dir.0, &["upgrade"]);
    assert_eq!(code, 1, "an upgrade during a reload is refused: {err}");
    assert!(server.events("upgrade_started").is_empty(), "no new master was started");
    let (code, _, err) = reload.join().unwrap();
    assert_eq!(code, 0, "the reload went on: {err}");

    let runtime = dir.0.clone();
    let upgrading = std::thread::spawn(move || clusterctl(&runtime, &["upgrade"]));
    server.wait_event("upgrade_started", T, |_| true);
    let (code, _, err) = clusterctl(&dir.0, &["reload"]);
    assert_eq!(code, 1, "a reload during an upgrade is refused: {err}");
    let (code, _, err) = clusterctl(&dir.0, &["upgrade"]);
    assert_eq!(code, 1, "one upgrade at a time: {err}");
    let (code, out, err) = upgrading.join().unwrap();
    assert_eq!(code, 0, "the upgrade went on:\n{out}\n{err}");
    let new = pid_file(&dir).unwrap();
    masters.0.push(new);
    assert_eq!(server.events("upgrade_started").len(), 1, "one new master only");
    served_by(server.addr, new);
}

#[test]
fn the_new_master_reloads_on_sighup_and_stops_cleanly_on_sigterm() {
    let dir = TempDir::new("upgrade-then");
    let server = start(&dir, 2, &[]);
    let mut masters = Strays::default();
    // By signal this time.
    server.signal(libc::SIGUSR2);
    let upgraded = server.wait_event("upgraded", T, |_| true);
    let new = upgraded["pid"].as_u64().unwrap() as u32;
    masters.0.push(new);
    wait_for(T, "the pid file to name the new master", || (pid_file(&dir) == Some(new)).then_some(()));
    let workers = wait_for(T, "the new master's workers", || Some(children(new)).filter(|w| w.len() == 2));

    kill(new, libc::SIGHUP);
    server.wait_events("reload_done", 1, T);
    // The replaced ones retire after the reload is done.
    let reloaded = wait_until(T, "every worker replaced", || {
        let now = children(new);
        if now.len() == 2 && now.iter().all(|p| !workers.contains(p)) { Ok(now) } else { Err(format!(" ({now:?})")) }
    });
    served_by(server.addr, new);

    let socket = dir.0.join("cluster").join(format!("hello-{new}.sock"));
    assert!(socket.exists(), "the control socket is named after the new master");
    kill(new, libc::SIGTERM);
    wait_until(T, "the new master and its workers to exit", || {
        match reloaded.iter().chain([&new]).find(|p| alive(**p)) {
            Some(pid) => Err(format!(" ({pid} runs)")),
            None => Ok(()),
        }
    });
    assert_eq!(pid_file(&dir), None, "the pid file is removed");
    assert!(!socket.exists(), "the control socket is removed");
    assert!(get(server.addr, "/").is_err(), "nothing listens any more");
}

/// Puts `program` where the running master's binary is (as a deploy does: a new file renamed
/// over the old one).
fn deploy(program: &Path, bin: &Path) {
    let staged = bin.with_extension("new");
    std::fs::copy(program, &staged).unwrap();
    std::fs::rename(&staged, bin).unwrap();
}

/// What the stand-in new master received, one message per line.
fn received(record: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(record).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).expect("a record line")).collect()
}

/// `hello` started from a copy of its binary, which is then replaced on disk by a stand-in new
/// master speaking protocol `version` (`fake-master`); `env` is added to the master's.
fn with_stand_in(name: &str, version: &str, env: &[(&str, &str)]) -> (TempDir, Server, std::path::PathBuf) {
    let dir = TempDir::new(name);
    let bin = dir.0.join("hello");
    std::fs::copy(integration_tests::example_bin("hello"), &bin).unwrap();
    let record = dir.0.join("record");
    let mut all = vec![
        ("XDG_RUNTIME_DIR", dir.path()),
        ("CLUSTER_WORKERS", "2"),
        ("FAKE_RECORD", record.to_str().unwrap()),
        ("FAKE_VERSION", version),
    ];
    all.extend_from_slice(env);
    let server = Server::start_path(bin.clone(), &all, 2);
    deploy(Path::new(env!("CARGO_BIN_EXE_fake-master")), &bin);
    (dir, server, record)
}

/// `clusterctl upgrade` to a stand-in, which must fail and leave no stand-in running; what the
/// stand-in received.
fn failed_upgrade_to_stand_in(dir: &TempDir, server: &Server, record: &Path, masters: &mut Strays) -> Vec<Value> {
    let (code, out, err) = clusterctl(&dir.0, &["upgrade"]);
    assert_eq!(code, 1, "the upgrade fails:\n{out}\n{err}");
    let fake = server.wait_event("upgrade_started", T, |_| true)["pid"].as_u64().unwrap() as u32;
    masters.0.push(fake);
    wait_until(T, "the stand-in to be gone", || if alive(fake) { Err(String::new()) } else { Ok(()) });
    received(record)
}

#[test]
fn a_new_master_of_another_protocol_version_gets_no_socket() {
    let (dir, server, record) = with_stand_in("upgrade-version", "99", &[]);
    let mut masters = Strays::default();
    let got = failed_upgrade_to_stand_in(&dir, &server, &record, &mut masters);
    assert_eq!(got.len(), 1, "one message: {got:?}");
    assert_eq!(got[0]["msg"]["t"], "refused", "{got:?}");
    assert_eq!(got[0]["fds"], 0, "no socket changed hands");
    assert_eq!(server.get("/").status, 200);
    assert_eq!(server.workers().len(), 2);
}

#[test]
fn a_new_master_that_is_not_ready_in_time_is_stopped() {
    // A stand-in that agrees on the protocol, takes the sockets and never says it is ready.
    let (dir, server, record) = with_stand_in("upgrade-never-ready", "1", &[("CLUSTER_READY_TIMEOUT_MS", "500")]);
    let mut masters = Strays::default();
    let workers = server.workers();
    let got = failed_upgrade_to_stand_in(&dir, &server, &record, &mut masters);
    let kinds: Vec<&str> = got.iter().filter_map(|m| m["msg"]["t"].as_str()).collect();
    assert_eq!(kinds, ["sockets", "start"], "{got:?}");
    let items = got[0]["msg"]["items"].as_array().unwrap();
    assert_eq!(got[0]["fds"].as_u64(), Some(items.len() as u64), "one descriptor per item");
    let handed: Vec<&str> = items.iter().filter_map(|i| i["k"].as_str()).collect();
    assert_eq!(handed, ["listener", "control"], "the listening socket and the control socket");
    assert_eq!(got[1]["msg"]["workers"], 2);
    // The old master never stopped serving.
    assert_eq!(server.get("/").status, 200);
    assert_eq!(server.workers(), workers);
    assert!(alive(server.pid()));
}

/// One connection to a Unix socket: the `<id>:<pid>` the answering worker of `unix-hello` says.
fn ask_unix(path: &Path) -> Result<u32, String> {
    use std::io::Read;
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    reply.trim().split(':').nth(1).and_then(|p| p.parse().ok()).ok_or_else(|| format!("a reply: {reply:?}"))
}

#[test]
fn a_unix_socket_is_handed_over_and_its_file_kept() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("upgrade-unix");
    let path = dir.0.join("app.sock");
    let env = [("XDG_RUNTIME_DIR", dir.path()), ("SOCKET_PATH", path.to_str().unwrap())];
    let server = Server::spawn(env!("CARGO_BIN_EXE_unix-hello").into(), &env);
    let mut masters = Strays::default();
    wait_for(T, "both workers to listen", || {
        (server.stdout().matches("listening on unix:").count() == 2).then_some(())
    });
    let inode = std::fs::metadata(&path).unwrap().ino();
    server.signal(libc::SIGUSR2);
    let new = server.wait_event("upgraded", T, |_| true)["pid"].as_u64().unwrap() as u32;
    masters.0.push(new);
    wait_until(T, "a worker of the new master to answer", || {
        let pid = ask_unix(&path)?;
        if ppid(pid) == Some(new) { Ok(()) } else { Err(format!(" (worker {pid} answered)")) }
    });
    wait_until(T, "the old master to exit", || if alive(server.pid()) { Err(String::new()) } else { Ok(()) });
    // The old master left the file alone: it is the same socket, served by the new master.
    assert_eq!(std::fs::metadata(&path).map(|m| m.ino()).ok(), Some(inode));
    assert!(ppid(ask_unix(&path).unwrap()) == Some(new));
    // The new master owns it now that the old one is gone, and removes it when it stops.
    server.wait_event("predecessor_gone", T, |_| true);
    kill(new, libc::SIGTERM);
    wait_until(T, "the new master to exit", || if alive(new) { Err(String::new()) } else { Ok(()) });
    assert!(!path.exists(), "the socket file is removed when the new master stops");
}

/// The inode of the UDP socket bound to `port`.
fn udp_inode(port: u16) -> Option<u64> {
    kernel_sockets(&["/proc/net/udp"], port).next().map(|s| s.inode)
}

#[test]
fn a_udp_socket_is_handed_over() {
    let dir = TempDir::new("upgrade-udp");
    let server = Server::spawn(
        integration_tests::example_bin("udp-echo"),
        &[("XDG_RUNTIME_DIR", dir.path()), ("CLUSTER_WORKERS", "2")],
    );
    let mut masters = Strays::default();
    let bound = |server: &Server| -> Vec<String> {
        server.stdout().lines().filter_map(|l| l.split("listening on udp://").nth(1)).map(|a| a.trim().into()).collect()
    };
    let addr: std::net::SocketAddr = wait_for(T, "both workers to bind", || {
        let addrs = bound(&server);
        (addrs.len() == 2).then(|| addrs[0].parse().unwrap())
    });
    let inode = udp_inode(addr.port()).expect("the UDP socket");
    server.signal(libc::SIGUSR2);
    let new = server.wait_event("upgraded", T, |_| true)["pid"].as_u64().unwrap() as u32;
    masters.0.push(new);
    let addrs = wait_for(T, "the new workers to bind", || Some(bound(&server)).filter(|a| a.len() == 4));
    assert!(addrs.iter().all(|a| *a == addr.to_string()), "one address throughout: {addrs:?}");
    wait_until(T, "the old master to exit", || if alive(server.pid()) { Err(String::new()) } else { Ok(()) });
    assert_eq!(udp_inode(addr.port()), Some(inode), "the very socket");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    client.send_to(b"ping", addr).unwrap();
    let mut buf = [0u8; 64];
    let n = client.recv(&mut buf).expect("an answer from the new master's workers");
    assert!(buf[..n].ends_with(b":ping"), "{:?}", String::from_utf8_lossy(&buf[..n]));
}

#[test]
fn port_zero_binds_get_the_same_ports_after_an_upgrade() {
    let dir = TempDir::new("upgrade-port-zero");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let server = Server::spawn(
        env!("CARGO_BIN_EXE_listeners").into(),
        &[("XDG_RUNTIME_DIR", dir.path()), ("TAKEN_PORT", &port)],
    );
    let mut masters = Strays::default();
    let reports = |server: &Server| -> Vec<String> {
        let out = server.stdout();
        out.lines().filter(|l| l.contains(" a=")).map(|l| l.split_once(' ').unwrap().1.to_string()).collect()
    };
    wait_for(T, "both workers to report", || (reports(&server).len() == 2).then_some(()));
    server.signal(libc::SIGUSR2);
    let new = server.wait_event("upgraded", T, |_| true)["pid"].as_u64().unwrap() as u32;
    masters.0.push(new);
    let all = wait_for(T, "the new workers to report", || Some(reports(&server)).filter(|r| r.len() == 4));
    // "1 a=… b=… taken=…": each worker id binds the same two ports in the same order, before
    // and after.
    let mut old = all[..2].to_vec();
    let mut now = all[2..].to_vec();
    old.sort();
    now.sort();
    assert_eq!(old, now, "{all:?}");
}

#[test]
fn signals_to_the_whole_group_reach_the_master_and_kill_no_worker() {
    // `systemctl kill -s USR2 hello` without `--kill-whom=main`, or a terminal's hangup, signal
    // every process of the cluster: the master acts, the workers must not die of it.
    let dir = TempDir::new("upgrade-group");
    let server = start(&dir, 2, &[]);
    let mut masters = Strays::default();
    let addr = server.addr;
    let load = std::thread::spawn(move || wrk(addr, &["-c8", "-d3s", "-H", "Connection: close"]));
    wait_for_load(addr.port(), 8);
    server.signal_group(libc::SIGHUP);
    server.wait_events("reload_done", 1, T);
    server.signal_group(libc::SIGUSR2);
    let new = server.wait_event("upgraded", T, |_| true)["pid"].as_u64().unwrap() as u32;
    masters.0.push(new);
    let report = load.join().unwrap();
    assert_eq!(report.errors, [0; 4], "{}", report.output);
    assert_eq!(report.non2xx, 0, "{}", report.output);
    wait_until(T, "the old master to exit", || if alive(server.pid()) { Err(String::new()) } else { Ok(()) });
    // Two reloaded away, two retired by the upgrade: every one retired, none killed by a signal.
    let exits = server.wait_events("exit", 4, T);
    for exit in &exits {
        assert!(exit["retired"] == true && exit["code"] == 0 && exit["signal"].is_null(), "{exit}");
    }
    served_by(addr, new);
}
