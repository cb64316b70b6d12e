#![no_main]
//! `cluster::__private::fuzz::to_worker` (cluster-core/src/master/fuzz.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cluster::__private::fuzz::to_worker(data);
});
