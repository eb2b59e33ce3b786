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
        // The iterator stops at the queue size: a last descriptor that still points onward
        // means the chain loops or is longer than the queue. Nothing in it can be trusted.
        if descs.len() > MAX_DESCRIPTORS || descs[descs.len() - 1].has_next() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const MEM_SIZE: usize = 1 << 20;
    const HDR: u64 = 0x2_0000;
    const DATA: u64 = 0x3_0000;
    const STATUS: u64 = 0x4_0000;
    /// Disk capacity in sectors for these tests (1 MiB).
    const CAPACITY: u64 = 2048;

    fn header(req_type: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    /// Builds a chain of `descs` (addr, len, flags, next) whose header says `hdr`, and parses it.
    fn parse(descs: &[(u64, u32, u16, u16)], hdr: [u8; 16]) -> Result<BlockRequest, Refused> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        let mq = MockSplitQueue::new(&mem, 16);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = SplitDescriptor::new(addr, len, flags, next);
            mq.desc_table()
                .store(i as u16, RawDescriptor::from(d))
                .unwrap();
        }
        mq.avail().ring().ref_at(0).unwrap().store(0);
        mq.avail().idx().store(1);
        let mut q: Queue = mq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).expect("a chain is available");
        BlockRequest::parse(chain, &mem, CAPACITY)
    }

    fn refused(descs: &[(u64, u32, u16, u16)], hdr: [u8; 16]) -> RequestError {
        parse(descs, hdr)
            .expect_err("a malformed chain must be refused")
            .error
    }

    /// header -> one data buffer -> status, the data buffer with `data_flags`.
    fn three(data_len: u32, data_flags: u16) -> Vec<(u64, u32, u16, u16)> {
        vec![
            (HDR, 16, NEXT, 1),
            (DATA, data_len, data_flags | NEXT, 2),
            (STATUS, 1, WRITE, 0),
        ]
    }

    #[test]
    fn a_valid_read_parses() {
        let r = parse(&three(4096, WRITE), header(0, 8)).unwrap();
        assert_eq!(r.kind, BlockRequestKind::Read);
        assert_eq!((r.sector, r.data_len), (8, 4096));
        assert_eq!(r.segments, vec![(GuestAddress(DATA), 4096)]);
        assert_eq!(r.status_addr, GuestAddress(STATUS));
    }

    #[test]
    fn a_valid_write_and_flush_parse() {
        assert_eq!(
            parse(&three(512, 0), header(1, 0)).unwrap().kind,
            BlockRequestKind::Write
        );
        let flush = [(HDR, 16, NEXT, 1), (STATUS, 1, WRITE, 0)];
        assert_eq!(
            parse(&flush, header(4, 0)).unwrap().kind,
            BlockRequestKind::Flush
        );
    }

    #[test]
    fn malformed_chains_are_refused() {
        let read = header(0, 0);
        // 1. header the device would write
        assert_eq!(
            refused(&[(HDR, 16, WRITE | NEXT, 1), (STATUS, 1, WRITE, 0)], read),
            RequestError::BadHeader
        );
        // 2. header shorter than the 16-byte request header
        assert_eq!(
            refused(&[(HDR, 8, NEXT, 1), (STATUS, 1, WRITE, 0)], read),
            RequestError::BadHeader
        );
        // 3. a lone descriptor: no status byte to answer in
        let e = parse(&[(HDR, 16, 0, 0)], read).unwrap_err();
        assert_eq!((e.error, e.status_addr), (RequestError::BadStatus, None));
        // 4. status descriptor the device may not write
        assert_eq!(
            refused(&[(HDR, 16, NEXT, 1), (STATUS, 1, 0, 0)], read),
            RequestError::BadStatus
        );
        // 5. status byte outside guest memory
        let e = parse(
            &[(HDR, 16, NEXT, 1), (MEM_SIZE as u64 + 4096, 1, WRITE, 0)],
            read,
        )
        .unwrap_err();
        assert_eq!((e.error, e.status_addr), (RequestError::BadStatus, None));
        // 6. data buffer running past the end of guest memory
        let mut d = three(8192, WRITE);
        d[1].0 = MEM_SIZE as u64 - 4096;
        assert!(matches!(
            refused(&d, read),
            RequestError::OutOfGuestMemory { .. }
        ));
        // 7. data buffer at an address far outside guest memory (and wrapping)
        let mut d = three(4096, WRITE);
        d[1].0 = u64::MAX - 100;
        assert!(matches!(
            refused(&d, read),
            RequestError::OutOfGuestMemory { .. }
        ));
        // 8. a read into a buffer the device may not write
        assert_eq!(refused(&three(4096, 0), read), RequestError::WrongDirection);
        // 9. a write from a buffer the device would write
        assert_eq!(
            refused(&three(4096, WRITE), header(1, 0)),
            RequestError::WrongDirection
        );
        // 10. length not a whole number of sectors
        assert_eq!(
            refused(&three(511, WRITE), read),
            RequestError::Unaligned(511)
        );
        // 11. sectors past the end of the disk
        assert!(matches!(
            refused(&three(4096, WRITE), header(0, CAPACITY - 1)),
            RequestError::OutOfRange { .. }
        ));
        // 12. a sector number that overflows
        assert!(matches!(
            refused(&three(512, WRITE), header(0, u64::MAX)),
            RequestError::OutOfRange { .. }
        ));
        // 13. an unknown request type: answered UNSUPP, with the status byte known
        let e = parse(&three(512, WRITE), header(99, 0)).unwrap_err();
        assert_eq!(
            (e.error, e.status_addr),
            (RequestError::Unsupported(99), Some(GuestAddress(STATUS)))
        );
        // 14. GET_ID into a buffer shorter than the 20-byte id
        assert_eq!(
            refused(&three(8, WRITE), header(8, 0)),
            RequestError::ShortIdBuffer
        );
        // 15. a descriptor loop: the chain ends at the queue size and is refused, no hang
        let looped = [(HDR, 16, NEXT, 1), (DATA, 512, WRITE | NEXT, 1)];
        let e = parse(&looped, read).unwrap_err();
        assert_eq!((e.error, e.status_addr), (RequestError::ChainTooLong, None));
        // 16. header outside guest memory
        let far = [(MEM_SIZE as u64 * 4, 16, NEXT, 1), (STATUS, 1, WRITE, 0)];
        assert!(matches!(
            refused(&far, read),
            RequestError::OutOfGuestMemory { .. }
        ));
    }
}
