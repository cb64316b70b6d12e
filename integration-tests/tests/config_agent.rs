//! `config-agent` against a real `redis-server` on a free loopback port: config updates through
//! the agent, a hit counter shared in Redis, and Redis going away and coming back.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{Server, get, wait_for};

/// A `redis-server` started by the test, without persistence; stopped when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (installed by .ci/run: apt-get install redis-server)");
        let redis = Redis { child, port };
        wait_for(Duration::from_secs(10), "redis-server to answer PING", || {
            (redis.command(&["PING"]).ok()? == "+PONG").then_some(())
        });
        redis
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Sends one command and returns the first line of the reply.
    fn command(&self, args: &[&str]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut out = format!("*{}\r\n", args.len());
        for arg in args {
            out.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(out.as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line.trim_end().to_owned())
    }

    fn publish(&self, payload: &str) {
        let reply = self.command(&["PUBLISH", "cluster:config", payload]).expect("publish");
        assert_eq!(reply, ":1", "exactly one subscriber (the agent) got {payload:?}");
    }

    fn stop(mut self) {
        integration_tests::kill(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Polls `/config` until both workers answered `expected`; returns how long that took.
fn both_workers_serve(server: &Server, expected: &str, within: Duration) -> Duration {
    let start = Instant::now();
    let mut seen = [false; 2];
    while start.elapsed() < within {
        let r = get(server.addr, "/config").expect("GET /config");
        if r.status == 200 && r.body == expected {
            let w = r.worker.expect("x-worker header") as usize;
            seen[w - 1] = true;
            if seen == [true, true] {
                return start.elapsed();
            }
        }
    }
    panic!("both workers did not serve {expected:?} within {within:?} (seen {seen:?})");
}

#[test]
fn config_from_the_agent_hits_in_redis_and_redis_restarts() {
    let redis = Redis::start(free_port());
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let server = Server::start("config-agent", &[("CLUSTER_WORKERS", "2"), ("REDIS_URL", &url)], 2);
    wait_for(Duration::from_secs(10), "the agent to subscribe", || {
        server.stdout().contains("subscribed to cluster:config").then_some(())
    });
    assert_eq!(get(server.addr, "/config").expect("GET").status, 404, "nothing published yet");

    // An update reaches every worker within 1 s, byte for byte.
    let payload = "{\"feature\": \"on\", \"level\": 3}";
    redis.publish(payload);
    let took = both_workers_serve(&server, payload, Duration::from_secs(1));
    eprintln!("both workers served the new config {took:?} after PUBLISH");

    // 100 hits across both workers share one counter.
    let mut by_worker = [0u32; 2];
    let mut last = String::new();
    for _ in 0..100 {
        let r = get(server.addr, "/hits").expect("GET /hits");
        assert_eq!(r.status, 200, "{}", r.body);
        by_worker[r.worker.expect("x-worker") as usize - 1] += 1;
        last = r.body;
    }
    assert_eq!(last.trim(), "100");
    assert!(by_worker.iter().all(|n| *n > 0), "both workers counted: {by_worker:?}");

    // Redis goes away: the workers keep serving the last value; hits fail cleanly.
    let port = redis.port;
    redis.stop();
    for _ in 0..10 {
        let r = get(server.addr, "/config").expect("GET /config with Redis down");
        assert_eq!((r.status, r.body.as_str()), (200, payload));
    }
    let r = get(server.addr, "/hits").expect("GET /hits with Redis down");
    assert_eq!(r.status, 503, "{}", r.body);
    wait_for(Duration::from_secs(10), "the agent to notice", || {
        server.stdout().contains("lost the Redis subscription").then_some(())
    });

    // Redis returns: the agent subscribes again, and new updates flow.
    let redis = Redis::start(port);
    wait_for(Duration::from_secs(10), "the agent to subscribe again", || {
        (server.stdout().matches("subscribed to cluster:config").count() >= 2).then_some(())
    });
    redis.publish("second");
    both_workers_serve(&server, "second", Duration::from_secs(1));
    let r = get(server.addr, "/hits").expect("GET /hits");
    assert_eq!((r.status, r.body.trim()), (200, "1"), "a fresh Redis counts from 1");
    assert!(server.events("protocol_error").is_empty(), "{}", server.stderr());
}
