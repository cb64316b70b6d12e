//! How `clusterctl top` draws a [`Model`]: a header, the workers' table with a trend of each
//! one's connections per second, sparklines of the total and of the master's CPU and memory,
//! the log tail and a line of keys. Fits 80×24; without colour (`NO_COLOR`) it uses only bold
//! and reverse video.

use std::time::Duration;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table};
use serde_json::Value;

use super::model::Model;
use crate::show;

/// Styles, or none of their colours.
#[derive(Clone, Copy)]
pub(crate) struct Palette {
    pub(crate) colour: bool,
}

impl Palette {
    fn fg(self, c: Color) -> Style {
        if self.colour { Style::new().fg(c) } else { Style::new() }
    }
    fn state(self, state: &str) -> Style {
        self.fg(match state {
            "ready" => Color::Green,
            "backoff" => Color::Red,
            "stopping" => Color::DarkGray,
            _ => Color::Yellow,
        })
    }
}

/// The keys, on the last line.
const KEYS: &str = "q quit  r reload  +/- scale  ↑↓ select  k restart";
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

pub(crate) fn draw(frame: &mut Frame, m: &Model, p: Palette) {
    let rows = m.workers().len() as u16;
    let [header, table, charts, logs, keys] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(rows.clamp(1, 16) + 3),
        Constraint::Length(3),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(head(m, p)), header);
    workers(frame, m, p, table);
    sparklines(frame, m, p, charts);
    log_tail(frame, m, p, logs);
    // The outcome of the last key first: the keys' help is what gets cut on a narrow screen.
    let mut line = Vec::new();
    if !m.message.is_empty() {
        line.push(Span::styled(m.message.clone(), Style::new().add_modifier(Modifier::BOLD)));
        line.push(Span::raw(" │ "));
    }
    line.push(Span::styled(KEYS, Style::new().add_modifier(Modifier::DIM)));
    frame.render_widget(Paragraph::new(Line::from(line)), keys);
}

fn head(m: &Model, p: Palette) -> Vec<Line<'static>> {
    let Some(s) = &m.status else {
        return vec![Line::raw("waiting for the master…")];
    };
    let mm = &s["master"];
    let mut first = vec![
        Span::styled(text(&mm["name"]), Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            " · master {} · up {} · {}/{} · ",
            mm["pid"],
            ms(&mm["uptime_ms"]),
            text(&mm["policy"]),
            text(&mm["balancer"])
        )),
    ];
    let (ready, target) = (mm["workers_ready"].as_u64().unwrap_or(0), mm["workers_target"].as_u64().unwrap_or(0));
    let shade = if ready >= target { Color::Green } else { Color::Yellow };
    first.push(Span::styled(format!("{ready}/{target} ready"), p.fg(shade)));
    for (flag, shown) in [("reloading", "reloading"), ("upgrading", "upgrading")] {
        if mm[flag] == Value::Bool(true) {
            first.push(Span::styled(format!(" · {shown}"), p.fg(Color::Yellow).add_modifier(Modifier::BOLD)));
        }
    }
    if mm["stopping"] == Value::Bool(true) {
        let shown = match mm["stop_in_ms"].as_u64() {
            Some(left) => format!(" · stopping in {:.1} s", left as f64 / 1000.0),
            None => " · stopping".into(),
        };
        first.push(Span::styled(shown, p.fg(Color::Red).add_modifier(Modifier::BOLD)));
    }
    let listeners: Vec<String> = mm["listeners"].as_array().into_iter().flatten().map(text).collect();
    let second = format!("{} · cluster {}", listeners.join(", "), text(&mm["version"]));
    vec![Line::from(first), Line::styled(second, Style::new().add_modifier(Modifier::DIM))]
}

fn workers(frame: &mut Frame, m: &Model, p: Palette, area: Rect) {
    let widths = [
        Constraint::Length(5),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(3),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Fill(1),
    ];
    let trend = trend_width(area.width);
    // One scale for every trend, so their heights compare.
    let peak = m.rates.values().flat_map(|r| r.iter().rev().take(trend)).copied().max().unwrap_or(0);
    let rows: Vec<Row> = m
        .workers()
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let pid = w["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
            let state = text(&w["state"]);
            let uptime = match (w["restart_in_ms"].as_u64(), w["kill_in_ms"].as_u64()) {
                (Some(left), _) => format!("in {}", show::human(Duration::from_millis(left))),
                (None, Some(left)) => format!("kill {}", show::human(Duration::from_millis(left))),
                _ => ms(&w["uptime_ms"]),
            };
            let rate = pid.and_then(|pid| m.rate(pid)).map_or("-".into(), |r| r.to_string());
            let spark = pid.and_then(|pid| m.rates.get(&pid)).map_or(String::new(), |r| {
                let last: Vec<u64> = r.iter().rev().take(trend).rev().copied().collect();
                bars(&last, peak)
            });
            let row = Row::new(vec![
                Cell::from(text(&w["id"])),
                Cell::from(pid.map_or("-".into(), |p| p.to_string())),
                Cell::from(state.clone()).style(p.state(&state)),
                Cell::from(uptime),
                Cell::from(w["restarts"].to_string()),
                Cell::from(w["cpu_percent"].as_f64().map_or("-".into(), |c| format!("{c:.1}%"))),
                Cell::from(w["rss_bytes"].as_u64().map_or("-".into(), show::bytes)),
                Cell::from(opt(&w["connections_open"])),
                Cell::from(rate),
                Cell::from(spark).style(p.fg(Color::Cyan)),
            ]);
            if i == m.selected { row.style(Style::new().add_modifier(Modifier::REVERSED)) } else { row }
        })
        .collect();
    let header = Row::new(["id", "pid", "state", "uptime", "rst", "cpu", "memory", "open", "conn/s", "trend"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    let table = Table::new(rows, widths).header(header).block(Block::bordered().title(" workers "));
    frame.render_widget(table, area);
}

/// The width the trend column gets in a table `width` wide (what the fixed columns leave).
fn trend_width(width: u16) -> usize {
    usize::from(width.saturating_sub(2 + 58 + 9)).max(1)
}

/// A sparkline in text, `peak` the top of its scale.
fn bars(values: &[u64], peak: u64) -> String {
    values.iter().map(|v| if peak == 0 { BARS[0] } else { BARS[((v * 7).div_ceil(peak)).min(7) as usize] }).collect()
}

fn sparklines(frame: &mut Frame, m: &Model, p: Palette, area: Rect) {
    let rows = Layout::vertical([Constraint::Length(1); 3]).split(area);
    let last = |s: &std::collections::VecDeque<u64>| s.back().copied();
    let lines = [
        (format!("conn/s {:>7}", last(&m.total).map_or("-".into(), |v| v.to_string())), &m.total, Color::Cyan),
        (
            format!("master cpu {:>5}", last(&m.master_cpu).map_or("-".into(), |v| format!("{:.1}%", v as f64 / 10.0))),
            &m.master_cpu,
            Color::Magenta,
        ),
        (format!("master mem {:>9}", last(&m.master_rss).map_or("-".into(), show::bytes)), &m.master_rss, Color::Blue),
    ];
    for ((label, series, colour), row) in lines.into_iter().zip(rows.iter()) {
        let [name, chart] = Layout::horizontal([Constraint::Length(22), Constraint::Fill(1)]).areas(*row);
        frame.render_widget(Paragraph::new(label), name);
        let width = usize::from(chart.width);
        let data: Vec<u64> = series.iter().rev().take(width).rev().copied().collect();
        // Memory moves little: its scale starts at the lowest point shown, or it would be flat.
        let floor = if std::ptr::eq(series, &m.master_rss) { data.iter().min().copied().unwrap_or(0) } else { 0 };
        let data: Vec<u64> = data.iter().map(|v| v - floor + u64::from(floor > 0)).collect();
        frame.render_widget(Sparkline::default().data(&data).style(p.fg(colour)), chart);
    }
}

fn log_tail(frame: &mut Frame, m: &Model, p: Palette, area: Rect) {
    let block = Block::new().borders(Borders::TOP).title(if m.dropped > 0 {
        format!(" log ({} dropped) ", m.dropped)
    } else {
        " log ".into()
    });
    let height = usize::from(block.inner(area).height);
    let lines: Vec<Line> = m
        .logs
        .iter()
        .skip(m.logs.len().saturating_sub(height))
        .map(|r| {
            let style = match r["level"].as_str() {
                Some("WARN") => p.fg(Color::Yellow),
                Some("ERROR") => p.fg(Color::Red),
                _ => Style::new(),
            };
            Line::styled(show::record(r, false), style)
        })
        .collect();
    frame.render_widget(Paragraph::new(lines).block(block), area);
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
    v.as_u64().map_or("-".into(), |ms| show::human(Duration::from_millis(ms)))
}

#[cfg(test)]
mod tests {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use serde_json::json;

    use super::*;

    fn screen(m: &Model, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, m, Palette { colour: false })).unwrap();
        let buffer = terminal.backend().buffer();
        let mut out = String::new();
        for y in 0..height {
            for x in 0..width {
                out.push_str(buffer[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn status(at_ms: u64, n: u64) -> Value {
        let workers: Vec<Value> = (1..=8)
            .map(|id| {
                json!({"id": id, "pid": 1000 + id, "state": if id == 8 { "starting" } else { "ready" },
                "uptime_ms": 65_000, "restarts": 0, "cpu_percent": 1.5, "rss_bytes": 5 << 20,
                "connections_open": 3, "connections_total": n * id})
            })
            .collect();
        json!({"status": {"at_ms": at_ms, "master": {"pid": 999, "name": "hello", "uptime_ms": 3_700_000,
            "policy": "rr", "balancer": "round-robin", "workers_ready": 7, "workers_target": 8,
            "listeners": ["tcp 127.0.0.1:8080"], "version": "0.1.0", "reloading": true, "stopping": false,
            "cpu_ms": at_ms / 100, "rss_bytes": 6 << 20}, "workers": workers}})
    }

    #[test]
    fn eight_workers_fit_80_by_24_with_every_figure() {
        let mut m = Model::default();
        for i in 0..5 {
            m.ingest(&status(i * 1000, i * 10));
        }
        m.ingest(
            &json!({"log": {"timestamp": "2026-12-03T19:00:00.000Z", "level": "INFO", "message": "worker 3 ready"}}),
        );
        m.message = "reloaded: 8 replaced".into();
        let shown = screen(&m, 80, 24);
        for want in ["hello", "master 999", "up 1h", "7/8 ready", "reloading", "tcp 127.0.0.1:8080", "conn/s"] {
            assert!(shown.contains(want), "{want:?} not on\n{shown}");
        }
        for id in 1..=8 {
            assert!(shown.contains(&format!("{}", 1000 + id)), "pid of worker {id} not on\n{shown}");
        }
        assert!(shown.contains("starting") && shown.contains("5.0 MiB") && shown.contains("1.5%"), "{shown}");
        // Worker 8 gets 80 connections a second, the total is 360; the master uses 1 % of a core.
        assert!(shown.contains("  80 ") && shown.contains("360") && shown.contains("1.0%"), "{shown}");
        assert!(shown.contains("worker 3 ready"), "the log tail:\n{shown}");
        assert!(shown.contains("q quit") && shown.contains("reloaded: 8 replaced"), "{shown}");
        assert!(shown.contains('█'), "the trends and sparklines have bars:\n{shown}");
    }

    #[test]
    fn before_the_first_status_it_says_it_waits() {
        assert!(screen(&Model::default(), 80, 24).contains("waiting for the master"));
    }

    #[test]
    fn a_trend_scales_to_the_peak() {
        assert_eq!(bars(&[0, 1, 2, 4], 4), "▁▃▅█");
        assert_eq!(bars(&[0, 0], 0), "▁▁");
        assert_eq!(trend_width(80), 11);
    }
}
