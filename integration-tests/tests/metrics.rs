//! The application's metrics across the cluster (`metrics-hello`, feature `metrics`): counts
//! exact across a SIGKILLed worker, a rolling reload and a master upgrade; histograms that add
//! up; a scrape no stopped worker holds up; a label explosion that leaves the master's memory
//! bounded and is counted; text that `promtool` accepts and a Prometheus parser reads.

use std::time::{Duration, Instant};

use integration_tests::{Server, Strays, TempDir, clusterctl, get, kill, wait_until};

const T: Duration = Duration::from_secs(30);

/// The sample lines of a scrape: (series as written, value).
fn samples(text: &str) -> Vec<(String, f64)> {
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())));
    assert!(parsed.is_ok(), "a Prometheus parser reads it:\n{text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            };
            (series.to_string(), value)
        })
        .collect()
}

fn value(samples: &[(String, f64)], series: &str) -> f64 {
    samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v).unwrap_or_else(|| panic!("no {series}"))
}

fn requests(server: &Server, n: usize) {
    for _ in 0..n {
        assert_eq!(server.get("/").status, 200);
    }
}

fn scrape(admin: std::net::SocketAddr) -> String {
    let r = get(admin, "/metrics").unwrap();
    assert_eq!(r.status, 200);
    r.body
}

/// `promtool check metrics` on `text`, when promtool is installed (`./test.sh` installs it).
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let Ok(mut promtool) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("skipped promtool: not installed (Debian package prometheus; ./test.sh installs it)");
        return;
    };
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn counts_are_exact_across_a_sigkill_a_reload_and_an_upgrade() {
    let dir = TempDir::new("app-metrics");
    let mut masters = Strays::default();
    let env = [("CLUSTER_WORKERS", "3"), ("CLUSTER_ADMIN_ADDR", "127.0.0.1:0"), ("XDG_RUNTIME_DIR", dir.path())];
    let server = Server::start("metrics-hello", &env, 3);
    let admin: std::net::SocketAddr =
        server.wait_event("admin", T, |_| true)["addr"].as_str().unwrap().parse().unwrap();
    requests(&server, 1000);
    let s = samples(&scrape(admin));
    assert_eq!(value(&s, "hello_requests_total"), 1000.0);
    let gauges = s.iter().filter(|(series, _)| series.starts_with("hello_in_flight{worker=")).count();
    assert_eq!(gauges, 3, "one gauge per worker: {s:?}");

    // SIGKILL a worker: what it counted stays.
    let first = server.workers();
    kill(first[0], libc::SIGKILL);
    server.wait_event("ready", T, |e| e["pid"].as_u64().is_some_and(|p| !first.contains(&(p as u32))));
    requests(&server, 500);
    assert_eq!(value(&samples(&scrape(admin)), "hello_requests_total"), 1500.0);

    // A rolling reload, then a master upgrade.
    server.signal(libc::SIGHUP);
    server.wait_events("reload_done", 1, T);
    let (code, out, err) = clusterctl(&dir.0, &["upgrade"]);
    assert_eq!(code, 0, "{out}{err}");
    let new = server.wait_event("upgraded", T, |_| true)["pid"].as_u64().unwrap() as u32;
    masters.0.push(new);
    requests(&server, 100);
    let text = scrape(admin);
    let s = samples(&text);
    assert_eq!(value(&s, "hello_requests_total"), 1600.0, "{text}");
    assert_eq!(value(&s, "hello_request_duration_seconds_count"), 1600.0);
    let buckets: Vec<f64> = s
        .iter()
        .filter(|(series, _)| series.starts_with("hello_request_duration_seconds_bucket"))
        .map(|(_, v)| *v)
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "cumulative buckets: {buckets:?}");
    assert_eq!(buckets.last(), Some(&1600.0), "+Inf holds them all");
    // The old master's exit leaves the count as it was.
    wait_until(T, "the old master to exit", || {
        if integration_tests::alive(server.pid()) { Err(String::new()) } else { Ok(()) }
    });
    assert_eq!(value(&samples(&scrape(admin)), "hello_requests_total"), 1600.0);
    // Per worker: the same total, split by worker id.
    let (code, per, _) = clusterctl(&dir.0, &["metrics", "--per-worker"]);
    assert_eq!(code, 0);
    let per: f64 =
        samples(&per).iter().filter(|(s, _)| s.starts_with("hello_requests_total{worker=")).map(|(_, v)| v).sum();
    assert_eq!(per, 1600.0);
    promtool_accepts(&text);
}

#[test]
fn a_stopped_worker_holds_no_scrape_up_and_a_label_explosion_is_bounded_and_counted() {
    let env = [("CLUSTER_WORKERS", "2"), ("CLUSTER_ADMIN_ADDR", "127.0.0.1:0"), ("HELLO_DEBUG", "1")];
    let server = Server::start("metrics-hello", &env, 2);
    let admin: std::net::SocketAddr =
        server.wait_event("admin", T, |_| true)["addr"].as_str().unwrap().parse().unwrap();
    requests(&server, 10);
    let stopped = server.workers()[0];
    kill(stopped, libc::SIGSTOP);
    let at = Instant::now();
    let text = scrape(admin);
    let took = at.elapsed();
    kill(stopped, libc::SIGCONT);
    assert!(took < Duration::from_millis(200), "the scrape took {took:?} with a stopped worker");
    assert_eq!(value(&samples(&text), "hello_requests_total"), 10.0);

    let rss = |pid: u32| integration_tests::rss_bytes(pid);
    let before = rss(server.pid());
    let exploded = server.get("/labels?n=100000");
    assert_eq!(exploded.status, 200, "{}", exploded.body);
    let text = scrape(admin);
    let s = samples(&text);
    let shown = s.iter().filter(|(series, _)| series.starts_with("hello_labelled_total{")).count();
    assert!(shown > 1000 && shown <= 4096, "the worker's segment holds at most 4096 series: {shown}");
    let refused = value(&s, "cluster_metrics_series_refused_total");
    assert!(refused >= 100_000.0 - 4096.0, "the rest were refused and counted: {refused}");
    let grown = rss(server.pid()).saturating_sub(before);
    assert!(grown < 32 << 20, "the master's memory grew by {grown} bytes");
    promtool_accepts(&text);
}
