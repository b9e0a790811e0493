//! The broker.toml parser: input format and properties in `fuzz/src/config.rs`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir_fuzz::config::check(data));
