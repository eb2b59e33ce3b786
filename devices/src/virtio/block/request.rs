//! Parsing and validating a virtio-blk request from a guest's descriptor chain.
//!
//! A guest controls every byte here. Every address and length is checked against guest
//! memory and the disk's capacity before anything is read or written; a chain that breaks a
//! rule becomes an error, never a panic and never an access outside guest memory.

use compat::BlockRequestKind;
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the serial number a GET_ID request returns.
pub const ID_BYTES: u32 = 20;
/// Longest chain accepted (descriptors); the queue size bounds it too.
pub const MAX_DESCRIPTORS: usize = 258;
/// Largest data transfer in one request.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;

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
    #[error("request of {0} bytes is too large")]
    TooLarge(u64),
    #[error("sectors {sector}+{len} run past the end of the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("GET_ID buffer is shorter than {ID_BYTES} bytes")]
    ShortIdBuffer,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRequest {
    pub kind: BlockRequestKind,
    pub sector: u64,
    /// Guest buffers, in order.
    pub segments: Vec<(GuestAddress, u32)>,
    pub data_len: u64,
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
    if mem.check_range(addr, len as usize) {
        Ok(())
    } else {
        Err(RequestError::OutOfGuestMemory { addr: addr.0, len })
    }
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
        let descs: Vec<_> = chain.take(MAX_DESCRIPTORS + 1).collect();
        if descs.is_empty() {
            return Err(Refused {
                error: RequestError::EmptyChain,
                status_addr: None,
            });
        }
        if descs.len() > MAX_DESCRIPTORS {
            return Err(Refused {
                error: RequestError::ChainTooLong,
                status_addr: None,
            });
        }
        // The status byte is the last descriptor: find out first whether we can answer.
        let last = descs[descs.len() - 1];
        let status_addr = if descs.len() >= 2
            && last.is_write_only()
            && last.len() >= 1
            && mem.check_range(last.addr(), 1)
        {
            Some(last.addr())
        } else {
            None
        };
        let refuse = |error| Refused { error, status_addr };
        let Some(status) = status_addr else {
            return Err(refuse(RequestError::BadStatus));
        };

        let head = descs[0];
        if head.is_write_only() || head.len() < 16 {
            return Err(refuse(RequestError::BadHeader));
        }
        in_memory(mem, head.addr(), 16).map_err(refuse)?;
        let mut header = [0u8; 16];
        mem.read_slice(&mut header, head.addr())
            .map_err(|_| refuse(RequestError::BadHeader))?;
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        let kind = match req_type {
            VIRTIO_BLK_T_IN => BlockRequestKind::Read,
            VIRTIO_BLK_T_OUT => BlockRequestKind::Write,
            VIRTIO_BLK_T_FLUSH => BlockRequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => BlockRequestKind::GetId,
            other => return Err(refuse(RequestError::Unsupported(other))),
        };
        let device_writes = matches!(kind, BlockRequestKind::Read | BlockRequestKind::GetId);

        let mut segments = Vec::with_capacity(descs.len() - 2);
        let mut data_len: u64 = 0;
        for d in &descs[1..descs.len() - 1] {
            if d.is_write_only() != device_writes {
                return Err(refuse(RequestError::WrongDirection));
            }
            in_memory(mem, d.addr(), d.len()).map_err(refuse)?;
            data_len += u64::from(d.len());
            if data_len > MAX_REQUEST_BYTES {
                return Err(refuse(RequestError::TooLarge(data_len)));
            }
            segments.push((d.addr(), d.len()));
        }
        match kind {
            BlockRequestKind::Read | BlockRequestKind::Write => {
                if !data_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(refuse(RequestError::Unaligned(data_len)));
                }
                let sectors = data_len / SECTOR_SIZE;
                if sector
                    .checked_add(sectors)
                    .is_none_or(|end| end > capacity_sectors)
                {
                    return Err(refuse(RequestError::OutOfRange {
                        sector,
                        len: sectors,
                    }));
                }
            }
            BlockRequestKind::GetId => {
                // The id goes into the first buffer only.
                if segments.first().is_none_or(|s| s.1 < ID_BYTES) {
                    return Err(refuse(RequestError::ShortIdBuffer));
                }
            }
            BlockRequestKind::Flush => {}
        }
        Ok(BlockRequest {
            kind,
            sector,
            segments,
            data_len,
            status_addr: status,
        })
    }
}
