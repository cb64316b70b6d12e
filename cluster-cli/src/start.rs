//! `clusterctl start`: runs a program built on the library as a master in the background, as
//! `pm2 start` does, and its log writer.
//!
//! Two processes, each in a session of its own (`setsid`, so a closed terminal or a Ctrl-C
//! there reaches neither), and neither a child of the shell once `start` returns: the master,
//! and `clusterctl log-writer`, which reads a pipe that is the master's stdout and stderr (and
//! so its workers', which inherit them or are captured through the master) and writes it to
//! `<log dir>/<name>.log`. The writer rotates the file before a write would take it past its
//! cap (`NAME.log.1` … `NAME.log.K`), cutting at line ends: no file is ever over the cap,
//! whatever the flood (a file the master wrote itself could only be rotated after the fact).
//! `start` returns once every worker is ready, or exits 1 with the master's last words.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{self, Conn, Fail, cmd};
use crate::show;

/// What `start` was asked for.
pub(crate) struct Start {
    pub(crate) name: Option<String>,
    pub(crate) workers: Option<String>,
    pub(crate) log_dir: Option<PathBuf>,
    pub(crate) log_max: u64,
    pub(crate) log_files: u32,
    pub(crate) wait: Duration,
    pub(crate) program: Vec<OsString>,
}

/// The default directory of log files: `logs` in the control sockets' directory.
pub(crate) fn log_dir() -> PathBuf {
    cluster::control::socket_dir().join("logs")
}

pub(crate) fn start(s: Start) -> Result<(), Fail> {
    let program = PathBuf::from(&s.program[0]);
    let name = match s.name {
        Some(name) => name,
        None => name_of(&program),
    };
    if !cluster::control::valid_name(&name) {
        return Err(format!("{name:?} cannot name a cluster: 1 to 64 letters, digits, '.', '_' or '-'"));
    }
    if let Some(found) = client::running().into_iter().find(|f| f.name == name) {
        return Err(format!("a master named {name} is already running (pid {}); --name gives another", found.pid));
    }
    if std::env::var_os(cluster::env::ENV_CONTROL_SOCKET).is_some() {
        return Err(format!(
            "start finds the master by its control socket: unset {}",
            cluster::env::ENV_CONTROL_SOCKET
        ));
    }
    let dir = s.log_dir.unwrap_or_else(log_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot make the log directory {}: {e}", dir.display()))?;
    let file = dir.join(format!("{name}.log"));

    // The writer first: its stdin is the pipe every process of the cluster writes to.
    let me = std::env::current_exe().map_err(|e| format!("cannot find clusterctl itself: {e}"))?;
    let mut writer = Command::new(me);
    writer
        .arg("log-writer")
        .arg(&file)
        .args(["--max-bytes", &s.log_max.to_string(), "--keep", &s.log_files.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cluster::control::detach(&mut writer);
    let mut writer = writer.spawn().map_err(|e| format!("cannot start the log writer: {e}"))?;
    let pipe = OwnedFd::from(writer.stdin.take().expect("piped"));
    let err = pipe.try_clone().map_err(|e| e.to_string())?;

    let mut master = Command::new(&program);
    master.args(&s.program[1..]).env(cluster::env::ENV_NAME, &name).stdin(Stdio::null());
    master.stdout(Stdio::from(pipe)).stderr(Stdio::from(err));
    // Workers' lines through the master (prefixed, and in `clusterctl logs`), and records as
    // JSON, which `clusterctl logs` reads back from the file; unless the user chose otherwise.
    for (var, value) in [(cluster::env::ENV_LOG_CAPTURE, "1"), (cluster::env::ENV_LOG_FORMAT, "json")] {
        if std::env::var_os(var).is_none() {
            master.env(var, value);
        }
    }
    if let Some(n) = &s.workers {
        master.env(cluster::ENV_WORKERS, n);
    }
    cluster::control::detach(&mut master);
    let spawned = master.spawn();
    // This process's copies of the pipe: the writer ends when the cluster's are all closed.
    drop(master);
    let mut child = spawned.map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let pid = child.id();
    let socket = cluster::control::socket_dir().join(cluster::control::socket_file_name(&name, pid));
    let deadline = Instant::now() + s.wait;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            wait_a_little(&mut writer);
            let reason = start_failure(&file).unwrap_or_else(|| format!("{status}"));
            let said = tail(&file, 6).join("\n  ");
            return Err(format!(
                "{name} (pid {pid}) could not start: {reason}\nthe end of its log, {}:\n  {said}",
                file.display()
            ));
        }
        if let Some(reply) = Conn::open(&socket).ok().and_then(|mut c| c.call(&cmd("status"), |_| {}).ok()) {
            let m = &reply["master"];
            let (ready, target) = (m["workers_ready"].as_u64().unwrap_or(0), m["workers_target"].as_u64().unwrap_or(1));
            if reply["ok"] == Value::Bool(true) && ready >= target.max(1) {
                print!("{}", show::status(&reply, false));
                println!("started {name} in the background (master pid {pid}); log: {}", file.display());
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{name} (pid {pid}) is not ready after {} s; it goes on starting (clusterctl status -t {name}, clusterctl logs -t {name})",
                s.wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A cluster's name from its program's file name, as the master makes its default one.
fn name_of(program: &Path) -> String {
    let file = program.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let cleaned: String = file
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .take(64)
        .collect();
    let cleaned = cleaned.trim_start_matches(['.', '-']).to_string();
    if cluster::control::valid_name(&cleaned) { cleaned } else { "cluster".to_string() }
}

/// Why the master said its start failed, from its log: the reason of its `start_failed`
/// record, the message of its last error, or its last line.
fn start_failure(file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let records: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let failed = records.iter().rev().find(|r| r["event"] == "start_failed").and_then(|r| r["reason"].as_str());
    let error = || records.iter().rev().find(|r| r["level"] == "ERROR").and_then(|r| r["message"].as_str());
    let last = || text.lines().last();
    failed.or_else(error).or_else(last).map(str::to_string)
}

/// Gives the log writer a moment to write what the master said last.
fn wait_a_little(writer: &mut Child) {
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until && matches!(writer.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of a log file (of `file.1` too when `file` has fewer), log records
/// shown as `clusterctl logs` shows them.
pub(crate) fn tail(file: &Path, n: usize) -> Vec<String> {
    let read = |path: &Path| std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let mut text = read(file);
    if text.lines().count() < n {
        let mut older = OsString::from(file.as_os_str());
        older.push(".1");
        text = read(Path::new(&older)) + &text;
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(record @ Value::Object(_)) if record.get("message").is_some() => show::record(&record, false),
            _ => l.to_string(),
        })
        .collect()
}

/// `clusterctl log-writer FILE`: copies stdin to `file`, rotated at `max` bytes, `keep` old
/// files kept; ends at the end of its input (when every process of the cluster is gone).
pub(crate) fn log_writer(file: &Path, max: u64, keep: u32) -> Result<(), Fail> {
    let mut out = Rotating::open(file, max.max(1), keep)?;
    let mut input = std::io::stdin().lock();
    let mut buf = vec![0u8; 64 * 1024];
    // An unfinished line waits for its end (up to a buffer's worth), so a rotation cuts
    // between lines.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot read the log: {e}")),
        };
        pending.extend_from_slice(&buf[..n]);
        let whole = match pending.iter().rposition(|b| *b == b'\n') {
            Some(at) => at + 1,
            None if pending.len() >= buf.len() => pending.len(),
            None => continue,
        };
        out.write(&pending[..whole])?;
        pending.drain(..whole);
    }
    out.write(&pending)
}

/// A log file that never grows past `max` bytes: it is rotated first.
struct Rotating {
    path: PathBuf,
    file: File,
    size: u64,
    max: u64,
    keep: u32,
}

impl Rotating {
    fn open(path: &Path, max: u64, keep: u32) -> Result<Rotating, Fail> {
        let file = append(path)?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        let mut r = Rotating { path: path.to_path_buf(), file, size, max, keep };
        if r.size >= max {
            r.rotate()?;
        }
        Ok(r)
    }

    /// Writes `data`, rotating before a line that would not fit; a line longer than a whole
    /// file is cut.
    fn write(&mut self, mut data: &[u8]) -> Result<(), Fail> {
        while !data.is_empty() {
            let room = usize::try_from(self.max - self.size).unwrap_or(usize::MAX);
            if data.len() <= room {
                return self.put(data);
            }
            match data[..room].iter().rposition(|b| *b == b'\n') {
                Some(at) => {
                    self.put(&data[..=at])?;
                    data = &data[at + 1..];
                }
                None if self.size > 0 => {}
                None => {
                    self.put(&data[..room])?;
                    data = &data[room..];
                }
            }
            self.rotate()?;
        }
        Ok(())
    }

    fn put(&mut self, data: &[u8]) -> Result<(), Fail> {
        self.file.write_all(data).map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        self.size += data.len() as u64;
        Ok(())
    }

    /// `NAME.log` becomes `NAME.log.1`, `.1` becomes `.2` …, the oldest past `keep` goes.
    fn rotate(&mut self) -> Result<(), Fail> {
        let numbered = |i: u32| {
            let mut p = OsString::from(self.path.as_os_str());
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            for i in (1..self.keep).rev() {
                let _ = std::fs::rename(numbered(i), numbered(i + 1));
            }
            let _ = std::fs::rename(&self.path, numbered(1));
        }
        self.file = append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn append(path: &Path) -> Result<File, Fail> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
            .collect();
        all.sort();
        all
    }

    #[test]
    fn a_log_file_is_rotated_at_line_ends_before_it_passes_its_cap() {
        let dir = tempdir("rotate");
        let path = dir.join("app.log");
        let mut log = Rotating::open(&path, 100, 2).unwrap();
        for i in 0..40 {
            log.write(format!("line {i:03} of the log\n").as_bytes()).unwrap(); // 20 bytes each
        }
        let all = files(&dir);
        assert_eq!(all, [("app.log".into(), 100), ("app.log.1".into(), 100), ("app.log.2".into(), 100)]);
        let newest = std::fs::read_to_string(&path).unwrap();
        assert!(newest.starts_with("line 035 ") && newest.ends_with("line 039 of the log\n"), "{newest}");
        assert_eq!(tail(&path, 7).len(), 7);
        assert_eq!(tail(&path, 7)[0], "line 033 of the log", "the tail reaches into the file before");
    }

    #[test]
    fn a_line_longer_than_a_file_is_cut_and_an_oversized_file_is_rotated_on_open() {
        let dir = tempdir("long");
        let path = dir.join("app.log");
        std::fs::write(&path, vec![b'x'; 150]).unwrap();
        let mut log = Rotating::open(&path, 100, 1).unwrap();
        log.write(&[b'y'; 250]).unwrap();
        log.write(b"end\n").unwrap();
        let all = files(&dir);
        assert!(all.iter().all(|(_, len)| *len <= 100), "{all:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{}end\n", "y".repeat(50)));
    }

    #[test]
    fn keeping_no_old_file_starts_the_file_over() {
        let dir = tempdir("none");
        let path = dir.join("app.log");
        let mut log = Rotating::open(&path, 10, 0).unwrap();
        log.write(b"12345678\nabc\n").unwrap();
        assert_eq!(files(&dir), [("app.log".into(), 4)]);
    }

    #[test]
    fn a_name_is_made_from_the_program_as_the_master_makes_it() {
        assert_eq!(name_of(Path::new("target/release/hello")), "hello");
        assert_eq!(name_of(Path::new("/opt/my app")), "my_app");
        assert_eq!(name_of(Path::new("/")), "cluster");
    }

    fn tempdir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("clusterctl-test-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
