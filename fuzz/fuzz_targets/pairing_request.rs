#![no_main]
//! Coverage-guided fuzzing of letro_server::fuzz::pairing_request (the properties are documented there).

libfuzzer_sys::fuzz_target!(|data: &[u8]| letro_server::fuzz::pairing_request(data));
