//! `clusterctl`: drives running cluster masters through their control sockets.
//!
//! Exit codes: 0 done, 1 refused or failed (with a message on stderr), 2 usage.

mod client;
mod show;
mod start;
mod top;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use client::{Conn, Fail, cmd, error_of};

/// Status, a live view, reload, scale, restart, stop, logs and metrics of running cluster masters.
#[derive(Parser)]
#[command(name = "clusterctl", version, about, disable_help_subcommand = true)]
struct Cli {
    /// The master's control socket.
    #[arg(short, long, global = true, value_name = "PATH", conflicts_with = "target")]
    socket: Option<PathBuf>,
    /// The master, by name or pid (default: the only one running).
    #[arg(short, long, global = true, value_name = "NAME|PID")]
    target: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Starts PROGRAM (a binary built on the cluster library) as a master in the background:
    /// its own session, its output in a log file with rotation; returns once its workers are
    /// ready (exit 1, with the reason, if it cannot start).
    Start {
        /// The cluster's name (default: the program's file name).
        #[arg(long)]
        name: Option<String>,
        /// Workers to start (CLUSTER_WORKERS; default: the program's own setting).
        #[arg(short, long)]
        workers: Option<String>,
        /// Where the log files go (default: `logs` in the control sockets' directory).
        #[arg(long, value_name = "DIR")]
        log_dir: Option<PathBuf>,
        /// A log file is rotated before it grows past this many bytes.
        #[arg(long, default_value_t = 10 << 20, value_parser = clap::value_parser!(u64).range(1024..))]
        log_max_bytes: u64,
        /// Rotated log files kept (NAME.log.1 …).
        #[arg(long, default_value_t = 3)]
        log_files: u32,
        /// Give up waiting for the workers after this many seconds (the master goes on).
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// The program and its arguments.
        #[arg(required = true, last = true, value_name = "PROGRAM [ARGS]...")]
        program: Vec<std::ffi::OsString>,
    },
    /// Copies stdin to a log file with rotation (what `start` runs next to a master).
    #[command(hide = true)]
    LogWriter {
        file: PathBuf,
        #[arg(long)]
        max_bytes: u64,
        #[arg(long)]
        keep: u32,
    },
    /// Lists the running masters of this user.
    Ls {
        /// JSON, one array.
        #[arg(long)]
        json: bool,
    },
    /// The master and its workers: id, pid, state, uptime, restarts, cpu, memory, connections.
    Status {
        /// The master's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The cluster live: workers, connections per second, the master's CPU and memory, the
    /// log; keys r reload, +/- scale, ↑↓ select, k restart, q quit.
    Top {
        /// Milliseconds between two updates.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
        interval: u64,
    },
    /// Replaces every worker with the binary on disk, one by one; returns when done (exit 1 if
    /// the reload was abandoned: the old workers keep serving).
    Reload,
    /// Sets the number of workers: N, +N or -N.
    #[command(allow_negative_numbers = true)]
    Scale {
        /// N, +N or -N.
        #[arg(value_parser = parse_scale)]
        workers: String,
    },
    /// Replaces one worker, the new process first.
    Restart {
        /// The worker id.
        id: u32,
    },
    /// Stops the cluster: workers finish their connections (`--fast`: they are killed).
    Stop {
        /// Kill the workers instead of letting them finish.
        #[arg(long)]
        fast: bool,
        /// Give up waiting after this many seconds (the master goes on stopping).
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Replaces the master itself by the binary on disk.
    Upgrade,
    /// The master's recent events (and workers' output, with `CLUSTER_LOG_CAPTURE=1`).
    Logs {
        /// Keep printing new ones.
        #[arg(short, long)]
        follow: bool,
        /// How many recent ones.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// The records as JSON, one per line.
        #[arg(long)]
        json: bool,
        /// Where a master started by `start` that is gone left its log (default: `logs` in the
        /// control sockets' directory).
        #[arg(long, value_name = "DIR")]
        log_dir: Option<PathBuf>,
    },
    /// Metrics in Prometheus' text format: the master's, then the application's (summed over
    /// workers; `--per-worker`: counters and histograms per worker id).
    Metrics {
        /// The application's counters and histograms per worker id (label `worker`).
        #[arg(long)]
        per_worker: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("clusterctl: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), Fail> {
    match cli.command {
        Command::Ls { json } => return ls(json),
        Command::Start { name, workers, log_dir, log_max_bytes, log_files, wait, program } => {
            let wait = Duration::from_secs(wait);
            let log_max = log_max_bytes;
            return start::start(start::Start { name, workers, log_dir, log_max, log_files, wait, program });
        }
        Command::LogWriter { file, max_bytes, keep } => return start::log_writer(&file, max_bytes, keep),
        _ => {}
    }
    let path = match (client::resolve(cli.socket.as_deref(), cli.target.as_deref()), &cli.command) {
        (Ok(path), _) => path,
        // A master `start` ran that is gone: its log file.
        (Err(e), Command::Logs { lines, log_dir, .. }) => return logs_of_gone(e, cli.target, log_dir.clone(), *lines),
        (Err(e), _) => return Err(e),
    };
    let mut conn = Conn::open(&path)?;
    let colour = std::io::stdout().is_terminal();
    match cli.command {
        Command::Ls { .. } | Command::Start { .. } | Command::LogWriter { .. } => unreachable!("handled above"),
        Command::Status { json } => {
            let reply = ok(conn.call(&cmd("status"), |_| {})?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply).expect("JSON"));
            } else {
                print!("{}", show::status(&reply, colour));
            }
        }
        Command::Top { interval } => {
            drop(conn);
            return top::run(path, Duration::from_millis(interval));
        }
        Command::Reload => {
            let reply = conn.call(&cmd("reload"), |line| progress(line, colour))?;
            let reply = ok(reply)?;
            let replaced = reply["replaced"].as_u64().unwrap_or(0);
            println!(
                "reloaded: {replaced} worker process(es) replaced in {} ms",
                reply["took_ms"].as_u64().unwrap_or(0)
            );
        }
        Command::Scale { workers } => {
            let reply = ok(conn.call(&json!({"cmd": "scale", "workers": workers}), |_| {})?)?;
            println!("workers: {} -> {}", reply["from"], reply["to"]);
        }
        Command::Restart { id } => {
            let reply = ok(conn.call(&json!({"cmd": "restart", "id": id}), |line| progress(line, colour))?)?;
            println!("worker {id} restarted: pid {} -> pid {}", reply["old_pid"], reply["pid"]);
        }
        Command::Stop { fast, timeout } => {
            let reply = ok(conn.call(&json!({"cmd": "stop", "fast": fast}), |_| {})?)?;
            let pid = reply["pid"].as_u64().unwrap_or(0);
            eprintln!("stopping master {pid}{}...", if fast { " (fast)" } else { "" });
            // The master closes the connection as it exits.
            let deadline = Instant::now() + Duration::from_secs(timeout);
            conn.set_timeout(Duration::from_secs(timeout.max(1)))?;
            loop {
                match conn.next() {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) if Instant::now() >= deadline => {
                        return Err(format!("master {pid} is still stopping after {timeout} s"));
                    }
                    Err(_) => break, // reset as it exited
                }
            }
            while client::alive(pid as u32) {
                if Instant::now() >= deadline {
                    return Err(format!("master {pid} is still running after {timeout} s"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            println!("stopped");
        }
        Command::Upgrade => {
            let reply = ok(conn.call(&cmd("upgrade"), |line| progress(line, colour))?)?;
            println!(
                "upgraded: master {} serves; master {} retires (took {} ms)",
                reply["pid"],
                reply["old_pid"],
                reply["took_ms"].as_u64().unwrap_or(0)
            );
        }
        Command::Logs { follow, lines, json, .. } => {
            conn.send(&json!({"cmd": "logs", "lines": lines, "follow": follow}))?;
            let mut out = std::io::stdout().lock();
            while let Some(line) = conn.next()? {
                if let Some(record) = line.get("log") {
                    let text = if json { record.to_string() } else { show::record(record, colour) };
                    if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                        return Ok(()); // stdout closed (a pager quit)
                    }
                } else if let Some(n) = line.get("dropped") {
                    eprintln!("clusterctl: {n} record(s) dropped (this reader was too slow)");
                } else if line.get("ok").is_some() {
                    ok(line)?;
                    break;
                }
            }
        }
        Command::Metrics { per_worker } => {
            let reply = ok(conn.call(&json!({"cmd": "metrics", "per_worker": per_worker}), |_| {})?)?;
            print!("{}", reply["metrics"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

/// The last lines of the log file of a master that is gone (`start` wrote it), or `why` no
/// master was found when there is no such file.
fn logs_of_gone(why: Fail, target: Option<String>, dir: Option<PathBuf>, lines: usize) -> Result<(), Fail> {
    let Some(name) = target.filter(|t| cluster::control::valid_name(t) && t.parse::<u32>().is_err()) else {
        return Err(why);
    };
    let file = dir.unwrap_or_else(start::log_dir).join(format!("{name}.log"));
    if !file.exists() {
        return Err(format!("{why}; and no log file at {}", file.display()));
    }
    eprintln!("clusterctl: {name} is not running; its log file {}:", file.display());
    for line in start::tail(&file, lines) {
        println!("{line}");
    }
    Ok(())
}

/// A usage error (exit 2) for a count that is not N, +N or -N.
fn parse_scale(s: &str) -> Result<String, String> {
    s.parse::<cluster::master::Scale>().map(|_| s.to_string())
}

/// A final reply: itself if it says `ok`, its error otherwise.
fn ok(reply: Value) -> Result<Value, Fail> {
    if reply["ok"] == Value::Bool(true) { Ok(reply) } else { Err(error_of(&reply)) }
}

/// Prints a progress line of a long command.
fn progress(line: &Value, colour: bool) {
    if let Some(record) = line.get("progress") {
        eprintln!("{}", show::record(record, colour && std::io::stderr().is_terminal()));
    }
}

fn ls(json: bool) -> Result<(), Fail> {
    let mut rows = Vec::new();
    for found in client::running() {
        let status = Conn::open(&found.socket).and_then(|mut c| c.call(&cmd("status"), |_| {}));
        rows.push((found, status.ok().filter(|s| s["ok"] == Value::Bool(true))));
    }
    if json {
        let list: Vec<Value> = rows
            .iter()
            .map(|(f, s)| {
                let master = s.as_ref().map(|s| &s["master"]);
                json!({
                    "name": f.name,
                    "pid": f.pid,
                    "socket": f.socket.display().to_string(),
                    "workers_ready": master.map(|m| m["workers_ready"].clone()),
                    "workers_target": master.map(|m| m["workers_target"].clone()),
                    "uptime_ms": master.map(|m| m["uptime_ms"].clone()),
                })
            })
            .collect();
        println!("{}", Value::Array(list));
        return Ok(());
    }
    if rows.is_empty() {
        println!("no running master in {}", cluster::control::socket_dir().display());
        return Ok(());
    }
    print!("{}", show::ls(&rows));
    Ok(())
}
