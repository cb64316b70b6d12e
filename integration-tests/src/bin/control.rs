//! Test program: master-side control. Workers listen on nothing and say `ready()` (with
//! `wait_ready`); the master prints status snapshots, grows the cluster to 3 workers, reloads
//! it through the API, and prints what it saw.

use std::collections::HashSet;

use cluster::master::{Event, WorkerState};

fn main() {
    cluster::Cluster::builder().workers(2).wait_ready(true).master(master).run(worker());
}

async fn master(mut m: cluster::Master) {
    let mut ready = HashSet::new();
    while ready.len() < 2 {
        if let Some(Event::Ready { id, .. }) = m.recv().await {
            ready.insert(id);
        }
    }
    print_status("start", &m).await;
    m.set_workers(3);
    while !matches!(m.recv().await, Some(Event::Ready { id: 3, .. })) {}
    print_status("grown", &m).await;
    let before: HashSet<u32> = m.status().await.iter().filter_map(|s| s.pid).collect();
    m.reload();
    let mut retired = HashSet::new();
    while retired.len() < 3 {
        match m.recv().await {
            Some(Event::Exit(exit)) if exit.after_disconnect && before.contains(&exit.pid) => {
                retired.insert(exit.pid);
            }
            Some(_) => {}
            None => return,
        }
    }
    let after = m.status().await;
    let all_new = after.iter().all(|s| s.pid.is_some_and(|p| !before.contains(&p)));
    println!("reloaded: {} workers, all new: {all_new}", after.len());
    print_status("reloaded", &m).await;
}

async fn print_status(label: &str, m: &cluster::Master) {
    let status = m.status().await;
    let ready = status.iter().filter(|s| s.state == WorkerState::Ready).count();
    println!("{label}: {} workers, {ready} ready", status.len());
}

async fn worker() {
    cluster::worker::ready().await;
    cluster::worker::shutdown().await;
}
