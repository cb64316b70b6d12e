//! `clusterctl start`: a master in the background, in a session of its own and no child of
//! whoever started it, that serves, stops with `clusterctl stop`, and whose output (a flood of
//! its workers' included) lands in log files that never pass their cap; a program that cannot
//! start makes `start` fail with its reason; `clusterctl logs` reads the file of one that is
//! gone. Each test has its own `XDG_RUNTIME_DIR`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::{TempDir, alive, clusterctl, example_bin, get, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

/// `clusterctl` with `env` added.
fn ctl_env(dir: &TempDir, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(example_bin("clusterctl"));
    cmd.args(args).env("XDG_RUNTIME_DIR", dir.path()).env_remove("RUNTIME_DIRECTORY");
    for var in ["CLUSTER_LOG_FORMAT", "CLUSTER_LOG_CAPTURE", "CLUSTER_CONTROL_SOCKET", "CLUSTER_WORKERS"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run clusterctl");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`.
fn stat_field(pid: u32, n: usize) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(n - 3)?.parse().ok()
}

fn status(dir: &TempDir, name: &str) -> Value {
    let (code, out, err) = clusterctl(&dir.0, &["-t", name, "status", "--json"]);
    assert_eq!(code, 0, "status: {err}");
    serde_json::from_str(&out).expect("status JSON")
}

fn log_files(dir: &Path, name: &str) -> Vec<(PathBuf, u64)> {
    let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{name}.log")))
                .map(|e| (e.path(), e.metadata().map_or(0, |m| m.len())))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn start_runs_a_master_in_the_background_that_serves_and_stops() {
    let dir = TempDir::new("start");
    let hello = example_bin("hello");
    let (code, out, err) =
        ctl_env(&dir, &[("PORT", "0")], &["start", "--name", "bg", "-w", "2", "--", hello.to_str().unwrap()]);
    assert_eq!(code, 0, "start failed: {err}");
    assert!(out.contains("2 workers ready of 2") && out.contains("started bg in the background"), "{out}");

    let s = status(&dir, "bg");
    let master = s["master"]["pid"].as_u64().unwrap() as u32;
    // A session of its own (it leads it), and no child of this test or of clusterctl.
    assert_eq!(stat_field(master, 6), Some(i64::from(master)), "the master leads its session");
    assert_ne!(stat_field(master, 6), stat_field(std::process::id(), 6), "not the test's session");
    assert_ne!(stat_field(master, 4), Some(i64::from(std::process::id())), "not the test's child");
    assert_eq!(stat_field(master, 7), Some(0), "no controlling terminal");

    let addr = s["master"]["listeners"][0].as_str().unwrap().trim_start_matches("tcp ").parse().unwrap();
    let response = get(addr, "/").expect("it serves");
    assert_eq!(response.status, 200);
    TcpStream::connect(addr).expect("connect");

    let logs = dir.0.join("cluster/logs");
    let files = log_files(&logs, "bg");
    assert_eq!(files.len(), 1, "{files:?}");
    // The workers' lines come through the master, prefixed.
    wait_for(T, "a worker's line in the log file", || {
        std::fs::read_to_string(&files[0].0).ok().filter(|t| t.contains("worker 1 | worker 1 (pid"))
    });

    let (code, _, err) = clusterctl(&dir.0, &["-t", "bg", "stop"]);
    assert_eq!(code, 0, "stop: {err}");
    assert!(!alive(master));
    // Gone: its log file is what `logs` shows.
    let (code, out, err) = clusterctl(&dir.0, &["-t", "bg", "logs", "-n", "3"]);
    assert_eq!(code, 0, "logs of a master that is gone: {err}");
    assert!(err.contains("not running") && out.contains("[stopped]"), "{out}\n{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
}

#[test]
fn a_flood_of_output_never_takes_a_log_file_past_its_cap() {
    let dir = TempDir::new("start-flood");
    let chatty = env!("CARGO_BIN_EXE_chatty");
    // 2 workers × 40,000 lines of 100 bytes: 8 MB into files of at most 1 MiB, 2 kept.
    let env = [("CHATTY_LINES", "40000")];
    let args = ["start", "--name", "chatty", "--log-max-bytes", "1048576", "--log-files", "2", "--", chatty];
    let (code, _, err) = ctl_env(&dir, &env, &args);
    assert_eq!(code, 0, "start failed: {err}");
    let master = status(&dir, "chatty")["master"]["pid"].as_u64().unwrap() as u32;
    let logs = dir.0.join("cluster/logs");
    // The flood is over when the last line of each worker is in the newest file.
    wait_for(T, "the last lines of the flood", || {
        let text = std::fs::read_to_string(logs.join("chatty.log")).ok()?;
        (text.contains("worker   1 line        39999") && text.contains("worker   2 line        39999")).then_some(())
    });
    let files = log_files(&logs, "chatty");
    let names: Vec<String> = files.iter().map(|(p, _)| p.file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(names, ["chatty.log", "chatty.log.1", "chatty.log.2"], "rotated, two kept");
    for (path, len) in &files {
        assert!(*len <= 1 << 20, "{} is {len} bytes, over its cap", path.display());
    }
    // Rotation cuts between lines: every file starts a line.
    for (path, _) in &files[1..] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.starts_with("worker ") || text.starts_with('{'), "{} starts mid-line", path.display());
        assert!(text.len() > 900_000, "{} was rotated early: {} bytes", path.display(), text.len());
    }
    let (code, _, err) = clusterctl(&dir.0, &["-t", "chatty", "stop"]);
    assert_eq!(code, 0, "stop: {err}");
    assert!(!alive(master));
}

#[test]
fn a_program_that_cannot_start_makes_start_fail_with_its_reason() {
    let dir = TempDir::new("start-fail");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let hello = example_bin("hello");
    let (code, out, err) =
        ctl_env(&dir, &[("PORT", &port)], &["start", "--name", "taken", "--", hello.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("could not start") && err.contains("Address already in use"), "{err}");
    assert!(clusterctl(&dir.0, &["ls", "--json"]).1.trim() == "[]", "nothing left running");
    // A name that is taken, and a bad one, are refused before anything starts.
    let (code, _, err) = ctl_env(&dir, &[], &["start", "--name", "../x", "--", hello.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot name a cluster"), "{err}");
}
