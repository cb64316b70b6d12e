//! `bench-server`: the minimal HTTP responder benchmarks drive (no HTTP framework).
//!
//! For each request head it writes a fixed `hello world` response, adding
//! `connection: close` and closing when the request asked for it. Same env as `hello`.

use examples::bench::serve;

#[cluster::main]
async fn main() -> std::io::Result<()> {
    let mut listener = cluster::net::TcpListener::bind(examples::listen_addr()).await?;
    println!("worker {} listening on http://{}", cluster::worker::id().unwrap_or(0), listener.local_addr()?);
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => drop(tokio::spawn(serve(stream))),
                Err(e) if cluster::is_closed(&e) => return Ok(()),
                Err(e) => eprintln!("accept error: {e}"),
            },
            _ = cluster::worker::shutdown() => return Ok(()),
        }
    }
}
