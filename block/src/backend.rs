//! The synchronous backend: what the shim's own walks (a plugin's I/O through the layers
//! below, a flush) run on under the last interceptor.

use crate::{BlockRequestKind, RequestStatus, Segment};

/// A request in the backend's form: host buffers (guest memory, a bounce buffer or a
/// plugin's own buffer).
#[derive(Clone, Copy, Debug)]
pub struct IoRequest<'a> {
    pub kind: BlockRequestKind,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Sum of the segments' lengths.
    pub len: u64,
    pub segments: &'a [Segment],
}

/// A block backend (raw file, io_uring, ...). Shared by the device thread and plugins'
/// own I/O, hence `&self` and `Sync`.
pub trait BlockBackend: Send + Sync {
    /// Bytes on the disk.
    fn capacity(&self) -> u64;

    /// Runs `req`; for a read or get-id the result is in the segments.
    ///
    /// # Safety
    /// Every segment must be valid for `len` bytes of reading (writes) or writing (reads,
    /// get-id) for the duration of the call, and `req.offset + req.len` must be within
    /// [`capacity`](Self::capacity).
    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus;
}
