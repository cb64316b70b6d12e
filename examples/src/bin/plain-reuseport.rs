//! `plain-reuseport`: the speed limit the cluster is measured against. N processes (env
//! `WORKERS`, default 2), each a single-threaded tokio server with its own SO_REUSEPORT socket
//! and the same handler as `bench-server`, no framework. `HOST`/`PORT` as for `hello`
//! (port 0 is not supported: the kernel would give each process another port).

use std::net::SocketAddr;

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = examples::listen_addr().parse().map_err(std::io::Error::other)?;
    if std::env::var_os("PLAIN_CHILD").is_none() {
        let n: usize = std::env::var("WORKERS").ok().and_then(|n| n.parse().ok()).unwrap_or(2);
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for _ in 0..n {
            children.push(std::process::Command::new(&exe).env("PLAIN_CHILD", "1").spawn()?);
        }
        for mut child in children {
            child.wait()?;
        }
        return Ok(());
    }
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(socket.into())?;
        println!("plain worker {} listening on http://{addr}", std::process::id());
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(examples::bench::serve(stream));
        }
    })
}
