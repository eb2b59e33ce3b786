//! virtio-blk: a disk over the compat shim's stack (interceptors, then a backend driver).
//! Requests are served on the device's own thread, woken by the queue's ioeventfd; each
//! passes the stack's pre-processing point before the driver and its post-processing point
//! before the guest sees the status.

mod order;
pub mod request;
mod worker;

pub use block::RawFile;
pub use request::{BlockRequest, Refused, RequestError};

use super::{ActivateError, Interrupt, VirtioDevice};
use block::AsyncIo;
use compat::event_manager::SubscriberId;
use compat::LiveStack;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use worker::{EngineHome, Worker};

pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const QUEUE_SIZE: u16 = 256;
/// Segments per request we announce (VIRTIO_BLK_F_SEG_MAX).
const SEG_MAX: u32 = 128;

pub struct Block {
    id: String,
    stack: Arc<LiveStack>,
    capacity_sectors: u64,
    read_only: bool,
    queue_sizes: [u16; 1],
    /// The queue's handler on the disk's I/O thread, while the device is active.
    serving: Option<SubscriberId>,
    /// Set by the handler when the guest broke the queue (the transport then shows
    /// DEVICE_NEEDS_RESET); cleared by a reset.
    broken: Arc<AtomicBool>,
    /// The queue's I/O engine, while no handler holds it.
    engine: EngineHome,
}

impl Block {
    /// A disk serving `stack` (whose top decides the capacity the guest sees), its queue's
    /// requests run by `engine`.
    pub fn new(
        id: &str,
        stack: Arc<LiveStack>,
        read_only: bool,
        engine: Box<dyn AsyncIo>,
    ) -> Block {
        Block {
            id: id.to_string(),
            capacity_sectors: stack.capacity() / request::SECTOR_SIZE,
            read_only,
            stack,
            queue_sizes: [QUEUE_SIZE],
            serving: None,
            broken: Arc::new(AtomicBool::new(false)),
            engine: Arc::new(Mutex::new(Some(engine))),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f =
            (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (le64) at 0, size_max (le32) at 8, seg_max (le32) at 12
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start < config.len() {
            let n = data.len().min(config.len() - start);
            data[..n].copy_from_slice(&config[start..start + n]);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        mut queues: Vec<Queue>,
        mut kicks: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.serving.is_some() {
            return Err(ActivateError("already activated".into()));
        }
        let (Some(queue), Some(kick)) = (queues.pop(), kicks.pop()) else {
            return Err(ActivateError("virtio-blk needs one queue".into()));
        };
        let Some(engine) = self.engine.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Err(ActivateError(
                "the queue's I/O engine is still in use".into(),
            ));
        };
        self.broken.store(false, Ordering::SeqCst);
        let worker = Worker::new(
            &self.id,
            mem,
            queue,
            kick,
            self.stack.clone(),
            self.capacity_sectors,
            interrupt,
            self.broken.clone(),
            engine,
            self.engine.clone(),
        );
        let id = self
            .stack
            .io_thread()
            .add(Box::new(worker))
            .map_err(|e| ActivateError(e.to_string()))?;
        self.serving = Some(id);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let Some(id) = self.serving.take() else {
            return true;
        };
        // When this returns every request the handler had in flight has completed and it
        // serves no more: the queue goes with it, its engine waits for the next activation.
        match self.stack.io_thread().remove(id) {
            Ok(_) => {
                self.broken.store(false, Ordering::SeqCst);
                true
            }
            Err(e) => {
                tracing::error!("blk-{}: cannot reset: {e}", self.id);
                false
            }
        }
    }

    fn needs_reset(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
}
