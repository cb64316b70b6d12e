//! The README's example program, as written: it serves, and through rolling reloads and stops
//! every worker exits 0 (its `select!` of `accept` and `shutdown` never makes a normal stop an
//! error).

use std::io::Read;
use std::time::Duration;

use integration_tests::{Server, example_bin};

const README: &str = include_str!("../../README.md");
const EXAMPLE: &str = include_str!("../../examples/src/bin/readme.rs");

#[test]
fn the_readme_shows_the_example_program_word_for_word() {
    assert!(README.contains(&format!("```rust\n{EXAMPLE}```")), "README.md and examples/src/bin/readme.rs differ");
}

/// The example with 2 workers on a port of the OS's choosing, once both are ready.
fn start() -> Server {
    let server = Server::spawn(example_bin("readme"), &[("CLUSTER_WORKERS", "2"), ("ADDR", "127.0.0.1:0")]);
    server.wait_events("ready", 2, Duration::from_secs(20));
    server
}

/// Every worker that exited so far exited 0, with nothing to report.
fn all_exited_cleanly(server: &Server, n: usize) {
    let exits = server.wait_events("exit", n, Duration::from_secs(10));
    for exit in &exits {
        assert!(
            exit["code"] == 0 && exit.get("reason").is_none(),
            "a worker did not exit 0: {exit}\n{}",
            server.stderr()
        );
    }
}

#[test]
fn the_readme_example_serves_and_every_worker_exits_zero_through_10_reloads_and_10_stops() {
    let server = start();
    let addr = server.events("bind")[0].1["addr"].as_str().expect("bound address").to_owned();
    let mut reply = String::new();
    std::net::TcpStream::connect(&addr).expect("connect").read_to_string(&mut reply).expect("read");
    assert_eq!(reply, "hello\n");
    for round in 1..=10 {
        server.signal(libc::SIGHUP);
        server.wait_events("reload_done", round, Duration::from_secs(10));
    }
    all_exited_cleanly(&server, 20);
    drop(server);
    for _ in 0..10 {
        let mut server = start();
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(10)).expect("master exits");
        assert_eq!(status.code(), Some(0), "{}", server.stderr());
        all_exited_cleanly(&server, 2);
    }
}
