//! The queue's handler: an event-manager subscriber on the disk's I/O thread, woken by the
//! queue's ioeventfd. It pops each chain, validates it (`request.rs`), hands it to the
//! disk's stack and completes it. A guest that breaks the queue itself (a ring index that
//! runs ahead of the ring, a ring outside its memory) gets DEVICE_NEEDS_RESET and nothing
//! more is served until its driver resets the device.

use super::request::{self, BlockRequest, Refused, RequestError};
use crate::logger::LogLimiter;
use crate::virtio::Interrupt;
use compat::event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use compat::{BlockRequestKind, IoSubscriber, LiveStack, RequestStatus, Segment};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Lines a guest can cause: a few per window, then a count of the ones left out.
static REFUSED_LOG: LogLimiter = LogLimiter::with_defaults();
static BROKEN_LOG: LogLimiter = LogLimiter::with_defaults();

pub(super) struct Worker {
    id: String,
    mem: GuestMemoryMmap,
    queue: Queue,
    kick: EventFd,
    stack: Arc<LiveStack>,
    capacity_sectors: u64,
    interrupt: Arc<Interrupt>,
    broken: Arc<AtomicBool>,
}

fn status_byte(s: RequestStatus) -> u8 {
    (match s {
        RequestStatus::Ok => VIRTIO_BLK_S_OK,
        RequestStatus::IoError => VIRTIO_BLK_S_IOERR,
        RequestStatus::Unsupported => VIRTIO_BLK_S_UNSUPP,
    }) as u8
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        id: &str,
        mem: GuestMemoryMmap,
        queue: Queue,
        kick: EventFd,
        stack: Arc<LiveStack>,
        capacity_sectors: u64,
        interrupt: Arc<Interrupt>,
        broken: Arc<AtomicBool>,
    ) -> Worker {
        Worker {
            id: id.to_string(),
            mem,
            queue,
            kick,
            stack,
            capacity_sectors,
            interrupt,
            broken,
        }
    }

    /// Serves the available requests, then signals the guest once if anything was used.
    /// At most a few queues' worth per call: past that, the handler kicks itself and
    /// returns, so a guest that keeps its queue full still lets the I/O thread's other work
    /// (chain edits, a reset, the shutdown) run between batches.
    pub(super) fn process_queue(&mut self) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        // A second handle to the same (shared) regions: chains borrow it while `handle`
        // borrows self mutably.
        let mem = self.mem.clone();
        let budget = usize::from(self.queue.size()).saturating_mul(4).max(1);
        let (mut served, mut empty_passes) = (0usize, 0u32);
        loop {
            if self.queue.disable_notification(&mem).is_err() {
                return self.fail("cannot access the used ring");
            }
            let before = served;
            while served < budget {
                // `iter` (unlike `pop_descriptor_chain`) reports an avail index that runs
                // more than a queue ahead of the device instead of yielding nothing forever.
                let chain = match self.queue.iter(&mem) {
                    Ok(mut chains) => chains.next(),
                    Err(e) => return self.fail(&format!("the avail ring is invalid ({e})")),
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let written = self.handle(chain);
                if self.queue.add_used(&mem, head, written).is_err() {
                    return self.fail("cannot write the used ring");
                }
                served += 1;
            }
            if served >= budget {
                // More may be waiting: come back after the loop's other events.
                let _ = self.kick.write(1);
                break;
            }
            empty_passes = if served > before { 0 } else { empty_passes + 1 };
            match self.queue.enable_notification(&mem) {
                // More arrived while we were busy: go on. Once, a pass may find nothing (the
                // guest published a chain just as notifications came back on); twice in a
                // row while the ring says there is more means the guest laid its rings over
                // each other (our own used-ring writes move its avail index).
                Ok(true) if empty_passes < 2 => continue,
                Ok(true) => return self.fail("the avail index moves under the used ring"),
                Ok(false) => break,
                Err(_) => return self.fail("cannot access the avail ring"),
            }
        }
        if served > 0 {
            self.interrupt.signal_used_queue();
        }
    }

    /// The guest broke the queue: DEVICE_NEEDS_RESET, and a config interrupt to say so.
    fn fail(&mut self, why: &str) {
        crate::limited_error!(
            BROKEN_LOG,
            "blk-{}: {why}; the device needs a reset",
            self.id
        );
        self.stack
            .counters()
            .refused
            .fetch_add(1, Ordering::Relaxed);
        self.broken.store(true, Ordering::SeqCst);
        self.interrupt.signal_config_change();
    }

    /// Serves one chain; returns the bytes written into guest buffers (status included).
    fn handle(&mut self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let req = match BlockRequest::parse(chain, &self.mem, self.capacity_sectors) {
            Ok(r) => r,
            Err(Refused { error, status_addr }) => {
                self.stack
                    .counters()
                    .refused
                    .fetch_add(1, Ordering::Relaxed);
                crate::limited_warn!(REFUSED_LOG, "blk-{}: refused request: {error}", self.id);
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
        if self
            .mem
            .write_obj(status_byte(status), req.status_addr)
            .is_err()
        {
            return 0;
        }
        req.used_len(status)
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
        // the VM's life; the request was checked against the capacity by `parse`, which
        // also computed its byte offset with checked arithmetic.
        unsafe { self.stack.submit(req.kind, req.offset, &segments) }
    }
}

impl MutEventSubscriber for Worker {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if !events.event_set().contains(EventSet::IN) {
            tracing::error!("blk-{}: queue eventfd failed; the device stops", self.id);
            let _ = ops.remove(Events::new(&self.kick, EventSet::IN));
            return;
        }
        // Reading the count resets it; a failed read (nothing pending) is harmless.
        let _ = self.kick.read();
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.kick, EventSet::IN)) {
            tracing::error!("blk-{}: cannot watch the queue eventfd: {e}", self.id);
        }
    }
}

impl IoSubscriber for Worker {
    fn drain(&mut self) {
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::RawFile;
    use crate::virtio::INTERRUPT_CONFIG;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    struct Rig {
        mem: GuestMemoryMmap,
        file: std::path::PathBuf,
        broken: Arc<AtomicBool>,
        interrupt: Arc<Interrupt>,
        stack: Arc<LiveStack>,
    }

    fn rig(tag: &str) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let file = std::env::temp_dir().join(format!("worker-{tag}-{}", std::process::id()));
        std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        let driver = Arc::new(RawFile::new(f, false, "vdt").unwrap());
        let stack = Arc::new(LiveStack::start("vdt", driver, &[], None).unwrap());
        Rig {
            mem,
            file,
            broken: Arc::new(AtomicBool::new(false)),
            interrupt: Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
            stack,
        }
    }

    impl Rig {
        fn worker(&self, queue: Queue) -> Worker {
            Worker::new(
                "vdt",
                self.mem.clone(),
                queue,
                EventFd::new(0).unwrap(),
                self.stack.clone(),
                2048,
                self.interrupt.clone(),
                self.broken.clone(),
            )
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.file);
        }
    }

    /// A guest that moves avail.idx more than a queue ahead used to make the device spin
    /// forever (nothing to pop, yet "more work" on every re-enable). Now the queue is
    /// broken: DEVICE_NEEDS_RESET, a config interrupt, nothing served, and it returns.
    #[test]
    fn an_avail_index_a_queue_ahead_breaks_the_queue_instead_of_spinning() {
        let r = rig("ahead");
        let mq = MockSplitQueue::new(&r.mem, 16);
        mq.avail().idx().store(100);
        let mut w = r.worker(mq.create_queue().unwrap());
        w.process_queue();
        assert!(r.broken.load(Ordering::SeqCst));
        assert_ne!(r.interrupt.status() & INTERRUPT_CONFIG, 0);
        assert_eq!(r.stack.counters().refused.load(Ordering::SeqCst), 1);
        // Kicks after that serve nothing until a reset.
        w.process_queue();
        assert_eq!(r.stack.counters().requests.load(Ordering::SeqCst), 0);
    }

    /// A write through the queue reaches the disk through the stack, status byte and used
    /// ring included.
    #[test]
    fn a_write_through_the_queue_reaches_the_disk() {
        let r = rig("write");
        let mq = MockSplitQueue::new(&r.mem, 16);
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
        hdr[8..].copy_from_slice(&3u64.to_le_bytes()); // sector 3
        r.mem.write_slice(&hdr, GuestAddress(0x2_0000)).unwrap();
        r.mem
            .write_slice(&[0xab; 512], GuestAddress(0x3_0000))
            .unwrap();
        r.mem.write_obj(0xffu8, GuestAddress(0x4_0000)).unwrap();
        for (i, (addr, len, flags, next)) in [
            (0x2_0000u64, 16u32, NEXT, 1u16),
            (0x3_0000, 512, NEXT, 2),
            (0x4_0000, 1, WRITE, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let d = SplitDescriptor::new(addr, len, flags, next);
            mq.desc_table()
                .store(i as u16, RawDescriptor::from(d))
                .unwrap();
        }
        mq.avail().ring().ref_at(0).unwrap().store(0);
        mq.avail().idx().store(1);
        let mut w = r.worker(mq.create_queue().unwrap());
        w.process_queue();
        assert!(!r.broken.load(Ordering::SeqCst));
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(0x4_0000)).unwrap(), 0);
        assert_eq!(mq.used().idx().load(), 1);
        let disk = std::fs::read(&r.file).unwrap();
        assert!(disk[3 * 512..4 * 512].iter().all(|&b| b == 0xab));
        assert!(disk[..3 * 512].iter().all(|&b| b == 0));
    }
}
