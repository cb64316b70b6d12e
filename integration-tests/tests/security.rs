//! What a hostile neighbour or a compromised worker can make the master do: nothing beyond its
//! own reach. Symlinks planted where the control socket goes are not followed; a socket
//! directory others can write, or that is a symlink, is refused; environment values with odd
//! bytes are rejected with a message; a worker that names another process in its hello gets
//! itself killed, never that process. (The control socket's peer-credential check is in
//! `control.rs`; Unix listeners under `CLUSTER_USER` in `deploy.rs`.)

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::{Server, TempDir, alive, example_bin, kill, wait_for};

const T: Duration = Duration::from_secs(20);

#[test]
fn a_symlink_planted_at_the_control_socket_path_is_not_followed() {
    let dir = TempDir::new("sec-symlink-path");
    let target = dir.0.join("precious");
    std::fs::write(&target, b"keep me").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    let link = dir.0.join("ctl.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let server =
        Server::start("hello", &[("CLUSTER_WORKERS", "1"), ("CLUSTER_CONTROL_SOCKET", link.to_str().unwrap())], 1);
    server.wait_event("control_failed", T, |_| true);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link is left as it was");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o644,
        "not chmod-ed through the link"
    );
    assert_eq!(server.get("/").status, 200, "the cluster runs without a control socket");
}

#[test]
fn a_socket_directory_that_is_a_symlink_or_writable_by_others_is_refused() {
    let runtime = TempDir::new("sec-symlink-dir");
    let elsewhere = runtime.0.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o700)).unwrap();
    // $XDG_RUNTIME_DIR/cluster is a symlink to a directory of the same user.
    std::os::unix::fs::symlink(&elsewhere, runtime.0.join("cluster")).unwrap();
    let env = [("CLUSTER_WORKERS", "1"), ("XDG_RUNTIME_DIR", runtime.path())];
    let server = Server::start("hello", &env, 1);
    server.wait_event("control_failed", T, |_| true);
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "nothing was created through the link");
    drop(server);

    // A real directory, but others may write to it.
    std::fs::remove_file(runtime.0.join("cluster")).unwrap();
    std::fs::create_dir(runtime.0.join("cluster")).unwrap();
    std::fs::set_permissions(runtime.0.join("cluster"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let server = Server::start("hello", &env, 1);
    let failed = server.wait_event("control_failed", T, |_| true);
    assert!(failed["error"].as_str().unwrap().contains("writable by others"), "{failed}");
    assert_eq!(std::fs::read_dir(runtime.0.join("cluster")).unwrap().count(), 0);
}

/// Runs `hello` with one odd variable; returns its exit code and stderr (a cluster that
/// started anyway is stopped, and reported as `None`).
fn start_with(name: &str, value: &std::ffi::OsStr) -> (Option<i32>, String) {
    let mut child = Command::new(example_bin("hello"))
        .env("PORT", "0")
        .env("CLUSTER_CONTROL_SOCKET", "off")
        .env(name, value)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It should exit at once; one that started anyway is stopped after the deadline.
    let deadline = std::time::Instant::now() + T;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status.and_then(|s| s.code()), stderr)
}

#[test]
fn environment_values_with_odd_bytes_are_refused_with_a_message() {
    use std::os::unix::ffi::OsStrExt;
    let cases: [(&str, &[u8]); 6] = [
        ("CLUSTER_WORKERS", b"\xff"),
        ("CLUSTER_WORKERS", "٢".as_bytes()),
        ("CLUSTER_NAME", b"a\nb"),
        ("CLUSTER_NAME", b"../../etc"),
        ("CLUSTER_PID_FILE", b"relative/pid"),
        ("CLUSTER_SCHED_POLICY", b"rr\x1b[31m"),
    ];
    for (name, value) in cases {
        let (code, stderr) = start_with(name, std::ffi::OsStr::from_bytes(value));
        assert_eq!(code, Some(2), "{name}={value:?}: {stderr}");
        assert!(stderr.contains(name), "{name}={value:?}: the message names the variable: {stderr}");
    }
}

#[test]
fn a_worker_naming_another_process_in_its_hello_gets_itself_killed_not_that_process() {
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    let dir = TempDir::new("sec-liar");
    let marker = dir.0.join("marker");
    let pid = bystander.id().to_string();
    let env = [("GARBAGE_MARKER", marker.to_str().unwrap()), ("GARBAGE_KIND", "liar"), ("GARBAGE_PID", pid.as_str())];
    let server = Server::start_path(env!("CARGO_BIN_EXE_garbage-worker").into(), &env, 1);
    let seen = server.wait_event("protocol_error", T, |e| e["id"] == 2);
    let liar = seen["pid"].as_u64().unwrap() as u32;
    assert_ne!(liar, bystander.id(), "the master names the process it started, not the one it was told");
    wait_for(T, "the liar to be killed", || (!alive(liar)).then_some(()));
    assert!(alive(bystander.id()), "the named process is untouched");
    assert!(bystander.try_wait().unwrap().is_none());
    kill(bystander.id(), libc::SIGKILL);
    let _ = bystander.wait();
}
