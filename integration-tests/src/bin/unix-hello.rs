//! Test program: a Unix socket server. Binds `SOCKET_PATH` (mode `SOCKET_MODE`, octal, if
//! set) and answers each connection with `<worker id>:<pid>\n`, then closes it.

use tokio::io::AsyncWriteExt;

#[cluster::main(workers = 2)]
async fn main() -> std::io::Result<()> {
    let path = std::env::var("SOCKET_PATH").expect("SOCKET_PATH");
    let mode = std::env::var("SOCKET_MODE").ok().map(|m| u32::from_str_radix(&m, 8).expect("octal mode"));
    let mut listener = match cluster::net::UnixListener::bind_with_mode(&path, mode).await {
        Ok(l) => l,
        Err(e) => {
            println!("bind error: {:?}: {e}", e.kind());
            return Err(e);
        }
    };
    let id = cluster::worker::id().unwrap_or(0);
    println!("worker {id} listening on unix:{}", listener.path().display());
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((mut stream, _)) => {
                    let reply = format!("{id}:{}\n", std::process::id());
                    tokio::spawn(async move { stream.write_all(reply.as_bytes()).await });
                }
                Err(e) if cluster::is_closed(&e) => return Ok(()),
                Err(e) => eprintln!("accept: {e}"),
            },
            _ = cluster::worker::shutdown() => return Ok(()),
        }
    }
}
