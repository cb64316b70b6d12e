#![no_main]
//! `cluster::__private::fuzz::control_line` (cluster-core/src/master/fuzz.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cluster::__private::fuzz::control_line(data);
});
