//! The codec: every message round-trips, and malformed input is a typed error.
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use bytes::{Bytes, BytesMut};

use super::Reassembly;
use super::encode::{self, accepted};
use super::message::*;

/// Writes a decoded message back with its encoder: every encoder must give what decodes to the
/// same message.
fn encode_to_master(msg: &ToMaster, out: &mut BytesMut) {
    match msg {
        ToMaster::Hello { version, pid } => encode::hello(out, *version, *pid),
        ToMaster::Listen { req, endpoint, index } => encode::listen(out, *req, endpoint, *index),
        ToMaster::Listening { key } => encode::listening(out, *key),
        ToMaster::Unlisten { key } => encode::unlisten(out, *key),
        ToMaster::Accepted { ids, closed } => encode::accepted(out, *closed, ids.iter().copied()),
        ToMaster::Refused { ids } => encode::refused(out, ids),
        ToMaster::Returned { key, conns } => encode::returned(out, *key, conns),
        ToMaster::Busy { ids } => encode::busy(out, ids),
        ToMaster::Exiting { reason } => encode::exiting(out, reason),
        ToMaster::User { to, call, data } => encode::user(out, USER_TO_MASTER, *to, *call, None, data),
        ToMaster::UserStart { to, call, total, data } => {
            encode::user(out, USER_TO_MASTER, *to, *call, Some(*total), data)
        }
        ToMaster::UserMore(data) => encode::user_more(out, USER_TO_MASTER, data),
        ToMaster::Heartbeat => encode::heartbeat(out),
        ToMaster::Ready => encode::ready(out),
        ToMaster::Closed { count } => encode::closed(out, *count),
        ToMaster::StopAsked => encode::stop_asked(out),
    }
}

fn round_trip(msg: ToMaster) {
    let mut out = BytesMut::new();
    encode_to_master(&msg, &mut out);
    assert_eq!(format!("{:?}", ToMaster::decode(out.freeze(), Vec::new())), format!("{:?}", Ok::<_, ()>(msg)));
}

fn fd() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

#[test]
fn to_master_round_trips() {
    round_trip(ToMaster::Hello { version: PROTOCOL_VERSION, pid: 42 });
    round_trip(ToMaster::Listen { req: 7, endpoint: Endpoint::Tcp("127.0.0.1:8080".parse().unwrap()), index: 0 });
    round_trip(ToMaster::Listen { req: 8, endpoint: Endpoint::Udp("[::1]:0".parse().unwrap()), index: 3 });
    let unix = Endpoint::Unix { path: "/tmp/a.sock".into(), mode: Some(0o660) };
    round_trip(ToMaster::Listen { req: 9, endpoint: unix, index: 0 });
    let unix = Endpoint::Unix { path: "rel.sock".into(), mode: None };
    round_trip(ToMaster::Listen { req: 9, endpoint: unix, index: 0 });
    round_trip(ToMaster::Listening { key: 3 });
    round_trip(ToMaster::Unlisten { key: 3 });
    round_trip(ToMaster::Accepted { ids: vec![1, 2, u64::MAX], closed: 3 });
    round_trip(ToMaster::Refused { ids: vec![] });
    round_trip(ToMaster::Busy { ids: vec![5, 6] });
    let mut batch = BytesMut::new();
    accepted(&mut batch, 0, [77, 78].into_iter());
    assert!(
        matches!(ToMaster::decode(batch.freeze(), Vec::new()), Ok(ToMaster::Accepted { ids, closed: 0 }) if ids == [77, 78])
    );
    round_trip(ToMaster::Exiting { reason: "panicked at 'boom'".into() });
    round_trip(ToMaster::User { to: 0, call: 0, data: Bytes::from_static(b"\x02looks like listen") });
    round_trip(ToMaster::User { to: 3, call: 7 | REPLY, data: Bytes::new() });
    round_trip(ToMaster::User { to: AGENT, call: 9, data: Bytes::from_static(b"x") });
    round_trip(ToMaster::UserStart { to: 2, call: 1, total: 100_000, data: Bytes::from_static(b"abc") });
    round_trip(ToMaster::UserMore(Bytes::from_static(b"def")));
    round_trip(ToMaster::Heartbeat);
    round_trip(ToMaster::Ready);
    round_trip(ToMaster::Closed { count: 17 });
    round_trip(ToMaster::StopAsked);
}

#[test]
fn newconn_carries_one_fd_per_connection() {
    let peers: [SocketAddr; 2] = ["10.0.0.1:5000".parse().unwrap(), "[::1]:6000".parse().unwrap()];
    let mut out = BytesMut::new();
    encode::newconn_header(&mut out, 9, 2);
    encode::newconn_entry(&mut out, 100, Some(&peers[0]));
    encode::newconn_entry(&mut out, 101, Some(&peers[1]));
    let bytes = out.freeze();
    match ToWorker::decode(bytes.clone(), vec![fd(), fd()]).unwrap() {
        ToWorker::NewConn { key, conns } => {
            assert_eq!(key, 9);
            assert_eq!(
                conns.iter().map(|c| (c.id, c.peer)).collect::<Vec<_>>(),
                vec![(100, Some(peers[0])), (101, Some(peers[1]))]
            );
        }
        other => panic!("decoded {other:?}"),
    }
    let err = ToWorker::decode(bytes.clone(), vec![fd()]).unwrap_err();
    assert_eq!(err, ProtocolError::FdCount { message: "newconn", got: 1, expected: 2 });
    // What a worker whose fd table is full reads from the cut message: the ids, to refuse.
    assert_eq!(newconn_ids(&bytes), Ok(vec![100, 101]));
    assert!(newconn_ids(&Bytes::from_static(b"\x83")).is_err());
}

#[test]
fn returned_carries_one_fd_per_connection() {
    let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let conns = vec![NewConn { id: 7, peer: Some(peer), fd: fd() }, NewConn { id: 8, peer: None, fd: fd() }];
    let mut out = BytesMut::new();
    encode_to_master(&ToMaster::Returned { key: 3, conns }, &mut out);
    let bytes = out.freeze();
    match ToMaster::decode(bytes.clone(), vec![fd(), fd()]).unwrap() {
        ToMaster::Returned { key: 3, conns } => {
            assert_eq!(conns.iter().map(|c| (c.id, c.peer)).collect::<Vec<_>>(), vec![(7, Some(peer)), (8, None)]);
        }
        other => panic!("decoded {other:?}"),
    }
    let err = ToMaster::decode(bytes, vec![fd()]).unwrap_err();
    assert_eq!(err, ProtocolError::FdCount { message: "returned", got: 1, expected: 2 });
}

#[test]
fn listen_reply_round_trips() {
    let ok: Result<(ListenKey, Option<SocketAddr>), i32> = Ok((4, Some("0.0.0.0:1234".parse().unwrap())));
    for (result, fds) in [(ok, 0), (Ok((5, None)), 0), (Ok((6, Some("[::1]:53".parse().unwrap()))), 1), (Err(98), 0)] {
        let mut out = BytesMut::new();
        encode::listen_reply(&mut out, 5, &result, fds == 1);
        let attached: Vec<OwnedFd> = (0..fds).map(|_| fd()).collect();
        match ToWorker::decode(out.freeze(), attached).unwrap() {
            ToWorker::ListenReply { req: 5, result: got } => {
                let got = got.map(|b| (b.key, b.addr, b.fd.is_some()));
                assert_eq!(got, result.map(|(k, a)| (k, a, fds == 1)));
            }
            other => panic!("decoded {other:?}"),
        }
    }
    // A reply that announces a socket must carry it.
    let mut out = BytesMut::new();
    encode::listen_reply(&mut out, 1, &Ok((1, None)), true);
    let err = ToWorker::decode(out.freeze(), Vec::new()).unwrap_err();
    assert_eq!(err, ProtocolError::FdCount { message: "listen reply", got: 0, expected: 1 });
}

#[test]
fn fragments_reassemble_and_bad_sequences_are_errors() {
    let mut r = Reassembly::default();
    assert_eq!(r.start(2, 5, 6, Bytes::from_static(b"abc")), Ok(None));
    assert_eq!(r.more(Bytes::from_static(b"def")), Ok(Some((2, 5, Bytes::from_static(b"abcdef")))));
    assert!(r.more(Bytes::from_static(b"x")).is_err(), "continuation without a start");
    assert_eq!(r.start(1, 0, 2, Bytes::from_static(b"a")), Ok(None));
    // An abandoned message (cancelled sender) is dropped whole, never glued to the next.
    assert_eq!(r.start(3, 0, 2, Bytes::from_static(b"x")), Ok(None));
    assert_eq!(r.more(Bytes::from_static(b"y")), Ok(Some((3, 0, Bytes::from_static(b"xy")))));
    let mut r = Reassembly::default();
    assert_eq!(r.start(1, 0, 2, Bytes::from_static(b"a")), Ok(None));
    assert!(r.more(Bytes::from_static(b"bc")).is_err(), "overlong");
    assert!(Reassembly::default().start(1, 0, u32::MAX, Bytes::new()).is_err(), "over the limit");
}

#[test]
fn malformed_input_is_a_typed_error() {
    let dec = |b: &'static [u8]| ToMaster::decode(Bytes::from_static(b), Vec::new()).unwrap_err();
    assert_eq!(dec(b""), ProtocolError::Empty);
    assert_eq!(dec(b"\x7f"), ProtocolError::UnknownTag(0x7f));
    // A master-to-worker tag sent towards the master is unknown there.
    assert_eq!(dec(b"\x83"), ProtocolError::UnknownTag(0x83));
    assert_eq!(dec(b"\x01\x00"), ProtocolError::Short { message: "hello", needed: 1 });
    assert_eq!(dec(b"\x03\x00\x00\x00\x01\xff"), ProtocolError::Trailing { message: "listening", extra: 1 });
    assert_eq!(dec(b"\x02\x00\x00\x00\x01\x05"), ProtocolError::EndpointKind(5));
    assert_eq!(dec(b"\x02\x00\x00\x00\x01\x01\x05"), ProtocolError::AddressFamily(5));
    assert_eq!(
        dec(b"\x05\0\0\0\0\xff\xff"),
        ProtocolError::TooMany { message: "accepted", count: 0xffff, max: MAX_FDS }
    );
    let err = ToMaster::decode(Bytes::from_static(b"\x03\x00\x00\x00\x01"), vec![fd()]).unwrap_err();
    assert_eq!(err, ProtocolError::FdCount { message: "listening", got: 1, expected: 0 });
    let err = ToWorker::decode(Bytes::from_static(b"\x83"), vec![fd()]).unwrap_err();
    assert_eq!(err, ProtocolError::FdCount { message: "disconnect", got: 1, expected: 0 });
}

#[test]
fn long_exit_reason_is_cut_to_fit() {
    let mut out = BytesMut::new();
    // One byte first: the 65,520-byte cut falls inside an "é", and moves back to its start.
    let long = format!("a{}", "é".repeat(MAX_MESSAGE));
    encode::exiting(&mut out, &long);
    assert!(out.len() <= MAX_MESSAGE);
    let Ok(ToMaster::Exiting { reason }) = ToMaster::decode(out.freeze(), Vec::new()) else { panic!("not exiting") };
    assert_eq!(reason.len(), MAX_MESSAGE - 17, "cut at the last character boundary that fits");
    assert!(long.starts_with(&reason), "the start of the reason, whole characters only");
}

#[test]
fn relayed_round_trips_both_ways() {
    for delivered in [true, false] {
        let mut out = BytesMut::new();
        encode::relayed(&mut out, delivered);
        let got = ToWorker::decode(out.freeze(), Vec::new()).unwrap();
        assert!(matches!(got, ToWorker::Relayed { delivered: d } if d == delivered), "{got:?}");
    }
}

#[test]
fn endpoints_say_what_they_are() {
    let tcp = |a: &str| Endpoint::Tcp(a.parse().unwrap());
    let udp = |a: &str| Endpoint::Udp(a.parse().unwrap());
    let unix = Endpoint::Unix { path: "/run/app.sock".into(), mode: None };
    assert!(tcp("127.0.0.1:0").is_port_zero() && udp("[::1]:0").is_port_zero());
    assert!(!tcp("127.0.0.1:8080").is_port_zero() && !udp("[::1]:53").is_port_zero() && !unix.is_port_zero());
    assert_eq!(tcp("127.0.0.1:8080").to_string(), "tcp 127.0.0.1:8080");
    assert_eq!(udp("[::1]:53").to_string(), "udp [::1]:53");
    assert_eq!(unix.to_string(), "unix /run/app.sock");
}

/// The wire addresses are part of the protocol: workers of the old build and of the new one
/// talk to one master during an upgrade and must agree on them, so they are pinned here.
#[test]
fn the_wire_addresses_are_fixed() {
    assert_eq!((AGENT, ALL_WORKERS, REPLY), (0xffff_ffff, 0xffff_fffe, 0x8000_0000));
}

#[test]
fn a_user_message_may_be_16_mib_and_no_more() {
    assert!(Reassembly::default().start(1, 2, (16 << 20) as u32, Bytes::new()).unwrap().is_none());
    let err = Reassembly::default().start(1, 2, (16 << 20) as u32 + 1, Bytes::new()).unwrap_err();
    assert!(matches!(err, ProtocolError::Fragment(m) if m.contains("larger than the limit")), "{err:?}");
}
