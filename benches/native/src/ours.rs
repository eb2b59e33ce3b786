//! Our side: the disk's interceptor stack (a `LiveStack`, empty chain) and its I/O engine,
//! driven the way a virtio-blk queue drives them (`devices/src/virtio/block/worker.rs`):
//! `begin` (pre hooks) → `engine.submit(token)` → one `commit` per batch → on completion
//! `next_completion` → `complete` (post hooks). Replacements are started as completions
//! come in, so `depth` requests stay in flight until the runtime is over.

use crate::rng::XorShift;
use crate::sys::{cpu_time, Who};
use crate::{Outcome, Rw, BS};
use block::{AsyncIo, BlockBackend, EngineChoice, RawFile, RequestStatus};
use compat::{BlockRequestKind, InFlight, LiveStack, Segment, Started};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The clock is read once every this many batches (at QD1 a batch is one request of a
/// couple of microseconds; a clock read costs tens of nanoseconds on this machine).
const CLOCK_EVERY: u32 = 8;

/// One 4 KiB, page-aligned buffer per slot (what guest memory would be).
struct Buffers {
    base: *mut u8,
    layout: Layout,
}

impl Buffers {
    fn new(slots: usize, fill: u8) -> Result<Buffers, String> {
        let layout = Layout::from_size_align(slots * BS as usize, 4096)
            .map_err(|e| format!("buffer layout: {e}"))?;
        // SAFETY: the layout has a non-zero size (slots >= 1).
        let base = unsafe { alloc_zeroed(layout) };
        if base.is_null() {
            return Err("cannot allocate the request buffers".into());
        }
        // SAFETY: `base` is valid for `layout.size()` bytes.
        unsafe { std::ptr::write_bytes(base, fill, layout.size()) };
        Ok(Buffers { base, layout })
    }

    fn slot(&self, i: usize) -> Segment {
        Segment {
            // SAFETY: `i` is below the slot count the buffers were made for.
            base: unsafe { self.base.add(i * BS as usize) },
            len: BS as usize,
        }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.base, self.layout) };
    }
}

/// What one request slot needs to start a request.
struct Queue<'a> {
    stack: &'a LiveStack,
    engine: &'a mut dyn AsyncIo,
    slots: Vec<Option<InFlight>>,
    bufs: Buffers,
    rng: XorShift,
    kind: BlockRequestKind,
    blocks: u64,
}

impl Queue<'_> {
    /// Starts a request in slot `i` (free) at a random block.
    fn start(&mut self, i: usize) -> Result<(), String> {
        let offset = self.rng.block_offset(self.blocks, BS);
        // SAFETY: the slot's buffer lives (in `bufs`) until the queue is dropped, which is
        // after every request has completed (the loop drains before returning), and the
        // request is one block inside the disk.
        let started = unsafe {
            self.stack
                .begin(self.kind, offset, BS, vec![self.bufs.slot(i)])
        };
        let inflight = match started {
            Started::Backend(f) => f,
            // An empty chain never answers a request itself; this would be a bug here.
            Started::Done(status) => {
                return Err(format!(
                    "the stack answered a request at {offset} itself ({status:?})"
                ))
            }
        };
        // SAFETY: as above: the buffer stays valid until the token comes back.
        unsafe { self.engine.submit(&inflight.io(), i as u64) };
        self.slots[i] = Some(inflight);
        Ok(())
    }
}

/// Runs one job for `runtime` with `depth` requests in flight on `path` (`bytes` long).
pub fn run(
    path: &Path,
    engine: EngineChoice,
    rw: Rw,
    depth: usize,
    runtime: Duration,
    bytes: u64,
    seed: u64,
) -> Result<Outcome, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let raw = Arc::new(RawFile::new(file, false, "bench").map_err(|e| format!("raw file: {e}"))?);
    let backend: Arc<dyn BlockBackend> = raw.clone();
    let stack = LiveStack::start("bench", backend.clone(), &[], None)
        .map_err(|e| format!("the disk's stack: {e}"))?;
    let depth16 = u16::try_from(depth).map_err(|_| format!("depth {depth} is over 65535"))?;
    let mut engine = engine.open(raw.file(), false, depth16, &backend)?;
    let name = engine.name();
    let kind = match rw {
        Rw::RandRead => BlockRequestKind::Read,
        Rw::RandWrite => BlockRequestKind::Write,
    };
    let mut q = Queue {
        stack: &stack,
        engine: engine.as_mut(),
        slots: (0..depth).map(|_| None).collect(),
        bufs: Buffers::new(depth, 0x5a)?,
        rng: XorShift::new(seed),
        kind,
        blocks: bytes.min(stack.capacity()) / BS,
    };
    if q.blocks == 0 {
        return Err("the file is smaller than one block".into());
    }

    let (cpu0, thread0) = (cpu_time(Who::Process), cpu_time(Who::Thread));
    let t0 = Instant::now();
    let deadline = t0 + runtime;
    let (mut done, mut errors, mut batches, mut open) = (0u64, 0u64, 0u32, true);
    let mut failure = None;
    for i in 0..depth {
        if let Err(e) = q.start(i) {
            // What did start is drained below before the buffers go.
            failure = Some(e);
            open = false;
            break;
        }
    }
    q.engine.commit();
    loop {
        // At most `depth` completions a batch: the synchronous engine has the replacement
        // of each done by the time it is started, so "until none is left" never ends.
        let mut n = 0usize;
        while n < depth {
            let Some((token, status)) = q.engine.next_completion() else {
                break;
            };
            let Some(f) = q.slots.get_mut(token as usize).and_then(Option::take) else {
                failure = Some(format!("the engine completed unknown token {token}"));
                open = false;
                n += 1;
                continue;
            };
            if q.stack.complete(f, status) != RequestStatus::Ok {
                errors += 1;
            }
            done += 1;
            n += 1;
            if open {
                if let Err(e) = q.start(token as usize) {
                    failure = Some(e);
                    open = false;
                }
            }
        }
        if n > 0 {
            batches += 1;
            if open && batches % CLOCK_EVERY == 0 && Instant::now() >= deadline {
                open = false;
            }
            q.engine.commit();
        }
        if q.engine.in_flight() == 0 {
            break;
        }
        if n == 0 {
            q.engine.wait();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time(Who::Process) - cpu0).as_secs_f64();
    let thread = (cpu_time(Who::Thread) - thread0).as_secs_f64();
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
