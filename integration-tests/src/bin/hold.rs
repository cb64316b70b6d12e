//! Test program: holds idle keep-alive HTTP connections. `hold <addr> <count> <source ip>`
//! opens `count` connections to `addr` from `source ip` (any 127.0.0.0/8 address: each source
//! address has its own ephemeral ports), sends one `GET /` on each and reads its answer, so the
//! server has accepted and served every one, prints `held <count>`, and keeps them open until
//! its stdin closes (at most 120 s). It raises its own soft limit of open files to the hard one.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: hold\r\n\r\n";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = args[1].parse().expect("an address");
    let count: usize = args[2].parse().expect("a count");
    let source: IpAddr = args[3].parse().expect("a source address");
    raise_fd_limit();
    let mut held = Vec::with_capacity(count);
    let mut batch = tokio::task::JoinSet::new();
    let mut started = 0;
    while held.len() < count {
        while started < count && batch.len() < 256 {
            batch.spawn(open(addr, source));
            started += 1;
        }
        match batch.join_next().await.expect("a connection task").expect("no panic") {
            Ok(stream) => held.push(stream),
            Err(e) => panic!("connection {} of {count}: {e}", held.len() + 1),
        }
    }
    println!("held {}", held.len());
    let stdin = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        let _ = std::io::stdin().read_line(&mut sink);
    });
    let _ = tokio::time::timeout(Duration::from_secs(120), stdin).await;
    drop(held);
}

/// One served, idle keep-alive connection.
async fn open(addr: SocketAddr, source: IpAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut stream = socket.connect(addr).await?;
    stream.write_all(REQUEST).await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    // `hello` answers `hello world\n` as the whole body.
    while !answer.ends_with(b"hello world\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await??;
        if n == 0 {
            return Err(std::io::Error::other("closed before the answer"));
        }
        answer.extend_from_slice(&buf[..n]);
    }
    Ok(stream)
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write or read only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
