//! Fuzz target `dlp`: the harness is `guard::fuzzing::dlp`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guard::fuzzing::dlp(data));
