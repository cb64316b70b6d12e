//! Seeing a cluster live: `clusterctl top` driven in tmux against a cluster under load (every
//! worker shown, connections per second above 0, `+` scales, `r` reloads, an upgrade is
//! followed to the new master, `q` leaves the terminal as it was), the admin endpoint's status page rendered by headless Chromium (every
//! worker's pid put there by its script, nothing fetched from elsewhere), and the streams both
//! read (`watch` on the control socket, `/events` on the admin port).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{Server, Strays, TempDir, clusterctl, example_bin, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn start(dir: &TempDir, name: &str, workers: usize, env: &[(&str, &str)]) -> Server {
    let n = workers.to_string();
    let mut all = vec![("XDG_RUNTIME_DIR", dir.path()), ("CLUSTER_NAME", name), ("CLUSTER_WORKERS", n.as_str())];
    all.extend_from_slice(env);
    Server::start("hello", &all, workers)
}

fn status(dir: &TempDir, name: &str) -> Value {
    let (code, out, err) = clusterctl(&dir.0, &["-t", name, "status", "--json"]);
    assert_eq!(code, 0, "status: {err}");
    serde_json::from_str(&out).expect("status JSON")
}

fn ready_pids(s: &Value) -> Vec<u64> {
    let mut pids: Vec<u64> = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .filter_map(|w| w["pid"].as_u64())
        .collect();
    pids.sort_unstable();
    pids
}

/// New connections, one after another, until dropped: `conn/s` has something to count.
struct Load(std::sync::Arc<std::sync::atomic::AtomicBool>, Option<std::thread::JoinHandle<u64>>);

impl Load {
    fn on(addr: SocketAddr) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let until = Instant::now() + Duration::from_secs(120);
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                if integration_tests::get(addr, "/").is_ok() {
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        });
        Load(stop, Some(thread))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.1.take().map(std::thread::JoinHandle::join);
    }
}

/// A tmux server of the test's own (`-L`), killed when dropped.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run tmux ({e}); install it: apt-get install tmux"));
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }
    fn wait(&self, what: &str, mut f: impl FnMut(&str) -> bool) -> String {
        wait_until(T, what, || {
            let screen = self.screen();
            if f(&screen) { Ok(screen) } else { Err(format!("; the screen:\n{screen}")) }
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-L").arg(&self.0).arg("kill-server").status();
    }
}

/// The connections per second `top` shows in total.
fn total_rate(screen: &str) -> Option<u64> {
    screen.lines().find_map(|l| l.strip_prefix("conn/s")?.split_whitespace().next()?.parse().ok())
}

#[test]
fn top_in_tmux_shows_every_worker_live_and_its_keys_scale_reload_and_quit() {
    let dir = TempDir::new("top");
    let server = start(&dir, "top", 3, &[]);
    let _load = Load::on(server.addr);
    let pids = ready_pids(&status(&dir, "top"));
    assert_eq!(pids.len(), 3);

    let tmux = Tmux(format!("cluster-test-top-{}", std::process::id()));
    let ctl = example_bin("clusterctl");
    let command = format!(
        "env XDG_RUNTIME_DIR={} {} -t top top --interval 500; echo EXIT=$?; sleep 60",
        dir.path(),
        ctl.display()
    );
    tmux.run(&["new-session", "-d", "-x", "100", "-y", "30", "-s", "top", &command]);
    let screen = tmux.wait("every worker ready and connections counted", |s| {
        pids.iter().all(|p| s.lines().any(|l| l.contains(&p.to_string()) && l.contains("ready")))
            && total_rate(s).is_some_and(|r| r > 0)
    });
    assert!(screen.contains("top · master") && screen.contains("3/3 ready"), "{screen}");
    assert_eq!(tmux.run(&["display", "-p", "-t", "top", "#{alternate_on}"]).trim(), "1", "full screen");

    // `+`: a fourth worker.
    tmux.run(&["send-keys", "-t", "top", "+"]);
    wait_until(T, "4 workers ready", || {
        let s = status(&dir, "top");
        if ready_pids(&s).len() == 4 && s["master"]["workers_target"] == 4 { Ok(()) } else { Err(format!(": {s}")) }
    });
    tmux.wait("the scale's outcome and the fourth worker on screen", |s| {
        s.contains("workers: 3 -> 4") && s.contains("4/4 ready")
    });

    // `r`: every worker replaced.
    let before = ready_pids(&status(&dir, "top"));
    tmux.run(&["send-keys", "-t", "top", "r"]);
    let screen = tmux.wait("the reload's outcome", |s| s.contains("reloaded: 4 replaced"));
    let after = ready_pids(&status(&dir, "top"));
    assert_eq!(after.len(), 4);
    assert!(after.iter().all(|p| !before.contains(p)), "new pids: {before:?} -> {after:?}");
    tmux.wait("the new pids on screen", |s| after.iter().all(|p| s.contains(&p.to_string())));
    assert!(!screen.contains("refused") && !screen.contains("failed"), "{screen}");

    // An upgrade replaces the master the view streams from: it follows the new one.
    let mut masters = Strays::default();
    let (code, out, err) = clusterctl(&dir.0, &["-t", "top", "upgrade"]);
    assert_eq!(code, 0, "upgrade: {out}{err}");
    let new = status(&dir, "top")["master"]["pid"].as_u64().unwrap();
    masters.0.push(new as u32);
    assert_ne!(new, u64::from(server.pid()));
    tmux.wait("the new master on screen", |s| s.contains(&format!("top · master {new} ")));

    // `q`: exit 0, the terminal back to normal.
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let screen = tmux.wait("top to exit", |s| s.contains("EXIT="));
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert_eq!(tmux.run(&["display", "-p", "-t", "top", "#{alternate_on}"]).trim(), "0", "alternate screen left");
    assert!(!screen.contains("workers ─"), "the view is gone from the screen:\n{screen}");
}

#[test]
fn top_refuses_a_pipe_and_an_unknown_master_before_touching_the_terminal() {
    let dir = TempDir::new("top-refuse");
    let (code, _, err) = clusterctl(&dir.0, &["-t", "nobody", "top"]);
    assert_eq!(code, 1);
    assert!(err.contains("nobody"), "{err}");
    let server = start(&dir, "piped", 1, &[]);
    let (code, _, err) = clusterctl(&dir.0, &["-t", "piped", "top"]);
    assert_eq!(code, 1, "stdout is a pipe here");
    assert!(err.contains("terminal"), "{err}");
    drop(server);
}

fn admin_addr(server: &Server) -> SocketAddr {
    server.wait_event("admin", T, |_| true)["addr"].as_str().unwrap().parse().unwrap()
}

#[test]
fn the_status_page_shows_every_worker_in_headless_chromium_and_fetches_only_from_itself() {
    let dir = TempDir::new("page");
    let server = start(&dir, "page", 3, &[("CLUSTER_ADMIN_ADDR", "127.0.0.1:0")]);
    let admin = admin_addr(&server);
    let pids = ready_pids(&status(&dir, "page"));
    let list: Vec<String> = pids.iter().map(u64::to_string).collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/page.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{admin}/"))
        .args(["--pids", &list.join(","), "--timeout", "30"])
        .output()
        .expect("run clients/page.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "page.py: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(stdout.trim()).expect("page.py's report");
    let shown: Vec<&str> = report["pids"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for pid in &list {
        assert!(shown.contains(&pid.as_str()), "pid {pid} not on the page: {report}");
    }
    assert_eq!(report["outside"], serde_json::json!([]), "{report}");
    let requests: Vec<&str> = report["requests"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(requests.iter().any(|u| u.ends_with("/events")), "the page listens for events: {requests:?}");

    // The page itself: one file, and a policy that lets it load nothing from elsewhere.
    let mut stream = TcpStream::connect(admin).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    assert!(page.starts_with("HTTP/1.1 200 OK") && page.contains("content-type: text/html"), "{page:.300}");
    assert!(page.contains("content-security-policy: default-src 'none';"), "{page:.500}");
    assert!(!page.contains("http://") && !page.contains("https://"), "the page names no other origin");
}

/// Reads server-sent events: `(event, data)` pairs.
fn events(reader: &mut impl BufRead, n: usize) -> Vec<(String, Value)> {
    let (mut out, mut event, mut line) = (Vec::new(), String::new(), String::new());
    while out.len() < n {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.trim().to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            out.push((event.clone(), serde_json::from_str(data).expect("JSON data")));
        }
    }
    out
}

#[test]
fn the_watch_request_and_the_event_stream_give_the_history_then_the_status() {
    let dir = TempDir::new("watch");
    let server = start(&dir, "watch", 2, &[("CLUSTER_ADMIN_ADDR", "127.0.0.1:0")]);
    let admin = admin_addr(&server);
    let pids = ready_pids(&status(&dir, "watch"));
    // A sample a second: wait for two, so the history has a rate to give.
    wait_until(T, "two samples in the history", || {
        let s = status_json(admin, "/status.json?history=1");
        let n = s["history"].as_array().map_or(0, Vec::len);
        if n >= 2 { Ok(()) } else { Err(format!(": {n}")) }
    });

    let mut stream = TcpStream::connect(admin).unwrap();
    stream.write_all(b"GET /events?interval_ms=200 HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let got = events(&mut reader, 3);
    assert_eq!(got[0].0, "history");
    let samples = got[0].1.as_array().unwrap();
    assert!(samples.len() >= 2, "{samples:?}");
    let sampled: Vec<u64> =
        samples.last().unwrap()["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_u64().unwrap()).collect();
    assert!(pids.iter().all(|p| sampled.contains(p)), "{sampled:?} vs {pids:?}");
    assert!(samples.last().unwrap()["master"]["rss_bytes"].as_u64().unwrap() > 0);
    for (event, status) in &got[1..] {
        assert_eq!(event, "status");
        assert_eq!(ready_pids(status), pids);
        assert!(status["master"]["cpu_ms"].is_u64() && status["master"]["rss_bytes"].as_u64() > Some(0), "{status}");
    }
    let (a, b) = (got[1].1["at_ms"].as_u64().unwrap(), got[2].1["at_ms"].as_u64().unwrap());
    assert!((100..1000).contains(&(b - a)), "statuses {} ms apart, asked for 200", b - a);

    // The same on the control socket, with the log records.
    let socket = server.wait_event("control", T, |_| true)["path"].as_str().map(PathBuf::from).unwrap();
    let stream = UnixStream::connect(socket).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap(); // the greeting
    writer.write_all(b"{\"cmd\":\"watch\",\"interval_ms\":200,\"logs\":3}\n").unwrap();
    let mut kinds = Vec::new();
    while kinds.iter().filter(|k| *k == "status").count() < 2 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0);
        let v: Value = serde_json::from_str(&line).unwrap();
        let kind = ["history", "status", "log"].into_iter().find(|k| v.get(*k).is_some()).expect("a known line");
        kinds.push(kind.to_string());
    }
    assert_eq!(kinds[..4], ["history", "log", "log", "log"], "{kinds:?}");
}

fn status_json(admin: SocketAddr, path: &str) -> Value {
    let mut stream = TcpStream::connect(admin).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}
