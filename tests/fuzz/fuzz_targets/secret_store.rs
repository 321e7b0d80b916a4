//! Fuzz target `secret_store`: the harness is `guard::fuzzing::secret_store`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guard::fuzzing::secret_store(data));
