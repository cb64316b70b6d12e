//! The master's totals of the application's metrics: the segments of the processes that run
//! (read at each scrape, without asking them anything), what the processes that are gone
//! left (folded in when each one exits, so a counter never goes down), and what an old master
//! handed over in an upgrade. The exposition is Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::OwnedFd;

use serde_json::{Value as Json, json};

use super::segment::{Key, Reader, Value};

/// The most series the master keeps and shows (a label explosion is refused past this).
pub(crate) const MAX_SERIES: usize = 10_000;

/// What [`Totals::export`] gives: pieces of JSON, and each segment's description with a copy of
/// its descriptor.
pub(crate) type Export = (Vec<Json>, Vec<(Json, OwnedFd)>);

/// A segment being read, and which worker id its process serves.
#[derive(Debug)]
struct Source {
    id: u32,
    fd: OwnedFd,
    words: usize,
    reader: Reader,
}

/// A histogram's counts: per bucket (not cumulative), then count and sum.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Hist {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Hist {
    /// Adds `other`. With other bounds than its own, both are counted at the union of the
    /// bounds, each at the highest of its own bounds not above (exact where bounds agree, never
    /// more than was observed below a bound).
    fn merge(&mut self, other: &Hist) {
        if self.bounds == other.bounds {
            for (a, b) in self.counts.iter_mut().zip(&other.counts) {
                *a += b;
            }
        } else {
            let mut bounds: Vec<f64> =
                self.bounds.iter().chain(&other.bounds).copied().filter(|b| b.is_finite()).collect();
            bounds.sort_by(f64::total_cmp);
            bounds.dedup();
            let cumulative = |h: &Hist, upto: f64| -> u64 {
                h.bounds.iter().zip(&h.counts).filter(|(b, _)| **b <= upto).map(|(_, c)| c).sum()
            };
            let mut previous = 0;
            let counts = bounds
                .iter()
                .map(|b| {
                    let cum = cumulative(self, *b) + cumulative(other, *b);
                    let in_bucket = cum.saturating_sub(previous);
                    previous = cum;
                    in_bucket
                })
                .collect();
            self.bounds = bounds;
            self.counts = counts;
        }
        self.count += other.count;
        self.sum += other.sum;
    }
}

/// What a gone process left of one series.
#[derive(Debug, Clone, PartialEq)]
enum Left {
    Counter(u64),
    Histogram(Hist),
}

impl Left {
    fn add(&mut self, other: &Left) {
        match (self, other) {
            (Left::Counter(a), Left::Counter(b)) => *a += b,
            (Left::Histogram(a), Left::Histogram(b)) => a.merge(b),
            // Another kind under the same key: the first one stays.
            _ => {}
        }
    }
}

/// The master's totals. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    /// Segments of this master's running processes, by serial.
    live: BTreeMap<u64, Source>,
    /// Segments of the old master's processes, read until it has exited.
    handed: Vec<Source>,
    /// What gone processes left, by series and worker id.
    retired: BTreeMap<Key, BTreeMap<u32, Left>>,
    /// `# HELP` texts by metric name.
    descriptions: BTreeMap<String, String>,
    /// Series refused: by full segments of gone processes, and by the master's own cap.
    refused: u64,
}

/// One series as a scrape shows it, by worker id.
#[derive(Debug, Default)]
struct Shown {
    counter: BTreeMap<u32, u64>,
    gauge: BTreeMap<u32, f64>,
    histogram: BTreeMap<u32, Hist>,
}

impl Totals {
    /// Reads `fd`'s segment (mapped as `reader`) for process `serial` of worker `id`.
    pub(crate) fn add(&mut self, serial: u64, id: u32, fd: OwnedFd, words: usize, reader: Reader) {
        self.live.insert(serial, Source { id, fd, words, reader });
    }

    /// Process `serial` is gone: what its segment holds is kept (its gauges are not: they
    /// meant something only while it ran).
    pub(crate) fn retire(&mut self, serial: u64) {
        if let Some(source) = self.live.remove(&serial) {
            self.fold(source);
        }
    }

    /// The old master has exited: the segments it handed over hold their last values.
    pub(crate) fn own_handed(&mut self) {
        for source in std::mem::take(&mut self.handed) {
            self.fold(source);
        }
    }

    fn fold(&mut self, mut source: Source) {
        let (series, refused) = source.reader.read();
        self.refused += refused;
        for (key, value) in series {
            let left = match value {
                Value::Counter(n) => Left::Counter(n),
                Value::Histogram { bounds, counts, count, sum } => Left::Histogram(Hist { bounds, counts, count, sum }),
                Value::Description(text) => {
                    self.descriptions.entry(key.name).or_insert(text);
                    continue;
                }
                Value::Gauge(_) => continue,
            };
            self.keep(key, source.id, left);
        }
    }

    fn keep(&mut self, key: Key, id: u32, left: Left) {
        if !self.retired.contains_key(&key) && self.retired.len() >= MAX_SERIES {
            self.refused += 1;
            return;
        }
        match self.retired.entry(key).or_default().entry(id) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(left);
            }
            std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().add(&left),
        }
    }

    /// Appends the application's series to a scrape: counters and histograms summed over every
    /// process (with `per_worker`, one series per worker id, label `worker`), gauges per
    /// running process (label `worker`); then the master's own figures about them.
    pub(crate) fn exposition(&mut self, per_worker: bool, out: &mut String) {
        let mut shown: BTreeMap<Key, Shown> = BTreeMap::new();
        let mut refused = self.refused;
        for (key, by_id) in &self.retired {
            let s = shown.entry(key.clone()).or_default();
            for (id, left) in by_id {
                match left {
                    Left::Counter(n) => *s.counter.entry(*id).or_default() += n,
                    Left::Histogram(h) => merge_into(&mut s.histogram, *id, h),
                }
            }
        }
        let handed = self.handed.iter_mut().map(|s| (s, false));
        for (source, gauges) in self.live.values_mut().map(|s| (s, true)).chain(handed) {
            let (series, worker_refused) = source.reader.read();
            refused += worker_refused;
            for (key, value) in series {
                match value {
                    Value::Description(text) => {
                        self.descriptions.entry(key.name).or_insert(text);
                    }
                    Value::Counter(n) => *shown.entry(key).or_default().counter.entry(source.id).or_default() += n,
                    Value::Gauge(v) if gauges => {
                        *shown.entry(key).or_default().gauge.entry(source.id).or_default() += v;
                    }
                    Value::Gauge(_) => {}
                    Value::Histogram { bounds, counts, count, sum } => {
                        let h = Hist { bounds, counts, count, sum };
                        merge_into(&mut shown.entry(key).or_default().histogram, source.id, &h);
                    }
                }
            }
        }
        let dropped = shown.len().saturating_sub(MAX_SERIES);
        let mut kinds: BTreeMap<String, &'static str> = BTreeMap::new();
        let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, s) in shown.into_iter().take(MAX_SERIES) {
            let name = metric_name(&key.name);
            let kind = if !s.histogram.is_empty() {
                "histogram"
            } else if !s.counter.is_empty() {
                "counter"
            } else {
                "gauge"
            };
            // A name is one kind: series of another kind under it are left out.
            if *kinds.entry(name.clone()).or_insert(kind) != kind {
                continue;
            }
            let lines = lines.entry(name.clone()).or_default();
            match kind {
                "counter" => {
                    if per_worker {
                        for (id, n) in &s.counter {
                            lines.push(format!("{name}{} {n}", labels(&key.labels, Some(*id), None)));
                        }
                    } else {
                        lines.push(format!(
                            "{name}{} {}",
                            labels(&key.labels, None, None),
                            s.counter.values().sum::<u64>()
                        ));
                    }
                }
                "gauge" => {
                    for (id, v) in &s.gauge {
                        lines.push(format!("{name}{} {}", labels(&key.labels, Some(*id), None), number(*v)));
                    }
                }
                _ => {
                    let merged: Vec<(Option<u32>, Hist)> = if per_worker {
                        s.histogram.into_iter().map(|(id, h)| (Some(id), h)).collect()
                    } else {
                        let mut all = s.histogram.into_values();
                        let first = all.next().expect("a histogram");
                        vec![(
                            None,
                            all.fold(first, |mut a, b| {
                                a.merge(&b);
                                a
                            }),
                        )]
                    };
                    for (id, h) in merged {
                        let mut cumulative = 0;
                        for (b, c) in h.bounds.iter().zip(&h.counts) {
                            cumulative += c;
                            let le = number(*b);
                            lines.push(format!("{name}_bucket{} {cumulative}", labels(&key.labels, id, Some(&le))));
                        }
                        // A worker adds to the bucket, then to the count: read in between, the
                        // buckets are one ahead, and +Inf must not be below them.
                        let count = h.count.max(cumulative);
                        lines.push(format!("{name}_bucket{} {count}", labels(&key.labels, id, Some("+Inf"))));
                        lines.push(format!("{name}_sum{} {}", labels(&key.labels, id, None), number(h.sum)));
                        lines.push(format!("{name}_count{} {count}", labels(&key.labels, id, None)));
                    }
                }
            }
        }
        for (name, kind) in &kinds {
            let help =
                self.descriptions.get(name).map_or_else(|| format!("{name} (no description)"), |d| escape_help(d));
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for line in &lines[name] {
                let _ = writeln!(out, "{line}");
            }
        }
        let count = kinds.len();
        let _ = writeln!(
            out,
            "# HELP cluster_metrics_names Application metric names shown.\n# TYPE cluster_metrics_names gauge\ncluster_metrics_names {count}"
        );
        let _ = writeln!(
            out,
            "# HELP cluster_metrics_series_refused_total Application series refused: a worker's segment was full, or the master's cap of {MAX_SERIES} was reached.\n# TYPE cluster_metrics_series_refused_total counter\ncluster_metrics_series_refused_total {refused}"
        );
        let _ = writeln!(
            out,
            "# HELP cluster_metrics_series_dropped Application series not shown in this scrape, past the cap of {MAX_SERIES}.\n# TYPE cluster_metrics_series_dropped gauge\ncluster_metrics_series_dropped {dropped}"
        );
    }

    /// What a new master needs to go on counting: what gone processes left, and copies of the
    /// running processes' segments (they run on, retiring, and their last counts are the new
    /// master's to keep). In pieces of about `bytes` of JSON at most.
    pub(crate) fn export(&self, bytes: usize) -> std::io::Result<Export> {
        let mut entries = Vec::new();
        for (key, by_id) in &self.retired {
            for (id, left) in by_id {
                let mut e = json!({"name": key.name, "labels": key.labels, "id": id});
                match left {
                    Left::Counter(n) => e["counter"] = json!(n),
                    Left::Histogram(h) => {
                        let bits = |v: &[f64]| v.iter().map(|b| b.to_bits()).collect::<Vec<u64>>();
                        e["histogram"] = json!({"bounds": bits(&h.bounds), "counts": h.counts, "count": h.count, "sum": h.sum.to_bits()});
                    }
                }
                entries.push(e);
            }
        }
        let mut pieces = Vec::new();
        let (mut piece, mut size) = (Vec::new(), 0);
        for e in entries {
            let len = e.to_string().len();
            if size + len > bytes && !piece.is_empty() {
                pieces.push(json!({"retired": std::mem::take(&mut piece)}));
                size = 0;
            }
            size += len;
            piece.push(e);
        }
        if !piece.is_empty() {
            pieces.push(json!({"retired": piece}));
        }
        pieces.push(json!({"refused": self.refused, "descriptions": self.descriptions}));
        let mut segments = Vec::new();
        for source in self.live.values().chain(&self.handed) {
            segments.push((json!({"id": source.id, "words": source.words}), source.fd.try_clone()?));
        }
        Ok((pieces, segments))
    }

    /// Takes a piece of what an old master exported (see [`export`](Self::export)); `Err` says
    /// what could not be read.
    pub(crate) fn adopt(&mut self, piece: &Json) -> Result<(), String> {
        let bad = || format!("a metrics piece the new master cannot read: {piece}");
        if let Some(entries) = piece.get("retired").and_then(Json::as_array) {
            for e in entries {
                let name = e["name"].as_str().ok_or_else(bad)?.to_string();
                let labels: Vec<(String, String)> = serde_json::from_value(e["labels"].clone()).map_err(|_| bad())?;
                let id = e["id"].as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(bad)?;
                let left = if let Some(n) = e["counter"].as_u64() {
                    Left::Counter(n)
                } else {
                    let h = &e["histogram"];
                    let floats = |v: &Json| -> Option<Vec<f64>> {
                        v.as_array()?.iter().map(|b| b.as_u64().map(f64::from_bits)).collect()
                    };
                    let counts: Vec<u64> = serde_json::from_value(h["counts"].clone()).map_err(|_| bad())?;
                    let bounds = floats(&h["bounds"]).filter(|b| b.len() == counts.len()).ok_or_else(bad)?;
                    let (count, sum) = (h["count"].as_u64().ok_or_else(bad)?, h["sum"].as_u64().ok_or_else(bad)?);
                    Left::Histogram(Hist { bounds, counts, count, sum: f64::from_bits(sum) })
                };
                self.keep(Key { name, labels }, id, left);
            }
        }
        if let Some(refused) = piece.get("refused").and_then(Json::as_u64) {
            self.refused += refused;
        }
        if let Some(texts) = piece.get("descriptions").and_then(Json::as_object) {
            for (name, text) in texts {
                self.descriptions.entry(name.clone()).or_insert_with(|| text.as_str().unwrap_or_default().to_string());
            }
        }
        Ok(())
    }

    /// A segment of the old master's process of worker `id`, read until the old master exits.
    pub(crate) fn adopt_segment(&mut self, id: u32, fd: OwnedFd, words: usize) -> std::io::Result<()> {
        let map = crate::sys::map_segment(&fd, words)?;
        self.handed.push(Source { id, fd, words, reader: Reader::new(map) });
        Ok(())
    }
}

fn merge_into(into: &mut BTreeMap<u32, Hist>, id: u32, h: &Hist) {
    match into.get_mut(&id) {
        Some(have) => have.merge(h),
        None => {
            into.insert(id, h.clone());
        }
    }
}

/// A metric name as Prometheus takes it: `[a-zA-Z_:][a-zA-Z0-9_:]*`, other characters `_`.
fn metric_name(name: &str) -> String {
    let mut out: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == ':' { c } else { '_' }).collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// `{k="v",…}` with the program's labels (names made valid; its own `worker` and `le` renamed
/// `exported_…`, as Prometheus does), then `worker` and `le`.
fn labels(own: &[(String, String)], worker: Option<u32>, le: Option<&str>) -> String {
    let mut parts: Vec<String> = own
        .iter()
        .map(|(k, v)| {
            let mut k: String =
                k.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
            if k.is_empty() || k.starts_with(|c: char| c.is_ascii_digit()) {
                k.insert(0, '_');
            }
            if k == "worker" || k == "le" {
                k.insert_str(0, "exported_");
            }
            format!("{k}=\"{}\"", escape_value(v))
        })
        .collect();
    if let Some(id) = worker {
        let id = if id == crate::ipc::message::AGENT { "agent".to_string() } else { id.to_string() };
        parts.push(format!("worker=\"{id}\""));
    }
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

fn escape_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A value as the text format writes it (`+Inf`, `NaN`).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::metrics::segment::{self, Kind, Writer};

    /// A segment for process `serial` of worker `id` in `totals`, and its writer.
    fn process(totals: &mut Totals, serial: u64, id: u32) -> Writer {
        process_of(totals, serial, id, 4096)
    }

    fn process_of(totals: &mut Totals, serial: u64, id: u32, words: usize) -> Writer {
        let fd = crate::sys::create_segment("test", words).unwrap();
        let theirs = crate::sys::map_segment(&fd, words).unwrap();
        segment::init(theirs.words());
        totals.add(
            serial,
            id,
            fd.try_clone().unwrap(),
            words,
            Reader::new(crate::sys::map_segment(&fd, words).unwrap()),
        );
        Writer::new(theirs).unwrap()
    }

    fn key(name: &str, labels: &[(&str, &str)]) -> Key {
        Key { name: name.into(), labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    fn bump(w: &Writer, at: usize, n: u64) {
        w.words()[at].fetch_add(n, Ordering::Relaxed);
    }

    fn text(totals: &mut Totals, per_worker: bool) -> String {
        let mut out = String::new();
        totals.exposition(per_worker, &mut out);
        out
    }

    #[test]
    fn counters_add_up_over_processes_and_survive_their_exit_gauges_do_not() {
        let mut totals = Totals::default();
        let one = process(&mut totals, 1, 1);
        let two = process(&mut totals, 2, 2);
        let hits = key("hits_total", &[("path", "/")]);
        let (a, b) = (one.add(Kind::Counter, &hits, &[]).unwrap(), two.add(Kind::Counter, &hits, &[]).unwrap());
        let g = one.add(Kind::Gauge, &key("queue", &[]), &[]).unwrap();
        one.words()[g].store(3.5f64.to_bits(), Ordering::Relaxed);
        assert!(one.describe("hits_total", "Hits.\nBy path."));
        bump(&one, a, 7);
        bump(&two, b, 5);
        let t = text(&mut totals, false);
        assert!(
            t.contains("# HELP hits_total Hits.\\nBy path.\n# TYPE hits_total counter\nhits_total{path=\"/\"} 12\n"),
            "{t}"
        );
        assert!(t.contains("queue{worker=\"1\"} 3.5\n"), "{t}");
        let t = text(&mut totals, true);
        assert!(t.contains("hits_total{path=\"/\",worker=\"1\"} 7\nhits_total{path=\"/\",worker=\"2\"} 5\n"), "{t}");
        // Worker 1's process exits, then a new one counts on: the total never goes down.
        bump(&one, a, 1);
        totals.retire(1);
        let three = process(&mut totals, 3, 1);
        let c = three.add(Kind::Counter, &hits, &[]).unwrap();
        bump(&three, c, 2);
        let t = text(&mut totals, false);
        assert!(t.contains("hits_total{path=\"/\"} 15\n"), "{t}");
        assert!(!t.contains("queue{"), "a gone process's gauge: {t}");
        assert!(text(&mut totals, true).contains("hits_total{path=\"/\",worker=\"1\"} 10\n"));
    }

    #[test]
    fn histograms_merge_bucket_by_bucket_and_across_other_bounds() {
        let mut totals = Totals::default();
        let one = process(&mut totals, 1, 1);
        let two = process(&mut totals, 2, 2);
        let took = key("took_seconds", &[]);
        for (w, obs) in [(&one, [0.05, 0.5, 5.0]), (&two, [0.01, 0.2, 0.3])] {
            let at = w.add(Kind::Histogram, &took, &[0.1, 1.0]).unwrap();
            for v in obs {
                let bucket = [0.1, 1.0].iter().position(|b| v <= *b);
                if let Some(i) = bucket {
                    bump(w, at + 2 + i, 1);
                }
                bump(w, at + 4, 1);
                let sum = f64::from_bits(w.words()[at + 5].load(Ordering::Relaxed)) + v;
                w.words()[at + 5].store(sum.to_bits(), Ordering::Relaxed);
            }
        }
        let t = text(&mut totals, false);
        for line in [
            "# TYPE took_seconds histogram",
            "took_seconds_bucket{le=\"0.1\"} 2\n",
            "took_seconds_bucket{le=\"1\"} 5\n",
            "took_seconds_bucket{le=\"+Inf\"} 6\n",
            "took_seconds_count 6\n",
        ] {
            assert!(t.contains(line), "{line:?} in {t}");
        }
        // Read between a worker's add to a bucket and its add to the count: +Inf and the
        // count are never below the buckets.
        let at = one.add(Kind::Histogram, &key("mid_seconds", &[]), &[0.1]).unwrap();
        bump(&one, at + 1, 3);
        bump(&one, at + 2, 2);
        let t = text(&mut totals, false);
        for line in
            ["mid_seconds_bucket{le=\"0.1\"} 3\n", "mid_seconds_bucket{le=\"+Inf\"} 3\n", "mid_seconds_count 3\n"]
        {
            assert!(t.contains(line), "{line:?} in {t}");
        }
        // Other bounds: counted at the union, each at its highest bound not above.
        let mut a = Hist { bounds: vec![0.1, 1.0], counts: vec![2, 3], count: 6, sum: 1.0 };
        a.merge(&Hist { bounds: vec![0.5], counts: vec![4], count: 4, sum: 1.0 });
        assert_eq!(a.bounds, [0.1, 0.5, 1.0]);
        assert_eq!(a.counts, [2, 4, 3], "cumulative 2, 6, 9");
        assert_eq!((a.count, a.sum), (10, 2.0));
    }

    #[test]
    fn labels_are_escaped_and_names_made_valid() {
        let mut totals = Totals::default();
        let one = process(&mut totals, 1, 1);
        let at = one.add(Kind::Gauge, &key("my.gauge", &[("worker", "mine"), ("q", "a\"b\\c\nd")]), &[]).unwrap();
        one.words()[at].store(f64::INFINITY.to_bits(), Ordering::Relaxed);
        let t = text(&mut totals, false);
        assert!(t.contains("my_gauge{exported_worker=\"mine\",q=\"a\\\"b\\\\c\\nd\",worker=\"1\"} +Inf\n"), "{t}");
    }

    #[test]
    fn what_a_master_exports_another_adopts_whole() {
        let mut old = Totals::default();
        let one = process(&mut old, 1, 1);
        let running = process(&mut old, 2, 2);
        let hits = key("hits_total", &[]);
        let h = key("took_seconds", &[("a", "b")]);
        let (c, hi) = (one.add(Kind::Counter, &hits, &[]).unwrap(), one.add(Kind::Histogram, &h, &[0.1]).unwrap());
        bump(&one, c, 40);
        bump(&one, hi + 1, 2);
        bump(&one, hi + 2, 3);
        let r = running.add(Kind::Counter, &hits, &[]).unwrap();
        bump(&running, r, 2);
        old.retire(1);
        let before = text(&mut old, false);
        let (pieces, segments) = old.export(64).unwrap();
        assert!(pieces.len() > 1, "small pieces: {pieces:?}");
        let mut new = Totals::default();
        for piece in &pieces {
            let bytes = serde_json::to_vec(piece).unwrap();
            new.adopt(&serde_json::from_slice(&bytes).unwrap()).unwrap();
        }
        for (item, fd) in segments {
            new.adopt_segment(item["id"].as_u64().unwrap() as u32, fd, item["words"].as_u64().unwrap() as usize)
                .unwrap();
        }
        assert_eq!(text(&mut new, false), before);
        // The old master's running process counts on; its count stays once the old master is gone.
        bump(&running, r, 1);
        new.own_handed();
        assert!(text(&mut new, false).contains("hits_total 43\n"));
        assert!(new.adopt(&json!({"retired": [{"name": 1}]})).is_err());
    }

    #[test]
    fn a_label_explosion_is_capped_and_counted() {
        let mut totals = Totals::default();
        for serial in 0..3 {
            let w = process_of(&mut totals, serial, serial as u32 + 1, segment::WORDS);
            for i in 0..4000u32 {
                let _ = w.add(Kind::Counter, &key("c_total", &[("v", &format!("{serial}-{i}"))]), &[]);
            }
            totals.retire(serial);
        }
        assert_eq!(totals.retired.len(), MAX_SERIES, "the master keeps at most its cap");
        let t = text(&mut totals, false);
        let refused: u64 =
            t.lines().find_map(|l| l.strip_prefix("cluster_metrics_series_refused_total ")).unwrap().parse().unwrap();
        assert_eq!(refused, 3 * 4000 - MAX_SERIES as u64, "{refused}");
    }
}
