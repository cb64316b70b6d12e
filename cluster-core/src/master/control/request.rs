//! The control socket's input: bounded lines, and the request each one holds. Pure, so the
//! property tests below can throw anything at it.

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::master::Scale;

/// One command of the control protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::master) enum Request {
    Ping,
    Status,
    /// `per_worker`: the application's counters and histograms per worker id.
    Metrics {
        per_worker: bool,
    },
    Reload,
    Scale(Scale),
    Restart(u32),
    Stop {
        fast: bool,
    },
    Upgrade,
    Logs {
        lines: usize,
        follow: bool,
    },
    /// A live view's stream: the history, then the status every `interval_ms` (1 s when not
    /// given) and the log records, the last `logs` first.
    Watch {
        interval_ms: Option<u64>,
        logs: usize,
    },
}

/// Why a line is not a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::master) enum Refused {
    /// Not a JSON object: the connection is closed after the error.
    Malformed(String),
    /// A JSON object, but not a valid request: an error, and the connection goes on.
    Invalid(String),
}

/// The commands, for error messages.
const COMMANDS: &str = "status, watch, reload, scale, restart, stop, upgrade, logs, metrics, ping";

/// Largest count a request takes (more is cut to this, then to what the ring holds or to the
/// longest interval a view may ask for).
const MAX_COUNT: u64 = 1_000_000;

/// Parses one request line.
pub(in crate::master) fn parse(line: &[u8]) -> Result<Request, Refused> {
    let request: Value = match serde_json::from_slice(line) {
        Ok(request @ Value::Object(_)) => request,
        Ok(_) => return Err(Refused::Malformed("a request is a JSON object".into())),
        Err(e) => return Err(Refused::Malformed(format!("malformed request: {e}"))),
    };
    let invalid = |why: String| Err(Refused::Invalid(why));
    let cmd = match request.get("cmd") {
        Some(Value::String(cmd)) => cmd.as_str(),
        Some(_) => return invalid("\"cmd\" is a string".into()),
        None => return invalid(format!("a request needs \"cmd\": one of {COMMANDS}")),
    };
    let flag = |name: &str| match request.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(Refused::Invalid(format!("\"{name}\" is true or false, not {other}"))),
    };
    let count = |name: &str, default: u64| match request.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) => Ok(n.min(MAX_COUNT)),
            None => Err(Refused::Invalid(format!("\"{name}\" is a count, not {v}"))),
        },
    };
    Ok(match cmd {
        "ping" => Request::Ping,
        "status" => Request::Status,
        "metrics" => Request::Metrics { per_worker: flag("per_worker")? },
        "reload" => Request::Reload,
        "upgrade" => Request::Upgrade,
        "scale" => {
            let to = match request.get("workers") {
                Some(Value::Number(n)) => n.to_string().parse::<Scale>(),
                Some(Value::String(s)) => s.parse::<Scale>(),
                _ => Err("scale needs \"workers\": N, \"+N\" or \"-N\"".to_string()),
            };
            Request::Scale(to.map_err(Refused::Invalid)?)
        }
        "restart" => match request.get("id").and_then(Value::as_u64).and_then(|id| u32::try_from(id).ok()) {
            Some(id) => Request::Restart(id),
            None => return invalid("restart needs \"id\": a worker id".into()),
        },
        "stop" => Request::Stop { fast: flag("fast")? },
        "logs" => Request::Logs { lines: count("lines", 20)? as usize, follow: flag("follow")? },
        "watch" => {
            let interval_ms = match request.get("interval_ms") {
                None | Some(Value::Null) => None,
                Some(_) => Some(count("interval_ms", 0)?),
            };
            Request::Watch { interval_ms, logs: count("logs", 0)? as usize }
        }
        other => {
            // Escaped first, then cut: an odd command echoes back at most 80 bytes.
            let mut shown = format!("{other:?}");
            if shown.len() > 80 {
                let cut = (0..=80).rev().find(|i| shown.is_char_boundary(*i)).unwrap_or(0);
                shown.truncate(cut);
                shown.push('…');
            }
            return invalid(format!("unknown command {shown}; commands: {COMMANDS}"));
        }
    })
}

/// Reads one line (without its newline) into `line`; `false` at the end of the stream. A line
/// longer than `max` bytes is an error, and no more than `max` bytes are ever held.
pub(in crate::master) async fn read_line(
    rd: &mut (impl AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    loop {
        let buf = rd.fill_buf().await?;
        if buf.is_empty() {
            return Ok(!line.is_empty());
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(at) => (&buf[..at], Some(at + 1)),
            None => (buf, None),
        };
        if line.len() + chunk.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("request line longer than {max} bytes"),
            ));
        }
        line.extend_from_slice(chunk);
        let used = done.unwrap_or(buf.len());
        rd.consume(used);
        if done.is_some() {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn requests_as_clusterctl_sends_them() {
        let cases = [
            (json!({"cmd": "status"}), Request::Status),
            (json!({"cmd": "scale", "workers": "+2"}), Request::Scale(Scale::Add(2))),
            (json!({"cmd": "scale", "workers": 3}), Request::Scale(Scale::To(3))),
            (json!({"cmd": "restart", "id": 2}), Request::Restart(2)),
            (json!({"cmd": "stop", "fast": true}), Request::Stop { fast: true }),
            (json!({"cmd": "logs", "lines": 5, "follow": true}), Request::Logs { lines: 5, follow: true }),
            (json!({"cmd": "logs"}), Request::Logs { lines: 20, follow: false }),
            (json!({"cmd": "watch"}), Request::Watch { interval_ms: None, logs: 0 }),
            (
                json!({"cmd": "watch", "interval_ms": 500, "logs": 8}),
                Request::Watch { interval_ms: Some(500), logs: 8 },
            ),
            (
                json!({"cmd": "watch", "interval_ms": u64::MAX}),
                Request::Watch { interval_ms: Some(MAX_COUNT), logs: 0 },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line.to_string().as_bytes()), Ok(want), "{line}");
        }
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let invalid = |line: &str| match parse(line.as_bytes()) {
            Err(Refused::Invalid(why)) => why,
            other => panic!("{line}: {other:?}"),
        };
        assert!(invalid(r#"{"cmd":"frob"}"#).contains("unknown command \"frob\""));
        // An odd command is echoed whole up to 80 bytes (quotes included), cut with … past it.
        let exactly = "x".repeat(78);
        assert!(invalid(&format!(r#"{{"cmd":"{exactly}"}}"#)).contains(&format!("\"{exactly}\"; commands")));
        let longer = invalid(&format!(r#"{{"cmd":"{}"}}"#, "y".repeat(200)));
        assert!(longer.contains(&format!("\"{}…; commands", "y".repeat(79))), "{longer}");
        assert!(invalid(r#"{"cmd":"scale","workers":0}"#).contains("not a number of workers"));
        assert!(invalid(r#"{"cmd":"restart","id":-1}"#).contains("worker id"));
        assert!(invalid(r#"{"cmd":"restart","id":4294967296}"#).contains("worker id"));
        assert!(invalid(r#"{"cmd":"stop","fast":"yes"}"#).contains("true or false"));
        assert!(invalid(r#"{}"#).contains("needs \"cmd\""));
        assert!(invalid(r#"{"cmd":"watch","interval_ms":-5}"#).contains("\"interval_ms\" is a count"));
        assert!(invalid(r#"{"cmd":"watch","logs":"all"}"#).contains("\"logs\" is a count"));
        assert!(matches!(parse(b"[1,2]"), Err(Refused::Malformed(_))));
        assert!(matches!(parse(b"{\"cmd\":"), Err(Refused::Malformed(_))));
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Ping),
            Just(Request::Status),
            any::<bool>().prop_map(|per_worker| Request::Metrics { per_worker }),
            Just(Request::Reload),
            Just(Request::Upgrade),
            (1usize..100_000).prop_map(|n| Request::Scale(Scale::To(n))),
            (0usize..100_000).prop_map(|n| Request::Scale(Scale::Add(n))),
            (0usize..100_000).prop_map(|n| Request::Scale(Scale::Remove(n))),
            any::<u32>().prop_map(Request::Restart),
            any::<bool>().prop_map(|fast| Request::Stop { fast }),
            (0usize..1_000_000, any::<bool>()).prop_map(|(lines, follow)| Request::Logs { lines, follow }),
            (proptest::option::of(0u64..1_000_000), 0usize..1_000_000)
                .prop_map(|(interval_ms, logs)| Request::Watch { interval_ms, logs }),
        ]
    }

    fn encode(r: &Request) -> Value {
        match r {
            Request::Ping => json!({"cmd": "ping"}),
            Request::Status => json!({"cmd": "status"}),
            Request::Metrics { per_worker } => json!({"cmd": "metrics", "per_worker": per_worker}),
            Request::Reload => json!({"cmd": "reload"}),
            Request::Upgrade => json!({"cmd": "upgrade"}),
            Request::Scale(Scale::To(n)) => json!({"cmd": "scale", "workers": n}),
            Request::Scale(Scale::Add(n)) => json!({"cmd": "scale", "workers": format!("+{n}")}),
            Request::Scale(Scale::Remove(n)) => json!({"cmd": "scale", "workers": format!("-{n}")}),
            Request::Restart(id) => json!({"cmd": "restart", "id": id}),
            Request::Stop { fast } => json!({"cmd": "stop", "fast": fast}),
            Request::Logs { lines, follow } => json!({"cmd": "logs", "lines": lines, "follow": follow}),
            Request::Watch { interval_ms, logs } => json!({"cmd": "watch", "interval_ms": interval_ms, "logs": logs}),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512)
        ))]

        /// Any bytes: a request or a refusal that says something, never a panic.
        #[test]
        fn any_line_is_a_request_or_a_refusal_with_a_reason(line in proptest::collection::vec(any::<u8>(), 0..512)) {
            match parse(&line) {
                Ok(_) => {}
                Err(Refused::Malformed(why) | Refused::Invalid(why)) => prop_assert!(!why.is_empty()),
            }
        }

        /// JSON objects with a `cmd` and odd fields: never a panic, and an unknown command is
        /// named (escaped, cut to 80 bytes) in a short error. (A 100000-case run found the
        /// first version, which cut before escaping, echoing up to ~700 bytes.)
        #[test]
        fn odd_objects_are_refused_calmly(cmd in ".{0,200}", field in "[a-z]{1,8}", value in any::<i64>()) {
            let line = json!({"cmd": cmd, field: value}).to_string();
            if let Err(Refused::Invalid(why)) = parse(line.as_bytes()) {
                prop_assert!(why.len() < 400, "errors stay short: {why}");
            }
        }

        /// What clusterctl sends parses back to the same request.
        #[test]
        fn encoded_requests_round_trip(r in request()) {
            prop_assert_eq!(parse(encode(&r).to_string().as_bytes()), Ok(r));
        }

        /// Lines cut anywhere by the reader's buffer come out whole, in order; a line over the
        /// limit is an error and is never held beyond it.
        #[test]
        fn lines_survive_any_chunking(
            lines in proptest::collection::vec(proptest::collection::vec(1u8..=255, 0..300), 0..8),
            capacity in 1usize..64,
            max in 1usize..400,
        ) {
            let lines: Vec<Vec<u8>> = lines.into_iter().map(|l| l.into_iter().filter(|b| *b != b'\n').collect()).collect();
            let mut data = Vec::new();
            for l in &lines {
                data.extend_from_slice(l);
                data.push(b'\n');
            }
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut rd = tokio::io::BufReader::with_capacity(capacity, &data[..]);
                for want in &lines {
                    let mut got = Vec::new();
                    match read_line(&mut rd, &mut got, max).await {
                        Ok(true) if want.len() <= max => assert_eq!(&got, want),
                        Err(_) if want.len() > max => {
                            assert!(got.len() <= max);
                            return;
                        }
                        other => panic!("{} bytes, max {max}: {other:?}", want.len()),
                    }
                }
                let mut rest = Vec::new();
                assert!(!read_line(&mut rd, &mut rest, max).await.unwrap());
            });
        }
    }
}
