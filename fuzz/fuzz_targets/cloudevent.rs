#![no_main]
//! Coverage-guided fuzzing of letro_server::fuzz::cloudevent (the properties are documented there).

libfuzzer_sys::fuzz_target!(|data: &[u8]| letro_server::fuzz::cloudevent(data));
