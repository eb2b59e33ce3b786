//! The queue's handler: an event-manager subscriber on the disk's I/O thread, woken by the
//! queue's ioeventfd and by its I/O engine's completion eventfd. It pops each chain,
//! validates it (`request.rs`), starts it on the disk's stack (the pre hooks run) and hands
//! it to the engine; up to the queue's size are in flight at once, and each completes (post
//! hooks, status, used ring) when the engine says so, in whatever order. Through
//! interceptors, requests on the same blocks are ordered (`order.rs`). A guest that breaks
//! the queue itself (a ring index that runs ahead of the ring, a ring outside its memory)
//! gets DEVICE_NEEDS_RESET and nothing more is served until its driver resets the device.

use super::order::Footprint;
use super::request::{self, BlockRequest, Refused, RequestError};
use crate::logger::LogLimiter;
use crate::virtio::Interrupt;
use block::AsyncIo;
use compat::event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use compat::{
    BlockRequestKind, InFlight, IoSubscriber, LiveStack, RequestStatus, Segment, Started,
};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Lines a guest can cause: a few per window, then a count of the ones left out.
static REFUSED_LOG: LogLimiter = LogLimiter::with_defaults();
static BROKEN_LOG: LogLimiter = LogLimiter::with_defaults();

/// The event-manager data of the two eventfds.
const KICK: u32 = 0;
const COMPLETION: u32 = 1;

/// Where a queue's engine waits while the device is not active (between a reset and the
/// next activation): the engine outlives its handler.
pub(super) type EngineHome = Arc<Mutex<Option<Box<dyn AsyncIo>>>>;

/// What the queues of one disk share to order their requests (`order.rs`): the footprints
/// of every request in flight on any of them, and each queue's kick, to wake a queue whose
/// held request waited for another queue's. All the queues run on the disk's I/O thread, so
/// the lock is never contended.
#[derive(Default)]
pub(super) struct DiskOrder {
    /// (queue, token, footprint) of each request in flight through the chain.
    in_flight: Mutex<Vec<(usize, usize, Footprint)>>,
    kicks: Vec<EventFd>,
}

impl DiskOrder {
    /// The order of a disk whose queues are kicked by `kicks` (clones of them).
    pub(super) fn new(kicks: Vec<EventFd>) -> DiskOrder {
        DiskOrder {
            in_flight: Mutex::default(),
            kicks,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(usize, usize, Footprint)>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conflicts(&self, fp: Footprint) -> bool {
        self.lock().iter().any(|&(_, _, o)| fp.conflicts(o))
    }
}

/// A request between its start and its completion.
struct Pending {
    head: u16,
    req: BlockRequest,
    /// Its blocks, when the disk orders requests (it has interceptors).
    footprint: Option<Footprint>,
    /// At the engine; `None` while held back behind an overlapping request.
    at_engine: Option<InFlight>,
}

pub(super) struct Worker {
    id: String,
    mem: GuestMemoryMmap,
    queue: Queue,
    kick: EventFd,
    stack: Arc<LiveStack>,
    capacity_sectors: u64,
    interrupt: Arc<Interrupt>,
    broken: Arc<AtomicBool>,
    serial: [u8; request::ID_BYTES as usize],
    /// The device offers discard and write-zeroes.
    discard: bool,
    /// `Some` for the handler's whole life; handed back to `home` when it goes.
    engine: Option<Box<dyn AsyncIo>>,
    home: EngineHome,
    /// Requests at the engine, by token (the index).
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Requests held back, oldest first, behind an overlapping one (see `order.rs`).
    held: VecDeque<Pending>,
    /// Shared with the disk's other queues; `queue` is this one's index.
    order: Arc<DiskOrder>,
    queue_index: usize,
    /// Used-ring entries added since the guest was last signalled.
    unsignalled: bool,
}

fn status_byte(s: RequestStatus) -> u8 {
    (match s {
        RequestStatus::Ok => VIRTIO_BLK_S_OK,
        RequestStatus::IoError => VIRTIO_BLK_S_IOERR,
        RequestStatus::Unsupported => VIRTIO_BLK_S_UNSUPP,
    }) as u8
}

/// The serial a GET_ID returns: the disk's id, NUL-padded (cut at 20 bytes).
pub(super) fn serial_of(id: &str) -> [u8; request::ID_BYTES as usize] {
    let mut serial = [0u8; request::ID_BYTES as usize];
    let n = id.len().min(serial.len());
    serial[..n].copy_from_slice(&id.as_bytes()[..n]);
    serial
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
        engine: Box<dyn AsyncIo>,
        home: EngineHome,
    ) -> Worker {
        let depth = usize::from(queue.size());
        Worker {
            id: id.to_string(),
            mem,
            queue,
            kick,
            stack,
            capacity_sectors,
            interrupt,
            broken,
            serial: serial_of(id),
            discard: false,
            engine: Some(engine),
            home,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            held: VecDeque::new(),
            order: Arc::default(),
            queue_index: 0,
            unsignalled: false,
        }
    }

    /// Queue `index` of a disk whose queues share `order`.
    pub(super) fn in_disk(mut self, order: Arc<DiskOrder>, index: usize) -> Worker {
        self.order = order;
        self.queue_index = index;
        self
    }

    /// Serves discard and write-zeroes (the device offered them).
    pub(super) fn with_discard(mut self, discard: bool) -> Worker {
        self.discard = discard;
        self
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Starts the available requests, then signals the guest once if anything was used.
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
                self.handle(chain);
                if self.broken.load(Ordering::SeqCst) {
                    return;
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
        // Hands the batch to the engine; what already finished (all of it, on the
        // synchronous engine) completes now rather than one loop turn later.
        self.engine_mut().commit();
        self.collect();
    }

    fn engine_mut(&mut self) -> &mut dyn AsyncIo {
        // `engine` is `Some` from `new` until `drop`.
        match self.engine.as_deref_mut() {
            Some(e) => e,
            None => unreachable!("a queue handler without its engine"),
        }
    }

    /// Signals the guest if it used entries since the last signal and, with
    /// VIRTIO_RING_F_EVENT_IDX, if it asked to hear about them (its used_event).
    fn signal(&mut self) {
        if !std::mem::take(&mut self.unsignalled) {
            return;
        }
        match self.queue.needs_notification(&self.mem) {
            Ok(false) => {}
            // An unreadable used_event signals: a lost interrupt would hang the guest.
            Ok(true) | Err(_) => self.interrupt.signal_used_queue(),
        }
    }

    /// Completes what the engine has finished, then starts held requests that no longer
    /// wait for anything.
    fn collect(&mut self) {
        let mut released = false;
        while let Some((token, backend)) = self.engine_mut().next_completion() {
            let Some(p) = usize::try_from(token)
                .ok()
                .and_then(|i| self.slots.get_mut(i))
                .and_then(Option::take)
            else {
                tracing::error!(
                    "blk-{}: the engine completed unknown token {token}",
                    self.id
                );
                continue;
            };
            self.free.push(token as usize);
            if p.footprint.is_some() {
                let (q, t) = (self.queue_index, token as usize);
                self.order.lock().retain(|&(oq, ot, _)| (oq, ot) != (q, t));
                released = true;
            }
            let status = match p.at_engine {
                Some(f) => self.stack.complete(f, backend),
                None => backend,
            };
            self.used(p.head, &p.req, status);
        }
        self.start_held();
        self.engine_mut().commit();
        self.signal();
        if released && self.order.kicks.len() > 1 {
            // Another queue's held request may have waited for one of these.
            for (q, kick) in self.order.kicks.iter().enumerate() {
                if q != self.queue_index {
                    let _ = kick.write(1);
                }
            }
        }
    }

    /// Starts the held requests, oldest first, that overlap nothing in flight or held
    /// before them.
    fn start_held(&mut self) {
        let mut k = 0;
        while k < self.held.len() {
            let fp = self.held[k].footprint;
            let blocked = fp.is_some_and(|fp| {
                self.held
                    .iter()
                    .take(k)
                    .any(|h| h.footprint.is_some_and(|o| fp.conflicts(o)))
                    || self.conflicts_in_flight(fp)
            });
            if blocked {
                k += 1;
                continue;
            }
            if let Some(p) = self.held.remove(k) {
                self.start(p);
            }
        }
    }

    /// Does `fp` overlap a request in flight on any queue of the disk?
    fn conflicts_in_flight(&self, fp: Footprint) -> bool {
        self.order.conflicts(fp)
    }

    /// See [`IoSubscriber::quiesce_step`].
    fn step(&mut self) -> bool {
        self.collect();
        if self.engine_mut().in_flight() > 0 {
            self.engine_mut().wait();
            self.collect();
        }
        self.in_flight() == 0 && self.held.is_empty()
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

    /// Writes `status` and puts `head` in the used ring (unless the guest broke the queue).
    fn used(&mut self, head: u16, req: &BlockRequest, status: RequestStatus) {
        let written = if self
            .mem
            .write_obj(status_byte(status), req.status_addr)
            .is_ok()
        {
            req.used_len(status)
        } else {
            0
        };
        self.add_used(head, written);
    }

    fn add_used(&mut self, head: u16, written: u32) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        if self.queue.add_used(&self.mem, head, written).is_err() {
            return self.fail("cannot write the used ring");
        }
        self.unsignalled = true;
    }

    /// Takes one chain: refused, answered here (GET_ID), or started.
    fn handle(&mut self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) {
        let head = chain.head_index();
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
                let written = match status_addr {
                    Some(addr) if self.mem.write_obj(status_byte(status), addr).is_ok() => 1,
                    _ => 0,
                };
                return self.add_used(head, written);
            }
        };
        if req.kind == BlockRequestKind::GetId {
            // The device's own serial: no interceptor or backend is asked.
            let status = match req.segments.first() {
                Some(&(addr, _)) if self.mem.write_slice(&self.serial, addr).is_ok() => {
                    RequestStatus::Ok
                }
                _ => RequestStatus::IoError,
            };
            return self.used(head, &req, status);
        }
        let ranged = matches!(
            req.kind,
            BlockRequestKind::Discard | BlockRequestKind::WriteZeroes
        );
        if ranged && !self.discard {
            // Not offered (a feature the guest did not negotiate): the spec's answer.
            return self.used(head, &req, RequestStatus::Unsupported);
        }
        let footprint = self.stack.intercepts().then(|| match req.kind {
            BlockRequestKind::Flush => Footprint::All,
            kind => Footprint::of(kind.writes(), req.offset, req.io_len),
        });
        let p = Pending {
            head,
            req,
            footprint,
            at_engine: None,
        };
        let wait = footprint.is_some_and(|fp| {
            self.held
                .iter()
                .any(|h| h.footprint.is_some_and(|o| fp.conflicts(o)))
                || self.conflicts_in_flight(fp)
        });
        if wait {
            self.held.push_back(p);
        } else {
            self.start(p);
        }
    }

    /// Runs the pre hooks and hands the request to the engine (or completes it, when the
    /// chain answered it).
    fn start(&mut self, mut p: Pending) {
        let Some(segments) = self.segments(&p.req) else {
            return self.used(p.head, &p.req, RequestStatus::IoError);
        };
        // SAFETY: every segment was checked to lie in guest memory, which stays mapped for
        // the VM's life; the request was checked against the capacity by `parse`, which
        // also computed its byte offset with checked arithmetic. The request finishes
        // before the handler goes (`settle` on reset and drop).
        let (kind, offset, len) = (p.req.kind, p.req.offset, p.req.io_len);
        let started = unsafe { self.stack.begin(kind, offset, len, segments) };
        let inflight = match started {
            Started::Done(status) => return self.used(p.head, &p.req, status),
            Started::Backend(f) => f,
        };
        let Some(token) = self.free.pop() else {
            // More in flight than the queue holds cannot happen (each is a distinct head);
            // fail it rather than overwrite a slot.
            let status = self.stack.complete(inflight, RequestStatus::IoError);
            return self.used(p.head, &p.req, status);
        };
        let engine = match self.engine.as_deref_mut() {
            Some(e) => e,
            None => unreachable!("a queue handler without its engine"),
        };
        // SAFETY: the buffers are guest memory or the request's private copy, both valid
        // until the request is finished, which happens only after the engine returns the
        // token (`collect`).
        unsafe { engine.submit(&inflight.io(), token as u64) };
        if let Some(fp) = p.footprint {
            self.order.lock().push((self.queue_index, token, fp));
        }
        p.at_engine = Some(inflight);
        self.slots[token] = Some(p);
    }

    /// The request's guest buffers as host segments (none for a discard or write-zeroes,
    /// whose buffers only describe the range).
    fn segments(&self, req: &BlockRequest) -> Option<Vec<Segment>> {
        if !req.kind.has_data() {
            return Some(Vec::new());
        }
        let mut segments = Vec::with_capacity(req.segments.len());
        for &(addr, len) in &req.segments {
            let slice = self.mem.get_slice(addr, len as usize).ok()?;
            segments.push(Segment {
                base: slice.ptr_guard_mut().as_ptr(),
                len: len as usize,
            });
        }
        Some(segments)
    }
}

impl MutEventSubscriber for Worker {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let which = events.data();
        if !events.event_set().contains(EventSet::IN) {
            tracing::error!(
                "blk-{}: an eventfd of the queue failed; the device stops",
                self.id
            );
            let _ = ops.remove(Events::with_data(&self.kick, KICK, EventSet::IN));
            if let Some(e) = self.engine.as_deref() {
                let _ = ops.remove(Events::with_data(e.notifier(), COMPLETION, EventSet::IN));
            }
            return;
        }
        if which == COMPLETION {
            // Reading the count resets it; a failed read (nothing pending) is harmless.
            let _ = self.engine_mut().notifier().read();
            self.collect();
        } else {
            let _ = self.kick.read();
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.kick, KICK, EventSet::IN)) {
            tracing::error!("blk-{}: cannot watch the queue eventfd: {e}", self.id);
        }
        if let Some(engine) = self.engine.as_deref() {
            let completions = Events::with_data(engine.notifier(), COMPLETION, EventSet::IN);
            if let Err(e) = ops.add(completions) {
                tracing::error!("blk-{}: cannot watch the engine's eventfd: {e}", self.id);
            }
        }
    }
}

impl IoSubscriber for Worker {
    fn drain(&mut self) {
        self.process_queue();
    }

    fn quiesce_step(&mut self) -> bool {
        self.step()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The kernel may still be writing into guest memory for a request in flight. (The
        // I/O thread quiesced before this handler left it; held requests, if any, never
        // started and hold nothing.)
        while self.engine.is_some() && self.engine_mut().in_flight() > 0 {
            self.engine_mut().wait();
            self.collect();
        }
        if let Some(engine) = self.engine.take() {
            *self.home.lock().unwrap_or_else(|p| p.into_inner()) = Some(engine);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::virtio::block::RawFile;
    use crate::virtio::INTERRUPT_CONFIG;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    pub(in crate::virtio::block) struct Rig {
        pub(in crate::virtio::block) mem: GuestMemoryMmap,
        pub(in crate::virtio::block) file: std::path::PathBuf,
        broken: Arc<AtomicBool>,
        interrupt: Arc<Interrupt>,
        pub(in crate::virtio::block) stack: Arc<LiveStack>,
    }

    pub(in crate::virtio::block) fn rig(tag: &str) -> Rig {
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
                Box::new(block::SyncEngine::new(self.stack.backend()).unwrap()),
                Arc::default(),
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

    /// An engine that runs each request on the backend at once but reports it done only
    /// when the test says, newest first; `wait` releases everything (the kernel finishing).
    #[derive(Clone, Default)]
    struct Held(Arc<Mutex<HeldState>>);

    #[derive(Default)]
    struct HeldState {
        done: Vec<(u64, RequestStatus)>,
        released: Vec<(u64, RequestStatus)>,
    }

    struct HeldEngine {
        held: Held,
        backend: Arc<dyn compat::BlockBackend>,
        notifier: EventFd,
    }

    impl Held {
        fn release_newest_first(&self) {
            let mut s = self.0.lock().unwrap();
            while let Some(d) = s.done.pop() {
                s.released.push(d);
            }
        }
    }

    impl AsyncIo for HeldEngine {
        fn notifier(&self) -> &EventFd {
            &self.notifier
        }
        unsafe fn submit(&mut self, req: &compat::IoRequest<'_>, token: u64) {
            let status = self.backend.execute(req);
            self.held.0.lock().unwrap().done.push((token, status));
        }
        fn commit(&mut self) {}
        fn next_completion(&mut self) -> Option<(u64, RequestStatus)> {
            let mut s = self.held.0.lock().unwrap();
            if s.released.is_empty() {
                None
            } else {
                Some(s.released.remove(0))
            }
        }
        fn wait(&mut self) {
            self.held.release_newest_first();
        }
        fn in_flight(&self) -> usize {
            let s = self.held.0.lock().unwrap();
            s.done.len() + s.released.len()
        }
        fn name(&self) -> &'static str {
            "held"
        }
    }

    /// Puts a one-sector write of `byte` at `sector` in the avail ring at `slot`.
    pub(in crate::virtio::block) fn post_write(
        r: &Rig,
        mq: &MockSplitQueue<GuestMemoryMmap>,
        slot: u16,
        sector: u64,
        byte: u8,
    ) {
        post_write_in(r, mq, slot, slot, sector, byte)
    }

    /// As `post_write`, with its buffers in guest memory area `area` (so two queues' first
    /// requests do not share buffers).
    fn post_write_in(
        r: &Rig,
        mq: &MockSplitQueue<GuestMemoryMmap>,
        slot: u16,
        area: u16,
        sector: u64,
        byte: u8,
    ) {
        let base = 0x2_0000 + u64::from(area) * 0x1000;
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        r.mem.write_slice(&hdr, GuestAddress(base)).unwrap();
        r.mem
            .write_slice(&[byte; 512], GuestAddress(base + 0x100))
            .unwrap();
        r.mem.write_obj(0xffu8, GuestAddress(base + 0x400)).unwrap();
        let first = slot * 3;
        for (i, (addr, len, flags)) in [
            (base, 16u32, NEXT),
            (base + 0x100, 512, NEXT),
            (base + 0x400, 1, WRITE),
        ]
        .into_iter()
        .enumerate()
        {
            let at = first + i as u16;
            let d = SplitDescriptor::new(addr, len, flags, at + 1);
            mq.desc_table().store(at, RawDescriptor::from(d)).unwrap();
        }
        mq.avail()
            .ring()
            .ref_at(usize::from(slot))
            .unwrap()
            .store(first);
        mq.avail().idx().store(slot + 1);
    }

    fn held_worker(r: &Rig, queue: Queue, held: &Held, home: EngineHome) -> Worker {
        held_worker_kicked(r, queue, held, home, EventFd::new(0).unwrap())
    }

    fn held_worker_kicked(
        r: &Rig,
        queue: Queue,
        held: &Held,
        home: EngineHome,
        kick: EventFd,
    ) -> Worker {
        let engine = HeldEngine {
            held: held.clone(),
            backend: r.stack.backend(),
            notifier: EventFd::new(0).unwrap(),
        };
        Worker::new(
            "vdt",
            r.mem.clone(),
            queue,
            kick,
            r.stack.clone(),
            2048,
            r.interrupt.clone(),
            r.broken.clone(),
            Box::new(engine),
            home,
        )
    }

    /// Three writes in flight complete newest first: the used ring lists them in that
    /// order, each with its status, and the guest is signalled once they are used.
    #[test]
    fn completions_return_out_of_order() {
        let r = rig("reverse");
        let mq = MockSplitQueue::new(&r.mem, 16);
        for slot in 0..3u16 {
            post_write(&r, &mq, slot, u64::from(slot) * 8, 0xa0 + slot as u8);
        }
        let held = Held::default();
        let mut w = held_worker(&r, mq.create_queue().unwrap(), &held, Arc::default());
        w.process_queue();
        assert_eq!(
            mq.used().idx().load(),
            0,
            "nothing is used before it completes"
        );
        assert_eq!(w.in_flight(), 3);
        held.release_newest_first();
        w.collect();
        assert_eq!(mq.used().idx().load(), 3);
        let heads: Vec<u32> = (0..3)
            .map(|i| mq.used().ring().ref_at(i).unwrap().load().id())
            .collect();
        assert_eq!(heads, vec![6, 3, 0]);
        for slot in 0..3u64 {
            let status = r.mem.read_obj::<u8>(GuestAddress(0x2_0400 + slot * 0x1000));
            assert_eq!(status.unwrap(), 0, "slot {slot}");
        }
        let disk = std::fs::read(&r.file).unwrap();
        for slot in 0..3usize {
            let at = slot * 8 * 512;
            assert!(disk[at..at + 512].iter().all(|&b| b == 0xa0 + slot as u8));
        }
        assert_ne!(r.interrupt.status() & crate::virtio::INTERRUPT_USED_RING, 0);
    }

    /// A reset (the handler leaving the I/O thread) with requests in flight waits for
    /// them: each is completed in the used ring before the handler goes, and the engine
    /// waits for the next activation.
    #[test]
    fn a_reset_with_requests_in_flight_completes_them_first() {
        let r = rig("reset-inflight");
        let mq = MockSplitQueue::new(&r.mem, 16);
        for slot in 0..4u16 {
            post_write(&r, &mq, slot, u64::from(slot), 0x50);
        }
        let held = Held::default();
        let home: EngineHome = Arc::default();
        let kick = EventFd::new(0).unwrap();
        let w = held_worker_kicked(
            &r,
            mq.create_queue().unwrap(),
            &held,
            home.clone(),
            kick.try_clone().unwrap(),
        );
        let io = r.stack.io_thread();
        let id = io.add(Box::new(w)).unwrap();
        // The guest's kick: the handler starts all four, and they stay in flight.
        kick.write(1).unwrap();
        let t0 = std::time::Instant::now();
        while held.0.lock().unwrap().done.len() < 4 {
            assert!(
                t0.elapsed().as_secs() < 10,
                "the handler never started them"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(mq.used().idx().load(), 0);
        let gone = io.remove(id).unwrap();
        assert_eq!(
            mq.used().idx().load(),
            4,
            "every request completed before the reset"
        );
        drop(gone);
        assert!(
            home.lock().unwrap().is_some(),
            "the engine is back for the next activation"
        );
    }

    /// Counts its requests between pre and post, and the most it ever had open at once.
    struct Overlap;
    static OPEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static MOST_OPEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    impl interceptor_sdk::Interceptor for Overlap {
        const NAME: &'static std::ffi::CStr = c"overlap";
        fn create(_: interceptor_sdk::CreateContext<'_>) -> Result<Self, String> {
            Ok(Overlap)
        }
        fn pre(
            &self,
            _: &mut interceptor_sdk::Request<'_>,
            _: &mut interceptor_sdk::Slot,
        ) -> interceptor_sdk::Decision {
            let open = OPEN.fetch_add(1, Ordering::SeqCst) + 1;
            MOST_OPEN.fetch_max(open, Ordering::SeqCst);
            interceptor_sdk::Decision::Continue
        }
        fn post(
            &self,
            _: &mut interceptor_sdk::Request<'_>,
            _: interceptor_sdk::Slot,
            status: interceptor_sdk::Status,
        ) -> interceptor_sdk::Status {
            OPEN.fetch_sub(1, Ordering::SeqCst);
            status
        }
    }

    /// Through an interceptor, a write to another sector of a 4 KiB block that a request
    /// in flight writes waits for it; a write elsewhere does not. The plugin never has the
    /// two overlapping writes open at once, and all three land.
    #[test]
    fn overlapping_requests_through_interceptors_wait_for_each_other() {
        let mut r = rig("overlap");
        let plugin =
            compat::Plugin::from_static("overlap", interceptor_sdk::static_table!(Overlap))
                .unwrap();
        let spec = compat::InstanceSpec {
            id: "overlap".into(),
            plugin,
            config_json: "{}".into(),
            enabled: true,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&r.file)
            .unwrap();
        let backend = Arc::new(RawFile::new(f, false, "vdt").unwrap());
        r.stack = Arc::new(LiveStack::start("vdt", backend, &[spec], None).unwrap());
        let mq = MockSplitQueue::new(&r.mem, 16);
        post_write(&r, &mq, 0, 0, 0x11); // block 0
        post_write(&r, &mq, 1, 1, 0x22); // block 0 too: waits
        post_write(&r, &mq, 2, 64, 0x33); // block 8: goes
        let held = Held::default();
        let mut w = held_worker(&r, mq.create_queue().unwrap(), &held, Arc::default());
        w.process_queue();
        assert_eq!(
            held.0.lock().unwrap().done.len(),
            2,
            "the overlapping write waits"
        );
        assert_eq!(OPEN.load(Ordering::SeqCst), 2);
        held.release_newest_first();
        w.collect();
        assert_eq!(mq.used().idx().load(), 2);
        assert_eq!(held.0.lock().unwrap().done.len(), 1, "then it starts");
        held.release_newest_first();
        w.collect();
        assert_eq!(mq.used().idx().load(), 3);
        assert_eq!(OPEN.load(Ordering::SeqCst), 0);
        assert_eq!(MOST_OPEN.load(Ordering::SeqCst), 2);
        let disk = std::fs::read(&r.file).unwrap();
        assert!(disk[..512].iter().all(|&b| b == 0x11));
        assert!(disk[512..1024].iter().all(|&b| b == 0x22));
        assert!(disk[64 * 512..65 * 512].iter().all(|&b| b == 0x33));
    }

    /// Puts a discard (type 11) or write-zeroes (13) of `sectors` from `sector` in the avail
    /// ring at `slot`.
    fn post_range(
        r: &Rig,
        mq: &MockSplitQueue<GuestMemoryMmap>,
        slot: u16,
        req_type: u32,
        sector: u64,
        sectors: u32,
    ) {
        let base = 0x2_0000 + u64::from(slot) * 0x1000;
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&req_type.to_le_bytes());
        r.mem.write_slice(&hdr, GuestAddress(base)).unwrap();
        let mut range = [0u8; 16];
        range[..8].copy_from_slice(&sector.to_le_bytes());
        range[8..12].copy_from_slice(&sectors.to_le_bytes());
        r.mem
            .write_slice(&range, GuestAddress(base + 0x100))
            .unwrap();
        r.mem.write_obj(0xffu8, GuestAddress(base + 0x400)).unwrap();
        let first = slot * 3;
        for (i, (addr, len, flags)) in [
            (base, 16u32, NEXT),
            (base + 0x100, 16, NEXT),
            (base + 0x400, 1, WRITE),
        ]
        .into_iter()
        .enumerate()
        {
            let at = first + i as u16;
            let d = SplitDescriptor::new(addr, len, flags, at + 1);
            mq.desc_table().store(at, RawDescriptor::from(d)).unwrap();
        }
        mq.avail()
            .ring()
            .ref_at(usize::from(slot))
            .unwrap()
            .store(first);
        mq.avail().idx().store(slot + 1);
    }

    /// A write-zeroes through the queue zeros its range on the disk and nothing else; on a
    /// device that does not offer it, it is answered UNSUPP and the disk keeps its data.
    #[test]
    fn write_zeroes_through_the_queue_zeros_its_range_only_where_offered() {
        let r = rig("zeroes");
        std::fs::write(&r.file, vec![0xeeu8; 1 << 20]).unwrap();
        let mq = MockSplitQueue::new(&r.mem, 16);
        post_range(&r, &mq, 0, 13, 8, 16);
        let mut w = r.worker(mq.create_queue().unwrap()).with_discard(true);
        w.process_queue();
        assert_eq!(mq.used().idx().load(), 1);
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(0x2_0400)).unwrap(), 0);
        let disk = std::fs::read(&r.file).unwrap();
        assert!(disk[..8 * 512].iter().all(|&b| b == 0xee));
        assert!(disk[8 * 512..24 * 512].iter().all(|&b| b == 0), "zeroed");
        assert!(disk[24 * 512..].iter().all(|&b| b == 0xee));

        let r = rig("zeroes-off");
        std::fs::write(&r.file, vec![0xeeu8; 1 << 20]).unwrap();
        let mq = MockSplitQueue::new(&r.mem, 16);
        post_range(&r, &mq, 0, 11, 0, 8);
        let mut w = r.worker(mq.create_queue().unwrap());
        w.process_queue();
        let unsupp = VIRTIO_BLK_S_UNSUPP as u8;
        assert_eq!(
            r.mem.read_obj::<u8>(GuestAddress(0x2_0400)).unwrap(),
            unsupp
        );
        assert!(std::fs::read(&r.file).unwrap().iter().all(|&b| b == 0xee));
    }

    /// Through an interceptor, a write on one queue to a block a write on another queue of
    /// the same disk has in flight waits for it; when that one completes, the other queue is
    /// kicked and starts it. The plugin never has both open at once.
    #[test]
    fn overlapping_requests_on_two_queues_wait_for_each_other() {
        let mut r = rig("overlap-queues");
        let plugin =
            compat::Plugin::from_static("overlap2", interceptor_sdk::static_table!(Overlap2))
                .unwrap();
        let spec = compat::InstanceSpec {
            id: "overlap2".into(),
            plugin,
            config_json: "{}".into(),
            enabled: true,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&r.file)
            .unwrap();
        let backend = Arc::new(RawFile::new(f, false, "vdt").unwrap());
        r.stack = Arc::new(LiveStack::start("vdt", backend, &[spec], None).unwrap());
        let q0 = MockSplitQueue::create(&r.mem, GuestAddress(0x8_0000), 16);
        let q1 = MockSplitQueue::create(&r.mem, GuestAddress(0xa_0000), 16);
        post_write_in(&r, &q0, 0, 0, 0, 0x11);
        post_write_in(&r, &q1, 0, 1, 1, 0x22); // the same 4 KiB block
        let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
        let order = Arc::new(DiskOrder::new(
            kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
        ));
        let (h0, h1) = (Held::default(), Held::default());
        let mut w0 = held_worker(&r, q0.create_queue().unwrap(), &h0, Arc::default())
            .in_disk(order.clone(), 0);
        let mut w1 = held_worker(&r, q1.create_queue().unwrap(), &h1, Arc::default())
            .in_disk(order.clone(), 1);
        w0.process_queue();
        w1.process_queue();
        assert_eq!(h0.0.lock().unwrap().done.len(), 1);
        assert_eq!(h1.0.lock().unwrap().done.len(), 0, "queue 1's write waits");
        assert_eq!(OPEN2.load(Ordering::SeqCst), 1);
        h0.release_newest_first();
        w0.collect();
        assert_eq!(q0.used().idx().load(), 1);
        assert_eq!(kicks[1].read().unwrap(), 1, "queue 1 is woken");
        w1.process_queue();
        assert_eq!(h1.0.lock().unwrap().done.len(), 1, "and starts its write");
        h1.release_newest_first();
        w1.collect();
        assert_eq!(q1.used().idx().load(), 1);
        assert_eq!(MOST_OPEN2.load(Ordering::SeqCst), 1);
        let disk = std::fs::read(&r.file).unwrap();
        assert!(disk[..512].iter().all(|&b| b == 0x11));
        assert!(disk[512..1024].iter().all(|&b| b == 0x22));
    }

    /// `Overlap` for the two-queue test (its own counters: tests run in parallel).
    struct Overlap2;
    static OPEN2: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static MOST_OPEN2: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    impl interceptor_sdk::Interceptor for Overlap2 {
        const NAME: &'static std::ffi::CStr = c"overlap2";
        fn create(_: interceptor_sdk::CreateContext<'_>) -> Result<Self, String> {
            Ok(Overlap2)
        }
        fn pre(
            &self,
            _: &mut interceptor_sdk::Request<'_>,
            _: &mut interceptor_sdk::Slot,
        ) -> interceptor_sdk::Decision {
            let open = OPEN2.fetch_add(1, Ordering::SeqCst) + 1;
            MOST_OPEN2.fetch_max(open, Ordering::SeqCst);
            interceptor_sdk::Decision::Continue
        }
        fn post(
            &self,
            _: &mut interceptor_sdk::Request<'_>,
            _: interceptor_sdk::Slot,
            status: interceptor_sdk::Status,
        ) -> interceptor_sdk::Status {
            OPEN2.fetch_sub(1, Ordering::SeqCst);
            status
        }
    }
}
