//! Fuzz target `connect`: the harness is `guard::fuzzing::connect`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guard::fuzzing::connect(data));
