//! Test program: user messages both ways. The master greets each worker when it comes online
//! and echoes whatever a worker sends; each worker sends one message, and prints what it gets.

use cluster::master::Event;

fn main() {
    cluster::Cluster::builder().workers(2).master(master).run(worker());
}

async fn master(mut m: cluster::Master) {
    while let Some(event) = m.recv().await {
        match event {
            Event::Online { id, .. } => m.send(id, format!("welcome {id}")).await.expect("send welcome"),
            Event::Message { id, data, .. } => {
                let text = String::from_utf8_lossy(&data).into_owned();
                m.send(id, format!("echo {text}")).await.expect("send echo");
            }
            _ => {}
        }
    }
}

async fn worker() {
    let id = cluster::worker::id().expect("worker id");
    cluster::worker::send(format!("hello from {id}")).await.expect("send to master");
    for _ in 0..2 {
        let msg = cluster::worker::recv().await.expect("message from master");
        println!("worker {id} got: {}", String::from_utf8_lossy(&msg));
    }
    let too_big = vec![0u8; cluster::MAX_USER_MESSAGE + 1];
    match cluster::worker::send(too_big).await {
        Err(cluster::worker::SendError::TooLarge(n)) => println!("worker {id} oversized send refused: {n} bytes"),
        other => println!("worker {id} oversized send: {other:?}"),
    }
    cluster::worker::shutdown().await;
}
