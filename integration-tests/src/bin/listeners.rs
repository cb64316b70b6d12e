//! Test program: every worker binds port 0 twice and a port that is already taken
//! (`TAKEN_PORT`), and prints what it got; then it sends a message and a request to the master,
//! which runs no code to read them (no `master` hook), and prints what the sends returned.

fn main() {
    cluster::Cluster::builder().workers(2).run(worker()).expect("worker");
}

async fn worker() -> std::io::Result<()> {
    let id = cluster::worker::id().unwrap_or(0);
    let a = cluster::net::TcpListener::bind("127.0.0.1:0").await?;
    let b = cluster::net::TcpListener::bind("127.0.0.1:0").await?;
    let taken = std::env::var("TAKEN_PORT").expect("TAKEN_PORT");
    let taken = match cluster::net::TcpListener::bind(format!("127.0.0.1:{taken}")).await {
        Ok(_) => "bound".to_string(),
        Err(e) => format!("{:?}", e.kind()),
    };
    println!("worker {id} a={} b={} taken={taken}", a.local_addr()?.port(), b.local_addr()?.port());
    let sent = cluster::worker::send("anyone?").await;
    let asked = cluster::worker::request(cluster::Peer::Master, "anyone?", std::time::Duration::from_secs(10)).await;
    println!("worker {id} send to master: {sent:?}; request to master: {asked:?}");
    cluster::worker::shutdown().await;
    Ok(())
}
