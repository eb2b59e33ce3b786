#![no_main]
//! See `fuzz_replay::config` (tests/fuzz-replay/src): the harness, shared with the replay test.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_replay::config(data));
