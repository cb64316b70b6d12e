//! Listeners: port 0 shared by all workers, several ports per worker, bind errors.

use std::collections::HashSet;
use std::time::Duration;

use integration_tests::{Server, wait_for};

#[test]
fn port_zero_is_shared_and_bind_errors_come_back() {
    // A port held by someone else: the master's bind fails and the worker gets AddrInUse.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let path = env!("CARGO_BIN_EXE_listeners").into();
    let server = Server::spawn(path, &[("TAKEN_PORT", &port)]);
    let lines = wait_for(Duration::from_secs(20), "both workers to report", || {
        let out = server.stdout();
        let lines: Vec<String> = out.lines().filter(|l| l.contains(" a=")).map(String::from).collect();
        (lines.len() == 2).then_some(lines)
    });
    let field =
        |line: &str, key: &str| line.split(&format!("{key}=")).nth(1).unwrap().split(' ').next().unwrap().to_string();
    let a: HashSet<String> = lines.iter().map(|l| field(l, "a")).collect();
    let b: HashSet<String> = lines.iter().map(|l| field(l, "b")).collect();
    assert_eq!(a.len(), 1, "first port-0 bind: one port shared by all workers: {lines:?}");
    assert_eq!(b.len(), 1, "second port-0 bind: one port shared by all workers: {lines:?}");
    assert_ne!(a, b, "a worker binding port 0 twice gets two ports");
    for line in &lines {
        assert_eq!(field(line, "taken"), "AddrInUse", "{line}");
    }
    // Nothing in the master reads messages: sending one, or a request, fails at once.
    let sends = wait_for(Duration::from_secs(10), "both workers' sends", || {
        let out = server.stdout();
        let lines: Vec<String> = out.lines().filter(|l| l.contains("send to master")).map(String::from).collect();
        (lines.len() == 2).then_some(lines)
    });
    for line in sends {
        assert!(line.contains("send to master: Err(NoPeer("), "{line}");
        assert!(line.contains("request to master: Err(Send(NoPeer("), "{line}");
    }
    // Both ports really accept.
    for port in a.iter().chain(&b) {
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).expect("connect");
    }
}
