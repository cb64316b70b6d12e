//! Finding a master's control socket and talking to it (newline-delimited JSON; see the
//! `cluster::control` module of the library).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use cluster::control::{PROTOCOL_VERSION, parse_socket_file_name, socket_dir};
use serde_json::{Value, json};

/// A failure to report: the message, and the exit code (1: refused or failed).
pub(crate) type Fail = String;

/// A running master, as found in the socket directory.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub(crate) name: String,
    pub(crate) pid: u32,
    pub(crate) socket: PathBuf,
}

/// Every master of this user with a socket in the socket directory whose process is alive.
pub(crate) fn running() -> Vec<Found> {
    let dir = socket_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut found: Vec<Found> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let (name, pid) = parse_socket_file_name(&file)?;
            alive(pid).then(|| Found { name: name.to_string(), pid, socket: e.path() })
        })
        .collect();
    found.sort_by(|a, b| (&a.name, a.pid).cmp(&(&b.name, b.pid)));
    found
}

/// Whether process `pid` runs (a zombie, exited and not yet reaped by its parent, does not).
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    state.is_some_and(|s| s != "Z" && s != "X")
}

/// The socket of the master named by `socket` (a path), or `target` (a name or a pid), or
/// the only one running.
pub(crate) fn resolve(socket: Option<&Path>, target: Option<&str>) -> Result<PathBuf, Fail> {
    if let Some(path) = socket {
        return Ok(path.to_path_buf());
    }
    let all = running();
    let listing = |list: &[Found]| {
        list.iter()
            .map(|f| format!("  {} (pid {}): {}", f.name, f.pid, f.socket.display()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let matching: Vec<Found> = match target {
        Some(t) => match t.parse::<u32>() {
            Ok(pid) => all.iter().filter(|f| f.pid == pid).cloned().collect(),
            Err(_) => all.iter().filter(|f| f.name == t).cloned().collect(),
        },
        None => all.clone(),
    };
    match (matching.len(), target) {
        (1, _) => Ok(matching[0].socket.clone()),
        (0, None) => Err(format!("no running master found in {}", socket_dir().display())),
        (0, Some(t)) if all.is_empty() => {
            Err(format!("no master {t:?}: no running master found in {}", socket_dir().display()))
        }
        (0, Some(t)) => Err(format!("no master {t:?}; running:\n{}", listing(&all))),
        (_, None) => {
            Err(format!("several masters are running; pick one with -t NAME|PID or -s PATH:\n{}", listing(&all)))
        }
        (_, Some(t)) => Err(format!("several masters are named {t:?}; pick one with -t PID:\n{}", listing(&matching))),
    }
}

/// A connection to a master's control socket.
pub(crate) struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The master's greeting.
    pub(crate) greeting: Value,
}

impl Conn {
    pub(crate) fn open(path: &Path) -> Result<Conn, Fail> {
        let stream = UnixStream::connect(path).map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut conn = Conn { reader: BufReader::new(stream), writer, greeting: Value::Null };
        let greeting = conn.next()?.ok_or_else(|| format!("{} closed the connection", path.display()))?;
        if greeting.get("ok") == Some(&Value::Bool(false)) {
            return Err(error_of(&greeting));
        }
        if greeting.get("cluster").and_then(Value::as_str) != Some("control") {
            return Err(format!("{} is not a cluster control socket", path.display()));
        }
        let version = greeting.get("version").and_then(Value::as_u64).unwrap_or(0);
        if version != u64::from(PROTOCOL_VERSION) {
            return Err(format!(
                "the master speaks control protocol {version}, this clusterctl speaks {PROTOCOL_VERSION}: use the clusterctl of the same release"
            ));
        }
        conn.greeting = greeting;
        Ok(conn)
    }

    /// Reads give up after `timeout`.
    pub(crate) fn set_timeout(&mut self, timeout: std::time::Duration) -> Result<(), Fail> {
        self.reader.get_ref().set_read_timeout(Some(timeout)).map_err(|e| e.to_string())
    }

    /// Sends one request.
    pub(crate) fn send(&mut self, request: &Value) -> Result<(), Fail> {
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).map_err(|e| format!("cannot send the request: {e}"))
    }

    /// The next line from the master; `None` when it closed the connection.
    pub(crate) fn next(&mut self) -> Result<Option<Value>, Fail> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => serde_json::from_str(&line).map(Some).map_err(|e| format!("bad reply from the master: {e}")),
            Err(e) => Err(format!("cannot read the reply: {e}")),
        }
    }

    /// Sends `request` and returns the final reply, passing every line before it to `each`.
    pub(crate) fn call(&mut self, request: &Value, mut each: impl FnMut(&Value)) -> Result<Value, Fail> {
        self.send(request)?;
        loop {
            let Some(line) = self.next()? else {
                return Err("the master closed the connection before answering".into());
            };
            if line.get("ok").is_some() {
                return Ok(line);
            }
            each(&line);
        }
    }
}

/// The message of a `{"ok": false, "error": …}` reply.
pub(crate) fn error_of(reply: &Value) -> String {
    reply.get("error").and_then(Value::as_str).unwrap_or("the master refused").to_string()
}

/// A request with no arguments.
pub(crate) fn cmd(name: &str) -> Value {
    json!({ "cmd": name })
}
