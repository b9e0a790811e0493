//! The record decoder: input format and properties in `fuzz/src/record.rs`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir_fuzz::record::check(data));
