//! Test program: two workers answering `worker N` over plain HTTP/1.1. Worker 1 (the first
//! one only: a marker file tells its replacement apart) waits until `GIVE_BACK_WAIT`
//! connections sit in its queue, takes one, and then, with `GIVE_BACK_BY=drop`, drops its
//! listener and serves the one it took; with `GIVE_BACK_BY=panic`, panics. Either way the
//! connections it had acknowledged but not taken must reach worker 2.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn main() {
    cluster::Cluster::builder().workers(2).run(worker()).expect("worker");
}

async fn worker() -> std::io::Result<()> {
    let id = cluster::worker::id().unwrap_or(0);
    let mut listener = cluster::net::TcpListener::bind("127.0.0.1:0").await?;
    let marker = std::env::var("GIVE_BACK_MARKER").expect("GIVE_BACK_MARKER");
    let first = id == 1 && std::fs::File::create_new(&marker).is_ok();
    let base = open_fds();
    println!("worker {id} (pid {}) listening on http://{}", std::process::id(), listener.local_addr()?);
    if first {
        let want: usize = std::env::var("GIVE_BACK_WAIT").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Each connection the master hands over is a new descriptor in this process.
        while open_fds() < base + want {
            assert!(Instant::now() < deadline, "worker 1: {want} connections never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (stream, _) = listener.accept().await?;
        if std::env::var("GIVE_BACK_BY").is_ok_and(|v| v == "panic") {
            panic!("worker 1 panics with connections acknowledged and not taken");
        }
        drop(listener);
        println!("worker 1 dropped its listener");
        serve(stream, id).await;
        cluster::worker::shutdown().await;
        return Ok(());
    }
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => drop(tokio::spawn(serve(stream, id))),
                Err(e) if cluster::is_closed(&e) => return Ok(()),
                Err(e) => eprintln!("accept error: {e}"),
            },
            _ = cluster::worker::shutdown() => return Ok(()),
        }
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Reads one request head and answers `worker N`, closing the connection.
async fn serve(mut stream: TcpStream, id: u32) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("{{\"id\":{id},\"pid\":{}}}", std::process::id());
    let response = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
    let _ = stream.write_all(response.as_bytes()).await;
}
