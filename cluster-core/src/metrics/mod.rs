//! The application's metrics, across the cluster (feature `metrics`): code in a worker or in
//! the agent records through the [`metrics`](https://docs.rs/metrics) facade (`counter!`,
//! `gauge!`, `histogram!`, labels and all), and the master serves the totals on the admin
//! endpoint's `/metrics` and in `clusterctl metrics`, after its own `cluster_*` series:
//!
//! - counters summed over every process that ever served (exact across reloads, crashes,
//!   SIGKILLs, restarts and master upgrades; they never go down);
//! - histograms merged bucket by bucket (buckets per metric name:
//!   [`Builder::histogram_buckets`](crate::Builder::histogram_buckets) and
//!   `CLUSTER_METRICS_BUCKETS`; [`DEFAULT_BUCKETS`] otherwise);
//! - gauges per running process, with a label `worker="<id>"`;
//! - with `?per_worker=1` (`clusterctl metrics --per-worker`), counters and histograms per
//!   worker id too.
//!
//! Each worker's values live in a shared memory segment that the master creates and passes
//! over the worker's channel (`segment.rs`): a record is an atomic add on it, and a scrape
//! reads it without asking the worker anything, so a hung or stopped worker cannot delay a
//! scrape, and a SIGKILLed one loses nothing it counted. ARCHITECTURE.md says why.
//!
//! The library installs its recorder in each worker and in the agent. A program with a
//! recorder of its own turns that off ([`Builder::metrics_recorder`](crate::Builder)`(false)`)
//! and combines the two, for instance in a `metrics_util::layers::Fanout` with `cluster::metrics::recorder()`.

#[cfg(feature = "metrics")]
mod recorder;
pub(crate) mod segment;
pub(crate) mod totals;

#[cfg(feature = "metrics")]
pub use recorder::{Recorder, recorder};
#[cfg(feature = "metrics")]
pub(crate) use recorder::{attach, prepare};

/// The buckets of a histogram no setting names: Prometheus' client libraries' default, in
/// seconds.
pub const DEFAULT_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Histogram buckets by metric name.
pub(crate) type Buckets = Vec<(String, Vec<f64>)>;

/// Parses `CLUSTER_METRICS_BUCKETS`: `name=b1,b2,…;other=…`, each bound a finite number, in
/// increasing order.
pub(crate) fn parse_buckets(text: &str) -> Result<Buckets, ()> {
    let mut out = Vec::new();
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, bounds) = part.split_once('=').ok_or(())?;
        let bounds: Vec<f64> =
            bounds.split(',').map(|b| b.trim().parse::<f64>().map_err(|_| ())).collect::<Result<_, _>>()?;
        let increasing = bounds.windows(2).all(|w| w[0] < w[1]);
        if name.trim().is_empty() || bounds.is_empty() || !increasing || bounds.iter().any(|b| !b.is_finite()) {
            return Err(());
        }
        out.push((name.trim().to_string(), bounds));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn buckets_parse_and_bad_ones_are_refused() {
        assert_eq!(
            super::parse_buckets("a=0.1,1; b_seconds=1,2,4").unwrap(),
            [("a".to_string(), vec![0.1, 1.0]), ("b_seconds".to_string(), vec![1.0, 2.0, 4.0])]
        );
        for bad in ["a", "a=", "a=x", "=1", "a=2,1", "a=1,1", "a=inf"] {
            assert!(super::parse_buckets(bad).is_err(), "{bad}");
        }
    }
}
