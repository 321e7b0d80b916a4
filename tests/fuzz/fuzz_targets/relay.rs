//! Fuzz target `relay`: the harness is `guard::fuzzing::relay`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guard::fuzzing::relay(data));
