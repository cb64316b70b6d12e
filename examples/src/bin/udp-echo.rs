//! `udp-echo`: answers each datagram with `<worker id>:<payload>`. Same env as `hello`
//! (`HOST`, `PORT`, `CLUSTER_WORKERS`); every worker reads the one socket the master bound.

#[cluster::main]
async fn main() -> std::io::Result<()> {
    let socket = cluster::net::UdpSocket::bind(examples::listen_addr()).await?;
    let id = cluster::worker::id().unwrap_or(0);
    println!("worker {id} (pid {}) listening on udp://{}", std::process::id(), socket.local_addr()?);
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (n, peer) = received?;
                let mut reply = format!("{id}:").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                if let Err(e) = socket.send_to(&reply, peer).await {
                    eprintln!("udp-echo: reply to {peer}: {e}");
                }
            }
            _ = cluster::worker::shutdown() => return Ok(()),
        }
    }
}
