//! `metrics-hello`: application metrics through the `metrics` facade, totalled by the master
//! (feature `metrics`). `/` answers `hello world`, counting each request in
//! `hello_requests_total` and timing it in the histogram `hello_request_duration_seconds`;
//! `hello_in_flight` is a gauge of the requests being answered. With `CLUSTER_ADMIN_ADDR`, the
//! master serves the totals on `/metrics`. `/worker` says which worker answered; with
//! `HELLO_DEBUG=1`, `/labels?n=N` makes `N` series of one counter (a label explosion). Same env
//! as `hello`.

use std::time::Instant;

use axum::Router;
use axum::http::Uri;
use axum::routing::get;

#[cluster::main]
async fn main() -> std::io::Result<()> {
    metrics::describe_counter!("hello_requests_total", "Requests to /.");
    metrics::describe_histogram!("hello_request_duration_seconds", "Time to answer a request to /.");
    metrics::describe_gauge!("hello_in_flight", "Requests to / being answered.");
    let listener = cluster::net::TcpListener::bind(examples::listen_addr()).await?;
    let id = cluster::worker::id().unwrap_or(0);
    println!("worker {id} listening on http://{}", listener.local_addr()?);
    let mut app = Router::new()
        .route("/", get(hello))
        .route("/worker", get(move || async move { format!("{{\"id\":{id},\"pid\":{}}}", std::process::id()) }));
    if std::env::var("HELLO_DEBUG").is_ok_and(|v| v == "1") {
        app = app.route("/labels", get(labels));
    }
    let app = app.layer(cluster::http::CloseOnShutdown);
    axum::serve(listener, app).with_graceful_shutdown(cluster::http::shutdown()).await
}

async fn hello() -> &'static str {
    let started = Instant::now();
    let in_flight = metrics::gauge!("hello_in_flight");
    in_flight.increment(1.0);
    metrics::counter!("hello_requests_total").increment(1);
    metrics::histogram!("hello_request_duration_seconds").record(started.elapsed().as_secs_f64());
    in_flight.decrement(1.0);
    "hello world\n"
}

async fn labels(uri: Uri) -> String {
    let n: u32 = uri.query().and_then(|q| q.strip_prefix("n=")?.parse().ok()).unwrap_or(0);
    for i in 0..n {
        metrics::counter!("hello_labelled_total", "value" => i.to_string()).increment(1);
    }
    format!("{n} series\n")
}
