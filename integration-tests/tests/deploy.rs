//! Deployment with the real tools: systemd's socket activation (`systemd-socket-activate`),
//! its notification protocol (a datagram socket of the test's own as `NOTIFY_SOCKET`), the
//! SIGTERM systemd sends to a whole control group, workers running as another user
//! (`CLUSTER_USER`), the master as PID 1 of a new PID namespace (`unshare`), and the unit files
//! and manifests in `deploy/`.

use std::ffi::OsStr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::{Server, TempDir, alive, children, closed_loop, example_bin, get, wait_for};

const T: Duration = Duration::from_secs(20);
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A free port on 127.0.0.1 (bound to 0, then released for the tool under test to bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Messages on a datagram socket of the test's own, as systemd's notify socket receives them.
fn notify_socket(dir: &TempDir) -> (String, mpsc::Receiver<(Instant, String)>) {
    let path = dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            if tx.send((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned())).is_err() {
                return;
            }
        }
    });
    (path.to_str().unwrap().to_string(), rx)
}

/// The next notification (watchdog pings aside) that contains `what`, within `T`.
fn expect(rx: &mpsc::Receiver<(Instant, String)>, what: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, msg) = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no {what} within {T:?}; got {seen:?}"));
        if msg.trim() != "WATCHDOG=1" {
            seen.push(msg.clone());
        }
        if msg.lines().any(|l| l == what) {
            return msg;
        }
    }
}

/// What `hello` gets under `systemd-socket-activate` (the tool passes only these): the notify
/// socket, a 400 ms watchdog, 2 workers, JSON logs, no control socket, the address.
fn activation_vars(notify: &str, port: u16) -> Vec<String> {
    vec![
        format!("NOTIFY_SOCKET={notify}"),
        "WATCHDOG_USEC=400000".into(),
        "CLUSTER_WORKERS=2".into(),
        "CLUSTER_LOG_FORMAT=json".into(),
        "CLUSTER_CONTROL_SOCKET=off".into(),
        "HOST=127.0.0.1".into(),
        format!("PORT={port}"),
    ]
}

/// `hello` under `systemd-socket-activate`, listening on `listen` (named `fdnames`), with
/// `vars` (the tool passes only the variables named with -E).
fn socket_activate(listen: &[&str], fdnames: Option<&str>, vars: &[String]) -> Server {
    let hello = example_bin("hello");
    let names = fdnames.map(|n| format!("--fdname={n}"));
    let mut args: Vec<&OsStr> = names.iter().map(OsStr::new).collect();
    for l in listen {
        args.extend([OsStr::new("-l"), OsStr::new(l)]);
    }
    for v in vars {
        args.extend([OsStr::new("-E"), OsStr::new(v)]);
    }
    args.push(hello.as_os_str());
    Server::spawn_with(OsStr::new("systemd-socket-activate"), &args, &[])
}

#[test]
fn under_socket_activation_the_master_serves_the_passed_socket_and_notifies_systemd() {
    if !have("systemd-socket-activate") {
        eprintln!("skipped: systemd-socket-activate is missing (Debian package systemd)");
        return;
    }
    let dir = TempDir::new("socket-activation");
    let (notify, rx) = notify_socket(&dir);
    let port = free_port();
    let vars = activation_vars(&notify, port);
    let listen = format!("127.0.0.1:{port}");
    // A second socket that no worker binds: adopted by nobody, and said so.
    let unused = format!("127.0.0.1:{}", free_port());
    let mut server = socket_activate(&[&listen, &unused], Some("web:spare"), &vars);
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    // The tool starts the service on the first connection: that client waits in the passed
    // socket's queue while the master starts, and is served.
    let first = wait_for(T, "the socket to be passed", || get(addr, "/worker").ok());
    assert_eq!(first.status, 200);
    let bind = server.wait_event("bind", T, |e| e["inherited"] == true);
    assert_eq!(bind["addr"], format!("tcp {listen}"));
    assert!(server.events("bind").iter().all(|(_, e)| e["inherited"] == true), "nothing else was bound");
    let spare = server.wait_event("inherited_unused", T, |_| true);
    assert_eq!(
        (spare["addr"].as_str(), spare["name"].as_str()),
        (Some(format!("tcp {unused}").as_str()), Some("spare"))
    );

    let mut seen = Vec::new();
    let ready = expect(&rx, "READY=1", &mut seen);
    assert!(ready.contains(&format!("MAINPID={}", server.pid())), "{ready}");
    // Workers see none of systemd's variables.
    for pid in children(server.pid()) {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let env = String::from_utf8_lossy(&env);
        for var in ["NOTIFY_SOCKET=", "LISTEN_FDS=", "LISTEN_PID=", "LISTEN_FDNAMES=", "WATCHDOG_USEC="] {
            assert!(!env.split('\0').any(|e| e.starts_with(var)), "worker {pid} has {var}");
        }
    }

    // Watchdog pings at half of WATCHDOG_USEC (200 ms), from the supervisor loop.
    while rx.try_recv().is_ok() {}
    let window = Instant::now();
    let mut pings = Vec::new();
    while window.elapsed() < Duration::from_millis(1500) {
        if let Ok((at, msg)) = rx.recv_timeout(Duration::from_millis(100))
            && msg.lines().any(|l| l == "WATCHDOG=1")
        {
            pings.push(at);
        }
    }
    // 7 or 8 expected; a loaded machine (other tests run beside this one) may delay some.
    assert!((4..=10).contains(&pings.len()), "{} pings in 1.5 s at a 200 ms period", pings.len());
    for gap in pings.windows(2).map(|w| w[1] - w[0]) {
        // Never faster than the period; late by at most a loaded scheduler's hiccup.
        assert!(gap >= Duration::from_millis(150) && gap <= Duration::from_millis(800), "ping gap {gap:?}");
    }

    // A reload: RELOADING=1 with the time, then READY=1 when it is done.
    server.signal(libc::SIGHUP);
    let reloading = expect(&rx, "RELOADING=1", &mut seen);
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading}");
    expect(&rx, "READY=1", &mut seen);
    server.wait_events("reload_done", 1, T);
    assert_eq!(get(addr, "/").unwrap().status, 200);

    server.signal(libc::SIGTERM);
    expect(&rx, "STOPPING=1", &mut seen);
    assert_eq!(server.wait_exit(T).and_then(|s| s.code()), Some(0));
    let order: Vec<&str> =
        seen.iter().flat_map(|m| m.lines()).filter(|l| ["READY=1", "RELOADING=1", "STOPPING=1"].contains(l)).collect();
    assert_eq!(order, ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]);
}

#[test]
fn sigterm_to_the_whole_control_group_under_load_fails_no_request() {
    // systemd's default KillMode=control-group: every process gets SIGTERM at once.
    for round in 0..3 {
        let mut server = Server::start("hello", &[("CLUSTER_WORKERS", "2"), ("CLUSTER_KILL_TIMEOUT_MS", "5000")], 2);
        let master = server.pid();
        let (answered, load) = closed_loop(server.addr, 16, move || !alive(master));
        wait_for(T, "load to run", || (answered.load(Ordering::Relaxed) > 1000).then_some(()));
        server.signal_group(libc::SIGTERM);
        assert_eq!(server.wait_exit(T).and_then(|s| s.code()), Some(0), "round {round}");
        let report = load.join().unwrap();
        assert!(report.ok > 100, "round {round}: {report:?}");
        assert_eq!(report.failed, 0, "round {round}: {report:?}\n{}", server.stderr());
        assert_eq!(server.events("fork").len(), 2, "round {round}: a worker was started during the stop");
    }
}

#[test]
fn workers_run_as_cluster_user_and_the_master_stays_root() {
    let mut bad = Server::spawn(example_bin("hello"), &[("CLUSTER_USER", "no-such-user-here")]);
    assert_eq!(bad.wait_exit(T).and_then(|s| s.code()), Some(2), "an unknown user stops everything at once");
    assert!(bad.stderr().contains("no-such-user-here"), "says which: {}", bad.stderr());
    assert!(bad.events("fork").is_empty());
    if !root() {
        eprintln!("skipped the rest: needs root to run workers as another user");
        return;
    }
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2"), ("CLUSTER_USER", "nobody")], 2);
    let ids = |pid: u32, field: &str| -> Vec<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap().to_string();
        line.split_whitespace().skip(1).map(str::to_string).collect()
    };
    let workers = server.workers();
    assert_eq!(workers.len(), 2);
    for pid in &workers {
        assert_eq!(ids(*pid, "Uid:"), ["65534"; 4], "worker {pid}");
        assert_eq!(ids(*pid, "Gid:"), ["65534"; 4], "worker {pid}");
        assert_eq!(ids(*pid, "Groups:"), ["65534"], "worker {pid}: nobody's groups only");
    }
    assert_eq!(ids(server.pid(), "Uid:"), ["0"; 4], "the master stays root");
    for _ in 0..10 {
        assert_eq!(server.get("/").status, 200);
    }
    // A crash is replaced by a worker that is again unprivileged.
    integration_tests::kill(workers[0], libc::SIGKILL);
    wait_for(T, "a replacement", || {
        let now = server.workers();
        (now.len() == 2 && !now.contains(&workers[0])).then_some(now)
    })
    .iter()
    .for_each(|pid| assert_eq!(ids(*pid, "Uid:"), ["65534"; 4]));
}

#[test]
fn as_pid_1_of_a_pid_namespace_the_master_reaps_orphans_and_stops_on_sigterm() {
    if !root() || !have("unshare") {
        eprintln!("skipped: needs root and unshare (util-linux) for a new PID namespace");
        return;
    }
    let hello = example_bin("hello");
    let args = [OsStr::new("--pid"), OsStr::new("--fork"), OsStr::new("--mount-proc"), hello.as_os_str()];
    let env = [("CLUSTER_WORKERS", "2"), ("HELLO_DEBUG", "1"), ("CLUSTER_CONTROL_SOCKET", "off")];
    let mut server = Server::spawn_with(OsStr::new("unshare"), &args, &env);
    let addr = wait_for(T, "workers to listen", || {
        let out = server.stdout();
        let addrs: Vec<&str> = out.lines().filter_map(|l| l.split("listening on http://").nth(1)).collect();
        (addrs.len() >= 2).then(|| addrs[0].trim().parse::<std::net::SocketAddr>().unwrap())
    });
    server.addr = addr;
    // The namespace's PID 1 (the unshare's child) is our init; the master is its child.
    let init = wait_for(T, "the namespace's init", || children(server.pid()).first().copied());
    let masters = children(init);
    assert_eq!(masters.len(), 1, "init runs one master");
    for round in 0..3 {
        // A worker leaves an orphan that exits 200 ms later: PID 1 must reap it.
        let orphan = server.get("/orphan?ms=200").body.trim().to_string();
        assert!(orphan.parse::<u32>().is_ok(), "an orphan's pid: {orphan:?}");
        wait_for(T, "the orphan to be reaped, not left a zombie", || {
            let state = server.get(&format!("/pidstate?pid={orphan}")).body.trim().to_string();
            assert_ne!(state, "", "round {round}");
            (state == "gone").then_some(())
        });
    }
    integration_tests::kill(init, libc::SIGTERM);
    let status = server.wait_exit(T).expect("the namespace ends");
    assert_eq!(status.code(), Some(0), "{}", server.stderr());
    assert!(server.events("stop").iter().any(|(_, e)| e["kind"] == "graceful"));
}

#[test]
fn under_systemd_an_upgrade_keeps_the_passed_socket_and_moves_mainpid() {
    if !have("systemd-socket-activate") {
        eprintln!("skipped: systemd-socket-activate is missing (Debian package systemd)");
        return;
    }
    let dir = TempDir::new("socket-activation-upgrade");
    let (notify, rx) = notify_socket(&dir);
    let port = free_port();
    let vars = activation_vars(&notify, port);
    let listen = format!("127.0.0.1:{port}");
    let mut server = socket_activate(&[&listen], None, &vars);
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    wait_for(T, "the socket to be passed", || get(addr, "/").ok());
    let mut seen = Vec::new();
    expect(&rx, "READY=1", &mut seen);
    let inode = integration_tests::listening_inode(port).expect("the passed socket");

    server.signal(libc::SIGUSR2);
    let new = server.wait_event("upgraded", T, |_| true)["pid"].as_u64().unwrap() as u32;
    let _strays = integration_tests::Strays(vec![new]);
    // The old master names the new one (NotifyAccess=main accepts that), and the new one says
    // it is ready, with its pid (NotifyAccess=all).
    let main_pid = format!("MAINPID={new}");
    let (mut named, mut ready) = (false, false);
    while !(named && ready) {
        let msg = expect(&rx, &main_pid, &mut seen);
        named |= msg.trim() == main_pid;
        ready |= msg.lines().any(|l| l == "READY=1");
    }
    // The old master retires without a word: no STOPPING=1, which would stop the service.
    assert_eq!(server.wait_exit(T).and_then(|s| s.code()), Some(0), "the old master exits 0");
    while let Ok((_, msg)) = rx.try_recv() {
        assert!(!msg.lines().any(|l| l == "STOPPING=1"), "{msg}");
        seen.push(msg);
    }
    assert_eq!(integration_tests::listening_inode(port), Some(inode), "the very socket systemd passed");
    assert_eq!(get(addr, "/").unwrap().status, 200);
    // The new master keeps the watchdog fed.
    let mut pings = 0;
    while pings < 2 {
        let (_, msg) = rx.recv_timeout(T).expect("watchdog pings from the new master");
        pings += usize::from(msg.lines().any(|l| l == "WATCHDOG=1"));
    }
    integration_tests::kill(new, libc::SIGTERM);
    expect(&rx, "STOPPING=1", &mut seen);
    wait_for(T, "the new master to exit", || (!integration_tests::alive(new)).then_some(()));
}

#[test]
fn as_pid_1_an_upgraded_master_takes_the_old_ones_place_under_init() {
    if !root() || !have("unshare") {
        eprintln!("skipped: needs root and unshare (util-linux) for a new PID namespace");
        return;
    }
    let hello = example_bin("hello");
    let args = [OsStr::new("--pid"), OsStr::new("--fork"), OsStr::new("--mount-proc"), hello.as_os_str()];
    let env = [("CLUSTER_WORKERS", "2"), ("CLUSTER_CONTROL_SOCKET", "off")];
    let mut server = Server::spawn_with(OsStr::new("unshare"), &args, &env);
    server.addr = wait_for(T, "workers to listen", || {
        let out = server.stdout();
        let addrs: Vec<&str> = out.lines().filter_map(|l| l.split("listening on http://").nth(1)).collect();
        (addrs.len() >= 2).then(|| addrs[0].trim().parse::<std::net::SocketAddr>().unwrap())
    });
    let init = wait_for(T, "the namespace's init", || children(server.pid()).first().copied());
    let old = children(init);
    assert_eq!(old.len(), 1, "init runs one master");
    integration_tests::kill(old[0], libc::SIGUSR2);
    server.wait_events("upgraded", 1, T);
    // The old master exits; the new one, its orphan, is init's child now, and the namespace
    // (whose life is init's) goes on.
    let new = wait_for(T, "the new master to be init's only child", || {
        let kids = children(init);
        (kids.len() == 1 && kids[0] != old[0]).then(|| kids[0])
    });
    assert_eq!(server.get("/").status, 200, "the namespace lives on");
    // Signals to init reach the new master, and its exit status is the namespace's.
    integration_tests::kill(init, libc::SIGTERM);
    let status = server.wait_exit(T).expect("the namespace ends");
    assert_eq!(status.code(), Some(0), "{}", server.stderr());
    assert!(!integration_tests::alive(new));
    let stops: Vec<_> = server.events("stop").into_iter().filter(|(_, e)| e["kind"] == "graceful").collect();
    assert_eq!(stops.len(), 2, "the old master retired, then the new one stopped on SIGTERM");
}

#[test]
fn the_systemd_units_verify() {
    if !have("systemd-analyze") {
        eprintln!("skipped: systemd-analyze is missing (Debian package systemd)");
        return;
    }
    let dir = TempDir::new("units");
    // The unit points at the installed binary; verify checks that it exists.
    let service = std::fs::read_to_string(format!("{ROOT}/deploy/systemd/hello.service")).unwrap();
    let service = service.replace("/usr/local/bin/hello", example_bin("hello").to_str().unwrap());
    std::fs::write(dir.0.join("hello.service"), service).unwrap();
    std::fs::copy(format!("{ROOT}/deploy/systemd/hello.socket"), dir.0.join("hello.socket")).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args([dir.0.join("hello.socket"), dir.0.join("hello.service")])
        .output()
        .unwrap();
    let version = std::process::Command::new("systemd-analyze").arg("--version").output().unwrap();
    let version: u32 =
        String::from_utf8_lossy(&version.stdout).split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let complaints: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| !l.trim().is_empty())
        // Type=notify-reload and ReloadSignal= came with systemd 253.
        .filter(|l| !(version < 253 && (l.contains("notify-reload") || l.contains("ReloadSignal"))))
        .map(str::to_string)
        .collect();
    assert!(out.status.success() && complaints.is_empty(), "systemd {version}: {complaints:#?}");
    let text = std::fs::read_to_string(format!("{ROOT}/deploy/systemd/hello.service")).unwrap();
    for needed in ["Type=notify-reload", "KillMode=mixed", "WatchdogSec=", "RuntimeDirectory=", "NotifyAccess=all"] {
        assert!(text.lines().any(|l| l.starts_with(needed)), "hello.service lacks {needed}");
    }
    // systemd's SIGKILL comes after the stop delay and the kill timeout, not during them.
    let ms = |key: &str| -> u64 {
        let found = text.lines().filter(|l| l.starts_with("Environment=")).flat_map(|l| l[12..].split_whitespace());
        found.filter_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok()).next().unwrap_or(0)
    };
    let stop_s: u64 = text.lines().find_map(|l| l.strip_prefix("TimeoutStopSec=")?.parse().ok()).unwrap();
    assert!(ms("CLUSTER_STOP_DELAY_MS") > 0, "hello.service sets no stop delay");
    assert!(stop_s * 1000 > ms("CLUSTER_STOP_DELAY_MS") + ms("CLUSTER_KILL_TIMEOUT_MS"), "TimeoutStopSec too short");
}

#[test]
fn the_kubernetes_manifests_parse_and_carry_probes_grace_and_resources() {
    use serde_yaml::Value;
    let read = |f: &str| -> Value {
        serde_yaml::from_str(&std::fs::read_to_string(Path::new(ROOT).join("deploy/kubernetes").join(f)).unwrap())
            .unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let d = read("deployment.yaml");
    assert_eq!(d["kind"], "Deployment");
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(c["resources"]["requests"]["cpu"].is_string() && c["resources"]["limits"]["memory"].is_string());
    let env = |name: &str| -> String {
        c["env"].as_sequence().unwrap().iter().find(|e| e["name"] == name).unwrap()["value"].as_str().unwrap().into()
    };
    let kill_timeout_s = env("CLUSTER_KILL_TIMEOUT_MS").parse::<u64>().unwrap() / 1000;
    // The stop delay lets endpoints update (what a preStop sleep is for): as long as theirs.
    let stop_delay_s = env("CLUSTER_STOP_DELAY_MS").parse::<u64>().unwrap() / 1000;
    assert!(stop_delay_s >= 5, "a stop delay of {stop_delay_s} s is shorter than endpoints take to update");
    let pre_stop_s = c["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap_or(0);
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > pre_stop_s + stop_delay_s + kill_timeout_s,
        "grace {grace} s must exceed preStop {pre_stop_s} s + stop delay {stop_delay_s} s + kill timeout {kill_timeout_s} s"
    );
    assert!(env("CLUSTER_ADMIN_ADDR").ends_with(":9100"));
    let s = read("service.yaml");
    assert_eq!(s["kind"], "Service");
    assert_eq!(s["spec"]["selector"]["app"], d["spec"]["template"]["metadata"]["labels"]["app"]);
}

/// The manifests against the real Kubernetes API schema, unknown fields refused
/// (`kubernetes-validate --strict`, from PyPI; ./test.sh installs it).
#[test]
fn the_kubernetes_manifests_pass_the_api_schema_strictly() {
    let dir = Path::new(ROOT).join("deploy/kubernetes");
    let out = std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(["deployment.yaml", "service.yaml"])
        .current_dir(&dir)
        .output()
        .expect("run python3 -m kubernetes_validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate --strict failed (./test.sh installs it):\n{text}");
    assert_eq!(text.matches(" passed for resource ").count(), 2, "{text}");
}

#[test]
fn a_worker_signalled_alone_is_replaced_new_one_first() {
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
    let before = server.workers();
    integration_tests::kill(before[0], libc::SIGTERM);
    let event = server.wait_event("stop_asked", T, |_| true);
    assert_eq!(event["pid"], before[0]);
    server.wait_event("replaced", T, |e| e["old_pid"] == before[0]);
    wait_for(T, "the signalled worker to go", || (!alive(before[0])).then_some(()));
    assert_eq!(server.workers().len(), 2);
    assert!(server.workers().contains(&before[1]), "the other worker was left alone");
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn unix_socket_files_belong_to_the_workers_user() {
    if !root() {
        eprintln!("skipped: needs root to run workers as another user");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = TempDir::new("unix-owner");
    // A directory only root may write: the master (root) would be able to bind there, but a
    // worker's request gets no more than the worker could do itself.
    let closed = dir.0.join("root-only");
    std::fs::create_dir(&closed).unwrap();
    let path = closed.join("app.sock");
    let env = [("SOCKET_PATH", path.to_str().unwrap()), ("SOCKET_MODE", "660"), ("CLUSTER_USER", "nobody")];
    let refused = Server::spawn(env!("CARGO_BIN_EXE_unix-hello").into(), &env);
    let failed = refused.wait_event("listen_failed", T, |_| true);
    assert!(failed["error"].as_str().unwrap().contains("cannot create files"), "{failed}");
    assert!(!path.exists(), "no socket file was created");
    drop(refused);
    // A sticky world-writable directory, like /tmp: nobody may create files there.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let path = dir.0.join("app.sock");
    let env = [("SOCKET_PATH", path.to_str().unwrap()), ("SOCKET_MODE", "660"), ("CLUSTER_USER", "nobody")];
    let server = Server::spawn(env!("CARGO_BIN_EXE_unix-hello").into(), &env);
    wait_for(T, "both workers to listen", || {
        (server.stdout().matches("listening on unix:").count() == 2).then_some(())
    });
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "nobody owns the socket file, mode 660 means it");
    let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply).unwrap();
    assert!(reply.contains(':'), "{reply}");

    // A stale socket of another user in the shared directory: the master (root) could remove
    // it, the workers' user could not, so it is left alone.
    let theirs = dir.0.join("theirs.sock");
    drop(std::os::unix::net::UnixListener::bind(&theirs).unwrap());
    std::os::unix::fs::lchown(&theirs, Some(4242), Some(4242)).unwrap();
    let env = [("SOCKET_PATH", theirs.to_str().unwrap()), ("CLUSTER_USER", "nobody")];
    let other = Server::spawn(env!("CARGO_BIN_EXE_unix-hello").into(), &env);
    other.wait_event("listen_failed", T, |_| true);
    assert_eq!(std::fs::symlink_metadata(&theirs).unwrap().uid(), 4242, "their file is untouched");
}

#[test]
fn the_passed_socket_serves_under_shared_and_reuseport_too() {
    if !have("systemd-socket-activate") {
        eprintln!("skipped: systemd-socket-activate is missing (Debian package systemd)");
        return;
    }
    for policy in ["shared", "reuseport"] {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let vars = [
            format!("CLUSTER_SCHED_POLICY={policy}"),
            "CLUSTER_WORKERS=2".into(),
            "CLUSTER_LOG_FORMAT=json".into(),
            "CLUSTER_CONTROL_SOCKET=off".into(),
            "HOST=127.0.0.1".into(),
            format!("PORT={port}"),
        ];
        let mut server = socket_activate(&[&listen], None, &vars);
        let addr: std::net::SocketAddr = listen.parse().unwrap();
        wait_for(T, "the first request", || get(addr, "/").ok().filter(|r| r.status == 200));
        server.wait_events("ready", 2, T);
        let mut pids = std::collections::HashSet::new();
        for _ in 0..40 {
            pids.insert(integration_tests::parse_worker(&get(addr, "/worker").unwrap().body).1);
        }
        assert_eq!(pids.len(), 2, "{policy}: both workers serve the one passed socket");
        let binds = server.events("bind");
        assert_eq!(binds.len(), 1, "{policy}: one socket, the passed one: {binds:?}");
        assert_eq!(binds[0].1["inherited"], true);
        server.signal(libc::SIGTERM);
        assert_eq!(server.wait_exit(T).and_then(|s| s.code()), Some(0), "{policy}");
    }
}
