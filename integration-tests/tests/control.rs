//! The control plane against real clusters: `clusterctl` drives `hello` through its control
//! socket (status, scale, restart, reload under load, a bad deploy, stop, logs, metrics, ls with
//! two masters), the socket refuses other users and survives bad clients, and the admin HTTP
//! endpoint answers probes and scrapers. Each test has its own `XDG_RUNTIME_DIR`, so the
//! sockets of parallel tests never meet.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::{Server, TempDir, alive, clusterctl, get, wait_for, wait_until, wrk};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

fn start(dir: &TempDir, name: &str, workers: usize, env: &[(&str, &str)]) -> Server {
    let n = workers.to_string();
    let mut all = vec![("XDG_RUNTIME_DIR", dir.path()), ("CLUSTER_NAME", name), ("CLUSTER_WORKERS", n.as_str())];
    all.extend_from_slice(env);
    Server::start("hello", &all, workers)
}

/// The socket a master serves, as it says in its log.
fn socket_of(server: &Server) -> PathBuf {
    let event = server.wait_event("control", T, |_| true);
    PathBuf::from(event["path"].as_str().expect("a path"))
}

fn ctl(dir: &TempDir, args: &[&str]) -> (i32, String, String) {
    clusterctl(&dir.0, args)
}

/// `clusterctl status --json`, which must succeed.
fn status(dir: &TempDir, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["status", "--json"]);
    let (code, out, err) = ctl(dir, &all);
    assert_eq!(code, 0, "status failed: {err}");
    serde_json::from_str(&out).expect("status JSON")
}

fn ready_pids(status: &Value) -> Vec<u32> {
    let mut pids: Vec<u32> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect();
    pids.sort_unstable();
    pids
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

#[test]
fn status_shows_the_real_processes_and_scale_and_restart_change_them() {
    let dir = TempDir::new("ctl-status");
    let server = start(&dir, "hello", 2, &[]);
    socket_of(&server);

    let s = status(&dir, &[]);
    assert_eq!(s["master"]["pid"].as_u64(), Some(u64::from(server.pid())));
    assert_eq!(s["master"]["name"], "hello");
    assert_eq!(s["master"]["policy"], "rr");
    let listeners: Vec<&str> = s["master"]["listeners"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(listeners, [format!("tcp {}", server.addr)]);
    // The pids are the master's children, as /proc sees them, and each one's figures are its own.
    assert_eq!(ready_pids(&s), sorted(server.workers()));
    for w in s["workers"].as_array().unwrap() {
        let pid = w["pid"].as_u64().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the worker's /proc entry");
        assert!(status.contains(&format!("PPid:\t{}", server.pid())), "pid {pid} is not the master's child");
        assert!(w["rss_bytes"].as_u64().unwrap() > 1 << 20, "{w}");
        assert!(w["cpu_percent"].is_number(), "{w}");
    }
    // A held connection shows in its worker's count.
    let mut held = std::net::TcpStream::connect(server.addr).unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    assert!(held.read(&mut buf).unwrap() > 0, "answered on a kept-alive connection");
    // Open connections are counted at most once a second however many ask: a later reading
    // has it.
    wait_until(T, "the held connection to be counted", || {
        let s = status(&dir, &[]);
        let open: u64 = s["workers"].as_array().unwrap().iter().filter_map(|w| w["connections_open"].as_u64()).sum();
        if open >= 1 { Ok(()) } else { Err(format!(": {s}")) }
    });
    drop(held);

    // The table, as a person reads it.
    let (code, table, _) = ctl(&dir, &["status"]);
    assert_eq!(code, 0);
    for pid in server.workers() {
        assert!(table.contains(&format!(" {pid} ")), "{table}");
    }
    assert!(!table.contains('\x1b'), "no colour when stdout is not a terminal");

    let (code, out, err) = ctl(&dir, &["scale", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 -> 3"), "{out}");
    wait_until(T, "three ready workers", || {
        let s = status(&dir, &[]);
        let pids = ready_pids(&s);
        (pids.len() == 3 && pids == sorted(server.workers())).then_some(()).ok_or(format!(": {s}"))
    });
    assert_eq!(ctl(&dir, &["scale", "-1"]).0, 0);
    wait_for(T, "two workers", || (server.workers().len() == 2).then_some(()));

    let before = status(&dir, &[]);
    let old = before["workers"].as_array().unwrap().iter().find(|w| w["id"] == 1).unwrap()["pid"].as_u64().unwrap();
    let (code, _, err) = ctl(&dir, &["restart", "1"]);
    assert_eq!(code, 0, "{err}");
    wait_for(T, "the old worker 1 gone", || (!alive(old as u32)).then_some(()));
    let after = status(&dir, &[]);
    let new = after["workers"].as_array().unwrap().iter().find(|w| w["id"] == 1).unwrap()["pid"].as_u64().unwrap();
    assert_ne!(new, old);
    assert_eq!(server.get("/").status, 200);

    // Refusals and usage errors.
    assert_eq!(ctl(&dir, &["restart", "99"]).0, 1);
    assert_eq!(ctl(&dir, &["scale", "0"]).0, 2);
    assert_eq!(ctl(&dir, &["scale", "many"]).0, 2);
    assert_eq!(ctl(&dir, &["frobnicate"]).0, 2);

    // The master's log is JSON, line by line.
    let log = server.stderr();
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with('{')).collect();
    assert!(lines.len() > 10);
    for line in lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
    }
}

#[test]
fn reload_returns_when_done_and_loses_nothing_under_load() {
    let dir = TempDir::new("ctl-reload");
    let server = start(&dir, "hello", 2, &[]);
    socket_of(&server);
    let before = sorted(server.workers());
    let addr = server.addr;
    let keep_alive = std::thread::spawn(move || wrk(addr, &["-c8", "-d3s"]));
    let close = std::thread::spawn(move || wrk(addr, &["-c8", "-d3s", "-H", "Connection: close"]));
    std::thread::sleep(Duration::from_millis(500)); // load is running (wrk has no readiness signal)
    let (code, out, err) = ctl(&dir, &["reload"]);
    assert_eq!(code, 0, "reload failed: {err}");
    assert!(out.contains("2 worker"), "{out}");
    // Done means done: the new workers serve and the old ones are gone or going.
    let s = status(&dir, &[]);
    let now = ready_pids(&s);
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|p| !before.contains(p)), "new pids: {before:?} -> {now:?}");
    for report in [keep_alive.join().unwrap(), close.join().unwrap()] {
        assert!(report.requests > 0);
        assert_eq!(report.errors, [0; 4], "{}", report.output);
        assert_eq!(report.non2xx, 0, "{}", report.output);
    }
}

#[test]
fn a_bad_deploy_makes_reload_exit_1_and_the_old_workers_serve_on() {
    let dir = TempDir::new("ctl-bad");
    let marker = dir.0.join("bad-deploy");
    let server = start(&dir, "hello", 2, &[("HELLO_FAIL_IF_EXISTS", marker.to_str().unwrap())]);
    socket_of(&server);
    let before = sorted(server.workers());
    std::fs::write(&marker, b"bad").unwrap();
    let (code, _, err) = ctl(&dir, &["reload"]);
    assert_eq!(code, 1, "a failed reload fails: {err}");
    assert!(err.contains("worker 1"), "says which worker and why: {err}");
    assert_eq!(sorted(server.workers()), before, "the old workers keep serving");
    for _ in 0..10 {
        assert_eq!(server.get("/").status, 200);
    }
    std::fs::remove_file(&marker).unwrap();
    let (code, _, err) = ctl(&dir, &["reload"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn stop_returns_once_the_master_is_gone_and_its_files_with_it() {
    let dir = TempDir::new("ctl-stop");
    let pid_file = dir.0.join("hello.pid");
    let mut server = start(&dir, "hello", 2, &[("CLUSTER_PID_FILE", pid_file.to_str().unwrap())]);
    let socket = socket_of(&server);
    let written = std::fs::read_to_string(&pid_file).expect("the pid file");
    assert_eq!(written.trim(), server.pid().to_string());
    assert!(
        std::fs::symlink_metadata(&socket).unwrap().permissions().mode() & 0o777 == 0o600,
        "the socket is the user's only"
    );
    assert_eq!(std::fs::metadata(socket.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
    let workers = server.workers();
    let (code, _, err) = ctl(&dir, &["stop"]);
    assert_eq!(code, 0, "{err}");
    assert!(!alive(server.pid()) || server.wait_exit(Duration::from_millis(10)).is_some());
    assert_eq!(server.wait_exit(T).and_then(|s| s.code()), Some(0));
    assert!(workers.iter().all(|p| !alive(*p)));
    assert!(!socket.exists(), "the socket file is removed");
    assert!(!pid_file.exists(), "the pid file is removed");
}

#[test]
fn ls_lists_every_master_and_targets_pick_one() {
    let dir = TempDir::new("ctl-ls");
    // A socket file of a master that is gone: removed when the next master starts.
    let stale = dir.0.join("cluster").join("old-4194303.sock");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::set_permissions(stale.parent().unwrap(), std::fs::Permissions::from_mode(0o700)).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let a = start(&dir, "alpha", 1, &[]);
    let mut b = start(&dir, "beta", 1, &[]);
    socket_of(&a);
    socket_of(&b);
    assert!(!stale.exists(), "the stale socket was removed");

    let (code, out, err) = ctl(&dir, &["ls", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    let mut seen: Vec<(String, u64)> =
        list.iter().map(|m| (m["name"].as_str().unwrap().to_string(), m["pid"].as_u64().unwrap())).collect();
    seen.sort();
    assert_eq!(seen, [("alpha".to_string(), u64::from(a.pid())), ("beta".to_string(), u64::from(b.pid()))]);
    let (code, table, _) = ctl(&dir, &["ls"]);
    assert_eq!(code, 0);
    assert!(table.contains("alpha") && table.contains("beta"), "{table}");

    let (code, _, err) = ctl(&dir, &["status"]);
    assert_eq!(code, 1, "two masters and no target: {err}");
    assert_eq!(status(&dir, &["-t", "alpha"])["master"]["pid"].as_u64(), Some(u64::from(a.pid())));
    let pid = b.pid().to_string();
    assert_eq!(status(&dir, &["-t", &pid])["master"]["name"], "beta");
    let socket = socket_of(&a);
    assert_eq!(status(&dir, &["-s", socket.to_str().unwrap()])["master"]["name"], "alpha");
    assert_eq!(ctl(&dir, &["-t", "gamma", "status"]).0, 1);

    // A fast stop of one leaves the other alone.
    let (code, _, err) = ctl(&dir, &["-t", "beta", "stop", "--fast"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(b.wait_exit(T).and_then(|s| s.code()), Some(0));
    assert_eq!(status(&dir, &[])["master"]["name"], "alpha", "the only one left needs no target");
}

/// Connects to a control socket and reads the greeting.
fn connect(path: &Path) -> (BufReader<UnixStream>, UnixStream) {
    let stream = UnixStream::connect(path).expect("connect");
    stream.set_read_timeout(Some(T)).unwrap();
    let writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let greeting = read_line(&mut reader).expect("a greeting");
    assert_eq!(greeting["cluster"], "control");
    assert_eq!(greeting["version"], 1);
    (reader, writer)
}

fn read_line(reader: &mut BufReader<UnixStream>) -> Option<Value> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(serde_json::from_str(&line).expect("a JSON line")),
    }
}

#[test]
fn bad_clients_disturb_neither_the_master_nor_other_clients() {
    let dir = TempDir::new("ctl-bad-clients");
    let server = start(&dir, "hello", 2, &[]);
    let socket = socket_of(&server);

    // Garbage: an error, and that connection closes.
    let (mut r, mut w) = connect(&socket);
    w.write_all(b"this is not json\n").unwrap();
    let reply = read_line(&mut r).expect("an error reply");
    assert_eq!(reply["ok"], false);
    assert!(read_line(&mut r).is_none(), "the connection is closed");

    // An unknown command is an error; the connection stays usable.
    let (mut r, mut w) = connect(&socket);
    w.write_all(b"{\"cmd\":\"frobnicate\"}\n{\"cmd\":\"ping\"}\n").unwrap();
    assert_eq!(read_line(&mut r).unwrap()["ok"], false);
    assert_eq!(read_line(&mut r).unwrap()["ok"], true);

    // A 10 MiB line: refused after the limit, the connection closed.
    let (mut r, mut w) = connect(&socket);
    let big = vec![b'x'; 10 << 20];
    let _ = w.write_all(&big); // the master may close before it has read it all
    let reply = read_line(&mut r).expect("an error reply");
    assert_eq!(reply["ok"], false);

    // Followers that never read, while the master logs a lot.
    let mut silent = Vec::new();
    for _ in 0..4 {
        let (r, mut w) = connect(&socket);
        w.write_all(b"{\"cmd\":\"logs\",\"lines\":2000,\"follow\":true}\n").unwrap();
        silent.push((r, w));
    }
    // Clients that connect and say nothing.
    let idle: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(&socket).unwrap()).collect();
    for n in [3, 2, 3, 2] {
        assert_eq!(ctl(&dir, &["scale", &n.to_string()]).0, 0);
    }
    wait_for(T, "two workers", || (server.workers().len() == 2).then_some(()));
    let start = std::time::Instant::now();
    let s = status(&dir, &[]);
    assert_eq!(ready_pids(&s).len(), 2);
    assert!(start.elapsed() < Duration::from_secs(2), "status took {:?}", start.elapsed());
    for _ in 0..20 {
        assert_eq!(server.get("/").status, 200);
    }
    drop((silent, idle));
    assert_eq!(ctl(&dir, &["reload"]).0, 0);
}

#[test]
fn another_user_is_refused() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run clusterctl as another user (setpriv)");
        return;
    }
    let dir = TempDir::new("ctl-uid");
    // A socket where everyone may connect (0777 directory, socket made 0666 below), so that
    // only the peer-credential check stands between another user and the master.
    let open_dir = dir.0.join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = open_dir.join("ctl.sock");
    let server = start(&dir, "hello", 1, &[("CLUSTER_CONTROL_SOCKET", path.to_str().unwrap())]);
    socket_of(&server);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    // nobody must be able to run the binary: a copy in the open directory.
    let ctl_copy = open_dir.join("clusterctl");
    std::fs::copy(integration_tests::example_bin("clusterctl"), &ctl_copy).unwrap();
    std::fs::set_permissions(&ctl_copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&ctl_copy)
        .args(["-s", path.to_str().unwrap(), "status"])
        .output()
        .expect("run setpriv");
    assert_eq!(out.status.code(), Some(1), "refused: {}", String::from_utf8_lossy(&out.stderr));
    let refused = server.wait_event("control_refused", T, |_| true);
    assert_eq!(refused["uid"], 65534);
    // The master and its own user are fine.
    assert_eq!(status(&dir, &["-s", path.to_str().unwrap()])["ok"], true);
}

fn scrape(text: &str) -> HashMap<String, f64> {
    // Strictly: every sample line is `name{labels} value`, under a HELP and a TYPE.
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split_whitespace().next().unwrap().to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(typed.contains(name), "{name} has no TYPE line");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{name}");
    }
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text");
    let mut out = HashMap::new();
    for s in parsed.samples {
        let value = match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        *out.entry(format!("{}{{{}}}", s.metric, labels.join(","))).or_default() += value;
        *out.entry(s.metric).or_default() += value;
    }
    out
}

#[test]
fn metrics_parse_and_move_and_the_admin_endpoint_answers_probes() {
    let dir = TempDir::new("ctl-metrics");
    let server = start(&dir, "hello", 2, &[("CLUSTER_ADMIN_ADDR", "127.0.0.1:0")]);
    socket_of(&server);
    let admin: std::net::SocketAddr =
        server.wait_event("admin", T, |_| true)["addr"].as_str().unwrap().parse().unwrap();

    let (code, text, _) = ctl(&dir, &["metrics"]);
    assert_eq!(code, 0);
    let before = scrape(&text);
    assert_eq!(before["cluster_workers{state=ready}"], 2.0);
    assert_eq!(before["cluster_workers_target"], 2.0);
    assert_eq!(before["cluster_reloads_total{outcome=done}"], 0.0);
    for _ in 0..20 {
        assert_eq!(server.get("/").status, 200);
    }
    assert_eq!(ctl(&dir, &["reload"]).0, 0);
    let after = scrape(&ctl(&dir, &["metrics"]).1);
    assert_eq!(after["cluster_reloads_total{outcome=done}"], 1.0);
    assert!(after["cluster_connections_acknowledged_total"] >= 20.0, "{after:?}");
    assert!(after["cluster_connections_dispatched_total"] >= after["cluster_connections_acknowledged_total"]);
    assert_eq!(after["cluster_worker_exits_total{kind=retired}"], 2.0);
    assert!(after["cluster_worker_rss_bytes"] > 0.0);

    // The admin endpoint: probes and the same metrics.
    assert_eq!(get(admin, "/healthz").unwrap().status, 200);
    let ready = get(admin, "/readyz").unwrap();
    assert_eq!(ready.status, 200, "{}", ready.body);
    let over_http = get(admin, "/metrics").unwrap();
    assert_eq!(over_http.status, 200);
    assert_eq!(scrape(&over_http.body)["cluster_reloads_total{outcome=done}"], 1.0);
    assert_eq!(get(admin, "/nothing").unwrap().status, 404);
}

#[test]
fn logs_show_recent_events_follow_new_ones_and_carry_captured_worker_output() {
    let dir = TempDir::new("ctl-logs");
    let server = start(&dir, "hello", 2, &[("CLUSTER_LOG_CAPTURE", "1")]);
    socket_of(&server);
    // Captured output: each worker's lines on the master's stdout, prefixed.
    let out = server.stdout();
    assert!(out.lines().any(|l| l.starts_with("worker 1 | ")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("worker 2 | ")), "{out}");

    let (code, text, _) = ctl(&dir, &["logs", "-n", "50", "--json"]);
    assert_eq!(code, 0);
    let records: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON record")).collect();
    assert!(records.iter().any(|r| r["event"] == "fork"), "{text}");
    assert!(records.iter().any(|r| r["event"] == "output" && r["id"] == 1), "{text}");

    let mut follower = std::process::Command::new(integration_tests::example_bin("clusterctl"))
        .args(["logs", "-f", "-n", "0", "--json"])
        .env("XDG_RUNTIME_DIR", &dir.0)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The follower is connected once the master has a second client... poll by acting until
    // a record of the action arrives.
    let replaced = wait_for(T, "the follower to see a restart", || {
        assert_eq!(ctl(&dir, &["restart", "2"]).0, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            let record: Value = serde_json::from_str(&line).expect("a JSON record");
            if record["event"] == "replaced" && record["id"] == 2 {
                return Some(record);
            }
        }
        None
    });
    assert!(replaced["pid"].is_u64());
    let _ = follower.kill();
    let _ = follower.wait();
}

#[test]
fn status_shows_what_a_retiring_worker_still_holds_and_when_it_will_be_killed() {
    let dir = TempDir::new("ctl-retiring");
    let server = start(&dir, "hello", 1, &[("CLUSTER_KILL_TIMEOUT_MS", "20000")]);
    let old = server.workers()[0];
    // A request that outlives the worker's stop.
    let addr = server.addr;
    let slow = std::thread::spawn(move || get(addr, "/sleep?ms=4000"));
    wait_until(T, "the slow request to be counted", || {
        let s = status(&dir, &[]);
        let open = s["workers"][0]["connections_open"].as_u64().unwrap_or(0);
        if open >= 1 { Ok(()) } else { Err(format!(": {s}")) }
    });
    server.signal(libc::SIGHUP);
    let retiring = wait_until(T, "the old worker to be retiring", || {
        let s = status(&dir, &[]);
        let w = s["workers"].as_array().unwrap().iter().find(|w| w["pid"] == old).cloned();
        match w {
            Some(w) if w["state"] == "stopping" => Ok(w),
            _ => Err(format!(": {s}")),
        }
    });
    let kill_in = retiring["kill_in_ms"].as_u64().expect("kill_in_ms");
    assert!(kill_in > 10_000 && kill_in <= 20_000, "{retiring}");
    assert!(retiring["connections_open"].as_u64() >= Some(1), "the slow request's connection: {retiring}");
    let (code, table, _) = ctl(&dir, &["status"]);
    assert_eq!(code, 0);
    assert!(table.contains("killed in"), "{table}");
    assert_eq!(slow.join().unwrap().unwrap().status, 200, "the slow request was answered");
}

/// HAProxy's agent check on the admin port: what it is told.
fn agent_check(admin: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"agent\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn a_stop_delay_turns_the_master_unready_at_once_and_serves_until_it_drains() {
    let dir = TempDir::new("ctl-stop-delay");
    let mut server =
        start(&dir, "hello", 2, &[("CLUSTER_ADMIN_ADDR", "127.0.0.1:0"), ("CLUSTER_STOP_DELAY_MS", "1500")]);
    socket_of(&server);
    let admin: std::net::SocketAddr =
        server.wait_event("admin", T, |_| true)["addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(get(admin, "/readyz").unwrap().status, 200);
    assert_eq!(agent_check(admin), "ready up 100%\n");

    let asked = std::time::Instant::now();
    server.signal(libc::SIGTERM);
    wait_for(Duration::from_secs(1), "/readyz to answer 503", || {
        (get(admin, "/readyz").unwrap().status == 503).then_some(())
    });
    assert!(asked.elapsed() < Duration::from_millis(1000), "not ready only after {:?}", asked.elapsed());
    assert_eq!(agent_check(admin), "drain #stopping\n");
    let s = status(&dir, &[]);
    assert_eq!(s["master"]["stopping"], true);
    let left = s["master"]["stop_in_ms"].as_u64().expect("stop_in_ms while the delay runs");
    assert!(left <= 1500, "{left}");
    assert!(ctl(&dir, &["status"]).1.contains(" · stopping in "));
    // New connections are still served, until the delay is over.
    let mut served = 0;
    while asked.elapsed() < Duration::from_millis(1200) {
        assert_eq!(server.get("/").status, 200, "refused {:?} into the stop delay", asked.elapsed());
        served += 1;
    }
    assert!(served > 0);
    let status = server.wait_exit(T).expect("the master exits after the delay and the drain");
    assert!(status.success(), "{status:?}");
    assert!(asked.elapsed() >= Duration::from_millis(1500), "exited {:?} after SIGTERM", asked.elapsed());
}

#[test]
fn ctrl_c_and_a_second_sigterm_skip_the_stop_delay() {
    for (first, second) in [(libc::SIGINT, None), (libc::SIGTERM, Some(libc::SIGTERM))] {
        let dir = TempDir::new("ctl-stop-skip");
        let mut server =
            start(&dir, "hello", 2, &[("CLUSTER_ADMIN_ADDR", "127.0.0.1:0"), ("CLUSTER_STOP_DELAY_MS", "60000")]);
        socket_of(&server);
        let asked = std::time::Instant::now();
        server.signal(first);
        if let Some(second) = second {
            server.wait_event("stop", T, |e| e["kind"] == "delayed");
            server.signal(second);
        }
        let status = server.wait_exit(T).expect("the master exits well before the 60 s delay");
        assert!(status.success(), "{status:?}");
        assert!(asked.elapsed() < Duration::from_secs(10), "{first}: {:?}", asked.elapsed());
    }
}
