//! `bench-load`: an open-loop HTTP/1.1 load generator for latency percentiles at a fixed
//! request rate (as wrk2 does; `benches/latency.py` drives it).
//!
//! ```text
//! bench-load <addr> <requests per second> <seconds> <close|keep-alive> [connections]
//! ```
//!
//! A pacing thread releases request `i` at `start + i / rate` whether or not earlier ones are
//! done (so a slow server meets the same arrivals as a fast one, and queueing shows in the
//! figures). `close`: each request is a new connection (`Connection: close`), started at once.
//! `keep-alive`: requests go round-robin to `connections` kept-alive connections (default 32),
//! each serving its own in order; time waiting behind the previous request counts. Latency is
//! from a request's release to the end of its answer. Prints one JSON line: requests sent, ok,
//! errors, and p50 / p90 / p99 / p99.9 / max in microseconds.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Latencies in microseconds, and failures.
#[derive(Default)]
struct Tally {
    latencies: Vec<u32>,
    errors: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: bench-load <addr> <requests per second> <seconds> <close|keep-alive> [connections]");
        std::process::exit(2);
    }
    let addr: SocketAddr = args[1].parse().expect("an address");
    let rate: f64 = args[2].parse().expect("a rate");
    let seconds: f64 = args[3].parse().expect("a duration");
    let close = match args[4].as_str() {
        "close" => true,
        "keep-alive" => false,
        other => panic!("mode {other:?}: close or keep-alive"),
    };
    let connections: usize = args.get(5).map(|c| c.parse().expect("a number of connections")).unwrap_or(32);
    let total = (rate * seconds) as u64;

    // Releases, paced by a thread: its sleeps are accurate to tens of microseconds, where the
    // runtime's timer has a millisecond's grain.
    let (release, mut released) = mpsc::unbounded_channel::<Instant>();
    let pacer = std::thread::spawn(move || {
        let start = Instant::now();
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if release.send(Instant::now()).is_err() {
                return;
            }
        }
    });

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let tally = Arc::new(Mutex::new(Tally::default()));
    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        if close {
            while let Some(at) = released.recv().await {
                let tally = tally.clone();
                tasks.spawn(async move {
                    let result = tokio::time::timeout(Duration::from_secs(10), once(addr)).await;
                    record(&tally, at, matches!(result, Ok(Ok(()))));
                });
            }
        } else {
            let mut queues = Vec::new();
            for _ in 0..connections {
                let (tx, rx) = mpsc::unbounded_channel::<Instant>();
                queues.push(tx);
                tasks.spawn(keep_alive(addr, rx, tally.clone()));
            }
            let mut next = 0;
            while let Some(at) = released.recv().await {
                let _ = queues[next].send(at);
                next = (next + 1) % connections;
            }
            drop(queues);
        }
        // What is still out gets a bounded wait.
        let _ =
            tokio::time::timeout(Duration::from_secs(15), async { while tasks.join_next().await.is_some() {} }).await;
    });
    pacer.join().expect("pacer");

    let mut tally = tally.lock().unwrap();
    let ok = tally.latencies.len() as u64;
    let errors = tally.errors + total.saturating_sub(ok + tally.errors);
    tally.latencies.sort_unstable();
    let at = |q: f64| -> u32 {
        let l = &tally.latencies;
        if l.is_empty() { 0 } else { l[((l.len() - 1) as f64 * q).round() as usize] }
    };
    println!(
        "{{\"sent\":{total},\"ok\":{ok},\"errors\":{errors},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        at(1.0)
    );
}

fn record(tally: &Mutex<Tally>, at: Instant, ok: bool) {
    let mut tally = tally.lock().unwrap();
    if ok {
        tally.latencies.push(at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    } else {
        tally.errors += 1;
    }
}

/// One request on a new connection.
async fn once(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n").await?;
    let mut buf = Vec::with_capacity(256);
    read_response(&mut stream, &mut buf).await
}

/// One kept-alive connection serving its queue of releases in order.
async fn keep_alive(addr: SocketAddr, mut queue: mpsc::UnboundedReceiver<Instant>, tally: Arc<Mutex<Tally>>) {
    let mut stream = None;
    let mut buf = Vec::with_capacity(256);
    while let Some(at) = queue.recv().await {
        let result = tokio::time::timeout(Duration::from_secs(10), async {
            if stream.is_none() {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                stream = Some(s);
            }
            let s = stream.as_mut().expect("connected");
            s.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n").await?;
            read_response(s, &mut buf).await
        })
        .await;
        let ok = matches!(result, Ok(Ok(())));
        if !ok {
            stream = None; // reconnect for the next one
        }
        record(&tally, at, ok);
    }
}

/// Reads one response with a 200 status and a `content-length` or a chunked body.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.clear();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the answer"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(std::io::Error::other(format!("status: {}", head.lines().next().unwrap_or(""))));
        }
        let length =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
        let Some(length) = length else {
            if !head.contains("transfer-encoding: chunked") {
                return Err(std::io::Error::other("neither content-length nor chunked"));
            }
            // Node's answers: chunked, ended by the last (empty) chunk.
            while !buf[end + 4..].ends_with(b"0\r\n\r\n") {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::other("closed in the body"));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(());
        };
        while buf.len() < end + 4 + length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("closed in the body"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Ok(());
    }
}
