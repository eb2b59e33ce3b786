//! Parsing and validating a virtio-blk request from a guest's descriptor chain.
//!
//! A guest controls every byte here. Every address and length is checked against guest
//! memory and the disk's capacity before anything is read or written; a chain that breaks a
//! rule becomes an error, never a panic and never an access outside guest memory. All
//! arithmetic on guest values is checked: the byte offset and the data length a
//! [`BlockRequest`] carries are computed here, so a caller never multiplies or adds a guest
//! value itself.

use compat::{BlockRequestKind, RequestStatus};
use std::ops::Deref;
use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::ByteValued;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub use compat::SECTOR_SIZE;
/// Bytes of the serial number a GET_ID request returns.
pub const ID_BYTES: u32 = 20;
/// Longest chain accepted (descriptors); the queue size bounds it too.
pub const MAX_DESCRIPTORS: usize = 258;
/// Largest data transfer in one request. It fits a `u32` (the used ring's length field),
/// with room for the status byte.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;

const _: () = assert!(MAX_REQUEST_BYTES < u32::MAX as u64 && (ID_BYTES as u64) < MAX_REQUEST_BYTES);

/// Most sectors one discard covers (announced as max_discard_sectors), and one
/// write-zeroes (max_write_zeroes_sectors): a write-zeroes may have to write its zeros where
/// the file system cannot punch holes, on the disk's I/O thread.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 16;

/// One range of a discard or write-zeroes request, as the guest lays it out.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct Range(virtio_blk_discard_write_zeroes);

// SAFETY: plain integers: any bytes are a valid value.
unsafe impl ByteValued for Range {}

/// Bytes of the request header (type, reserved, sector).
const HEADER_BYTES: u32 = 16;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain is empty")]
    EmptyChain,
    #[error("descriptor chain is longer than {MAX_DESCRIPTORS}")]
    ChainTooLong,
    #[error("request header is write-only or shorter than 16 bytes")]
    BadHeader,
    #[error("status descriptor is missing, read-only or empty")]
    BadStatus,
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfGuestMemory { addr: u64, len: u32 },
    #[error("data descriptor has the wrong direction for this request")]
    WrongDirection,
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// The data descriptors add up to more than [`MAX_REQUEST_BYTES`] (the value saturates
    /// at `u64::MAX`; it never wraps).
    #[error("request of {0} bytes is too large")]
    TooLarge(u64),
    #[error("sectors {sector}+{len} run past the end of the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("GET_ID buffer is shorter than {ID_BYTES} bytes")]
    ShortIdBuffer,
    /// Discard and write-zeroes carry exactly one 16-byte range (max_*_seg is 1).
    #[error("a discard or write-zeroes request carries {0} bytes, not one 16-byte range")]
    BadRange(u64),
    #[error("a discard or write-zeroes range of {0} sectors is empty or too long")]
    RangeLength(u32),
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRequest {
    pub kind: BlockRequestKind,
    /// The first sector of a read or write, below the disk's capacity. 0 for FLUSH and
    /// GET_ID, whose sector field is reserved: the guest's value is ignored.
    pub sector: u64,
    /// `sector * SECTOR_SIZE`, computed with checked arithmetic: the byte offset to hand to
    /// the stack. For a read or write, `offset + data_len` is at most the disk's size in
    /// bytes; 0 for FLUSH and GET_ID.
    pub offset: u64,
    /// Guest buffers, in order; each lies inside guest memory.
    pub segments: Vec<(GuestAddress, u32)>,
    /// The sum of the segments' lengths, at most [`MAX_REQUEST_BYTES`].
    pub data_len: u64,
    /// The bytes the request covers on the disk from `offset`: `data_len` for a read or
    /// write, the range for a discard or write-zeroes (whose data is the range's
    /// description), 0 for the others.
    pub io_len: u64,
    pub status_addr: GuestAddress,
}

/// A refused request, with where to put the error status when the chain has a usable
/// status byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub error: RequestError,
    pub status_addr: Option<GuestAddress>,
}

fn in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> Result<(), RequestError> {
    let fits = usize::try_from(len).is_ok_and(|n| mem.check_range(addr, n));
    if fits {
        Ok(())
    } else {
        Err(RequestError::OutOfGuestMemory { addr: addr.0, len })
    }
}

/// `total + len` if that is at most [`MAX_REQUEST_BYTES`]; otherwise the error, carrying the
/// sum saturated at `u64::MAX`.
fn add_data_len(total: u64, len: u32) -> Result<u64, RequestError> {
    match total.checked_add(u64::from(len)) {
        Some(sum) if sum <= MAX_REQUEST_BYTES => Ok(sum),
        Some(sum) => Err(RequestError::TooLarge(sum)),
        None => Err(RequestError::TooLarge(u64::MAX)),
    }
}

/// The byte range `[offset, offset + len)` of `len / SECTOR_SIZE` sectors from `sector`, if
/// it starts on the disk and ends at or before its end; every step checked.
fn disk_offset(sector: u64, len: u64, capacity_sectors: u64) -> Result<u64, RequestError> {
    let sectors = len / SECTOR_SIZE;
    let out_of_range = RequestError::OutOfRange {
        sector,
        len: sectors,
    };
    if sector >= capacity_sectors {
        return Err(out_of_range);
    }
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity_sectors => {}
        _ => return Err(out_of_range),
    }
    sector.checked_mul(SECTOR_SIZE).ok_or(out_of_range)
}

/// The one range of a discard or write-zeroes request, gathered from its buffers (already
/// checked to lie in guest memory).
fn read_range(
    mem: &GuestMemoryMmap,
    segments: &[(GuestAddress, u32)],
    data_len: u64,
) -> Result<Range, RequestError> {
    let mut range = Range::default();
    let bytes = range.as_mut_slice();
    if data_len != bytes.len() as u64 {
        return Err(RequestError::BadRange(data_len));
    }
    let mut at = 0usize;
    for &(addr, len) in segments {
        let end = at.saturating_add(len as usize).min(bytes.len());
        mem.read_slice(&mut bytes[at..end], addr)
            .map_err(|_| RequestError::BadRange(data_len))?;
        at = end;
    }
    Ok(range)
}

impl BlockRequest {
    /// Parses `chain` for a disk of `capacity_sectors`.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        capacity_sectors: u64,
    ) -> Result<BlockRequest, Refused>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        // virtio-queue's iterator already stops at loops and at the queue size; bound it too.
        let descs: Vec<_> = chain.take(MAX_DESCRIPTORS.saturating_add(1)).collect();
        let Some((last, rest)) = descs.split_last() else {
            return Err(Refused {
                error: RequestError::EmptyChain,
                status_addr: None,
            });
        };
        // The iterator stops at the queue size: a last descriptor that still points onward
        // means the chain loops or is longer than the queue. Nothing in it can be trusted.
        if descs.len() > MAX_DESCRIPTORS || last.has_next() {
            return Err(Refused {
                error: RequestError::ChainTooLong,
                status_addr: None,
            });
        }
        // The status byte is the last descriptor: find out first whether we can answer.
        let status_addr = if !rest.is_empty()
            && last.is_write_only()
            && last.len() >= 1
            && mem.check_range(last.addr(), 1)
        {
            Some(last.addr())
        } else {
            None
        };
        let refuse = |error| Refused { error, status_addr };
        let (Some(status), Some((head, data))) = (status_addr, rest.split_first()) else {
            return Err(refuse(RequestError::BadStatus));
        };

        if head.is_write_only() || head.len() < HEADER_BYTES {
            return Err(refuse(RequestError::BadHeader));
        }
        in_memory(mem, head.addr(), HEADER_BYTES).map_err(refuse)?;
        let mut header = [0u8; HEADER_BYTES as usize];
        mem.read_slice(&mut header, head.addr())
            .map_err(|_| refuse(RequestError::BadHeader))?;
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let req_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let guest_sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);

        let kind = match req_type {
            VIRTIO_BLK_T_IN => BlockRequestKind::Read,
            VIRTIO_BLK_T_OUT => BlockRequestKind::Write,
            VIRTIO_BLK_T_FLUSH => BlockRequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => BlockRequestKind::GetId,
            VIRTIO_BLK_T_DISCARD => BlockRequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => BlockRequestKind::WriteZeroes,
            other => return Err(refuse(RequestError::Unsupported(other))),
        };
        let device_writes = matches!(kind, BlockRequestKind::Read | BlockRequestKind::GetId);

        // Directions and the total length first (no guest memory touched), then each
        // buffer's place in guest memory.
        let mut data_len: u64 = 0;
        for d in data {
            if d.is_write_only() != device_writes {
                return Err(refuse(RequestError::WrongDirection));
            }
            data_len = add_data_len(data_len, d.len()).map_err(refuse)?;
        }
        let mut segments = Vec::with_capacity(data.len());
        for d in data {
            in_memory(mem, d.addr(), d.len()).map_err(refuse)?;
            segments.push((d.addr(), d.len()));
        }

        let (sector, offset, io_len) = match kind {
            BlockRequestKind::Read | BlockRequestKind::Write => {
                if !data_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(refuse(RequestError::Unaligned(data_len)));
                }
                let offset =
                    disk_offset(guest_sector, data_len, capacity_sectors).map_err(refuse)?;
                (guest_sector, offset, data_len)
            }
            BlockRequestKind::Discard | BlockRequestKind::WriteZeroes => {
                // The header's sector is reserved here: the range says where.
                let range = read_range(mem, &segments, data_len).map_err(refuse)?;
                let (first, sectors, flags) = (
                    u64::from_le(range.0.sector),
                    u32::from_le(range.0.num_sectors),
                    u32::from_le(range.0.flags),
                );
                let (max, allowed_flags) = if kind == BlockRequestKind::Discard {
                    (MAX_DISCARD_SECTORS, 0)
                } else {
                    (MAX_WRITE_ZEROES_SECTORS, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
                };
                if flags & !allowed_flags != 0 {
                    return Err(refuse(RequestError::Unsupported(req_type)));
                }
                if sectors == 0 || sectors > max {
                    return Err(refuse(RequestError::RangeLength(sectors)));
                }
                let len = u64::from(sectors) * SECTOR_SIZE;
                let offset = disk_offset(first, len, capacity_sectors).map_err(refuse)?;
                (first, offset, len)
            }
            BlockRequestKind::GetId => {
                // The id goes into the first buffer only.
                if segments.first().is_none_or(|s| s.1 < ID_BYTES) {
                    return Err(refuse(RequestError::ShortIdBuffer));
                }
                // The sector field is reserved: never used, never in arithmetic.
                (0, 0, 0)
            }
            BlockRequestKind::Flush => (0, 0, 0),
        };
        Ok(BlockRequest {
            kind,
            sector,
            offset,
            segments,
            data_len,
            io_len,
            status_addr: status,
        })
    }

    /// The length to put in the used ring once the request finished with `status` and its
    /// status byte was written: the bytes the device wrote into the guest's buffers, status
    /// byte included (a read's data, GET_ID's serial, nothing for the others or on failure).
    pub fn used_len(&self, status: RequestStatus) -> u32 {
        let data = match (status, self.kind) {
            (RequestStatus::Ok, BlockRequestKind::Read) => {
                // At most MAX_REQUEST_BYTES, checked by `parse`; never claim more than that.
                u32::try_from(self.data_len).unwrap_or(0)
            }
            (RequestStatus::Ok, BlockRequestKind::GetId) => ID_BYTES,
            _ => 0,
        };
        data.saturating_add(1)
    }
}

#[cfg(test)]
mod tests;
