//! A guest's side of a virtqueue, from fuzz bytes: its memory (two regions with a hole
//! between them), where it puts the rings, and what it writes there: descriptors, ring
//! entries and indices, whole well-formed requests, or any bytes anywhere.

use crate::input::Input;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Region 0: [0, 64 KiB).
pub const LOW_END: u64 = 0x1_0000;
/// Region 1: [68 KiB, 72 KiB), after a 4 KiB hole.
pub const HIGH_START: u64 = 0x1_1000;
pub const HIGH_END: u64 = 0x1_2000;

const NEXT: u16 = 1;
const WRITE: u16 = 2;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_END as usize),
        (GuestAddress(HIGH_START), (HIGH_END - HIGH_START) as usize),
    ])
    .expect("guest memory")
}

/// An address a guest would pick: mostly inside its memory (or just past it) and aligned
/// to `align`, sometimes anything.
pub fn addr(inp: &mut Input<'_>, align: u64) -> u64 {
    match inp.u8() % 8 {
        0 => inp.u64(),
        1 => HIGH_END.wrapping_sub(u64::from(inp.u8())),
        2 => LOW_END.wrapping_sub(u64::from(inp.u8())),
        _ => (u64::from(inp.u16()) % HIGH_END) & !(align - 1),
    }
}

/// Where the guest put one queue's rings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rings {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
}

impl Rings {
    pub fn from_input(inp: &mut Input<'_>) -> Rings {
        let size = match inp.u8() % 8 {
            0 => inp.u16(),
            _ => 1 << (inp.u8() % 9),
        };
        Rings {
            desc: addr(inp, 16),
            avail: addr(inp, 2),
            used: addr(inp, 4),
            size,
        }
    }
}

/// A queue as a transport would hand it to the device: `rings` set, ready or not, and
/// sometimes ring positions that a fresh queue would not have.
pub fn queue(inp: &mut Input<'_>, max: u16, rings: &Rings) -> Queue {
    let mut q = Queue::new(max).expect("queue");
    q.set_size(rings.size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(rings.desc);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(rings.avail);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(rings.used);
    q.set_used_ring_address(lo, hi);
    q.set_ready(!inp.one_in(8));
    if inp.one_in(4) {
        q.set_next_avail(inp.u16());
        q.set_next_used(inp.u16());
    }
    q.set_event_idx(inp.bool());
    q
}

fn put<const N: usize>(mem: &GuestMemoryMmap, at: u64, bytes: [u8; N]) {
    trace!("guest: {at:#x} <- {bytes:02x?}");
    // Outside memory is the guest's problem: nothing is written.
    let _ = mem.write_slice(&bytes, GuestAddress(at));
}

pub(crate) fn descriptor(mem: &GuestMemoryMmap, rings: &Rings, i: u16, d: (u64, u32, u16, u16)) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&d.0.to_le_bytes());
    raw[8..12].copy_from_slice(&d.1.to_le_bytes());
    raw[12..14].copy_from_slice(&d.2.to_le_bytes());
    raw[14..].copy_from_slice(&d.3.to_le_bytes());
    put(mem, rings.desc.wrapping_add(16 * u64::from(i)), raw);
}

/// The next free avail slot: the guest's own avail index, read back.
pub(crate) fn make_available(mem: &GuestMemoryMmap, rings: &Rings, head: u16) {
    let idx: u16 = mem
        .read_obj(GuestAddress(rings.avail.wrapping_add(2)))
        .unwrap_or(0);
    let slot = u64::from(idx % rings.size.max(1));
    put(
        mem,
        rings.avail.wrapping_add(4 + 2 * slot),
        head.to_le_bytes(),
    );
    put(
        mem,
        rings.avail.wrapping_add(2),
        idx.wrapping_add(1).to_le_bytes(),
    );
}

fn data_len(inp: &mut Input<'_>) -> u32 {
    match inp.u8() % 8 {
        0 => inp.u32(),
        1 => 20,
        2 => 1,
        3 => 4096,
        4 => u32::from(inp.u16()),
        _ => 512 * u32::from(inp.u8() % 9),
    }
}

/// One thing a guest writes into its memory.
pub fn guest_write(inp: &mut Input<'_>, mem: &GuestMemoryMmap, rings: &Rings) {
    let size = rings.size.max(1);
    match inp.u8() % 8 {
        0 => {
            // One descriptor.
            let i = if inp.one_in(8) {
                inp.u16()
            } else {
                inp.u16() % size
            };
            let flags = if inp.one_in(8) {
                inp.u16()
            } else {
                u16::from(inp.u8() & 7)
            };
            let next = if inp.bool() {
                i.wrapping_add(1)
            } else {
                inp.u16()
            };
            descriptor(mem, rings, i, (addr(inp, 1), data_len(inp), flags, next));
        }
        1 => {
            // An avail ring entry.
            let slot = u64::from(inp.u16() % size);
            let head = if inp.one_in(8) {
                inp.u16()
            } else {
                inp.u16() % size
            };
            put(
                mem,
                rings.avail.wrapping_add(4 + 2 * slot),
                head.to_le_bytes(),
            );
        }
        2 => {
            // The avail index (a small step, or anything).
            let idx: u16 = mem
                .read_obj(GuestAddress(rings.avail.wrapping_add(2)))
                .unwrap_or(0);
            let next = match inp.u8() % 4 {
                0 => inp.u16(),
                _ => idx.wrapping_add(u16::from(inp.u8() % 8)),
            };
            put(mem, rings.avail.wrapping_add(2), next.to_le_bytes());
        }
        3 => {
            // The flags and event words: avail flags, used_event, avail_event.
            put(mem, rings.avail, inp.u16().to_le_bytes());
            put(
                mem,
                rings.avail.wrapping_add(4 + 2 * u64::from(size)),
                inp.u16().to_le_bytes(),
            );
            put(
                mem,
                rings.used.wrapping_add(4 + 8 * u64::from(size)),
                inp.u16().to_le_bytes(),
            );
        }
        4 => {
            // Any bytes, anywhere.
            let at = addr(inp, 1);
            let bytes = inp.chunk(64);
            trace!("guest: {at:#x} <- {bytes:02x?}");
            let _ = mem.write_slice(bytes, GuestAddress(at));
        }
        _ => well_formed_request(inp, mem, rings),
    }
}

/// A request as a driver builds it: header, data buffers, status, chained from descriptor
/// `head`, made available. The fuzz bytes choose the type, sector, buffers and head.
fn well_formed_request(inp: &mut Input<'_>, mem: &GuestMemoryMmap, rings: &Rings) {
    let size = rings.size.max(1);
    let head = inp.u16() % size;
    let req_type = inp.pick(&[0u32, 1, 4, 8, 0, 1, 2, u32::MAX]);
    let sector = inp.interesting_u64(0);
    let hdr = addr(inp, 16);
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&req_type.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    put(mem, hdr, header);
    let buffers = inp.below(4);
    let device_writes = matches!(req_type, 0 | 8);
    let mut i = head;
    descriptor(mem, rings, i, (hdr, 16, NEXT, (i + 1) % size));
    for _ in 0..buffers {
        i = (i + 1) % size;
        let flags = if device_writes { WRITE | NEXT } else { NEXT };
        descriptor(
            mem,
            rings,
            i,
            (addr(inp, 512), data_len(inp), flags, (i + 1) % size),
        );
    }
    i = (i + 1) % size;
    descriptor(mem, rings, i, (addr(inp, 1), 1, WRITE, 0));
    make_available(mem, rings, head);
}
