//! The compatibility shim between device models and backend drivers.
//!
//! A device hands each driver-ready request to its [`BlockStack`]: the device's chain of
//! interceptor instances over its [`BlockDriver`]. The stack runs the pre-processing hooks
//! top to bottom, the driver, then the post-processing hooks bottom to top
//! (`stack.rs`). Interceptors are plugins loaded by path (`loader.rs`) into instances
//! (`instance.rs`) that each get a handle to the layers below them (`lower.rs`).
//! With no enabled interceptor a request goes straight to the driver and nothing is copied.

mod driver;
mod instance;
mod io_thread;
mod latency;
mod live;
mod loader;
mod lower;
mod stack;

pub use driver::{BlockDriver, IoRequest};
pub use event_manager;
pub use instance::{Instance, InstanceCounters, InstanceSpec};
pub use interceptor_abi::{DeviceKind, Segment, ABI_VERSION, SECTOR_SIZE};
pub use io_thread::{IoSubscriber, IoThread, IoThreadGone, ThreadStart};
pub use latency::LatencyHistogram;
pub use live::{ChainError, LiveStack};
pub use loader::{LoadError, Plugin, PluginRegistry};
pub use stack::{BlockStack, BuildError, StackCounters, MAX_CHAIN};

/// What a block request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockRequestKind {
    Read,
    Write,
    Flush,
    GetId,
}

impl BlockRequestKind {
    /// The ABI's `VMM_REQ_*` value.
    pub fn to_abi(self) -> u32 {
        use interceptor_abi as abi;
        match self {
            BlockRequestKind::Read => abi::REQ_READ,
            BlockRequestKind::Write => abi::REQ_WRITE,
            BlockRequestKind::Flush => abi::REQ_FLUSH,
            BlockRequestKind::GetId => abi::REQ_GET_ID,
        }
    }

    /// Does the request fill its buffers (so a bounce buffer is copied back)?
    pub fn fills_buffers(self) -> bool {
        matches!(self, BlockRequestKind::Read | BlockRequestKind::GetId)
    }
}

/// Final status of a request, as the guest will see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestStatus {
    Ok,
    IoError,
    Unsupported,
}

impl RequestStatus {
    pub fn to_abi(self) -> u32 {
        match self {
            RequestStatus::Ok => interceptor_abi::STATUS_OK,
            RequestStatus::IoError => interceptor_abi::STATUS_IOERR,
            RequestStatus::Unsupported => interceptor_abi::STATUS_UNSUPP,
        }
    }

    /// From a value a plugin returned: anything unknown is an I/O error.
    pub fn from_abi(v: u32) -> Option<RequestStatus> {
        match v {
            interceptor_abi::STATUS_OK => Some(RequestStatus::Ok),
            interceptor_abi::STATUS_IOERR => Some(RequestStatus::IoError),
            interceptor_abi::STATUS_UNSUPP => Some(RequestStatus::Unsupported),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
