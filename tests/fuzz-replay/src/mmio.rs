//! The virtio-mmio transport with a virtio-blk device behind it: any sequence of register
//! reads and writes (any offset, any size, status writes of 0 and DRIVER_OK among them),
//! with the guest writing its rings and requests in memory between them and the device
//! serving its queue when kicked. Ends with a reset, which must leave the device idle.

use crate::blk::{self, Disks};
use crate::guest::{self, Rings};
use crate::input::Input;
use devices::bus::BusDevice;
use devices::virtio::block::Block;
use devices::virtio::MmioTransport;
use std::sync::OnceLock;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MAX_OPS: usize = 256;
/// Most kicks served per input (each serves at most a queue's worth of chains).
const MAX_KICKS: usize = 16;

const STATUS: u64 = 0x70;
const NOTIFY: u64 = 0x50;
const ACK: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const FAILED: u32 = 0x80;

/// The registers of the version-2 layout, and the device config after them.
const REGISTERS: &[u64] = &[
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70,
    0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0xfc, 0x100, 0x104, 0x108, 0x10c, 0x110,
];

fn offset(inp: &mut Input<'_>) -> u64 {
    match inp.u8() % 8 {
        0 => inp.u64(),
        1 => u64::from(inp.u16()) % 0x1000,
        _ => inp.pick(REGISTERS),
    }
}

/// A register write.
fn write(t: &mut MmioTransport, offset: u64, data: &[u8]) {
    trace!("mmio: write {offset:#x} = {data:02x?}");
    t.write(offset, data);
}

fn write32(t: &mut MmioTransport, offset: u64, v: u32) {
    write(t, offset, &v.to_le_bytes());
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// The whole driver start-up, as Linux does it, with the rings at `rings`.
fn driver_init(inp: &mut Input<'_>, t: &mut MmioTransport, rings: &Rings) {
    write32(t, STATUS, 0);
    write32(t, STATUS, ACK);
    write32(t, STATUS, ACK | DRIVER);
    for sel in 0..2 {
        write32(t, 0x14, sel);
        let offered = read32(t, 0x10);
        write32(t, 0x24, sel);
        write32(t, 0x20, offered & inp.u32());
    }
    write32(t, STATUS, ACK | DRIVER | FEATURES_OK);
    let _ = read32(t, STATUS);
    write32(t, 0x30, 0);
    let _ = read32(t, 0x34);
    write32(t, 0x38, u32::from(rings.size));
    for (reg, a) in [(0x80, rings.desc), (0x90, rings.avail), (0xa0, rings.used)] {
        write32(t, reg, a as u32);
        write32(t, reg + 4, (a >> 32) as u32);
    }
    write32(t, 0x44, 1);
    if !inp.one_in(8) {
        write32(t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    }
}

pub fn mmio(data: &[u8]) {
    static POOL: OnceLock<Disks> = OnceLock::new();
    let mut inp = Input::new(data);
    let disks = blk::disks(&POOL, "m");
    let (stack, ro) = disks.stacks[inp.below(disks.stacks.len())].clone();
    let mem = guest::memory();
    let (line, irq) = blk::interrupt();
    let queue_kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let block = Block::new(
        stack.device_id(),
        stack.clone(),
        ro,
        vec![Box::new(
            block::SyncEngine::new(stack.backend()).expect("an eventfd"),
        )],
    );
    let mut t = MmioTransport::new(Box::new(block), mem.clone(), line, vec![queue_kick])
        .expect("transport");
    // Where the guest puts its rings (it may move them with register writes too).
    let mut rings = Rings::from_input(&mut inp);
    trace!("mmio: disk {}, rings {rings:x?}", stack.device_id());
    let mut kicks = 0;
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 10 {
            0 | 1 => {
                let at = offset(&mut inp);
                let mut buf = [0u8; 8];
                let n = inp.pick(&[4usize, 4, 1, 2, 8, 0, 3]);
                t.read(at, &mut buf[..n]);
                trace!("mmio: read {at:#x} ({n} bytes) = {:02x?}", &buf[..n]);
            }
            2 | 3 => {
                let at = offset(&mut inp);
                let v = match inp.u8() % 4 {
                    0 => u32::from(inp.u8()),
                    _ => inp.u32(),
                };
                let n = inp.pick(&[4usize, 4, 4, 1, 2, 8, 0]);
                let mut buf = [0u8; 8];
                buf[..4].copy_from_slice(&v.to_le_bytes());
                if at == NOTIFY && n == 4 && v == 0 {
                    // A kick of queue 0: served below, synchronously (see `kick`).
                    kick(&stack, &mut kicks);
                } else {
                    write(&mut t, at, &buf[..n]);
                }
            }
            4 => {
                let status = inp.pick(&[
                    0,
                    ACK | DRIVER | FEATURES_OK | DRIVER_OK,
                    ACK | DRIVER | FEATURES_OK,
                    FAILED,
                    ACK | DRIVER | FEATURES_OK | DRIVER_OK | FAILED,
                    0x40,
                ]);
                write32(&mut t, STATUS, status);
            }
            5 => {
                if inp.bool() {
                    rings = Rings::from_input(&mut inp);
                }
                trace!("mmio: driver start-up, rings {rings:x?}");
                driver_init(&mut inp, &mut t, &rings);
            }
            6 => kick(&stack, &mut kicks),
            _ => guest::guest_write(&mut inp, &mem, &rings),
        }
    }
    // The driver resets the device: it must stop serving and forget everything.
    write32(&mut t, STATUS, 0);
    assert_eq!(read32(&mut t, STATUS), 0, "status after a reset");
    assert_eq!(read32(&mut t, 0x60), 0, "interrupt status after a reset");
    assert_eq!(read32(&mut t, 0x44), 0, "queue ready after a reset");
    let _ = irq.read();
}

/// The guest's kick of queue 0. The transport's QueueNotify write only signals the queue's
/// eventfd, which the device's handler watches on its I/O thread; the harness runs that
/// handler through the thread's drain instead, which waits for it, so each input runs the
/// same way every time and never races the guest writes that follow.
fn kick(stack: &compat::LiveStack, kicks: &mut usize) {
    trace!("mmio: kick");
    if *kicks < MAX_KICKS {
        *kicks += 1;
        stack
            .io_thread()
            .drain()
            .expect("the disk's I/O thread is serving");
    }
}
