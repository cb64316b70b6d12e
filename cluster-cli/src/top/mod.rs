//! `clusterctl top`: the cluster live in the terminal (ratatui on crossterm).
//!
//! One `watch` request streams the history, then the status each interval and the log records
//! (`cluster-core/src/master/watch.rs`); a thread reads it, another reads the keys, and the
//! screen is drawn when either brings something, so an idle view costs nothing between two
//! statuses. A key's command (reload, scale, restart) runs on a connection of its own, its
//! outcome shown on the last line. When the stream ends (the master was upgraded, or stopped),
//! the view reconnects to the master of the same name. The terminal is restored on every exit,
//! a panic's included.

mod draw;
mod model;

use std::io::{IsTerminal, stdout};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute};
use serde_json::{Value, json};

use crate::client::{self, Conn, Fail, cmd};
use draw::Palette;
use model::Model;

/// Log records asked for when the view opens.
const LOG_TAIL: usize = 50;
/// Most redraws a second, whatever the log brings.
const MIN_FRAME: Duration = Duration::from_millis(50);

enum Input {
    Line(Value),
    /// The stream ended, and why; `refused`: the master answered the request with an error
    /// (an older master without `watch`), so asking again would get the same.
    Gone {
        why: String,
        refused: bool,
    },
    Key(event::KeyEvent),
    Resize,
    /// A command's outcome.
    Done(String),
}

/// Where to find the master again: its socket, or, after it went away, its name.
struct Target {
    path: PathBuf,
    name: Option<String>,
}

pub(crate) fn run(path: PathBuf, interval: Duration) -> Result<(), Fail> {
    if !stdout().is_terminal() {
        return Err("top draws on a terminal; for a script use `status --json` or the `watch` request".into());
    }
    // Connect before taking over the screen: a wrong target is an error on a normal terminal.
    let conn = Conn::open(&path)?;
    let name = conn.greeting["name"].as_str().map(str::to_string);
    let target = Target { path, name };
    let colour = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let (tx, rx) = mpsc::channel();
    stream(conn, interval, tx.clone());
    keys(tx.clone());
    let mut terminal = ratatui::init();
    let _restore = Restore;
    let result = view(&mut terminal, rx, tx, target, interval, Palette { colour });
    drop(terminal);
    result
}

/// Restores the terminal when dropped (`ratatui::init` restores it on a panic).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
        let _ = execute!(stdout(), cursor::Show);
    }
}

fn view(
    terminal: &mut ratatui::DefaultTerminal,
    rx: Receiver<Input>,
    tx: Sender<Input>,
    mut target: Target,
    interval: Duration,
    palette: Palette,
) -> Result<(), Fail> {
    let mut m = Model::default();
    let mut busy = false;
    let mut reconnect: Option<Instant> = None;
    let mut drawn = Instant::now() - MIN_FRAME;
    loop {
        terminal.draw(|f| draw::draw(f, &m, palette)).map_err(|e| format!("cannot draw: {e}"))?;
        drawn = drawn.max(Instant::now());
        // Wait for something, then take whatever else came meanwhile before drawing again.
        let wait = reconnect.map_or(Duration::from_secs(3600), |at| at.saturating_duration_since(Instant::now()));
        let mut next = match rx.recv_timeout(wait) {
            Ok(input) => Some(input),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let until = drawn + MIN_FRAME;
        loop {
            match next.take() {
                Some(Input::Line(line)) => {
                    if let Some(name) = line["status"]["master"]["name"].as_str() {
                        target.name = Some(name.to_string());
                    }
                    m.ingest(&line);
                }
                Some(Input::Gone { why, refused: true }) => m.message = format!("the master refused: {why}"),
                Some(Input::Gone { why, refused: false }) => {
                    m.message = format!("{why}; reconnecting…");
                    reconnect = Some(Instant::now() + Duration::from_millis(250));
                }
                Some(Input::Key(key)) if key.kind != KeyEventKind::Release => {
                    let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
                    if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                    if let Some((request, doing)) = command(&key.code, &m) {
                        if busy {
                            m.message = "a command is still running".into();
                        } else {
                            busy = true;
                            m.message = doing;
                            call(&target.path, request, tx.clone());
                        }
                    }
                    match key.code {
                        KeyCode::Up => m.select(-1),
                        KeyCode::Down => m.select(1),
                        KeyCode::Char('k') if m.selected_id().is_none() => {
                            m.message = "select a worker (↑↓) to restart".into();
                        }
                        _ => {}
                    }
                }
                Some(Input::Done(outcome)) => {
                    busy = false;
                    m.message = outcome;
                }
                Some(Input::Key(_) | Input::Resize) | None => {}
            }
            if reconnect.is_some_and(|at| at <= Instant::now()) {
                reconnect = match again(&mut target) {
                    Ok(conn) => {
                        m.message = "reconnected".into();
                        stream(conn, interval, tx.clone());
                        None
                    }
                    Err(_) => Some(Instant::now() + Duration::from_millis(500)),
                };
            }
            let left = until.saturating_duration_since(Instant::now());
            next = match rx.recv_timeout(left) {
                Ok(input) => Some(input),
                Err(_) => break,
            };
        }
    }
}

/// The request a key asks for, and what the last line says meanwhile.
fn command(key: &KeyCode, m: &Model) -> Option<(Value, String)> {
    match key {
        KeyCode::Char('r') => Some((cmd("reload"), "reloading…".into())),
        KeyCode::Char('+' | '=') => Some((json!({"cmd": "scale", "workers": "+1"}), "scaling up…".into())),
        KeyCode::Char('-') => Some((json!({"cmd": "scale", "workers": "-1"}), "scaling down…".into())),
        KeyCode::Char('k') => {
            let id = m.selected_id()?;
            Some((json!({"cmd": "restart", "id": id}), format!("restarting worker {id}…")))
        }
        _ => None,
    }
}

/// Runs `request` on a connection of its own and reports its outcome.
fn call(path: &std::path::Path, request: Value, tx: Sender<Input>) {
    let path = path.to_path_buf();
    thread::spawn(move || {
        let outcome = match Conn::open(&path).and_then(|mut c| c.call(&request, |_| {})) {
            Ok(reply) if reply["ok"] == Value::Bool(true) => done(&request, &reply),
            Ok(reply) => format!("refused: {}", client::error_of(&reply)),
            Err(e) => format!("failed: {e}"),
        };
        let _ = tx.send(Input::Done(outcome));
    });
}

/// What a command that succeeded did.
fn done(request: &Value, r: &Value) -> String {
    match request["cmd"].as_str() {
        Some("reload") => format!("reloaded: {} replaced in {} ms", r["replaced"], r["took_ms"]),
        Some("scale") => format!("workers: {} -> {}", r["from"], r["to"]),
        Some("restart") => format!("worker {} restarted: pid {} -> {}", r["id"], r["old_pid"], r["pid"]),
        _ => "done".into(),
    }
}

/// Finds the master again: at the same socket, or by name (an upgrade names the socket after
/// the new master).
fn again(target: &mut Target) -> Result<Conn, Fail> {
    if let Ok(conn) = Conn::open(&target.path) {
        return Ok(conn);
    }
    let path = client::resolve(None, target.name.as_deref())?;
    let conn = Conn::open(&path)?;
    target.path = path;
    Ok(conn)
}

/// Reads the `watch` stream on a thread of its own.
fn stream(mut conn: Conn, interval: Duration, tx: Sender<Input>) {
    thread::spawn(move || {
        let request = json!({"cmd": "watch", "interval_ms": interval.as_millis() as u64, "logs": LOG_TAIL});
        if let Err(why) = conn.send(&request) {
            let _ = tx.send(Input::Gone { why, refused: false });
            return;
        }
        let mut streamed = false;
        loop {
            let (why, refused) = match conn.next() {
                // An error before anything was streamed is an answer to the request; later,
                // the master is stopping.
                Ok(Some(line)) if line.get("ok").is_some() => (client::error_of(&line), !streamed),
                Ok(Some(line)) => {
                    streamed = true;
                    if tx.send(Input::Line(line)).is_err() {
                        return;
                    }
                    continue;
                }
                Ok(None) => ("the master closed the connection".into(), false),
                Err(e) => (e, false),
            };
            let _ = tx.send(Input::Gone { why, refused });
            return;
        }
    });
}

/// Reads the keys (and resizes) on a thread of its own.
fn keys(tx: Sender<Input>) {
    thread::spawn(move || {
        loop {
            let input = match event::read() {
                Ok(Event::Key(key)) => Input::Key(key),
                Ok(Event::Resize(..)) => Input::Resize,
                Ok(_) => continue,
                Err(_) => return,
            };
            if tx.send(input).is_err() {
                return;
            }
        }
    });
}
