//! virtio-blk: a disk over the compat shim's stack (interceptors, then a backend).
//! Requests are served on the device's own thread, woken by the queue's ioeventfd; each
//! passes the stack's pre-processing point before the backend and its post-processing point
//! before the guest sees the status.

mod coalesce;
mod order;
pub mod request;
mod worker;

pub use super::queue_stats::QueueStats;
pub use block::RawFile;
pub use coalesce::MAX_COALESCE_US;
pub use request::{BlockRequest, Refused, RequestError};

use super::{ActivateError, Interrupt, VirtioDevice};
use block::AsyncIo;
use coalesce::QueueTimer;
use compat::event_manager::SubscriberId;
use compat::LiveStack;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::ByteValued;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use worker::{DiskOrder, EngineHome, Worker};

pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const QUEUE_SIZE: u16 = 256;
/// Most queues one disk offers (VIRTIO_BLK_F_MQ).
pub const MAX_QUEUES: u16 = 16;
/// Segments per request we announce (VIRTIO_BLK_F_SEG_MAX).
const SEG_MAX: u32 = 128;

pub struct Block {
    id: String,
    stack: Arc<LiveStack>,
    capacity_sectors: u64,
    read_only: bool,
    queue_sizes: Vec<u16>,
    /// The queues' handlers on the disk's I/O thread, while the device is active.
    serving: Vec<SubscriberId>,
    /// Set by the handler when the guest broke the queue (the transport then shows
    /// DEVICE_NEEDS_RESET); cleared by a reset.
    broken: Arc<AtomicBool>,
    /// Each queue's I/O engine, while no handler holds it.
    engines: Vec<EngineHome>,
    /// The logical block size the guest is told (VIRTIO_BLK_F_BLK_SIZE) when above 512.
    block_size: u32,
    /// Interrupt coalescing: the longest a completion waits for others of its queue, and
    /// each queue's timer (none while the delay is zero).
    coalesce: Duration,
    timers: Vec<QueueTimer>,
    /// Each queue's eventfd for requests back from the hook pool (`None`: not made; that
    /// queue runs every hook on the I/O thread).
    pool_ready: Vec<Option<Arc<EventFd>>>,
    /// Each queue's timer for its plugins' timers (ABI version 2), made with the device
    /// (before any seccomp filter); empty if the host would not make them.
    exec_timers: Vec<QueueTimer>,
    /// What each queue is doing, for the API.
    stats: Arc<QueueStats>,
}

/// The device's configuration space, as the virtio spec lays it out.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ConfigSpace(virtio_blk_config);

// SAFETY: a packed plain-data struct of integers: any bytes are a valid value.
unsafe impl ByteValued for ConfigSpace {}

impl Block {
    /// A disk serving `stack` (whose top decides the capacity the guest sees), with one
    /// queue per engine (each queue's requests run on its own engine; at least one, at most
    /// [`MAX_QUEUES`] are used). Every queue is served on the disk's I/O thread, so a
    /// disk's hooks never run concurrently.
    pub fn new(
        id: &str,
        stack: Arc<LiveStack>,
        read_only: bool,
        engines: Vec<Box<dyn AsyncIo>>,
    ) -> Block {
        let engines: Vec<EngineHome> = engines
            .into_iter()
            .take(usize::from(MAX_QUEUES))
            .map(|e| Arc::new(Mutex::new(Some(e))))
            .collect();
        let engines_len = engines.len();
        Block {
            id: id.to_string(),
            capacity_sectors: stack.capacity() / request::SECTOR_SIZE,
            read_only,
            stack,
            queue_sizes: vec![QUEUE_SIZE; engines.len()],
            serving: Vec::new(),
            broken: Arc::new(AtomicBool::new(false)),
            engines,
            block_size: 512,
            coalesce: Duration::ZERO,
            timers: Vec::new(),
            pool_ready: (0..engines_len).map(|_| worker::pool_eventfd()).collect(),
            exec_timers: coalesce::timers(engines_len).unwrap_or_else(|e| {
                tracing::warn!("blk-{id}: no timers for its plugins ({e}): they fire late");
                Vec::new()
            }),
            stats: Arc::default(),
        }
    }

    /// Publishes what each queue is doing into `stats` (shared with the API).
    pub fn with_queue_stats(mut self, stats: Arc<QueueStats>) -> Block {
        self.stats = stats;
        self
    }

    /// Lets a completion wait up to `delay` (at most [`MAX_COALESCE_US`]) for the other
    /// requests of its queue still at the engine, so that one interrupt tells the guest of
    /// several; a queue with nothing else in flight signals at once. Creates each queue's
    /// timer: call it before any seccomp filter forbids `timerfd_create`.
    pub fn with_interrupt_coalescing(mut self, delay: Duration) -> std::io::Result<Block> {
        let delay = delay.min(Duration::from_micros(u64::from(MAX_COALESCE_US)));
        if !delay.is_zero() {
            self.timers = coalesce::timers(self.engines.len())?;
        }
        self.coalesce = delay;
        Ok(self)
    }

    /// Tells the guest its logical block size is `bytes` (a power of two from 512 to 64
    /// KiB; an O_DIRECT image's alignment), so its requests line up.
    pub fn with_block_size(mut self, bytes: u32) -> Block {
        if bytes.is_power_of_two() && (512..=65536).contains(&bytes) {
            self.block_size = bytes;
        }
        self
    }
}

impl Block {
    /// Discard and write-zeroes are offered on a writable disk whose chain handles them.
    fn discard(&self) -> bool {
        !self.read_only && self.stack.handles_discard()
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
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.queue_sizes.len() > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        if self.discard() {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if self.block_size > 512 {
            f |= 1 << VIRTIO_BLK_F_BLK_SIZE;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = ConfigSpace(virtio_blk_config {
            capacity: self.capacity_sectors.to_le(),
            seg_max: SEG_MAX.to_le(),
            num_queues: (self.queue_sizes.len() as u16).to_le(),
            blk_size: self.block_size.to_le(),
            // One range per request; ranges aligned to 4 KiB blocks serve sparse images
            // best (a hole is punched in whole blocks).
            max_discard_sectors: request::MAX_DISCARD_SECTORS.to_le(),
            max_discard_seg: 1u32.to_le(),
            discard_sector_alignment: (self.block_size.max(4096) / 512).to_le(),
            max_write_zeroes_sectors: request::MAX_WRITE_ZEROES_SECTORS.to_le(),
            max_write_zeroes_seg: 1u32.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        });
        super::read_config_space(config.as_slice(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if !self.serving.is_empty() {
            return Err(ActivateError("already activated".into()));
        }
        // The driver may use fewer queues than offered (the first ones).
        if queues.is_empty() || queues.len() > self.engines.len() || kicks.len() != queues.len() {
            return Err(ActivateError(format!(
                "virtio-blk has {} queues, got {} (and {} kicks)",
                self.engines.len(),
                queues.len(),
                kicks.len()
            )));
        }
        let event_idx = acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let wakes: Result<Vec<EventFd>, _> = kicks.iter().map(|k| k.try_clone()).collect();
        let wakes = wakes.map_err(|e| ActivateError(format!("cloning a queue's kick: {e}")))?;
        let order = Arc::new(DiskOrder::new(wakes));
        self.broken.store(false, Ordering::SeqCst);
        self.stats.set_active(queues.len());
        for (q, (mut queue, kick)) in queues.into_iter().zip(kicks).enumerate() {
            let home = self.engines[q].clone();
            let taken = home.lock().unwrap_or_else(|p| p.into_inner()).take();
            let Some(engine) = taken else {
                self.reset();
                return Err(ActivateError(format!("queue {q}'s I/O engine is in use")));
            };
            queue.set_event_idx(event_idx);
            let worker = Worker::new(
                &self.id,
                mem.clone(),
                queue,
                kick,
                self.stack.clone(),
                self.capacity_sectors,
                interrupt.clone(),
                self.broken.clone(),
                engine,
                home,
            )
            .with_discard(self.discard())
            .in_disk(order.clone(), q)
            .with_stats(self.stats.clone())
            .with_hook_pool(self.pool_ready.get(q).cloned().flatten())
            .with_exec_timer(self.exec_timers.get(q).cloned());
            let worker = match self.timers.get(q) {
                Some(t) => worker.with_coalescing(t.clone(), self.coalesce),
                None => worker,
            };
            match self.stack.io_thread().add(Box::new(worker)) {
                Ok(id) => self.serving.push(id),
                Err(e) => {
                    self.reset();
                    return Err(ActivateError(e.to_string()));
                }
            }
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let mut ok = true;
        for id in std::mem::take(&mut self.serving) {
            // When this returns every request the handler had in flight has completed and
            // it serves no more: the queue goes with it, and its engine waits at home for
            // the next activation.
            if let Err(e) = self.stack.io_thread().remove(id) {
                tracing::error!("blk-{}: cannot reset: {e}", self.id);
                ok = false;
            }
        }
        if ok {
            self.broken.store(false, Ordering::SeqCst);
        }
        ok
    }
    fn needs_reset(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::worker::tests::{post_write, rig};
    use super::*;
    use virtio_queue::mock::MockSplitQueue;

    /// Two queues, each with its own engine, served at once on the disk's I/O thread: a
    /// write on each lands, each queue's used ring gets its own, and the config space and
    /// features say two queues.
    #[test]
    fn two_queues_serve_at_once() {
        let r = rig("two-queues");
        let engines: Vec<Box<dyn AsyncIo>> = (0..2)
            .map(|_| Box::new(block::SyncEngine::new(r.stack.backend()).unwrap()) as _)
            .collect();
        let mut dev = Block::new("vdt", r.stack.clone(), false, engines);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_MQ), 0);
        let mut nq = [0u8; 2];
        dev.read_config(34, &mut nq);
        assert_eq!(u16::from_le_bytes(nq), 2, "num_queues in the config space");
        // Two rings in different parts of guest memory.
        let q0 = MockSplitQueue::create(&r.mem, vm_memory::GuestAddress(0x8_0000), 16);
        let q1 = MockSplitQueue::create(&r.mem, vm_memory::GuestAddress(0xa_0000), 16);
        post_write(&r, &q0, 0, 8, 0x61);
        post_write(&r, &q1, 4, 16, 0x62);
        let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
        let queues = vec![q0.create_queue().unwrap(), q1.create_queue().unwrap()];
        dev.activate(
            r.mem.clone(),
            1 << VIRTIO_RING_F_EVENT_IDX,
            queues,
            kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
        )
        .unwrap();
        for k in &kicks {
            k.write(1).unwrap();
        }
        let t0 = std::time::Instant::now();
        while q0.used().idx().load() < 1 || q1.used().idx().load() < 1 {
            assert!(t0.elapsed().as_secs() < 10, "both queues should complete");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(dev.reset());
        let disk = std::fs::read(&r.file).unwrap();
        assert!(disk[8 * 512..9 * 512].iter().all(|&b| b == 0x61));
        assert!(disk[16 * 512..17 * 512].iter().all(|&b| b == 0x62));
    }

    /// A driver that sets up fewer queues than offered (Linux: one per CPU at most) gets
    /// those served.
    #[test]
    fn a_driver_may_use_fewer_queues_than_offered() {
        let r = rig("fewer-queues");
        let engines: Vec<Box<dyn AsyncIo>> = (0..4)
            .map(|_| Box::new(block::SyncEngine::new(r.stack.backend()).unwrap()) as _)
            .collect();
        let mut dev = Block::new("vdt", r.stack.clone(), false, engines);
        let q0 = MockSplitQueue::create(&r.mem, vm_memory::GuestAddress(0x8_0000), 16);
        post_write(&r, &q0, 0, 8, 0x63);
        let kick = EventFd::new(0).unwrap();
        dev.activate(
            r.mem.clone(),
            0,
            vec![q0.create_queue().unwrap()],
            vec![kick.try_clone().unwrap()],
            Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
        )
        .unwrap();
        kick.write(1).unwrap();
        let t0 = std::time::Instant::now();
        while q0.used().idx().load() < 1 {
            assert!(t0.elapsed().as_secs() < 10, "the one queue should complete");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(dev.reset());
        let disk = std::fs::read(&r.file).unwrap();
        assert!(disk[8 * 512..9 * 512].iter().all(|&b| b == 0x63));
    }
}
