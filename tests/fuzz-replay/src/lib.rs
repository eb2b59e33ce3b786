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

/// Known bugs in code outside the fuzz crates that would stop a harness dead (a hang) are
/// stepped around while this is on, so fuzzing goes on finding other things; each guard
/// names its bug (fuzz/artifacts-found/ holds an input for it). Off (`FUZZ_NO_GUARDS` set,
/// or [`set_guards`]) to check a fix: the replay test's `found_crashes` turns them off.
static GUARDS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

pub fn set_guards(on: bool) {
    GUARDS.store(on, std::sync::atomic::Ordering::SeqCst);
}

fn guarded() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *ENV.get_or_init(|| std::env::var_os("FUZZ_NO_GUARDS").is_some());
    !off && GUARDS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Known bug 1 (devices/src/virtio/block/worker.rs, `process_queue`): a used ring laid over
/// the avail ring's index makes the handler spin forever on the disk's I/O thread. Its
/// notification writes (used flags, avail_event) and completions (used idx and elements)
/// rewrite the avail index, `enable_notification` then reports more available than the
/// avail iterator yields, and the loop never ends; the vCPU that resets the device, API
/// edits and the flush at shutdown then wait for that thread forever. Guard: the harnesses
/// do not kick a queue whose avail index lies under its used ring.
fn used_ring_over_avail_idx(avail: u64, used: u64, size: u16) -> bool {
    let idx = avail.wrapping_add(2);
    let used_end = used.saturating_add(6 + 8 * u64::from(size));
    idx.saturating_add(2) > used && idx < used_end
}

mod api;
mod blk;
mod config;
mod disk;
mod encrypt;
mod guest;
mod input;
mod mmio;
mod plugin;

pub use api::api;
pub use blk::{blk_queue, blk_request};
pub use config::config;
pub use encrypt::encrypt_open;
pub use mmio::mmio;
pub use plugin::plugin_boundary;

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
];
