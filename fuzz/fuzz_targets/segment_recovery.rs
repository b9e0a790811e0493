//! Recovery of a channel's log from arbitrary segment files: input format and properties in `fuzz/src/segment_recovery.rs`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir_fuzz::segment_recovery::check(data));
