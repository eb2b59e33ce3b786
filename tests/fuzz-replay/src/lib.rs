//! The fuzz targets' harnesses. Each `pub fn` takes the fuzz input and drives real code
//! through its public API; a panic (or, under the fuzzer, a sanitizer report) is a finding.
//! `fuzz/fuzz_targets/<name>.rs` are one-line cargo-fuzz wrappers over these functions, and
//! `tests/replay.rs` runs every file of `fuzz/corpus/<name>/` through them as an ordinary
//! test on stable Rust, so a regression on a committed input fails the suite.
//!
//! Every harness is bounded (a fixed number of operations, of requests, of bytes), so no
//! input can make one hang or take much memory. State that outlives one input (I/O threads,
//! the API server, the key files) is made once per process and put back as it was after
//! each input, so an input's outcome does not depend on the ones before it.

/// With `FUZZ_TRACE` set, a harness says what it does on stderr (to see what an input
/// that fails does: `FUZZ_TRACE=1 fuzz/target/.../TARGET INPUT`).
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::tracing_on() {
            eprintln!($($arg)*);
        }
    };
}

fn tracing_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

mod api;
mod blk;
mod config;
mod disk;
mod encrypt;
mod guest;
mod input;
mod mmio;
mod net;
mod net_worker;
mod plugin;
mod store;

pub use api::api;
pub use blk::{blk_queue, blk_request};
pub use config::config;
pub use encrypt::encrypt_open;
pub use mmio::mmio;
pub use net::net_tx;
pub use net_worker::net_worker;
pub use plugin::plugin_boundary;
pub use store::store_open;

/// A harness: one fuzz input in, a panic out if something broke.
pub type Harness = fn(&[u8]);

/// Every target by name, for the replay test and for tools.
pub const TARGETS: &[(&str, Harness)] = &[
    ("blk_request", blk_request),
    ("blk_queue", blk_queue),
    ("mmio", mmio),
    ("config", config),
    ("api", api),
    ("plugin_boundary", plugin_boundary),
    ("encrypt_open", encrypt_open),
    ("store_open", store_open),
    ("net_tx", net_tx),
    ("net_worker", net_worker),
];
