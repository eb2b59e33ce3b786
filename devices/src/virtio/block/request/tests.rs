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
    parse_on(descs, hdr, CAPACITY)
}

/// As `parse`, for a disk of `capacity` sectors.
fn parse_on(
    descs: &[(u64, u32, u16, u16)],
    hdr: [u8; 16],
    capacity: u64,
) -> Result<BlockRequest, Refused> {
    parse_with(descs, hdr, capacity, &[])
}

/// As `parse_on`, with `data` in guest memory at `DATA`.
fn parse_with(
    descs: &[(u64, u32, u16, u16)],
    hdr: [u8; 16],
    capacity: u64,
    data: &[u8],
) -> Result<BlockRequest, Refused> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    mem.write_slice(data, GuestAddress(DATA)).unwrap();
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
    BlockRequest::parse(chain, &mem, capacity)
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
    assert_eq!((r.sector, r.offset, r.data_len), (8, 8 * 512, 4096));
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

/// header -> data buffers of `lens` (all with `data_flags`) -> status.
fn chain_of(lens: &[u32], data_flags: u16) -> Vec<(u64, u32, u16, u16)> {
    let mut d = vec![(HDR, 16, NEXT, 1)];
    for (i, &len) in lens.iter().enumerate() {
        let i = i as u16;
        d.push((DATA + u64::from(i) * 0x1000, len, data_flags | NEXT, i + 2));
    }
    d.push((STATUS, 1, WRITE, 0));
    d
}

/// Sector values that overflow `sector * 512` (or come close).
const WILD_SECTORS: [u64; 5] = [
    u64::MAX,
    u64::MAX / SECTOR_SIZE + 1,
    u64::MAX / SECTOR_SIZE,
    1 << 55,
    CAPACITY,
];

#[test]
fn flush_and_get_id_ignore_the_reserved_sector() {
    let flush = [(HDR, 16, NEXT, 1), (STATUS, 1, WRITE, 0)];
    for sector in WILD_SECTORS {
        let r = parse(&flush, header(VIRTIO_BLK_T_FLUSH, sector)).unwrap();
        assert_eq!(r.kind, BlockRequestKind::Flush);
        assert_eq!((r.sector, r.offset, r.data_len), (0, 0, 0), "{sector:#x}");

        let r = parse(&three(ID_BYTES, WRITE), header(VIRTIO_BLK_T_GET_ID, sector)).unwrap();
        assert_eq!(r.kind, BlockRequestKind::GetId);
        assert_eq!((r.sector, r.offset), (0, 0), "{sector:#x}");
        assert_eq!(r.segments, vec![(GuestAddress(DATA), ID_BYTES)]);
    }
    // A flush with a data buffer still parses; the buffer is never used as disk space.
    let r = parse(&three(4096, 0), header(VIRTIO_BLK_T_FLUSH, u64::MAX)).unwrap();
    assert_eq!((r.sector, r.offset), (0, 0));
}

#[test]
fn wild_sectors_on_reads_and_writes_are_refused_not_wrapped() {
    for sector in WILD_SECTORS {
        for (t, flags) in [(VIRTIO_BLK_T_IN, WRITE), (VIRTIO_BLK_T_OUT, 0)] {
            assert!(matches!(
                refused(&three(512, flags), header(t, sector)),
                RequestError::OutOfRange { .. }
            ));
        }
    }
    // A capacity no real disk has, so that `sector * 512` is the check that fails.
    for sector in [u64::MAX / SECTOR_SIZE + 1, u64::MAX - 1] {
        let e = parse_on(
            &three(512, WRITE),
            header(VIRTIO_BLK_T_IN, sector),
            u64::MAX,
        )
        .unwrap_err();
        assert!(matches!(e.error, RequestError::OutOfRange { .. }), "{e:?}");
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
    }
}

#[test]
fn the_last_sector_is_served_and_the_one_past_it_refused() {
    for (t, flags) in [(VIRTIO_BLK_T_IN, WRITE), (VIRTIO_BLK_T_OUT, 0)] {
        let r = parse(&three(512, flags), header(t, CAPACITY - 1)).unwrap();
        assert_eq!((r.sector, r.offset), (CAPACITY - 1, (CAPACITY - 1) * 512));
        assert_eq!(r.offset + r.data_len, CAPACITY * SECTOR_SIZE);
        // The last two sectors, as two buffers.
        let r = parse(&chain_of(&[512, 512], flags), header(t, CAPACITY - 2)).unwrap();
        assert_eq!(r.offset + r.data_len, CAPACITY * SECTOR_SIZE);

        for (len, sector) in [(512, CAPACITY), (1024, CAPACITY - 1), (512, CAPACITY + 1)] {
            assert_eq!(
                refused(&three(len, flags), header(t, sector)),
                RequestError::OutOfRange {
                    sector,
                    len: u64::from(len) / 512
                }
            );
        }
        // No data at all: served inside the disk, refused at its end.
        let empty = [(HDR, 16, NEXT, 1), (STATUS, 1, WRITE, 0)];
        let r = parse(&empty, header(t, CAPACITY - 1)).unwrap();
        assert_eq!((r.offset, r.data_len), ((CAPACITY - 1) * 512, 0));
        assert!(matches!(
            refused(&empty, header(t, CAPACITY)),
            RequestError::OutOfRange { .. }
        ));
    }
    // The largest disk whose size in bytes fits a u64: its last sector still works.
    let capacity = u64::MAX / SECTOR_SIZE;
    let r = parse_on(
        &three(512, WRITE),
        header(VIRTIO_BLK_T_IN, capacity - 1),
        capacity,
    )
    .unwrap();
    assert_eq!(r.offset, (capacity - 1) * SECTOR_SIZE);
    assert!(r.offset.checked_add(r.data_len).is_some());
}

#[test]
fn segment_lengths_past_the_limit_u32_or_u64_are_refused() {
    let read = header(VIRTIO_BLK_T_IN, 0);
    let half = (MAX_REQUEST_BYTES / 2) as u32;
    // Exactly the limit is fine as far as length goes (the buffers lie outside the 1 MiB
    // of test memory, so it fails there, after the length check).
    assert!(matches!(
        refused(&chain_of(&[half, half], WRITE), read),
        RequestError::OutOfGuestMemory { .. }
    ));
    // One sector more is too large, whatever the buffers' addresses.
    assert_eq!(
        refused(&chain_of(&[half, half, 512], WRITE), read),
        RequestError::TooLarge(MAX_REQUEST_BYTES + 512)
    );
    // Lengths that add up to nearly u32::MAX: refused by our sum.
    assert_eq!(
        refused(&chain_of(&[0x7fff_0000, 0x7fff_0000], WRITE), read),
        RequestError::TooLarge(0x7fff_0000)
    );
    // Past u32::MAX (the header's and status's 17 bytes included), virtio-queue's
    // iterator stops the chain early, so it ends in a descriptor that points onward: a
    // broken chain, refused with no status byte to trust.
    for lens in [
        vec![0x8000_0000, 0x8000_0000],
        vec![512, u32::MAX],
        vec![u32::MAX; 14],
    ] {
        let e = parse(&chain_of(&lens, WRITE), read).unwrap_err();
        assert_eq!((e.error, e.status_addr), (RequestError::ChainTooLong, None));
    }
    // A write too, and GET_ID.
    assert!(matches!(
        refused(
            &chain_of(&[half, half, 512], 0),
            header(VIRTIO_BLK_T_OUT, 0)
        ),
        RequestError::TooLarge(_)
    ));
    assert!(matches!(
        refused(
            &chain_of(&[ID_BYTES, 0x7fff_0000], WRITE),
            header(VIRTIO_BLK_T_GET_ID, 0)
        ),
        RequestError::TooLarge(_)
    ));
    // The sum itself is checked: past u64 it is refused, saturated, never wrapped.
    assert_eq!(
        add_data_len(u64::MAX - 1, 2),
        Err(RequestError::TooLarge(u64::MAX))
    );
    assert_eq!(
        add_data_len(u64::MAX, u32::MAX),
        Err(RequestError::TooLarge(u64::MAX))
    );
    assert_eq!(
        add_data_len(MAX_REQUEST_BYTES - 512, 512),
        Ok(MAX_REQUEST_BYTES)
    );
}

#[test]
fn buffers_wrapping_the_address_space_are_refused() {
    let mut d = three(4096, WRITE);
    d[1].0 = u64::MAX - 511;
    assert!(matches!(
        refused(&d, header(VIRTIO_BLK_T_IN, 0)),
        RequestError::OutOfGuestMemory { .. }
    ));
    let e = parse(&[(HDR, 16, NEXT, 1), (u64::MAX, 1, WRITE, 0)], header(0, 0)).unwrap_err();
    assert_eq!((e.error, e.status_addr), (RequestError::BadStatus, None));
    let e = parse(
        &[(u64::MAX - 7, 16, NEXT, 1), (STATUS, 1, WRITE, 0)],
        header(0, 0),
    )
    .unwrap_err();
    assert!(matches!(e.error, RequestError::OutOfGuestMemory { .. }));
}

#[test]
fn used_len_counts_what_the_device_wrote() {
    let read = parse(&three(4096, WRITE), header(VIRTIO_BLK_T_IN, 0)).unwrap();
    assert_eq!(read.used_len(RequestStatus::Ok), 4097);
    assert_eq!(read.used_len(RequestStatus::IoError), 1);
    let write = parse(&three(4096, 0), header(VIRTIO_BLK_T_OUT, 0)).unwrap();
    assert_eq!(write.used_len(RequestStatus::Ok), 1);
    let id = parse(&three(512, WRITE), header(VIRTIO_BLK_T_GET_ID, 0)).unwrap();
    assert_eq!(id.used_len(RequestStatus::Ok), ID_BYTES + 1);
    assert_eq!(id.used_len(RequestStatus::Unsupported), 1);
    // The largest read still fits the used ring's u32.
    let big = BlockRequest {
        data_len: MAX_REQUEST_BYTES,
        ..read
    };
    assert_eq!(
        big.used_len(RequestStatus::Ok),
        MAX_REQUEST_BYTES as u32 + 1
    );
}

/// One discard or write-zeroes range, as the guest lays it out.
fn range(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&sectors.to_le_bytes());
    r[12..].copy_from_slice(&flags.to_le_bytes());
    r
}

#[test]
fn discard_and_write_zeroes_carry_one_checked_range() {
    let (discard, zeroes) = (header(11, 0), header(13, 0));
    // A valid discard: the range says where, the header's sector is ignored.
    let r = parse_with(&three(16, 0), header(11, 999), CAPACITY, &range(8, 16, 0)).unwrap();
    assert_eq!(r.kind, BlockRequestKind::Discard);
    assert_eq!(
        (r.sector, r.offset, r.io_len, r.data_len),
        (8, 4096, 8192, 16)
    );
    assert_eq!(
        r.used_len(RequestStatus::Ok),
        1,
        "the device writes only the status"
    );
    // Write-zeroes may ask to unmap; a discard may not, and unknown flags are refused.
    let r = parse_with(&three(16, 0), zeroes, CAPACITY, &range(0, 8, 1)).unwrap();
    assert_eq!((r.kind, r.io_len), (BlockRequestKind::WriteZeroes, 4096));
    for (hdr, flags) in [(discard, 1), (zeroes, 2), (discard, 1 << 31)] {
        let e = parse_with(&three(16, 0), hdr, CAPACITY, &range(0, 8, flags)).unwrap_err();
        assert!(matches!(e.error, RequestError::Unsupported(_)), "{e:?}");
    }
    // The last sector is in range; one past it, an empty range, a range past the end,
    // a wild sector, more than one range or a device-writable range are not.
    assert!(parse_with(&three(16, 0), discard, CAPACITY, &range(CAPACITY - 1, 1, 0)).is_ok());
    let bad = |data: [u8; 16], descs: Vec<(u64, u32, u16, u16)>| {
        parse_with(&descs, discard, CAPACITY, &data)
            .expect_err("refused")
            .error
    };
    assert!(matches!(
        bad(range(CAPACITY, 1, 0), three(16, 0)),
        RequestError::OutOfRange { .. }
    ));
    assert_eq!(
        bad(range(0, 0, 0), three(16, 0)),
        RequestError::RangeLength(0)
    );
    assert!(matches!(
        bad(range(CAPACITY - 8, 16, 0), three(16, 0)),
        RequestError::OutOfRange { .. }
    ));
    for sector in WILD_SECTORS {
        assert!(matches!(
            bad(range(sector, 8, 0), three(16, 0)),
            RequestError::OutOfRange { .. }
        ));
    }
    assert_eq!(
        bad(range(0, MAX_DISCARD_SECTORS + 1, 0), three(16, 0)),
        RequestError::RangeLength(MAX_DISCARD_SECTORS + 1)
    );
    assert_eq!(
        bad(range(0, 8, 0), three(32, 0)),
        RequestError::BadRange(32)
    );
    assert_eq!(bad(range(0, 8, 0), three(8, 0)), RequestError::BadRange(8));
    assert_eq!(
        bad(range(0, 8, 0), three(16, WRITE)),
        RequestError::WrongDirection
    );
    // A range split over two buffers is gathered.
    let split = vec![
        (HDR, 16, NEXT, 1),
        (DATA, 10, NEXT, 2),
        (DATA + 10, 6, NEXT, 3),
        (STATUS, 1, WRITE, 0),
    ];
    let r = parse_with(&split, discard, CAPACITY, &range(16, 8, 0)).unwrap();
    assert_eq!((r.offset, r.io_len), (16 * 512, 4096));
}
