//! `hyper-hello`: hyper-util's automatic HTTP/1 and HTTP/2 connections with its
//! `GracefulShutdown`, the pattern hyper users write, served from a cluster listener. The
//! `cluster::http` layer and shutdown signal make reloads and stops fail no request. Same env
//! as `hello`; `GET /` → `hello world`, `GET /worker` → `{"id":N,"pid":P}`.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;

#[cluster::main]
async fn main() -> std::io::Result<()> {
    let mut listener = cluster::net::TcpListener::bind(examples::listen_addr()).await?;
    let id = cluster::worker::id().unwrap_or(0);
    println!("worker {id} listening on http://{}", listener.local_addr()?);
    let service = ServiceBuilder::new().layer(cluster::http::CloseOnShutdown).service_fn(handle);
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, _) = conn?;
                let service = TowerToHyperService::new(service.clone());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                tokio::spawn(graceful.watch(conn.into_owned()));
            }
            _ = cluster::worker::shutdown() => break,
        }
    }
    // Stopping: responses say `connection: close` for a grace period, then idle connections
    // close and those in flight finish.
    cluster::http::shutdown().await;
    graceful.shutdown().await;
    Ok(())
}

async fn handle(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match request.uri().path() {
        "/worker" => format!("{{\"id\":{},\"pid\":{}}}", cluster::worker::id().unwrap_or(0), std::process::id()),
        _ => "hello world\n".to_owned(),
    };
    Ok(Response::new(Full::new(Bytes::from(body))))
}
