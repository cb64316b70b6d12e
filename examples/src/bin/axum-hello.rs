//! `axum-hello`: axum served from a cluster listener (feature `axum`), stopping gracefully
//! when the master asks. Same env as `hello`.

use axum::Router;
use axum::routing::get;

#[cluster::main]
async fn main() -> std::io::Result<()> {
    let listener = cluster::net::TcpListener::bind(examples::listen_addr()).await?;
    let id = cluster::worker::id().unwrap_or(0);
    println!("worker {id} listening on http://{}", listener.local_addr()?);
    let app = Router::new()
        .route("/", get(|| async { "hello world\n" }))
        .route("/worker", get(move || async move { format!("{{\"id\":{id},\"pid\":{}}}", std::process::id()) }));
    axum::serve(listener, app).with_graceful_shutdown(cluster::worker::shutdown()).await
}
