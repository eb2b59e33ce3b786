//! Our side: the disk's interceptor stack (a `LiveStack`: an empty chain, or the chain of
//! `--interceptors`) and its I/O engine, driven the way a virtio-blk queue drives them
//! (`devices/src/virtio/block/worker.rs`): `begin` (pre hooks) → `engine.submit(token)` →
//! one `commit` per batch → on completion `next_completion` → `complete` (post hooks).
//! Replacements are started as completions come in, so `depth` requests stay in flight
//! until the runtime is over. A request a pre hook answers itself (encryption does all its
//! I/O there) is done when `begin` returns, as in the device, and the next one starts.
//! A chain whose every instance declares `F_CONCURRENT` runs its pre hooks on the disk's
//! hook pool instead (`pool.rs`).

use crate::rng::XorShift;
use crate::slow::{SlowBackend, SlowIo};
use crate::sys::{cpu_time, Who};
use crate::{Below, Outcome, Rw, BS};
use block::{AsyncIo, BlockBackend, EngineChoice, RawFile, RequestStatus};
use compat::{BlockRequestKind, Exec, InFlight, InstanceSpec, LiveStack, Owner, Segment, Started};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::collections::HashSet;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The clock is read once every this many batches (at QD1 a batch is one request of a
/// couple of microseconds; a clock read costs tens of nanoseconds on this machine).
const CLOCK_EVERY: u32 = 8;

/// One 4 KiB, page-aligned buffer per slot (what guest memory would be).
pub(crate) struct Buffers {
    base: *mut u8,
    layout: Layout,
}

impl Buffers {
    /// `slots` buffers of `len` bytes each, filled with pseudo-random bytes (so a
    /// transform sees data that neither compresses nor repeats within a block).
    pub(crate) fn new(slots: usize, len: usize, seed: u64) -> Result<Buffers, String> {
        let size = slots.checked_mul(len).filter(|&n| n > 0);
        let layout = size
            .and_then(|n| Layout::from_size_align(n, 4096).ok())
            .ok_or("buffer layout: no room for the request buffers")?;
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        if base.is_null() {
            return Err("cannot allocate the request buffers".into());
        }
        // SAFETY: `base` is valid and aligned for `layout.size()` bytes, all initialized.
        let bytes = unsafe { std::slice::from_raw_parts_mut(base, layout.size()) };
        let mut rng = XorShift::new(seed);
        for word in bytes.chunks_mut(8) {
            let v = rng.next_u64().to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
        Ok(Buffers { base, layout })
    }

    pub(crate) fn slot(&self, i: usize, len: usize) -> Segment {
        Segment {
            // SAFETY: `i` is below the slot count the buffers were made for, each `len` long.
            base: unsafe { self.base.add(i * len) },
            len,
        }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.base, self.layout) };
    }
}

/// Engine tokens of plugins' own lower requests (ABI version 2), as the device marks them.
const LOWER: u64 = 1 << 63;

/// What one request slot needs to start a request.
struct Queue<'a> {
    stack: &'a LiveStack,
    engine: &'a mut dyn AsyncIo,
    /// Each slot's request and block; the request is `None` while a plugin holds it
    /// pending (ABI version 2).
    slots: Vec<Option<(Option<InFlight>, u64)>>,
    /// The queue's executor (ABI version 2): requests left pending, plugins' own lower
    /// requests and timers, driven as the device's queue drives it.
    exec: &'a Exec,
    /// Plugins' lower requests at the engine, by id.
    lowers: HashMap<u64, InFlight>,
    bufs: Buffers,
    rng: XorShift,
    kind: BlockRequestKind,
    blocks: u64,
    /// Through interceptors, the blocks in flight: a new request never overlaps one, as the
    /// device orders them (`order.rs`), since a plugin may rely on it.
    busy: Option<HashSet<u64>>,
    /// Requests the chain answered in `begin` (done there), and those of them that failed.
    answered: u64,
    answered_errors: u64,
    deadline: Instant,
}

impl Queue<'_> {
    /// A random block, not one in flight when that matters.
    fn pick(&mut self) -> u64 {
        loop {
            let block = self.rng.below(self.blocks);
            match &self.busy {
                Some(busy) if busy.contains(&block) => continue,
                _ => return block,
            }
        }
    }

    /// Starts a request in slot `i` (free) at a random block. Requests the chain answers
    /// itself are counted and followed by the next one; returns whether one went to the
    /// engine (not, once the runtime is over).
    fn start(&mut self, i: usize) -> Result<bool, String> {
        loop {
            let block = self.pick();
            let offset = block * BS;
            // SAFETY: the slot's buffer lives (in `bufs`) until the queue is dropped, which
            // is after every request has completed (the loop drains before returning), and
            // the request is one block inside the disk.
            let started = unsafe {
                self.stack
                    .begin(self.kind, offset, BS, vec![self.bufs.slot(i, BS as usize)])
            };
            match started {
                Started::Parked(p) => {
                    self.exec.park(p, Owner::Guest(i as u64));
                    if let Some(busy) = &mut self.busy {
                        busy.insert(block);
                    }
                    self.slots[i] = Some((None, block));
                    return Ok(true);
                }
                Started::Backend(f) => {
                    // SAFETY: as above: the buffer stays valid until the token comes back.
                    unsafe { self.engine.submit(&f.io(), i as u64) };
                    if let Some(busy) = &mut self.busy {
                        busy.insert(block);
                    }
                    self.slots[i] = Some((Some(f), block));
                    return Ok(true);
                }
                Started::Done(status) => {
                    self.answered += 1;
                    if status != RequestStatus::Ok {
                        self.answered_errors += 1;
                    }
                    if self.answered.is_multiple_of(u64::from(CLOCK_EVERY))
                        && Instant::now() >= self.deadline
                    {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Takes slot `token`'s request back from the engine.
    fn finish(&mut self, token: u64) -> Option<InFlight> {
        let (f, block) = self.slots.get_mut(token as usize).and_then(Option::take)?;
        if let Some(busy) = &mut self.busy {
            busy.remove(&block);
        }
        f
    }

    /// Works off the executor (ABI version 2): lower requests to the engine, guest requests
    /// that moved on to the engine; returns those that ended there (slot, status).
    fn advance(&mut self) -> Vec<(usize, RequestStatus)> {
        let mut ended = Vec::new();
        loop {
            self.exec.run();
            let mut moved = false;
            while let Some((id, f)) = self.exec.take_for_engine() {
                // SAFETY: the plugin keeps the buffers valid until its `done`.
                unsafe { self.engine.submit(&f.io(), LOWER | id) };
                self.lowers.insert(id, f);
                moved = true;
            }
            while let Some((i, started)) = self.exec.take_moved() {
                moved = true;
                let i = i as usize;
                match started {
                    Started::Backend(f) => {
                        // SAFETY: the slot's buffer stays valid until the token comes back.
                        unsafe { self.engine.submit(&f.io(), i as u64) };
                        if let Some((slot, _)) = self.slots.get_mut(i).and_then(Option::as_mut) {
                            *slot = Some(f);
                        }
                    }
                    Started::Done(status) => {
                        if let Some((_, block)) = self.slots.get_mut(i).and_then(Option::take) {
                            if let Some(busy) = &mut self.busy {
                                busy.remove(&block);
                            }
                        }
                        ended.push((i, status));
                    }
                    Started::Parked(p) => self.exec.park(p, Owner::Guest(i as u64)),
                }
            }
            if !moved {
                return ended;
            }
        }
    }

    /// Requests held by plugins, not at the engine.
    fn held(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Some((None, _))))
            .count()
    }
}

/// An open disk: its file, the backend the engine falls back on, and its stack.
type Opened = (Arc<RawFile>, Arc<dyn BlockBackend>, LiveStack);

/// Opens `path` (with O_DIRECT if `below.direct`) under `chain` (top first; empty: no
/// interceptors); the plugins' own I/O goes through `below.delay`.
fn open_stack(path: &Path, chain: &[InstanceSpec], below: Below) -> Result<Opened, String> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true);
    if below.direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut raw = RawFile::new(file, false, "bench").map_err(|e| format!("raw file: {e}"))?;
    if below.direct {
        raw = raw.with_direct();
    }
    let raw = Arc::new(raw);
    let mut backend: Arc<dyn BlockBackend> = raw.clone();
    if !below.delay.is_zero() {
        backend = Arc::new(SlowBackend {
            inner: backend,
            delay: below.delay,
        });
    }
    let stack = LiveStack::start("bench", backend.clone(), chain, None)
        .map_err(|e| format!("the disk's stack: {e}"))?;
    Ok((raw, backend, stack))
}

/// Shuts the stack down as the VMM does (flush, then every instance destroyed: a plugin
/// commits its metadata there).
fn close(stack: &LiveStack) -> Result<(), String> {
    match stack.close() {
        RequestStatus::Ok => Ok(()),
        s => Err(format!("closing the disk's stack: {s:?}")),
    }
}

/// Writes every byte of the disk `chain` shows over `path` once, in 1 MiB requests on the
/// synchronous engine, then closes it: so that reads through the chain find data, as on
/// the plain file (a transform answers a never-written block without any I/O).
pub fn fill(path: &Path, chain: &[InstanceSpec], direct: bool) -> Result<u64, String> {
    const LEN: u64 = 1 << 20;
    let below = Below {
        direct,
        delay: Duration::ZERO,
    };
    let (raw, backend, stack) = open_stack(path, chain, below)?;
    let mut engine = EngineChoice::Sync.open(raw.file(), false, 1, &backend)?;
    let buf = Buffers::new(1, LEN as usize, 0x5eed)?;
    let capacity = stack.capacity();
    let mut offset = 0;
    while offset < capacity {
        let len = LEN.min(capacity - offset);
        // SAFETY: `buf` outlives the request (done before the next turn) and the range is
        // inside the disk.
        let started = unsafe {
            stack.begin(
                BlockRequestKind::Write,
                offset,
                len,
                vec![buf.slot(0, len as usize)],
            )
        };
        let status = match started {
            Started::Done(s) => s,
            // Filling runs outside a queue: nothing may wait (see `BlockStack::submit`).
            Started::Parked(_) => RequestStatus::IoError,
            Started::Backend(f) => {
                // SAFETY: as above.
                unsafe { engine.submit(&f.io(), 0) };
                engine.commit();
                let done = loop {
                    match engine.next_completion() {
                        Some((_, s)) => break s,
                        None => engine.wait(),
                    }
                };
                stack.complete(f, done)
            }
        };
        if status != RequestStatus::Ok {
            return Err(format!("writing the disk at byte {offset}: {status:?}"));
        }
        offset += len;
    }
    close(&stack)?;
    Ok(capacity)
}

/// Runs one job for `runtime` with `depth` requests in flight on `path` (`bytes` long),
/// under `chain` (top first; empty: no interceptors).
#[allow(clippy::too_many_arguments)]
pub fn run(
    path: &Path,
    chain: &[InstanceSpec],
    engine: EngineChoice,
    rw: Rw,
    depth: usize,
    runtime: Duration,
    bytes: u64,
    seed: u64,
    below: Below,
) -> Result<Outcome, String> {
    let (raw, backend, stack) = open_stack(path, chain, below)?;
    let depth16 = u16::try_from(depth).map_err(|_| format!("depth {depth} is over 65535"))?;
    let mut engine = engine.open(raw.file(), false, depth16, &backend)?;
    if !below.delay.is_zero() {
        engine = Box::new(SlowIo::new(engine, below.delay));
    }
    let name = engine.name();
    let kind = match rw {
        Rw::RandRead => BlockRequestKind::Read,
        Rw::RandWrite => BlockRequestKind::Write,
    };
    let blocks = bytes.min(stack.capacity()) / BS;
    if blocks == 0 {
        return Err("the disk is smaller than one block".into());
    }
    if !chain.is_empty() && (depth as u64) > blocks {
        return Err(format!(
            "a depth of {depth} needs a disk of at least {depth} blocks"
        ));
    }
    let (cpu0, thread0) = (cpu_time(Who::Process), cpu_time(Who::Thread));
    let t0 = Instant::now();
    let deadline = t0 + runtime;
    if stack.concurrent() {
        // Every instance may run concurrently: the pre hooks run on the disk's hook pool,
        // as in the device.
        let bufs = Buffers::new(depth, BS as usize, seed)?;
        let counts = crate::pool::run(
            &stack,
            engine.as_mut(),
            &bufs,
            kind,
            blocks,
            depth,
            deadline,
            seed,
        );
        let secs = t0.elapsed().as_secs_f64();
        let cpu = (cpu_time(Who::Process) - cpu0).as_secs_f64();
        let thread = (cpu_time(Who::Thread) - thread0).as_secs_f64();
        drop(bufs);
        close(&stack)?;
        let c = counts?;
        if c.errors > 0 {
            return Err(format!("{} of {} requests failed", c.errors, c.done));
        }
        return Ok(Outcome {
            iops: c.done as f64 / secs,
            cpu_us_per_req: per_request(cpu, c.done),
            thread_us_per_req: per_request(thread, c.done),
            engine: name,
        });
    }
    let exec = Exec::new();
    let _on = exec.enter();
    let mut q = Queue {
        stack: &stack,
        engine: engine.as_mut(),
        slots: (0..depth).map(|_| None).collect(),
        exec: &exec,
        lowers: HashMap::new(),
        bufs: Buffers::new(depth, BS as usize, seed)?,
        rng: XorShift::new(seed),
        kind,
        blocks,
        busy: (!chain.is_empty()).then(HashSet::new),
        answered: 0,
        answered_errors: 0,
        deadline,
    };

    let (mut done, mut errors, mut batches, mut open) = (0u64, 0u64, 0u32, true);
    let mut failure = None;
    for i in 0..depth {
        match q.start(i) {
            Ok(true) => {}
            Ok(false) => {
                open = false;
                break;
            }
            Err(e) => {
                // What did start is drained below before the buffers go.
                failure = Some(e);
                open = false;
                break;
            }
        }
    }
    q.engine.commit();
    loop {
        // At most `depth` completions a batch: the synchronous engine has the replacement
        // of each done by the time it is started, so "until none is left" never ends.
        let mut n = 0usize;
        let mut ended = Vec::new();
        while n < depth {
            let Some((token, status)) = q.engine.next_completion() else {
                break;
            };
            n += 1;
            if token & LOWER != 0 {
                match q.lowers.remove(&(token & !LOWER)) {
                    Some(f) => q.exec.completed(token & !LOWER, f, status),
                    None => failure = Some(format!("unknown lower request {token:x}")),
                }
                continue;
            }
            let Some(f) = q.finish(token) else {
                failure = Some(format!("the engine completed unknown token {token}"));
                open = false;
                continue;
            };
            ended.push((token as usize, q.stack.complete(f, status)));
        }
        ended.extend(q.advance());
        for (slot, status) in ended {
            if status != RequestStatus::Ok {
                errors += 1;
            }
            done += 1;
            if open {
                match q.start(slot) {
                    Ok(true) => {}
                    Ok(false) => open = false,
                    Err(e) => {
                        failure = Some(e);
                        open = false;
                    }
                }
            }
        }
        if n > 0 {
            batches += 1;
            if open && batches % CLOCK_EVERY == 0 && Instant::now() >= deadline {
                open = false;
            }
        }
        q.engine.commit();
        let held = q.held();
        if q.engine.in_flight() == 0 && held == 0 {
            // Every request of the chain may be answered in `begin` (none at the engine).
            if open && failure.is_none() && Instant::now() < deadline {
                match q.start(0) {
                    Ok(true) => {
                        q.engine.commit();
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => failure = Some(e),
                }
            }
            break;
        }
        if n == 0 {
            match q.exec.next_timer() {
                // Plugins' timers first: the engine's wait would sleep past them.
                Some(at) => {
                    let now = Instant::now();
                    if at > now {
                        // With requests at the engine too, look at it again soon (its own
                        // wait could sleep past the timer).
                        let nap = if q.engine.in_flight() == 0 {
                            at - now
                        } else {
                            (at - now).min(Duration::from_micros(100))
                        };
                        std::thread::sleep(nap);
                    }
                    q.exec.fire_due(Instant::now());
                }
                None if q.engine.in_flight() > 0 => q.engine.wait(),
                // Held by a plugin with nothing to move it: what a drain would fail.
                None => {
                    q.exec.cancel_timers();
                    for who in q.exec.abandon() {
                        failure = Some(format!("interceptor {who} never resumed a request"));
                    }
                    open = false;
                }
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time(Who::Process) - cpu0).as_secs_f64();
    let thread = (cpu_time(Who::Thread) - thread0).as_secs_f64();
    done += q.answered;
    errors += q.answered_errors;
    drop(q);
    close(&stack)?;
    if let Some(e) = failure {
        return Err(e);
    }
    if errors > 0 {
        return Err(format!("{errors} of {done} requests failed"));
    }
    Ok(Outcome {
        iops: done as f64 / secs,
        cpu_us_per_req: per_request(cpu, done),
        thread_us_per_req: per_request(thread, done),
        engine: name,
    })
}

fn per_request(secs: f64, requests: u64) -> f64 {
    if requests == 0 {
        0.0
    } else {
        secs * 1e6 / requests as f64
    }
}
