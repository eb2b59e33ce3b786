//! The crash-consistency harness. A workload drives an interceptor stack over a
//! [`RecordingDisk`], which logs every write and flush that reaches the disk. A crash at
//! log position `k` is the image as of the last flush before `k`, plus any subset of the
//! writes between that flush and `k` (applied in order; dropping an earlier write while
//! keeping a later one is a disk that reordered them). The harness reopens a fresh stack on
//! that image and checks every guest block: it must read back the contents it had at the
//! last completed guest flush, or contents some later write gave it. Never an error, never
//! anything else.

use compat::{BlockBackend, BlockRequestKind, BlockStack, IoRequest, RequestStatus, Segment};
use std::sync::{Arc, Mutex};

/// One operation that reached the disk.
#[derive(Clone, Debug)]
pub enum DiskOp {
    Write { offset: u64, data: Vec<u8> },
    Flush,
}

/// A disk in memory that records every write and flush, in order.
pub struct RecordingDisk {
    inner: Mutex<Recording>,
}

struct Recording {
    image: Vec<u8>,
    log: Vec<DiskOp>,
}

impl RecordingDisk {
    pub fn new(image: Vec<u8>) -> Arc<RecordingDisk> {
        Arc::new(RecordingDisk {
            inner: Mutex::new(Recording {
                image,
                log: Vec::new(),
            }),
        })
    }

    /// The log so far.
    pub fn log(&self) -> Vec<DiskOp> {
        self.inner.lock().map(|r| r.log.clone()).unwrap_or_default()
    }

    /// Operations logged so far.
    pub fn position(&self) -> usize {
        self.inner.lock().map(|r| r.log.len()).unwrap_or(0)
    }
}

impl BlockBackend for RecordingDisk {
    fn capacity(&self) -> u64 {
        self.inner.lock().map(|r| r.image.len() as u64).unwrap_or(0)
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        let Ok(mut r) = self.inner.lock() else {
            return RequestStatus::IoError;
        };
        let mut at = req.offset as usize;
        match req.kind {
            BlockRequestKind::Read => {
                for s in req.segments {
                    std::ptr::copy_nonoverlapping(r.image[at..].as_ptr(), s.base, s.len);
                    at += s.len;
                }
            }
            BlockRequestKind::Write => {
                let mut data = Vec::with_capacity(req.len as usize);
                for s in req.segments {
                    data.extend_from_slice(std::slice::from_raw_parts(s.base, s.len));
                }
                r.image[at..at + data.len()].copy_from_slice(&data);
                r.log.push(DiskOp::Write {
                    offset: req.offset,
                    data,
                });
            }
            BlockRequestKind::Flush => r.log.push(DiskOp::Flush),
            // Recorded as the zeros a punched hole reads back as (a discard may read back
            // anything; zeros are one of those things).
            BlockRequestKind::Discard | BlockRequestKind::WriteZeroes => {
                let data = vec![0u8; req.len as usize];
                r.image[at..at + data.len()].copy_from_slice(&data);
                r.log.push(DiskOp::Write {
                    offset: req.offset,
                    data,
                });
            }
            BlockRequestKind::GetId => return RequestStatus::Unsupported,
        }
        RequestStatus::Ok
    }
}

/// The image a crash at log position `at` leaves: everything up to the last flush before
/// `at`, then the writes after it that `keep` says survived.
pub fn crash_image(
    base: &[u8],
    log: &[DiskOp],
    at: usize,
    mut keep: impl FnMut() -> bool,
) -> Vec<u8> {
    crash_image_torn(base, log, at, |_| keep().then_some(Landed::Whole))
}

/// How much of an unflushed write reached the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Landed {
    Whole,
    /// Only the 512-byte sectors whose flag is set (a write torn by the crash, its sectors
    /// landing in any order).
    Sectors(Vec<bool>),
}

/// As [`crash_image`], with each unflushed write (given its sector count) landing whole,
/// in part, or not at all (`None`) as `landed` says.
pub fn crash_image_torn(
    base: &[u8],
    log: &[DiskOp],
    at: usize,
    mut landed: impl FnMut(usize) -> Option<Landed>,
) -> Vec<u8> {
    let mut image = base.to_vec();
    let last_flush = log[..at]
        .iter()
        .rposition(|op| matches!(op, DiskOp::Flush))
        .map_or(0, |i| i + 1);
    for (i, op) in log[..at].iter().enumerate() {
        if let DiskOp::Write { offset, data } = op {
            let at = *offset as usize;
            let how = if i < last_flush {
                Some(Landed::Whole)
            } else {
                landed(data.len().div_ceil(512))
            };
            match how {
                Some(Landed::Whole) => image[at..at + data.len()].copy_from_slice(data),
                Some(Landed::Sectors(flags)) => {
                    for (k, sector) in data.chunks(512).enumerate() {
                        if flags.get(k).copied().unwrap_or(false) {
                            let o = at + k * 512;
                            image[o..o + sector.len()].copy_from_slice(sector);
                        }
                    }
                }
                None => {}
            }
        }
    }
    image
}

/// A small deterministic random number generator (splitmix64), so that every run with one
/// seed is the same run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Submits one request with one buffer.
pub fn submit(
    stack: &BlockStack,
    kind: BlockRequestKind,
    offset: u64,
    buf: &mut [u8],
) -> RequestStatus {
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    // SAFETY: `buf` is live for the call and the stack checks the range.
    unsafe { stack.submit(kind, offset, &seg) }
}

/// What the guest may find in each block after a crash: the contents at the last completed
/// flush, and every contents written since.
#[derive(Clone)]
pub struct Expectation {
    pub block_bytes: usize,
    pub allowed: Vec<Vec<Vec<u8>>>,
}

/// What the guest did, with the disk's log position when it started.
#[derive(Clone)]
enum Event {
    Write { offset: u64, data: Vec<u8> },
    FlushDone,
}

/// The guest's view of its disk through a workload, to know what a crash may leave.
pub struct Model {
    block_bytes: usize,
    /// Contents when the workload started (and the last flush before it).
    initial: Vec<Vec<u8>>,
    /// Current contents of each block.
    current: Vec<Vec<u8>>,
    /// (disk log position, event), in order.
    events: Vec<(usize, Event)>,
}

impl Model {
    pub fn new(blocks: usize, block_bytes: usize) -> Model {
        Model::starting_from(vec![vec![0u8; block_bytes]; blocks])
    }

    /// A model of a disk that starts with `contents` (one `Vec` per block), all durable:
    /// for a workload on a disk reopened after a crash.
    pub fn starting_from(contents: Vec<Vec<u8>>) -> Model {
        Model {
            block_bytes: contents.first().map_or(0, Vec::len),
            current: contents.clone(),
            initial: contents,
            events: Vec::new(),
        }
    }

    pub fn current(&self, block: usize) -> &[u8] {
        &self.current[block]
    }

    /// Applies a write to `current`; returns the blocks it touched.
    fn apply(current: &mut [Vec<u8>], b: usize, offset: u64, data: &[u8]) -> Vec<usize> {
        let mut touched = Vec::new();
        let mut pos = offset as usize;
        let mut rest = data;
        while !rest.is_empty() {
            let block = pos / b;
            let within = pos % b;
            let n = (b - within).min(rest.len());
            current[block][within..within + n].copy_from_slice(&rest[..n]);
            touched.push(block);
            rest = &rest[n..];
            pos += n;
        }
        touched
    }

    /// Call before submitting a write of `data` at byte `offset`, with the disk's position:
    /// from then on, a crash may leave it or not.
    pub fn before_write(&mut self, position: usize, offset: u64, data: &[u8]) {
        Self::apply(&mut self.current, self.block_bytes, offset, data);
        self.events.push((
            position,
            Event::Write {
                offset,
                data: data.to_vec(),
            },
        ));
    }

    /// Call after the write last announced with [`Model::before_write`] failed: a failed
    /// request leaves every block as it was (the stores promise it: docs/store.md), so it
    /// is as if it never ran.
    pub fn write_failed(&mut self) {
        if let Some(i) = self
            .events
            .iter()
            .rposition(|(_, e)| matches!(e, Event::Write { .. }))
        {
            self.events.remove(i);
        }
        self.current = self.initial.clone();
        for (_, e) in &self.events {
            if let Event::Write { offset, data } = e {
                Self::apply(&mut self.current, self.block_bytes, *offset, data);
            }
        }
    }

    /// Call after a flush completed, with the disk's position.
    pub fn after_flush(&mut self, position: usize) {
        self.events.push((position, Event::FlushDone));
    }

    /// What a crash at disk log position `at` may leave: each block's contents at the last
    /// flush completed by then, and every contents written to it since.
    pub fn expectation_at(&self, at: usize) -> Expectation {
        let b = self.block_bytes;
        let mut current = self.initial.clone();
        let mut allowed: Vec<Vec<Vec<u8>>> = current.iter().map(|c| vec![c.clone()]).collect();
        for (p, ev) in &self.events {
            if *p > at {
                break;
            }
            match ev {
                Event::Write { offset, data } => {
                    for block in Self::apply(&mut current, b, *offset, data) {
                        allowed[block].push(current[block].clone());
                    }
                }
                Event::FlushDone => {
                    for (a, c) in allowed.iter_mut().zip(&current) {
                        *a = vec![c.clone()];
                    }
                }
            }
        }
        Expectation {
            block_bytes: b,
            allowed,
        }
    }
}

/// Reads every block of `stack` and checks it against `e`, then runs every layer's own
/// check (what `vmm-img check` runs: map, refcounts, space, tags); the first violation, in
/// words. Returns what it read, block by block.
pub fn check(stack: &BlockStack, e: &Expectation) -> Result<Vec<Vec<u8>>, String> {
    let seen = check_blocks(stack, e)?;
    check_layers(stack)?;
    Ok(seen)
}

/// Every layer's check hook: clean, or the problems it found.
pub fn check_layers(stack: &BlockStack) -> Result<(), String> {
    for layer in stack.layers() {
        match layer.check() {
            Ok(Some(c)) if !c.problems.is_empty() => {
                return Err(format!(
                    "{}: check found {} problems: {}",
                    layer.id(),
                    c.problems.len(),
                    c.problems.join("; ")
                ))
            }
            Ok(_) => {}
            Err(err) => return Err(format!("{}: check: {err}", layer.id())),
        }
    }
    Ok(())
}

fn check_blocks(stack: &BlockStack, e: &Expectation) -> Result<Vec<Vec<u8>>, String> {
    let mut seen = Vec::with_capacity(e.allowed.len());
    for (block, allowed) in e.allowed.iter().enumerate() {
        let mut buf = vec![0u8; e.block_bytes];
        let status = submit(
            stack,
            BlockRequestKind::Read,
            (block * e.block_bytes) as u64,
            &mut buf,
        );
        if status != RequestStatus::Ok {
            return Err(format!("block {block}: read failed with {status:?}"));
        }
        if !allowed.contains(&buf) {
            return Err(format!(
                "block {block}: neither its flushed contents nor any written since ({} allowed)",
                allowed.len()
            ));
        }
        seen.push(buf);
    }
    Ok(seen)
}
