//! 20,000 idle keep-alive connections held on a cluster of 2 workers, then 1,000 requests on
//! fresh connections, all answered. The master hands every connection over and keeps none: its
//! descriptors and memory stay flat; each worker's memory per held connection is measured.
//! Loopback only; two helper processes (`hold`) each hold half the connections from their own
//! source address, so neither the test nor a helper needs more than 10,000 descriptors.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{Server, get, wait_for};

const HELD: usize = 20_000;
const FRESH: usize = 1_000;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The hard limit of open files: the helpers and workers can raise their soft limit that far.
fn hard_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the struct passed.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_max
}

#[test]
fn twenty_thousand_held_connections_and_a_thousand_fresh_ones() {
    let per_helper = HELD / 2;
    // A worker holds its half plus a few; a helper holds its half.
    if hard_fd_limit() < per_helper as u64 + 1_000 {
        eprintln!("skipped: the hard limit of open files ({}) is below {}", hard_fd_limit(), per_helper + 1_000);
        return;
    }
    let server = Server::start("hello", &[("CLUSTER_WORKERS", "2")], 2);
    let master = server.pid();
    let workers = server.workers();
    let (master_fds, master_rss) = (fds(master), rss_kib(master));
    let worker_rss: Vec<u64> = workers.iter().map(|w| rss_kib(*w)).collect();

    let started = Instant::now();
    let mut helpers: Vec<_> = ["127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|source| {
            Command::new(env!("CARGO_BIN_EXE_hold"))
                .args([server.addr.to_string(), per_helper.to_string(), source.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start hold")
        })
        .collect();
    for helper in &mut helpers {
        let mut line = String::new();
        BufReader::new(helper.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("held {per_helper}"), "a helper could not hold its connections");
    }
    let opened = started.elapsed();

    // Every connection went through the master to a worker, which holds it; the master holds
    // none of them.
    let held: Vec<usize> = workers.iter().map(|w| fds(*w)).collect();
    let total: usize = held.iter().sum();
    assert!(total >= HELD, "the workers hold {held:?} descriptors for {HELD} connections");
    for h in &held {
        assert!(*h >= HELD / 4, "both workers hold a share: {held:?}");
    }
    assert!(fds(master) <= master_fds + 8, "the master holds no connection: {} fds, {master_fds} before", fds(master));

    // Fresh connections are served while the 20,000 stay open.
    let fresh = Instant::now();
    for i in 0..FRESH {
        let response = get(server.addr, "/").unwrap_or_else(|e| panic!("fresh request {i}: {e}"));
        assert_eq!(response.status, 200);
    }
    let fresh = fresh.elapsed();

    let master_growth = rss_kib(master).saturating_sub(master_rss);
    let per_conn: Vec<f64> = workers
        .iter()
        .zip(&worker_rss)
        .zip(&held)
        .map(|((w, before), n)| rss_kib(*w).saturating_sub(*before) as f64 * 1024.0 / *n as f64)
        .collect();
    eprintln!(
        "held {HELD} connections in {opened:?}; {FRESH} fresh requests in {fresh:?}; master: {} fds (was {master_fds}), \
         RSS {} KiB (+{master_growth} KiB); workers hold {held:?} fds, memory per held connection {:.0} / {:.0} bytes",
        fds(master),
        rss_kib(master),
        per_conn[0],
        per_conn[1],
    );
    // The master's memory does not grow with held connections (a few pages of allocator
    // slack aside).
    assert!(master_growth < 4 * 1024, "the master grew by {master_growth} KiB");

    for helper in &mut helpers {
        drop(helper.stdin.take());
        helper.wait().unwrap();
    }
    // Once the clients are gone, the workers close their ends.
    wait_for(Duration::from_secs(30), "the workers to close the held connections", || {
        let now: usize = workers.iter().map(|w| fds(*w)).sum();
        (now < 1_000).then_some(())
    });
    let _ = std::io::stderr().flush();
}
