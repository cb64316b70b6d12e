//! The master's log lines: one line each on stderr, prefixed `cluster:`.

/// Writes one log line to stderr.
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("cluster: {}", format_args!($($arg)*))
    };
}
pub(crate) use log;
