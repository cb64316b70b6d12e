//! Test program: user messages. Each worker says hello and the master echoes; worker 1 sends
//! 10,000 numbered messages and, once the master broadcasts that everyone is online, a
//! message to worker 2; worker 2 sends 1 MiB and gets it back; both send a payload that looks
//! like an internal message. Requests: worker 2 asks the master, worker 1 asks worker 2, the
//! master asks worker 1, and a request nobody answers times out. A typed (serde) value goes
//! worker → master. Everything seen is printed for the test to check.

use std::time::Duration;

use cluster::master::Event;
use cluster::messaging::{from_json, to_json};

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum Report {
    Load { worker: u32, queue: Vec<u16>, note: Option<String> },
}

/// Looks like a `listen` request (tag 0x02) to anyone who would parse user payloads.
const CRAFTED_TO_MASTER: &[u8] = b"\x02\x00\x00\x00\x01\x01\x04\x7f\x00\x00\x01\x00\x50\x00\x00\x00\x00";
/// Looks like `disconnect` (tag 0x83).
const CRAFTED_TO_WORKER: &[u8] = b"\x83";
const BIG: usize = 1024 * 1024;

fn big() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

fn main() {
    cluster::Cluster::builder().workers(2).master(master).run(worker());
}

async fn master(mut m: cluster::Master) {
    let mut online = 0;
    let mut next_seq = 0;
    while let Some(event) = m.recv().await {
        match event {
            Event::Online { id, .. } => {
                m.send(id, format!("welcome {id}")).await.expect("send welcome");
                online += 1;
                if online == 2 {
                    let reached = m.broadcast("everyone is online").await.expect("broadcast");
                    println!("broadcast reached {reached}");
                    m.broadcast(CRAFTED_TO_WORKER).await.expect("broadcast");
                    match m.send(99, "anyone?").await {
                        Err(e) => println!("send to worker 99: error: {e}"),
                        Ok(()) => println!("send to worker 99: ok"),
                    }
                    // From a task: this loop must go on reading events (the queue is bounded,
                    // and worker 1 answers only after its 10,000 messages are taken).
                    let handle = m.handle();
                    tokio::spawn(async move {
                        let answer = handle.request(1, "your id?", Duration::from_secs(20)).await;
                        let answer = answer.expect("request to worker 1");
                        println!("master asked worker 1, answer: {}", String::from_utf8_lossy(&answer));
                    });
                }
            }
            Event::Message { id, data, request: Some(request), .. } => {
                if data[..] == *b"ping" {
                    request.reply("pong").await.expect("reply");
                }
                // Any other request is left unanswered: its sender times out.
                let _ = id;
            }
            Event::Message { id, data, .. } if data.starts_with(b"{") => {
                let report: Report = from_json(&data).expect("typed message");
                println!("master got a typed message from worker {id}: {report:?}");
            }
            Event::Message { id, data, .. } => {
                if let Some(n) = data.strip_prefix(b"seq ") {
                    let n: u32 = std::str::from_utf8(n).expect("utf-8").parse().expect("number");
                    assert_eq!(n, next_seq, "messages from worker {id} out of order");
                    next_seq += 1;
                    if next_seq == 10_000 {
                        println!("master got 10000 messages in order");
                    }
                } else if data.len() == BIG {
                    println!("master got {} bytes intact: {}", data.len(), data[..] == big()[..]);
                    m.send(id, data).await.expect("send back");
                } else if data[..] == *CRAFTED_TO_MASTER {
                    println!("crafted payload from worker {id} delivered as a user message");
                } else {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    m.send(id, format!("echo {text}")).await.expect("send echo");
                }
            }
            _ => {}
        }
    }
}

async fn worker() {
    let id = cluster::worker::id().expect("worker id");
    cluster::worker::send(format!("hello from {id}")).await.expect("send to master");
    if id == 1 {
        for n in 0..10_000 {
            cluster::worker::send(format!("seq {n}")).await.expect("send seq");
        }
    } else {
        cluster::worker::send(big()).await.expect("send 1 MiB");
    }
    cluster::worker::send(CRAFTED_TO_MASTER).await.expect("send crafted");
    let report = Report::Load { worker: id, queue: vec![1, 2, 3], note: Some("ok".into()) };
    cluster::worker::send(to_json(&report).expect("encode")).await.expect("send typed");
    match cluster::worker::send_to(99, "anyone?").await {
        Err(e) => println!("worker {id} send to worker 99: error: {e}"),
        Ok(()) => println!("worker {id} send to worker 99: ok"),
    }
    if id == 2 {
        let answer = cluster::worker::request(cluster::Peer::Master, "ping", Duration::from_secs(5)).await;
        println!("worker 2 asked the master, answer: {:?}", answer.map(|b| String::from_utf8_lossy(&b).into_owned()));
        let unanswered = cluster::worker::request(cluster::Peer::Master, "ignored", Duration::from_millis(200)).await;
        println!("worker 2 unanswered request: {}", unanswered.expect_err("no reply"));
    }
    let too_big = vec![0u8; cluster::MAX_USER_MESSAGE + 1];
    match cluster::worker::send(too_big).await {
        Err(cluster::worker::SendError::TooLarge(n)) => println!("worker {id} oversized send refused: {n} bytes"),
        other => println!("worker {id} oversized send: {other:?}"),
    }
    loop {
        let msg = tokio::select! {
            msg = cluster::worker::recv() => match msg {
                Some(msg) => msg,
                None => return,
            },
            _ = cluster::worker::shutdown() => return,
        };
        let from = msg.from.to_string();
        if let Some(request) = &msg.request {
            let answer = match &msg.data[..] {
                b"your id?" => format!("{id}"),
                b"double 21" => "42".to_owned(),
                other => format!("unknown request {}", String::from_utf8_lossy(other)),
            };
            request.reply(answer).await.expect("reply");
            continue;
        }
        if msg.data.len() == BIG {
            println!("worker {id} got {} bytes from {from} intact: {}", msg.data.len(), msg.data[..] == big()[..]);
        } else if msg.data[..] == *CRAFTED_TO_WORKER {
            println!("worker {id} got the crafted payload from {from} as a user message");
        } else {
            let text = String::from_utf8_lossy(&msg.data).into_owned();
            println!("worker {id} got from {from}: {text}");
            if id == 1 && text == "everyone is online" {
                cluster::worker::send_to(2, "hi from 1").await.expect("send to worker 2");
                // From a task: this loop must go on answering the master's requests.
                tokio::spawn(async {
                    let answer = cluster::worker::request(2, "double 21", Duration::from_secs(5)).await;
                    let answer = answer.map(|b| String::from_utf8_lossy(&b).into_owned());
                    println!("worker 1 asked worker 2, answer: {answer:?}");
                });
            }
        }
    }
}
