//! Fuzz target `client_hello`: the harness is `guard::fuzzing::client_hello`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guard::fuzzing::client_hello(data));
