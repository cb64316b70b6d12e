//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz), reached as `cluster::__private::fuzz`:
//! not a public API. Each runs the very code the cluster runs on bytes from outside (a
//! worker, a master, a `clusterctl`, a browser, an old master, the environment) and returns
//! whether it accepted them; none may panic, hang or grow without bound, and where the code
//! promises something of what it accepts, the entry point checks it. [`seeds`] gives each
//! target the real encoders' output to start from (`fuzz/seeds.rs` writes them).

use std::fs::File;
use std::os::fd::OwnedFd;

use bytes::{Bytes, BytesMut};
use serde_json::json;

use super::admin::{agent_reply, query_flag, query_value, request_line};
use super::control::request;
use super::upgrade::wire::{self, Handover};
use super::watch::interval;
use crate::config::Config;
use crate::env;
use crate::ipc::Reassembly;
use crate::ipc::encode;
use crate::ipc::message::{self, Endpoint, NewConn, ToMaster, ToWorker};

/// The targets, by name.
pub const TARGETS: [&str; 7] =
    ["to_master", "to_worker", "fragments", "control_line", "admin_head", "upgrade_handshake", "settings"];

/// `data[0] % 4` descriptors (of `/dev/null`) and the rest as a datagram.
fn with_fds(data: &[u8]) -> (Bytes, Vec<OwnedFd>) {
    let Some((&n, rest)) = data.split_first() else { return (Bytes::new(), Vec::new()) };
    let null = File::open("/dev/null").expect("/dev/null");
    let fds = (0..n % 4).map(|_| OwnedFd::from(null.try_clone().expect("dup"))).collect();
    (Bytes::copy_from_slice(rest), fds)
}

/// A datagram from a worker, with its descriptors (`data[0] % 4` of them).
pub fn to_master(data: &[u8]) -> bool {
    let (buf, fds) = with_fds(data);
    let n = fds.len();
    match ToMaster::decode(buf, fds) {
        Ok(ToMaster::Returned { conns, .. }) => {
            assert_eq!(conns.len(), n, "a returned has one descriptor per connection");
            true
        }
        Ok(_) => true,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "an error says something");
            false
        }
    }
}

/// A datagram from the master, with its descriptors (`data[0] % 4` of them).
pub fn to_worker(data: &[u8]) -> bool {
    let (buf, fds) = with_fds(data);
    let n = fds.len();
    // What a worker whose descriptor table is full reads instead (the ids to hand back).
    let ids = message::newconn_ids(&buf);
    match ToWorker::decode(buf, fds) {
        Ok(ToWorker::NewConn { conns, .. }) => {
            assert_eq!(conns.len(), n, "a newconn has one descriptor per connection");
            let decoded: Vec<u64> = conns.iter().map(|c| c.id).collect();
            assert_eq!(ids.ok(), Some(decoded), "newconn_ids reads the ids decode reads");
            true
        }
        Ok(_) => true,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "an error says something");
            false
        }
    }
}

/// A sequence of fragments: each a tag byte (even: a start, whose announced size is the next
/// three bytes; odd: a continuation), a length byte and that many bytes. What is delivered
/// is exactly what was announced, and never more than the limit.
pub fn fragments(data: &[u8]) -> bool {
    let mut r = Reassembly::default();
    let mut rest = data;
    let mut delivered = false;
    let mut announced = None;
    while let Some((&t, more)) = rest.split_first() {
        rest = more;
        let total = if t % 2 == 0 {
            let Some((size, more)) = rest.split_at_checked(3) else { break };
            rest = more;
            Some(u32::from_be_bytes([0, size[0], size[1], size[2]]))
        } else {
            None
        };
        let Some((&len, more)) = rest.split_first() else { break };
        let Some((piece, more)) = more.split_at_checked(usize::from(len).min(more.len())) else { break };
        rest = more;
        let piece = Bytes::copy_from_slice(piece);
        let out = match total {
            Some(total) => {
                announced = Some(total);
                r.start(t.into(), 0, total, piece)
            }
            None => r.more(piece),
        };
        if let Ok(Some((_, _, whole))) = out {
            assert_eq!(Some(whole.len() as u32), announced, "delivered at its announced size");
            assert!(whole.len() <= message::MAX_USER_MESSAGE);
            delivered = true;
        }
    }
    delivered
}

/// A control socket's input: read as lines (of at most 64 bytes here, in chunks of 7), each
/// one parsed as a request.
pub fn control_line(data: &[u8]) -> bool {
    const MAX: usize = 64;
    let _ = request::parse(data);
    let mut reader = tokio::io::BufReader::with_capacity(7, data);
    let mut line = Vec::new();
    let mut parsed = false;
    loop {
        line.clear();
        match futures::executor::block_on(request::read_line(&mut reader, &mut line, MAX)) {
            Ok(true) => {
                assert!(line.len() <= MAX && !line.contains(&b'\n'), "a line within its bound");
                parsed |= request::parse(&line).is_ok();
            }
            Ok(false) | Err(_) => return parsed,
        }
    }
}

/// An admin endpoint request head: its request line and the query values the routes read.
pub fn admin_head(data: &[u8]) -> bool {
    let (method, path) = request_line(data);
    let _ = (query_flag(&path, "history"), query_flag(&path, "per_worker"));
    let ms = query_value(&path, "interval_ms").and_then(|v| v.parse().ok());
    let every = interval(ms);
    assert!((super::watch::INTERVALS.0..=super::watch::INTERVALS.1).contains(&every));
    let n = data.first().map_or(0, |b| usize::from(*b));
    let reply = agent_reply(n % 2 == 1, n % 7, n % 5);
    assert!(reply.ends_with('\n') && !reply.trim_end().contains('\n'), "one line for HAProxy");
    !method.is_empty()
}

/// A datagram of the upgrade handshake with its descriptors (`data[0] % 4` sockets): as the
/// old master's (socket descriptions, `start`) and as the new one's (`hello`, `ready`, …).
pub fn upgrade_handshake(data: &[u8]) -> bool {
    let Some((&n, rest)) = data.split_first() else { return false };
    let _ = (wire::from_successor(rest), wire::from_predecessor(rest));
    let fds: Vec<OwnedFd> = (0..n % 4)
        .filter_map(|_| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok())
        .map(OwnedFd::from)
        .collect();
    let mut handover = Handover::default();
    let step = wire::handshake_step(rest, fds, &mut handover);
    if let Err(why) = &step {
        assert!(!why.is_empty(), "an error says something");
    }
    step.is_ok()
}

/// The environment: lines `NAME=value`, the first of each name counting.
pub fn settings(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let get =
        |name: &str| text.lines().find_map(|l| l.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.into()));
    let mut cfg = Config::default();
    match cfg.apply_env_from(&get) {
        Ok(()) => true,
        Err(e) => {
            assert!(e.to_string().contains("CLUSTER_"), "the error names the variable: {e}");
            false
        }
    }
}

/// Inputs made by the real encoders: `(target, input)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut datagram = |target: &'static str, fds: u8, f: &dyn Fn(&mut BytesMut)| {
        let mut b = BytesMut::new();
        f(&mut b);
        let mut input = vec![fds];
        input.extend_from_slice(&b);
        out.push((target, input));
    };
    let peer = "127.0.0.1:40000".parse().ok();
    let v6 = "[::1]:8080".parse().ok();
    datagram("to_master", 0, &|b| encode::hello(b, 1, 4242));
    datagram("to_master", 0, &|b| encode::listen(b, 7, &Endpoint::Tcp("0.0.0.0:8080".parse().unwrap()), 0));
    datagram("to_master", 0, &|b| {
        encode::listen(b, 8, &Endpoint::Unix { path: "/run/a.sock".into(), mode: Some(0o660) }, 1)
    });
    datagram("to_master", 0, &|b| encode::listening(b, 3));
    datagram("to_master", 0, &|b| encode::unlisten(b, 3));
    datagram("to_master", 0, &|b| encode::refused(b, &[1, 2, 3]));
    datagram("to_master", 0, &|b| encode::busy(b, &[9]));
    datagram("to_master", 0, &|b| encode::exiting(b, "panic in a task"));
    datagram("to_master", 0, &|b| encode::heartbeat(b));
    datagram("to_master", 0, &|b| encode::ready(b));
    datagram("to_master", 0, &|b| encode::stop_asked(b));
    datagram("to_master", 0, &|b| encode::closed(b, 12));
    datagram("to_master", 0, &|b| encode::accepted(b, 1, [5u64, 6, 7].into_iter()));
    datagram("to_master", 2, &|b| {
        let fd = || OwnedFd::from(File::open("/dev/null").expect("/dev/null"));
        encode::returned(b, 1, &[NewConn { id: 5, peer, fd: fd() }, NewConn { id: 6, peer: v6, fd: fd() }])
    });
    datagram("to_master", 0, &|b| encode::user(b, message::USER_TO_MASTER, 2, 1, None, b"hello"));
    datagram("to_master", 0, &|b| encode::user(b, message::USER_TO_MASTER, 2, 1, Some(9000), b"part"));
    datagram("to_master", 0, &|b| encode::user_more(b, message::USER_TO_MASTER, b"more"));
    datagram("to_worker", 1, &|b| encode::listen_reply(b, 7, &Ok((1, peer)), true));
    datagram("to_worker", 0, &|b| encode::listen_reply(b, 7, &Err(98), false));
    datagram("to_worker", 2, &|b| {
        encode::newconn_header(b, 1, 2);
        encode::newconn_entry(b, 1, peer.as_ref());
        encode::newconn_entry(b, 2, None);
    });
    datagram("to_worker", 1, &|b| encode::metrics(b, 4096));
    datagram("to_worker", 0, &|b| encode::disconnect(b));
    datagram("to_worker", 0, &|b| encode::relayed(b, true));
    datagram("to_worker", 0, &|b| encode::user(b, message::USER_TO_WORKER, 0, 3, None, b"{\"ok\":1}"));
    datagram("to_worker", 0, &|b| encode::user_more(b, message::USER_TO_WORKER, b"tail"));
    // Fragments: a start announcing 6 bytes, then 2 + 4; a message whole in its start.
    out.push(("fragments", vec![0, 0, 0, 6, 2, b'a', b'b', 1, 4, b'c', b'd', b'e', b'f']));
    out.push(("fragments", vec![2, 0, 0, 3, 3, b'x', b'y', b'z']));
    for line in [
        json!({"cmd": "status"}),
        json!({"cmd": "scale", "workers": "+2"}),
        json!({"cmd": "restart", "id": 3}),
        json!({"cmd": "stop", "fast": true}),
        json!({"cmd": "logs", "lines": 50, "follow": true}),
        json!({"cmd": "watch", "interval_ms": 500, "logs": 20}),
        json!({"cmd": "metrics", "per_worker": true}),
    ] {
        out.push(("control_line", format!("{line}\n{line}\n").into_bytes()));
    }
    for head in [
        "GET /status.json?history=1 HTTP/1.1\r\nhost: x\r\n\r\n",
        "GET /events?interval_ms=250 HTTP/1.1\r\n\r\n",
        "HEAD /metrics?per_worker=true HTTP/1.0\r\n\r\n",
        "agent\n",
    ] {
        out.push(("admin_head", head.as_bytes().to_vec()));
    }
    let item = json!({"k": "listener", "endpoint": {"tcp": "127.0.0.1:8080"}, "index": 0, "owner": 0});
    let unix = json!({"k": "listener", "endpoint": {"unix": "/run/a.sock", "mode": 432}, "index": 1, "owner": 2});
    let handshake = |fds: u8, msg: Vec<u8>| [vec![fds], msg].concat();
    out.push(("upgrade_handshake", handshake(2, wire::sockets(&[item, unix]))));
    out.push((
        "upgrade_handshake",
        handshake(2, wire::sockets(&[json!({"k": "control", "path": "/run/c.sock"}), json!({"k": "admin"})])),
    ));
    out.push(("upgrade_handshake", handshake(0, wire::start(4))));
    out.push(("upgrade_handshake", handshake(0, wire::refused("a reload is under way"))));
    out.push((
        "upgrade_handshake",
        handshake(0, json!({"t": "hello", "version": 1, "pid": 7}).to_string().into_bytes()),
    ));
    let all = [
        (env::ENV_WORKERS, "4"),
        (env::ENV_KILL_TIMEOUT_MS, "30000"),
        (env::ENV_STOP_DELAY_MS, "1000"),
        (env::ENV_READY_TIMEOUT_MS, "5000"),
        (env::ENV_WAIT_READY, "1"),
        (env::ENV_HEARTBEAT_TIMEOUT_MS, "0"),
        (env::ENV_MAX_RSS_MB, "512"),
        (env::ENV_MAX_CONNECTIONS, "100000"),
        (env::ENV_SCHED_POLICY, "rr"),
        (env::ENV_BALANCER, "least-connections"),
        (env::ENV_ACCEPT_THREADS, "2"),
        (env::ENV_ACCEPT_GATHER_US, "100"),
        (env::ENV_LOG_FORMAT, "json"),
        (env::ENV_LOG, "info,cluster=debug"),
        (env::ENV_NAME, "hello"),
        (env::ENV_CONTROL_SOCKET, "off"),
        (env::ENV_PID_FILE, "/run/hello.pid"),
        (env::ENV_ADMIN_ADDR, "127.0.0.1:9100"),
        (env::ENV_METRICS_BUCKETS, "latency=0.01,0.1,1"),
    ];
    let text: String = all.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    out.push(("settings", text.into_bytes()));
    out.push(("settings", format!("{}=nope\n", env::ENV_KILL_TIMEOUT_MS).into_bytes()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_reach_every_target_and_are_read_as_the_cluster_reads_them() {
        let seeds = seeds();
        for target in TARGETS {
            let accepted = seeds.iter().filter(|(t, _)| *t == target).filter(|(t, input)| run(t, input)).count();
            assert!(accepted > 0, "no seed of {target} is accepted");
        }
        // What is refused on purpose: a bad setting, the old master's refusal, and a message
        // only the old master sends.
        let refused: Vec<String> = seeds
            .iter()
            .filter(|(t, input)| !run(t, input))
            .map(|(t, input)| format!("{t}: {}", String::from_utf8_lossy(&input[1.min(input.len())..])))
            .collect();
        assert_eq!(refused.len(), 3, "{refused:#?}");
    }

    #[test]
    fn empty_and_garbage_inputs_are_refused_without_a_panic() {
        for target in TARGETS {
            for input in [&b""[..], b"\x00", b"\xff\xff\xff\xff", b"{\"t\":", b"GET"] {
                let _ = run(target, input);
            }
        }
    }

    /// Writes the seeds, one file each, to `fuzz/seeds/<target>/` (committed; run again when an
    /// encoder changes): `cargo test -p cluster-core --lib write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes fuzz/seeds"]
    fn write_fuzz_seeds() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        let _ = std::fs::remove_dir_all(&root);
        for (i, (target, input)) in seeds().into_iter().enumerate() {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{i:02}")), input).unwrap();
        }
    }

    fn run(target: &str, input: &[u8]) -> bool {
        match target {
            "to_master" => to_master(input),
            "to_worker" => to_worker(input),
            "fragments" => fragments(input),
            "control_line" => control_line(input),
            "admin_head" => admin_head(input),
            "upgrade_handshake" => upgrade_handshake(input),
            "settings" => settings(input),
            other => panic!("{other}"),
        }
    }
}
