//! Helpers for the black-box tests: start example binaries as real processes, talk to them with
//! a real HTTP client, look at them through `/proc`, and wait with deadlines (never fixed sleeps).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Path of a binary of the `examples` crate, built once per test run.
pub fn example_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "examples", "-p", "cluster-cli", "--bins"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the examples failed");
    });
    target_dir().join(name)
}

/// `clusterctl` run with `XDG_RUNTIME_DIR=runtime_dir` (where the test's masters put their
/// control sockets): its exit code, stdout and stderr.
pub fn clusterctl(runtime_dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(example_bin("clusterctl"))
        .args(args)
        .env("XDG_RUNTIME_DIR", runtime_dir)
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .expect("run clusterctl");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// A directory of its own for a test (removed when dropped), e.g. as `XDG_RUNTIME_DIR`.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `/tmp/cluster-test-<name>-<pid>`, mode 0700, empty.
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("cluster-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
        TempDir(dir)
    }

    /// The directory, as a string.
    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn target_dir() -> PathBuf {
    // Test executables live in <target>/debug/deps/.
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(|deps| deps.parent()).expect("target dir").to_path_buf()
}

/// Polls `f` every 10 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    wait_until(timeout, what, || f().ok_or_else(String::new))
}

/// Polls `f` every 10 ms until it returns `Ok`, or panics after `timeout` with `what` and the
/// last `Err` (what was still missing).
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(missing) => {
                assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}{missing}")
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A cluster master started by a test, with its output captured. Killed with its workers
/// (each by pid: workers outlive a SIGKILLed master for up to its kill timeout) when dropped.
pub struct Server {
    child: Child,
    stdout: Lines,
    stderr: Lines,
    /// The address workers listen on, parsed from their "listening on http://…" lines.
    pub addr: SocketAddr,
}

impl Server {
    /// Starts `bin` with `env`, on 127.0.0.1 port 0, and waits until `workers` workers print
    /// that they listen.
    pub fn start(bin: &str, env: &[(&str, &str)], workers: usize) -> Server {
        Self::start_path(example_bin(bin), env, workers)
    }

    /// Like [`start`](Self::start) for any binary path.
    pub fn start_path(path: PathBuf, env: &[(&str, &str)], workers: usize) -> Server {
        let mut server = Self::spawn(path, env);
        server.addr = wait_for(Duration::from_secs(20), "workers to listen", || {
            let out = server.stdout();
            let addrs: Vec<&str> = out.lines().filter_map(|l| l.split("listening on http://").nth(1)).collect();
            (addrs.len() >= workers).then(|| addrs[0].trim().parse().expect("listening address"))
        });
        server
    }

    /// Starts `path` without waiting for anything.
    pub fn spawn(path: PathBuf, env: &[(&str, &str)]) -> Server {
        Self::spawn_with(path.as_os_str(), &[], env)
    }

    /// Starts `program args…` (a wrapper such as `unshare` or `systemd-socket-activate`, with
    /// the cluster's binary among its arguments) without waiting for anything; `pid()` is the
    /// wrapper's.
    pub fn spawn_with(program: &std::ffi::OsStr, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Server {
        let path = PathBuf::from(program);
        let mut cmd = Command::new(program);
        cmd.args(args);
        // The master's log as JSON lines: tests wait on its `event` fields, not on its wording.
        cmd.env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("CLUSTER_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // A process group of its own, as a service manager gives it (see `signal_group`).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {}: {e}", path.display()));
        let stdout = capture(child.stdout.take().expect("stdout"));
        let stderr = capture(child.stderr.take().expect("stderr"));
        Server { child, stdout, stderr, addr: "0.0.0.0:0".parse().unwrap() }
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the cluster printed on stdout so far.
    pub fn stdout(&self) -> String {
        join(&self.stdout)
    }

    /// Everything the cluster printed on stderr so far (the master's log).
    pub fn stderr(&self) -> String {
        join(&self.stderr)
    }

    /// The master's log events named `event` (its `event` field), with the time each was read.
    pub fn events(&self, event: &str) -> Vec<(Instant, serde_json::Value)> {
        let lines = self.stderr.lock().unwrap();
        // The master writes each JSON line with one write; a worker writing to the same stderr
        // at that moment may have put a piece of its own line in front of it.
        lines
            .iter()
            .filter_map(|(at, line)| Some((*at, line.find("{\"timestamp\"").map(|i| &line[i..])?)))
            .filter_map(|(at, json)| Some((at, serde_json::from_str::<serde_json::Value>(json).ok()?)))
            .filter(|(_, v)| v["target"] == "cluster" && v["event"] == event)
            .collect()
    }

    /// When the master logged each event named `event`, by its own clock (the `timestamp` field,
    /// as time since midnight UTC): unlike the time a line is read, not delayed by a loaded
    /// machine.
    pub fn event_times(&self, event: &str) -> Vec<(Duration, serde_json::Value)> {
        self.events(event).into_iter().filter_map(|(_, v)| Some((time_of_day(v["timestamp"].as_str()?)?, v))).collect()
    }

    /// Waits until the master has logged `n` events named `event`; returns them.
    pub fn wait_events(&self, event: &str, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        wait_until(timeout, &format!("{n} {event:?} events"), || {
            let found = self.events(event);
            if found.len() >= n {
                return Ok(found.into_iter().map(|(_, v)| v).collect());
            }
            Err(format!(" (saw {})\nstderr:\n{}", found.len(), self.stderr()))
        })
    }

    /// Waits until the master logs an event named `event` for which `matches` holds.
    pub fn wait_event(
        &self,
        event: &str,
        timeout: Duration,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_until(timeout, &format!("a matching {event:?} event"), || {
            self.events(event)
                .into_iter()
                .map(|(_, v)| v)
                .find(|v| matches(v))
                .ok_or_else(|| format!("\nstderr:\n{}", self.stderr()))
        })
    }

    /// Sends `signal` to the master.
    pub fn signal(&self, signal: libc::c_int) {
        kill(self.pid(), signal);
    }

    /// Sends `signal` to every process of the cluster at once (`kill -- -PGID`), as systemd's
    /// default `KillMode=control-group` and a terminal's Ctrl-C do.
    pub fn signal_group(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(-(self.pid() as libc::pid_t), signal) };
    }

    /// Waits up to `timeout` for the master to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pids of the master's live children (its workers).
    pub fn workers(&self) -> Vec<u32> {
        children(self.pid())
    }

    /// `GET path` on a new connection (`connection: close`).
    pub fn get(&self, path: &str) -> Response {
        get(self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}\nstderr:\n{}", self.stderr()))
    }

    /// `GET /worker`: (worker id, pid) of the worker that answered.
    pub fn which_worker(&self) -> (u32, u32) {
        parse_worker(&self.get("/worker").body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let workers = self.workers();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in workers {
            kill(pid, libc::SIGKILL);
        }
    }
}

/// Output lines with the time each was read.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

fn capture(mut pipe: impl Read + Send + 'static) -> Lines {
    let buf = Lines::default();
    let out = buf.clone();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(&mut pipe);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            out.lock().unwrap().push((Instant::now(), std::mem::take(&mut line)));
        }
    });
    buf
}

fn join(lines: &Lines) -> String {
    lines.lock().unwrap().iter().map(|(_, l)| l.as_str()).collect()
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    stat_cpu_time(&format!("/proc/{pid}/stat"))
}

/// CPU time (user + system) one thread of a process has used so far (`/proc/<tid>/stat` is the
/// whole process's; the task's own file is the thread's).
pub fn thread_cpu_time(pid: u32, tid: u32) -> Duration {
    stat_cpu_time(&format!("/proc/{pid}/task/{tid}/stat"))
}

fn stat_cpu_time(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the state.
    let ticks: u64 = [11, 12].iter().filter_map(|n| stat_field(&stat, *n)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Resident memory of a process, in bytes (0 once it is gone).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok()).unwrap_or(0);
    kib * 1024
}

/// What `wrk` reported.
#[derive(Debug, Default)]
pub struct WrkReport {
    /// Completed requests.
    pub requests: u64,
    /// Socket errors: connect, read, write, timeout.
    pub errors: [u64; 4],
    /// Responses with a status other than 2xx or 3xx.
    pub non2xx: u64,
    /// wrk's own output, for assertion messages.
    pub output: String,
}

/// Runs `wrk` against `http://addr/` with `args` (e.g. `-c32 -d8s`), one thread.
pub fn wrk(addr: SocketAddr, args: &[&str]) -> WrkReport {
    let out = Command::new("wrk")
        .arg("-t1")
        .args(args)
        .arg(format!("http://{addr}/"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run wrk ({e}); install it: apt-get install wrk"));
    let output = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wrk failed: {output}{}", String::from_utf8_lossy(&out.stderr));
    let mut report = WrkReport { output: output.clone(), ..WrkReport::default() };
    for line in output.lines().map(str::trim) {
        let nums: Vec<u64> = line.split([' ', ',']).filter_map(|w| w.parse().ok()).collect();
        if line.contains("requests in") {
            report.requests = nums.first().copied().unwrap_or(0);
        } else if line.starts_with("Socket errors:") {
            report.errors.copy_from_slice(&nums[..4]);
        } else if line.starts_with("Non-2xx") {
            report.non2xx = nums.first().copied().unwrap_or(0);
        }
    }
    report
}

/// Outcome of [`closed_loop`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LoadReport {
    /// Requests answered with 200.
    pub ok: u64,
    /// Connections refused by the kernel: nobody had accepted them.
    pub refused: u64,
    /// Requests that got in (connected) and then failed or got a non-200 answer.
    pub failed: u64,
}

/// `conns` clients, each sending `GET /` over keep-alive connections (reconnecting after
/// `connection: close`) until `until` returns true; every request sent on a connected socket
/// must be answered.
/// Returns a live count of answered requests and the handle that yields the report.
pub fn closed_loop(
    addr: SocketAddr,
    conns: usize,
    until: impl Fn() -> bool + Send + Sync + 'static,
) -> (Arc<AtomicU64>, std::thread::JoinHandle<LoadReport>) {
    use std::io::Write;
    let until = Arc::new(until);
    let answered = Arc::new(AtomicU64::new(0));
    let progress = answered.clone();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let until = until.clone();
            let answered = answered.clone();
            std::thread::spawn(move || {
                let mut report = LoadReport::default();
                'connect: while !until() {
                    let stream = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                        Ok(s) => s,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            report.refused += 1;
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(_) => {
                            report.failed += 1;
                            continue;
                        }
                    };
                    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut writer = stream;
                    while !until() {
                        let sent = writer.write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n");
                        match sent.map_err(|e| e.to_string()).and_then(|()| read_response(&mut reader)) {
                            Ok((200, close)) => {
                                report.ok += 1;
                                answered.fetch_add(1, Ordering::Relaxed);
                                if close {
                                    continue 'connect;
                                }
                            }
                            Ok(_) | Err(_) => {
                                report.failed += 1;
                                continue 'connect;
                            }
                        }
                    }
                }
                report
            })
        })
        .collect();
    let handle = std::thread::spawn(move || {
        threads.into_iter().map(|t| t.join().expect("load thread")).fold(LoadReport::default(), |a, b| LoadReport {
            ok: a.ok + b.ok,
            refused: a.refused + b.refused,
            failed: a.failed + b.failed,
        })
    });
    (progress, handle)
}

/// Reads one HTTP/1.1 response with a content-length body: (status, connection: close).
fn read_response(reader: &mut impl BufRead) -> Result<(u16, bool), String> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no status line")?;
    let (mut len, mut close) = (0usize, false);
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        let header = line.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(v) = header.strip_prefix("content-length:") {
            len = v.trim().parse().map_err(|_| "bad content-length")?;
        } else if header == "connection: close" {
            close = true;
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok((status, close))
}

/// Sends a signal to a process (ignoring "no such process").
pub fn kill(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| stat_field(&stat, 0) != Some("Z"))
}

/// Field `n` after the command name of a /proc/<pid>/stat line (0 = state, 1 = ppid).
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(n))
}

/// The parent of `pid`, if it runs.
pub fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&stat, 1)?.parse().ok()
}

/// Processes a test caused that are not its children (a master started by an upgrade outlives
/// its parent, the old master): SIGKILLed, if still running, when dropped (their workers follow
/// through PR_SET_PDEATHSIG).
#[derive(Default)]
pub struct Strays(pub Vec<u32>);

impl Drop for Strays {
    fn drop(&mut self) {
        for pid in &self.0 {
            if alive(*pid) {
                kill(*pid, libc::SIGKILL);
            }
        }
    }
}

/// Live children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat"))
            && stat_field(&stat, 1) == Some(&pid.to_string())
            && stat_field(&stat, 0) != Some("Z")
        {
            kids.push(child);
        }
    }
    kids.sort_unstable();
    kids
}

/// Socket inodes of the processes's open fds.
pub fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|link| link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// Holds every new TCP handshake towards `port` half-open on the listening sockets that
/// process `pid` owns: the test takes a copy of each (`pidfd_getfd`) and attaches a filter
/// that drops the segments carrying an ACK. Clients then finish `connect()` and send their
/// request, while the server side never sees their final ACK or their data; they retransmit
/// until the filter is gone (replaced by the process, or [`release`](Self::release)d). This
/// holds open, for as long as a test needs, the window between a server's SYN-ACK and the
/// client's ACK, microseconds on an idle loopback and an RTT on a network.
pub struct HeldHandshakes {
    sockets: Vec<socket2::Socket>,
}

impl HeldHandshakes {
    /// Panics when the sockets cannot be reached (no `pidfd_getfd`, or no permission).
    pub fn hold(pid: u32, port: u16) -> HeldHandshakes {
        // SAFETY: pidfd_open has no memory-safety preconditions; a valid result is a new fd.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        assert!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
        // SAFETY: pidfd is a new descriptor owned by nothing else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/<pid>/fd");
        let fds = dir.flatten().filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            link.to_str()?.starts_with("socket:").then(|| e.file_name().to_str()?.parse::<RawFd>().ok()).flatten()
        });
        let mut sockets = Vec::new();
        for fd in fds {
            // SAFETY: pidfd_getfd has no memory-safety preconditions; a valid result is a new fd.
            let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
            if copy < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.raw_os_error(), Some(libc::EBADF), "pidfd_getfd({pid}, {fd}): {e}");
                continue; // closed meanwhile
            }
            // SAFETY: `copy` is a new descriptor owned by nothing else.
            let socket = socket2::Socket::from(unsafe { OwnedFd::from_raw_fd(copy as RawFd) });
            let on_port = socket.local_addr().ok().and_then(|a| a.as_socket()).is_some_and(|a| a.port() == port);
            if on_port && socket.r#type().ok() == Some(socket2::Type::STREAM) && socket.is_listener().unwrap_or(false) {
                sockets.push(socket);
            }
        }
        assert!(!sockets.is_empty(), "process {pid} has no socket listening on port {port}");
        for socket in &sockets {
            socket.attach_filter(&DROP_ACKS).expect("attach a filter");
        }
        HeldHandshakes { sockets }
    }

    /// How many listening sockets hold handshakes.
    pub fn sockets(&self) -> usize {
        self.sockets.len()
    }

    /// How many of the sockets got another filter since (the process attached its own).
    pub fn taken_over(&self) -> usize {
        self.sockets.iter().filter(|s| filter_len(s) != Some(DROP_ACKS.len())).count()
    }

    /// Takes the filter off the sockets that still have it: their held handshakes complete
    /// with the client's next retransmission.
    pub fn release(&self) {
        for socket in self.sockets.iter().filter(|s| filter_len(s) == Some(DROP_ACKS.len())) {
            socket.detach_filter().expect("detach the filter");
        }
    }
}

/// Drops the TCP segments that carry an ACK (byte 13 of the TCP header holds the flags).
const DROP_ACKS: [socket2::SockFilter; 4] = [
    socket2::SockFilter::new((libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16, 0, 0, 13),
    socket2::SockFilter::new((libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16, 0, 1, 0x10),
    socket2::SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, 0),
    socket2::SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, u32::MAX),
];

/// The number of instructions of the socket's filter (`SO_GET_FILTER` with no room for them).
fn filter_len(socket: &socket2::Socket) -> Option<usize> {
    let mut len: libc::socklen_t = 0;
    // SAFETY: with a zero length the kernel writes nothing but the length.
    let ret = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_GET_FILTER, std::ptr::null_mut(), &mut len)
    };
    (ret == 0).then_some(len as usize)
}

/// Inode of the TCP socket listening on `port` (from /proc/net/tcp and tcp6).
pub fn listening_inode(port: u16) -> Option<u64> {
    kernel_sockets(&["/proc/net/tcp", "/proc/net/tcp6"], port).find(|s| s.state == 0x0A).map(|s| s.inode)
}

/// One line of a `/proc/net/{tcp,udp}*` table.
#[derive(Debug, Clone, Copy)]
pub struct KernelSocket {
    /// The TCP state (`0x01` established, `0x06` time-wait, `0x0A` listening, …); `0x07` for
    /// an unconnected UDP socket.
    pub state: u8,
    /// Its inode (0 for a socket no process holds, such as one in time-wait).
    pub inode: u64,
}

/// The sockets whose local port is `port` in the kernel's `tables` (such as `/proc/net/tcp`).
pub fn kernel_sockets(tables: &[&str], port: u16) -> impl Iterator<Item = KernelSocket> {
    let texts: Vec<String> = tables.iter().filter_map(|t| std::fs::read_to_string(t).ok()).collect();
    let mut out = Vec::new();
    for text in &texts {
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port =
                cols.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            let state = cols.get(3).and_then(|s| u8::from_str_radix(s, 16).ok());
            let inode = cols.get(9).and_then(|i| i.parse().ok());
            if let (Some(p), Some(state), Some(inode)) = (local_port, state, inode)
                && p == port
            {
                out.push(KernelSocket { state, inode });
            }
        }
    }
    out.into_iter()
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body as text.
    pub body: String,
    /// The `x-worker` header: which worker answered, for examples that say.
    pub worker: Option<u32>,
}

/// `GET path` over a new connection with a real HTTP/1.1 client (hyper), `connection: close`.
pub fn get(addr: SocketAddr, path: &str) -> Result<Response, String> {
    get_timeout(addr, path, Duration::from_secs(10))
}

/// [`get`] with an overall timeout.
pub fn get_timeout(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, String> {
    get_from(None, addr, path, timeout)
}

/// [`get_timeout`] from the client address `source` (any 127.0.0.0/8 address on loopback).
pub fn get_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<Response, String> {
    runtime().block_on(async {
        tokio::time::timeout(timeout, request(source, addr, path))
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    })
}

async fn request(source: Option<std::net::IpAddr>, addr: SocketAddr, path: &str) -> Result<Response, String> {
    use http_body_util::{BodyExt, Empty};
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
    let socket = socket.map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let stream = socket.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .header("connection", "close")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    let status = res.status().as_u16();
    let worker = res.headers().get("x-worker").and_then(|v| v.to_str().ok()?.parse().ok());
    let body = res.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok(Response { status, body: String::from_utf8_lossy(&body).into_owned(), worker })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap())
}

/// Parses `{"id":N,"pid":P}`.
pub fn parse_worker(body: &str) -> (u32, u32) {
    let num = |key: &str| -> u32 {
        let rest = body.split(&format!("\"{key}\":")).nth(1).unwrap_or_else(|| panic!("no {key} in {body:?}"));
        rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().expect("number")
    };
    (num("id"), num("pid"))
}

/// Waits until one of the server's workers blocks its runtime in a sleep (`hello`'s `/hang`);
/// returns its pid.
pub fn hung_worker(server: &Server, timeout: Duration) -> u32 {
    wait_for(timeout, "a worker to hang", || {
        server
            .workers()
            .into_iter()
            .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("nanosleep")))
    })
}

/// `2026-12-01T21:40:59.866049Z` → the time since midnight.
fn time_of_day(timestamp: &str) -> Option<Duration> {
    let time = timestamp.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s): (u64, u64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(Duration::from_secs(h * 3600 + m * 60) + Duration::from_secs_f64(s))
}
