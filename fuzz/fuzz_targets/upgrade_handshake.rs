#![no_main]
//! `cluster::__private::fuzz::upgrade_handshake` (cluster-core/src/master/fuzz.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cluster::__private::fuzz::upgrade_handshake(data);
});
