//! Every client through every deploy, with clients nobody here wrote: WebSockets (Python's
//! `websockets`) and server-sent events (`curl -N`) end with a close frame or a clean end on
//! each reload and upgrade and reconnect; HTTP/1.0 keep-alive clients (`ab -k`) fail nothing;
//! a WebSocket handshake on a kept-alive connection of a stopping worker still succeeds; an
//! HTTP/2 client (`h2load`) sees no started stream fail.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{Server, Strays, TempDir, alive, clusterctl, wait_for, wait_until};

const T: Duration = Duration::from_secs(20);

/// A program the tests need, or a message that says how to get it.
fn need(program: &str, package: &str) {
    let found =
        Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success());
    assert!(found, "{program} is missing: ./test.sh installs it ({package})");
}

/// Waits until none of `pids` runs; how long that took from `since`.
fn gone(pids: &[u32], since: Instant) -> Duration {
    wait_until(T, "the retired processes to exit", || {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() { Ok(()) } else { Err(format!(": {left:?} still run")) }
    });
    since.elapsed()
}

/// `Instant` as seconds of the monotonic clock (what Python's `time.monotonic()` reads).
fn monotonic(at: Instant) -> f64 {
    let now = Instant::now();
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into `ts` only.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let clock = ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
    clock - now.saturating_duration_since(at).as_secs_f64()
}

#[test]
fn websockets_are_closed_with_1012_on_each_reload_and_upgrade_and_lose_no_message() {
    let python = Command::new("python3").args(["-c", "import websockets"]).status();
    assert!(python.is_ok_and(|s| s.success()), "Python's websockets is missing: ./test.sh installs it (pip)");
    let dir = TempDir::new("ws-deploys");
    let mut masters = Strays::default();
    let server = Server::start("ws-hello", &[("CLUSTER_WORKERS", "2"), ("XDG_RUNTIME_DIR", dir.path())], 2);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/ws_clients.py");
    let mut clients = Command::new("python3")
        .arg(&script)
        .args([format!("ws://{}/ws", server.addr), "40".into()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the websockets clients");
    let mut to = clients.stdin.take().unwrap();
    let mut from = BufReader::new(clients.stdout.take().unwrap());
    let mut line = String::new();
    from.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected 40");
    let mut ask_ready = |to: &mut std::process::ChildStdin| {
        writeln!(to, "ready?").unwrap();
        let mut line = String::new();
        from.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
    };

    let mut commands = Vec::new();
    for round in 1..=3 {
        let retiring = server.workers();
        writeln!(to, "mark").unwrap();
        let at = Instant::now();
        server.signal(libc::SIGHUP);
        server.wait_events("reload_done", round, T);
        let took = gone(&retiring, at);
        assert!(took <= Duration::from_secs(3), "reload {round}: the retired workers took {took:?} to exit");
        commands.push(at);
        ask_ready(&mut to);
    }
    let old = server.pid();
    let mut retiring = server.workers();
    retiring.push(old);
    writeln!(to, "mark").unwrap();
    let at = Instant::now();
    let (code, out, err) = clusterctl(&dir.0, &["upgrade"]);
    assert_eq!(code, 0, "{out}{err}");
    masters.0.push(server.wait_event("upgraded", T, |_| true)["pid"].as_u64().unwrap() as u32);
    let took = gone(&retiring, at);
    assert!(took <= Duration::from_secs(3), "the upgraded-away master and its workers took {took:?} to exit");
    commands.push(at);
    ask_ready(&mut to);

    writeln!(to, "stop").unwrap();
    line.clear();
    from.read_line(&mut line).unwrap();
    assert!(clients.wait().unwrap().success());
    let report: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let closes: Vec<(u64, f64, Option<u64>)> = report["closes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c[0].as_u64().unwrap(), c[1].as_f64().unwrap(), c[2].as_u64()))
        .collect();
    assert!(closes.iter().all(|c| c.2 == Some(1012)), "every close was 1012 service restart: {closes:?}");
    for (n, at) in commands.iter().enumerate() {
        let at = monotonic(*at);
        for client in 0..40 {
            let closed = closes.iter().find(|c| c.0 == client && c.1 >= at - 0.05 && c.1 <= at + 2.0);
            assert!(closed.is_some(), "command {n}: client {client} got no close frame within 2 s: {closes:?}");
        }
    }
    let (sent, echoed) = (report["sent"].as_u64().unwrap(), report["echoed"].as_u64().unwrap());
    assert_eq!(sent, echoed, "every message was echoed, after a reconnect if need be: {report}");
    assert!(echoed > 1000, "the clients ran: {report}");
}

#[test]
fn an_event_stream_ends_cleanly_on_a_reload_with_a_last_event() {
    need("curl", "curl");
    let server = Server::start("ws-hello", &[("CLUSTER_WORKERS", "1")], 1);
    let mut curl = Command::new("curl")
        .args(["-sN", &format!("http://{}/events", server.addr)])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl");
    let mut out = BufReader::new(curl.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("event: tick") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the stream began");
    }
    let at = Instant::now();
    server.signal(libc::SIGHUP);
    let status = wait_for(T, "curl to end", || curl.try_wait().unwrap());
    let took = at.elapsed();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "curl ended cleanly (the last chunk came): {status} after {rest}");
    assert!(took < Duration::from_secs(2), "the stream ended {took:?} after the reload");
    assert!(rest.contains("event: restart") && rest.contains("retry: 250"), "a last event with a retry hint: {rest}");
}

/// `ab -k -c 16 -t 4` against `addr` while `during` runs; ab's failed, non-2xx and complete counts.
fn ab_keep_alive(addr: std::net::SocketAddr, during: impl FnOnce()) -> (u64, u64, u64) {
    need("ab", "apache2-utils");
    let ab = Command::new("ab")
        .args(["-k", "-c", "16", "-t", "4", "-n", "100000000", "-q", &format!("http://{addr}/")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ab");
    during();
    let out = ab.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or(0, |v| v.split_whitespace().next().unwrap().parse().unwrap())
    };
    assert!(out.status.success(), "ab: {text}{}", String::from_utf8_lossy(&out.stderr));
    let (failed, non2xx, complete) =
        (field("Failed requests:"), field("Non-2xx responses:"), field("Complete requests:"));
    eprintln!("ab: {complete} complete, {failed} failed, {non2xx} non-2xx");
    assert!(complete > 1000, "ab ran: {text}");
    (failed, non2xx, complete)
}

#[test]
fn http_1_0_keep_alive_clients_fail_nothing_through_reloads() {
    for bin in ["hello", "axum-hello", "hyper-hello"] {
        let server = Server::start(bin, &[("CLUSTER_WORKERS", "2")], 2);
        let (failed, non2xx, _) = ab_keep_alive(server.addr, || {
            for round in 1..=3 {
                server.signal(libc::SIGHUP);
                server.wait_events("reload_done", round, T);
            }
        });
        assert_eq!((failed, non2xx), (0, 0), "{bin}: 3 reloads under ab -k");
    }
}

#[test]
fn http_1_0_keep_alive_clients_fail_nothing_through_an_upgrade() {
    let dir = TempDir::new("ab-upgrade");
    let mut masters = Strays::default();
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2"), ("XDG_RUNTIME_DIR", dir.path())], 2);
    let (failed, non2xx, _) = ab_keep_alive(server.addr, || {
        let (code, out, err) = clusterctl(&dir.0, &["upgrade"]);
        assert_eq!(code, 0, "{out}{err}");
        masters.0.push(server.wait_event("upgraded", T, |_| true)["pid"].as_u64().unwrap() as u32);
    });
    assert_eq!((failed, non2xx), (0, 0), "an upgrade under ab -k");
}

/// Reads an HTTP response head off `conn`.
fn head(conn: &mut std::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(conn.read(&mut byte).unwrap(), 1, "the head ended early: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[test]
fn a_websocket_handshake_on_a_kept_alive_connection_of_a_stopping_worker_gets_a_clean_101() {
    let server = Server::start("ws-hello", &[("CLUSTER_WORKERS", "1")], 1);
    // Two kept-alive connections to the one worker.
    let [mut probe, mut conn] = [0, 1].map(|_| {
        let mut c = std::net::TcpStream::connect(server.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let h = head(&mut c);
        assert!(!h.contains("connection: close"), "{h}");
        let mut body = [0u8; 12];
        c.read_exact(&mut body).unwrap();
        c
    });
    server.signal(libc::SIGHUP);
    // The worker stops once its replacement is ready: its responses then say so.
    wait_until(T, "the worker to be stopping", || {
        probe.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").map_err(|e| e.to_string())?;
        let h = head(&mut probe);
        let mut body = [0u8; 12];
        probe.read_exact(&mut body).map_err(|e| e.to_string())?;
        if h.contains("connection: close") { Ok(()) } else { Err(String::new()) }
    });
    conn.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let h = head(&mut conn);
    assert!(h.starts_with("http/1.1 101"), "{h}");
    assert!(h.contains("connection: upgrade") && !h.contains("close"), "{h}");
    assert!(h.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{h}");
    // The socket works, and closes at once with 1012: the worker is stopping.
    let mut frame = [0u8; 4];
    conn.read_exact(&mut frame).unwrap();
    assert_eq!(frame[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([frame[2], frame[3]]), 1012, "service restart");
}

#[test]
fn http_2_clients_see_no_started_stream_fail_through_reloads() {
    need("h2load", "nghttp2-client");
    let body = std::env::temp_dir().join(format!("grpc-empty-{}", std::process::id()));
    std::fs::write(&body, [0u8; 5]).unwrap();
    for (bin, path, extra) in [
        ("axum-hello", "/", vec![]),
        (
            "tonic-hello",
            "/grpc.health.v1.Health/Check",
            vec!["-d", body.to_str().unwrap(), "-H", "content-type: application/grpc", "-H", "te: trailers"],
        ),
    ] {
        let server = Server::start(bin, &[("CLUSTER_WORKERS", "2")], 2);
        let h2load = Command::new("h2load")
            .args(["-c", "8", "-m", "4", "-D", "4"])
            .args(&extra)
            .arg(format!("http://{}{path}", server.addr))
            .stdout(Stdio::piped())
            .spawn()
            .expect("run h2load");
        for round in 1..=3 {
            server.signal(libc::SIGHUP);
            server.wait_events("reload_done", round, T);
        }
        let out = String::from_utf8_lossy(&h2load.wait_with_output().unwrap().stdout).into_owned();
        let line = out.lines().find(|l| l.starts_with("requests:")).unwrap_or_else(|| panic!("{out}"));
        let n = |what: &str| -> u64 {
            line.split(',').find_map(|part| part.trim().strip_suffix(what)).map(|v| v.trim().parse().unwrap()).unwrap()
        };
        let (started, succeeded) = (n("started"), n("succeeded"));
        eprintln!("{bin}: {line}");
        assert!(started > 1000, "{bin}: h2load ran: {out}");
        assert_eq!(started, succeeded, "{bin}: every started stream succeeded: {line}");
        assert_eq!((n("errored"), n("timeout")), (0, 0), "{bin}: {line}");
    }
    let _ = std::fs::remove_file(body);
}

/// How long after a reload began an HTTP/2 connection to `server` (one worker) hears GOAWAY.
fn goaway_after_reload(server: &Server, path: &str, grpc: bool) -> Duration {
    use http_body_util::{BodyExt, Full};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        let uri = format!("http://{}{path}", server.addr);
        let request = match grpc {
            true => hyper::Request::post(uri).header("content-type", "application/grpc").header("te", "trailers"),
            false => hyper::Request::get(uri),
        };
        let body = if grpc { vec![0u8; 5] } else { Vec::new() };
        let response = sender.send_request(request.body(Full::new(bytes::Bytes::from(body))).unwrap()).await.unwrap();
        assert!(response.status().is_success());
        response.into_body().collect().await.unwrap();
        let at = Instant::now();
        server.signal(libc::SIGHUP);
        while sender.is_ready() {
            assert!(at.elapsed() < T, "no GOAWAY");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        at.elapsed()
    })
}

#[test]
fn http_2_servers_send_goaway_after_the_same_grace_as_http_1_s_close() {
    for (bin, path, grpc) in [("axum-hello", "/", false), ("tonic-hello", "/grpc.health.v1.Health/Check", true)] {
        let server = Server::start(bin, &[("CLUSTER_WORKERS", "1")], 1);
        let after = goaway_after_reload(&server, path, grpc);
        eprintln!("{bin}: GOAWAY {after:?} after the reload began");
        // The worker stops after the reload began; its GOAWAY comes a grace after that.
        assert!(after >= cluster::http::GRACE, "{bin}: GOAWAY {after:?} after the reload, before the grace");
        assert!(after < cluster::http::GRACE + Duration::from_secs(5), "{bin}: GOAWAY only after {after:?}");
    }
}
