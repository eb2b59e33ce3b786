//! virtio-blk: a disk over the compat shim's stack (interceptors, then a backend driver).
//! Requests are served on the device's own thread, woken by the queue's ioeventfd; each
//! passes the stack's pre-processing point before the driver and its post-processing point
//! before the guest sees the status.

mod backend;
pub mod request;

pub use backend::RawFile;
pub use request::{BlockRequest, Refused, RequestError};

use super::{ActivateError, Interrupt, VirtioDevice};
use compat::{BlockRequestKind, LiveStack, RequestStatus, Segment};
use std::sync::Arc;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const QUEUE_SIZE: u16 = 256;
/// Segments per request we announce (VIRTIO_BLK_F_SEG_MAX).
const SEG_MAX: u32 = 128;

pub struct Block {
    id: String,
    stack: Option<Arc<LiveStack>>,
    capacity_sectors: u64,
    read_only: bool,
    queue_sizes: [u16; 1],
}

impl Block {
    /// A disk serving `stack` (whose top decides the capacity the guest sees).
    pub fn new(id: &str, stack: Arc<LiveStack>, read_only: bool) -> Block {
        Block {
            id: id.to_string(),
            capacity_sectors: stack.capacity() / request::SECTOR_SIZE,
            read_only,
            stack: Some(stack),
            queue_sizes: [QUEUE_SIZE],
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
        let start = offset as usize;
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
        let stack = self
            .stack
            .take()
            .ok_or_else(|| ActivateError("already activated".into()))?;
        let (Some(queue), Some(kick)) = (queues.pop(), kicks.pop()) else {
            return Err(ActivateError("virtio-blk needs one queue".into()));
        };
        let mut worker = Worker {
            id: self.id.clone(),
            mem,
            queue,
            stack,
            capacity_sectors: self.capacity_sectors,
            interrupt,
            failed: false,
        };
        std::thread::Builder::new()
            .name(format!("blk-{}", self.id))
            .spawn(move || worker.run(kick))
            .map(|_| ())
            .map_err(|e| ActivateError(format!("cannot start the device thread: {e}")))
    }
}

struct Worker {
    id: String,
    mem: GuestMemoryMmap,
    queue: Queue,
    stack: Arc<LiveStack>,
    capacity_sectors: u64,
    interrupt: Arc<Interrupt>,
    /// Set when the guest broke the queue itself; the device then stops serving.
    failed: bool,
}

fn status_byte(s: RequestStatus) -> u8 {
    (match s {
        RequestStatus::Ok => VIRTIO_BLK_S_OK,
        RequestStatus::IoError => VIRTIO_BLK_S_IOERR,
        RequestStatus::Unsupported => VIRTIO_BLK_S_UNSUPP,
    }) as u8
}

impl Worker {
    fn run(&mut self, kick: EventFd) {
        // A second handle to the same (shared) regions, taken once: chains borrow it while
        // `handle` borrows self mutably.
        let mem = self.mem.clone();
        loop {
            if kick.read().is_err() {
                tracing::error!("blk-{}: queue eventfd failed; device stops", self.id);
                return;
            }
            if !self.failed {
                self.process_queue(&mem);
            }
        }
    }

    /// Serves every available request, then signals the guest once if anything was used.
    pub fn process_queue(&mut self, mem: &GuestMemoryMmap) {
        let mut used_any = false;
        loop {
            if self.queue.disable_notification(&self.mem).is_err() {
                self.fail("cannot access the used ring");
                return;
            }
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let written = self.handle(chain);
                if self.queue.add_used(&self.mem, head, written).is_err() {
                    self.fail("cannot write the used ring");
                    return;
                }
                used_any = true;
            }
            match self.queue.enable_notification(&self.mem) {
                Ok(true) => continue, // more arrived while we were busy
                Ok(false) => break,
                Err(_) => {
                    self.fail("cannot access the avail ring");
                    return;
                }
            }
        }
        if used_any {
            self.interrupt.signal_used_queue();
        }
    }

    fn fail(&mut self, why: &str) {
        tracing::error!("blk-{}: {why}; device failed until reset", self.id);
        self.failed = true;
    }

    /// Serves one chain; returns the bytes written into guest buffers (status included).
    fn handle(&mut self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let req = match BlockRequest::parse(chain, &self.mem, self.capacity_sectors) {
            Ok(r) => r,
            Err(Refused { error, status_addr }) => {
                tracing::warn!("blk-{}: refused request: {error}", self.id);
                let status = match error {
                    RequestError::Unsupported(_) => RequestStatus::Unsupported,
                    _ => RequestStatus::IoError,
                };
                return match status_addr {
                    Some(addr) if self.mem.write_obj(status_byte(status), addr).is_ok() => 1,
                    _ => 0,
                };
            }
        };
        let status = self.submit(&req);
        let written = match (status, req.kind) {
            (RequestStatus::Ok, BlockRequestKind::Read) => req.data_len as u32,
            (RequestStatus::Ok, BlockRequestKind::GetId) => request::ID_BYTES,
            _ => 0,
        };
        if self
            .mem
            .write_obj(status_byte(status), req.status_addr)
            .is_err()
        {
            return 0;
        }
        written + 1
    }

    /// Hands a validated request to the stack, with guest buffers as host segments.
    fn submit(&self, req: &BlockRequest) -> RequestStatus {
        let mut segments = Vec::with_capacity(req.segments.len());
        for &(addr, len) in &req.segments {
            // GET_ID fills exactly the serial; the rest of its buffer is left alone.
            let len = match req.kind {
                BlockRequestKind::GetId => request::ID_BYTES,
                _ => len,
            } as usize;
            let Ok(slice) = self.mem.get_slice(addr, len) else {
                return RequestStatus::IoError;
            };
            segments.push(Segment {
                base: slice.ptr_guard_mut().as_ptr(),
                len,
            });
            if req.kind == BlockRequestKind::GetId {
                break;
            }
        }
        // SAFETY: every segment was checked to lie in guest memory, which stays mapped for
        // the VM's life; the request was checked against the capacity by `parse`.
        unsafe {
            self.stack
                .submit(req.kind, req.sector * request::SECTOR_SIZE, &segments)
        }
    }
}
