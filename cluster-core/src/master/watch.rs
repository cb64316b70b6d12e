//! What live views are fed (`clusterctl top`, the admin endpoint's page): the status as JSON,
//! the history (`history.rs`) and the sampler that keeps it.

use std::time::Duration;

use serde_json::{Value, json};

use super::handle::Handle;
use super::history::{EVERY, id_json, now_ms, read_sample};
use super::observe::state_name;
use super::types::{AGENT_ID, Overview, WorkerState, WorkerStatus};

/// Shortest and longest interval a live view may ask for.
pub(super) const INTERVALS: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(60));

/// Takes a sample every [`EVERY`] until the master stops.
pub(super) async fn sample(handle: Handle) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(snapshot) = handle.snapshot().await else { return };
        let (me, workers) = (snapshot.master.pid, snapshot.workers);
        let history = handle.history.clone();
        let taken = tokio::task::spawn_blocking(move || history.push(read_sample(me, &workers, now_ms()))).await;
        if taken.is_err() {
            return;
        }
    }
}

/// An interval a view asked for (milliseconds), within [`INTERVALS`]; 1 s when not given.
pub(super) fn interval(ms: Option<u64>) -> Duration {
    ms.map_or(EVERY, Duration::from_millis).clamp(INTERVALS.0, INTERVALS.1)
}

/// The status as JSON: what `clusterctl status --json` prints and `GET /status.json` answers
/// (README, "Watching a cluster", documents each field).
pub(super) fn status_json(o: &Overview) -> Value {
    let m = &o.master;
    let workers: Vec<Value> = o.workers.iter().map(worker_json).collect();
    let ready = o.workers.iter().filter(|w| w.id != AGENT_ID && w.state == WorkerState::Ready).count();
    json!({
        "ok": true,
        "at_ms": now_ms(),
        "master": {
            "pid": m.pid,
            "name": m.name,
            "uptime_ms": m.uptime.as_millis() as u64,
            "version": m.version,
            "policy": format!("{:?}", m.policy).to_lowercase(),
            "balancer": balancer_name(m.balancer),
            "workers_target": m.workers_target,
            "workers_ready": ready,
            "listeners": m.listeners,
            "reloading": m.reloading,
            "upgrading": m.upgrading,
            "stopping": m.stopping,
            "stop_in_ms": m.stop_in.map(|d| d.as_millis() as u64),
            "control_socket": m.control_socket.as_ref().map(|p| p.display().to_string()),
            "rss_bytes": m.rss,
            "cpu_ms": m.cpu_time.map(|c| c.as_millis() as u64),
        },
        "workers": workers,
    })
}

fn worker_json(w: &WorkerStatus) -> Value {
    json!({
        "id": id_json(w.id),
        "pid": w.pid,
        "state": state_name(w.state),
        "uptime_ms": w.uptime.as_millis() as u64,
        "restarts": w.restarts,
        "cpu_percent": w.cpu_percent.map(|c| (c * 10.0).round() / 10.0),
        "cpu_ms": w.cpu_time.map(|c| c.as_millis() as u64),
        "rss_bytes": w.rss,
        "connections_open": w.open_connections,
        "connections_total": w.connections,
        "restart_in_ms": w.restart_in.map(|d| d.as_millis() as u64),
        "kill_in_ms": w.kill_in.map(|d| d.as_millis() as u64),
    })
}

fn balancer_name(b: crate::Balancer) -> &'static str {
    match b {
        crate::Balancer::RoundRobin => "round-robin",
        crate::Balancer::LeastConnections => "least-connections",
        crate::Balancer::Sticky => "sticky",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_is_kept_within_bounds() {
        assert_eq!(interval(None), EVERY);
        assert_eq!(interval(Some(0)), INTERVALS.0);
        assert_eq!(interval(Some(250)), Duration::from_millis(250));
        assert_eq!(interval(Some(u64::MAX)), INTERVALS.1);
    }
}
