//! Nanoseconds per record, this crate's recorder (a worker's: atomics on its shared segment)
//! against `metrics-exporter-prometheus`'s own recorder in a plain process, side by side in one
//! run: a counter increment and a histogram record, through a handle kept by the program and
//! through the macro at each call (a lookup of the series, then the record).
//!
//!     cargo bench -p cluster-core --features metrics --bench metrics

use std::hint::black_box;
use std::time::Instant;

const N: u64 = 5_000_000;

fn ns_per(mut f: impl FnMut(u64)) -> f64 {
    for i in 0..N / 10 {
        f(i);
    }
    let at = Instant::now();
    for i in 0..N {
        f(i);
    }
    at.elapsed().as_nanos() as f64 / N as f64
}

fn measure(recorder: &(dyn metrics::Recorder + Sync)) -> [f64; 4] {
    metrics::with_local_recorder(recorder, || {
        let counter = metrics::counter!("bench_requests_total", "path" => "/");
        let histogram = metrics::histogram!("bench_duration_seconds", "path" => "/");
        [
            ns_per(|_| counter.increment(black_box(1))),
            ns_per(|i| histogram.record(black_box((i % 1000) as f64 / 1e4))),
            ns_per(|_| metrics::counter!("bench_requests_total", "path" => "/").increment(black_box(1))),
            ns_per(|i| {
                metrics::histogram!("bench_duration_seconds", "path" => "/").record(black_box((i % 1000) as f64 / 1e4))
            }),
        ]
    })
}

fn main() {
    let ours = cluster::__private::metrics_bench_recorder();
    let theirs = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let mut rounds = Vec::new();
    for _ in 0..3 {
        rounds.push((measure(&ours), measure(&theirs)));
    }
    type Round = ([f64; 4], [f64; 4]);
    let median = |f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("ns per record (median of 3 rounds of {N})      cluster   metrics-exporter-prometheus");
    for (i, what) in ["counter, handle", "histogram, handle", "counter, macro each call", "histogram, macro each call"]
        .iter()
        .enumerate()
    {
        println!("  {what:<28} {:>10.1} {:>12.1}", median(&|r| r.0[i]), median(&|r| r.1[i]));
    }
}
