//! virtio devices over the virtio-mmio transport.

pub mod block;
mod mmio;
pub mod net;
pub mod queue_stats;

pub use mmio::{MmioTransport, INTERRUPT_ACK_OFFSET, MMIO_SIZE};

use std::sync::atomic::{AtomicU32, Ordering};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// InterruptStatus bit: the device used buffers in a queue.
pub const INTERRUPT_USED_RING: u32 = 1;
/// InterruptStatus bit: the device's configuration (here: its status) changed.
pub const INTERRUPT_CONFIG: u32 = 2;

/// The device's interrupt line: a status word the guest reads and acknowledges, and the
/// irqfd that raises the GSI.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Interrupt {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    pub fn signal_used_queue(&self) {
        self.signal(INTERRUPT_USED_RING);
    }

    /// Tells the driver to look at the device status (DEVICE_NEEDS_RESET).
    pub fn signal_config_change(&self) {
        self.signal(INTERRUPT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::error!("virtio: cannot raise the interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Copies `config` (a device's config space) from `offset` into `data`, zeros past its end
/// (a driver may read anywhere in the window).
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < config.len() {
        let n = data.len().min(config.len() - start);
        data[..n].copy_from_slice(&config[start..start + n]);
    }
}

/// Activation failed; the transport marks the device as needing a reset.
#[derive(Debug, thiserror::Error)]
#[error("virtio device activation failed: {0}")]
pub struct ActivateError(pub String);

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device ID (2: block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Reads the device-specific config space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver is ready: start serving the queues, kicked through `kicks`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// The driver wrote 0 to the status register: stop serving and drop the queues (when
    /// this returns no request is in progress). False if the device could not be reset.
    fn reset(&mut self) -> bool;
    /// The device found the guest's queue broken and serves nothing until a reset.
    fn needs_reset(&self) -> bool;
}
