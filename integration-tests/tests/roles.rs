//! Start-up: a process marked as a worker without a usable channel, or with bad settings,
//! fails fast with a clear message.

use std::process::Command;

use integration_tests::example_bin;

fn run(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(example_bin("hello"));
    cmd.env("PORT", "0").env_remove("CLUSTER_UNIQUE_ID").env_remove("CLUSTER_CHANNEL_FD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run hello");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn worker_id_without_channel_is_a_clear_error() {
    let (code, stderr) = run(&[("CLUSTER_UNIQUE_ID", "1")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("CLUSTER_CHANNEL_FD is missing"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn channel_that_is_not_a_seqpacket_socket_is_refused() {
    // fd 0 is /dev/null here: open, but not a socket.
    let (code, stderr) = run(&[("CLUSTER_UNIQUE_ID", "1"), ("CLUSTER_CHANNEL_FD", "0")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("fd 0 is not a socket"), "{stderr}");
    let (code, stderr) = run(&[("CLUSTER_UNIQUE_ID", "1"), ("CLUSTER_CHANNEL_FD", "999")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("fd 999 is not open"), "{stderr}");
    let (code, stderr) = run(&[("CLUSTER_UNIQUE_ID", "x"), ("CLUSTER_CHANNEL_FD", "3")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("is not a worker id"), "{stderr}");
}

#[test]
fn bad_worker_count_is_a_clear_error() {
    let (code, stderr) = run(&[("CLUSTER_WORKERS", "many")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("CLUSTER_WORKERS=\"many\" is not a number of workers"), "{stderr}");
}

#[test]
fn accept_settings_out_of_range_are_a_clear_error() {
    for bad in ["0", "65", "two"] {
        let (code, stderr) = run(&[("CLUSTER_ACCEPT_THREADS", bad)]);
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("CLUSTER_ACCEPT_THREADS") && stderr.contains("from 1 to 64"), "{stderr}");
    }
    let (code, stderr) = run(&[("CLUSTER_ACCEPT_GATHER_US", "20000")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("CLUSTER_ACCEPT_GATHER_US") && stderr.contains("from 0 to 10000"), "{stderr}");
}

#[test]
fn a_bad_setting_names_the_valid_values() {
    let (code, stderr) = run(&[("CLUSTER_SCHED_POLICY", "roundrobin")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("`rr`, `shared` or `reuseport`"), "{stderr}");
    assert_eq!(
        "roundrobin".parse::<cluster::Policy>().unwrap_err(),
        "unknown policy \"roundrobin\": expected `rr`, `shared` or `reuseport`"
    );
}
