//! Fuzz target `config`: the harness is `guard::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guard::fuzzing::config(data));
