//! How `clusterctl` prints: tables (like `pm2 ls`) and log records. Colour only when asked
//! (stdout is a terminal).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::client::Found;

/// The `status` reply as a header and a table of workers.
pub(crate) fn status(reply: &Value, colour: bool) -> String {
    let m = &reply["master"];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} · master pid {} · up {} · {} workers ready of {} · policy {}/{} · cluster {}{}{}",
        text(&m["name"]),
        m["pid"],
        ms(&m["uptime_ms"]),
        m["workers_ready"],
        m["workers_target"],
        text(&m["policy"]),
        text(&m["balancer"]),
        text(&m["version"]),
        if m["reloading"] == Value::Bool(true) { " · reloading" } else { "" },
        stopping(m),
    );
    let listeners: Vec<String> = m["listeners"].as_array().into_iter().flatten().map(text).collect();
    if !listeners.is_empty() {
        let _ = writeln!(out, "listening: {}", listeners.join(", "));
    }
    let headers = ["id", "pid", "state", "uptime", "restarts", "cpu", "memory", "conns"];
    let rows: Vec<Vec<(String, Option<&str>)>> = reply["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let state = text(&w["state"]);
            let shade = match state.as_str() {
                "ready" => "32",
                "backoff" => "31",
                _ => "33",
            };
            let uptime = match (w["restart_in_ms"].as_u64(), w["kill_in_ms"].as_u64()) {
                (Some(wait), _) => format!("restart in {}", human(Duration::from_millis(wait))),
                (None, Some(kill)) => {
                    format!("{}, killed in {}", ms(&w["uptime_ms"]), human(Duration::from_millis(kill)))
                }
                (None, None) => ms(&w["uptime_ms"]),
            };
            vec![
                (text(&w["id"]), None),
                (opt(&w["pid"]), None),
                (state, Some(shade)),
                (uptime, None),
                (w["restarts"].to_string(), None),
                (w["cpu_percent"].as_f64().map_or("-".into(), |c| format!("{c:.1}%")), None),
                (w["rss_bytes"].as_u64().map_or("-".into(), bytes), None),
                (opt(&w["connections_open"]), None),
            ]
        })
        .collect();
    out.push_str(&table(&headers, &rows, colour));
    out
}

/// `clusterctl ls`.
pub(crate) fn ls(rows: &[(Found, Option<Value>)]) -> String {
    let headers = ["name", "pid", "workers", "uptime", "socket"];
    let rows: Vec<Vec<(String, Option<&str>)>> = rows
        .iter()
        .map(|(f, status)| {
            let m = status.as_ref().map(|s| &s["master"]);
            let workers = m.map_or("unreachable".into(), |m| format!("{}/{}", m["workers_ready"], m["workers_target"]));
            vec![
                (f.name.clone(), None),
                (f.pid.to_string(), None),
                (workers, None),
                (m.map_or("-".into(), |m| ms(&m["uptime_ms"])), None),
                (f.socket.display().to_string(), None),
            ]
        })
        .collect();
    table(&headers, &rows, false)
}

/// One log record: `time level [event worker pid] message`.
pub(crate) fn record(r: &Value, colour: bool) -> String {
    let time = r["timestamp"].as_str().unwrap_or("");
    // 2026-12-01T23:04:05.123Z -> 23:04:05.123
    let time = time.get(11..23).unwrap_or(time);
    let level = r["level"].as_str().unwrap_or("INFO");
    let mut tags = Vec::new();
    if let Some(event) = r["event"].as_str() {
        tags.push(event.to_string());
    }
    if !r["id"].is_null() {
        tags.push(format!("worker {}", text(&r["id"])));
    }
    if !r["pid"].is_null() {
        tags.push(format!("pid {}", r["pid"]));
    }
    let message = r["message"].as_str().unwrap_or("");
    let level = match (colour, level) {
        (true, "WARN") => "\x1b[33mWARN\x1b[0m ".to_string(),
        (true, "ERROR") => "\x1b[31mERROR\x1b[0m".to_string(),
        _ => format!("{level:5}"),
    };
    format!("{time} {level} [{}] {message}", tags.join(" "))
}

/// A boxed table; cells may carry an ANSI colour, used only with `colour`.
fn table(headers: &[&str], rows: &[Vec<(String, Option<&str>)>], colour: bool) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, (cell, _)) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |left: &str, mid: &str, right: &str| {
        let parts: Vec<String> = widths.iter().map(|w| "─".repeat(w + 2)).collect();
        format!("{left}{}{right}\n", parts.join(mid))
    };
    let mut out = line("┌", "┬", "┐");
    let cells: Vec<String> = headers.iter().zip(&widths).map(|(h, w)| format!(" {h:w$} ")).collect();
    let _ = writeln!(out, "│{}│", cells.join("│"));
    out.push_str(&line("├", "┼", "┤"));
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|((cell, shade), w)| match (colour, shade) {
                (true, Some(shade)) => format!(" \x1b[{shade}m{cell:w$}\x1b[0m "),
                _ => format!(" {cell:w$} "),
            })
            .collect();
        let _ = writeln!(out, "│{}│", cells.join("│"));
    }
    out.push_str(&line("└", "┴", "┘"));
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn opt(v: &Value) -> String {
    if v.is_null() { "-".into() } else { v.to_string() }
}

fn ms(v: &Value) -> String {
    v.as_u64().map_or("-".into(), |ms| human(Duration::from_millis(ms)))
}

/// `45s`, `12m`, `3h`, `2d`.
pub(crate) fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

pub(crate) fn bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b} B"),
        1024..1_048_576 => format!("{:.1} KiB", b as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", b as f64 / 1_073_741_824.0),
    }
}

/// " · stopping", or " · stopping in 1.2 s" while the stop delay runs.
fn stopping(m: &Value) -> String {
    match (m["stopping"].as_bool(), m["stop_in_ms"].as_u64()) {
        (Some(true), Some(left)) => format!(" · stopping in {:.1} s", left as f64 / 1000.0),
        (Some(true), None) => " · stopping".into(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_status_table_lines_up_and_shows_every_column() {
        let reply = json!({
            "ok": true,
            "master": {"name": "hello", "pid": 10, "uptime_ms": 65_000, "workers_ready": 1, "workers_target": 2,
                       "policy": "rr", "balancer": "round-robin", "version": "0.1.0", "listeners": ["tcp 127.0.0.1:3000"]},
            "workers": [
                {"id": 1, "pid": 11, "state": "ready", "uptime_ms": 64_000, "restarts": 0, "cpu_percent": 1.25,
                 "rss_bytes": 4_300_000, "connections_open": 3},
                {"id": 2, "pid": null, "state": "backoff", "uptime_ms": 0, "restarts": 4, "restart_in_ms": 1600,
                 "cpu_percent": null, "rss_bytes": null, "connections_open": null}
            ]
        });
        let out = status(&reply, false);
        assert!(out.starts_with("hello · master pid 10 · up 1m · 1 workers ready of 2"), "{out}");
        assert!(out.contains("listening: tcp 127.0.0.1:3000"));
        let rows: Vec<&str> = out.lines().filter(|l| l.starts_with('│')).collect();
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.chars().count() == rows[0].chars().count()), "{out}");
        assert!(rows[1].contains("ready") && rows[1].contains("1.2%") && rows[1].contains("4.1 MiB"));
        assert!(rows[2].contains("backoff") && rows[2].contains("restart in 1s"));
        assert!(!out.contains('\x1b'));
        assert!(status(&reply, true).contains("\x1b[32mready"));
    }

    #[test]
    fn a_record_reads_as_a_line() {
        let r = json!({"timestamp": "2026-12-01T23:04:05.123Z", "level": "WARN", "event": "exit", "id": 2,
                       "pid": 99, "message": "worker 2 crashed"});
        assert_eq!(record(&r, false), "23:04:05.123 WARN  [exit worker 2 pid 99] worker 2 crashed");
    }

    #[test]
    fn a_stopping_master_says_how_long_it_still_serves() {
        assert_eq!(stopping(&json!({"stopping": true, "stop_in_ms": 1234})), " · stopping in 1.2 s");
        assert_eq!(stopping(&json!({"stopping": true})), " · stopping");
        assert_eq!(stopping(&json!({"stopping": false})), "");
    }
}
