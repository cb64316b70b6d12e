//! The history the master keeps for live views: cheap samples, one a second for the last five
//! minutes, so a view opened now shows the minutes before it (PM2's monitor starts empty).
//!
//! A sample is what costs nearly nothing to read: the supervisor's counters (no `/proc` walk, no
//! `sock_diag`), and each process's memory and CPU time (`/proc/<pid>/statm` and `stat`, read
//! on a blocking thread by `watch.rs`). Rates (connections per second, CPU %) are left to the
//! views: they are the differences between two samples of the same pid.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::types::{AGENT_ID, WorkerStatus};
use crate::sys;

/// Samples kept: five minutes.
pub(super) const KEPT: usize = 300;
/// Time between two samples.
pub(super) const EVERY: Duration = Duration::from_secs(1);

/// The samples, oldest first.
#[derive(Default)]
pub(super) struct History(Mutex<VecDeque<Sample>>);

/// The cluster at one instant, cheaply.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Sample {
    /// Milliseconds since the Unix epoch.
    at_ms: u64,
    master: Process,
    workers: Vec<(u32, Process)>,
}

/// One process in a sample.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Process {
    pid: u32,
    /// Connections handed to it so far (0 for the master).
    connections: u64,
    rss: Option<u64>,
    cpu_ms: Option<u64>,
}

impl History {
    /// Adds a sample, dropping the oldest past [`KEPT`].
    pub(super) fn push(&self, sample: Sample) {
        let mut samples = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The samples as JSON, oldest first (README, "Watching a cluster").
    pub(super) fn to_json(&self) -> Value {
        let samples = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Value::Array(samples.iter().map(sample_json).collect())
    }
}

/// Reads the figures of the master (`me`) and of each worker process.
pub(super) fn read_sample(me: u32, workers: &[WorkerStatus], at_ms: u64) -> Sample {
    let read = |pid: u32, connections: u64| Process {
        pid,
        connections,
        rss: sys::rss(pid).ok(),
        cpu_ms: sys::cpu_time(pid).ok().map(|d| d.as_millis() as u64),
    };
    let workers = workers.iter().filter_map(|w| Some((w.id, read(w.pid?, w.connections)))).collect();
    Sample { at_ms, master: read(me, 0), workers }
}

fn sample_json(s: &Sample) -> Value {
    let workers: Vec<Value> = s
        .workers
        .iter()
        .map(|(id, p)| {
            json!({
                "id": id_json(*id),
                "pid": p.pid,
                "connections_total": p.connections,
                "rss_bytes": p.rss,
                "cpu_ms": p.cpu_ms,
            })
        })
        .collect();
    json!({
        "at_ms": s.at_ms,
        "master": {"pid": s.master.pid, "rss_bytes": s.master.rss, "cpu_ms": s.master.cpu_ms},
        "workers": workers,
    })
}

/// Milliseconds since the Unix epoch, now.
pub(super) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A worker id in JSON: a number, or `"agent"`.
pub(super) fn id_json(id: u32) -> Value {
    if id == AGENT_ID { json!("agent") } else { json!(id) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64) -> Sample {
        let worker = Process { pid: 7, connections: at_ms, rss: Some(4096), cpu_ms: None };
        Sample { at_ms, master: Process { pid: 1, ..Process::default() }, workers: vec![(1, worker)] }
    }

    #[test]
    fn the_history_keeps_the_last_five_minutes_oldest_first() {
        let history = History::default();
        for at in 0..(KEPT as u64 + 5) {
            history.push(sample(at));
        }
        let json = history.to_json();
        let samples = json.as_array().unwrap();
        assert_eq!(samples.len(), KEPT);
        assert_eq!(samples[0]["at_ms"], 5);
        assert_eq!(samples[KEPT - 1]["at_ms"], KEPT as u64 + 4);
        let worker = &samples[0]["workers"][0];
        assert_eq!((worker["id"].clone(), worker["pid"].clone()), (json!(1), json!(7)));
        assert_eq!((worker["connections_total"].clone(), worker["rss_bytes"].clone()), (json!(5), json!(4096)));
        assert_eq!(worker["cpu_ms"], Value::Null, "a figure that could not be read is null");
    }

    #[test]
    fn a_sample_reads_live_processes_and_leaves_gone_ones_empty() {
        let me = sys::getpid();
        let s = read_sample(me, &[], 1);
        assert!(s.master.rss.is_some_and(|r| r > 0) && s.master.cpu_ms.is_some(), "{s:?}");
        let mut gone = read_sample(u32::MAX - 1, &[], 1).master;
        assert_eq!((gone.rss, gone.cpu_ms), (None, None));
        gone.pid = 0;
        assert_eq!(gone, Process::default());
    }
}
