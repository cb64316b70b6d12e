use cluster::net::TcpListener;
use tokio::io::AsyncWriteExt;

#[cluster::main(workers = 4)]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    // In a worker, this asks the master for the socket; every worker shares it.
    let mut listener = TcpListener::bind(addr).await?;
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (mut stream, _peer) = conn?; // a plain tokio::net::TcpStream
                tokio::spawn(async move { stream.write_all(b"hello\n").await });
            }
            // SIGTERM to the master, or the master gone: stop accepting, finish, return.
            _ = cluster::worker::shutdown() => return Ok(()),
        }
    }
}
