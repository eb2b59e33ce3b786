//! O_DIRECT: the disk file opened past the host's page cache (`direct = true`). The kernel
//! then wants every buffer's address and every transfer's offset and length aligned; the
//! alignment comes from statx (STATX_DIOALIGN), 4096 where the kernel does not say. The
//! guest is told the offset alignment as the disk's block size, so its requests line up; a
//! buffer that does not (a plugin's own, a bounce buffer, a guest's odd segment) goes through
//! an aligned copy.

use crate::Segment;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::os::fd::AsRawFd;

/// What O_DIRECT transfers on this file must be aligned to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectAlign {
    /// Of each buffer's address.
    pub mem: usize,
    /// Of each transfer's offset and length on the file.
    pub offset: usize,
}

impl DirectAlign {
    /// The alignment the kernel reports for `file` (opened with O_DIRECT).
    pub fn of(file: &File) -> DirectAlign {
        // SAFETY: statx writes into the struct we pass; an empty path with AT_EMPTY_PATH
        // names the descriptor itself.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::statx(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut st,
            )
        };
        let reported = rc == 0 && st.stx_mask & libc::STATX_DIOALIGN != 0;
        let pick = |v: u32| match v {
            v if reported && v.is_power_of_two() && v <= 65536 => v as usize,
            _ => 4096,
        };
        DirectAlign {
            mem: pick(st.stx_dio_mem_align),
            offset: pick(st.stx_dio_offset_align),
        }
    }

    /// Can these segments go to the kernel as they are?
    pub fn fits(&self, offset: u64, segments: &[Segment]) -> bool {
        offset.is_multiple_of(self.offset as u64)
            && segments.iter().all(|s| {
                (s.base as usize).is_multiple_of(self.mem) && s.len.is_multiple_of(self.offset)
            })
    }

    /// Can the transfer be done at all (its offset and length line up)?
    pub fn range_fits(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.offset as u64) && len.is_multiple_of(self.offset as u64)
    }
}

/// A zeroed buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize, align: DirectAlign) -> std::io::Result<AlignedBuf> {
        let oom = || std::io::Error::from_raw_os_error(libc::ENOMEM);
        let layout =
            Layout::from_size_align(len.max(1), align.mem.max(align.offset)).map_err(|_| oom())?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(oom());
        }
        Ok(AlignedBuf { ptr, layout })
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Gathers `segments` (valid for reading) into the buffer.
    ///
    /// # Safety
    /// Every segment must be valid for reading its length, and they must add up to at most
    /// the buffer's length.
    pub unsafe fn gather(&mut self, segments: &[Segment]) {
        let mut at = 0;
        for s in segments {
            std::ptr::copy_nonoverlapping(s.base, self.ptr.add(at), s.len);
            at += s.len;
        }
    }

    /// Scatters the buffer into `segments` (valid for writing).
    ///
    /// # Safety
    /// As for [`gather`](Self::gather), for writing.
    pub unsafe fn scatter(&self, segments: &[Segment]) {
        let mut at = 0;
        for s in segments {
            std::ptr::copy_nonoverlapping(self.ptr.add(at), s.base, s.len);
            at += s.len;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}
