//! The frame decoder: input format and properties in `fuzz/src/frame.rs`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir_fuzz::frame::check(data));
