#![no_main]
//! See `fuzz_replay::net_worker` (tests/fuzz-replay/src): the harness, shared with the replay test.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_replay::net_worker(data));
