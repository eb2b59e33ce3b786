//! The virtio-mmio transport (version 2 register layout). Queue kicks arrive through
//! ioeventfds registered by the VMM on the QueueNotify register, so the vCPU thread never
//! runs device work; this code only handles configuration accesses.

use super::{Interrupt, VirtioDevice};
use crate::bus::BusDevice;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Size of one device's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, where the VMM places the ioeventfds.
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x554d_4551; // any fixed vendor id
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    kicks: Vec<EventFd>,
    queues: Vec<Queue>,
    features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    activated: bool,
}

impl MmioTransport {
    /// `kicks` are the per-queue eventfds the VMM registers as ioeventfds.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        kicks: Vec<EventFd>,
    ) -> Result<MmioTransport, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&n| Queue::new(n))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            kicks,
            queues,
            features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            activated: false,
        })
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            return None; // queues belong to the device thread now
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            // The worker owns the queues; a running device cannot be reset in place.
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        self.status = 0;
        self.driver_features = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        self.status = value;
        let ready = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if value & ready == ready && value & STATUS_FAILED == 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mem = &self.mem;
        if let Some(i) = self.queues.iter().position(|q| !q.is_valid(mem)) {
            tracing::warn!("virtio-mmio: queue {i} is not valid at DRIVER_OK; device failed");
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        let kicks: Result<Vec<EventFd>, _> = self.kicks.iter().map(|e| e.try_clone()).collect();
        let kicks = match kicks {
            Ok(k) => k,
            Err(e) => {
                tracing::error!("virtio-mmio: cannot clone queue eventfds: {e}");
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
        };
        let queues = std::mem::take(&mut self.queues);
        match self.device.activate(
            self.mem.clone(),
            self.driver_features,
            queues,
            kicks,
            self.interrupt.clone(),
        ) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!("virtio-mmio: {e}");
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => {
                let f = self.device.features();
                match self.features_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => 0, // config generation: the config never changes
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let lo = |q: &mut Queue, f: fn(&mut Queue, Option<u32>, Option<u32>)| f(q, Some(v), None);
        let hi = |q: &mut Queue, f: fn(&mut Queue, Option<u32>, Option<u32>)| f(q, None, Some(v));
        match offset {
            0x14 => self.features_select = v,
            0x20 => {
                // Only features we offered can be acked.
                let offered = self.device.features();
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features =
                    (self.driver_features & !mask) | ((u64::from(v) << shift) & offered);
            }
            0x24 => self.driver_features_select = v,
            0x30 => self.queue_select = v,
            0x38 => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 => self
                .queue()
                .into_iter()
                .for_each(|q| lo(q, Queue::set_desc_table_address)),
            0x84 => self
                .queue()
                .into_iter()
                .for_each(|q| hi(q, Queue::set_desc_table_address)),
            0x90 => self
                .queue()
                .into_iter()
                .for_each(|q| lo(q, Queue::set_avail_ring_address)),
            0x94 => self
                .queue()
                .into_iter()
                .for_each(|q| hi(q, Queue::set_avail_ring_address)),
            0xa0 => self
                .queue()
                .into_iter()
                .for_each(|q| lo(q, Queue::set_used_ring_address)),
            0xa4 => self
                .queue()
                .into_iter()
                .for_each(|q| hi(q, Queue::set_used_ring_address)),
            // QueueNotify is served by the ioeventfd; a write landing here means the
            // ioeventfd is missing, so kick the worker by hand.
            NOTIFY_OFFSET => {
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            _ => tracing::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            return; // our devices' config spaces are read-only
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}
