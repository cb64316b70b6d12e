//! Socket kinds beyond TCP over IPv4: UDP, Unix domain stream sockets, IPv6.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::{Server, parse_worker, wait_for};

#[test]
fn udp_echo_is_served_by_every_worker() {
    let server = Server::spawn(integration_tests::example_bin("udp-echo"), &[("CLUSTER_WORKERS", "2")]);
    let addr: std::net::SocketAddr = wait_for(Duration::from_secs(20), "both workers to bind", || {
        let out = server.stdout();
        let addrs: Vec<&str> = out.lines().filter_map(|l| l.split("listening on udp://").nth(1)).collect();
        (addrs.len() == 2).then(|| addrs[0].trim().parse().expect("address"))
    });
    assert!(server.stdout().lines().filter(|l| l.contains(&format!("udp://{addr}"))).count() == 2, "one shared port");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client socket");
    client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    // Both workers read the one socket; whichever the kernel wakes first takes a datagram.
    // One datagram at a time, a worker that keeps winning can answer all of them: bursts give
    // the other one its turn while the first is busy.
    let mut answered_by = HashSet::new();
    let mut buf = [0u8; 256];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for burst in 0.. {
        if answered_by.len() == 2 && burst >= 10 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "only {answered_by:?} answered in {burst} bursts");
        let mut sent: HashSet<String> = (0..32).map(|i| format!("ping {burst}.{i}")).collect();
        for payload in &sent {
            client.send_to(payload.as_bytes(), addr).expect("send");
        }
        while !sent.is_empty() {
            let (n, from) = client.recv_from(&mut buf).expect("every datagram is answered");
            assert_eq!(from, addr);
            let reply = std::str::from_utf8(&buf[..n]).expect("utf-8");
            let (id, echoed) = reply.split_once(':').expect("id:payload");
            assert!(sent.remove(echoed), "unexpected or repeated reply {reply:?}");
            answered_by.insert(id.to_owned());
        }
    }

    // A reload sees the new workers ready once they hold the shared socket.
    server.signal(libc::SIGHUP);
    server.wait_events("reload_done", 1, Duration::from_secs(10));
    client.send_to(b"after reload", addr).expect("send");
    let (n, _) = client.recv_from(&mut buf).expect("answered after the reload");
    assert!(buf[..n].ends_with(b":after reload"));
}

fn socket_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("cluster-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn ask(path: &PathBuf) -> String {
    let mut stream = std::os::unix::net::UnixStream::connect(path).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("reply");
    reply
}

#[test]
fn unix_listener_serves_replaces_stale_files_and_cleans_up() {
    let path = socket_path("unix");
    // A stale socket file: bound by a listener that is gone.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    assert!(path.exists());
    let env = [("SOCKET_PATH", path.to_str().unwrap()), ("SOCKET_MODE", "660")];
    let mut server = Server::spawn(env!("CARGO_BIN_EXE_unix-hello").into(), &env);
    wait_for(Duration::from_secs(20), "both workers to listen", || {
        (server.stdout().matches("listening on unix:").count() == 2).then_some(())
    });
    let mode = std::fs::metadata(&path).expect("socket file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let mut ids = HashSet::new();
    for _ in 0..20 {
        let reply = ask(&path);
        ids.insert(reply.split(':').next().expect("id").to_owned());
    }
    assert_eq!(ids.len(), 2, "both workers serve: {ids:?}");

    // A second cluster must not steal the socket of a live one.
    let other = Server::spawn(env!("CARGO_BIN_EXE_unix-hello").into(), &env);
    wait_for(Duration::from_secs(20), "the second cluster to fail", || {
        let refused = other.stdout().contains("bind error: AddrInUse");
        (refused && !other.events("listen_failed").is_empty()).then_some(())
    });
    assert!(ask(&path).contains(':'), "the first cluster still serves");
    drop(other);

    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(5)).expect("exit").code(), Some(0));
    assert!(!path.exists(), "the socket file is removed on exit");
}

#[test]
fn unix_path_too_long_is_a_clear_error() {
    let long = std::env::temp_dir().join("x".repeat(200));
    let server = Server::spawn(env!("CARGO_BIN_EXE_unix-hello").into(), &[("SOCKET_PATH", long.to_str().unwrap())]);
    wait_for(Duration::from_secs(20), "the bind error", || {
        server.stdout().contains("bytes; at most 107 fit in sun_path").then_some(())
    });
}

#[test]
fn hello_serves_on_ipv6_loopback() {
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2"), ("HOST", "::1")], 2);
    assert!(server.addr.is_ipv6(), "{}", server.addr);
    let mut ids = HashSet::new();
    for _ in 0..20 {
        let response = server.get("/worker");
        assert_eq!(response.status, 200);
        ids.insert(parse_worker(&response.body).0);
    }
    assert_eq!(ids.len(), 2);
}

#[test]
fn hello_on_the_ipv6_wildcard_is_dual_stack() {
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2"), ("HOST", "::")], 2);
    let port = server.addr.port();
    for host in ["127.0.0.1", "[::1]"] {
        let addr = format!("{host}:{port}").parse().expect("address");
        let response = integration_tests::get(addr, "/").expect("request");
        assert_eq!(response.status, 200, "via {host}");
    }
}

#[test]
fn ipv6_loopback_serves_under_every_policy() {
    for policy in ["shared", "reuseport"] {
        let env = [("CLUSTER_WORKERS", "2"), ("HOST", "::1"), ("CLUSTER_SCHED_POLICY", policy)];
        let server = Server::start("hello", &env, 2);
        assert!(server.addr.is_ipv6(), "{}", server.addr);
        for _ in 0..20 {
            assert_eq!(server.get("/").status, 200, "{policy}");
        }
    }
}

#[test]
fn udp_under_reuseport_gives_each_worker_its_own_socket() {
    let env = [("CLUSTER_WORKERS", "2"), ("CLUSTER_SCHED_POLICY", "reuseport")];
    let server = Server::spawn(integration_tests::example_bin("udp-echo"), &env);
    let addr: std::net::SocketAddr = wait_for(Duration::from_secs(20), "both workers to bind", || {
        let out = server.stdout();
        let addrs: Vec<&str> = out.lines().filter_map(|l| l.split("listening on udp://").nth(1)).collect();
        (addrs.len() == 2).then(|| addrs[0].trim().parse().expect("address"))
    });
    assert!(server.stdout().lines().filter(|l| l.contains(&format!("udp://{addr}"))).count() == 2, "one port");
    let owned = server.events("bind").iter().filter(|(_, e)| e["owner"].is_u64()).count();
    assert_eq!(owned, 2, "one socket per worker:\n{}", server.stderr());
    // The kernel picks a socket by a hash of the client's address: one client socket each.
    let mut answered_by = HashSet::new();
    let mut buf = [0u8; 256];
    for i in 0..200 {
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client socket");
        client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let payload = format!("ping {i}");
        client.send_to(payload.as_bytes(), addr).expect("send");
        let (n, _) = client.recv_from(&mut buf).expect("every datagram is answered");
        let reply = std::str::from_utf8(&buf[..n]).expect("utf-8");
        assert!(reply.ends_with(&payload), "{reply}");
        answered_by.insert(reply.split(':').next().expect("id").to_owned());
    }
    assert_eq!(answered_by.len(), 2, "both workers answer some datagrams: {answered_by:?}");
}
