//! `hello`: the clustered HTTP/1.1 server that tests and the README drive.
//!
//! Env: `HOST` (127.0.0.1), `PORT` (8080), `CLUSTER_WORKERS`. Routes: `/` → `hello world`,
//! `/worker` → `{"id":N,"pid":P}`, `/sleep?ms=N`. With `HELLO_DEBUG=1` also `/exit?code=N`,
//! `/panic` and `/hang` (blocks the worker's runtime). Start-up failures on demand:
//! `HELLO_CRASH_ON_START=1` (every worker exits 3), `HELLO_CRASH_WORKER=<id>` (that worker),
//! `HELLO_FAIL_IF_EXISTS=<path>` (while the path exists; only worker `HELLO_FAIL_WORKER` if
//! set); a slow start on demand:
//! `HELLO_START_DELAY_MS=<ms>` (each worker waits that long before it listens).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[cluster::main]
async fn main() -> std::io::Result<()> {
    crash_on_start_if_asked();
    if let Some(ms) = std::env::var("HELLO_START_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut listener = cluster::net::TcpListener::bind(examples::listen_addr()).await?;
    let id = cluster::worker::id().unwrap_or(0);
    println!("worker {id} (pid {}) listening on http://{}", std::process::id(), listener.local_addr()?);

    // Each connection task holds a clone of `alive`; `all_done` ends when the last one is gone.
    let (alive, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, _) = match conn {
                    Ok(conn) => conn,
                    Err(e) if cluster::is_closed(&e) => break,
                    Err(e) => {
                        eprintln!("accept error: {e}");
                        continue;
                    }
                };
                tokio::spawn(serve(stream, alive.clone()));
            }
            _ = cluster::worker::shutdown() => break,
        }
    }
    // Stop accepting (connections the master sent and we did not take go to other workers),
    // then let every open connection finish.
    drop(listener);
    drop(alive);
    all_done.recv().await;
    Ok(())
}

/// How long a keep-alive connection may stay idle once the worker is stopping. A client busy
/// on it gets `connection: close` on its next response; one that sends nothing is closed.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// Serves one connection. While the worker stops, responses carry `connection: close`
/// (see [`handle`]), so a keep-alive client learns it from a complete response instead of a
/// reset; hyper's graceful shutdown closes what stays idle.
async fn serve(stream: tokio::net::TcpStream, _alive: tokio::sync::mpsc::Sender<()>) {
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(handle));
    tokio::pin!(conn);
    let stopping = async {
        cluster::worker::shutdown().await;
        tokio::time::sleep(IDLE_GRACE).await;
    };
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopping => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

fn crash_on_start_if_asked() {
    let id = cluster::worker::id().unwrap_or(0).to_string();
    let crash_all = std::env::var("HELLO_CRASH_ON_START").is_ok_and(|v| v == "1");
    let crash_me = std::env::var("HELLO_CRASH_WORKER").is_ok_and(|v| v == id);
    let only = std::env::var("HELLO_FAIL_WORKER").ok();
    let bad_deploy = std::env::var_os("HELLO_FAIL_IF_EXISTS").is_some_and(|p| std::path::Path::new(&p).exists())
        && only.is_none_or(|only| only == id);
    if crash_all || crash_me || bad_deploy {
        eprintln!("hello: worker {id} crashing on start as asked");
        std::process::exit(3);
    }
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(body.into()))
        .expect("valid response")
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let debug = std::env::var("HELLO_DEBUG").is_ok_and(|v| v == "1");
    let version = req.version();
    let mut response = match req.uri().path() {
        "/" => text(StatusCode::OK, "hello world\n"),
        "/worker" => {
            let body = format!("{{\"id\":{},\"pid\":{}}}", cluster::worker::id().unwrap_or(0), std::process::id());
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert("content-type", "application/json".parse().expect("header"));
            r
        }
        "/sleep" => {
            let ms = query(&req, "ms").unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(StatusCode::OK, format!("slept {ms} ms\n"))
        }
        "/exit" if debug => std::process::exit(query(&req, "code").unwrap_or(0) as i32),
        "/panic" if debug => panic!("/panic requested"),
        "/hang" if debug => {
            eprintln!("hello: worker {} hanging as asked", cluster::worker::id().unwrap_or(0));
            loop {
                // Blocks the worker's (single-threaded) runtime: nothing else in it runs.
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        // Leaves an orphan: a shell starts `sleep` in the background and exits, so the sleep's
        // parent becomes the namespace's init. Answers its pid.
        "/orphan" if debug => {
            let ms = query(&req, "ms").unwrap_or(200);
            let script = format!("sleep {}.{:03} & echo $!", ms / 1000, ms % 1000);
            match std::process::Command::new("sh").args(["-c", &script]).output() {
                Ok(out) => text(StatusCode::OK, String::from_utf8_lossy(&out.stdout).into_owned()),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        // The state of process `pid` as this worker's /proc shows it (`Z`: a zombie), or `gone`.
        "/pidstate" if debug => {
            let pid = query(&req, "pid").unwrap_or(0);
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next().map(str::to_string)));
            text(StatusCode::OK, format!("{}\n", state.as_deref().unwrap_or("gone")))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    cluster::http::close_on_shutdown(version, &mut response);
    Ok(response)
}
