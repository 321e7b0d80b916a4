//! Fuzz target `event_store`: the harness is `guard::fuzzing::event_store`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guard::fuzzing::event_store(data));
