//! Property tests of the wire decoders (fuzzing on stable Rust): arbitrary bytes and
//! descriptor counts never make a decoder panic, and what the encoders write decodes to what
//! was encoded. `PROPTEST_CASES` runs more cases than the default.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::Reassembly;
use super::encode;
use super::message::*;

fn fds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|_| std::fs::File::open("/dev/null").expect("/dev/null").into()).collect()
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
    ]
}

proptest! {
    #[test]
    fn arbitrary_datagrams_never_panic_a_decoder(data in proptest::collection::vec(any::<u8>(), 0..600), n in 0usize..4) {
        let data = Bytes::from(data);
        let _ = ToMaster::decode(data.clone(), fds(n));
        let _ = ToWorker::decode(data.clone(), fds(n));
        let _ = newconn_ids(&data);
    }

    #[test]
    fn a_valid_tag_with_garbage_after_it_is_a_named_error_or_a_message(tag in any::<u8>(), rest in proptest::collection::vec(any::<u8>(), 0..80)) {
        let mut data = vec![tag];
        data.extend(rest);
        if let Err(e) = ToMaster::decode(Bytes::from(data), Vec::new()) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn acknowledgements_round_trip(ids in proptest::collection::vec(any::<u64>(), 0..=MAX_FDS), closed in any::<u32>()) {
        let mut out = BytesMut::new();
        encode::accepted(&mut out, closed, ids.iter().copied());
        match ToMaster::decode(out.freeze(), Vec::new()) {
            Ok(ToMaster::Accepted { ids: got, closed: c }) => prop_assert_eq!((got, c), (ids, closed)),
            other => prop_assert!(false, "decoded {:?}", other),
        }
    }

    #[test]
    fn listen_requests_round_trip(req in any::<u32>(), addr in addr(), udp in any::<bool>(), index in any::<u32>()) {
        let endpoint = if udp { Endpoint::Udp(addr) } else { Endpoint::Tcp(addr) };
        let mut out = BytesMut::new();
        encode::listen(&mut out, req, &endpoint, index);
        match ToMaster::decode(out.freeze(), Vec::new()) {
            Ok(ToMaster::Listen { req: r, endpoint: e, index: i }) => prop_assert_eq!((r, e, i), (req, endpoint, index)),
            other => prop_assert!(false, "decoded {:?}", other),
        }
    }

    #[test]
    fn newconns_round_trip_with_one_fd_each(key in any::<u32>(), conns in proptest::collection::vec((any::<u64>(), proptest::option::of(addr())), 0..8)) {
        let mut out = BytesMut::new();
        encode::newconn_header(&mut out, key, conns.len());
        for (id, peer) in &conns {
            encode::newconn_entry(&mut out, *id, peer.as_ref());
        }
        let bytes = out.freeze();
        match ToWorker::decode(bytes.clone(), fds(conns.len())) {
            Ok(ToWorker::NewConn { key: k, conns: got }) => {
                prop_assert_eq!(k, key);
                prop_assert_eq!(got.iter().map(|c| (c.id, c.peer)).collect::<Vec<_>>(), conns.clone());
            }
            other => prop_assert!(false, "decoded {:?}", other),
        }
        prop_assert_eq!(newconn_ids(&bytes).expect("ids"), conns.iter().map(|c| c.0).collect::<Vec<_>>());
        // One descriptor too many or too few is an error, never a guess.
        prop_assert!(ToWorker::decode(bytes.clone(), fds(conns.len() + 1)).is_err());
    }

    #[test]
    fn fragments_in_any_order_never_exceed_or_glue(ops in proptest::collection::vec((any::<bool>(), 0u32..64, 0usize..48), 0..40)) {
        let mut r = Reassembly::default();
        let mut announced = None;
        for (start, total, len) in ops {
            let data = Bytes::from(vec![7u8; len]);
            let got = if start {
                announced = Some(total as usize);
                r.start(1, 0, total, data)
            } else {
                r.more(data)
            };
            match got {
                // A message is delivered whole: exactly the size its start announced.
                Ok(Some((_, _, whole))) => {
                    prop_assert_eq!(Some(whole.len()), announced);
                    announced = None;
                }
                Ok(None) => {}
                Err(_) => announced = None,
            }
        }
    }

    #[test]
    fn user_messages_round_trip(to in any::<u32>(), call in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut out = BytesMut::new();
        encode::user(&mut out, USER_TO_MASTER, to, call, None, &data);
        match ToMaster::decode(out.freeze(), Vec::new()) {
            Ok(ToMaster::User { to: t, call: c, data: d }) => prop_assert_eq!((t, c, &d[..]), (to, call, &data[..])),
            other => prop_assert!(false, "decoded {:?}", other),
        }
    }
}
