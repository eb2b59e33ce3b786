//! Block backends: what sits under the last interceptor of a disk.
//!
//! Two faces of the same disk file:
//! - [`BlockBackend`] (`backend.rs`): synchronous, `&self`, shared. The shim's own walks use
//!   it: a plugin's I/O through the layers below, the flush at shutdown.
//! - [`AsyncIo`] (`engine/`): one per device queue, on that queue's I/O thread. The queue
//!   submits guest requests with a token and collects completions, in any order, when the
//!   engine's eventfd fires. [`SyncEngine`] runs each request at submission on a
//!   [`BlockBackend`]; [`UringEngine`] hands them to the kernel through io_uring.
//!
//! [`RawFile`] (`raw.rs`) is the disk file itself (or a host block device).

mod backend;
pub mod direct;
pub mod engine;
mod raw;

pub use backend::{BlockBackend, IoRequest};
pub use direct::DirectAlign;
pub use engine::{AsyncIo, EngineChoice, SyncEngine};
pub use interceptor_abi::{Segment, SECTOR_SIZE};
pub use raw::RawFile;

/// What a block request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockRequestKind {
    Read,
    Write,
    Flush,
    GetId,
    /// The guest no longer needs the range (no segments; the range is the request's offset
    /// and length). Later reads of it may return anything the disk held or zeros.
    Discard,
    /// The range reads back as zeros (no segments).
    WriteZeroes,
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
            BlockRequestKind::Discard => abi::REQ_DISCARD,
            BlockRequestKind::WriteZeroes => abi::REQ_WRITE_ZEROES,
        }
    }

    /// Does the request carry data buffers (rather than a bare range, or nothing)?
    pub fn has_data(self) -> bool {
        matches!(
            self,
            BlockRequestKind::Read | BlockRequestKind::Write | BlockRequestKind::GetId
        )
    }

    /// Does the request change what the disk holds?
    pub fn writes(self) -> bool {
        matches!(
            self,
            BlockRequestKind::Write | BlockRequestKind::Discard | BlockRequestKind::WriteZeroes
        )
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
