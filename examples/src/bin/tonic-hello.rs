//! `tonic-hello`: a gRPC server (tonic, with the standard health service) on a cluster
//! listener. `serve_with_incoming_shutdown` with `cluster::http::shutdown()` stops with
//! HTTP/2 GOAWAY and waits for the calls in flight, so reloads and stops fail no call; the
//! listener goes through `cluster::http::incoming`, because tonic begins its graceful shutdown
//! as soon as its incoming stream ends, which would send GOAWAY at once instead of after the
//! grace. (Plain `serve_with_incoming` would return without waiting for the calls.) Same env
//! as `hello`.

#[cluster::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = cluster::net::TcpListener::bind(examples::listen_addr()).await?;
    let id = cluster::worker::id().unwrap_or(0);
    println!("worker {id} listening on http://{}", listener.local_addr()?);
    let (_reporter, health) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(cluster::http::incoming(listener), cluster::http::shutdown())
        .await?;
    Ok(())
}
