//! A request as a plugin sees it, with safe access to its data.

use crate::{abi, DeviceKind};
use std::ffi::CStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    Discard,
    GetId,
    WriteZeroes,
    /// A frame the guest sends (in `pre`): [`Request::frame`].
    NetTx,
    /// A frame for the guest (in `post`): [`Request::frame`].
    NetRx,
    /// A kind newer than this SDK.
    Other(u32),
}

/// Why data access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataError {
    /// The range runs past the request's data.
    OutOfRange,
    /// Write data is the guest's, read-only, unless the plugin declares
    /// `F_MODIFIES_DATA` (then it is a private bounce buffer).
    ReadOnly,
}

/// One request, valid during the hook call.
pub struct Request<'a> {
    raw: &'a abi::Request,
}

impl<'a> Request<'a> {
    pub(crate) fn from_raw(raw: &'a abi::Request) -> Request<'a> {
        Request { raw }
    }

    pub(crate) fn raw(&self) -> &abi::Request {
        self.raw
    }

    pub fn kind(&self) -> RequestKind {
        match self.raw.kind {
            abi::REQ_READ => RequestKind::Read,
            abi::REQ_WRITE => RequestKind::Write,
            abi::REQ_FLUSH => RequestKind::Flush,
            abi::REQ_DISCARD => RequestKind::Discard,
            abi::REQ_GET_ID => RequestKind::GetId,
            abi::REQ_WRITE_ZEROES => RequestKind::WriteZeroes,
            abi::REQ_NET_TX => RequestKind::NetTx,
            abi::REQ_NET_RX => RequestKind::NetRx,
            k => RequestKind::Other(k),
        }
    }

    /// Byte offset on the device.
    pub fn offset(&self) -> u64 {
        self.raw.offset
    }

    /// Data bytes.
    pub fn len(&self) -> u64 {
        self.raw.len
    }

    pub fn is_empty(&self) -> bool {
        self.raw.len == 0
    }

    pub fn device_kind(&self) -> Option<DeviceKind> {
        match self.raw.device_kind {
            1 => Some(DeviceKind::Block),
            2 => Some(DeviceKind::Net),
            _ => None,
        }
    }

    /// The device's id from the VMM's config.
    pub fn device_id(&self) -> &str {
        if self.raw.device_id.is_null() {
            return "";
        }
        // SAFETY: the shim passes a NUL-terminated string valid for the call.
        unsafe { CStr::from_ptr(self.raw.device_id) }
            .to_str()
            .unwrap_or("")
    }

    /// The frame of a net request (`NetTx`, `NetRx`); `None` for block requests.
    pub fn frame(&mut self) -> Option<crate::Frame<'_>> {
        // SAFETY: the shim's frame for this call (or NULL).
        unsafe { crate::Frame::from_raw(self.raw.net) }
    }

    /// This instance is disabled (seen only by `F_KEEP_WHEN_DISABLED` plugins).
    pub fn disabled(&self) -> bool {
        self.raw.flags & abi::REQ_F_DISABLED != 0
    }

    /// The data is a private bounce buffer this hook may modify.
    pub fn data_private(&self) -> bool {
        self.raw.flags & abi::REQ_F_DATA_PRIVATE != 0
    }

    fn writable(&self) -> bool {
        self.data_private() || self.raw.kind == abi::REQ_READ
    }

    fn segments(&self) -> &[abi::Segment] {
        if self.raw.segments.is_null() || self.raw.nsegments == 0 {
            return &[];
        }
        // SAFETY: the shim passes nsegments valid segments for the call's duration.
        unsafe { std::slice::from_raw_parts(self.raw.segments, self.raw.nsegments as usize) }
    }

    /// Calls `f(position, pointer, length)` for the parts of the data in `pos..pos + len`.
    fn walk(
        &self,
        pos: u64,
        len: usize,
        mut f: impl FnMut(usize, *mut u8, usize),
    ) -> Result<(), DataError> {
        let end = pos.checked_add(len as u64).ok_or(DataError::OutOfRange)?;
        if end > self.raw.len {
            return Err(DataError::OutOfRange);
        }
        let (mut seg_start, mut done) = (0u64, 0usize);
        for seg in self.segments() {
            let seg_end = seg_start + seg.len as u64;
            let from = pos + done as u64;
            if done < len && from < seg_end {
                let skip = (from - seg_start) as usize;
                let n = (seg.len - skip).min(len - done);
                // SAFETY: within the segment, which is valid for the call.
                f(done, unsafe { seg.base.add(skip) }, n);
                done += n;
            }
            seg_start = seg_end;
        }
        if done == len {
            Ok(())
        } else {
            Err(DataError::OutOfRange)
        }
    }

    /// Copies the data at `pos` into `dst`.
    pub fn read_data(&self, pos: u64, dst: &mut [u8]) -> Result<(), DataError> {
        let out = dst.as_mut_ptr();
        self.walk(pos, dst.len(), |at, p, n| {
            // SAFETY: `p` has n readable bytes; `out + at` has n writable bytes of `dst`.
            unsafe { std::ptr::copy_nonoverlapping(p, out.add(at), n) }
        })
    }

    /// Copies `src` into the data at `pos`: allowed for reads (the data is the request's
    /// destination) and for private data.
    pub fn write_data(&mut self, pos: u64, src: &[u8]) -> Result<(), DataError> {
        if !self.writable() {
            return Err(DataError::ReadOnly);
        }
        let from = src.as_ptr();
        self.walk(pos, src.len(), |at, p, n| {
            // SAFETY: as for read_data, the other way.
            unsafe { std::ptr::copy_nonoverlapping(from.add(at), p, n) }
        })
    }

    /// Runs `f(position, chunk)` over the private data in place (`F_MODIFIES_DATA`
    /// plugins): e.g. encrypt a write before the layers below, decrypt a read after.
    pub fn transform(&mut self, mut f: impl FnMut(u64, &mut [u8])) -> Result<(), DataError> {
        if !self.data_private() {
            return Err(DataError::ReadOnly);
        }
        self.walk(0, self.raw.len as usize, |at, p, n| {
            // SAFETY: private bounce memory, exclusively ours for the call.
            f(at as u64, unsafe { std::slice::from_raw_parts_mut(p, n) })
        })
    }
}
