//! The queue's handler: an event-manager subscriber on the disk's I/O thread, woken by the
//! queue's ioeventfd and by its I/O engine's completion eventfd. It pops each chain,
//! validates it (`request.rs`), starts it on the disk's stack (the pre hooks run) and hands
//! it to the engine; up to the queue's size are in flight at once, and each completes (post
//! hooks, status, used ring) when the engine says so, in whatever order. Through
//! interceptors, requests on the same blocks are ordered (`order.rs`). A guest that breaks
//! the queue itself (a ring index that runs ahead of the ring, a ring outside its memory)
//! gets DEVICE_NEEDS_RESET and nothing more is served until its driver resets the device.
//! When every instance of the chain declares `F_CONCURRENT`, a request's pre hooks run on
//! the disk's hook pool instead (`LiveStack::begin_on_pool`): the handler hands it over,
//! ordered as any other, and takes it back through its own channel and eventfd.

use super::coalesce::{Coalescer, QueueTimer, Signal};
use super::order::Footprint;
use super::request::{self, BlockRequest, Refused, RequestError};
use crate::logger::LogLimiter;
use crate::virtio::queue_stats::QueueStats;
use crate::virtio::Interrupt;
use block::AsyncIo;
use compat::event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use compat::{
    BlockRequestKind, Exec, InFlight, IoSubscriber, LiveStack, Owner, RequestStatus, Segment,
    Started,
};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Lines a guest can cause: a few per window, then a count of the ones left out.
static REFUSED_LOG: LogLimiter = LogLimiter::with_defaults();
static BROKEN_LOG: LogLimiter = LogLimiter::with_defaults();

/// The event-manager data of the queue's descriptors.
const KICK: u32 = 0;
const COMPLETION: u32 = 1;
const COALESCE_TIMER: u32 = 2;
const HOOKS_BACK: u32 = 3;
const EXEC_TIMER: u32 = 4;

/// Engine tokens of plugins' own lower requests (ABI version 2) carry this bit; a guest
/// request's token is its slot.
const LOWER: u64 = 1 << 63;
/// How long a drain waits for a plugin to resume the requests it left pending once
/// nothing else can move them (no timer, no lower request out): then they fail.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub(in crate::virtio::block) use pool::pool_eventfd;
use pool::PoolReturn;

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
    /// ABI version 2: the requests plugins left pending, their own lower requests and
    /// their timers, for all the disk's queues (a plugin may resume a request of one queue
    /// from a timer another queue armed).
    exec: Arc<Exec>,
}

impl DiskOrder {
    /// The order of a disk whose queues are kicked by `kicks` (clones of them).
    pub(super) fn new(kicks: Vec<EventFd>) -> DiskOrder {
        DiskOrder {
            in_flight: Mutex::default(),
            kicks,
            exec: Arc::default(),
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
    /// Interrupt coalescing, when the disk sets a delay (`coalesce.rs`).
    coalescer: Option<Coalescer>,
    /// Where this queue's figures are published (`stats.rs`), its entry `queue_index`.
    stats: Arc<QueueStats>,
    /// Requests on the hook pool come back here (`None`: no eventfd, the pool is not used).
    pool: Option<PoolReturn>,
    /// A request's footprint left the disk's order since the last `collect`.
    released: bool,
    /// Plugins' lower requests at this queue's engine, by id.
    lowers: HashMap<u64, InFlight>,
    /// What the plugins' timers wait on (`None`: no timer was made; they then fire at the
    /// queue's next event).
    exec_timer: Option<QueueTimer>,
    /// Since when a drain has found only pending requests that nothing can move.
    stuck_since: Option<std::time::Instant>,
    /// The deadline the plugins' timer is armed for.
    exec_armed_for: Option<std::time::Instant>,
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
            coalescer: None,
            stats: Arc::default(),
            pool: None,
            released: false,
            lowers: HashMap::new(),
            exec_timer: None,
            stuck_since: None,
            exec_armed_for: None,
        }
    }

    /// Plugins' timers (ABI version 2) wait on `timer`, made with the device.
    pub(super) fn with_exec_timer(mut self, timer: Option<QueueTimer>) -> Worker {
        self.exec_timer = timer;
        self
    }

    /// Makes the disk's executor the one this thread's hooks reach, until the guard goes.
    fn entered(&self) -> compat::EnteredArc {
        self.order.exec.enter_arc()
    }

    fn exec(&self) -> &Exec {
        &self.order.exec
    }

    /// Works off what the plugins queued (resumes, lower requests, their completions)
    /// until nothing moves: lower requests that reached the backend go to the engine,
    /// guest requests that moved on go to the engine or are answered.
    fn advance(&mut self) {
        if !self.exec().busy() {
            // The common case (no plugin of version 2 waiting on anything): no work, and
            // the timer stays as it is.
            return self.arm_exec_timer();
        }
        let queue = self.queue_index as u32;
        loop {
            self.exec().run();
            let mut moved = false;
            while let Some((id, f)) = self.exec().take_for_engine() {
                // SAFETY: the plugin keeps the buffers valid until its `done`, which runs
                // only after the engine returns the token (`collect`).
                unsafe { self.engine_mut().submit(&f.io(), LOWER | id) };
                self.lowers.insert(id, f);
                moved = true;
            }
            while let Some((token, started)) = self.exec().take_moved_for(queue) {
                self.moved(token as usize, started);
                moved = true;
            }
            if !moved {
                break;
            }
        }
        // Requests of the disk's other queues that moved on: they take them when woken.
        for q in self.exec().queues_with_moved() {
            if let Some(kick) = self.order.kicks.get(q as usize) {
                let _ = kick.write(1);
            }
        }
        self.arm_exec_timer();
    }

    /// The request in slot `token` moved on: answered, to the engine, or left pending.
    fn moved(&mut self, token: usize, started: Started) {
        match started {
            Started::Done(status) => {
                let Some(p) = self.slots.get_mut(token).and_then(Option::take) else {
                    return tracing::error!("blk-{}: no request in slot {token}", self.id);
                };
                self.release(token, p.footprint);
                self.used(p.head, &p.req, status);
            }
            Started::Backend(f) => {
                // SAFETY: the buffers are guest memory or the request's private copy,
                // both valid until the request is finished, which happens only after the
                // engine returns the token (`collect`).
                unsafe { self.engine_mut().submit(&f.io(), token as u64) };
                match self.slots.get_mut(token).and_then(Option::as_mut) {
                    Some(p) => p.at_engine = Some(f),
                    None => tracing::error!("blk-{}: no request in slot {token}", self.id),
                }
            }
            Started::Parked(parked) => {
                let owner = (self.queue_index as u64) << 32 | token as u64;
                self.exec().park(parked, Owner::Guest(owner));
            }
        }
    }

    /// Arms the plugins' timer for the earliest of their timers (or disarms it); a system
    /// call only when that changed.
    fn arm_exec_timer(&mut self) {
        let next = self.exec().next_timer();
        if next == self.exec_armed_for {
            return;
        }
        self.exec_armed_for = next;
        let Some(t) = &self.exec_timer else { return };
        let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
        let r = match next {
            Some(at) => {
                let after = at
                    .saturating_duration_since(std::time::Instant::now())
                    .max(std::time::Duration::from_nanos(1));
                t.reset(after, None)
            }
            None => t.clear(),
        };
        if let Err(e) = r {
            tracing::error!("blk-{}: cannot arm the plugins' timer: {e}", self.id);
        }
    }

    /// The plugins' timer is readable: fire what is due.
    fn exec_timer_fired(&mut self) {
        if let Some(t) = &self.exec_timer {
            // Non-blocking: an expiry a re-arm took back reads nothing.
            let _ = t.lock().unwrap_or_else(|p| p.into_inner()).wait();
        }
        // Fired: whatever comes next re-arms it.
        self.exec_armed_for = None;
        self.exec().fire_due(std::time::Instant::now());
        self.advance();
        self.engine_mut().commit();
        self.collect();
    }

    /// Publishes this queue's figures into `stats`.
    pub(super) fn with_stats(mut self, stats: Arc<QueueStats>) -> Worker {
        if let Some(s) = stats.queue(self.queue_index) {
            s.set_queue(&self.mem, &self.queue);
        }
        self.stats = stats;
        self
    }

    /// Stores the queue's ring positions and what it holds, for the API.
    fn publish(&self) {
        if let Some(s) = self.stats.queue(self.queue_index) {
            s.next_avail
                .store(u64::from(self.queue.next_avail()), Ordering::Relaxed);
            s.next_used
                .store(u64::from(self.queue.next_used()), Ordering::Relaxed);
            s.in_flight
                .store(self.in_flight() as u64, Ordering::Relaxed);
            s.held.store(self.held.len() as u64, Ordering::Relaxed);
        }
    }

    /// Queue `index` of a disk whose queues share `order`.
    pub(super) fn in_disk(mut self, order: Arc<DiskOrder>, index: usize) -> Worker {
        self.order = order;
        self.queue_index = index;
        self
    }

    /// Interrupts the guest at most once per `delay` (`coalesce.rs`), waiting on `timer`.
    pub(super) fn with_coalescing(
        mut self,
        timer: QueueTimer,
        delay: std::time::Duration,
    ) -> Worker {
        self.coalescer = Some(Coalescer::new(timer, delay));
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

    /// Signals the guest of the entries used since the last signal: now or, coalescing,
    /// when the delay since the queue's last interrupt is over.
    fn signal(&mut self) {
        if !self.unsignalled {
            return;
        }
        if let Some(c) = self.coalescer.as_mut() {
            if c.decide(std::time::Instant::now()) == Signal::Later {
                return;
            }
        }
        self.signal_now();
    }

    /// Signals the guest if it used entries since the last signal and, with
    /// VIRTIO_RING_F_EVENT_IDX, if it asked to hear about them (its used_event).
    fn signal_now(&mut self) {
        if !std::mem::take(&mut self.unsignalled) {
            return;
        }
        match self.queue.needs_notification(&self.mem) {
            Ok(false) => {}
            // An unreadable used_event signals: a lost interrupt would hang the guest.
            Ok(true) | Err(_) => {
                self.interrupt.signal_used_queue();
                if let Some(s) = self.stats.queue(self.queue_index) {
                    s.interrupts.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The coalescing timer's descriptor is readable: signal what waited.
    fn coalescing_timer_fired(&mut self) {
        let now = std::time::Instant::now();
        if self.coalescer.as_mut().is_some_and(|c| c.fired(now)) {
            self.signal_now();
        }
    }

    /// Completes what the engine has finished, then starts held requests that no longer
    /// wait for anything.
    fn collect(&mut self) {
        while let Some((token, backend)) = self.engine_mut().next_completion() {
            if token & LOWER != 0 {
                let id = token & !LOWER;
                match self.lowers.remove(&id) {
                    Some(f) => self.exec().completed(id, f, backend),
                    None => tracing::error!(
                        "blk-{}: the engine completed unknown lower request {id}",
                        self.id
                    ),
                }
                continue;
            }
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
            self.release(token as usize, p.footprint);
            let status = match p.at_engine {
                Some(f) => self.stack.complete(f, backend),
                None => backend,
            };
            self.used(p.head, &p.req, status);
        }
        self.advance();
        self.start_held();
        self.engine_mut().commit();
        self.signal();
        self.publish();
        if std::mem::take(&mut self.released) && self.order.kicks.len() > 1 {
            // Another queue's held request may have waited for one of these.
            for (q, kick) in self.order.kicks.iter().enumerate() {
                if q != self.queue_index {
                    let _ = kick.write(1);
                }
            }
        }
    }

    /// Frees `token` and takes its request's footprint out of the disk's order.
    fn release(&mut self, token: usize, footprint: Option<Footprint>) {
        self.free.push(token);
        if footprint.is_some() {
            let q = self.queue_index;
            self.order
                .lock()
                .retain(|&(oq, ot, _)| (oq, ot) != (q, token));
            self.released = true;
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
        // A drain: the plugins' timers fire at once, cancelled (docs/abi-v2.md).
        self.exec().cancel_timers();
        self.advance();
        self.pool_returned();
        self.collect();
        if self.engine_mut().in_flight() > 0 {
            self.engine_mut().wait();
            self.collect();
        } else if self.pool.as_ref().is_some_and(|p| p.out > 0) {
            self.wait_for_pool();
            self.pool_returned();
            self.collect();
        } else if self.exec().pending_in_queue(self.queue_index as u32) > 0 {
            self.wait_for_plugins();
        }
        self.in_flight() == 0 && self.held.is_empty()
    }

    /// Only requests plugins left pending are in flight and nothing can move them: a
    /// plugin that has not resumed them within [`DRAIN_TIMEOUT`] is broken, and they fail.
    fn wait_for_plugins(&mut self) {
        let now = std::time::Instant::now();
        let since = *self.stuck_since.get_or_insert(now);
        if now.duration_since(since) < DRAIN_TIMEOUT {
            std::thread::sleep(std::time::Duration::from_millis(1));
            return;
        }
        for who in self.exec().abandon_queue(self.queue_index as u32) {
            tracing::error!(
                "blk-{}: interceptor {who} left a request pending for {}s of a drain; it fails",
                self.id,
                DRAIN_TIMEOUT.as_secs()
            );
        }
        self.stuck_since = None;
        self.advance();
        self.collect();
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
    /// chain answered it, or leaves it to its plugin, when one left it pending).
    fn start(&mut self, p: Pending) {
        if self.goes_to_pool(&p) {
            return self.hand_to_pool(p);
        }
        let Some(segments) = self.segments(&p.req) else {
            return self.used(p.head, &p.req, RequestStatus::IoError);
        };
        let Some(token) = self.free.pop() else {
            // More in flight than the queue holds cannot happen (each is a distinct head).
            return self.used(p.head, &p.req, RequestStatus::IoError);
        };
        // SAFETY: every segment was checked to lie in guest memory, which stays mapped for
        // the VM's life; the request was checked against the capacity by `parse`, which
        // also computed its byte offset with checked arithmetic. The request finishes
        // before the handler goes (`settle` on reset and drop).
        let (kind, offset, len) = (p.req.kind, p.req.offset, p.req.io_len);
        let started = unsafe { self.stack.begin(kind, offset, len, segments) };
        if let Started::Done(status) = started {
            // Answered by the chain (a store answers every request so): never in flight.
            self.free.push(token);
            return self.used(p.head, &p.req, status);
        }
        // In flight from here (the disk's queues share this thread: nothing started in
        // between).
        if let Some(fp) = p.footprint {
            self.order.lock().push((self.queue_index, token, fp));
        }
        self.slots[token] = Some(p);
        self.moved(token, started);
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
        let _on = self.entered();
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
            if let Some(c) = &self.coalescer {
                let timer = Events::with_data_raw(c.raw_fd(), COALESCE_TIMER, EventSet::IN);
                let _ = ops.remove(timer);
            }
            if let Some(pool) = &self.pool {
                let _ = ops.remove(Events::with_data(&*pool.ready, HOOKS_BACK, EventSet::IN));
            }
            // What is used but unsignalled must still reach the guest.
            self.signal_now();
            return;
        }
        if which == COALESCE_TIMER {
            self.coalescing_timer_fired();
        } else if which == EXEC_TIMER {
            self.exec_timer_fired();
        } else if which == HOOKS_BACK {
            if let Some(pool) = &self.pool {
                let _ = pool.ready.read();
            }
            self.pool_returned();
            self.engine_mut().commit();
            self.collect();
        } else if which == COMPLETION {
            // Reading the count resets it; a failed read (nothing pending) is harmless.
            let _ = self.engine_mut().notifier().read();
            self.collect();
        } else {
            let _ = self.kick.read();
            if let Some(s) = self.stats.queue(self.queue_index) {
                s.kicks.fetch_add(1, Ordering::Relaxed);
            }
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
        if let Some(c) = &self.coalescer {
            let timer = Events::with_data_raw(c.raw_fd(), COALESCE_TIMER, EventSet::IN);
            if let Err(e) = ops.add(timer) {
                // Without its timer the queue signals every completion at once.
                tracing::error!("blk-{}: cannot watch the coalescing timer: {e}", self.id);
                self.coalescer = None;
            }
        }
        if let Some(t) = &self.exec_timer {
            let fd = t.lock().unwrap_or_else(|p| p.into_inner()).as_raw_fd();
            if let Err(e) = ops.add(Events::with_data_raw(fd, EXEC_TIMER, EventSet::IN)) {
                // Without it the plugins' timers fire at the queue's next event.
                tracing::error!("blk-{}: cannot watch the plugins' timer: {e}", self.id);
                self.exec_timer = None;
            }
        }
        if let Some(pool) = &self.pool {
            let back = Events::with_data(&*pool.ready, HOOKS_BACK, EventSet::IN);
            if let Err(e) = ops.add(back) {
                // Without it the queue starts every request itself.
                tracing::error!("blk-{}: cannot watch the hook pool's eventfd: {e}", self.id);
                self.pool = None;
            }
        }
    }
}

impl IoSubscriber for Worker {
    fn drain(&mut self) {
        let _on = self.entered();
        self.process_queue();
    }

    fn quiesce_step(&mut self) -> bool {
        let _on = self.entered();
        self.step()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The kernel may still be writing into guest memory for a request in flight. (The
        // I/O thread quiesced before this handler left it; held requests, if any, never
        // started and hold nothing.) What the hook pool holds comes back first.
        while self.pool.as_ref().is_some_and(|p| p.out > 0) {
            self.wait_for_pool();
        }
        let _on = self.entered();
        while self.engine.is_some() && self.engine_mut().in_flight() > 0 {
            self.engine_mut().wait();
            self.collect();
        }
        // Pending requests left (the handler goes without a drain: a panic's unwinding)
        // fail, and the plugins hear of their lower requests.
        self.exec().cancel_timers();
        self.exec().abandon_queue(self.queue_index as u32);
        self.advance();
        if let Some(engine) = self.engine.take() {
            *self.home.lock().unwrap_or_else(|p| p.into_inner()) = Some(engine);
        }
    }
}

mod pool;

#[cfg(test)]
pub(super) mod tests;
