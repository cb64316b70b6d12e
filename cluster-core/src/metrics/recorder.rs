//! The recorder a worker (or the agent) installs for the `metrics` facade: each series the
//! program records gets its words in the process's segment (`segment.rs`) the first time it
//! is used, and every increment, set and record after that is an atomic operation on them.
//! Nothing is sent anywhere: the master reads the segment when it is scraped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use ::metrics::{Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, KeyName, Metadata, SharedString, Unit};

use super::segment::{Key, Kind, Writer};
use super::{Buckets, DEFAULT_BUCKETS};

/// This process's segment, once the master's has arrived.
static SEGMENT: OnceLock<Writer> = OnceLock::new();

/// This process's recorder: the one the library installs in each worker and the agent. Outside
/// a cluster (or before the worker starts) it records nothing.
pub fn recorder() -> Recorder {
    PROCESS.get().cloned().unwrap_or_default()
}

static PROCESS: std::sync::OnceLock<Recorder> = std::sync::OnceLock::new();

/// Sets this process's recorder up with the settings' buckets, and installs it as the
/// facade's global recorder unless the program keeps its own (`install`).
pub(crate) fn prepare(buckets: &Buckets, install: bool) {
    let recorder = PROCESS.get_or_init(|| Recorder::with_buckets(buckets.clone())).clone();
    if install && ::metrics::set_global_recorder(recorder).is_err() {
        crate::log::say!(
            "a metrics recorder was already installed: the cluster's records nothing unless combined with it (cluster::metrics::recorder())"
        );
    }
}

/// Takes the segment the master sent this process.
pub(crate) fn attach(fd: std::os::fd::OwnedFd, words: usize) -> std::io::Result<()> {
    let map = crate::sys::map_segment(&fd, words)?;
    let writer = Writer::new(map)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not a metrics segment"))?;
    let _ = SEGMENT.set(writer);
    Ok(())
}

/// The recorder of this process's cluster metrics: the one the library installs in each
/// worker and in the agent, or, if the program installs a recorder of its own
/// ([`Builder::metrics_recorder`](crate::Builder::metrics_recorder)`(false)`), one it can
/// combine with it (for instance in a `metrics_util::layers::Fanout`). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    counters: RwLock<HashMap<::metrics::Key, Counter>>,
    gauges: RwLock<HashMap<::metrics::Key, Gauge>>,
    histograms: RwLock<HashMap<::metrics::Key, Histogram>>,
    buckets: OnceLock<Buckets>,
}

impl Recorder {
    pub(crate) fn with_buckets(buckets: Buckets) -> Recorder {
        let recorder = Recorder::default();
        let _ = recorder.inner.buckets.set(buckets);
        recorder
    }

    /// The words of a new series, if the segment is there and takes it.
    fn words(kind: Kind, key: &::metrics::Key, bounds: &[f64]) -> Option<&'static [AtomicU64]> {
        let segment = SEGMENT.get()?;
        let key = Key {
            name: key.name().to_string(),
            labels: key.labels().map(|l| (l.key().to_string(), l.value().to_string())).collect(),
        };
        let at = segment.add(kind, &key, bounds)?;
        let len = match kind {
            Kind::Histogram => 2 * bounds.len() + 2,
            _ => 1,
        };
        Some(&segment.words()[at..at + len])
    }

    fn bounds(&self, name: &str) -> Vec<f64> {
        let buckets = self.inner.buckets.get();
        let set = buckets.and_then(|b| b.iter().find(|(n, _)| n == name).map(|(_, b)| b.clone()));
        set.unwrap_or_else(|| DEFAULT_BUCKETS.to_vec())
    }
}

/// Looks up a handle, making it the first time.
fn cached<T: Clone>(map: &RwLock<HashMap<::metrics::Key, T>>, key: &::metrics::Key, make: impl FnOnce() -> T) -> T {
    if let Some(found) = map.read().unwrap_or_else(|e| e.into_inner()).get(key) {
        return found.clone();
    }
    let mut map = map.write().unwrap_or_else(|e| e.into_inner());
    map.entry(key.clone()).or_insert_with(make).clone()
}

impl ::metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        describe(&key, &description);
    }
    fn describe_gauge(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        describe(&key, &description);
    }
    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        describe(&key, &description);
    }

    fn register_counter(&self, key: &::metrics::Key, _metadata: &Metadata<'_>) -> Counter {
        cached(&self.inner.counters, key, || match Self::words(Kind::Counter, key, &[]) {
            Some(words) => Counter::from_arc(Arc::new(Word(&words[0]))),
            None => Counter::noop(),
        })
    }

    fn register_gauge(&self, key: &::metrics::Key, _metadata: &Metadata<'_>) -> Gauge {
        cached(&self.inner.gauges, key, || match Self::words(Kind::Gauge, key, &[]) {
            Some(words) => Gauge::from_arc(Arc::new(Word(&words[0]))),
            None => Gauge::noop(),
        })
    }

    fn register_histogram(&self, key: &::metrics::Key, _metadata: &Metadata<'_>) -> Histogram {
        cached(&self.inner.histograms, key, || {
            let bounds = self.bounds(key.name());
            match Self::words(Kind::Histogram, key, &bounds) {
                Some(words) => Histogram::from_arc(Arc::new(HistogramWords { bounds, words })),
                None => Histogram::noop(),
            }
        })
    }
}

fn describe(name: &KeyName, text: &str) {
    if let Some(segment) = SEGMENT.get() {
        segment.describe(name.as_str(), text);
    }
}

/// A counter's or a gauge's word.
struct Word(&'static AtomicU64);

impl CounterFn for Word {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

impl GaugeFn for Word {
    fn increment(&self, value: f64) {
        add_f64(self.0, value);
    }
    fn decrement(&self, value: f64) {
        add_f64(self.0, -value);
    }
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

/// Adds to an `f64` kept as bits in a word.
fn add_f64(word: &AtomicU64, value: f64) {
    let _ =
        word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + value).to_bits()));
}

/// A histogram's words: per-bucket counts (not cumulative; the master adds them up), then the
/// count and the sum.
struct HistogramWords {
    bounds: Vec<f64>,
    words: &'static [AtomicU64],
}

impl HistogramFn for HistogramWords {
    fn record(&self, value: f64) {
        let n = self.bounds.len();
        let bucket = self.bounds.partition_point(|b| *b < value);
        if bucket < n {
            self.words[n + bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.words[2 * n].fetch_add(1, Ordering::Relaxed);
        add_f64(&self.words[2 * n + 1], value);
    }
}
