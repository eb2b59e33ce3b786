//! ABI version 2 on a queue's thread (docs/abi-v2.md): requests a pre hook left pending,
//! the lower requests plugins queue without waiting, and their timers. One `Exec` per
//! queue; the shim's `vmm_lower.submit`, `resume` and `timer` find it through a
//! thread-local set while the queue's thread runs hooks ([`Exec::enter`]).
//!
//! Nothing here calls into a plugin from inside another call into it: `submit` and
//! `resume` only queue an event, and [`Exec::run`] works the events off afterwards, on the
//! same thread, one at a time. The queue drives it: it parks the guest requests a chain
//! left pending ([`Exec::park`]), runs it after every batch, takes back the guest requests
//! that moved on ([`Exec::take_moved`]) and the lower requests that reached the backend
//! ([`Exec::take_for_engine`]), and hands in their completions ([`Exec::completed`]).

use crate::stack::{BlockStack, InFlight, Parked, Started};
use crate::{BlockRequestKind, RequestStatus, Segment};
use interceptor_abi as abi;
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lower requests one instance may have out at once, unless its disk says otherwise.
pub const MAX_LOWER_IN_FLIGHT: u32 = 256;
/// Timers one queue holds at once (more are refused: a plugin arming one per request is
/// bounded by the queue's size several times over).
pub const MAX_TIMERS: usize = 4096;

/// Who waits for a request that moves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A guest request: its queue's token (`queue << 32 | slot` where a disk's queues share
    /// one `Exec`).
    Guest(u64),
    /// A lower request, by its id.
    Lower(u64),
}

enum Event {
    /// A plugin (by its `vmm_lower` context) decided on the request it left pending.
    Resume(u64, u32, usize),
    /// A lower request to start down its stack.
    Start(u64),
    /// A lower request is done: its plugin's `done` runs.
    Done(u64, RequestStatus),
}

/// A lower request from its `submit` to its `done`.
struct Lower {
    below: Arc<BlockStack>,
    kind: BlockRequestKind,
    offset: u64,
    len: u64,
    segments: Vec<Segment>,
    done: abi::DoneFn,
    arg: SendPtr,
    /// The submitting instance's count of lower requests out.
    out: Arc<AtomicU32>,
}

struct Timer {
    fire: abi::FireFn,
    arg: SendPtr,
}

#[derive(Clone, Copy)]
struct SendPtr(*mut c_void);

#[derive(Default)]
struct Inner {
    parked: HashMap<u64, (Parked, Owner)>,
    events: VecDeque<Event>,
    lowers: HashMap<u64, Lower>,
    next_lower: u64,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_fns: HashMap<u64, Timer>,
    next_timer: u64,
    moved: VecDeque<(u64, Started)>,
    for_engine: VecDeque<(u64, InFlight)>,
    /// Resumes of handles that were not pending (a plugin's mistake), for the stats.
    stale_resumes: u64,
}

/// A queue's requests in waiting.
#[derive(Default)]
pub struct Exec {
    inner: RefCell<Inner>,
    /// The thread it serves (set at its first `enter_arc`; checked in debug builds).
    thread: std::sync::OnceLock<std::thread::ThreadId>,
}

// SAFETY: an `Exec` serves the queues of one disk, which all run on the disk's one I/O
// thread: it is made on the main thread, moved there with them, and used there only (its
// `enter` checks the thread in debug builds). The raw pointers it holds are plugins'
// buffers and callback arguments, which the plugins promise valid until their callbacks
// run, on that thread.
unsafe impl Send for Exec {}
// SAFETY: as above: shared by the disk's queue handlers, used from one thread at a time.
unsafe impl Sync for Exec {}

/// [`Exec::enter_arc`]'s guard: keeps the `Exec` alive while the thread's hooks reach it.
pub struct EnteredArc {
    previous: *const Exec,
    _exec: Arc<Exec>,
}

impl Drop for EnteredArc {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

thread_local! {
    static CURRENT: Cell<*const Exec> = const { Cell::new(std::ptr::null()) };
}

/// While alive, `vmm_lower.submit`, `resume` and `timer` on this thread reach one `Exec`.
pub struct Entered<'a> {
    previous: *const Exec,
    _exec: std::marker::PhantomData<&'a Exec>,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

/// Why a lower request was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Not on a queue's thread (in `create`, a check, the synchronous walk): use the
    /// synchronous functions.
    NotHere,
    /// The instance has its most lower requests out.
    Busy,
    /// Bad kind, range or segments.
    Invalid,
}

impl Exec {
    pub fn new() -> Exec {
        Exec::default()
    }

    /// Makes this the queue the thread's hooks reach, until the guard goes.
    pub fn enter(&self) -> Entered<'_> {
        let previous = CURRENT.with(|c| c.replace(self as *const Exec));
        Entered {
            previous,
            _exec: std::marker::PhantomData,
        }
    }

    /// As [`enter`](Self::enter), for an `Exec` shared by a disk's queues: the guard holds
    /// its own reference, so it borrows nothing of the caller.
    pub fn enter_arc(self: &Arc<Self>) -> EnteredArc {
        self.check_thread();
        let previous = CURRENT.with(|c| c.replace(Arc::as_ptr(self)));
        EnteredArc {
            previous,
            _exec: self.clone(),
        }
    }

    /// Debug builds: an `Exec` is only ever used on one thread.
    fn check_thread(&self) {
        if cfg!(debug_assertions) {
            let me = std::thread::current().id();
            let first = *self.thread.get_or_init(|| me);
            debug_assert_eq!(first, me, "an Exec used from two threads");
        }
    }

    /// Runs `f` on the `Exec` this thread has entered, if any.
    fn with_current<R>(f: impl FnOnce(&Exec) -> R) -> Option<R> {
        let p = CURRENT.with(Cell::get);
        // SAFETY: set by `enter` from a live `Exec`, cleared (restored) when its guard
        // drops; the guard borrows the `Exec`, so it outlives every use here.
        unsafe { p.as_ref() }.map(f)
    }

    /// A guest request (`token`) a chain left pending.
    pub fn park(&self, parked: Parked, owner: Owner) {
        let h = parked.handle();
        self.inner.borrow_mut().parked.insert(h, (parked, owner));
    }

    /// Works off every event, in order, until none is left: resumes, lower requests to
    /// start, and completions (whose plugin callbacks may queue more).
    pub fn run(&self) {
        loop {
            let event = self.inner.borrow_mut().events.pop_front();
            let Some(event) = event else { break };
            match event {
                Event::Resume(handle, decision, caller) => {
                    let found = {
                        let mut inner = self.inner.borrow_mut();
                        match inner.parked.get(&handle) {
                            // Only the instance that left it pending resumes it: a request
                            // pending in another layer is not another plugin's to move.
                            Some((p, _)) if p.holder() == caller => inner.parked.remove(&handle),
                            _ => None,
                        }
                    };
                    match found {
                        Some((parked, owner)) => {
                            let started = parked.resume(decision);
                            self.moved_on(started, owner);
                        }
                        None => {
                            self.inner.borrow_mut().stale_resumes += 1;
                            tracing::warn!(
                                "a plugin resumed request {handle}, which it does not hold \
                                 pending; ignored"
                            );
                        }
                    }
                }
                Event::Start(id) => {
                    let started = {
                        let inner = self.inner.borrow();
                        let Some(l) = inner.lowers.get(&id) else {
                            continue;
                        };
                        let (below, kind, offset, len) = (l.below.clone(), l.kind, l.offset, l.len);
                        let segments = l.segments.clone();
                        drop(inner);
                        // SAFETY: the plugin keeps the segments valid until `done` (the
                        // `submit` contract); the range was checked against `below`.
                        unsafe { below.begin(kind, offset, len, segments) }
                    };
                    self.moved_on(started, Owner::Lower(id));
                }
                Event::Done(id, status) => {
                    let lower = self.inner.borrow_mut().lowers.remove(&id);
                    if let Some(l) = lower {
                        l.out.fetch_sub(1, Relaxed);
                        // SAFETY: the plugin's callback with its own argument, once.
                        unsafe { (l.done)(l.arg.0, status.to_abi()) };
                    }
                }
            }
        }
    }

    fn moved_on(&self, started: Started, owner: Owner) {
        let mut inner = self.inner.borrow_mut();
        match (started, owner) {
            (Started::Parked(p), owner) => {
                inner.parked.insert(p.handle(), (p, owner));
            }
            (started, Owner::Guest(token)) => inner.moved.push_back((token, started)),
            (Started::Done(status), Owner::Lower(id)) => {
                inner.events.push_back(Event::Done(id, status))
            }
            (Started::Backend(f), Owner::Lower(id)) => inner.for_engine.push_back((id, f)),
        }
    }

    /// The next guest request that moved on (down to the backend, or answered).
    pub fn take_moved(&self) -> Option<(u64, Started)> {
        self.inner.borrow_mut().moved.pop_front()
    }

    /// The next guest request of queue `queue` that moved on (its owner's token is
    /// `queue << 32 | slot`, see [`Owner::Guest`]).
    pub fn take_moved_for(&self, queue: u32) -> Option<(u32, Started)> {
        let mut inner = self.inner.borrow_mut();
        let i = inner
            .moved
            .iter()
            .position(|(t, _)| (*t >> 32) as u32 == queue)?;
        inner
            .moved
            .remove(i)
            .map(|(t, s)| ((t & u64::from(u32::MAX)) as u32, s))
    }

    /// The queues with requests that moved on waiting for them.
    pub fn queues_with_moved(&self) -> Vec<u32> {
        let mut q: Vec<u32> = self
            .inner
            .borrow()
            .moved
            .iter()
            .map(|(t, _)| (*t >> 32) as u32)
            .collect();
        q.sort_unstable();
        q.dedup();
        q
    }

    /// The next lower request that reached the backend: the queue runs it on its engine
    /// and hands it back with [`completed`](Self::completed).
    pub fn take_for_engine(&self) -> Option<(u64, InFlight)> {
        self.inner.borrow_mut().for_engine.pop_front()
    }

    /// The engine finished lower request `id` (`backend`): the post hooks of the layers
    /// it passed run, then (in `run`) its plugin's `done`.
    pub fn completed(&self, id: u64, request: InFlight, backend: RequestStatus) {
        let status = request.finish(backend);
        self.inner
            .borrow_mut()
            .events
            .push_back(Event::Done(id, status));
    }

    /// Queues a lower request of the instance whose layers below are `below`.
    ///
    /// # Safety
    /// The segments must stay valid until the request's `done` runs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn submit(
        &self,
        below: &Arc<BlockStack>,
        out: &Arc<AtomicU32>,
        max_out: u32,
        io: &abi::LowerIo,
    ) -> Result<(), SubmitError> {
        let Some(done) = io.done else {
            return Err(SubmitError::Invalid);
        };
        let kind = match io.kind {
            abi::REQ_READ => BlockRequestKind::Read,
            abi::REQ_WRITE => BlockRequestKind::Write,
            abi::REQ_FLUSH => BlockRequestKind::Flush,
            abi::REQ_DISCARD => BlockRequestKind::Discard,
            abi::REQ_WRITE_ZEROES => BlockRequestKind::WriteZeroes,
            _ => return Err(SubmitError::Invalid),
        };
        let segments = match (io.segments.is_null(), io.nsegments) {
            (_, 0) => Vec::new(),
            (true, _) => return Err(SubmitError::Invalid),
            // SAFETY: the plugin passes `nsegments` readable entries for the call.
            (false, n) => unsafe { std::slice::from_raw_parts(io.segments, n as usize) }.to_vec(),
        };
        let carried = segments
            .iter()
            .try_fold(0u64, |sum, s| sum.checked_add(s.len as u64));
        let shaped = match kind {
            BlockRequestKind::Read | BlockRequestKind::Write => {
                carried == Some(io.len) && segments.iter().all(|s| !s.base.is_null())
            }
            _ => segments.is_empty(),
        };
        let sector = crate::SECTOR_SIZE;
        let in_range = io
            .offset
            .checked_add(io.len)
            .is_some_and(|end| end <= below.capacity())
            && io.offset.is_multiple_of(sector)
            && io.len.is_multiple_of(sector);
        if io.flags != 0 || !shaped || !(in_range || kind == BlockRequestKind::Flush) {
            return Err(SubmitError::Invalid);
        }
        if out
            .fetch_update(Relaxed, Relaxed, |n| (n < max_out).then_some(n + 1))
            .is_err()
        {
            return Err(SubmitError::Busy);
        }
        let mut inner = self.inner.borrow_mut();
        inner.next_lower += 1;
        let id = inner.next_lower;
        inner.lowers.insert(
            id,
            Lower {
                below: below.clone(),
                kind,
                offset: io.offset,
                len: io.len,
                segments,
                done,
                arg: SendPtr(io.arg),
                out: out.clone(),
            },
        );
        inner.events.push_back(Event::Start(id));
        Ok(())
    }

    /// The plugin of `vmm_lower` context `caller` decided on request `handle` (checked
    /// when the event runs).
    pub fn resume(&self, handle: u64, decision: u32, caller: usize) {
        self.inner
            .borrow_mut()
            .events
            .push_back(Event::Resume(handle, decision, caller));
    }

    /// Arms a timer; false if the queue holds too many.
    pub fn timer(&self, after: Duration, fire: abi::FireFn, arg: *mut c_void) -> bool {
        let mut inner = self.inner.borrow_mut();
        if inner.timer_fns.len() >= MAX_TIMERS {
            return false;
        }
        inner.next_timer += 1;
        let id = inner.next_timer;
        let at = Instant::now() + after;
        inner.timers.push(Reverse((at, id)));
        inner.timer_fns.insert(
            id,
            Timer {
                fire,
                arg: SendPtr(arg),
            },
        );
        true
    }

    /// When the earliest timer is due.
    pub fn next_timer(&self) -> Option<Instant> {
        self.inner
            .borrow()
            .timers
            .peek()
            .map(|Reverse((at, _))| *at)
    }

    /// Fires the timers due by `now` (then `run` works off what they queued).
    pub fn fire_due(&self, now: Instant) {
        self.fire(|at| at <= now, 0);
    }

    /// Fires every timer at once, cancelled: the disk drains.
    pub fn cancel_timers(&self) {
        self.fire(|_| true, 1);
    }

    fn fire(&self, due: impl Fn(Instant) -> bool, cancelled: u32) {
        loop {
            let next = {
                let mut inner = self.inner.borrow_mut();
                let is_due = inner.timers.peek().is_some_and(|Reverse((at, _))| due(*at));
                match inner.timers.pop() {
                    Some(Reverse((_, id))) if is_due => inner.timer_fns.remove(&id),
                    Some(t) => {
                        inner.timers.push(t);
                        None
                    }
                    None => None,
                }
            };
            let Some(t) = next else { break };
            // SAFETY: the plugin's callback with its own argument, once.
            unsafe { (t.fire)(t.arg.0, cancelled) };
        }
    }

    /// Something for the queue to do: an event to run, a request moved on, a lower request
    /// for the engine. (Cheap: checked after every batch of every queue.)
    pub fn busy(&self) -> bool {
        let i = self.inner.borrow();
        !(i.events.is_empty() && i.moved.is_empty() && i.for_engine.is_empty())
    }

    /// Nothing waits here: no request pending, no lower request out, no event queued, no
    /// timer armed.
    pub fn idle(&self) -> bool {
        let i = self.inner.borrow();
        i.parked.is_empty()
            && i.lowers.is_empty()
            && i.events.is_empty()
            && i.moved.is_empty()
            && i.for_engine.is_empty()
            && i.timer_fns.is_empty()
    }

    /// Requests pending, lower requests out.
    pub fn counts(&self) -> (usize, usize) {
        let i = self.inner.borrow();
        (i.parked.len(), i.lowers.len())
    }

    /// Gives up on every request still pending (their post hooks run with an I/O error
    /// and the guest gets it); returns the instances that left them, for the log.
    pub fn abandon(&self) -> Vec<String> {
        self.abandon_where(|_| true)
    }

    /// As [`abandon`](Self::abandon), for the guest requests of queue `queue` only (and
    /// no lower request: those end when their parents do).
    pub fn abandon_queue(&self, queue: u32) -> Vec<String> {
        self.abandon_where(|o| matches!(o, Owner::Guest(t) if (t >> 32) as u32 == queue))
    }

    /// Guest requests of queue `queue` left pending.
    pub fn pending_in_queue(&self, queue: u32) -> usize {
        self.inner
            .borrow()
            .parked
            .values()
            .filter(|(_, o)| matches!(o, Owner::Guest(t) if (t >> 32) as u32 == queue))
            .count()
    }

    fn abandon_where(&self, which: impl Fn(&Owner) -> bool) -> Vec<String> {
        let parked: Vec<(Parked, Owner)> = {
            let mut inner = self.inner.borrow_mut();
            let handles: Vec<u64> = inner
                .parked
                .iter()
                .filter(|(_, (_, o))| which(o))
                .map(|(h, _)| *h)
                .collect();
            handles
                .iter()
                .filter_map(|h| inner.parked.remove(h))
                .collect()
        };
        let mut who = Vec::new();
        for (p, owner) in parked {
            who.push(p.instance_id().to_string());
            drop(p);
            match owner {
                Owner::Guest(t) => self
                    .inner
                    .borrow_mut()
                    .moved
                    .push_back((t, Started::Done(RequestStatus::IoError))),
                Owner::Lower(id) => self
                    .inner
                    .borrow_mut()
                    .events
                    .push_back(Event::Done(id, RequestStatus::IoError)),
            }
        }
        who
    }
}

/// `vmm_lower.submit`, `resume` and `timer` as the shim's extern functions see them.
pub(crate) mod ffi {
    use super::*;

    pub(crate) fn submit(
        below: &Arc<BlockStack>,
        out: &Arc<AtomicU32>,
        max_out: u32,
        io: *const abi::LowerIo,
    ) -> u32 {
        // SAFETY: the plugin passes a readable `vmm_lower_io` for the call.
        let Some(io) = (unsafe { io.as_ref() }) else {
            return abi::STATUS_IOERR;
        };
        // SAFETY: the segments' validity until `done` is the plugin's promise.
        let r = Exec::with_current(|e| unsafe { e.submit(below, out, max_out, io) });
        match r {
            Some(Ok(())) => abi::STATUS_OK,
            Some(Err(SubmitError::Busy)) => abi::STATUS_BUSY,
            Some(Err(SubmitError::Invalid)) => abi::STATUS_IOERR,
            Some(Err(SubmitError::NotHere)) | None => abi::STATUS_UNSUPP,
        }
    }

    pub(crate) fn resume(caller: usize, handle: *mut c_void, decision: u32) -> u32 {
        match Exec::with_current(|e| e.resume(handle as usize as u64, decision, caller)) {
            Some(()) => abi::STATUS_OK,
            None => abi::STATUS_UNSUPP,
        }
    }

    pub(crate) fn timer(ns: u64, fire: Option<abi::FireFn>, arg: *mut c_void) -> u32 {
        let Some(fire) = fire else {
            return abi::STATUS_IOERR;
        };
        match Exec::with_current(|e| e.timer(Duration::from_nanos(ns), fire, arg)) {
            Some(true) => abi::STATUS_OK,
            Some(false) => abi::STATUS_BUSY,
            None => abi::STATUS_UNSUPP,
        }
    }
}
