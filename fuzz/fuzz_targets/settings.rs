#![no_main]
//! `cluster::__private::fuzz::settings` (cluster-core/src/master/fuzz.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cluster::__private::fuzz::settings(data);
});
