//! Test program: a TCP server whose workers each print `CHATTY_LINES` lines of 100 bytes as
//! fast as they can once they listen (a flood of output for the log files of `clusterctl
//! start`), then answer each connection with `ok` and close it.

use std::io::Write;

use tokio::io::AsyncWriteExt;

#[cluster::main(workers = 2)]
async fn main() -> std::io::Result<()> {
    let addr = format!("127.0.0.1:{}", std::env::var("PORT").unwrap_or_else(|_| "0".into()));
    let mut listener = cluster::net::TcpListener::bind(addr.as_str()).await?;
    let id = cluster::worker::id().unwrap_or(0);
    println!("worker {id} listening on http://{}", listener.local_addr()?);
    let lines: u64 = std::env::var("CHATTY_LINES").ok().and_then(|n| n.parse().ok()).unwrap_or(0);
    std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for i in 0..lines {
            // 100 bytes with the newline.
            let _ = writeln!(out, "worker {id:>3} line {i:>12} {}", "x".repeat(70));
        }
        let _ = out.flush();
    });
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((mut stream, _)) => {
                    tokio::spawn(async move { stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n").await });
                }
                Err(e) if cluster::is_closed(&e) => return Ok(()),
                Err(e) => eprintln!("accept: {e}"),
            },
            _ = cluster::worker::shutdown() => return Ok(()),
        }
    }
}
