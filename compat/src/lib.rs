//! The compatibility shim between device models and block backends.
//!
//! A device hands each validated request to its [`BlockStack`]: the device's chain of
//! interceptor instances over its [`BlockBackend`]. The stack runs the pre-processing hooks
//! top to bottom, the backend, then the post-processing hooks bottom to top
//! (`stack.rs`). Interceptors are plugins loaded by path (`loader.rs`) into instances
//! (`instance.rs`) that each get a handle to the layers below them (`lower.rs`).
//! With no enabled interceptor a request goes straight to the backend and nothing is copied.

mod bounce;
mod exec;
mod hook_pool;
mod instance;
mod io_thread;
mod latency;
mod live;
mod loader;
mod lower;
mod net;
mod stack;

pub use block::{BlockBackend, BlockRequestKind, IoRequest, RequestStatus};
pub use event_manager;
pub use exec::{Entered, EnteredArc, Exec, Owner, SubmitError, MAX_LOWER_IN_FLIGHT, MAX_TIMERS};
pub use hook_pool::{HookJob, HookPool, MAX_HOOK_THREADS, MAX_HOOK_THREADS_SET};
pub use instance::{CheckOutcome, Instance, InstanceCounters, InstanceSpec};
pub use interceptor_abi as abi;
pub use interceptor_abi::{DeviceKind, Segment, ABI_VERSION, SECTOR_SIZE};
pub use io_thread::{IoSubscriber, IoThread, IoThreadGone, ThreadStart};
pub use latency::LatencyHistogram;
pub use live::{ChainError, LiveStack};
pub use loader::{LoadError, Plugin, PluginRegistry};
pub use net::{Direction, FrameBuf, NetChain, Verdict, MAX_ANSWERS, MAX_FRAME, MAX_HEADROOM};
pub use stack::{BlockStack, BuildError, InFlight, Parked, StackCounters, Started, MAX_CHAIN};

/// An instance config's string values under keys that end in this are files its plugin
/// reads (`key_file`): the vmm takes them relative to its config's folder and lets the
/// device's thread read them under Landlock, and the API lets a run-time load name only
/// files the config allows (docs/security.md, "Landlock").
pub const FILE_KEY_SUFFIX: &str = "_file";

#[cfg(test)]
mod tests;
