//! What `clusterctl top` shows, apart from drawing it: the lines of the master's `watch` stream
//! folded into the latest status, the series behind the sparklines and the log tail. Pure, so
//! the tests below feed it lines and read the figures.

use std::collections::{HashMap, VecDeque};

use serde_json::Value;

/// Points kept per series: one a second for a minute.
pub(crate) const POINTS: usize = 60;
/// Log lines kept.
const LOG_LINES: usize = 200;

/// The view's state.
#[derive(Default)]
pub(crate) struct Model {
    /// The latest status (`{"master": …, "workers": […]}`), once one came.
    pub(crate) status: Option<Value>,
    /// Connections per second handed out, in total.
    pub(crate) total: VecDeque<u64>,
    /// The master's CPU, in tenths of a percent of one core.
    pub(crate) master_cpu: VecDeque<u64>,
    /// The master's resident memory, in bytes.
    pub(crate) master_rss: VecDeque<u64>,
    /// Connections per second handed to each process, by pid.
    pub(crate) rates: HashMap<u32, VecDeque<u64>>,
    /// The log tail, oldest first, as records.
    pub(crate) logs: VecDeque<Value>,
    /// Records the master dropped because this view read too slowly.
    pub(crate) dropped: u64,
    /// The selected row of the workers' table.
    pub(crate) selected: usize,
    /// What the last key did, or is doing.
    pub(crate) message: String,
    /// The previous point: its time, the master's CPU time, each pid's connections.
    last: Option<Point>,
}

struct Point {
    at_ms: u64,
    master_cpu_ms: Option<u64>,
    connections: HashMap<u32, u64>,
}

impl Model {
    /// Takes one line of the stream.
    pub(crate) fn ingest(&mut self, line: &Value) {
        if let Some(samples) = line.get("history").and_then(Value::as_array) {
            self.last = None;
            self.total.clear();
            self.master_cpu.clear();
            self.master_rss.clear();
            self.rates.clear();
            for s in samples {
                self.point(s);
            }
        } else if let Some(status) = line.get("status") {
            self.point(status);
            self.status = Some(status.clone());
            self.selected = self.selected.min(self.workers().len().saturating_sub(1));
        } else if let Some(record) = line.get("log") {
            push(&mut self.logs, record.clone(), LOG_LINES);
        } else if let Some(n) = line.get("dropped").and_then(Value::as_u64) {
            self.dropped += n;
        }
    }

    /// Adds a point to the series from a sample or a status (they share these fields).
    fn point(&mut self, s: &Value) {
        let Some(at_ms) = s["at_ms"].as_u64() else { return };
        let master_cpu_ms = s["master"]["cpu_ms"].as_u64();
        let connections: HashMap<u32, u64> = s["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| Some((u32::try_from(w["pid"].as_u64()?).ok()?, w["connections_total"].as_u64()?)))
            .collect();
        if let Some(last) = self.last.as_ref().filter(|l| at_ms > l.at_ms) {
            let dt = (at_ms - last.at_ms) as f64 / 1000.0;
            let mut total = 0.0;
            for (pid, n) in &connections {
                // A pid the last point did not have started since: all its connections are
                // this interval's (a reload's new workers do not dip the total).
                let before = last.connections.get(pid).copied().unwrap_or(0);
                let rate = n.saturating_sub(before) as f64 / dt;
                total += rate;
                push(self.rates.entry(*pid).or_default(), rate.round() as u64, POINTS);
            }
            push(&mut self.total, total.round() as u64, POINTS);
            if let (Some(now), Some(then)) = (master_cpu_ms, last.master_cpu_ms) {
                let per_mille = now.saturating_sub(then) as f64 / dt;
                push(&mut self.master_cpu, per_mille.round() as u64, POINTS);
            }
        }
        if let Some(rss) = s["master"]["rss_bytes"].as_u64() {
            push(&mut self.master_rss, rss, POINTS);
        }
        self.rates.retain(|pid, _| connections.contains_key(pid));
        self.last = Some(Point { at_ms, master_cpu_ms, connections });
    }

    /// The workers of the latest status.
    pub(crate) fn workers(&self) -> &[Value] {
        self.status.as_ref().and_then(|s| s["workers"].as_array()).map_or(&[], Vec::as_slice)
    }

    /// The latest rate of `pid`.
    pub(crate) fn rate(&self, pid: u32) -> Option<u64> {
        self.rates.get(&pid).and_then(|r| r.back().copied())
    }

    /// Moves the selection by `by` rows, within the table.
    pub(crate) fn select(&mut self, by: isize) {
        let last = self.workers().len().saturating_sub(1);
        self.selected = self.selected.saturating_add_signed(by).min(last);
    }

    /// The worker id of the selected row, if it is a worker (not the agent).
    pub(crate) fn selected_id(&self) -> Option<u64> {
        self.workers().get(self.selected).and_then(|w| w["id"].as_u64())
    }
}

fn push<T>(series: &mut VecDeque<T>, value: T, cap: usize) {
    if series.len() == cap {
        series.pop_front();
    }
    series.push_back(value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(at_ms: u64, cpu_ms: u64, workers: &[(u32, u64)]) -> Value {
        let workers: Vec<Value> =
            workers.iter().map(|(pid, n)| json!({"id": pid % 10, "pid": pid, "connections_total": n})).collect();
        json!({"at_ms": at_ms, "master": {"cpu_ms": cpu_ms, "rss_bytes": 1000 + at_ms}, "workers": workers})
    }

    #[test]
    fn rates_come_from_two_points_of_the_same_pid() {
        let mut m = Model::default();
        m.ingest(&json!({"history": [sample(1000, 0, &[(11, 0), (12, 0)]), sample(2000, 5, &[(11, 30), (12, 10)])]}));
        assert_eq!(m.total, [40]);
        assert_eq!((m.rate(11), m.rate(12)), (Some(30), Some(10)));
        assert_eq!(m.master_cpu, [5], "5 ms of CPU in a second: 0.5 %");
        assert_eq!(m.master_rss, [2000, 3000]);
        // Half a second later, worker 12 replaced by 13, which started since: its 7 connections
        // are the half second's; 12 is gone.
        m.ingest(&json!({"status": sample(2500, 10, &[(11, 40), (13, 7)])}));
        assert_eq!(m.total, [40, 34]);
        assert_eq!((m.rate(11), m.rate(12), m.rate(13)), (Some(20), None, Some(14)));
        assert_eq!(m.workers().len(), 2);
        // A status no later than the last point adds none.
        m.ingest(&json!({"status": sample(2500, 10, &[(11, 99)])}));
        assert_eq!(m.total.len(), 2);
    }

    #[test]
    fn series_keep_a_minute_and_a_new_history_starts_over() {
        let mut m = Model::default();
        for i in 0..100u64 {
            m.ingest(&json!({"status": sample(i * 1000, i, &[(11, i * 3)])}));
        }
        assert_eq!(m.total.len(), POINTS);
        assert!(m.total.iter().all(|r| *r == 3));
        m.ingest(&json!({"history": []}));
        assert!(m.total.is_empty() && m.rates.is_empty());
    }

    #[test]
    fn the_selection_stays_on_the_table_and_names_a_worker() {
        let mut m = Model::default();
        m.ingest(&json!({"status": {"at_ms": 1, "workers": [{"id": 1, "pid": 5}, {"id": 2, "pid": 6}, {"id": "agent", "pid": 7}]}}));
        assert_eq!(m.selected_id(), Some(1));
        m.select(5);
        assert_eq!((m.selected, m.selected_id()), (2, None), "the agent has no id to restart");
        m.select(-1);
        assert_eq!(m.selected_id(), Some(2));
        m.select(-9);
        assert_eq!(m.selected, 0);
        m.ingest(&json!({"status": {"at_ms": 2, "workers": []}}));
        assert_eq!((m.selected, m.selected_id()), (0, None));
    }

    #[test]
    fn logs_keep_the_tail_and_drops_are_counted() {
        let mut m = Model::default();
        for i in 0..250 {
            m.ingest(&json!({"log": {"message": i}}));
        }
        m.ingest(&json!({"dropped": 4}));
        assert_eq!((m.logs.len(), m.logs[0]["message"].clone(), m.dropped), (LOG_LINES, json!(50), 4));
    }
}
