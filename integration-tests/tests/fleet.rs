//! A fleet behind a real load balancer: three hosts (network namespaces of the test's own,
//! each a `config-agent` master with its admin endpoint), Redis in a fourth, HAProxy from
//! Debian in a fifth health-checking `/readyz` and never retrying. Rolling stop-and-start,
//! rolling upgrade and rolling reload under keep-alive and `Connection: close` load through
//! HAProxy fail 0 requests with a 1 s stop delay, and HAProxy has each stopping host out of
//! rotation before its master exits. The harness is `benches/fleet.py --check` (the same
//! code prints the benchmark's table); this test runs it on the debug build.

use std::process::Command;

use integration_tests::example_bin;

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn a_rolling_stop_upgrade_and_reload_behind_haproxy_fail_no_request() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to make network namespaces (ip netns)");
        return;
    }
    for tool in ["ip", "haproxy", "redis-server", "redis-cli", "wrk", "curl", "python3"] {
        assert!(have(tool), "{tool} is missing (./test.sh installs it)");
    }
    let probe = Command::new("ip").args(["netns", "add", "cluster-fleet-probe"]).output().expect("run ip");
    if !probe.status.success() {
        eprintln!("skipped: cannot make a network namespace here: {}", String::from_utf8_lossy(&probe.stderr).trim());
        return;
    }
    let _ = Command::new("ip").args(["netns", "del", "cluster-fleet-probe"]).status();

    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("python3")
        .args([&format!("{root}/benches/fleet.py"), "--check"])
        .env("FLEET_EXE", example_bin("config-agent"))
        .output()
        .expect("run benches/fleet.py");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success(), "the fleet check failed:\n{text}");
    for scenario in ["rolling_stop_start", "rolling_upgrade", "rolling_reload"] {
        assert!(text.contains(&format!("{scenario}: keep-alive 0 failed")), "{scenario} did not run clean:\n{text}");
    }
}
