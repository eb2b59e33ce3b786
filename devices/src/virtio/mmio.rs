//! The virtio-mmio transport (version 2 register layout). Queue kicks arrive through
//! ioeventfds registered by the VMM on the QueueNotify register, so the vCPU thread never
//! runs device work; this code only handles configuration accesses.

use super::{Interrupt, VirtioDevice};
use crate::bus::BusDevice;
use crate::logger::LogLimiter;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Size of one device's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, where the VMM places the ioeventfds.
pub const NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the InterruptACK register (see [`MmioTransport::with_kernel_ack`]).
pub const INTERRUPT_ACK_OFFSET: u64 = 0x64;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x554d_4551; // any fixed vendor id
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// Lines a guest can cause through the registers.
static GUEST_LOG: LogLimiter = LogLimiter::with_defaults();

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
    /// The ioeventfd that takes used-ring acknowledgements in KVM, kept open with the
    /// transport.
    _kernel_ack: Option<EventFd>,
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
            _kernel_ack: None,
        })
    }

    /// The VMM registered `ack` as an ioeventfd on InterruptACK matching the value
    /// [`INTERRUPT_USED_RING`](super::INTERRUPT_USED_RING): the guest's acknowledgement of
    /// a used-ring interrupt alone then ends in KVM, one exit to the VMM fewer per
    /// interrupt (its handler still reads InterruptStatus). The used-ring bit then stays
    /// set until an acknowledgement that does reach the transport (one that names the
    /// configuration bit too) or a reset, so an interrupt for a configuration change also
    /// has the driver look at its rings, which costs it a scan that finds nothing. Nothing
    /// is lost: the device raises the line for every notification regardless of the bit.
    pub fn with_kernel_ack(mut self, ack: EventFd) -> MmioTransport {
        self._kernel_ack = Some(ack);
        self
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            return None; // queues belong to the device thread now
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    /// The virtio reset (status 0): the device stops serving and gives its queues up, then
    /// everything the driver set is forgotten, so the driver can initialize it again.
    fn reset(&mut self) {
        if !self.device.reset() {
            // The device is still serving its old rings: it cannot start over.
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        let fresh: Result<Vec<Queue>, _> = self
            .device
            .queue_max_sizes()
            .iter()
            .map(|&n| Queue::new(n))
            .collect();
        match fresh {
            Ok(queues) => self.queues = queues,
            Err(e) => {
                tracing::error!("virtio-mmio: cannot recreate the queues: {e:?}");
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.interrupt.ack(u32::MAX);
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
        // A driver may set up fewer queues than the device offers (Linux's virtio_blk uses
        // one per CPU at most): the ones it made ready, from the first, are served.
        let used = self.queues.iter().take_while(|q| q.ready()).count();
        let trailing = self.queues.iter().skip(used).position(|q| q.ready());
        let invalid = self.queues[..used].iter().position(|q| !q.is_valid(mem));
        let problem = match (used, trailing, invalid) {
            (0, _, _) => Some("no queue is ready at DRIVER_OK".to_string()),
            (_, Some(i), _) => Some(format!(
                "queue {} is ready but queue {used} is not",
                used + i
            )),
            (_, _, Some(i)) => Some(format!("queue {i} is not valid at DRIVER_OK")),
            _ => None,
        };
        if let Some(problem) = problem {
            crate::limited_warn!(GUEST_LOG, "virtio-mmio: {problem}; device failed");
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        let kicks: Result<Vec<EventFd>, _> = self
            .kicks
            .iter()
            .take(used)
            .map(|e| e.try_clone())
            .collect();
        let kicks = match kicks {
            Ok(k) => k,
            Err(e) => {
                tracing::error!("virtio-mmio: cannot clone queue eventfds: {e}");
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
        };
        let mut queues = std::mem::take(&mut self.queues);
        queues.truncate(used);
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
            0x70 => {
                if self.device.needs_reset() {
                    self.status | STATUS_NEEDS_RESET
                } else {
                    self.status
                }
            }
            0xfc => 0, // config generation: the config never changes
            _ => 0,
        }
    }

    /// One half of a ring's address (low word at the even register, high at +4); a
    /// misaligned address is refused here, once in a while with a line, rather than by
    /// virtio-queue, which logs every one.
    fn set_ring_address(&mut self, offset: u64, v: u32) {
        let Some(q) = self.queue() else { return };
        let current = match offset & !0xf {
            0x80 => q.desc_table(),
            0x90 => q.avail_ring(),
            _ => q.used_ring(),
        };
        let next = if offset & 4 == 0 {
            (current & !0xffff_ffff) | u64::from(v)
        } else {
            (current & 0xffff_ffff) | (u64::from(v) << 32)
        };
        let addr = vm_memory::GuestAddress(next);
        let set = match offset & !0xf {
            0x80 => q.try_set_desc_table_address(addr),
            0x90 => q.try_set_avail_ring_address(addr),
            _ => q.try_set_used_ring_address(addr),
        };
        if set.is_err() {
            crate::limited_warn!(
                GUEST_LOG,
                "virtio-mmio: misaligned ring address {next:#x} (register {offset:#x}) refused"
            );
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
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
                // virtio-queue checks the size itself (and logs each bad one): pass only
                // what fits a u16 and the queue's maximum, and say why once in a while.
                let Some(q) = self.queue() else { return };
                match u16::try_from(v) {
                    Ok(n) if n != 0 && n.is_power_of_two() && n <= q.max_size() => q.set_size(n),
                    _ => {
                        crate::limited_warn!(GUEST_LOG, "virtio-mmio: queue size {v} refused");
                    }
                }
            }
            0x44 => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => self.set_ring_address(offset, v),
            // QueueNotify is served by the ioeventfd; a write landing here means the
            // ioeventfd is missing, so kick the worker by hand.
            NOTIFY_OFFSET => {
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            _ => {
                crate::limited_info!(
                    GUEST_LOG,
                    "virtio-mmio: write to unknown register {offset:#x}"
                );
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vm_memory::GuestAddress;

    /// Counts activations and resets; `resettable` says whether a reset succeeds.
    struct Fake {
        activations: Arc<AtomicU32>,
        resets: Arc<AtomicU32>,
        resettable: bool,
        active: bool,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            1 << 32 // VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: u64,
            queues: Vec<Queue>,
            _: Vec<EventFd>,
            _: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            assert_eq!(queues.len(), 1);
            self.activations.fetch_add(1, Ordering::SeqCst);
            self.active = true;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets.fetch_add(1, Ordering::SeqCst);
            if self.resettable {
                self.active = false;
            }
            self.resettable || !self.active
        }
        fn needs_reset(&self) -> bool {
            false
        }
    }

    fn transport(resettable: bool) -> (MmioTransport, Arc<AtomicU32>, Arc<AtomicU32>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (activations, resets) = (Arc::default(), Arc::default());
        let dev = Fake {
            activations: Arc::clone(&activations),
            resets: Arc::clone(&resets),
            resettable,
            active: false,
        };
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let t =
            MmioTransport::new(Box::new(dev), mem, irq, vec![EventFd::new(0).unwrap()]).unwrap();
        (t, activations, resets)
    }

    fn w(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// The Linux driver's initialization, as far as the transport sees it.
    fn initialize(t: &mut MmioTransport) {
        w(t, 0x70, 0);
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, 0x24, 1);
        w(t, 0x20, 1); // VERSION_1
        w(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(t, 0x30, 0);
        assert_eq!(r(t, 0x44), 0, "queue not ready before setup");
        assert_eq!(r(t, 0x34), 16);
        w(t, 0x38, 16);
        w(t, 0x80, 0x1000);
        w(t, 0x84, 0);
        w(t, 0x90, 0x2000);
        w(t, 0x94, 0);
        w(t, 0xa0, 0x3000);
        w(t, 0xa4, 0);
        w(t, 0x44, 1);
        w(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    /// Writing 0 to the status of a running device used to only set NEEDS_RESET, so the
    /// guest's driver could never bring the device back. Now it resets: the device gives
    /// its queue up, every register starts over, and a second initialization activates it
    /// again.
    #[test]
    fn a_reset_after_driver_ok_lets_the_driver_start_over() {
        let (mut t, activations, resets) = transport(true);
        initialize(&mut t);
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0, "status reads 0 once the reset is done");
        assert!(resets.load(Ordering::SeqCst) >= 1);
        assert_eq!(r(&mut t, 0x44), 0, "the queue is not ready any more");
        assert_eq!(r(&mut t, 0x34), 16, "and can be set up again");
        initialize(&mut t);
        assert_eq!(activations.load(Ordering::SeqCst), 2);
        assert_ne!(r(&mut t, 0x70) & STATUS_DRIVER_OK, 0);
    }

    #[test]
    fn a_device_that_cannot_reset_says_it_needs_one() {
        let (mut t, _, _) = transport(false);
        initialize(&mut t);
        w(&mut t, 0x70, 0);
        assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    }

    /// Sizes that are not a power of two, 0, over the maximum or over 16 bits (which used to
    /// be truncated: 0x1_0010 became 16) are refused; misaligned rings too.
    #[test]
    fn bad_queue_sizes_and_misaligned_rings_are_refused() {
        let (mut t, _, _) = transport(true);
        w(&mut t, 0x38, 8);
        for size in [0u32, 3, 32, 0x1_0010] {
            w(&mut t, 0x38, size);
        }
        w(&mut t, 0x80, 0x1000);
        w(&mut t, 0x80, 0x1008); // not 16-aligned
        w(&mut t, 0x90, 0x2001); // not 2-aligned
        w(&mut t, 0xa0, 0x3002); // not 4-aligned
        w(&mut t, 0xa4, 1); // the high half is fine
        let q = &t.queues[0];
        assert_eq!(q.size(), 8, "the last good size stays");
        assert_eq!(q.desc_table(), 0x1000);
        assert_eq!(q.avail_ring(), 0);
        assert_eq!(q.used_ring(), 1 << 32);
    }
}
