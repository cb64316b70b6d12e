//! The master's log: `tracing` events with target `cluster`. The ones that say what happened
//! to a process carry fields a program can rely on: `event` (a name such as `ready`, `exit`,
//! `reload_done`), and `id`, `pid`, `reason` where they apply. The wording of the message is
//! for people and may change; the fields do not.
//!
//! With no subscriber of the user's, the master installs one on its thread: text on stderr, or
//! one JSON object per line with `CLUSTER_LOG_FORMAT=json`, filtered by `CLUSTER_LOG` (a
//! level, or `target=level` directives separated by commas; default `info`).

/// An `info` event of the master (target `cluster`): `note!(event = "ready", id, pid, "text")`.
/// It also goes to the master's ring of recent events (`clusterctl logs`), whatever
/// subscriber the program has.
macro_rules! note {
    ($($arg:tt)+) => {{
        ::tracing::info!(target: "cluster", $($arg)+);
        $crate::log::ring::capture(|| ::tracing::info!(target: "cluster", $($arg)+));
    }};
}

/// A `warn` event of the master (target `cluster`), same form as [`note!`].
macro_rules! warning {
    ($($arg:tt)+) => {{
        ::tracing::warn!(target: "cluster", $($arg)+);
        $crate::log::ring::capture(|| ::tracing::warn!(target: "cluster", $($arg)+));
    }};
}

/// A line of the master's log with no fields (an `info` event).
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::note!("{}", format_args!($($arg)*))
    };
}
#[allow(unused_imports)]
pub(crate) use {log, note, warning};

pub(crate) mod ring;

use tracing::Level;
use tracing_subscriber::filter::Targets;

/// A line on stderr from a process with no subscriber (a worker, or before the master's is
/// installed), prefixed `cluster: `, written with one `write` so that it is not cut into by
/// the lines of the other processes of the cluster that share the stream.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::log::write_line(format_args!($($arg)*))
    };
}
pub(crate) use say;

/// See [`say!`].
pub(crate) fn write_line(args: std::fmt::Arguments<'_>) {
    let line = format!("cluster: {args}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
}

/// How the master writes its log (`CLUSTER_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum LogFormat {
    /// Lines of text on stderr.
    #[default]
    Text,
    /// One JSON object per line on stderr.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(()),
        }
    }
}

/// Installs the master's subscriber on this thread unless the program set a global one; the
/// guard keeps it until it is dropped.
pub(crate) fn init(format: LogFormat, filter: Option<&str>) -> Option<tracing::subscriber::DefaultGuard> {
    if tracing::dispatcher::has_been_set() {
        return None;
    }
    use tracing_subscriber::layer::SubscriberExt;
    let filter = parse_filter(filter.unwrap_or("info")).unwrap_or_else(|_| Targets::new().with_default(Level::INFO));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    Some(match format {
        LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            tracing::subscriber::set_default(builder.with_ansi(ansi).finish().with(filter))
        }
        LogFormat::Json => tracing::subscriber::set_default(builder.json().flatten_event(true).finish().with(filter)),
    })
}

/// A `CLUSTER_LOG` value: a level (`warn`) and/or `target=level` directives (`cluster=debug`),
/// separated by commas.
pub(crate) fn parse_filter(directives: &str) -> Result<Targets, String> {
    directives.parse::<Targets>().map_err(|e| e.to_string())
}
