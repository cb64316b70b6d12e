//! Test program: the agent process. Two workers ping the agent every 50 ms and print its
//! answers (they carry the agent's pid); the agent answers requests, announces itself to all
//! workers, and shows that it cannot listen. The master prints the agent's events.
//!
//! A broadcast reaches the workers running when it is sent, so the agent announces itself
//! again every 50 ms until it has heard from both workers (a worker that starts later than
//! the agent would miss a single announcement).

use std::time::Duration;

use cluster::Peer;
use cluster::master::{AGENT_ID, Event};
use cluster::worker;

fn main() {
    cluster::Cluster::builder().workers(2).master(master).agent(agent).run(app());
}

async fn master(mut m: cluster::Master) {
    while let Some(event) = m.recv().await {
        match event {
            Event::Online { id: AGENT_ID, pid } => {
                println!("master: agent {pid} online");
                let answer = m.request(Peer::Agent, "pid?", Duration::from_secs(5)).await;
                println!(
                    "master asked the agent, answer: {:?}",
                    answer.map(|b| String::from_utf8_lossy(&b).into_owned())
                );
            }
            Event::Exit(info) if info.id == AGENT_ID => println!("master: agent {} exited", info.pid),
            Event::Message { id: AGENT_ID, data, .. } => {
                println!("master got from the agent: {}", String::from_utf8_lossy(&data));
            }
            _ => {}
        }
    }
}

async fn agent() {
    let pid = std::process::id();
    match cluster::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(_) => println!("agent {pid}: bind succeeded"),
        Err(e) => println!("agent {pid}: bind refused ({:?})", e.kind()),
    }
    worker::send(format!("agent {pid} up, worker id {:?}", worker::id())).await.expect("send to master");
    // Announce to the workers until both have spoken to this agent: each then got one.
    let mut heard = std::collections::HashSet::new();
    let mut announced = false;
    let mut retry = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            msg = worker::recv() => {
                let Some(msg) = msg else { return };
                if let Some(request) = &msg.request {
                    request.reply(format!("{pid}")).await.expect("reply");
                } else if let Peer::Worker(id) = msg.from {
                    heard.insert(id);
                    // Reply as a plain message to the sender.
                    let text = String::from_utf8_lossy(&msg.data).into_owned();
                    let _ = worker::send_to(id, format!("agent {pid} answers {text}")).await;
                }
            }
            _ = retry.tick(), if !announced => {
                let all_heard = heard.len() == 2;
                announced = worker::broadcast(format!("agent {pid} is up")).await.is_ok() && all_heard;
            }
            _ = worker::shutdown() => return,
        }
    }
}

async fn app() {
    let id = worker::id().expect("worker id");
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut n = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                n += 1;
                if let Err(e) = worker::send_to_agent(format!("ping {n}")).await {
                    println!("worker {id}: send to agent failed: {e}");
                }
                if n.is_multiple_of(10) {
                    let answer = worker::request(Peer::Agent, "pid?", Duration::from_secs(2)).await;
                    match answer {
                        Ok(pid) => println!("worker {id}: agent pid {}", String::from_utf8_lossy(&pid)),
                        Err(e) => println!("worker {id}: request to agent failed: {e}"),
                    }
                }
            }
            msg = worker::recv() => match msg {
                Some(msg) => println!("worker {id} got from {}: {}", msg.from, String::from_utf8_lossy(&msg.data)),
                None => return,
            },
            _ = worker::shutdown() => return,
        }
    }
}
