//! Test program: one worker with `exit_on_panic(false)`. A task of it panics; the worker goes
//! on, says so, and then stops by itself with code 0. The master's hook prints how the worker
//! ended, with the reason the master recorded.

fn main() {
    cluster::Cluster::builder().workers(1).exit_on_panic(false).master(master).run(worker());
}

async fn master(mut m: cluster::Master) {
    while let Some(event) = m.recv().await {
        if let cluster::master::Event::Exit(exit) = event {
            println!("worker exited: code {:?}, reason {:?}", exit.code, exit.reason);
        }
    }
}

async fn worker() {
    let task = tokio::spawn(async { panic!("a task panics") });
    assert!(task.await.is_err(), "the task panicked");
    println!("worker still running after the panic");
    std::process::exit(0);
}
