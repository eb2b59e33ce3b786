//! A network frame as a net plugin sees it (`RequestKind::NetTx` in `pre`,
//! `RequestKind::NetRx` in `post`).

use crate::abi;

pub use abi::NetHeader;

/// Why a frame could not be changed or answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A length below an Ethernet header or past the buffer.
    BadLength,
    /// The frame could not be answered (no answer path, or the other side is full).
    NotSent,
}

/// One Ethernet frame (from its destination MAC; no virtio header) in a private buffer,
/// valid during the hook call. Changes are what the layers after this one, and in the end
/// the tap or the guest, receive.
///
/// ```
/// # use interceptor_sdk::Frame;
/// fn ethertype(frame: &Frame<'_>) -> Option<u16> {
///     let b = frame.bytes();
///     b.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]))
/// }
/// ```
pub struct Frame<'a> {
    raw: &'a mut abi::NetFrame,
}

impl<'a> Frame<'a> {
    /// # Safety
    /// `raw` must be the shim's frame for the current call.
    pub(crate) unsafe fn from_raw(raw: *mut abi::NetFrame) -> Option<Frame<'a>> {
        let raw = raw.as_mut()?;
        if raw.data.is_null() || raw.len > raw.capacity {
            return None;
        }
        Some(Frame { raw })
    }

    /// The frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the shim's buffer holds `capacity` >= `len` bytes, ours for the call.
        unsafe { std::slice::from_raw_parts(self.raw.data, self.raw.len as usize) }
    }

    /// The frame's bytes, to change in place.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for bytes; private to this call.
        unsafe { std::slice::from_raw_parts_mut(self.raw.data, self.raw.len as usize) }
    }

    /// The whole buffer (`capacity` bytes), for a hook that grows the frame: write, then
    /// [`set_len`](Self::set_len).
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        // SAFETY: the buffer holds `capacity` bytes, private to this call.
        unsafe { std::slice::from_raw_parts_mut(self.raw.data, self.raw.capacity as usize) }
    }

    /// The most bytes the frame may grow to.
    pub fn capacity(&self) -> usize {
        self.raw.capacity as usize
    }

    /// Sets the frame's length: at least an Ethernet header (14), at most `capacity`.
    pub fn set_len(&mut self, len: usize) -> Result<(), FrameError> {
        match u32::try_from(len) {
            Ok(n) if (abi::NET_FRAME_MIN..=self.raw.capacity).contains(&n) => {
                self.raw.len = n;
                Ok(())
            }
            _ => Err(FrameError::BadLength),
        }
    }

    /// The offload header (all zero for `F_NET_PLAIN_FRAMES` plugins).
    pub fn header(&self) -> NetHeader {
        self.raw.header
    }

    /// Replaces the offload header.
    pub fn set_header(&mut self, header: NetHeader) {
        self.raw.header = header;
    }

    /// Answers the frame: sends `frame` (from its Ethernet header) back the way this one
    /// came, to the guest for a transmitted frame (e.g. an ARP reply), to the tap for a
    /// received one, past the other instances.
    pub fn answer(&self, frame: &[u8]) -> Result<(), FrameError> {
        let Some(inject) = self.raw.inject else {
            return Err(FrameError::NotSent);
        };
        let len = u32::try_from(frame.len()).map_err(|_| FrameError::BadLength)?;
        // SAFETY: the shim's callback with its own context; `frame` is valid for `len`.
        match unsafe { inject(self.raw.inject_ctx, frame.as_ptr(), len) } {
            abi::STATUS_OK => Ok(()),
            _ => Err(FrameError::NotSent),
        }
    }
}
