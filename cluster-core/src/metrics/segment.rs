//! The layout of a worker's metrics segment: a shared memory region of `u64` words
//! (`sys/shm.rs`) that the worker appends series to and updates with atomic operations, and
//! that the master reads whenever it likes, without asking the worker anything.
//!
//! ```text
//! word 0        MAGIC
//! word 1        capacity: the most series                       written by the master
//! word 2        the segment's length in words                   written by the master
//! word 3        series published (Release after each record)    the worker
//! word 4        series refused (the segment was full)           the worker
//! word 5        the next free word                              the worker's own
//! words 8..     the index: capacity words, the offset of each record
//! then          the records, each:
//!                 kind (bits 0..8) | key length in bytes (8..32) | buckets (32..48)
//!                 the key, 8 bytes a word: name, then "\0label\0value" for each label
//!                 counter: 1 word; gauge: 1 word (f64 bits);
//!                 histogram: bounds (f64 bits), counts, then count and sum (f64 bits);
//!                 description: none (the key is name "\0" text)
//! ```
//!
//! A record is written whole, its offset put in the index, and only then the published count
//! raised (Release): the master, which reads the count first (Acquire), never sees a record
//! half written. Records never move or change shape; only their value words change. The
//! master trusts nothing it reads: offsets, lengths and counts are checked against the
//! segment, keys are decoded lossily, and a record that does not fit is skipped.

#[cfg(any(feature = "metrics", test))]
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// "clusmet1".
pub(crate) const MAGIC: u64 = 0x636c_7573_6d65_7431;
/// Header words before the index.
const HEADER: usize = 8;
/// A worker's segment: 1 MiB.
pub(crate) const WORDS: usize = 128 * 1024;
/// The most series one worker's segment holds (a label explosion is refused past this).
pub(crate) const CAPACITY: usize = 4096;
/// The longest key, in bytes.
pub(crate) const MAX_KEY: usize = 1024;
/// The most buckets of a histogram.
pub(crate) const MAX_BUCKETS: usize = 64;

const COUNT: usize = 3;
const REFUSED: usize = 4;
const NEXT: usize = 5;

/// What a series is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter = 1,
    Gauge = 2,
    Histogram = 3,
    Description = 4,
}

impl Kind {
    fn from_word(k: u64) -> Option<Kind> {
        Some(match k {
            1 => Kind::Counter,
            2 => Kind::Gauge,
            3 => Kind::Histogram,
            4 => Kind::Description,
            _ => return None,
        })
    }
}

/// Writes the header of a new segment (the master, before handing it to the worker).
pub(crate) fn init(words: &[AtomicU64]) {
    // A small segment (a test's) gives half of what follows the header to the index.
    let capacity = CAPACITY.min(words.len().saturating_sub(HEADER) / 2);
    words[1].store(capacity as u64, Ordering::Relaxed);
    words[2].store(words.len() as u64, Ordering::Relaxed);
    words[NEXT].store((HEADER + capacity) as u64, Ordering::Relaxed);
    words[0].store(MAGIC, Ordering::Release);
}

/// A series' key: its name and its labels, in the order given.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub(crate) name: String,
    pub(crate) labels: Vec<(String, String)>,
}

impl Key {
    #[cfg(any(feature = "metrics", test))]
    fn encode(&self) -> Vec<u8> {
        let mut out = clean(&self.name).into_bytes();
        for (k, v) in &self.labels {
            out.push(0);
            out.extend(clean(k).as_bytes());
            out.push(0);
            out.extend(clean(v).as_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Key {
        let text = String::from_utf8_lossy(bytes);
        let mut parts = text.split('\0');
        let name = parts.next().unwrap_or_default().to_string();
        let mut labels = Vec::new();
        while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
            labels.push((k.to_string(), v.to_string()));
        }
        Key { name, labels }
    }
}

/// A text with its NULs replaced (they separate the parts of a key).
#[cfg(any(feature = "metrics", test))]
fn clean(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

/// The worker's side: appends series (rarely: once per new name and labels) and hands out the
/// offset of their values, which the recorder updates with atomics.
#[cfg(any(feature = "metrics", test))]
#[derive(Debug)]
pub(crate) struct Writer {
    map: crate::sys::Mapping,
    /// Appends are one at a time.
    append: Mutex<()>,
}

#[cfg(any(feature = "metrics", test))]
impl Writer {
    /// A segment the master created and initialised; `None` if it is not one.
    pub(crate) fn new(map: crate::sys::Mapping) -> Option<Writer> {
        let ok = map.words().first().is_some_and(|w| w.load(Ordering::Acquire) == MAGIC);
        ok.then(|| Writer { map, append: Mutex::new(()) })
    }

    /// The segment's words.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        self.map.words()
    }

    /// Appends a series; the offset of its value words, or `None` if it is refused (the
    /// segment is full, or the key or the buckets are too long), which is counted.
    pub(crate) fn add(&self, kind: Kind, key: &Key, bounds: &[f64]) -> Option<usize> {
        self.append_record(kind, &key.encode(), bounds)
    }

    /// Appends the description of metric `name` (its `# HELP` text).
    pub(crate) fn describe(&self, name: &str, text: &str) -> bool {
        let mut bytes = clean(name).into_bytes();
        bytes.push(0);
        bytes.extend(clean(text).as_bytes());
        self.append_record(Kind::Description, &bytes, &[]).is_some()
    }

    fn append_record(&self, kind: Kind, bytes: &[u8], bounds: &[f64]) -> Option<usize> {
        let words = self.words();
        let _one = self.append.lock().unwrap_or_else(|e| e.into_inner());
        let key_words = bytes.len().div_ceil(8);
        let values = match kind {
            Kind::Counter | Kind::Gauge => 1,
            Kind::Histogram => 2 * bounds.len() + 2,
            Kind::Description => 0,
        };
        let capacity = words[1].load(Ordering::Relaxed) as usize;
        let count = words[COUNT].load(Ordering::Relaxed) as usize;
        let at = words[NEXT].load(Ordering::Relaxed) as usize;
        let end = at + 1 + key_words + values;
        let fits = bytes.len() <= MAX_KEY && bounds.len() <= MAX_BUCKETS && count < capacity && end <= words.len();
        if !fits {
            words[REFUSED].fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let buckets = if kind == Kind::Histogram { bounds.len() } else { 0 };
        words[at].store(kind as u64 | (bytes.len() as u64) << 8 | (buckets as u64) << 32, Ordering::Relaxed);
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            words[at + 1 + i].store(u64::from_le_bytes(word), Ordering::Relaxed);
        }
        let value = at + 1 + key_words;
        if kind == Kind::Histogram {
            for (i, b) in bounds.iter().enumerate() {
                words[value + i].store(b.to_bits(), Ordering::Relaxed);
            }
        }
        words[HEADER + count].store(at as u64, Ordering::Relaxed);
        words[NEXT].store(end as u64, Ordering::Relaxed);
        words[COUNT].store(count as u64 + 1, Ordering::Release);
        Some(value)
    }
}

/// What one series holds at the moment it is read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram { bounds: Vec<f64>, counts: Vec<u64>, count: u64, sum: f64 },
    Description(String),
}

/// A published record, as the master found it.
#[derive(Debug, Clone)]
struct Record {
    key: Key,
    kind: Kind,
    /// Offset of its values.
    value: usize,
    buckets: usize,
}

/// The master's side of one segment: the records it has read so far (records never change,
/// so each is decoded once), and their values read afresh at each look.
#[derive(Debug)]
pub(crate) struct Reader {
    map: crate::sys::Mapping,
    records: Vec<Record>,
    /// Records looked at so far (published ones, valid or not).
    seen: usize,
}

impl Reader {
    pub(crate) fn new(map: crate::sys::Mapping) -> Reader {
        Reader { map, records: Vec::new(), seen: 0 }
    }

    /// Every series and its value now, and how many series the worker refused.
    pub(crate) fn read(&mut self) -> (Vec<(Key, Value)>, u64) {
        self.learn();
        let words = self.map.words();
        let word = |i: usize| words[i].load(Ordering::Relaxed);
        let out = self
            .records
            .iter()
            .map(|r| {
                let value = match r.kind {
                    Kind::Counter => Value::Counter(word(r.value)),
                    Kind::Gauge => Value::Gauge(f64::from_bits(word(r.value))),
                    Kind::Histogram => {
                        let n = r.buckets;
                        Value::Histogram {
                            bounds: (0..n).map(|i| f64::from_bits(word(r.value + i))).collect(),
                            counts: (0..n).map(|i| word(r.value + n + i)).collect(),
                            count: word(r.value + 2 * n),
                            sum: f64::from_bits(word(r.value + 2 * n + 1)),
                        }
                    }
                    Kind::Description => {
                        let (name, text) = (r.key.name.clone(), r.key.labels.first().map(|l| l.0.clone()));
                        return (Key { name, labels: Vec::new() }, Value::Description(text.unwrap_or_default()));
                    }
                };
                (r.key.clone(), value)
            })
            .collect();
        (out, word(REFUSED))
    }

    /// Decodes the records published since the last look, checking everything against the
    /// segment's real size.
    fn learn(&mut self) {
        let words = self.map.words();
        let len = words.len();
        if len <= HEADER || words[0].load(Ordering::Acquire) != MAGIC {
            return;
        }
        let capacity = (words[1].load(Ordering::Relaxed) as usize).min(len - HEADER);
        let published = (words[COUNT].load(Ordering::Acquire) as usize).min(capacity);
        let data = HEADER + capacity;
        while self.seen < published {
            let at = words[HEADER + self.seen].load(Ordering::Relaxed) as usize;
            self.seen += 1;
            if at < data || at >= len {
                continue;
            }
            let head = words[at].load(Ordering::Relaxed);
            let (kind, key_len, buckets) =
                (head & 0xff, (head >> 8 & 0xff_ffff) as usize, (head >> 32 & 0xffff) as usize);
            let Some(kind) = Kind::from_word(kind) else { continue };
            if key_len > MAX_KEY || buckets > MAX_BUCKETS || (kind != Kind::Histogram && buckets != 0) {
                continue;
            }
            let key_words = key_len.div_ceil(8);
            let values = match kind {
                Kind::Counter | Kind::Gauge => 1,
                Kind::Histogram => 2 * buckets + 2,
                Kind::Description => 0,
            };
            if at + 1 + key_words + values > len {
                continue;
            }
            let mut bytes: Vec<u8> =
                (0..key_words).flat_map(|i| words[at + 1 + i].load(Ordering::Relaxed).to_le_bytes()).collect();
            bytes.truncate(key_len);
            let key = if kind == Kind::Description {
                // name "\0" text: kept as a key with the text as its one label's name.
                let text = String::from_utf8_lossy(&bytes);
                let (name, text) = text.split_once('\0').unwrap_or((&text, ""));
                Key { name: name.to_string(), labels: vec![(text.to_string(), String::new())] }
            } else {
                Key::decode(&bytes)
            };
            self.records.push(Record { key, kind, value: at + 1 + key_words, buckets });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(words: usize) -> (crate::sys::Mapping, crate::sys::Mapping) {
        let fd = crate::sys::create_segment("test", words).unwrap();
        let w = crate::sys::map_segment(&fd, words).unwrap();
        init(w.words());
        (w, crate::sys::map_segment(&fd, words).unwrap())
    }

    fn key(name: &str, labels: &[(&str, &str)]) -> Key {
        Key { name: name.into(), labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    #[test]
    fn series_written_by_one_side_are_read_by_the_other() {
        let (w, r) = segment(WORDS);
        let writer = Writer::new(w).unwrap();
        let mut reader = Reader::new(r);
        assert_eq!(reader.read(), (vec![], 0));
        let c = writer.add(Kind::Counter, &key("hits_total", &[("path", "/a")]), &[]).unwrap();
        let g = writer.add(Kind::Gauge, &key("queue", &[]), &[]).unwrap();
        let h = writer.add(Kind::Histogram, &key("took_seconds", &[]), &[0.1, 1.0]).unwrap();
        assert!(writer.describe("hits_total", "Hits by path"));
        let words = writer.words();
        words[c].fetch_add(5, Ordering::Relaxed);
        words[g].store(2.5f64.to_bits(), Ordering::Relaxed);
        words[h + 2].fetch_add(1, Ordering::Relaxed); // bucket 0.1
        words[h + 4].fetch_add(1, Ordering::Relaxed); // count
        words[h + 5].store(0.05f64.to_bits(), Ordering::Relaxed);
        let (series, refused) = reader.read();
        assert_eq!(refused, 0);
        assert_eq!(
            series,
            [
                (key("hits_total", &[("path", "/a")]), Value::Counter(5)),
                (key("queue", &[]), Value::Gauge(2.5)),
                (
                    key("took_seconds", &[]),
                    Value::Histogram { bounds: vec![0.1, 1.0], counts: vec![1, 0], count: 1, sum: 0.05 }
                ),
                (key("hits_total", &[]), Value::Description("Hits by path".into())),
            ]
        );
        // Values are read afresh; records are decoded once.
        words[c].fetch_add(1, Ordering::Relaxed);
        assert_eq!(reader.read().0[0].1, Value::Counter(6));
    }

    #[test]
    fn a_full_segment_refuses_and_counts() {
        let (w, r) = segment(HEADER + 2 * 4 + 40);
        let writer = Writer::new(w).unwrap();
        let added = (0..50).filter(|i| writer.add(Kind::Counter, &key(&format!("c{i}"), &[]), &[]).is_some()).count();
        let mut reader = Reader::new(r);
        let (series, refused) = reader.read();
        assert_eq!(series.len(), added);
        assert_eq!(refused, 50 - added as u64);
        assert!(writer.add(Kind::Counter, &key(&"x".repeat(MAX_KEY + 1), &[]), &[]).is_none(), "key too long");
    }

    #[test]
    fn garbage_in_a_segment_is_skipped_not_trusted() {
        let (w, r) = segment(WORDS);
        let writer = Writer::new(w).unwrap();
        writer.add(Kind::Counter, &key("good_total", &[]), &[]).unwrap();
        let words = writer.words();
        // A worker scribbling: a count past the capacity, offsets outside, a huge key length,
        // an unknown kind.
        words[HEADER + 1].store(u64::MAX, Ordering::Relaxed);
        words[HEADER + 2].store(3, Ordering::Relaxed);
        let at = words[NEXT].load(Ordering::Relaxed) as usize;
        words[at].store(1 | (1 << 30), Ordering::Relaxed);
        words[HEADER + 3].store(at as u64, Ordering::Relaxed);
        words[at + 1].store(9, Ordering::Relaxed);
        words[HEADER + 4].store(at as u64 + 1, Ordering::Relaxed);
        words[COUNT].store(u64::MAX, Ordering::Release);
        let mut reader = Reader::new(r);
        let (series, _) = reader.read();
        assert_eq!(series, [(key("good_total", &[]), Value::Counter(0))]);
    }
}
