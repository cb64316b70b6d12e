//! The master's ring of recent log records, for `clusterctl logs`: its own events (every
//! `note!`/`warning!`, recorded through a dispatcher of its own, so whatever subscriber the
//! program installed sees them unchanged) and, with `CLUSTER_LOG_CAPTURE=1`, the lines its
//! workers print. Each record is one JSON object (`timestamp`, `level`, `message`, and the
//! event's fields); followers get new ones through a broadcast channel.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Records kept.
pub(crate) const CAPACITY: usize = 2000;

/// Recent records, and a channel that carries each new one.
pub(crate) struct Ring {
    records: Mutex<VecDeque<Arc<str>>>,
    new: broadcast::Sender<Arc<str>>,
}

static RING: OnceLock<(Arc<Ring>, tracing::Dispatch)> = OnceLock::new();

/// The process's ring, made on first use (only the master records into it).
pub(crate) fn ring() -> Arc<Ring> {
    RING.get_or_init(|| {
        let ring = Arc::new(Ring { records: Mutex::new(VecDeque::new()), new: broadcast::channel(1024).0 });
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(Recorder(ring.clone())));
        (ring, dispatch)
    })
    .0
    .clone()
}

/// Runs `log` (a `tracing` event) with the ring's dispatcher, if the ring exists.
pub(crate) fn capture(log: impl FnOnce()) {
    if let Some((_, dispatch)) = RING.get() {
        tracing::dispatcher::with_default(dispatch, log);
    }
}

impl Ring {
    /// Adds a record.
    pub(crate) fn push(&self, mut record: Map<String, Value>) {
        record.insert("timestamp".into(), Value::String(rfc3339(SystemTime::now())));
        let line: Arc<str> = Value::Object(record).to_string().into();
        let mut records = self.records.lock().unwrap();
        if records.len() == CAPACITY {
            records.pop_front();
        }
        records.push_back(line.clone());
        drop(records);
        let _ = self.new.send(line);
    }

    /// The last `n` records (oldest first), and a receiver of the ones after them.
    pub(crate) fn tail(&self, n: usize) -> (Vec<Arc<str>>, broadcast::Receiver<Arc<str>>) {
        let records = self.records.lock().unwrap();
        let rx = self.new.subscribe();
        (records.iter().skip(records.len().saturating_sub(n)).cloned().collect(), rx)
    }

    /// A receiver of new records.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.new.subscribe()
    }
}

/// The layer that turns the master's events into records.
struct Recorder(Arc<Ring>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        metadata.target() == "cluster"
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields(Map::new());
        fields.0.insert("level".into(), Value::String(event.metadata().level().to_string()));
        event.record(&mut fields);
        self.0.push(fields.0);
    }
}

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::String(value.into()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

/// `2026-12-01T23:04:05.123Z`.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::with_capacity(24);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2026-12-01T23:04:05.123Z
        let at = UNIX_EPOCH + Duration::from_millis(1_796_166_245_123);
        assert_eq!(rfc3339(at), "2026-12-01T23:04:05.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn the_ring_keeps_the_last_records_and_followers_get_new_ones() {
        let ring = ring();
        let (_, mut rx) = ring.tail(0);
        crate::log::note!(event = "ring_test", id = 7u32, "a test record");
        // Other tests may log meanwhile: find ours.
        let record = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|line| serde_json::from_str::<Value>(&line).unwrap())
            .find(|r| r["event"] == "ring_test")
            .expect("the record");
        assert_eq!(record["event"], "ring_test");
        assert_eq!(record["id"], 7);
        assert_eq!(record["level"], "INFO");
        assert_eq!(record["message"], "a test record");
        let (last, _) = ring.tail(1);
        assert_eq!(last.len(), 1);
    }
}
