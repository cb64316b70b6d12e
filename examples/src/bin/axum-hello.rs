//! `axum-hello`: axum served from a cluster listener (feature `axum`). Reloads and stops fail
//! no request: responses carry `connection: close` while the worker stops, and the graceful
//! shutdown starts after a grace period (`cluster::http`). Same env as `hello`.

use axum::Router;
use axum::routing::get;

#[cluster::main]
async fn main() -> std::io::Result<()> {
    let listener = cluster::net::TcpListener::bind(examples::listen_addr()).await?;
    let id = cluster::worker::id().unwrap_or(0);
    println!("worker {id} listening on http://{}", listener.local_addr()?);
    let app = Router::new()
        .route("/", get(|| async { "hello world\n" }))
        .route("/worker", get(move || async move { format!("{{\"id\":{id},\"pid\":{}}}", std::process::id()) }))
        .layer(cluster::http::CloseOnShutdown);
    axum::serve(listener, app).with_graceful_shutdown(cluster::http::shutdown()).await
}
